"""One batch through the model and the objective: the path the training step and scoring share.

Inputs to the device, autocast as the run's :class:`~cdsam.runtime.Precision` says, the frozen
DINO prefix from a feature cache where one is given (its ``end_block`` says where the rest of
DINO starts), the model, then the objective's loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from cdsam.data.spatial import batch_prompts
from cdsam.models.model import CDSAM, CDSAMOutput
from cdsam.models.objective import Objective
from cdsam.runtime import Precision


class PrefixCache(Protocol):
    """What the forward pass needs of a feature cache (`cdsam.training.feature_cache`)."""

    end_block: int

    def lookup(self, image_keys: list[str], images: torch.Tensor,
               compute: Any) -> torch.Tensor: ...


@dataclass
class BatchResult:
    out: CDSAMOutput
    loss: torch.Tensor  # the objective's total, on the device
    parts: dict[str, torch.Tensor]  # its terms, detached, on the device
    target: torch.Tensor
    valid: torch.Tensor


def forward_batch(net: nn.Module, model: CDSAM, batch: dict[str, Any], objective: Objective,
                  precision: Precision, cache: PrefixCache | None = None) -> BatchResult:
    """``batch`` through ``net`` (``model`` itself, or a DDP wrapper of it) and ``objective``.

    An image-major batch (``image_of`` in it, `cdsam.data.packed`) runs DINO once per image.
    The cache's prefix is looked up without gradients: it is the frozen part of DINO. While the
    text tower trains, the objective's vocabulary is encoded once per step, with gradients, and
    serves both the samples' prompts and the CLIP alignment term (outside ``net``: its
    parameters' gradients reach DDP's hooks all the same).
    """
    device = precision.device
    images = batch["image"].to(device, non_blocking=True)
    target = batch["mask"].to(device, non_blocking=True)
    valid = batch["valid"].to(device, non_blocking=True)
    start = 0 if cache is None else cache.end_block
    with precision.autocast():
        prefix = None
        if cache is not None:
            with torch.no_grad():
                prefix = cache.lookup(batch["image_key"], images,
                                      lambda x: model.dino_prefix(x, start))
        text, vocab = objective.step_text(model, batch["prompt"], batch.get("template"))
        image_of = batch.get("image_of")
        extra = {} if image_of is None else {"image_of": image_of.to(device, non_blocking=True)}
        out = net(images, batch["prompt"], prefix=prefix, start_block=start, text=text,
                  **batch_prompts(batch, device), **extra)
        objects = batch.get("objects")
        if objects is not None:
            objects = objects.to(device, non_blocking=True)
        loss, parts = objective(out, images, target, valid, batch["prompt"], vocab, objects)
    # Parts stay on the device: reading them back would make the host wait every step.
    return BatchResult(out, loss, {k: v.detach() for k, v in parts.items()}, target, valid)
