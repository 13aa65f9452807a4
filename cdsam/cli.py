"""The ``cdsam`` command: ``cdsam summary --stage N`` (what a stage trains)."""

from __future__ import annotations

import argparse
import json
import sys

from cdsam.config import load_params
from cdsam.curriculum import apply_stage, component_counts, policy
from cdsam.entry import offline_defaults, run
from cdsam.errors import UserError
from cdsam.models.model import build_model

COMPONENTS = ("dino", "dino_lora", "clip_text", "heads", "sam", "sam_lora")


def summarize_stage(params_path: str, stage: int) -> dict[str, dict[str, int]]:
    """Build the default model as ``stage`` would train it; trainable/total per component.

    Random init (no weights are loaded): the counts depend only on the structure.
    """
    params = load_params(params_path)
    pol = policy(stage)
    model = build_model(params.model, load_weights=False, seed=params.seed)
    # Replay the curriculum up to `stage`, so stage 3 keeps stage 2's adapters and stage 4
    # merges them, as in the pipeline.
    for n in range(1, pol.stage + 1):
        mode = (params.stage4.sam_mode or "lora") if n == 4 else "lora"
        apply_stage(model, n, params.lora.sam, params.lora.dino if n in (2, 3) else None, mode)
    return component_counts(model)


def _table(counts: dict[str, dict[str, int]], stage: int) -> str:
    lines = [f"stage {stage}", f"{'component':<10} {'trainable':>12} {'total':>12}"]
    for name in COMPONENTS:
        c = counts[name]
        lines.append(f"{name:<10} {c['trainable']:>12,} {c['total']:>12,}")
    tr = sum(c["trainable"] for c in counts.values())
    tot = sum(c["total"] for c in counts.values())
    lines.append(f"{'all':<10} {tr:>12,} {tot:>12,}")
    return "\n".join(lines)


def cmd_summary(args: argparse.Namespace) -> None:
    if args.stage not in (1, 2, 3, 4):
        raise UserError(f"--stage: unknown stage {args.stage} (known: 1, 2, 3, 4)")
    counts = summarize_stage(args.params, args.stage)
    if args.json:
        print(json.dumps(counts, indent=2))
    else:
        print(_table(counts, args.stage))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cdsam", description="CLIP–DINO–SAM tools")
    ap.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("summary", help="what a curriculum stage trains, per component")
    s.add_argument("--stage", type=int, required=True)
    s.add_argument("--params", default="params.yaml")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_summary)
    return ap


def main(argv: list[str] | None = None) -> None:
    offline_defaults()
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    run(lambda: args.func(args), "cdsam")
