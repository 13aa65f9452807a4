"""Score a model over a loader: the objective's loss and the split's figures.

Used by training (val, every epoch) and by the evaluate stage; see `cdsam.evaluation.metrics` for what
each figure means.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from cdsam.evaluation.metrics import SplitScores, pixel_counts, summarize
from cdsam.evaluation.presence import auroc, best_threshold
from cdsam.models.forward import PrefixCache, forward_batch
from cdsam.models.model import CDSAM
from cdsam.models.objective import Objective
from cdsam.runtime import Precision


@dataclass
class EvalResult:
    loss: float
    miou: float  # mean per-sample IoU over positive samples
    dice: float
    sampled_class_iou: float = 0.0  # per prompt over the sampled rows (see cdsam.evaluation.metrics)
    fp_rate: float = 0.0  # negatives with a non-empty predicted mask
    neg_area: float = 0.0  # negatives' mean predicted share of the image
    positives: int = 0
    negatives: int = 0
    scores: SplitScores = field(default_factory=SplitScores)  # per-sample counts (local rank)
    ids: list[str] = field(default_factory=list)
    ious: list[float] = field(default_factory=list)  # per sample, in loader order
    # With the instance heads: per sample the presence probability (loader order), and the
    # figures of cdsam.evaluation.presence at the best-MCC threshold (no AUROC without
    # negatives).
    presence: list[float] = field(default_factory=list)
    presence_figures: dict[str, float] = field(default_factory=dict)

    @property
    def figures(self) -> dict[str, float]:
        return {**{k: getattr(self, k) for k in ("loss", "miou", "dice", "sampled_class_iou",
                                                 "fp_rate", "neg_area", "positives",
                                                 "negatives")}, **self.presence_figures}


@torch.no_grad()
def evaluate_model(model: CDSAM, loader: Iterable[dict[str, Any]], objective: Objective,
                   precision: Precision, threshold: float = 0.5, *, show_progress: bool = False,
                   cache: PrefixCache | None = None, reduce: bool = False,
                   on_mask: Callable[[int, torch.Tensor], None] | None = None) -> EvalResult:
    """The objective's loss and the split's scores (`cdsam.evaluation.metrics`) over a loader.

    ``precision``: the run's (training hands its own, so validation computes as the step does).
    ``cache``: DINO prefix features to reuse (`cdsam.training.feature_cache`). ``reduce``: the
    loader holds this rank's shard; the figures are summed over ranks (the per-sample lists
    stay local). ``on_mask(row, mask)``: handed each sample's thresholded HxW mask (on the CPU)
    with its row in loader order, as it is computed (nothing keeps them all).
    """
    model.eval()
    device = precision.device
    res = EvalResult(0.0, 0.0, 0.0)
    total_loss = 0.0
    for batch in tqdm(loader, desc="evaluate", leave=False, disable=not show_progress):
        step = forward_batch(model, model, batch, objective, precision, cache)
        logits = step.out.masks.float()
        total_loss += step.loss.item() * logits.shape[0]
        res.scores.add(batch["prompt"], pixel_counts(logits, step.target, step.valid, threshold))
        if on_mask is not None:
            for row, mask in enumerate((torch.sigmoid(logits[:, 0]) > threshold).cpu(),
                                       start=len(res.ids)):
                on_mask(row, mask)
        res.ids += batch["id"]
        if step.out.presence is not None:
            res.presence += torch.sigmoid(step.out.presence.float()).cpu().tolist()
    sums = [total_loss] + res.scores.sums(objective.vocab)
    if reduce:
        from cdsam import distributed  # only under torchrun; the evaluate stage never is

        sums = distributed.all_reduce_sum(sums, device)
    figures = summarize(sums[1:], objective.vocab)
    for key in res.figures:
        if key != "loss":
            setattr(res, key, figures[key])
    res.loss = sums[0] / max(figures["samples"], 1)
    frame = res.scores.frame()
    res.ious = frame["iou"].tolist()
    if res.presence:
        # Under DDP with a sharded val split this rank's rows only (the threshold is chosen
        # from them).
        present = frame["positive"].to_numpy()
        threshold, best = best_threshold(np.asarray(res.presence), present)
        res.presence_figures = {"presence_threshold": threshold, "il_mcc": best}
        area = auroc(np.asarray(res.presence), present)
        if not np.isnan(area):  # both kinds of rows present
            res.presence_figures["presence_auroc"] = area
    return res
