"""The model a stage starts from: built from params (the first stage) or loaded from its
parent's checkpoint, with what every later checkpoint is a delta over."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdsam.config.parse import to_dict
from cdsam.config.schema import Params
from cdsam.config.stages import StagePlan
from cdsam.errors import CheckpointError, UserError
from cdsam.models.checkpoint import load_checkpoint
from cdsam.models.delta_base import Base
from cdsam.models.model import CDSAM, build_model

log = logging.getLogger("cdsam.train")


@dataclass
class StageModel:
    model: CDSAM
    config: dict[str, Any]  # the architecture, as the checkpoint's meta.json records it
    base: Base | None  # what the stage's checkpoint is a delta over; None: saved in full


def load_stage_model(params: Params, plan: StagePlan, parent: Path | None) -> StageModel:
    """Stage ``plan.stage``'s starting model, before the curriculum is applied to it."""
    if plan.parent is None:
        model = build_model(params.model, load_weights=True, seed=params.seed)
        # What every stage's checkpoint is a delta over (the frozen parts are not copied).
        return StageModel(model, to_dict(params.model), Base.of(model, params.seed))
    if parent is None:
        raise UserError(f"stage {plan.stage} needs the stage {plan.parent} checkpoint")
    model, meta = load_checkpoint(parent)
    if meta.stage != plan.parent:
        raise CheckpointError(f"{parent}: is a stage {meta.stage} checkpoint, stage "
                              f"{plan.stage} starts from stage {plan.parent}")
    if meta.model != to_dict(params.model):
        log.warning("params.yaml `model` differs from %s/meta.json; the checkpoint's "
                    "architecture is used (rerun the earlier stages to apply the change)",
                    parent)
    # base is None for a full parent: this stage then saves in full too.
    return StageModel(model, meta.model, meta.base_state)
