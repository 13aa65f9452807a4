"""Autocast's bf16 casts per training step, frozen weights in fp32 vs held in bf16.

Each cast is a kernel launch on a GPU; CPU autocast casts by the same rule as CUDA's, so this
counts them on any machine (`cdsam.training.frozen_weights`, docs/benchmarks.md). Per stage it builds
the model of a bench preset (random init), applies the stage's curriculum, and runs one
forward + backward under bf16 autocast on a random batch with one text prompt, the whole DINO
(no feature cache), once as autocast leaves the frozen weights and once with them held:

    python tools/cast_count.py --preset vitb14-224 --batch 2

Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from pathlib import Path

import torch

# This checkout's cdsam (the code beside the tool), not whichever one is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cdsam.checkout import require_checkout

require_checkout(__file__)

from cdsam.config.parse import load_params
from cdsam.models.model import CDSAM, build_model
from cdsam.training.bench import PRESETS
from cdsam.training.curriculum import apply_stage
from cdsam.training.frozen_weights import hold_frozen
from cdsam.training.profiling import CastCounter


def count_casts(model: CDSAM, images: torch.Tensor) -> int:
    model.clip_text(["x"])  # text features are computed once per run, not per step
    with CastCounter(torch.bfloat16) as casts, torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images, ["x"] * images.shape[0])
        out.masks.float().mean().backward()
    return casts.count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="vitb14-224")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3, 4])
    args = ap.parse_args()
    p = load_params(args.params)
    pre = PRESETS[args.preset]
    cfg = dataclasses.replace(p.model, dino=dataclasses.replace(p.model.dino,
                                                                **pre.get("dino", {})))
    base = build_model(cfg, load_weights=False, seed=0)
    size = base.dino.patch_embed.img_size
    images = torch.randn(args.batch, 3, *size)
    print("| stage | casts, fp32 frozen | casts, held | tensors held | MB saved |\n"
          "|---|---|---|---|---|")
    for stage in args.stages:
        counts = []
        for hold in (False, True):
            model = copy.deepcopy(base)
            apply_stage(model, stage, p.lora.sam, p.lora.dino if stage in (2, 3) else None)
            model.train()
            held = None
            if hold:  # the parts a step runs, as the trainer picks them
                held = hold_frozen([m for n, m in model.named_children() if n != "clip_text"],
                                   torch.bfloat16)
            counts.append(count_casts(model, images))
        print(f"| {stage} | {counts[0]} | {counts[1]} | {len(held.held)} | "
              f"{held.nbytes_saved / 1e6:.0f} |")


if __name__ == "__main__":
    main()
