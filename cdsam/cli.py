"""The ``cdsam`` command.

``cdsam summary --stage N``   what a curriculum stage trains, per component
``cdsam plan …``              what each stage needs of a GPU's memory, before anything runs
``cdsam init --preset …``     a real-size recipe (DINOv2/DINO, CLIP, SAM files) into params.yaml
``cdsam init --default``      the embedded default params file (the toy run), e.g. to start over
``cdsam predict …``           masks for images and text prompts from a checkpoint
``cdsam demo …``              a local web page to try prompts on a checkpoint
``cdsam export …``            a merged, self-contained checkpoint, or ONNX graphs (any prompt, or fixed ones)
``cdsam data check``          what the prepare source holds, per split, and its bad files (exit 1)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from cdsam import __version__
from cdsam.config.parse import load_params, parse_params, read_params_file
from cdsam.config.stages import check_stage_arg, curriculum_to
from cdsam.entry import offline_defaults, run
from cdsam.errors import UserError
from cdsam.models.model import build_model
from cdsam.models.preflight import check_model
from cdsam.training.curriculum import apply_plan, component_counts

log = logging.getLogger("cdsam.cli")

COMPONENTS = ("dino", "dino_lora", "clip_text", "clip_lora", "heads", "sam", "sam_lora")


def summarize_stage(params_path: str, stage: int) -> dict[str, dict[str, int]]:
    """Build the default model as ``stage`` would train it; trainable/total per component.

    Random init (no weights are loaded): the counts depend only on the structure.
    """
    params = load_params(params_path)
    chain = curriculum_to(params, stage)
    dino_lora = next((p.lora_dino for p in chain if p.lora_dino is not None), None)
    check_model(params.model, params.data.crop, dino_lora)
    model = build_model(params.model, load_weights=False, seed=params.seed)
    # Replay the curriculum up to `stage` along its parents, so stage 3 keeps stage 2's
    # adapters and stage 4 merges them, as in the pipeline.
    for plan in chain:
        apply_plan(model, plan)
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
    check_stage_arg(args.stage)
    counts = summarize_stage(args.params, args.stage)
    if args.json:
        print(json.dumps(counts, indent=2))
    else:
        print(_table(counts, args.stage))


def plan_params(params_path: str, preset: str | None):
    """params as written, or with a recipe laid over a copy (params.yaml is not touched)."""
    if preset is None:
        return load_params(params_path)
    import tempfile

    from cdsam.presets import apply_preset

    source = Path(params_path)
    if not source.is_file():
        raise UserError(f"{source}: params file not found")
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "params.yaml"
        copy.write_text(source.read_text())
        apply_preset(preset, copy)
        return load_params(str(copy))


def cmd_plan(args: argparse.Namespace) -> None:
    from cdsam.training.memory_plan import (
        parse_bytes,
        plan_report,
        plan_table,
        prompts_per_image,
    )

    try:
        memory = parse_bytes(args.gpu_memory)
    except ValueError as exc:
        raise UserError(f"--gpu-memory: {exc}") from None
    if args.gpus < 1:
        raise UserError(f"--gpus: must be >= 1, got {args.gpus}")
    params = plan_params(args.params, args.preset)
    check_model(params.model, params.data.crop, params.lora.dino)
    per_image, source = prompts_per_image(params, args.prompts_per_image, Path(args.data))
    report = plan_report(params, memory, args.gpus, amp=not args.fp32,
                         prompts_per_image=per_image, prompts_from=source)
    print(json.dumps(report, indent=2) if args.json else plan_table(report))


def cmd_predict(args: argparse.Namespace) -> None:
    from cdsam.inference.files import (
        PredictOptions,
        collect_images,
        predict_files,
        read_prompts,
        read_spatial,
    )
    from cdsam.inference.predictor import load_model
    from cdsam.runtime import resolve_device

    if not 0 < args.threshold < 1:
        raise UserError(f"--threshold: {args.threshold} must be in (0, 1)")
    if not args.inputs:
        raise UserError("predict: give --input (files, folders or glob patterns)")
    prompts = read_prompts(args.prompt, args.prompts_file) \
        if args.prompt or args.prompts_file or not args.classes else []
    images = collect_images(args.inputs)  # fail before any weight loads, naming the input
    points, box = read_spatial(args.points, args.box, images, args.tile)
    opts = PredictOptions(out=Path(args.out), threshold=args.threshold,
                          batch_size=args.batch_size, semantic=args.semantic,
                          save_probs=args.save_probs, overlay=not args.no_overlay,
                          on_bad_file=args.on_bad_file, show_progress=not args.no_progress,
                          tile=args.tile, overlap=args.overlap, points=points, box=box,
                          instances=args.instances, formats=args.formats or [])
    if args.presence_threshold is not None and not 0 <= args.presence_threshold < 1:
        raise UserError(f"--presence-threshold: {args.presence_threshold} must be in [0, 1)")
    if args.min_quality is not None and not 0 <= args.min_quality < 1:
        raise UserError(f"--min-quality: {args.min_quality} must be in [0, 1)")
    if args.formats and not args.instances:
        raise UserError("--format: annotation files list objects; add --instances")
    predictor = load_model(args.checkpoint, resolve_device(args.device),
                           args.presence_threshold, args.decode, args.min_quality)
    # A class: its name in every training template, the mean of their features.
    classes = {predictor.class_prompt(name): name for name in args.classes or []}
    prompts += list(classes)
    opts.labels = classes  # annotation files label a class's objects by its name
    unknown = [p for p in prompts if p not in predictor.known_prompts]
    if unknown and predictor.known_prompts:
        log.warning("prompts not in the training vocabulary (may work less well): %s", unknown)
    summary = predict_files(predictor, images, prompts, opts)
    log.info("%d images x %d prompts -> %s (%.2f images/s on %s, batch %d%s)",
             summary["images"], len(prompts), args.out, summary["images_per_s"],
             summary["device"], args.batch_size,
             f"; {len(summary['skipped'])} unreadable skipped" if summary["skipped"] else "")


def cmd_export(args: argparse.Namespace) -> None:
    from cdsam.inference.export import export

    prompts = None
    if args.prompt or args.prompts_file:
        from cdsam.inference.files import read_prompts

        prompts = read_prompts(args.prompt, args.prompts_file)
    info = export(args.checkpoint, args.out, args.mode, prompts, check=not args.no_check,
                  fixed_prompts=args.fixed_prompts)
    if args.mode == "onnx":
        parity = info.get("parity", {})
        what = f"{len(info['output']['prompts'])} fixed prompts" if args.fixed_prompts else \
            "text.onnx + model.onnx (any prompt)" + \
            (" + seeds.onnx (objects)" if "instances" in info else "")
        checked = "" if args.fixed_prompts else \
            f" on {len(parity.get('prompts', []))} prompts it never saw"
        log.info("onnx export: %s, input %s, %.2f MiB -> %s; onnxruntime vs PyTorch%s: "
                 "max |logit diff| %.2e, masks agree on %.4f%% of pixels", what,
                 info["input"]["shape"], info["bytes"] / 2**20, args.out, checked,
                 parity.get("max_abs_diff", float("nan")),
                 100 * parity.get("mask_agreement", float("nan")))
    else:
        log.info("merged export: %d LoRA layers folded in, %.2f MiB -> %s",
                 info["merged_lora"], info["bytes"] / 2**20, args.out)
    print(json.dumps(info))


def cmd_demo(args: argparse.Namespace) -> None:
    from cdsam.inference.demo import serve

    serve(args.checkpoint, args.host, args.port, args.device, args.examples)


def cmd_init(args: argparse.Namespace) -> None:
    from cdsam.presets import DEFAULT_PARAMS, RECIPES, apply_preset, list_presets, write_default

    if args.default:
        if args.preset is not None:
            raise UserError("--default and --preset: pick one (a preset applies onto the "
                            "default; run --default first)")
        wrote = write_default(args.params, args.force)
        print(f"{args.params}: {'wrote' if wrote else 'already is'} the embedded default "
              f"({DEFAULT_PARAMS.name} of cdsam {__version__})")
        return
    if args.preset is None:
        for name in list_presets():
            print(f"{name:<16} {(RECIPES / f'{name}.yaml').read_text().splitlines()[0][2:]}")
        return
    changed = apply_preset(args.preset, args.params)
    print(f"{args.params}: preset {args.preset} set {len(changed)} keys: {', '.join(changed)}")
    print(f"weight files it expects: see the header of {RECIPES / (args.preset + '.yaml')}; "
          f"then dvc repro")


CHECK_KEYS = ("source", "images", "masks", "annotations", "root", "mask_format", "prompt",
              "instance_classes")


def cmd_data_check(args: argparse.Namespace) -> int:
    from cdsam.data.check import check_source
    from cdsam.data.tasks import resolve_workers

    data = read_params_file(args.params) if Path(args.params).is_file() or args.source is None \
        else {}
    prepare = dict(data.get("prepare") or {})
    given = {k: getattr(args, k) for k in CHECK_KEYS if getattr(args, k) is not None}
    if args.source is not None and args.source != prepare.get("source"):
        # Another source: the file's source-specific keys would not describe it.
        prepare = {k: v for k, v in prepare.items() if k not in CHECK_KEYS}
    prepare.update(given)
    if args.classes is not None:
        prepare["classes"] = [c.strip() for c in args.classes.split(",") if c.strip()]
    params = parse_params({**data, "prepare": prepare})
    workers = resolve_workers(args.workers if args.workers is not None
                              else params.prepare.workers)
    report = check_source(params.prepare, params.seed, workers,
                          show_progress=not args.no_progress)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.render())
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cdsam", description="CLIP–DINO–SAM tools")
    ap.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("summary", help="what a curriculum stage trains, per component")
    s.add_argument("--stage", type=int, required=True)
    s.add_argument("--params", default="params.yaml")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_summary)

    s = sub.add_parser("plan", help="what each stage needs of a GPU's memory (meta device: "
                                     "nothing is allocated, no weights are read)")
    s.add_argument("--params", default="params.yaml")
    s.add_argument("--preset", help="plan a recipe (cdsam init --preset's names) laid over "
                                    "--params, without writing it")
    s.add_argument("--gpu-memory", default="80GB", help="memory of one GPU (80GB, 141GiB, ...)")
    s.add_argument("--gpus", type=int, default=1, help="GPUs the run uses (torchrun ranks)")
    s.add_argument("--fp32", action="store_true", help="plan without AMP (fp32 activations "
                                                       "and frozen weights), as on the CPU")
    s.add_argument("--prompts-per-image", type=float, default=None,
                   help="data.batch_by: image: prompts a batch image brings (default: "
                        "data.prompts_per_image, or the mean of --data's train split)")
    s.add_argument("--data", default="data/prepared",
                   help="prepared data to count prompts an image from (data.batch_by: image)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser("init", help="write a real-size recipe into params.yaml (no --preset: "
                                     "list them)")
    s.add_argument("--preset")
    s.add_argument("--default", action="store_true",
                   help="write the embedded default params file (the toy run on synthetic data)")
    s.add_argument("--force", action="store_true", help="--default: overwrite a tuned file")
    s.add_argument("--params", default="params.yaml")
    s.set_defaults(func=cmd_init)

    s = sub.add_parser("predict", help="masks for images (files, folders, globs) and text "
                                        "prompts")
    s.add_argument("--checkpoint", required=True, help="stage checkpoint or merged export")
    s.add_argument("--input", dest="inputs", nargs="+", action="extend", default=[],
                   help="image files, folders (their images) or glob patterns ('imgs/*.jpg')")
    s.add_argument("--image", dest="inputs", action="append", help="same as --input, one path")
    s.add_argument("--prompt", action="append", help="repeat for more prompts")
    s.add_argument("--prompts-file", help="more prompts, one per line (# comments)")
    s.add_argument("--class", dest="classes", action="append", metavar="NAME",
                   help="a class name, put in every prompt template the checkpoint trained "
                        "with (prepare.prompt_templates) and answered with their mean; repeat")
    s.add_argument("--point", dest="points", action="append", metavar="X,Y",
                   help="a click on the object, in the image's pixels, joining every prompt "
                        "(repeatable; one image at a time)")
    s.add_argument("--box", metavar="X0,Y0,X1,Y1",
                   help="a box around the object, in the image's pixels, joining every prompt "
                        "(one image at a time)")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--threshold", type=float, default=0.5)
    s.add_argument("--presence-threshold", type=float, default=None,
                   help="a text prompt whose presence probability is below this gets an empty "
                        "mask (default: the threshold the checkpoint chose on val; 0: never "
                        "gate). Checkpoints with the instance heads only")
    s.add_argument("--instances", action="store_true",
                   help="also each prompt's objects: <stem>__instances.png (16-bit ids), "
                        "instances.csv and coco_results.json (checkpoints with the instance "
                        "heads; docs/inference.md)")
    s.add_argument("--format", dest="formats", action="append", choices=("coco", "labelme",
                                                                         "cvat"),
                   help="with --instances: annotation files the tool opens (coco.json, "
                        "labelme/<stem>.json, cvat.xml), for correcting and training on; "
                        "repeatable")
    s.add_argument("--decode", choices=("prompts", "watershed"), default="prompts",
                   help="with --instances: each seed a click through SAM's decoder (prompts) "
                        "or the seeds splitting the mask (watershed: dense small objects)")
    s.add_argument("--min-quality", type=float, default=None,
                   help="with --instances: an object's quality needed to be returned "
                        "(default: the checkpoint's choice on val for --decode)")
    s.add_argument("--batch-size", type=int, default=8, help="images per model call")
    s.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda:N")
    s.add_argument("--semantic", action="store_true",
                   help="also write <stem>__semantic.png: argmax over the prompts, 0 = none")
    s.add_argument("--save-probs", choices=("png16", "npy"),
                   help="also write probabilities: <stem>__<prompt>__prob.png (16-bit, "
                        "p x 65535) or <stem>__probs.npy (P x H x W float16)")
    s.add_argument("--no-overlay", action="store_true", help="skip <stem>__overlay.png")
    s.add_argument("--tile", type=int, default=0,
                   help="images larger than this many pixels (either side) are cut into "
                        "overlapping tiles of this size, predicted at full resolution and "
                        "blended (0: off; try 4-8 x the model's input for micrographs)")
    s.add_argument("--overlap", type=int, default=64, help="tile overlap in pixels")
    s.add_argument("--on-bad-file", choices=("error", "skip"), default="error",
                   help="an unreadable image stops the run (error) or is listed and skipped")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser("export", help="merged: a self-contained checkpoint (stage checkpoints "
                       "hold only what training changed); onnx: a text graph and an image + "
                       "text -> masks graph (or one graph for fixed prompts), runnable with "
                       "onnxruntime alone")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--mode", choices=("merged", "onnx"), default="merged")
    s.add_argument("--prompt", action="append",
                   help="onnx: a prompt to list in the sidecar, or with --fixed-prompts to bake "
                        "in (repeat; default: the training vocabulary)")
    s.add_argument("--fixed-prompts", action="store_true",
                   help="onnx: one graph, images -> masks, the prompts' text features stored "
                        "in it (no text graph or tokenizer)")
    s.add_argument("--prompts-file", help="onnx: more prompts, one per line")
    s.add_argument("--no-check", action="store_true",
                   help="onnx: skip the onnxruntime-vs-PyTorch check on two seeded images")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("demo", help="a local web page to try prompts and clicks on a checkpoint "
                                     "(needs the demo extra)")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: this machine only; 0.0.0.0 exposes it)")
    s.add_argument("--port", type=int, default=7860)
    s.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda:N")
    s.add_argument("--examples", default="data/prepared/images",
                   help="a folder whose first images are offered to pick (default: the "
                        "prepared data, when present)")
    s.set_defaults(func=cmd_demo)

    data = sub.add_parser("data", help="data tools").add_subparsers(dest="data_command",
                                                                      required=True)
    s = data.add_parser("check", help="read the prepare source as prepare would, write "
                        "nothing: per split images, samples, classes and their pixel shares, "
                        "empty masks, bad files; exit 1 on any problem")
    s.add_argument("--params", default="params.yaml",
                   help="its prepare section is checked; the options below replace keys")
    s.add_argument("--source", help="prepare.source (another source than the file's drops "
                                    "the file's source keys)")
    for key in CHECK_KEYS[1:]:
        s.add_argument(f"--{key.replace('_', '-')}", dest=key, help=f"prepare.{key}")
    s.add_argument("--classes", help="prepare.classes, comma-separated")
    s.add_argument("--workers", type=int, help="processes (default prepare.workers: the cores)")
    s.add_argument("--json", action="store_true", help="the report as JSON on stdout")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_data_check)
    return ap


def main(argv: list[str] | None = None) -> None:
    offline_defaults()
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    run(lambda: args.func(args), "cdsam")


if __name__ == "__main__":  # python -m cdsam.cli, beside the `cdsam` script
    main()
