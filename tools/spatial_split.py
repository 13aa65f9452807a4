"""What does a click or a box add to the text? Per positive row of a prepared synthetic set.

Scores each checkpoint on the split (test if there is one) three ways, as `cdsam evaluate`
does (text only; text + one seeded positive click inside the target; text + the tight box),
and splits the positives by whether the target has a same-colour object in its scene: the
case where colour alone cannot pick the object. Also how much the click changes the mask
(IoU between the text and text + click masks, area ratio).

    python tools/spatial_split.py models/stage1 models/stage4                  # data/prepared
    python tools/spatial_split.py models/stage4 --data ../bigger/data/prepared
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

# This checkout's cdsam (the code beside the tool), not whichever one is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cdsam.checkout import require_checkout

require_checkout(__file__)

from cdsam.config.parse import load_params
from cdsam.config.schema import LossConfig
from cdsam.data.packed import PackedLoader
from cdsam.data.prepared import PreparedSplit
from cdsam.data.sources.synthetic import attributes
from cdsam.data.spatial import BOX, CLICK
from cdsam.entry import offline_defaults
from cdsam.evaluation.report import scored_split
from cdsam.evaluation.scoring import EvalResult, evaluate_model
from cdsam.models.checkpoint import load_checkpoint
from cdsam.models.objective import Objective
from cdsam.runtime import precision_for, resolve_device

MODES = {"text": None, "click": CLICK, "box": BOX}


def score(checkpoint: Path, prepared: PreparedSplit, device: torch.device, batch: int,
          seed: int, threshold: float) -> dict[str, EvalResult]:
    model, meta = load_checkpoint(checkpoint, device)
    vocab = sorted(set(meta.prompts) | set(prepared.df["prompt"]))
    objective = Objective.for_model(model, LossConfig(**(meta.extra.get("loss") or {})), vocab)
    out = {}
    for mode, policy in MODES.items():
        loader = PackedLoader(prepared, batch, device, spatial=policy, seed=seed)
        out[mode] = evaluate_model(model, loader, objective, precision_for(device), threshold,
                                   keep_masks=True)
    return out


def mask_agreement(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """Per row: IoU between two masks (1 when both are empty) and area of b / area of a."""
    iou, ratio = [], []
    for x, y in zip(a, b, strict=True):
        union = int((x | y).sum())
        iou.append(int((x & y).sum()) / union if union else 1.0)
        ratio.append(int(y.sum()) / max(1, int(x.sum())))
    return np.array(iou), np.array(ratio)


def split_table(df: pd.DataFrame, res: dict[str, EvalResult]) -> pd.DataFrame:
    """Mean IoU per mode over the positives, split by a same-colour object in the scene."""
    rows = df.assign(**{mode: np.array(r.ious) for mode, r in res.items()})
    rows = rows[~rows["negative"].to_numpy()].copy()
    rows["colour"] = [attributes(p)[0] for p in rows["prompt"]]
    shared = rows.groupby(["image", "colour"])["prompt"].transform("count") > 1
    rows["target"] = np.where(shared, "a same-colour object in the scene",
                              "the only object of its colour")
    table = rows.groupby("target")[list(res)].mean()
    table.insert(0, "rows", rows.groupby("target").size())
    table.loc["all positives"] = [len(rows), *rows[list(res)].mean()]
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("--data", type=Path, default=Path("data/prepared"))
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = ap.parse_args()
    offline_defaults()
    p = load_params(args.params)
    device = resolve_device(p.device)
    split = scored_split(args.data)
    prepared = PreparedSplit.open(args.data, split, p.data)
    for ck in args.checkpoints:
        res = score(ck, prepared, device, p.evaluate.batch_size, p.seed, p.evaluate.threshold)
        positive = ~prepared.df["negative"].to_numpy()
        iou, ratio = mask_agreement(res["text"].masks, res["click"].masks)
        print(f"\n{ck} ({split} split): mean IoU per positive row")
        print(split_table(prepared.df.reset_index(drop=True), res).round(3).to_string())
        print(f"text vs text + click masks: IoU {iou[positive].mean():.3f}, click mask area / "
              f"text mask area {ratio[positive].mean():.3f}")


if __name__ == "__main__":
    main()
