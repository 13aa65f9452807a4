"""``train.compile``: compiled parts keep the checkpoint layout; a compiler that fails falls
back to eager with one line, and training goes on with the same results."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from cdsam.models.model import build_model
from cdsam.training.bench import split_step_time
from cdsam.training.compiling import compile_parts, is_compiled, uncompile_parts
from cdsam.training.trainer import StagePaths, StageTrainer, TrainerOptions
from tests.conftest import prepare_tiny, tiny_params


def failing_backend(gm, example_inputs):
    """A compiler backend that cannot compile anything (as inductor did on torch 2.11)."""
    raise AssertionError("cannot tile this reduction")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return prepare_tiny(tmp_path_factory.mktemp("data") / "prepared", num_images=8)


def _losses(data_dir: Path, tmp: Path, compile_on: bool, backend
            ) -> tuple[StageTrainer, list[float]]:
    params = tiny_params(device="cpu", optim={"batch_size": 4}, train={"compile": compile_on},
                         stage1={"epochs": 1})
    paths = StagePaths(data=data_dir, out=tmp / "stage1", metrics=tmp / "metrics",
                       resume=tmp / "resume")
    trainer = StageTrainer(params, 1, paths,
                           TrainerOptions(show_progress=False, compile_backend=backend))
    trainer.setup()
    trainer.train()
    return trainer, trainer.step_losses[0]


@pytest.fixture(scope="module")
def eager(data_dir, tmp_path_factory) -> list[float]:
    return _losses(data_dir, tmp_path_factory.mktemp("eager"), False, "inductor")[1]


def test_compile_keeps_checkpoint_keys_and_can_be_undone(params):
    model = build_model(params.model, seed=0)
    keys = list(model.state_dict())
    compile_parts(model)  # lazy: nothing compiles until the first call
    assert list(model.state_dict()) == keys and is_compiled(model)
    assert all(b._compiled_call_impl is not None for b in model.dino.blocks)
    uncompile_parts(model)
    assert not is_compiled(model)


def test_a_failing_compiler_falls_back_to_eager_in_one_line(data_dir, eager, tmp_path,
                                                            caplog):
    with caplog.at_level(logging.WARNING, logger="cdsam"):
        trainer, fell_back = _losses(data_dir, tmp_path / "failed", True, failing_backend)
    lines = [r.getMessage() for r in caplog.records if "train.compile" in r.getMessage()]
    assert len(lines) == 1 and "training uncompiled" in lines[0], lines
    assert f"torch {torch.__version__}" in lines[0] and "cannot tile" in lines[0]
    assert not trainer.compiled and not is_compiled(trainer.model)
    assert fell_back == eager  # the probe step changed nothing: same batches, RNG, weights


def test_a_working_compiler_trains_compiled_with_the_same_losses(data_dir, eager, tmp_path):
    """dynamo's ``eager`` backend: the parts really go through torch.compile's graph capture
    (fast: no code generation), so the probe and the compiled steps run for real."""
    trainer, compiled = _losses(data_dir, tmp_path / "compiled", True, "eager")
    assert trainer.compiled and is_compiled(trainer.model)
    assert compiled == pytest.approx(eager, rel=1e-5)
    # The benchmark times such a trainer's step compiled, then eager, in one run.
    split = split_step_time(trainer, steps=2)
    assert split["step_images_s"] > 0 and split["eager_step_images_s"] > 0
    assert not is_compiled(trainer.model)
