"""The evaluate stage's work: score every stage checkpoint on the val split."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from cdsam import io
from cdsam.checkpoint import load_checkpoint
from cdsam.config import Params
from cdsam.data.dataset import ManifestDataset
from cdsam.overlay import denormalize, grid, sample_panel
from cdsam.train import (
    EvalResult,
    collate,
    configure_determinism,
    evaluate_model,
    resolve_device,
)

log = logging.getLogger("cdsam.evaluate")


def overlay_indices(ds: ManifestDataset, n: int) -> list[int]:
    """A fixed set of val samples: the first images that carry two or more prompts."""
    df = ds.df
    counts = df.groupby("image")["prompt"].transform("count")
    multi = df.index[counts >= 2].tolist()
    rest = [i for i in range(len(df)) if i not in set(multi)]
    return (multi + rest)[:n]


@torch.no_grad()
def stage_overlay(model, ds: ManifestDataset, indices: list[int], device: torch.device,
                  threshold: float) -> Any:
    panels = []
    model.eval()
    for i in indices:
        s = ds[i]
        out = model(s["image"].unsqueeze(0).to(device), [s["prompt"]])
        pred = (torch.sigmoid(out.masks[0, 0].float()) > threshold).cpu().numpy()
        panels.append(sample_panel(denormalize(s["image"]), pred, s["mask"][0].numpy() > 0.5,
                                   s["prompt"]))
    return grid(panels, columns=len(panels) or 1)


def pair_rows(ds: ManifestDataset) -> list[int]:
    """Val images that carry two prompts (e.g. "a red circle" and "a blue square" in one
    scene): the dataset indices of their first two samples, pair by pair."""
    firsts = ds.df.groupby("image", sort=True).head(2)
    counts = firsts.groupby("image")["id"].transform("count")
    return firsts[counts == 2].sort_values("image", kind="stable").index.tolist()


def prompt_pairs(res: EvalResult, rows: list[int]) -> dict[str, float]:
    """Does each prompt find its own object, and do the two masks differ?

    ``res`` holds per-sample IoU and masks in dataset order (``keep_masks=True``).
    ``pairs_miou``: mean IoU of each prompt's mask with its truth; ``pairs_overlap``: mean IoU
    between the two predicted masks (1.0 when both are empty); ``pairs``: how many images.
    """
    if not rows:
        return {"pairs": 0, "pairs_miou": 0.0, "pairs_overlap": 0.0}
    overlap = []
    for a, b in zip(rows[0::2], rows[1::2], strict=True):
        inter = (res.masks[a] & res.masks[b]).sum().item()
        union = (res.masks[a] | res.masks[b]).sum().item()
        overlap.append(inter / union if union else 1.0)
    return {"pairs": len(overlap), "pairs_miou": float(np.mean([res.ious[r] for r in rows])),
            "pairs_overlap": float(np.mean(overlap))}


def evaluate_stages(params: Params, checkpoints: dict[str, Path], data: Path, out: Path,
                    metrics_path: Path) -> dict[str, Any]:
    """Write metrics JSON (per stage), per-stage and per-prompt CSVs and overlays.

    Per-prompt figures go to the CSV only, so `dvc metrics show` stays a readable table.
    """
    ev = params.evaluate
    device = resolve_device(params.device)
    configure_determinism(device)
    ds = ManifestDataset(data, "val", params.data.resize, params.data.crop)
    loader = DataLoader(ds, batch_size=ev.batch_size, shuffle=False, collate_fn=collate)
    indices = overlay_indices(ds, ev.num_overlays)
    pairs = pair_rows(ds)
    metrics: dict[str, Any] = {}
    stage_rows, prompt_rows = [], []
    for name, path in checkpoints.items():
        model, _ = load_checkpoint(path, device)
        res = evaluate_model(model, loader, device, ev.threshold, show_progress=True,
                             keep_masks=True)
        metrics[name] = {"miou": res.miou, "dice": res.dice, "loss": res.loss,
                         **prompt_pairs(res, pairs)}
        stage_rows.append({"stage": name, "miou": res.miou, "dice": res.dice})
        per = pd.DataFrame({"prompt": res.prompts, "iou": res.ious, "dice": res.dices})
        per_prompt = per.groupby("prompt").mean().sort_index()
        for p, r in per_prompt.iterrows():
            prompt_rows.append({"stage": name, "prompt": p, "miou": r.iou, "dice": r.dice})
        if indices:
            img = stage_overlay(model, ds, indices, device, ev.threshold)
            (out / "overlays").mkdir(parents=True, exist_ok=True)
            with io.atomic_path(out / "overlays" / f"{name}.png") as tmp:
                img.save(tmp, format="PNG")
        m = metrics[name]
        log.info("%s: miou=%.4f dice=%.4f (%d val samples); two-prompt images (%d): own-object "
                 "IoU %.3f, IoU between the two masks %.3f", name, res.miou, res.dice, len(ds),
                 m["pairs"], m["pairs_miou"], m["pairs_overlap"])
    io.write_text(out / "stages.csv",
                  pd.DataFrame(stage_rows).to_csv(index=False, lineterminator="\n"))
    io.write_text(out / "per_prompt.csv",
                  pd.DataFrame(prompt_rows).to_csv(index=False, lineterminator="\n"))
    io.write_json(metrics_path, metrics)
    return metrics


__all__ = ["evaluate_stages"]
