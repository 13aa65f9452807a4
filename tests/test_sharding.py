"""FSDP2 under torchrun-like ranks on gloo (CPU): gradients, stage-4 results against DDP, and a
killed (SIGKILL) run resumed bit-exactly."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from cdsam.distributed import DistInfo
from cdsam.training.batch_size import adamw_state_bytes, ddp_bucket_bytes
from cdsam.training.trainer import EpochHooks
from tests.conftest import prepare_tiny
from tests.test_train import _free_port, _params, _stage3_checkpoint, _trainer

WORLD = 2


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return prepare_tiny(tmp_path_factory.mktemp("data") / "prepared")


@pytest.fixture(scope="module")
def stage3(tmp_path_factory) -> Path:
    return _stage3_checkpoint(_params(), tmp_path_factory.mktemp("s3") / "stage3")


def _join(rank: int, port: int) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "RANK": str(rank), "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(rank)})


def _stage4_params(epochs: int = 2):
    return _params(optim={"batch_size": 2, "warmup_steps": 1},
                   stage4={"epochs": epochs, "select": "best"})


def _grad_worker(rank: int, port: int, data_dir: str, parent: str, out: str) -> None:
    """The same batch on both ranks: the averaged sharded gradient is the one-process one."""
    _join(rank, port)
    from cdsam import distributed

    p = _stage4_params()
    tmp = Path(out)
    try:
        ref = _trainer(p, 4, Path(data_dir), tmp / f"ref{rank}", parent=Path(parent))
        ref.setup()
        batch = next(iter(ref.train_loader))
        ref.train_mode()
        torch.manual_seed(0)
        ref_loss = ref.compute_loss(batch)[0]
        ref_loss.backward()
        want = {n: q.grad for n, q in ref.model.named_parameters() if q.grad is not None}

        t = _trainer(p, 4, Path(data_dir), tmp / f"fsdp{rank}", parent=Path(parent),
                     dist=DistInfo(rank, WORLD, rank, WORLD, "fsdp"))
        t.setup()
        t.train_mode()
        torch.manual_seed(0)
        loss = t.compute_loss(batch)[0]
        loss.backward()
        worst, names = 0.0, []
        for n, q in t.model.named_parameters():
            if q.grad is None:
                continue
            g = q.grad.full_tensor()
            names.append(n)
            worst = max(worst, float((g - want[n]).abs().max() / (want[n].abs().max() + 1e-12)))
        if rank == 0:
            (tmp / "grads.json").write_text(json.dumps({
                "loss": [float(ref_loss), float(loss)], "worst_rel": worst, "names": names,
                "want": sorted(want), "sharded": type(t.model).__name__,
                # optim.batch_size: auto's accounting of what the probe does not see
                "adamw": [adamw_state_bytes(ref.model), adamw_state_bytes(t.model)],
                "buckets": [ddp_bucket_bytes(ref.model, WORLD),
                            ddp_bucket_bytes(t.model, WORLD)]}))
    finally:
        distributed.shutdown()


def test_fsdp_gradients_equal_one_process(data_dir, stage3, tmp_path):
    mp.start_processes(_grad_worker, args=(_free_port(), str(data_dir), str(stage3),
                                           str(tmp_path)),
                       nprocs=WORLD, join=True, start_method="spawn")
    got = json.loads((tmp_path / "grads.json").read_text())
    assert got["sharded"].startswith("FSDP")  # fully_shard swapped the class: really sharded
    assert sorted(got["names"]) == got["want"] and len(got["names"]) > 10
    assert abs(got["loss"][0] - got["loss"][1]) < 1e-5
    assert got["worst_rel"] < 1e-4, got["worst_rel"]
    whole, shard = got["adamw"]
    assert whole / WORLD <= shard < whole / WORLD * 1.05  # this rank's half (dim 0 rounded up)
    assert got["buckets"][0] > 0 and got["buckets"][1] == 0


def _kill_in_second_epoch(trainer, epoch: int) -> None:
    if epoch == 1:  # epoch 1's resume state is on disk: die as kill -9 would make it
        os.kill(os.getpid(), signal.SIGKILL)


def _run_worker(rank: int, port: int, data_dir: str, parent: str, out: str, parallel: str,
                kill: bool) -> None:
    _join(rank, port)
    # dvclive's test mode (conftest) fails on Live(dvcyaml=False), which StageTrainer.run uses.
    os.environ.pop("DVCLIVE_TEST", None)
    from cdsam import distributed

    hooks = EpochHooks(before_epoch=_kill_in_second_epoch) if kill else EpochHooks()
    tmp = Path(out)
    t = _trainer(_stage4_params(), 4, Path(data_dir), tmp, parent=Path(parent),
                 dist=DistInfo(rank, WORLD, rank, WORLD, parallel), hooks=hooks)
    try:
        t.run()
        state = t.trainable_state()
        if rank == 0:
            save_file(state, str(tmp / "trainable.safetensors"))
            (tmp / "history.json").write_text(json.dumps(t.history))
    finally:
        distributed.shutdown()


def _launch(data_dir: Path, parent: Path, out: Path, parallel: str, kill: bool = False) -> None:
    mp.start_processes(_run_worker, args=(_free_port(), str(data_dir), str(parent), str(out),
                                          parallel, kill),
                       nprocs=WORLD, join=True, start_method="spawn")


@pytest.fixture(scope="module")
def runs(data_dir, stage3, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    out = {"ddp": root / "ddp", "fsdp": root / "fsdp"}
    for mode, path in out.items():
        _launch(data_dir, stage3, path, mode)
    return out


def test_fsdp_stage4_matches_ddp(runs):
    from cdsam import load_model

    hist = {m: json.loads((p / "history.json").read_text()) for m, p in runs.items()}
    assert len(hist["ddp"]) == len(hist["fsdp"]) == 2
    for a, b in zip(hist["ddp"], hist["fsdp"], strict=True):
        for key in ("train_loss", "loss", "miou", "dice"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), key
    ddp, fsdp = (load_model(runs[m] / "stage4").model for m in ("ddp", "fsdp"))
    theirs = fsdp.state_dict()
    assert ddp.state_dict().keys() == theirs.keys()
    worst = max(float((v - theirs[k]).abs().max()) for k, v in ddp.state_dict().items()
                if v.is_floating_point())
    assert worst < 1e-4, worst
    # Files as a one-process run writes them: the same tensors left out (frozen CLIP, ...).
    assert load_file(str(runs["ddp"] / "stage4" / "model.safetensors")).keys() == \
        load_file(str(runs["fsdp"] / "stage4" / "model.safetensors")).keys()


def test_fsdp_run_killed_then_resumed_is_bit_exact(runs, data_dir, stage3, tmp_path):
    out = tmp_path / "killed"
    with pytest.raises(mp.ProcessExitedException):
        _launch(data_dir, stage3, out, "fsdp", kill=True)
    assert (out / "resume" / "stage4").is_dir() and not (out / "stage4").exists()
    _launch(data_dir, stage3, out, "fsdp")
    resumed = load_file(str(out / "trainable.safetensors"))
    straight = load_file(str(runs["fsdp"] / "trainable.safetensors"))
    assert resumed.keys() == straight.keys() and resumed
    for k, v in straight.items():
        assert torch.equal(v, resumed[k]), k
    assert (out / "stage4" / "model.safetensors").read_bytes() == \
        (runs["fsdp"] / "stage4" / "model.safetensors").read_bytes()


def test_parallel_mode_comes_from_the_environment(monkeypatch):
    from cdsam.distributed import env_info, relaunch_command
    from cdsam.errors import UserError

    monkeypatch.delenv("CDSAM_PARALLEL", raising=False)
    assert env_info().parallel == "ddp" and not env_info().sharded
    monkeypatch.setenv("CDSAM_PARALLEL", "FSDP")
    assert env_info().parallel == "fsdp"
    assert not env_info().sharded  # one process: nothing to shard over
    monkeypatch.setenv("CDSAM_PARALLEL", "zero3")
    with pytest.raises(UserError, match="CDSAM_PARALLEL: expected one of ddp, fsdp"):
        env_info()
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("CDSAM_NPROC", "2")
    with pytest.raises(UserError, match="CDSAM_PARALLEL"):  # before any rank starts
        relaunch_command(["x.py"])


def _load_state_worker(rank: int, port: int, out: str) -> None:
    """A partial state into an FSDP2 model: the missing key is reported and the caller's
    dict is left as it was."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0",
                       "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from cdsam.training.sharding import is_sharded, load_state

    dist.init_process_group("gloo")
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
        state = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
        del state["1.bias"]
        mesh = init_device_mesh("cpu", (1,))
        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        before = {k: (v, v.clone()) for k, v in state.items()}
        keys = load_state(model, state)
        Path(out).write_text(json.dumps({
            "sharded": is_sharded(model), "missing": keys.missing_keys,
            "unexpected": keys.unexpected_keys, "same_keys": sorted(state) == sorted(before),
            "untouched": all(state[k] is v and type(v) is torch.Tensor and torch.equal(v, c)
                             for k, (v, c) in before.items()),
            "loaded": bool(torch.equal(model[0].weight.full_tensor(), before["0.weight"][1]))}))
    finally:
        dist.destroy_process_group()


def test_fsdp_load_state_reports_missing_keys_and_leaves_the_state_alone(tmp_path):
    out = tmp_path / "keys.json"
    mp.start_processes(_load_state_worker, args=(_free_port(), str(out)), nprocs=1, join=True,
                       start_method="spawn")
    got = json.loads(out.read_text())
    assert got["sharded"] and got["loaded"]
    assert got["missing"] == ["1.bias"] and got["unexpected"] == []
    assert got["same_keys"] and got["untouched"]
