"""What instance decoding costs in evaluation, measured in one run: a checkpoint's text-only
pass over a prepared split (one semantic mask per (image, prompt)) against the same pass
followed by the seed decoding and NMS of `cdsam.inference.instances` (one decoder row per
seed), each timed over the whole split after one untimed warm-up batch.

    python -m cdsam.evaluation.bench [--checkpoint models/stage4] [--data data/prepared]
                                     [--split test] [--repeats 3]

It prints the device, the split's images and (image, prompt) pairs, the seeds (decoder rows)
per pair and per image, seconds per image for both passes and their ratio (docs/benchmarks.md,
"Instance decoding").
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from cdsam.config.schema import EvaluateConfig
from cdsam.data.packed import PackedLoader
from cdsam.data.prepared import PreparedSplit
from cdsam.inference.instances import decode_instances
from cdsam.models.checkpoint import load_checkpoint
from cdsam.runtime import configure_determinism, precision_for, resolve_device


@torch.no_grad()
def time_split(checkpoint: Path, data: Path, split: str, repeats: int = 3,
               device: str = "auto") -> dict[str, float]:
    """Seconds per image of the text-only pass and of the pass with instance decoding (the
    best of ``repeats`` passes each), and the seeds decoded."""
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
    images = len(rows.image_keys)
    seeds = 0

    def run(instances: bool) -> float:
        nonlocal seeds
        seeds = 0
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        for batch in batches:
            with precision.autocast():
                text = model.clip_text(batch["prompt"])
                out = model(batch["image"], batch["prompt"], text=text,
                            image_of=batch["image_of"])
                masks = (out.masks > 0).cpu()
                if instances:
                    found = decode_instances(model, out, text.to(out.tokens.dtype),
                                             tuple(masks.shape[-2:]), ev.instances,
                                             budget=ev.batch_size)
                    seeds += sum(f.seeds for f in found)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0

    run(True)  # warm-up: first calls allocate and pick kernels
    semantic = min(run(False) for _ in range(repeats))
    with_instances = min(run(True) for _ in range(repeats))
    pairs = len(rows)
    return {"images": images, "pairs": pairs, "seeds_per_pair": seeds / max(pairs, 1),
            "decoder_rows_per_image": (pairs + seeds) / max(images, 1),
            "semantic_s_per_image": semantic / images,
            "instances_s_per_image": with_instances / images,
            "ratio": with_instances / semantic}


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
    print(f"device {resolve_device(args.device)}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.checkpoint} on {args.split}: "
          f"{r['images']} images, {r['pairs']} (image, prompt) pairs")
    print("| pass | decoder rows per image | s per image |")
    print("|---|---|---|")
    print(f"| text prompts (semantic masks) | {r['pairs'] / r['images']:.1f} | "
          f"{r['semantic_s_per_image']:.4f} |")
    print(f"| + instance decoding ({r['seeds_per_pair']:.2f} seeds a pair) | "
          f"{r['decoder_rows_per_image']:.1f} | {r['instances_s_per_image']:.4f} |")
    print(f"instances cost {r['ratio']:.2f}x the semantic pass")


if __name__ == "__main__":
    main()
