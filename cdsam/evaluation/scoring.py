"""Score a model over a loader: the objective's loss and the split's figures.

Used by training (val, every epoch) and by the evaluate stage; see `cdsam.evaluation.metrics` for what
each figure means.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from cdsam.data.spatial import batch_prompts
from cdsam.evaluation.metrics import SplitScores, pixel_counts, summarize
from cdsam.models.model import CDSAM
from cdsam.models.objective import Objective
from cdsam.runtime import amp_settings

if TYPE_CHECKING:
    from cdsam.training.feature_cache import FeatureCache


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
    masks: list[torch.Tensor] = field(default_factory=list)  # HxW bool, with keep_masks

    @property
    def figures(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in ("loss", "miou", "dice", "sampled_class_iou",
                                              "fp_rate", "neg_area", "positives", "negatives")}


@torch.no_grad()
def evaluate_model(model: CDSAM, loader: DataLoader, device: torch.device,
                   objective: Objective, threshold: float = 0.5, show_progress: bool = False,
                   cache: FeatureCache | None = None, start_block: int = 0,
                   reduce: bool = False, keep_masks: bool = False) -> EvalResult:
    """The objective's loss and the split's scores (`cdsam.evaluation.metrics`) over a loader.

    ``cache``: DINO prefix features to reuse (see `cdsam.training.feature_cache`). ``reduce``: the loader
    holds this rank's shard; the figures are summed over ranks (the per-sample lists stay
    local). ``keep_masks``: also keep each sample's thresholded mask (on the CPU).
    """
    model.eval()
    use_amp, amp_dtype, _ = amp_settings(device)
    res = EvalResult(0.0, 0.0, 0.0)
    total_loss = 0.0
    for batch in tqdm(loader, desc="evaluate", leave=False, disable=not show_progress):
        images = batch["image"].to(device, non_blocking=True)
        target = batch["mask"].to(device, non_blocking=True)
        valid = batch["valid"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
            prefix = None
            if cache is not None:
                prefix = cache.lookup(batch["image_key"], images,
                                      lambda x: model.dino_prefix(x, start_block))
            out = model(images, batch["prompt"], prefix=prefix, start_block=start_block,
                        **batch_prompts(batch, device))
            loss, _ = objective(out, images, target, valid, batch["prompt"])
        logits = out.masks.float()
        total_loss += loss.item() * images.shape[0]
        res.scores.add(batch["prompt"], pixel_counts(logits, target, valid, threshold))
        res.ids += batch["id"]
        if keep_masks:
            res.masks += list((torch.sigmoid(logits[:, 0]) > threshold).cpu())
    sums = [total_loss] + res.scores.sums(objective.vocab)
    if reduce:
        from cdsam import distributed  # only under torchrun; the evaluate stage never is

        sums = distributed.all_reduce_sum(sums, device)
    figures = summarize(sums[1:], objective.vocab)
    for key in res.figures:
        if key != "loss":
            setattr(res, key, figures[key])
    res.loss = sums[0] / max(figures["samples"], 1)
    res.ious = res.scores.frame()["iou"].tolist()
    return res
