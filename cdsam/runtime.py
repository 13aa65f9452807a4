"""Where and how a stage runs: device choice, seeds, determinism, mixed precision, memory.

Shared by training and evaluation (so evaluation does not import the training stack).
"""

from __future__ import annotations

import os
import random
import resource
import sys
from dataclasses import dataclass

import numpy as np
import torch

from cdsam.errors import UserError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device: {name!r} asked for, but CUDA is not available here")
    return torch.device(name)


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS tells it, as under taskset
    or a container's cpuset), not the machine's count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_determinism(device: torch.device) -> None:
    if device.type == "cuda":
        # Speed first on GPUs: TF32 matmuls and cuDNN autotuning.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    else:
        torch.use_deterministic_algorithms(True)


@dataclass(frozen=True)
class Precision:
    """How a run computes: autocast on or off, its dtype, whether the loss needs a GradScaler.
    Decided once per run (:func:`precision_for`) and handed to everything that runs the model,
    so the training step, validation and the held frozen weights agree."""

    device: torch.device
    amp: bool = False
    dtype: torch.dtype | None = None
    needs_scaler: bool = False

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.amp)


def precision_for(device: torch.device) -> Precision:
    """CUDA: bf16 autocast where supported, else fp16 with a GradScaler; elsewhere fp32."""
    if device.type != "cuda":
        return Precision(device)
    if torch.cuda.is_bf16_supported():
        return Precision(device, True, torch.bfloat16)
    return Precision(device, True, torch.float16, needs_scaler=True)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)
