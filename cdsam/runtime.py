"""Where and how a stage runs: device choice, seeds, determinism, mixed precision, memory.

Shared by training and evaluation (so evaluation does not import the training stack).
"""

from __future__ import annotations

import os
import random
import resource
import sys

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


def amp_settings(device: torch.device) -> tuple[bool, torch.dtype | None, bool]:
    """(autocast on?, its dtype, needs GradScaler?)."""
    if device.type != "cuda":
        return False, None, False
    if torch.cuda.is_bf16_supported():
        return True, torch.bfloat16, False
    return True, torch.float16, True


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)
