"""Segmentation scores over a split, with ignore pixels (``valid == 0``) skipped.

- ``miou`` / ``dice``: the mean of per-sample IoU / Dice over **positive** samples (those whose
  target has foreground): "when the object is there, how well is it outlined".
- ``sampled_class_iou``: per prompt, intersection and union summed over the split's *rows*
  (its positives and the negatives prepare drew), then the mean over prompts. Cheap enough for
  every epoch, but not VOC/COCO's class IoU: with ``negatives_per_image: 1`` a class's false
  positives count only on the images where it was drawn as the negative, so an over-firing model
  scores high. The evaluate stage reports the real one, ``class_iou`` (`cdsam.evaluation.class_grid`).
- ``fp_rate`` / ``neg_area``: on **negative** samples (the prompt names something absent), the
  share whose predicted mask is non-empty, and the mean predicted share of the valid pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch


def pixel_counts(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
                 threshold: float = 0.5) -> torch.Tensor:
    """Bx4 per-sample (intersection, predicted, true, valid) pixel counts."""
    pred = (torch.sigmoid(logits.float()) > threshold).float() * valid
    truth = target * valid
    return torch.stack([(pred * truth).flatten(1).sum(1), pred.flatten(1).sum(1),
                        truth.flatten(1).sum(1), valid.flatten(1).sum(1)], dim=1)


@dataclass
class SplitScores:
    """Per-sample counts over a split; :func:`summarize` of :meth:`sums` gives its figures."""

    prompts: list[str] = field(default_factory=list)
    counts: list[np.ndarray] = field(default_factory=list)  # Bx4 blocks (see pixel_counts)

    def add(self, prompts: list[str], counts: torch.Tensor) -> None:
        self.prompts += list(prompts)
        self.counts.append(counts.double().cpu().numpy())

    def frame(self) -> pd.DataFrame:
        c = np.concatenate(self.counts) if self.counts else np.zeros((0, 4))
        df = pd.DataFrame(c, columns=["inter", "pred", "truth", "valid"])
        df["prompt"] = self.prompts
        df["union"] = df["pred"] + df["truth"] - df["inter"]
        df["positive"] = df["truth"] > 0
        df["iou"] = np.where(df["union"] > 0, df["inter"] / df["union"].clip(lower=1), 1.0)
        denom = df["pred"] + df["truth"]
        df["dice"] = np.where(denom > 0, 2 * df["inter"] / denom.clip(lower=1), 1.0)
        return df

    def sums(self, vocab: list[str]) -> list[float]:
        """Additive totals (for an all-reduce over ranks): 7 scalars, then per-prompt
        intersection and union in ``vocab`` order."""
        df = self.frame()
        pos, neg = df[df["positive"]], df[~df["positive"]]
        head = [len(pos), pos["iou"].sum(), pos["dice"].sum(), len(neg),
                float((neg["pred"] > 0).sum()),
                (neg["pred"] / neg["valid"].clip(lower=1)).sum(), len(df)]
        by = df.groupby("prompt")[["inter", "union"]].sum().reindex(vocab, fill_value=0.0)
        return [float(x) for x in head] + by["inter"].tolist() + by["union"].tolist()


def summarize(sums: list[float], vocab: list[str]) -> dict[str, float]:
    """The split's figures from :meth:`SplitScores.sums` (possibly summed over ranks)."""
    n_pos, iou, dice, n_neg, fp, area, n = sums[:7]
    v = len(vocab)
    inter, union = np.asarray(sums[7:7 + v]), np.asarray(sums[7 + v:7 + 2 * v])
    seen = union > 0
    return {
        "miou": iou / n_pos if n_pos else 0.0,
        "dice": dice / n_pos if n_pos else 0.0,
        "sampled_class_iou": float((inter[seen] / union[seen]).mean()) if seen.any()
        else 0.0,
        "fp_rate": fp / n_neg if n_neg else 0.0,
        "neg_area": area / n_neg if n_neg else 0.0,
        "positives": int(n_pos),
        "negatives": int(n_neg),
        "samples": int(n),
    }


def per_prompt(scores: SplitScores) -> pd.DataFrame:
    """One row per prompt: positive-sample mIoU, sampled class IoU, negatives' false-positive
    rate."""
    df = scores.frame()
    rows = []
    for prompt, g in df.groupby("prompt", sort=True):
        pos, neg = g[g["positive"]], g[~g["positive"]]
        union = g["union"].sum()
        rows.append({
            "prompt": prompt,
            "miou": pos["iou"].mean() if len(pos) else np.nan,
            "dice": pos["dice"].mean() if len(pos) else np.nan,
            "sampled_class_iou": g["inter"].sum() / union if union > 0 else np.nan,
            "positives": len(pos), "negatives": len(neg),
            "fp_rate": (neg["pred"] > 0).mean() if len(neg) else np.nan,
        })
    return pd.DataFrame(rows)
