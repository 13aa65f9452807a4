"""``optim.batch_size: auto``: the batch a device can hold, and the LRs scaled to it.

On CUDA a stage measures what one training step needs before it trains: forward + backward
(no optimizer step, the RNG state restored, gradients dropped) at two small batches, on real
batches of the split and with the stage's feature cache, so the figure is the stage's own
(stage 1 with a cached DINO holds far larger batches than stage 4). Memory is close to linear
in the batch: ``fixed + batch × per_sample``. The chosen batch is the largest power of two
within ``AUTO_MEMORY_SHARE`` of the free memory, less what the probe cannot see: the AdamW
moments the first step will allocate and, under DDP, its gradient buckets (a second copy of every
trainable gradient, allocated when the model is wrapped; under ``CDSAM_PARALLEL=fsdp`` the
moments of this rank's shards and no buckets, while the probe measures the sharded step
itself); capped by ``optim.auto_batch_max`` (1024 by default; at 256 on an H200, ViT-B/14 224²,
stage 4 held 27 of 143 GB) and by the training split. A batch that leaves fewer than
`FEW_STEPS` steps an epoch is kept but said, with the knob that trades batch for steps. Every
DDP rank takes the smallest of the ranks' choices. A resumed run takes the batch its resume state trained with instead of measuring again
(`cdsam.training.resume.ResumeStore.saved_batch`): free memory may differ now, the run must not.

On the CPU a bigger batch buys nothing (the cores are busy at 16), so auto is 16 there.

The LRs in params.yaml are for batch ``REFERENCE_BATCH``; with auto they follow the chosen
batch by ``optim.lr_scaling``: ``sqrt`` (the default: the usual rule for Adam-type optimizers,
×4 at batch 256), ``linear`` (SGD's rule, ×16 at 256: strong for AdamW, keep warmup on), or
``none``. The result is logged and recorded in the stage's metrics.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from cdsam.config.schema import AUTO, OptimConfig
from cdsam.errors import UserError
from cdsam.training.sharding import is_sharded

log = logging.getLogger("cdsam.training.trainer")

REFERENCE_BATCH = 16  # the batch params.yaml's LRs are written for; auto's CPU batch
PROBE_BATCHES = (4, 8)  # the two measured steps
AUTO_MEMORY_SHARE = 0.85  # of the free device memory; the rest is allocator slack
FEW_STEPS = 8  # fewer steps an epoch than this at the chosen batch: say so


@dataclass(frozen=True)
class StepMemory:
    """Bytes one training step allocates beyond what is already held, ``fixed + b × per_sample``."""

    fixed: float
    per_sample: float

    @classmethod
    def fit(cls, batches: tuple[int, int], peaks: tuple[float, float]) -> StepMemory:
        (b0, b1), (m0, m1) = batches, peaks
        per_sample = max((m1 - m0) / (b1 - b0), 1.0)
        return cls(fixed=max(m0 - per_sample * b0, 0.0), per_sample=per_sample)

    def need(self, batch: int) -> float:
        return self.fixed + batch * self.per_sample


def choose_batch(memory: StepMemory, budget: float, cap: int) -> int:
    """The largest power of two ≤ ``cap`` whose step fits ``budget`` bytes (at least 1)."""
    batch = 1
    while batch * 2 <= cap and memory.need(batch * 2) <= budget:
        batch *= 2
    return batch


def scale_lrs(optim: OptimConfig, batch: int, world_size: int = 1,
              per_unit: float = 1.0) -> OptimConfig:
    """``optim`` at a per-rank ``batch``, its LRs (written for an effective batch of
    `REFERENCE_BATCH` samples) scaled by its rule from the samples one optimizer step sees:
    ``batch`` x ``per_unit`` (an image-major batch's prompts an image; 1 for rows) x
    ``grad_accum_steps`` x ``world_size``."""
    ratio = batch * per_unit * optim.grad_accum_steps * world_size / REFERENCE_BATCH
    factor = {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[optim.lr_scaling]
    return dataclasses.replace(optim, batch_size=batch, lr=optim.lr * factor,
                               lora_lr=optim.lora_lr * factor, clip_lr=optim.clip_lr * factor)


def _local_numel(p: torch.Tensor) -> int:
    """Elements this rank holds: its shard of an FSDP2 (DTensor) parameter."""
    return p.to_local().numel() if isinstance(p, DTensor) else p.numel()


def adamw_state_bytes(model: torch.nn.Module) -> int:
    """The two fp32 moments AdamW allocates at its first step, per trainable parameter (per
    shard on this rank when the model is sharded)."""
    return sum(2 * 4 * _local_numel(p) for p in model.parameters() if p.requires_grad)


def ddp_bucket_bytes(model: torch.nn.Module, world_size: int) -> int:
    """DistributedDataParallel's gradient buckets: one more copy of every trainable gradient
    (the parameter's dtype), held for the whole run; nothing without DDP (FSDP2 reduces into
    the gradient shards)."""
    if world_size <= 1 or is_sharded(model):
        return 0
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def auto_budget(free: int, model: torch.nn.Module, world_size: int = 1) -> float:
    """Bytes one training step may take: the usable share of ``free``, less the memory the
    probe's forward + backward does not allocate (AdamW moments, DDP buckets)."""
    return AUTO_MEMORY_SHARE * free - adamw_state_bytes(model) - \
        ddp_bucket_bytes(model, world_size)


def probe_step_memory(step: Callable[[dict[str, Any]], torch.Tensor],
                      make_batch: Callable[[int], dict[str, Any]], model: torch.nn.Module,
                      device: torch.device) -> StepMemory:
    """Peak CUDA memory of forward + backward at `PROBE_BATCHES` (``step`` returns the loss;
    nothing is updated: gradients are dropped, the RNG streams restored)."""
    peaks = []
    with torch.random.fork_rng(devices=[device]):
        for batch_size in PROBE_BATCHES:
            batch = make_batch(batch_size)
            for p in model.parameters():
                p.grad = None
            torch.cuda.synchronize(device)
            held = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            try:
                step(batch).backward()
            except torch.cuda.OutOfMemoryError as e:
                raise UserError(f"optim.batch_size: auto: a batch of {batch_size} does not fit "
                                f"on {device}; set a number (and lower data.crop or use "
                                f"optim.grad_accum_steps)") from e
            torch.cuda.synchronize(device)
            peaks.append(float(torch.cuda.max_memory_allocated(device) - held))
            del batch
    for p in model.parameters():
        p.grad = None
    torch.cuda.empty_cache()
    return StepMemory.fit(PROBE_BATCHES, (peaks[0], peaks[1]))


def resolve_auto_batch(optim: OptimConfig, device: torch.device, train_samples: int,
                       probe: Callable[[], StepMemory], model: torch.nn.Module,
                       agree: Callable[[int], int] = lambda b: b, world_size: int = 1,
                       per_unit: float = 1.0) -> OptimConfig:
    """``optim`` with ``batch_size: auto`` replaced by a number (unchanged when it is one).

    ``probe`` measures the step on CUDA; ``agree`` makes the ranks of a DDP run settle on one
    batch (the smallest). ``per_unit``: samples a batch unit brings (image-major batches
    count images, each with its prompts; ``train_samples`` then counts images too)."""
    if optim.batch_size != AUTO:
        return optim
    cap = max(1, min(optim.auto_batch_max, train_samples))
    if device.type != "cuda":
        if per_unit == 1.0:
            batch = min(REFERENCE_BATCH, 2 ** int(math.log2(cap)))
        else:  # about REFERENCE_BATCH samples
            batch = min(cap, max(1, round(REFERENCE_BATCH / per_unit)))
        why = f"{device.type}: the cores are busy at {REFERENCE_BATCH} samples"
    else:
        memory = probe()
        free, total = torch.cuda.mem_get_info(device)
        budget = auto_budget(free, model, world_size)
        batch = choose_batch(memory, budget, cap)
        why = (f"a step needs {memory.fixed / 2**20:.0f} MB + {memory.per_sample / 2**20:.1f} "
               f"MB per sample; {free / 2**30:.1f} of {total / 2**30:.1f} GiB free, "
               f"{AUTO_MEMORY_SHARE:.0%} of it usable, cap {cap}")
    batch = agree(batch)
    scaled = scale_lrs(optim, batch, world_size, per_unit)
    steps = math.ceil(train_samples / batch)
    log.info("optim.batch_size auto -> %d%s (%s); %d steps an epoch; lr %.3g, lora_lr %.3g (%s "
             "scaling of the effective batch %.0f samples from %d, optim.lr_scaling)", batch,
             "" if per_unit == 1.0 else f" images ({per_unit:.1f} prompts each)", why, steps,
             scaled.lr, scaled.lora_lr, optim.lr_scaling,
             batch * per_unit * optim.grad_accum_steps * world_size, REFERENCE_BATCH)
    if steps < FEW_STEPS:
        log.warning("optim.batch_size auto -> %d leaves %d steps an epoch (%d samples): lower "
                    "optim.auto_batch_max for more, smaller steps", batch, steps, train_samples)
    return scaled
