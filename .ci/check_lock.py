"""Did `dvc repro` reproduce what git HEAD's dvc.lock and metrics say?

- ``data/`` outputs: the same md5, always (prepare is integer work, exact everywhere).
- ``models/`` outputs: the same md5 on the machine that wrote the lock (same CPU, same library
  builds). Float kernels differ between CPU models, so elsewhere the weights differ in the last
  bits; then the stage's quality figures must match HEAD's committed metrics within
  ``TOLERANCE`` (absolute), and the check says which way it passed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

TOLERANCE = 0.02  # absolute, on IoU/Dice-like figures in [0, 1] and on the loss
QUALITY = ("miou", "dice", "class_iou", "fp_rate", "loss")


def outs(lock: dict) -> dict[str, str]:
    found = {}
    for stage in lock.get("stages", {}).values():
        for out in stage.get("outs", []):
            if out["path"].startswith(("data/", "models/")):
                found[out["path"]] = out["md5"]
    return found


def quality(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Flattened quality figures (``val.miou``, ``stage4.class_iou``, ...) of a metrics JSON."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(quality(value, f"{prefix}{key}."))
        elif key in QUALITY and isinstance(value, (int, float)):
            flat[f"{prefix}{key}"] = float(value)
    return flat


def metrics_agree(stage: str) -> tuple[bool, str]:
    """HEAD's committed metrics of a training stage vs the fresh ones, and evaluate's row."""
    worst, where = 0.0, ""
    checks = [(f"metrics/{stage}/metrics.json", "")]
    checks.append(("metrics/evaluate.json", f"{stage}."))
    for path, prefix in checks:
        old = quality(json.loads(subprocess.check_output(["git", "show", f"HEAD:{path}"])))
        new = quality(json.loads(Path(path).read_text()))
        for key, value in old.items():
            if not key.startswith(prefix):
                continue
            if key not in new:
                return False, f"{path}: {key} missing"
            diff = abs(new[key] - value)
            if diff > worst:
                worst, where = diff, f"{path}: {key} {value:.4f} -> {new[key]:.4f}"
    return worst <= TOLERANCE, f"largest difference {worst:.4f} ({where or 'none'})"


def main() -> int:
    committed = outs(yaml.safe_load(subprocess.check_output(["git", "show", "HEAD:dvc.lock"])))
    with open("dvc.lock") as fh:
        fresh = outs(yaml.safe_load(fh))
    failed = []
    for path in sorted(committed):
        if committed[path] == fresh.get(path):
            print(f"ok   {path} bit-identical ({committed[path]})")
        elif path.startswith("models/"):
            same, how = metrics_agree(Path(path).name)
            print(f"{'ok  ' if same else 'DIFF'} {path} weights differ (another CPU or library "
                  f"build?); metrics {'agree' if same else 'DISAGREE'} within {TOLERANCE}: {how}")
            if not same:
                failed.append(path)
        else:
            print(f"DIFF {path} {committed[path]} -> {fresh.get(path)} (must be exact)")
            failed.append(path)
    if failed or not committed:
        print(f"dvc.lock outputs not reproduced: {failed or 'none committed'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
