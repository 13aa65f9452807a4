"""The training objective as one object, so train and val losses use the same weights.

``loss.dice_weight`` · Dice + ``loss.bce_weight`` · BCE on the upsampled logits, plus
``loss.clip_align_weight`` · CLIP alignment (mask-pooled image tokens vs. the prompt's text
feature, contrastive over the prompt vocabulary) and ``loss.ssl_weight`` · distillation to the
stage-start DINO (when a teacher is given), and with the instance heads
``loss.presence_weight`` · presence BCE + ``loss.iou_weight`` · IoU-prediction MSE +
``loss.centre_weight`` · centre-heatmap BCE (:func:`instance_terms`). Validation calls the same object, so the train and
val curves in ``dvc plots`` measure the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cdsam.config.schema import LossConfig
from cdsam.data.centres import centre_heatmap
from cdsam.data.templates import PromptEnsembles
from cdsam.models.clip_text import mean_features
from cdsam.models.dino import dino_patch_tokens
from cdsam.models.losses import bce_loss, clip_align_loss, dice_loss, feature_distill_loss
from cdsam.models.model import CDSAM, CDSAMOutput


def instance_terms(out: CDSAMOutput, logits: torch.Tensor, target: torch.Tensor,
                   valid: torch.Tensor, objects: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The instance heads' terms: presence BCE (the target has foreground or not), MSE of
    SAM's IoU prediction against the IoU its mask reaches (positives), and the centre
    heatmap's BCE (`cdsam.data.centres`) on positives with objects and on negatives. A term
    with no sample is zero but keeps its head in the graph (DDP expects every trainable
    parameter in every step)."""
    truth = target * valid
    present = (truth.flatten(1).amax(dim=1) > 0).float()
    presence = F.binary_cross_entropy_with_logits(out.presence.float(), present)
    with torch.no_grad():
        pred = (logits > 0).float() * valid
        inter = (pred * truth).flatten(1).sum(1)
        union = (pred + truth - pred * truth).flatten(1).sum(1)
        reached = inter / union.clamp(min=1)
    err = (out.iou[:, 0].float() - reached) ** 2
    iou = (err * present).sum() / present.sum().clamp(min=1)
    centres = out.centres.float()
    if objects is None:
        centre = centres.sum() * 0.0
    else:
        size = tuple(centres.shape[-2:])
        heat = centre_heatmap(objects, size)
        seen = F.interpolate(valid, size=size, mode="area")
        # Positives without any object (a class the source gave no objects) are left out.
        rows = (1 - present) + present * (objects.flatten(1).amax(dim=1) > 0).float()
        pix = F.binary_cross_entropy_with_logits(centres, heat, reduction="none") * seen
        per = pix.flatten(1).sum(1) / seen.flatten(1).sum(1).clamp(min=1)
        centre = (per * rows).sum() / rows.sum().clamp(min=1)
    return {"presence": presence, "iou": iou, "centre": centre}


@dataclass
class Objective:
    cfg: LossConfig
    vocab: list[str]  # prompts the CLIP term contrasts against
    vocab_feats: torch.Tensor  # VxD normalised fp32 CLIP text features of ``vocab``, on the
    # model's device
    token_proj: nn.Module
    teacher: nn.Module | None = None  # frozen stage-start DINO for the SSL term
    # Several prompt templates: a prompt's feature is the mean over its class's templates.
    ensembles: PromptEnsembles | None = None

    def __post_init__(self) -> None:
        self.index = {t: i for i, t in enumerate(self.vocab)}
        # Per vocabulary prompt, the texts its feature is the mean of; and every such text
        # once, sorted, with where each group's texts sit in that list (a tuning step encodes
        # the list and gathers the groups from it). Fixed for the run: worked out here once.
        self.groups = [[p] for p in self.vocab] if self.ensembles is None else \
            [self.ensembles.variants(p) for p in self.vocab]
        self.texts = sorted({t for g in self.groups for t in g})
        self.text_row = {t: i for i, t in enumerate(self.texts)}
        self.group_rows = [self.text_row[t] for g in self.groups for t in g]
        self.group_sizes = [len(g) for g in self.groups]

    @classmethod
    def for_model(cls, model: CDSAM, cfg: LossConfig, vocab: list[str],
                  teacher: nn.Module | None = None,
                  ensembles: PromptEnsembles | None = None) -> Objective:
        """Text features of the vocabulary computed once (:meth:`refresh` after the text tower
        moves)."""
        objective = cls(cfg, vocab, torch.empty(0), model.token_proj, teacher, ensembles)
        objective.refresh(model, clear=False)
        return objective

    def refresh(self, model: CDSAM, clear: bool = True) -> None:
        """The vocabulary's features again, from a text tower that trained since."""
        if clear:
            model.clip_text.clear_cache()
        with torch.no_grad():
            self.vocab_feats = model.clip_text.groups(self.groups).float()

    def step_text(self, model: CDSAM, prompts: list[str], draws: list[int] | None
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(the samples' text features, the vocabulary's) for one batch, or None for what the
        model and this objective take as they are. Tuning the tower: every text of the
        vocabulary encoded once, with gradients, for both. ``draws``: each training sample's
        template (shown alone); without, a prompt's feature is its ensemble's mean."""
        tower = model.clip_text
        if tower.tuning:
            feats = tower.encode(self.texts)
            vocab = mean_features(feats[torch.tensor(self.group_rows, device=feats.device)],
                                  self.group_sizes)
            if draws is not None and self.ensembles is not None:
                shown = [self.text_row[self.ensembles.variant(p, k)]
                         for p, k in zip(prompts, draws, strict=True)]
                return feats[torch.tensor(shown, device=feats.device)], vocab
            return vocab[self.rows(prompts, vocab.device)], vocab
        if self.ensembles is None:
            return None, None
        if draws is not None:
            return tower([self.ensembles.variant(p, k)
                          for p, k in zip(prompts, draws, strict=True)]), None
        return self.vocab_feats[self.rows(prompts, self.vocab_feats.device)], None

    def rows(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        """Each prompt's row of the vocabulary."""
        return torch.tensor([self.index[t] for t in prompts], device=device)

    def __call__(self, out: CDSAMOutput, images: torch.Tensor, target: torch.Tensor,
                 valid: torch.Tensor, prompts: list[str],
                 vocab_feats: torch.Tensor | None = None,
                 objects: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``vocab_feats``: this step's VxD features of the vocabulary, with gradients, when the
        text tower trains; else the ones kept. An image-major batch (``out.image_of``) has
        ``images`` and ``out.tokens`` one per image: the teacher encodes each image once.
        ``objects``: the batch's Sx1xHxW object ids, where the data has objects (the centre
        term's target)."""
        lc = self.cfg
        logits = out.masks.float()
        parts = {"dice": dice_loss(logits, target, valid), "bce": bce_loss(logits, target, valid)}
        loss = lc.dice_weight * parts["dice"] + lc.bce_weight * parts["bce"]
        if out.presence is not None:
            terms = instance_terms(out, logits, target, valid, objects)
            parts.update(terms)
            loss = loss + lc.presence_weight * terms["presence"] + \
                lc.iou_weight * terms["iou"] + lc.centre_weight * terms["centre"]
        if lc.clip_align_weight > 0:
            labels = self.rows(prompts, logits.device)
            # Projected once per image; each sample pools its image's row with its own mask.
            projected = out.sample_rows(self.token_proj(out.tokens))
            feats = self.vocab_feats if vocab_feats is None else vocab_feats
            parts["clip_align"] = clip_align_loss(
                projected.float(), out.grid, target, valid, feats, labels,
                lc.clip_temperature)
            loss = loss + lc.clip_align_weight * parts["clip_align"]
        if self.teacher is not None and lc.ssl_weight > 0:
            with torch.no_grad():
                teacher_tokens, _ = dino_patch_tokens(self.teacher, images)
            # Per image, then weighted by its samples (as rows that each encode their image).
            parts["ssl"] = out.sample_rows(feature_distill_loss(
                out.tokens.float(), teacher_tokens.float(), reduce=False)).mean()
            loss = loss + lc.ssl_weight * parts["ssl"]
        return loss, parts
