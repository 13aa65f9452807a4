"""Score one stage checkpoint on the held-out split: its row of the evaluate stage's report.

Every figure reads the same rows of the split, from its packed shards: the scores and prompt
pairs (`cdsam.evaluation.scoring`, `cdsam.evaluation.pairs`), text + click / box, the class grid
(`cdsam.evaluation.class_grid`) and the overlay panel.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from cdsam.config.schema import EvaluateConfig, LossConfig, Params
from cdsam.data.packed import PackedLoader, normalize_batch
from cdsam.data.prepared import PreparedSplit
from cdsam.data.spatial import BOX, CLICK
from cdsam.data.templates import PromptEnsembles
from cdsam.evaluation.class_grid import ClassGrid, score_class_grid
from cdsam.evaluation.instance_score import (
    instance_panel,
    score_instances,
)
from cdsam.evaluation.metrics import per_prompt
from cdsam.evaluation.pairs import PairOverlaps, pair_rows, prompt_pairs
from cdsam.evaluation.presence import auroc
from cdsam.evaluation.scoring import EvalResult, evaluate_model
from cdsam.evaluation.text_drift import (
    KINDS,
    TextDrift,
    general_prompts,
    rebuild_base_tower,
    tower_is_base,
)
from cdsam.inference.instances import stored_min_quality
from cdsam.inference.overlay import denormalize, grid, sample_panel
from cdsam.inference.predictor import Predictor, ensembles_of
from cdsam.models.checkpoint import CheckpointMeta, load_checkpoint
from cdsam.models.model import CDSAM
from cdsam.models.objective import Objective
from cdsam.runtime import Precision

log = logging.getLogger("cdsam.evaluate")


@dataclass
class ScoredSplit:
    """The split every checkpoint is scored on, with what is the same for all of them."""

    name: str  # test | val
    rows: PreparedSplit
    loader: PackedLoader  # text prompts only
    spatial: dict[str, PackedLoader]  # click / box next to each positive's text (seeded)
    overlay_rows: list[int]  # sample rows drawn in the overlay panel
    pairs: list[tuple[int, int]]  # two positives of one image

    @property
    def samples(self) -> pd.DataFrame:
        return self.rows.df

    @property
    def prompts(self) -> list[str]:
        return sorted(self.samples["prompt"].unique())


def overlay_rows(samples: pd.DataFrame, n: int) -> list[int]:
    """A fixed set of samples: positives of images that carry two or more prompts first, then
    one negative (an absent-object prompt) when there is one, then the rest."""
    pos = samples[~samples["negative"]]
    counts = pos.groupby("image")["prompt"].transform("count")
    multi = pos.index[counts >= 2].tolist()
    negs = samples.index[samples["negative"]].tolist()[:1]
    first = multi[:max(n - len(negs), 0)] + negs
    rest = [i for i in range(len(samples)) if i not in set(first)]
    return (first + rest)[:n]


def open_scored_split(rows: PreparedSplit, name: str, ev: EvaluateConfig, seed: int,
                      device: torch.device, by_image: bool = False) -> ScoredSplit:
    """``by_image`` (``data.batch_by: image``): batches of whole images, at most
    ``evaluate.batch_size`` samples each, every prompt of an image decoded from one encoding
    (the samples come in the same order: prepare writes them image by image)."""
    kw = {"by_image": True, "sample_budget": ev.batch_size} if by_image else {}
    # miou_click keeps the class mask as the click's target (as before objects were trained);
    # miou_click_object, where the split has objects, scores the object under the click.
    modes = [("click", CLICK, False), ("box", BOX, False)]
    if rows.objects is not None:
        modes.append(("click_object", CLICK, True))
    spatial = {mode: PackedLoader(rows, ev.batch_size, device, spatial=policy, seed=seed,
                                  object_clicks=objects, **kw)
               for mode, policy, objects in modes} if ev.spatial_prompts else {}
    return ScoredSplit(name, rows, PackedLoader(rows, ev.batch_size, device, **kw), spatial,
                       overlay_rows(rows.df, ev.num_overlays), pair_rows(rows.df))


@dataclass
class StageScore:
    metrics: dict[str, Any]  # evaluate.json's entry for the stage
    result: EvalResult  # text-prompt scores, per sample
    classes: ClassGrid
    per_prompt: pd.DataFrame  # per-prompt figures with the class grid's per-class IoU
    overlay: Image.Image | None = None
    spatial: list[str] = field(default_factory=list)  # the click / box modes scored
    instances: bool = False  # the instance figures are in ``metrics``


@torch.no_grad()
def overlay_panel(model: CDSAM, split: ScoredSplit, precision: Precision, threshold: float,
                  objective: Objective) -> Image.Image:
    """The overlay rows, one model call each, predicted mask beside the truth."""
    panels = []
    model.eval()
    rows = PackedLoader(split.rows, 1, precision.device, indices=split.overlay_rows)
    for i, batch in zip(split.overlay_rows, rows, strict=True):
        with precision.autocast():  # the precision the figures beside it were computed in
            text, _ = objective.step_text(model, batch["prompt"], None)  # ensembles, if any
            out = model(batch["image"], batch["prompt"], text=text)
        pred = (torch.sigmoid(out.masks[0, 0].float()) > threshold).cpu().numpy()
        caption = batch["prompt"][0] + (" (absent)" if split.samples["negative"].iloc[i] else "")
        panels.append(sample_panel(denormalize(batch["image"][0].cpu()), pred,
                                   batch["mask"][0, 0].cpu().numpy() > 0.5, caption))
    return grid(panels, columns=len(panels) or 1)


def class_grid(model: CDSAM, params: Params, rows: PreparedSplit, precision: Precision,
               ensembles: PromptEnsembles | None = None) -> ClassGrid:
    """VOC/COCO class IoU: every class of the split on every image, in the precision the
    other figures are computed in, at most ``evaluate.batch_size`` images per DINO call; each
    class's text the mean over ``ensembles``' templates when given."""
    ev, data = params.evaluate, params.data
    vocab = sorted(set(rows.prompts))
    device = precision.device
    predictor = Predictor(model, data.resize, data.crop, vocab, device, data.fit, ensembles)

    def logits(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        x = normalize_batch(images.to(device))
        with precision.autocast():
            return predictor.frame_logits(list(x), prompts, batch_size=ev.batch_size)

    return score_class_grid(rows, vocab, logits, pairs_per_call=ev.batch_size * 16,
                            threshold=ev.threshold, show_progress=True,
                            images_per_call=ev.batch_size)


def checkpoint_drift(model: CDSAM, meta: CheckpointMeta, general: list[str]
                     ) -> dict[str, float | None]:
    """The checkpoint's text drift from its base tower over its training prompts and
    ``general``: 0 where the tower is the base's; None where the base is unknown (a checkpoint
    saved in full, such as a merged export)."""
    if tower_is_base(model.clip_text, meta.base_state):
        return dict.fromkeys(KINDS, 0.0)
    if meta.base is None:
        return dict.fromkeys(KINDS, None)
    base = rebuild_base_tower(meta.model, meta.base.get("seed"))
    return TextDrift.against(base, meta.prompts, general).measure(model.clip_text)


def score_checkpoint(path: Path, split: ScoredSplit, params: Params, precision: Precision
                     ) -> StageScore:
    """Every figure of one checkpoint on ``split``."""
    ev = params.evaluate
    model, meta = load_checkpoint(path, precision.device)
    # The loss the checkpoint trained with (its SSL term needs the stage-start backbone,
    # which only the training run has).
    loss_cfg = LossConfig(**(meta.extra.get("loss") or {}))
    vocab = sorted(set(meta.prompts) | set(split.prompts))
    ensembles = ensembles_of(meta, path)
    objective = Objective.for_model(model, loss_cfg, vocab, ensembles=ensembles)
    overlaps = PairOverlaps(split.pairs)
    res = evaluate_model(model, split.loader, objective, precision, ev.threshold,
                         show_progress=True, on_mask=overlaps.add)
    classes = class_grid(model, params, split.rows, precision, ensembles)
    # The val-optimal threshold and MCC of this split are not figures to report: the
    # checkpoint's own threshold is (presence_figures).
    semantic = {k: v for k, v in res.figures.items()
                if k not in ("presence_threshold", "il_mcc", "presence_auroc")}
    metrics = {**semantic, "class_iou": classes.class_iou,
               **prompt_pairs(overlaps, res.ious, split.samples["prompt"].tolist()),
               **checkpoint_drift(model, meta, ev.drift_prompts or general_prompts())}
    if ensembles is not None:
        # The same grid with each class's first template alone: what the ensemble adds.
        metrics["class_iou_one_template"] = class_grid(model, params, split.rows,
                                                       precision).class_iou
        metrics["prompt_templates"] = len(ensembles.templates)
    for mode, loader in split.spatial.items():
        metrics[f"miou_{mode}"] = evaluate_model(model, loader, objective, precision,
                                                 ev.threshold).miou
    by_prompt = per_prompt(res.scores).merge(classes.per_class(), on="prompt", how="left")
    overlay = overlay_panel(model, split, precision, ev.threshold, objective) \
        if split.overlay_rows else None
    scored = False
    if not model.has_instance_heads:
        log.info("%s: no instance heads (a checkpoint from before them): no presence or "
                 "instance figures, fp_rate ungated", path)
    else:
        threshold = float(meta.extra.get("presence_threshold", 0.5))
        quality = ev.instances.min_quality
        if quality is None:
            quality = stored_min_quality(meta.extra, ev.instances.decode)
        metrics.update(presence_figures(res, threshold))
        if split.rows.objects is None:
            log.info("%s: the split has no objects (instances.csv): presence figures only", path)
        else:
            metrics["instance_min_quality"] = quality
            inst = score_instances(model, split.loader, split.rows, objective, precision, ev,
                                   threshold, quality, show=split.overlay_rows)
            metrics.update(inst.figures)
            metrics["decoder_rows_per_pair"] = inst.decoder_rows / max(inst.pairs, 1)
            scored = True
            if overlay is not None:
                panels = [instance_panel(*inst.shown[i], threshold, quality,
                                         split.samples["prompt"].iloc[i])
                          for i in split.overlay_rows if i in inst.shown]
                overlay = stack(overlay, grid(panels, columns=len(panels) or 1))
    return StageScore(metrics, res, classes, by_prompt, overlay, list(split.spatial), scored)


def presence_figures(res: EvalResult, threshold: float) -> dict[str, float]:
    """What gating by the presence head does on the split: ``fp_rate`` as a user gets it (a
    negative counts when its mask is non-empty *and* its presence passes ``threshold``), the
    ungated rate beside it, the AUROC, and the threshold used."""
    frame = res.scores.frame()
    presence = np.asarray(res.presence)
    neg = ~frame["positive"].to_numpy()
    fired = frame["pred"].to_numpy() > 0
    gated = fired & (presence >= threshold)
    area = auroc(presence, ~neg)
    return {"fp_rate": float(gated[neg].mean()) if neg.any() else 0.0,
            "fp_rate_ungated": res.fp_rate,
            # null without negatives (one class, no absent-object prompts): nothing to rank
            "presence_auroc": None if np.isnan(area) else area,
            "presence_threshold": threshold}


def stack(top: Image.Image, bottom: Image.Image) -> Image.Image:
    """Two pictures, one above the other."""
    out = Image.new("RGB", (max(top.width, bottom.width), top.height + bottom.height),
                    (255, 255, 255))
    out.paste(top, (0, 0))
    out.paste(bottom, (0, top.height))
    return out
