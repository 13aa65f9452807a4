"""What instance decoding costs in evaluation, measured in one run: a checkpoint's text-only
pass over a prepared split (one semantic mask per (image, prompt)) against the same pass
followed by each decode path of `cdsam.inference.instances` (``prompts``: one decoder row per
seed, then NMS; ``watershed``: none), each timed over the whole split after one untimed
warm-up pass.

    python -m cdsam.evaluation.bench [--checkpoint models/stage4] [--data data/prepared]
                                     [--split test] [--repeats 3]

It prints the device, the split's images and (image, prompt) pairs, the decoder rows per pair
and per image, seconds per image for each pass and its ratio to the semantic pass (docs/benchmarks.md,
"Instance decoding").
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from cdsam.config.schema import DECODE_MODES, EvaluateConfig
from cdsam.data.packed import PackedLoader
from cdsam.data.prepared import PreparedSplit
from cdsam.inference.instances import decode_instances
from cdsam.models.checkpoint import load_checkpoint
from cdsam.runtime import configure_determinism, precision_for, resolve_device


@torch.no_grad()
def time_split(checkpoint: Path, data: Path, split: str, repeats: int = 3,
               device: str = "auto") -> dict[str, dict[str, float]]:
    """Per pass (``semantic`` and each decode path): seconds per image (the best of
    ``repeats`` passes) and decoder rows per image; with the split's images and pairs."""
    dev = resolve_device(device)
    configure_determinism(dev)
    precision = precision_for(dev)
    model, _ = load_checkpoint(checkpoint, dev)
    model.eval()
    if not model.has_instance_heads:
        raise SystemExit(f"{checkpoint}: no instance heads (a checkpoint from before them)")
    rows = PreparedSplit.open(data, split)
    ev = EvaluateConfig()
    loader = PackedLoader(rows, ev.batch_size, dev, by_image=True, sample_budget=ev.batch_size)
    batches = list(loader)
    images, pairs = len(rows.image_keys), len(rows)

    def run(decode: str | None) -> tuple[float, int]:
        extra = 0
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        for batch in batches:
            with precision.autocast():
                text = model.clip_text(batch["prompt"])
                out = model(batch["image"], batch["prompt"], text=text,
                            image_of=batch["image_of"])
                masks = (out.masks > 0).cpu()
                if decode is not None:
                    found = decode_instances(model, out, text.to(out.tokens.dtype),
                                             tuple(masks.shape[-2:]),
                                             replace(ev.instances, decode=decode),
                                             ev.threshold, budget=ev.batch_size)
                    extra += sum(f.decoder_rows for f in found)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0, extra

    result: dict[str, dict[str, float]] = {"split": {"images": images, "pairs": pairs}}
    for decode in (None, *DECODE_MODES):
        run(decode)  # warm-up: first calls allocate and pick kernels
        timed = [run(decode) for _ in range(repeats)]
        seconds, extra = min(t for t, _ in timed), timed[0][1]
        result[decode or "semantic"] = {"s_per_image": seconds / images,
                                        "decoder_rows_per_image": (pairs + extra) / images}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="models/stage4")
    ap.add_argument("--data", default="data/prepared")
    ap.add_argument("--split", default="test")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    torch.manual_seed(0)
    np.random.seed(0)
    r = time_split(Path(args.checkpoint), Path(args.data), args.split, args.repeats, args.device)
    images, pairs = r["split"]["images"], r["split"]["pairs"]
    print(f"device {resolve_device(args.device)}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.checkpoint} on {args.split}: "
          f"{images} images, {pairs} (image, prompt) pairs")
    print("| pass | decoder rows per image | s per image | x the semantic pass |")
    print("|---|---|---|---|")
    base = r["semantic"]["s_per_image"]
    for name in ("semantic", *DECODE_MODES):
        what = "text prompts (semantic masks)" if name == "semantic" else f"+ instances, {name}"
        row = r[name]
        print(f"| {what} | {row['decoder_rows_per_image']:.1f} | {row['s_per_image']:.4f} | "
              f"{row['s_per_image'] / base:.2f} |")

if __name__ == "__main__":
    main()
