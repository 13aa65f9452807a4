"""The evaluate stage's work: score every stage checkpoint on the held-out split.

The test split when the prepared data has one (val chose each stage's epoch, so its score is
optimistic), else val; ``evaluate.json`` and the log say which. Figures are defined in
`cdsam.evaluation.metrics`.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cdsam import io
from cdsam.config.schema import LossConfig, Params
from cdsam.data.dataset import ManifestDataset
from cdsam.data.packed import PackedLoader, normalize_batch
from cdsam.data.prepared import PreparedSplit, read_index
from cdsam.data.spatial import BOX, CLICK
from cdsam.data.synthetic import attributes
from cdsam.evaluation.class_grid import ClassGrid, score_class_grid
from cdsam.evaluation.metrics import per_prompt
from cdsam.evaluation.scoring import EvalResult, evaluate_model
from cdsam.inference.overlay import denormalize, grid, sample_panel
from cdsam.inference.predictor import Predictor
from cdsam.models.checkpoint import load_checkpoint
from cdsam.models.objective import Objective
from cdsam.runtime import configure_determinism, resolve_device

log = logging.getLogger("cdsam.evaluation.report")


def scored_split(data: Path) -> str:
    """``test`` when the prepared data has a test split, else ``val``."""
    return "test" if "test" in read_index(data)["splits"] else "val"


def overlay_indices(ds: ManifestDataset, n: int) -> list[int]:
    """A fixed set of samples: positives of images that carry two or more prompts first, then
    one negative (an absent-object prompt) when there is one, then the rest."""
    df = ds.df
    pos = df[~df["negative"]]
    counts = pos.groupby("image")["prompt"].transform("count")
    multi = pos.index[counts >= 2].tolist()
    negs = df.index[df["negative"]].tolist()[:1]
    first = multi[:max(n - len(negs), 0)] + negs
    rest = [i for i in range(len(df)) if i not in set(first)]
    return (first + rest)[:n]
@torch.no_grad()
def stage_overlay(model, ds: ManifestDataset, indices: list[int], device: torch.device,
                  threshold: float) -> Any:
    panels = []
    model.eval()
    for i in indices:
        s = ds[i]
        out = model(s["image"].unsqueeze(0).to(device), [s["prompt"]])
        pred = (torch.sigmoid(out.masks[0, 0].float()) > threshold).cpu().numpy()
        caption = s["prompt"] + (" (absent)" if ds.df["negative"].iloc[i] else "")
        panels.append(sample_panel(denormalize(s["image"]), pred, s["mask"][0].numpy() > 0.5,
                                   caption))
    return grid(panels, columns=len(panels) or 1)


def pair_rows(ds: ManifestDataset) -> list[tuple[int, int]]:
    """Every two positive samples of one image (e.g. "a red circle" and "a red square" in one
    scene) as dataset-index pairs, image by image."""
    pos = ds.df[~ds.df["negative"]]
    return [pair for _, rows in pos.groupby("image", sort=True)
            for pair in itertools.combinations(rows.index.tolist(), 2)]


def pair_relation(a: str, b: str) -> str | None:
    """``same_colour`` / ``same_shape`` for two synthetic prompts that share exactly one of the
    two words, ``None`` otherwise (other data sources have no such vocabulary)."""
    pa, pb = attributes(a), attributes(b)
    if pa is None or pb is None:
        return None
    if pa[0] == pb[0] and pa[1] != pb[1]:
        return "same_colour"
    if pa[1] == pb[1] and pa[0] != pb[0]:
        return "same_shape"
    return None


def prompt_pairs(res: EvalResult, pairs: list[tuple[int, int]], prompts: list[str],
                 ) -> dict[str, float]:
    """Does each prompt find its own object, and do the two masks of one image differ?

    ``res`` holds per-sample IoU and masks in dataset order (``keep_masks=True``), ``prompts``
    each sample's prompt. ``pairs_miou``: mean IoU of each paired prompt's mask with its truth;
    ``pairs_overlap``: mean IoU between the two predicted masks (1.0 when both are empty);
    ``pairs``: how many pairs. On the synthetic scenes also the overlap of pairs that share a
    colour (other shape) and of pairs that share a shape (other colour): the text must decide.
    """
    if not pairs:
        return {"pairs": 0, "pairs_miou": 0.0, "pairs_overlap": 0.0}
    overlaps: dict[str, list[float]] = {"all": []}
    for a, b in pairs:
        inter = (res.masks[a] & res.masks[b]).sum().item()
        union = (res.masks[a] | res.masks[b]).sum().item()
        overlap = inter / union if union else 1.0
        overlaps["all"].append(overlap)
        relation = pair_relation(prompts[a], prompts[b])
        if relation:
            overlaps.setdefault(relation, []).append(overlap)
    rows = sorted({r for pair in pairs for r in pair})
    out = {"pairs": len(pairs), "pairs_miou": float(np.mean([res.ious[r] for r in rows])),
           "pairs_overlap": float(np.mean(overlaps["all"]))}
    for relation in ("same_colour", "same_shape"):
        if relation in overlaps:
            out[f"pairs_overlap_{relation}"] = float(np.mean(overlaps[relation]))
    return out


def class_grid(model, params: Params, prepared: PreparedSplit, device: torch.device
               ) -> ClassGrid:
    """VOC/COCO class IoU: every class of the split on every image (`cdsam.evaluation.class_grid`)."""
    ev, data = params.evaluate, params.data
    vocab = sorted(set(prepared.prompts))
    predictor = Predictor(model, data.resize, data.crop, vocab, device, data.fit)

    def logits(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        x = normalize_batch(images.to(device))
        return predictor.frame_logits(list(x), prompts, batch_size=ev.batch_size)

    return score_class_grid(prepared, vocab, logits, pairs_per_call=ev.batch_size * 16,
                            threshold=ev.threshold, show_progress=True)


def evaluate_stages(params: Params, checkpoints: dict[str, Path], data: Path, out: Path,
                    metrics_path: Path) -> dict[str, Any]:
    """Write metrics JSON (per stage), per-stage and per-prompt CSVs and overlays.

    Per-prompt figures go to the CSV only, so `dvc metrics show` stays a readable table.
    """
    ev = params.evaluate
    device = resolve_device(params.device)
    configure_determinism(device)
    split = scored_split(data)
    prepared = PreparedSplit.open(data, split, params.data)
    ds = ManifestDataset(data, split, params.data, prepared=prepared)
    loader = PackedLoader(prepared, ev.batch_size, device)
    # The same split with one positive click / the tight box next to each positive's text
    # (seeded, the same for every checkpoint).
    spatial = {mode: PackedLoader(prepared, ev.batch_size, device, spatial=policy,
                                  seed=params.seed)
               for mode, policy in (("click", CLICK), ("box", BOX))} if ev.spatial_prompts else {}
    indices = overlay_indices(ds, ev.num_overlays)
    pairs = pair_rows(ds)
    metrics: dict[str, Any] = {"split": split}
    stage_rows, prompt_rows = [], []
    log.info("scoring %d %s samples (%d negatives)%s", len(ds), split, int(ds.df["negative"].sum()),
             "" if split == "test" else "; no test split (prepare.test_fraction: 0), so this is "
             "the split that also chose each stage's epoch")
    for name, path in checkpoints.items():
        model, meta = load_checkpoint(path, device)
        # The loss the checkpoint trained with (its SSL term needs the stage-start backbone,
        # which only the training run has).
        loss_cfg = LossConfig(**(meta.extra.get("loss") or {}))
        vocab = sorted(set(meta.prompts) | set(ds.prompts))
        objective = Objective.for_model(model, loss_cfg, vocab)
        res = evaluate_model(model, loader, device, objective, ev.threshold, show_progress=True,
                             keep_masks=True)
        classes = class_grid(model, params, prepared, device)
        metrics[name] = {**res.figures, "class_iou": classes.class_iou,
                         **prompt_pairs(res, pairs, ds.df["prompt"].tolist())}
        for mode, mode_loader in spatial.items():
            metrics[name][f"miou_{mode}"] = evaluate_model(
                model, mode_loader, device, objective, ev.threshold).miou
        stage_rows.append({"stage": name, "miou": res.miou, "class_iou": classes.class_iou,
                           "sampled_class_iou": res.sampled_class_iou, "fp_rate": res.fp_rate,
                           **{k: v for k, v in metrics[name].items() if k.startswith("miou_")}})
        by_prompt = per_prompt(res.scores).merge(classes.per_class(), on="prompt", how="left")
        for row in by_prompt.to_dict("records"):
            prompt_rows.append({"stage": name, **row})
        if indices:
            img = stage_overlay(model, ds, indices, device, ev.threshold)
            (out / "overlays").mkdir(parents=True, exist_ok=True)
            with io.atomic_path(out / "overlays" / f"{name}.png") as tmp:
                img.save(tmp, format="PNG")
        m = metrics[name]
        split_text = "".join(f", {k[len('pairs_overlap_'):].replace('_', ' ')} {m[k]:.3f}"
                             for k in ("pairs_overlap_same_colour", "pairs_overlap_same_shape")
                             if k in m)
        pairs_text = (f"; prompt pairs in one image ({m['pairs']}): own-object IoU "
                      f"{m['pairs_miou']:.3f}, IoU between the two masks {m['pairs_overlap']:.3f}"
                      f"{split_text}") if m["pairs"] else ""
        spatial_text = "".join(f"; miou with text + {mode} {m[f'miou_{mode}']:.4f}"
                               for mode in spatial)
        log.info("%s on %s: miou=%.4f (%d positives) class_iou=%.4f (%d classes x %d images; "
                 "over the sampled rows %.4f) fp_rate=%.3f (%d negatives)%s%s", name, split,
                 res.miou, res.positives, classes.class_iou, len(classes.vocab), classes.images,
                 res.sampled_class_iou, res.fp_rate, res.negatives, pairs_text, spatial_text)
    io.write_text(out / "stages.csv",
                  pd.DataFrame(stage_rows).to_csv(index=False, lineterminator="\n"))
    io.write_text(out / "per_prompt.csv",
                  pd.DataFrame(prompt_rows).to_csv(index=False, lineterminator="\n"))
    io.write_json(metrics_path, metrics)
    return metrics


__all__ = ["evaluate_stages"]
