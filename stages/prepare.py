"""DVC stage `prepare`: params `prepare`, `seed`, `data.fit` / `data.resize` / `data.crop` →
data/prepared/ (the fitted shards every stage opens) and metrics/prepare.json."""

from __future__ import annotations

import sys
from pathlib import Path

# Import this checkout's cdsam (the code DVC hashed for the stage), not an installed one.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cdsam.checkout import require_checkout

require_checkout(__file__)

import argparse
import logging

from cdsam import io
from cdsam.config.stage_view import check_paths_tracked, load_stage_params
from cdsam.data.prepare import prepare
from cdsam.data.sources.listing import source_inputs
from cdsam.entry import run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="data/prepared")
    ap.add_argument("--metrics", default="metrics/prepare.json")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    args = ap.parse_args()
    params = load_stage_params("prepare", args.params)
    # The files a source's annotation file names (a YOLO data.yaml's folders and lists) must
    # be dvc.yaml deps too, or editing them would leave prepare stale.
    check_paths_tracked("prepare", source_inputs(params.prepare))
    summary = prepare(params.prepare, params.seed, args.out, show_progress=not args.no_progress,
                      data=params.data)
    io.write_json(args.metrics, summary)
    logging.getLogger("cdsam").info("prepared %s", summary)


if __name__ == "__main__":
    run(main, "prepare")
