"""torchrun / DistributedDataParallel plumbing: one process per GPU (or per CPU share).

A stage launched by ``torchrun`` sees ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; it joins a
process group (NCCL on CUDA, gloo on the CPU), wraps the trainable model in DDP and lets rank 0
alone write checkpoints, metrics and logs. ``CDSAM_NPROC=N`` makes a plain ``python
stages/train.py`` relaunch itself under torchrun, so DVC runs any stage on N devices without a
``dvc.yaml`` change (an environment variable does not invalidate the stage).
``CDSAM_PARALLEL=fsdp`` shards the model with FSDP2 instead of replicating it
(`cdsam.training.sharding`): less memory a rank, the same result; ``ddp`` is the default.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cdsam.errors import UserError
from cdsam.runtime import usable_cores

log = logging.getLogger("cdsam.dist")

PARALLEL_MODES = ("ddp", "fsdp")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    parallel: str = "ddp"  # CDSAM_PARALLEL: how ranks hold the model (see the module doc)

    @property
    def sharded(self) -> bool:
        return self.enabled and self.parallel == "fsdp"

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info() -> DistInfo:
    """What torchrun told this process (a plain launch is rank 0 of 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return DistInfo(rank=int(os.environ.get("RANK", "0")), world_size=world,
                    local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                    local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))),
                    parallel=parallel_mode())


def parallel_mode() -> str:
    """``CDSAM_PARALLEL`` (``ddp`` when unset); anything else is a clear error."""
    mode = os.environ.get("CDSAM_PARALLEL", "").strip().lower() or "ddp"
    if mode not in PARALLEL_MODES:
        raise UserError(f"CDSAM_PARALLEL: expected one of {', '.join(PARALLEL_MODES)}, got "
                        f"{os.environ['CDSAM_PARALLEL']!r}")
    return mode


def init(info: DistInfo, device: torch.device) -> torch.device:
    """Join the process group; returns this rank's device (``cuda:LOCAL_RANK`` on GPUs)."""
    if not info.enabled:
        return device  # one process: torch's own thread count stays
    if device.type == "cpu":
        # Ranks share the cores: each gets its share (torchrun's OMP_NUM_THREADS=1 default
        # would idle most cores; all threads per rank starve each other, 40x slower on 2 cores).
        torch.set_num_threads(max(1, usable_cores() // info.local_world_size))
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                rank=info.rank, world_size=info.world_size)
    return device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum floats over ranks (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_min(value: int, device: torch.device) -> int:
    """The smallest of one integer over ranks (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def relaunch_command(argv: list[str]) -> list[str] | None:
    """The torchrun command that ``CDSAM_NPROC`` / ``CDSAM_TORCHRUN`` ask for, if any.

    ``CDSAM_NPROC=N``: single node, N processes (``--standalone``). ``CDSAM_TORCHRUN``: the
    torchrun flags verbatim, for multi-node rendezvous (``--nnodes``, ``--node-rank``,
    ``--rdzv-backend``, ``--rdzv-endpoint``, ``--nproc-per-node``).
    """
    if "RANK" in os.environ or os.environ.get("CDSAM_NO_RELAUNCH"):
        return None  # already under torchrun
    parallel_mode()  # a bad CDSAM_PARALLEL stops here, not once per rank
    flags = os.environ.get("CDSAM_TORCHRUN", "").strip()
    nproc = os.environ.get("CDSAM_NPROC", "").strip()
    if not flags and (not nproc or nproc == "1"):
        return None
    if not flags:
        if not nproc.isdigit() or int(nproc) < 1:
            raise UserError(f"CDSAM_NPROC: expected a positive integer, got {nproc!r}")
        flags = f"--standalone --nproc-per-node={nproc}"
    return [sys.executable, "-m", "torch.distributed.run", *shlex.split(flags), *argv]
