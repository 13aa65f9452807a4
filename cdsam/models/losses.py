"""Losses: Dice + BCE on upsampled logits, CLIP alignment, SSL feature distillation.

Every loss takes a ``valid`` mask (0 on ignore pixels) so ignored pixels count as neither
foreground nor background.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dice_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
              eps: float = 1.0) -> torch.Tensor:
    """Soft Dice over each sample's valid pixels, averaged over the batch. Bx1xHxW inputs."""
    prob = torch.sigmoid(logits) * valid
    target = target * valid
    inter = (prob * target).flatten(1).sum(1)
    denom = prob.flatten(1).sum(1) + target.flatten(1).sum(1)
    return (1 - (2 * inter + eps) / (denom + eps)).mean()


def bce_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    per_pixel = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (per_pixel * valid).sum() / valid.sum().clamp_min(1.0)


def clip_align_loss(projected: torch.Tensor, grid: tuple[int, int], target: torch.Tensor,
                    valid: torch.Tensor, text_vocab: torch.Tensor, labels: torch.Tensor,
                    temperature: float) -> torch.Tensor:
    """Contrastive alignment of mask-pooled image tokens with the prompt vocabulary.

    projected: BxNxD tokens in CLIP space; target/valid: Bx1xHxW; text_vocab: VxD (normalised);
    labels: B indices into the vocabulary. Samples whose mask is empty on the grid are skipped
    (weighted out rather than indexed out: how many there are is never read back from the
    device, so the step does not wait; a batch with none left gives 0 and keeps the graph).
    """
    h, w = grid
    weights = F.adaptive_avg_pool2d(target * valid, (h, w)).flatten(1)  # BxN
    mass = weights.sum(1)
    keep = (mass > 1e-6).to(projected.dtype)
    pooled = (weights.unsqueeze(-1) * projected).sum(1) / mass.clamp_min(1e-6).unsqueeze(-1)
    pooled = F.normalize(pooled, dim=-1)
    logits = pooled @ text_vocab.t() / temperature
    per_sample = F.cross_entropy(logits, labels, reduction="none")
    return (per_sample * keep).sum() / keep.sum().clamp_min(1.0)


def feature_distill_loss(student: torch.Tensor, teacher: torch.Tensor, reduce: bool = True
                         ) -> torch.Tensor:
    """1 − cosine similarity between current and stage-start DINO tokens (BxNxC): the mean,
    or without ``reduce`` the BxN values."""
    per_token = 1 - F.cosine_similarity(student, teacher.detach(), dim=-1)
    return per_token.mean() if reduce else per_token
