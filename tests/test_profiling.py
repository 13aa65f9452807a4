"""cdsam.training.profiling: torch.profiler over steps, summarised per step."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch.profiler import record_function

from cdsam.training.profiling import (
    PHASES,
    TOP_OPS,
    profile_steps,
    profile_table,
    summarize,
    syncs_per_step,
)


def test_a_real_step_is_profiled_into_a_trace_and_a_per_step_summary(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Linear(64, 64)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)

    def step(x: torch.Tensor) -> None:
        opt.zero_grad()
        with record_function(PHASES["forward"]):
            loss = net(x).square().mean()
        with record_function(PHASES["backward"]):
            loss.backward()
        opt.step()

    batches = [torch.randn(32, 64) for _ in range(3)]
    p = profile_steps(step, batches, torch.device("cpu"), tmp_path / "run" / "trace.json")
    trace = json.loads((tmp_path / "run" / "trace.json").read_text())
    assert trace["traceEvents"]
    assert p["clock"] == "cpu" and p["steps"] == 3 and p["launches_per_step"] is None
    assert p["ms_per_step"] > 0 and p["optimizer_ms_per_step"] > 0
    assert p["forward_ms_per_step"] > 0 and p["backward_ms_per_step"] > 0
    assert syncs_per_step(step, batches, torch.device("cpu")) is None  # CUDA only
    ops = [o["op"] for o in p["top_ops"]]
    assert "aten::addmm" in ops or "aten::linear" in ops
    assert 0 < len(ops) <= TOP_OPS
    assert sum(o["share"] for o in p["top_ops"]) <= 1.0 + 1e-9
    assert any("ms/step" in line for line in profile_table("stage1", p))


def test_summary_counts_per_step_and_kernel_launches_on_cuda():
    def ev(key, count, self_us, total_us=0.0):
        return SimpleNamespace(key=key, count=count, self_device_time_total=self_us,
                               self_cpu_time_total=0.0, cpu_time_total=total_us)

    events = [ev("gemm_kernel", 20, 3000.0), ev("elementwise", 200, 1000.0),
              ev("cudaLaunchKernel", 220, 0.0), ev("Optimizer.step#AdamW.step", 2, 0.0, 800.0),
              ev("cdsam.forward", 2, 0.0, 3000.0), ev("cdsam.backward", 2, 0.0, 5000.0)]
    p = summarize(events, steps=2, cuda=True)
    assert p["clock"] == "device" and p["ms_per_step"] == 2.0
    assert p["launches_per_step"] == 110 and p["optimizer_ms_per_step"] == 0.4
    assert p["forward_ms_per_step"] == 1.5 and p["backward_ms_per_step"] == 2.5
    assert [o["op"] for o in p["top_ops"]] == ["gemm_kernel", "elementwise"]
    assert p["top_ops"][0] == {"op": "gemm_kernel", "ms_per_step": 1.5, "calls_per_step": 10,
                               "share": 0.75}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_read_back_counts_as_a_host_wait_on_cuda():
    dev = torch.device("cuda")
    x = torch.ones(8, device=dev)
    assert syncs_per_step(lambda b: (x * b).sum(), [1.0, 2.0], dev) == 0
    assert syncs_per_step(lambda b: float((x * b).sum()), [1.0, 2.0], dev) >= 1
