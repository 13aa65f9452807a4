"""Measure what one forward pass holds for its backward pass, per image, on the CPU.

Run as a child process with ``MALLOC_MMAP_THRESHOLD_`` set low: glibc then maps every large
block on its own and unmaps it when freed, so the resident set follows the live tensors
(``test_memory_plan`` compares it with ``cdsam plan``'s estimate).
``python tests/activation_probe.py PARAMS_JSON STAGE BATCH CHECKPOINTING(0|1) [AMP(0|1)]``
(AMP: the CPU's bf16 autocast, the frozen weights held in bf16 as the trainer holds them).
"""

import json
import os
import sys

import torch

from cdsam.config.parse import parse_params
from cdsam.config.stages import curriculum_to
from cdsam.models.dino import set_activation_checkpointing
from cdsam.models.model import build_model
from cdsam.runtime import Precision
from cdsam.training.curriculum import apply_plan
from cdsam.training.frozen_weights import hold_for_stage


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


params = parse_params(json.loads(sys.argv[1]))
stage, batch, ck = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
amp = len(sys.argv) > 5 and sys.argv[5] == "1"
torch.manual_seed(0)
model = build_model(params.model, load_weights=False, seed=0)
for plan in curriculum_to(params, stage):
    apply_plan(model, plan)
set_activation_checkpointing(model.dino, ck)
model.train()
precision = Precision(torch.device("cpu"), amp, torch.bfloat16 if amp else None)
hold = hold_for_stage(model, None, precision)
crop = params.data.crop
images = torch.randn(batch, 3, crop, crop)
prompts = [f"prompt {i % 3}" for i in range(batch)]
with precision.autocast():
    out = model(images, prompts)  # warm-up: text cache, allocator
out.masks.float().mean().backward()
del out
model.zero_grad(set_to_none=True)
before = rss()
with precision.autocast():
    out = model(images, prompts)
after = rss()
print(json.dumps({"per_image": (after - before) / batch, "bytes": after - before}))
