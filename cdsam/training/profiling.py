"""Where a training step's time goes, op by op: ``torch.profiler`` over staged steps.

`cdsam.training.bench --profile DIR` calls :func:`profile_steps` for each run: a Chrome trace per run
(open it in chrome://tracing or https://ui.perfetto.dev) and a summary — per step, the time
and call count of the ops that take the most of it (device time on CUDA, CPU time otherwise),
the kernel launches (CUDA), and the host time of each phase: forward and backward (the
trainer labels them, `PHASES`) and the optimizer (torch labels ``Optimizer.step``). A
launch-bound step shows many launches of kernels that each take microseconds, and phases whose
host time is as long as the step. :func:`syncs_per_step` counts the step's host waits on CUDA;
:class:`CastCounter` the casts autocast makes (each a kernel on a GPU), on any device.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

TOP_OPS = 12
# The runtime calls that put one kernel on the GPU (the names differ across CUDA versions).
LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
# record_function labels of a training step's phases (`cdsam.training.trainer.StageTrainer.train_step`).
PHASES = {"forward": "cdsam.forward", "backward": "cdsam.backward"}


def profile_steps(step: Callable[[Any], object], batches: Sequence[Any], device: torch.device,
                  trace: Path) -> dict[str, Any]:
    """Run ``step`` once per batch under the profiler; write the trace to ``trace``."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for batch in batches:
            step(batch)
        if cuda:
            torch.cuda.synchronize(device)
    trace.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(trace))
    return summarize(prof.key_averages(), len(batches), cuda) | {"trace": str(trace)}


def _time_us(event: Any, cuda: bool) -> float:
    return float(event.self_device_time_total if cuda else event.self_cpu_time_total)


def summarize(events: Sequence[Any], steps: int, cuda: bool) -> dict[str, Any]:
    """Per-step figures from ``key_averages()`` rows (anything with ``key``, ``count`` and
    the self-time totals in microseconds)."""
    timed = [e for e in events if _time_us(e, cuda) > 0]
    total_us = sum(_time_us(e, cuda) for e in timed)
    top = sorted(timed, key=lambda e: _time_us(e, cuda), reverse=True)[:TOP_OPS]
    optimizer = [e for e in events if e.key.startswith("Optimizer.step")]
    phases = {name: sum(e.cpu_time_total for e in events if e.key == label) / 1000 / steps
              for name, label in PHASES.items()}
    return {
        "clock": "device" if cuda else "cpu",
        "steps": steps,
        "ms_per_step": total_us / 1000 / steps,
        "optimizer_ms_per_step": sum(e.cpu_time_total for e in optimizer) / 1000 / steps,
        **{f"{name}_ms_per_step": ms for name, ms in phases.items()},
        "launches_per_step": (sum(e.count for e in events if e.key in LAUNCH_CALLS) / steps
                              if cuda else None),
        "top_ops": [{"op": e.key, "ms_per_step": _time_us(e, cuda) / 1000 / steps,
                     "calls_per_step": e.count / steps,
                     "share": _time_us(e, cuda) / total_us if total_us else 0.0} for e in top],
    }


def profile_table(key: str, p: dict[str, Any], syncs_per_step: float | None = None
                  ) -> list[str]:
    """The summary as text lines, for `cdsam.training.bench`'s table (``syncs_per_step``: the run's
    host waits, CUDA only)."""
    launches = "-" if p["launches_per_step"] is None else f"{p['launches_per_step']:.0f}"
    syncs = "-" if syncs_per_step is None else f"{syncs_per_step:.1f}"
    lines = [f"{key}: {p['ms_per_step']:.2f} ms {p['clock']} time per step over {p['steps']} "
             f"steps; host ms per step: forward {p['forward_ms_per_step']:.2f}, backward "
             f"{p['backward_ms_per_step']:.2f}, optimizer {p['optimizer_ms_per_step']:.2f}; "
             f"kernel launches {launches}, host waits {syncs} per step; trace {p['trace']}",
             f"  {'op':<48}{'ms/step':>9}{'calls':>7}{'share':>7}"]
    for op in p["top_ops"]:
        lines.append(f"  {op['op'][:47]:<48}{op['ms_per_step']:>9.3f}"
                     f"{op['calls_per_step']:>7.0f}{100 * op['share']:>6.1f}%")
    return lines


def syncs_per_step(step: Callable[[Any], object], batches: Sequence[Any],
                   device: torch.device) -> float | None:
    """How often a step makes the host wait for the device (CUDA's synchronising calls, as
    ``torch.cuda.set_sync_debug_mode`` reports them), per step; None off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for batch in batches:
                step(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    waits = [w for w in caught if "synchroniz" in str(w.message)]
    return len(waits) / len(batches)


class CastCounter(TorchDispatchMode):
    """Counts the copies that cast a tensor to ``dtype`` while active: under autocast, its
    weight and input casts. CPU autocast casts by the same rule as CUDA's, so the count taken on
    a CPU is the GPU's cast kernels (`cdsam.training.frozen_weights`, ``tools/cast_count.py``)."""

    def __init__(self, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.dtype = dtype
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == self.dtype:
            self.count += 1
        return func(*args, **kwargs)
