"""How far a tuned CLIP text tower has moved from the base one: ``1 - mean cosine`` between the
two towers' features over a list of prompts.

Two lists: the training vocabulary (``text_drift``: what tuning is for) and held-out general
phrases (``text_drift_general``: what it should not forget) — a shipped list of common object
words in CLIP's ``"a photo of a {}"``, or ``evaluate.drift_prompts`` in the evaluate stage. A
tower whose features equal the base's, bit for bit (a frozen tower, or adapters whose B is
still zero), drifts exactly 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch

from cdsam.config.parse import parse_section
from cdsam.config.schema import ModelConfig
from cdsam.models.clip_text import ClipTextEncoder
from cdsam.models.delta_base import Base, canonical_names, tensor_digest
from cdsam.models.lora import has_lora
from cdsam.models.model import build_model

GENERAL_TEMPLATE = "a photo of a {}"
KINDS = ("text_drift", "text_drift_general")


def general_prompts(template: str = GENERAL_TEMPLATE) -> list[str]:
    """The shipped held-out phrases: every common object word in ``template``."""
    text = resources.files("cdsam.evaluation").joinpath("drift_words.txt").read_text()
    words = [w.strip() for w in text.splitlines() if w.strip() and not w.startswith("#")]
    return [template.format(w) for w in words]


def feature_drift(feats: torch.Tensor, base: torch.Tensor) -> float:
    """``1 - mean cosine`` of two PxD feature sets, row by row; rows equal bit for bit count 0
    (their computed cosine may round a hair below 1)."""
    same = (feats == base).all(dim=1)
    cos = torch.nn.functional.cosine_similarity(feats.double(), base.double(), dim=1)
    per_row = torch.where(same, torch.zeros_like(cos), (1 - cos).clamp_min(0))
    return float(per_row.mean())


@torch.no_grad()
def tower_features(tower: ClipTextEncoder, prompts: list[str]) -> torch.Tensor:
    """The tower's features of ``prompts`` (through its per-prompt cache), on the host."""
    return tower(prompts).float().cpu()


def tower_is_base(tower: ClipTextEncoder, base: Base | None, prefix: str = "clip_text.") -> bool:
    """The text tower holds exactly the base's tensors, with no adapter."""
    if base is None or has_lora(tower):
        return False
    names = canonical_names(tower)
    for key, value in tower.state_dict().items():
        if base.digests.get(prefix + names[key]) != tensor_digest(value):
            return False
    return True


@dataclass
class TextDrift:
    """The drift of one text tower against base features computed once.

    ``base`` None: the tower is the base and nothing in this run moves it, so every figure is
    0 without encoding anything.
    """

    prompts: dict[str, list[str]]  # kind -> its prompts
    base: dict[str, torch.Tensor] | None  # kind -> the base tower's PxD features

    @classmethod
    def against(cls, base_tower: ClipTextEncoder | None, vocab: list[str],
                general: list[str]) -> TextDrift:
        """Base features from ``base_tower`` (None: the tower is and stays the base)."""
        prompts = {"text_drift": list(vocab), "text_drift_general": list(general)}
        if base_tower is None:
            return cls(prompts, None)
        return cls(prompts, {k: tower_features(base_tower, p) for k, p in prompts.items()})

    def measure(self, tower: ClipTextEncoder) -> dict[str, float]:
        if self.base is None:
            return dict.fromkeys(KINDS, 0.0)
        return {k: feature_drift(tower_features(tower, self.prompts[k]), self.base[k])
                for k in KINDS}


def rebuild_base_tower(model_cfg: dict[str, Any], seed: int | None) -> ClipTextEncoder:
    """The base text tower of a model config and seed: the whole model is built as the
    checkpoint's base was (a random-init tower depends on what was drawn before it), on the
    host, leaving the caller's RNG alone."""
    errors: list[str] = []
    cfg = parse_section(ModelConfig, model_cfg, "model", errors)
    if errors:
        raise ValueError(f"bad model config ({errors[0]})")
    with torch.random.fork_rng(devices=[]):
        return build_model(cfg, load_weights=True, seed=seed).clip_text
