"""``optim.batch_size: auto``: the choice from measured step memory, the LR scaling, the CPU
resolution, and (on a CUDA machine) the measured choice in a real stage."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch

from cdsam.config.schema import OptimConfig
from cdsam.training.batch_size import (
    AUTO_MEMORY_SHARE,
    REFERENCE_BATCH,
    StepMemory,
    adamw_state_bytes,
    auto_budget,
    choose_batch,
    resolve_auto_batch,
    scale_lrs,
)
from cdsam.training.trainer import StagePaths, StageTrainer, TrainerOptions
from tests.conftest import tiny_params
from tests.test_train import data_dir  # noqa: F401  (the small prepared set)

MB = 2**20


def test_step_memory_is_fitted_from_two_batches():
    m = StepMemory.fit((4, 8), (140 * MB, 220 * MB))
    assert m.per_sample == pytest.approx(20 * MB) and m.fixed == pytest.approx(60 * MB)
    assert m.need(32) == pytest.approx(700 * MB)


def test_choose_batch_is_the_largest_power_of_two_that_fits():
    m = StepMemory(fixed=100 * MB, per_sample=10 * MB)
    assert choose_batch(m, budget=100 * MB + 10 * MB * 64, cap=256) == 64  # exactly fits
    assert choose_batch(m, budget=100 * MB + 10 * MB * 64 - 1, cap=256) == 32
    assert choose_batch(m, budget=1e15, cap=256) == 256  # the cap
    assert choose_batch(m, budget=1e15, cap=100) == 64  # a power of two under the cap
    assert choose_batch(m, budget=0, cap=256) == 1  # never below one


@pytest.mark.parametrize("rule, factor", [("linear", 8.0), ("sqrt", math.sqrt(8)), ("none", 1)])
def test_lrs_scale_from_the_reference_batch(rule, factor):
    optim = OptimConfig(batch_size="auto", lr=1e-3, lora_lr=2e-3, lr_scaling=rule)
    scaled = scale_lrs(optim, 8 * REFERENCE_BATCH)
    assert scaled.batch_size == 8 * REFERENCE_BATCH
    assert scaled.lr == pytest.approx(1e-3 * factor)
    assert scaled.lora_lr == pytest.approx(2e-3 * factor)
    assert scaled.wd == optim.wd


def test_lrs_scale_with_the_effective_batch():
    """Accumulation and the ranks multiply the batch one optimizer step sees."""
    optim = OptimConfig(batch_size="auto", lr=1e-3, lora_lr=2e-3, lr_scaling="linear",
                        grad_accum_steps=2)
    scaled = scale_lrs(optim, REFERENCE_BATCH, world_size=4)
    assert scaled.batch_size == REFERENCE_BATCH
    assert scaled.lr == pytest.approx(1e-3 * 8) and scaled.lora_lr == pytest.approx(2e-3 * 8)


def _never(*_):
    raise AssertionError("the CPU does not probe")


def test_cpu_auto_is_the_reference_batch_and_numbers_pass_through(caplog):
    model = torch.nn.Linear(2, 2)
    cpu = torch.device("cpu")
    fixed = OptimConfig(batch_size=12)
    assert resolve_auto_batch(fixed, cpu, 1000, _never, model) is fixed
    with caplog.at_level(logging.INFO, logger="cdsam"):
        auto = resolve_auto_batch(OptimConfig(batch_size="auto", lr=1e-3), cpu, 1000, _never,
                                  model)
    assert auto.batch_size == REFERENCE_BATCH and auto.lr == pytest.approx(1e-3)
    assert "optim.batch_size auto -> 16" in caplog.text and "63 steps an epoch" in caplog.text
    assert "lower optim.auto_batch_max" not in caplog.text
    # A split smaller than that: a power of two that it fills; the ranks' agreement applies.
    with caplog.at_level(logging.INFO, logger="cdsam"):
        small = resolve_auto_batch(OptimConfig(batch_size="auto"), cpu, 11, _never, model)
    assert small.batch_size == 8
    assert "leaves 2 steps an epoch (11 samples): lower optim.auto_batch_max" in caplog.text
    agreed = resolve_auto_batch(OptimConfig(batch_size="auto"), cpu, 1000, _never, model,
                                agree=lambda b: 4)
    assert agreed.batch_size == 4


def _trained(device: str, data: Path, tmp: Path) -> StageTrainer:
    p = tiny_params(device=device, optim={"batch_size": "auto", "warmup_steps": 1},
                    stage1={"epochs": 1})
    paths = StagePaths(data=data, out=tmp / "stage1", metrics=tmp / "metrics",
                       parent=None, resume=tmp / "resume")
    t = StageTrainer(p, 1, paths, TrainerOptions(show_progress=False))
    t.setup()
    t.train()
    return t


def test_a_stage_with_auto_trains_at_the_resolved_batch(data_dir, tmp_path):  # noqa: F811
    t = _trained("cpu", data_dir, tmp_path)
    n = len(t.train_set)
    assert t.optim_cfg.batch_size == min(REFERENCE_BATCH, 2 ** int(math.log2(n)))
    assert len(t.step_losses[0]) == math.ceil(n / t.optim_cfg.batch_size)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the memory probe needs CUDA")
def test_cuda_auto_measures_a_batch_and_trains_at_it(data_dir, tmp_path):  # noqa: F811
    t = _trained("cuda", data_dir, tmp_path)
    n = len(t.train_set)
    assert 1 <= t.optim_cfg.batch_size <= n
    assert len(t.step_losses[0]) == math.ceil(n / t.optim_cfg.batch_size)


def test_the_budget_leaves_room_for_adamw_and_ddp_buckets():
    model = torch.nn.Sequential(torch.nn.Linear(100, 100), torch.nn.Linear(100, 10))
    model[1].requires_grad_(False)  # frozen: no moments, no bucket
    trainable = 100 * 100 + 100
    free = 10 * MB
    assert adamw_state_bytes(model) == 8 * trainable
    assert auto_budget(free, model) == pytest.approx(AUTO_MEMORY_SHARE * free - 8 * trainable)
    # DDP keeps a bucket copy of every trainable gradient (fp32 here) on each rank
    assert auto_budget(free, model, world_size=2) == pytest.approx(
        AUTO_MEMORY_SHARE * free - 8 * trainable - 4 * trainable)


def test_a_resumed_auto_stage_keeps_the_batch_its_state_trained_with(
        data_dir, tmp_path, monkeypatch, caplog):  # noqa: F811
    """A resume on a device where auto would now pick another batch continues the same run."""
    def as_if_a_gpu_chose_8(optim, *args, **kwargs):
        return scale_lrs(optim, 8)

    p = tiny_params(device="cpu", optim={"batch_size": "auto", "warmup_steps": 1},
                    stage1={"epochs": 2})

    def trainer(root: Path, resolve=resolve_auto_batch) -> StageTrainer:
        paths = StagePaths(data=data_dir, out=root / "stage1", metrics=root / "metrics",
                           parent=None, resume=root / "resume")
        return StageTrainer(p, 1, paths, TrainerOptions(show_progress=False,
                                                        resolve_batch=resolve))

    straight = trainer(tmp_path / "a", as_if_a_gpu_chose_8)
    straight.setup()
    straight.train()
    first = trainer(tmp_path / "b", as_if_a_gpu_chose_8)
    first.setup()
    first.train(stop_after=1)  # killed after epoch 1
    resumed = trainer(tmp_path / "b")  # auto here (the CPU) would pick 16
    with caplog.at_level(logging.INFO, logger="cdsam"):
        resumed.setup()
        resumed.train()
    assert "resuming stage1 from epoch 1/2" in caplog.text
    assert "optim.batch_size auto -> 8, the batch of the resume state" in caplog.text
    assert resumed.optim_cfg == straight.optim_cfg
    for a, b in zip(resumed.model.parameters(), straight.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
