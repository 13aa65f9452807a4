"""DVC stages `stage1`…`stage4`: train one curriculum stage from the previous checkpoint.

Under torchrun (or with ``CDSAM_NPROC=N`` / ``CDSAM_TORCHRUN="…"`` set, which relaunch this
script under torchrun) the stage trains with DistributedDataParallel; rank 0 writes the outputs.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Import this checkout's cdsam (the code DVC hashed for the stage), not an installed one.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cdsam.checkout import require_checkout

require_checkout(__file__)

import argparse
import os
import subprocess

from cdsam import distributed
from cdsam.config.stage_view import load_stage_params
from cdsam.config.stages import check_stage_arg
from cdsam.entry import run
from cdsam.training.trainer import StagePaths, StageTrainer, TrainerOptions


def main() -> int | None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--stage", type=int, required=True, help="1, 2, 3 or 4")
    ap.add_argument("--data", default="data/prepared")
    ap.add_argument("--models", default="models", help="stage N writes MODELS/stageN")
    ap.add_argument("--metrics", default="metrics", help="DVCLive dir METRICS/stageN")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--resume-dir", default=os.environ.get("CDSAM_RESUME_DIR", ".cdsam/resume"),
                    help="per-epoch resume state (not a DVC output; default $CDSAM_RESUME_DIR "
                         "or .cdsam/resume: on several nodes, a folder they all see)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    args = ap.parse_args()
    rule = check_stage_arg(args.stage)
    # Validate params before anything else happens, also before a torchrun relaunch.
    params = load_stage_params(rule.name, args.params)
    relaunch = distributed.relaunch_command([os.path.abspath(__file__), *sys.argv[1:]])
    if relaunch is not None:
        return subprocess.call(relaunch)
    models = Path(args.models)
    paths = StagePaths(data=Path(args.data), out=models / rule.name,
                       metrics=Path(args.metrics) / rule.name,
                       parent=None if rule.parent is None else models / f"stage{rule.parent}",
                       resume=Path(args.resume_dir))
    try:
        StageTrainer(params, args.stage, paths,
                     TrainerOptions(show_progress=not args.no_progress)).run()
    finally:
        distributed.shutdown()
    return None


if __name__ == "__main__":
    run(main, "train")
