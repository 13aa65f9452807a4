"""DVC stage `evaluate`: every stage checkpoint on the test split (the val split when the
prepared data has no test split) → metrics, CSVs, overlays."""

from __future__ import annotations

import sys
from pathlib import Path

# Import this checkout's cdsam (the code DVC hashed for the stage), not an installed one.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cdsam.checkout import require_checkout

require_checkout(__file__)

import argparse

from cdsam.config.stage_view import load_stage_params
from cdsam.config.stages import stages
from cdsam.entry import run
from cdsam.evaluation.report import evaluate_stages


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default="data/prepared")
    ap.add_argument("--models", default="models")
    ap.add_argument("--out", default="metrics/eval", help="CSVs and overlays")
    ap.add_argument("--metrics", default="metrics/evaluate.json")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    args = ap.parse_args()
    params = load_stage_params("evaluate", args.params)
    models = Path(args.models)
    checkpoints = {f"stage{n}": models / f"stage{n}" for n in stages()}
    evaluate_stages(params, checkpoints, Path(args.data), Path(args.out), Path(args.metrics))


if __name__ == "__main__":
    run(main, "evaluate")
