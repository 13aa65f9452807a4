"""ONNX export parity and speed: onnxruntime vs PyTorch on the same fitted images, one run.

    python tools/onnx_bench.py --checkpoint models/stage4 --images data/prepared/images \\
        --work /tmp/onnx-bench [--prompt …] [--limit 32] [--batch-size 8]

Exports the checkpoint (`cdsam export --mode onnx --fixed-prompts`: the image path alone),
fits each image as training did, runs the batch through both, and prints a Markdown table: max
and mean |logit difference|, the largest |logit| (the scale they sit on), the share of pixels
whose mask (logit > 0) agrees, images/s for each (same threads), the file size.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

# This checkout's cdsam (the code beside the tool), not whichever one is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cdsam.checkout import require_checkout

require_checkout(__file__)

from cdsam.data.geometry import IMAGENET_MEAN, IMAGENET_STD
from cdsam.inference.files import collect_images
from cdsam.inference.onnx_export import ONNX_FILE, export_onnx
from cdsam.inference.predictor import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--images", nargs="+", required=True, help="files, folders or globs")
    ap.add_argument("--work", required=True, help="where the export goes")
    ap.add_argument("--prompt", action="append", help="default: the training vocabulary")
    ap.add_argument("--limit", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import onnxruntime as ort

    out = Path(args.work)
    sidecar = export_onnx(Path(args.checkpoint), out, args.prompt, check=False,
                          fixed_prompts=True)
    prompts = sidecar["output"]["prompts"]
    predictor = load_model(args.checkpoint)
    paths = collect_images(args.images)[: args.limit]
    inputs = [predictor.prepare(p)[0] for p in paths]
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pixels = np.stack([((x * std + mean) * 255).numpy() for x in inputs]).astype(np.float32)
    session = ort.InferenceSession(str(out / ONNX_FILE), providers=["CPUExecutionProvider"])
    bs = args.batch_size

    # Warm both once, then time the same batches.
    predictor.frame_logits(inputs[:bs], prompts)
    session.run(["logits"], {"images": pixels[:bs]})
    t0 = time.perf_counter()
    ref = torch.cat([predictor.frame_logits(inputs[i:i + bs], prompts, batch_size=bs
                                            * len(prompts))
                     for i in range(0, len(inputs), bs)]).numpy()
    t_torch = time.perf_counter() - t0
    t0 = time.perf_counter()
    got = np.concatenate([session.run(["logits"], {"images": pixels[i:i + bs]})[0]
                          for i in range(0, len(pixels), bs)])
    t_ort = time.perf_counter() - t0
    diff = np.abs(got - ref)
    agree = ((got > 0) == (ref > 0)).mean()
    n = len(paths)
    print(f"\n{n} images x {len(prompts)} prompts at {pixels.shape[-1]} px, batch {bs}, "
          f"{torch.get_num_threads()} threads; export {sidecar['export_s']} s, "
          f"opset {sidecar['opset']}, onnxruntime {ort.__version__}\n")
    print("| max abs diff | mean abs diff | max abs logit | mask agreement | PyTorch img/s "
          "| onnxruntime img/s | model.onnx MB |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {diff.max():.2e} | {diff.mean():.2e} | {np.abs(ref).max():.2f} "
          f"| {100 * agree:.4f} % | {n / t_torch:.2f} "
          f"| {n / t_ort:.2f} | {sidecar['bytes'] / 1e6:.1f} |")


if __name__ == "__main__":
    main()
