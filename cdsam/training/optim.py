"""The stage's optimizer and LR schedule: AdamW over the curriculum's parameter groups, linear
warmup then cosine decay over the run's optimizer steps."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from cdsam.config.schema import OptimConfig
from cdsam.training.curriculum import param_groups


def lr_lambda(total_steps: int, warmup: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warmup, then cosine decay to ``min_ratio`` of the base LR."""

    def fn(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        progress = min(max(progress, 0.0), 1.0)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def build_optimizer(model: nn.Module, optim: OptimConfig, device: torch.device
                    ) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (base and LoRA groups); fused on CUDA."""
    groups = param_groups(model, optim)
    if device.type == "cuda":
        return torch.optim.AdamW(groups, fused=True)
    return torch.optim.AdamW(groups)


def optimizer_steps(batches_per_epoch: int, optim: OptimConfig, epochs: int) -> int:
    """Optimizer steps in a run (the last accumulation window of an epoch steps too)."""
    return math.ceil(batches_per_epoch / optim.grad_accum_steps) * epochs


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig, total_steps: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, optim.warmup_steps, optim.min_lr_ratio))
