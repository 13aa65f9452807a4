"""The training objective as one object, so train and val losses use the same weights.

``loss.dice_weight`` · Dice + ``loss.bce_weight`` · BCE on the upsampled logits, plus
``loss.clip_align_weight`` · CLIP alignment (mask-pooled image tokens vs. the prompt's text
feature, contrastive over the prompt vocabulary) and ``loss.ssl_weight`` · distillation to the
stage-start DINO (when a teacher is given). Validation calls the same object, so the train and
val curves in ``dvc plots`` measure the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cdsam.config.schema import LossConfig
from cdsam.models.dino import dino_patch_tokens
from cdsam.models.losses import bce_loss, clip_align_loss, dice_loss, feature_distill_loss
from cdsam.models.model import CDSAM, CDSAMOutput


@dataclass
class Objective:
    cfg: LossConfig
    vocab: list[str]  # prompts the CLIP term contrasts against
    vocab_feats: torch.Tensor  # VxD normalised fp32 CLIP text features of ``vocab``, on the
    # model's device
    token_proj: nn.Module
    teacher: nn.Module | None = None  # frozen stage-start DINO for the SSL term

    def __post_init__(self) -> None:
        self.index = {t: i for i, t in enumerate(self.vocab)}

    @classmethod
    def for_model(cls, model: CDSAM, cfg: LossConfig, vocab: list[str],
                  teacher: nn.Module | None = None) -> Objective:
        """Text features of the vocabulary computed once (the CLIP tower is frozen)."""
        return cls(cfg, vocab, model.clip_text(vocab).float(), model.token_proj, teacher)

    def __call__(self, out: CDSAMOutput, images: torch.Tensor, target: torch.Tensor,
                 valid: torch.Tensor, prompts: list[str]
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        lc = self.cfg
        logits = out.masks.float()
        parts = {"dice": dice_loss(logits, target, valid), "bce": bce_loss(logits, target, valid)}
        loss = lc.dice_weight * parts["dice"] + lc.bce_weight * parts["bce"]
        if lc.clip_align_weight > 0:
            labels = torch.tensor([self.index[t] for t in prompts], device=logits.device)
            projected = self.token_proj(out.tokens)
            parts["clip_align"] = clip_align_loss(
                projected.float(), out.grid, target, valid, self.vocab_feats, labels,
                lc.clip_temperature)
            loss = loss + lc.clip_align_weight * parts["clip_align"]
        if self.teacher is not None and lc.ssl_weight > 0:
            with torch.no_grad():
                teacher_tokens, _ = dino_patch_tokens(self.teacher, images)
            parts["ssl"] = feature_distill_loss(out.tokens.float(), teacher_tokens.float())
            loss = loss + lc.ssl_weight * parts["ssl"]
        return loss, parts
