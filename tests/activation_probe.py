"""Measure what one forward pass holds for its backward pass, per image, on the CPU.

Run as a child process with ``MALLOC_MMAP_THRESHOLD_`` set low: glibc then maps every large
block on its own and unmaps it when freed, so the resident set follows the live tensors
(``test_memory_plan`` compares it with ``cdsam plan``'s estimate).
``python tests/activation_probe.py PARAMS_JSON STAGE BATCH CHECKPOINTING(0|1)``
"""

import json
import os
import sys

import torch

from cdsam.config.parse import parse_params
from cdsam.config.stages import curriculum_to
from cdsam.models.dino import set_activation_checkpointing
from cdsam.models.model import build_model
from cdsam.training.curriculum import apply_plan


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


params = parse_params(json.loads(sys.argv[1]))
stage, batch, ck = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
torch.manual_seed(0)
model = build_model(params.model, load_weights=False, seed=0)
for plan in curriculum_to(params, stage):
    apply_plan(model, plan)
set_activation_checkpointing(model.dino, ck)
model.train()
crop = params.data.crop
images = torch.randn(batch, 3, crop, crop)
prompts = [f"prompt {i % 3}" for i in range(batch)]
out = model(images, prompts)  # warm-up: text cache, allocator
out.masks.float().mean().backward()
del out
model.zero_grad(set_to_none=True)
before = rss()
out = model(images, prompts)
after = rss()
print(json.dumps({"per_image": (after - before) / batch}))
