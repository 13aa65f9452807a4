"""Per-sample IoU and Dice of thresholded masks, ignoring ``valid == 0`` pixels."""

from __future__ import annotations

import torch


def iou_dice(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
             threshold: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Bx1xHxW logits/target/valid → (B IoU, B Dice). Empty prediction on empty truth → 1."""
    pred = (torch.sigmoid(logits.float()) > threshold).float() * valid
    truth = target * valid
    inter = (pred * truth).flatten(1).sum(1)
    p = pred.flatten(1).sum(1)
    t = truth.flatten(1).sum(1)
    union = p + t - inter
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
    dice = torch.where(p + t > 0, 2 * inter / (p + t).clamp_min(1), torch.ones_like(union))
    return iou, dice
