"""The evaluate stage's outputs: every stage checkpoint scored on the held-out split
(`cdsam.evaluation.stage_score`), written as ``evaluate.json``, two CSVs and overlay panels.

The test split when the prepared data has one (val chose each stage's epoch, so its score is
optimistic), else val; ``evaluate.json`` and the log say which. Figures are defined in
`cdsam.evaluation.metrics`. Per-prompt figures go to the CSV only, so `dvc metrics show` stays a
readable table.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from cdsam import io
from cdsam.config.schema import Params
from cdsam.data.prepared import PreparedSplit, read_index
from cdsam.evaluation.instance_score import COMPONENTS
from cdsam.evaluation.stage_score import StageScore, open_scored_split, score_checkpoint
from cdsam.runtime import configure_determinism, precision_for, resolve_device

log = logging.getLogger("cdsam.evaluate")


def scored_split(data: Path) -> str:
    """``test`` when the prepared data has a test split, else ``val``."""
    return "test" if "test" in read_index(data)["splits"] else "val"


def stage_row(name: str, score: StageScore) -> dict[str, Any]:
    """The stage's row of ``stages.csv``."""
    res, m = score.result, score.metrics
    row = {"stage": name, "miou": res.miou, "class_iou": score.classes.class_iou,
           "sampled_class_iou": res.sampled_class_iou, "fp_rate": m["fp_rate"],
           **{k: v for k, v in m.items() if k.startswith("miou_")}}
    for key in ("fp_rate_ungated", "presence_auroc", "ap", "ap50", "count_mae", "cgf1"):
        if m.get(key) is not None:
            row[key] = m[key]
    if COMPONENTS in m:
        row.update({f"{COMPONENTS}_{k}": v for k, v in m[COMPONENTS].items()})
    return row


def describe(name: str, split: str, score: StageScore) -> str:
    """The stage's log line: its figures in words."""
    res, m, classes = score.result, score.metrics, score.classes
    split_text = "".join(f", {k[len('pairs_overlap_'):].replace('_', ' ')} {m[k]:.3f}"
                         for k in ("pairs_overlap_same_colour", "pairs_overlap_same_shape")
                         if k in m)
    pairs_text = (f"; prompt pairs in one image ({m['pairs']}): own-object IoU "
                  f"{m['pairs_miou']:.3f}, IoU between the two masks {m['pairs_overlap']:.3f}"
                  f"{split_text}") if m["pairs"] else ""
    spatial_text = "".join(f"; miou with text + {mode.replace('_', ' on the ')} "
                           f"{m[f'miou_{mode}']:.4f}" for mode in score.spatial)
    gate_text = ""
    if "fp_rate_ungated" in m:
        area = m["presence_auroc"]
        gate_text = f", ungated {m['fp_rate_ungated']:.3f}, presence AUROC " + \
            ("n/a (no negatives)" if area is None else f"{area:.3f}")
    inst_text = ""
    if score.instances:
        c = m[COMPONENTS]
        inst_text = (f"; instances: AP {m['ap']:.3f} AP50 {m['ap50']:.3f} AP75 {m['ap75']:.3f} "
                     f"count error {m['count_mae']:.2f} pmF1 {m['pmf1']:.3f} IL_MCC "
                     f"{m['il_mcc']:.3f} cgF1 {m['cgf1']:.3f} (components: AP {c['ap']:.3f} "
                     f"AP50 {c['ap50']:.3f} count error {c['count_mae']:.2f})")
    return (f"{name} on {split}: miou={res.miou:.4f} ({res.positives} positives) "
            f"class_iou={classes.class_iou:.4f} ({len(classes.vocab)} classes x "
            f"{classes.images} images; over the sampled rows {res.sampled_class_iou:.4f}) "
            f"fp_rate={m['fp_rate']:.3f}{gate_text} ({res.negatives} negatives){pairs_text}"
            f"{spatial_text}{inst_text}")


def evaluate_stages(params: Params, checkpoints: dict[str, Path], data: Path, out: Path,
                    metrics_path: Path) -> dict[str, Any]:
    """Score every checkpoint; write ``metrics_path`` (per stage), ``out``/stages.csv,
    ``out``/per_prompt.csv and ``out``/overlays/<stage>.png."""
    ev = params.evaluate
    device = resolve_device(params.device)
    configure_determinism(device)
    precision = precision_for(device)
    name = scored_split(data)
    split = open_scored_split(PreparedSplit.open(data, name, params.data), name, ev,
                              params.seed, device, by_image=params.data.batch_by == "image")
    metrics: dict[str, Any] = {"split": name}
    stage_rows, prompt_rows = [], []
    log.info("scoring %d %s samples (%d negatives)%s", len(split.rows), name,
             int(split.samples["negative"].sum()),
             "" if name == "test" else "; no test split (prepare.test_fraction: 0), so this is "
             "the split that also chose each stage's epoch")
    for stage, path in checkpoints.items():
        score = score_checkpoint(path, split, params, precision)
        metrics[stage] = score.metrics
        stage_rows.append(stage_row(stage, score))
        prompt_rows += [{"stage": stage, **row} for row in score.per_prompt.to_dict("records")]
        if score.overlay is not None:
            (out / "overlays").mkdir(parents=True, exist_ok=True)
            with io.atomic_path(out / "overlays" / f"{stage}.png") as tmp:
                score.overlay.save(tmp, format="PNG")
        log.info("%s", describe(stage, name, score))
    io.write_text(out / "stages.csv",
                  pd.DataFrame(stage_rows).to_csv(index=False, lineterminator="\n"))
    io.write_text(out / "per_prompt.csv",
                  pd.DataFrame(prompt_rows).to_csv(index=False, lineterminator="\n"))
    io.write_json(metrics_path, metrics)
    return metrics


__all__ = ["evaluate_stages"]
