"""Checkpoint and resume-state sizes per stage: delta (what cdsam writes) vs full (every tensor).

Runs the four stages as ``dvc repro`` would (``StageTrainer``: setup, train, save) on an
already prepared data folder, then writes the same model once more with every tensor to show
what a full checkpoint would weigh, and times loading each. Meant for real-size recipes:

    python tools/checkpoint_sizes.py --params params.yaml --data data/prepared --work /tmp/sizes

Prints a Markdown table (MB = 10^6 bytes).
"""

from __future__ import annotations

import argparse
import copy
import logging
import shutil
import sys
import time
from pathlib import Path

# This checkout's cdsam (the code beside the tool), not whichever one is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cdsam.checkout import require_checkout

require_checkout(__file__)

from cdsam.config.parse import load_params
from cdsam.config.stages import stage_rule, stages
from cdsam.models.checkpoint import load_checkpoint, read_meta, save_checkpoint
from cdsam.training.resume import Progress, ResumeStore
from cdsam.training.trainer import StagePaths, StageTrainer, TrainerOptions


def dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def timed_load(path: Path) -> float:
    t0 = time.perf_counter()
    load_checkpoint(path)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--data", default="data/prepared")
    ap.add_argument("--work", required=True, help="scratch folder (emptied first)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    params = load_params(args.params)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    rows = []
    for n in stages():
        parent = stage_rule(n).parent
        paths = StagePaths(data=Path(args.data), out=work / f"stage{n}",
                           metrics=work / f"metrics{n}",
                           parent=None if parent is None else work / f"stage{parent}",
                           resume=work / "resume")
        t = StageTrainer(params, n, paths, TrainerOptions(show_progress=False))
        t.setup()
        t.train(None)
        resume_delta = dir_mb(t.store.dir)  # as the last epoch left it
        best = {f"best/{k}": v for k, v in (t.best_state or {}).items()}
        full_store = ResumeStore(work / "resume-full", n, t.store.key)
        full_store.save(Progress(epoch=t.epochs), t.model, t.optimizer, t.scheduler, t.scaler,
                        extra=best, base=None)
        resume_full = dir_mb(full_store.dir)
        t.save()
        meta = copy.deepcopy(read_meta(paths.out))
        save_checkpoint(work / f"full{n}", t.model.cpu(), meta, None)
        rows.append((n, dir_mb(work / f"full{n}"), dir_mb(paths.out), resume_full, resume_delta,
                     timed_load(work / f"full{n}"), timed_load(paths.out)))
        t.store.clear()
        full_store.clear()
        shutil.rmtree(work / f"full{n}")
    print("\n| stage | checkpoint full (MB) | checkpoint delta (MB) | resume state full (MB) "
          "| resume state delta (MB) | load full (s) | load delta (s) |")
    print("|---|---|---|---|---|---|---|")
    for n, cf, cd, rf, rd, lf, ld in rows:
        print(f"| {n} | {cf:.1f} | {cd:.1f} | {rf:.1f} | {rd:.1f} | {lf:.1f} | {ld:.1f} |")


if __name__ == "__main__":
    main()
