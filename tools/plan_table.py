"""The `cdsam plan` table of docs/benchmarks.md: stage 4 of real DINO sizes on 80 GB GPUs.

``python tools/plan_table.py [--gpu-memory 80GB] [--gpus 8]`` prints a markdown table: for each
DINOv2 / DINOv3 size and input side, the trainable parameters, the per-rank bytes held before
activations, activations per image without and with checkpointing, and the largest batch on
one GPU under DDP and on ``--gpus`` under FSDP2 (random init on the meta device: nothing is
allocated; the embedded default's text tower and SAM decoder, bf16 AMP).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cdsam.checkout import require_checkout

require_checkout(__file__)

from cdsam.config.parse import parse_params
from cdsam.training.memory_plan import parse_bytes, plan_memory

MODELS = [("DINOv2 ViT-S/14", "vit_small_patch14_dinov2"),
          ("DINOv2 ViT-B/14", "vit_base_patch14_dinov2"),
          ("DINOv2 ViT-L/14", "vit_large_patch14_dinov2"),
          ("DINOv2 ViT-g/14", "vit_giant_patch14_dinov2"),
          ("DINOv3 ViT-S/16", "vit_small_patch16_dinov3"),
          ("DINOv3 ViT-B/16", "vit_base_patch16_dinov3"),
          ("DINOv3 ViT-L/16", "vit_large_patch16_dinov3"),
          ("DINOv3 ViT-H+/16", "vit_huge_plus_patch16_dinov3"),
          ("DINOv3 ViT-7B/16", "vit_7b_patch16_dinov3")]
SIDES = (224, 448, 518)


def side_for(name: str, side: int) -> int:
    """``side``, or the nearest multiple of the patch below it (518 is 37 × 14, not × 16)."""
    patch = 14 if "patch14" in name else 16
    return side - side % patch


def rows(gpu_memory: int, gpus: int) -> list[str]:
    gib = 2**30
    out = ["| DINO | side | stage-4 trainable | held / rank, DDP | act / image | "
           "with ckpt | max batch, 1 GPU DDP | with ckpt | max batch, "
           f"{gpus} GPUs FSDP2, ckpt |",
           "|---|---|---|---|---|---|---|---|---|"]
    for label, name in MODELS:
        for want in SIDES:
            side = side_for(name, want)
            p = parse_params({"model": {"dino": {"name": name, "img_size": side}},
                              "data": {"resize": side, "crop": side}})
            p = dataclasses.replace(p, stage4=dataclasses.replace(p.stage4, epochs=1))
            m = plan_memory(p, 4)
            act, ckpt = m.activations["plain"], m.activations["checkpointed"]
            out.append(f"| {label} | {side} | {m.trainable_params / 1e6:,.0f} M | "
                       f"{m.fixed('ddp', 1) / gib:.1f} GiB | {act / gib:.2f} GiB | "
                       f"{ckpt / gib:.3f} GiB | {m.max_batch('ddp', 1, gpu_memory, False)} | "
                       f"{m.max_batch('ddp', 1, gpu_memory, True)} | "
                       f"{m.max_batch('fsdp', gpus, gpu_memory, True)} |")
            print(out[-1], file=sys.stderr, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu-memory", default="80GB")
    ap.add_argument("--gpus", type=int, default=8)
    args = ap.parse_args()
    print("\n".join(rows(parse_bytes(args.gpu_memory), args.gpus)))


if __name__ == "__main__":
    main()
