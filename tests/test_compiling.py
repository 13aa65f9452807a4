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


def _set_up(data_dir: Path, tmp: Path, compile_on: bool, backend) -> StageTrainer:
    params = tiny_params(device="cpu", optim={"batch_size": 4}, train={"compile": compile_on},
                         stage1={"epochs": 1})
    paths = StagePaths(data=data_dir, out=tmp / "stage1", metrics=tmp / "metrics",
                       resume=tmp / "resume")
    trainer = StageTrainer(params, 1, paths,
                           TrainerOptions(show_progress=False, compile_backend=backend))
    trainer.setup()
    return trainer


def _losses(data_dir: Path, tmp: Path, compile_on: bool, backend
            ) -> tuple[StageTrainer, list[float]]:
    trainer = _set_up(data_dir, tmp, compile_on, backend)
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


class FailsAfterSetup:
    """A backend that compiles (dynamo's graph as it is) until told to fail: a compiler that
    handled the probe batch and breaks on a later shape."""

    def __init__(self) -> None:
        self.fail = False
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        if self.fail:
            raise AssertionError("cannot tile this reduction")
        return gm.forward


def test_a_compiler_that_fails_after_setup_falls_back_once(data_dir, eager, tmp_path, caplog,
                                                           capfd):
    backend = FailsAfterSetup()
    trainer = _set_up(data_dir, tmp_path, True, backend)
    assert trainer.compiled
    at_setup = backend.graphs
    backend.fail = True
    with caplog.at_level(logging.WARNING, logger="cdsam"):
        trainer.train()
    assert backend.graphs == at_setup + 1  # later shapes did recompile; the first one failed
    lines = [r.getMessage() for r in caplog.records if "train.compile" in r.getMessage()]
    assert len(lines) == 1 and "training uncompiled" in lines[0], lines
    assert "Traceback" not in capfd.readouterr().err
    assert not trainer.compiled
    assert trainer.step_losses[0] == pytest.approx(eager, rel=1e-5)


def _ddp_compile_worker(rank: int, world: int, port: int, data_dir: str, out: str) -> None:
    import os

    from safetensors.torch import save_file
    from torch._dynamo.backends.common import aot_autograd

    from cdsam import distributed
    from cdsam.distributed import DistInfo

    def failing_backward(gm, example_inputs):
        raise AssertionError("cannot compile the backward")

    backend = aot_autograd(fw_compiler=lambda gm, _: gm.forward, bw_compiler=failing_backward)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    params = tiny_params(device="cpu", optim={"batch_size": 2, "warmup_steps": 1},
                         train={"compile": True}, stage1={"epochs": 1})
    root = Path(out) / f"rank{rank}"
    paths = StagePaths(data=Path(data_dir), out=root / "stage1", metrics=root / "metrics",
                       resume=root / "resume")
    trainer = StageTrainer(params, 1, paths, TrainerOptions(show_progress=False,
                                                            compile_backend=backend),
                           DistInfo(rank, world, rank, world))
    try:
        trainer.setup()
        trainer.train()
        assert not trainer.compiled
        save_file(trainer.trainable_state(), str(Path(out) / f"rank{rank}.safetensors"))
    finally:
        distributed.shutdown()


def test_a_backward_that_fails_to_compile_leaves_ddp_training(data_dir, tmp_path):
    """The backward compiles with the forward, inside the guarded call, and the probe runs
    before DDP wraps the model: both ranks fall back and train in step."""
    import socket

    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ddp_compile_worker, args=(2, port, str(data_dir), str(tmp_path)),
                       nprocs=2, join=True, start_method="spawn")
    r0 = load_file(str(tmp_path / "rank0.safetensors"))
    r1 = load_file(str(tmp_path / "rank1.safetensors"))
    assert r0 and all(torch.equal(r0[k], r1[k]) for k in r0)


def oom_backend(gm, example_inputs):
    """A backend whose graph compiles but runs out of device memory when called."""
    def run(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return run


def test_an_out_of_memory_in_a_compiled_call_is_raised_not_rerun_eagerly(params):
    """An OOM is the batch's, not the compiler's: the guard must not hide it by rerunning the
    call eagerly (optim.batch_size: auto searches by it; dropout would be drawn twice)."""
    model = build_model(params.model, seed=0)
    compile_parts(model, backend=oom_backend)
    block = model.dino.blocks[0]
    x = torch.zeros(1, 4, model.dino.embed_dim)
    with pytest.raises(torch.OutOfMemoryError):
        block(x)
    assert is_compiled(model)  # not sent back to eager
    uncompile_parts(model)
