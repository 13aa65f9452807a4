"""What `cdsam predict --instances` costs, measured in one run: the same images and prompts
through `cdsam.inference.files.predict_files` without instances, then with them for each
decode path (``prompts``: one decoder row per seed; ``watershed``: none), each the best of
``--repeats`` runs after one untimed warm-up, writing the files a user gets.

    python -m cdsam.inference.bench [--checkpoint models/stage4] [--input IMAGES ...]
                                    [--prompt P ...] [--repeats 3] [--device auto]

Without ``--input`` it predicts 64 synthetic scenes of the default's size; without
``--prompt`` the checkpoint's first four training prompts. It prints the device, images/s and
decoder rows per image for each run and its time over the run without instances
(docs/benchmarks.md, "Instance decoding").
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from cdsam.config.schema import DECODE_MODES, SyntheticConfig
from cdsam.data.sources.synthetic import make_scene
from cdsam.inference.files import PredictOptions, collect_images, predict_files
from cdsam.inference.predictor import load_model
from cdsam.runtime import resolve_device


def time_predict(checkpoint: Path, images: list[Path], prompts: list[str] | None,
                 repeats: int = 3, device: str = "auto") -> dict[str, dict[str, float]]:
    """Per run (``semantic`` and each decode path): images/s (the best of ``repeats``) and
    decoder rows per image."""
    dev = resolve_device(device)
    result: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for decode in (None, *DECODE_MODES):
            predictor = load_model(checkpoint, dev, decode=decode or "prompts")
            use = prompts or predictor.known_prompts[:4]
            best, rows = 0.0, float(len(use))
            for n in range(repeats + 1):  # the first run warms up
                opts = PredictOptions(out=Path(tmp) / f"{decode}{n}", instances=bool(decode),
                                      show_progress=False)
                summary = predict_files(predictor, images, use, opts)
                if n:
                    best = max(best, summary["images_per_s"])
                if decode:
                    rows = summary["instances"]["decoder_rows_per_image"]
            result[decode or "semantic"] = {"images_per_s": best,
                                            "decoder_rows_per_image": rows}
    return result


def synthetic_inputs(folder: Path, count: int = 64) -> list[Path]:
    """``count`` default-sized synthetic scenes written as PNGs into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        scene, _ = make_scene(1, i, SyntheticConfig())
        scene.save(folder / f"scene{i:03d}.png")
        paths.append(folder / f"scene{i:03d}.png")
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="models/stage4")
    ap.add_argument("--input", dest="inputs", nargs="+", default=[])
    ap.add_argument("--prompt", dest="prompts", action="append")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        images = collect_images(args.inputs) if args.inputs else \
            synthetic_inputs(Path(tmp) / "scenes")
        r = time_predict(Path(args.checkpoint), images, args.prompts, args.repeats,
                         args.device)
    print(f"device {resolve_device(args.device)}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.checkpoint}: {len(images)} images")
    print("| cdsam predict | decoder rows per image | images/s | x the time without |")
    print("|---|---|---|---|")
    base = r["semantic"]["images_per_s"]
    for name in ("semantic", *DECODE_MODES):
        what = "masks only" if name == "semantic" else f"--instances --decode {name}"
        row = r[name]
        print(f"| {what} | {row['decoder_rows_per_image']:.1f} | {row['images_per_s']:.1f} | "
              f"{base / row['images_per_s']:.2f} |")


if __name__ == "__main__":
    main()
