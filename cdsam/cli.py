"""The ``cdsam`` command.

``cdsam summary --stage N``   what a curriculum stage trains, per component
``cdsam init --preset …``     a real-size recipe (DINOv2/DINO, CLIP, SAM files) into params.yaml
``cdsam predict …``           masks for images and text prompts from a checkpoint
``cdsam export …``            a merged, self-contained export of a checkpoint (LoRA folded in)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from cdsam.config import load_params
from cdsam.curriculum import apply_stage, component_counts, policy
from cdsam.entry import offline_defaults, run
from cdsam.errors import UserError
from cdsam.models.model import build_model
from cdsam.models.preflight import check_model

log = logging.getLogger("cdsam.cli")

COMPONENTS = ("dino", "dino_lora", "clip_text", "heads", "sam", "sam_lora")


def summarize_stage(params_path: str, stage: int) -> dict[str, dict[str, int]]:
    """Build the default model as ``stage`` would train it; trainable/total per component.

    Random init (no weights are loaded): the counts depend only on the structure.
    """
    params = load_params(params_path)
    pol = policy(stage)
    check_model(params.model, params.data.crop, params.lora.dino if stage >= 2 else None)
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


def cmd_predict(args: argparse.Namespace) -> None:
    import numpy as np
    from PIL import Image
    from tqdm import tqdm

    from cdsam import io
    from cdsam.data.manifest import slug
    from cdsam.overlay import PALETTE
    from cdsam.predict import legend_overlay, load_model, semantic_labels, to_pil

    if not 0 < args.threshold < 1:
        raise UserError(f"--threshold: {args.threshold} must be in (0, 1)")
    slugs = [slug(p) for p in args.prompt]
    if "" in slugs or len(set(slugs)) != len(slugs):
        raise UserError(f"--prompt: prompts must have distinct, non-empty file slugs, got "
                        f"{slugs}")
    images = [Path(p) for p in args.image]
    for path in images:  # fail before any work, naming the file
        if not path.is_file():
            raise UserError(f"--image: {path}: not found")
    predictor = load_model(args.checkpoint, args.device)
    unknown = [p for p in args.prompt if p not in predictor.known_prompts]
    if unknown and predictor.known_prompts:
        log.warning("prompts not in the training vocabulary (may work less well): %s", unknown)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stems = [p.stem for p in images]
    dupes = {s for s in stems if stems.count(s) > 1}
    for path in tqdm(images, desc="predict", unit="image", disable=args.no_progress):
        pil = to_pil(path)
        pred = predictor.predict(pil, args.prompt, threshold=args.threshold,
                                 return_logits=args.semantic)
        stem = path.stem if path.stem not in dupes else f"{path.parent.name}_{path.stem}"
        for s, mask in zip(slugs, pred.masks, strict=True):
            with io.atomic_path(out / f"{stem}__{s}.png") as tmp:
                Image.fromarray(mask.astype(np.uint8) * 255, "L").save(tmp, format="PNG")
        with io.atomic_path(out / f"{stem}__overlay.png") as tmp:
            legend_overlay(pil, pred.masks, args.prompt, PALETTE).save(tmp, format="PNG")
        if args.semantic:
            labels = Image.fromarray(semantic_labels(pred.probs, args.threshold), "P")
            flat = [0, 0, 0] + [c for i in range(len(args.prompt))
                                for c in PALETTE[i % len(PALETTE)]]
            labels.putpalette(flat + [0] * (768 - len(flat)))
            with io.atomic_path(out / f"{stem}__semantic.png") as tmp:
                labels.save(tmp, format="PNG")
    log.info("%d images x %d prompts -> %s", len(images), len(args.prompt), out)


def cmd_export(args: argparse.Namespace) -> None:
    from cdsam.export import export

    info = export(args.checkpoint, args.out, args.mode)
    log.info("merged export: %d LoRA layers folded in, %.2f MiB -> %s",
             info["merged_lora"], info["bytes"] / 2**20, args.out)
    print(json.dumps(info))


def cmd_init(args: argparse.Namespace) -> None:
    from cdsam.presets import RECIPES, apply_preset, list_presets

    if args.preset is None:
        for name in list_presets():
            print(f"{name:<16} {(RECIPES / f'{name}.yaml').read_text().splitlines()[0][2:]}")
        return
    changed = apply_preset(args.preset, args.params)
    print(f"{args.params}: preset {args.preset} set {len(changed)} keys: {', '.join(changed)}")
    print(f"weight files it expects: see the header of {RECIPES / (args.preset + '.yaml')}; "
          f"then dvc repro")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cdsam", description="CLIP–DINO–SAM tools")
    ap.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("summary", help="what a curriculum stage trains, per component")
    s.add_argument("--stage", type=int, required=True)
    s.add_argument("--params", default="params.yaml")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_summary)

    s = sub.add_parser("init", help="write a real-size recipe into params.yaml (no --preset: "
                                     "list them)")
    s.add_argument("--preset")
    s.add_argument("--params", default="params.yaml")
    s.set_defaults(func=cmd_init)

    s = sub.add_parser("predict", help="masks for images and text prompts")
    s.add_argument("--checkpoint", required=True, help="stage checkpoint or merged export")
    s.add_argument("--image", action="append", required=True, help="repeat for more images")
    s.add_argument("--prompt", action="append", required=True, help="repeat for more prompts")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--threshold", type=float, default=0.5)
    s.add_argument("--semantic", action="store_true",
                   help="also write <stem>__semantic.png: argmax over the prompts, 0 = none")
    s.add_argument("--device", default="cpu")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser("export", help="a merged, self-contained export of a checkpoint (stage "
                       "checkpoints already hold only what training changed)")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--mode", choices=("merged",), default="merged")
    s.set_defaults(func=cmd_export)
    return ap


def main(argv: list[str] | None = None) -> None:
    offline_defaults()
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    run(lambda: args.func(args), "cdsam")
