"""The training loop: bit-exact resume, feature/text caches, non-finite loss, DDP on gloo."""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from cdsam.config.schema import PrepareConfig, SyntheticConfig
from cdsam.data.prepare import prepare
from cdsam.distributed import DistInfo, relaunch_command
from cdsam.errors import UserError
from cdsam.training.trainer import EpochHooks, StagePaths, StageTrainer, TrainerOptions
from tests.conftest import prepare_tiny, tiny_params


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return prepare_tiny(tmp_path_factory.mktemp("data") / "prepared")


def _params(**over):
    base = {"device": "cpu", "optim": {"batch_size": 4, "warmup_steps": 1},
            "stage1": {"epochs": 2}, "stage2": {"epochs": 2}}
    base.update(over)
    return tiny_params(**base)


def _trainer(params, stage, data_dir, tmp, parent=None, dist=None, **options) -> StageTrainer:
    """``options``: `TrainerOptions` fields beside show_progress (pack_batches, hooks, ...)."""
    paths = StagePaths(data=data_dir, out=tmp / f"stage{stage}", metrics=tmp / "metrics",
                       parent=parent, resume=tmp / "resume")
    return StageTrainer(params, stage, paths, TrainerOptions(show_progress=False, **options),
                        dist)


def _train_and_save(trainer: StageTrainer) -> bytes:
    trainer.setup()
    trainer.train()
    trainer.save()
    return (trainer.paths.out / "model.safetensors").read_bytes()


def test_resume_after_interruption_is_bit_exact(data_dir, tmp_path, caplog):
    p = _params()
    straight = _train_and_save(_trainer(p, 1, data_dir, tmp_path / "a"))

    first = _trainer(p, 1, data_dir, tmp_path / "b")
    first.setup()
    first.train(stop_after=1)  # as if killed after epoch 1
    assert (tmp_path / "b" / "resume" / "stage1" / "state.safetensors").exists()
    with caplog.at_level(logging.INFO, logger="cdsam"):
        resumed = _train_and_save(_trainer(p, 1, data_dir, tmp_path / "b"))
    assert "resuming stage1 from epoch 1/2" in caplog.text
    assert resumed == straight


def test_resume_under_autocast_is_bit_exact(data_dir, tmp_path):
    """Loading the resume state clears the CLIP prompt cache; its refill happens inside a
    training step's autocast and must give the features setup encoded outside it."""
    from cdsam.runtime import Precision

    bf16 = Precision(torch.device("cpu"), amp=True, dtype=torch.bfloat16)
    p = _params(stage1={"epochs": 2, "select": "last"})
    straight = _train_and_save(_trainer(p, 1, data_dir, tmp_path / "a", precision=bf16))
    first = _trainer(p, 1, data_dir, tmp_path / "b", precision=bf16)
    first.setup()
    first.train(stop_after=1)
    resumed = _trainer(p, 1, data_dir, tmp_path / "b", precision=bf16)
    assert _train_and_save(resumed) == straight


def test_speed_knobs_keep_the_resume_state(data_dir, tmp_path, caplog):
    """data.memory_mb, train.feature_cache_mb and train.compile change speed, not results: a
    state saved under one value resumes under another."""
    first = _trainer(_params(), 1, data_dir, tmp_path)
    first.setup()
    first.train(stop_after=1)
    from tests.conftest import TINY

    faster = _params(data={**TINY["data"], "memory_mb": 0},
                     train={**TINY.get("train", {}), "feature_cache_mb": 1, "compile": False})
    t = _trainer(faster, 1, data_dir, tmp_path)
    t.setup()
    with caplog.at_level(logging.INFO, logger="cdsam"):
        t.train()
    assert "resuming stage1 from epoch 1/2" in caplog.text


def test_stale_resume_state_is_discarded(data_dir, tmp_path, caplog):
    first = _trainer(_params(), 1, data_dir, tmp_path)
    first.setup()
    first.train(stop_after=1)
    other = _params(optim={"batch_size": 4, "warmup_steps": 1, "lr": 5e-4})
    t = _trainer(other, 1, data_dir, tmp_path)
    t.setup()
    with caplog.at_level(logging.INFO, logger="cdsam"):
        t.train()
    assert "discarding stale resume state" in caplog.text
    assert "resuming" not in caplog.text
    assert len(t.history) == 2


@pytest.fixture(scope="module")
def stage1_ckpt(data_dir, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("s1")
    t = _trainer(_params(stage1={"epochs": 1}), 1, data_dir, tmp)
    _train_and_save(t)
    return tmp / "stage1"


def test_feature_cache_gives_the_same_losses(data_dir, stage1_ckpt, tmp_path):
    runs = {}
    for cached in (True, False):
        p = _params(train={"feature_cache": cached})
        t = _trainer(p, 2, data_dir, tmp_path / str(cached), parent=stage1_ckpt)
        t.setup()
        calls = t.model.clip_text.calls
        t.train()
        runs[cached] = t
        # All prompts were encoded once in setup; no text-tower forward during training.
        assert t.model.clip_text.calls == calls
    on, off = runs[True], runs[False]
    assert on.cache is not None and off.cache is None
    assert on.start_block == 4 - 2  # depth 4, last_k_blocks 2
    assert on.cache.hits > 0 and on.cache.misses == 0
    a = [x for e in on.step_losses for x in e]
    b = [x for e in off.step_losses for x in e]
    assert len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5


def test_feature_cache_budget_falls_back_to_recompute(data_dir, tmp_path):
    t = _trainer(_params(train={"feature_cache_mb": 0}, stage1={"epochs": 1}), 1, data_dir,
                 tmp_path)
    t.setup()
    t.train()
    assert t.cache is not None and len(t.cache) == 0 and t.cache.full
    assert t.cache.misses > 0 and t.cache.hits == 0


def test_stage4_disables_the_cache(data_dir, stage1_ckpt, tmp_path, caplog):
    s2 = _trainer(_params(stage2={"epochs": 1}), 2, data_dir, tmp_path, parent=stage1_ckpt)
    _train_and_save(s2)
    s3 = _trainer(_params(stage3={"epochs": 1}), 3, data_dir, tmp_path, parent=tmp_path / "stage2")
    _train_and_save(s3)
    s4 = _trainer(_params(stage4={"epochs": 1}), 4, data_dir, tmp_path, parent=tmp_path / "stage3")
    with caplog.at_level(logging.INFO, logger="cdsam"):
        s4.setup()
    assert s4.cache is None and "feature cache off" in caplog.text


def test_non_finite_loss_names_stage_epoch_step(data_dir, tmp_path):
    t = _trainer(_params(optim={"batch_size": 4, "lr": 1e30, "lora_lr": 1e30, "grad_clip": 0,
                                "warmup_steps": 0}), 1, data_dir, tmp_path)
    t.setup()
    with torch.no_grad():
        t.model.token_to_mask.proj.weight.fill_(float("nan"))
    with pytest.raises(UserError, match=r"stage1: non-finite loss \(nan\) at epoch 1 step 1"):
        t.train()
    assert not (tmp_path / "stage1").exists()


def test_relaunch_command_from_environment(monkeypatch):
    for var in ("RANK", "CDSAM_NPROC", "CDSAM_TORCHRUN", "CDSAM_NO_RELAUNCH"):
        monkeypatch.delenv(var, raising=False)
    assert relaunch_command(["x.py"]) is None
    monkeypatch.setenv("CDSAM_NPROC", "2")
    cmd = relaunch_command(["x.py", "--stage", "2"])
    assert cmd[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                       "x.py", "--stage", "2"]
    monkeypatch.setenv("CDSAM_NPROC", "two")
    with pytest.raises(UserError, match="CDSAM_NPROC"):
        relaunch_command(["x.py"])
    monkeypatch.setenv("RANK", "0")  # already under torchrun: no second relaunch
    assert relaunch_command(["x.py"]) is None


# --------------------------------------------------------------------------- DDP on gloo


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, data_dir: str, out: str, stage: int = 1,
                parent: str | None = None, over: dict | None = None) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    from cdsam import distributed

    p = _params(**{"optim": {"batch_size": 2, "warmup_steps": 1},
                   f"stage{stage}": {"epochs": 1}, **(over or {})})
    t = _trainer(p, stage, Path(data_dir), Path(out) / f"rank{rank}",
                 parent=Path(parent) if parent else None, dist=DistInfo(rank, world, rank, world))
    try:
        t.setup()
        t.train()
        save_file(t.trainable_state(), str(Path(out) / f"rank{rank}.safetensors"))
    finally:
        distributed.shutdown()


def test_ddp_two_ranks_match_each_other_and_one_process(data_dir, tmp_path):
    port = _free_port()
    mp.start_processes(_ddp_worker, args=(2, port, str(data_dir), str(tmp_path)), nprocs=2,
                       join=True, start_method="spawn")
    r0 = load_file(str(tmp_path / "rank0.safetensors"))
    r1 = load_file(str(tmp_path / "rank1.safetensors"))
    assert r0.keys() == r1.keys() and r0
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k

    # One process, global batch 2 x 2: the same samples per step, so the same update.
    single = _trainer(_params(optim={"batch_size": 4, "warmup_steps": 1},
                              stage1={"epochs": 1}), 1, data_dir, tmp_path / "single")
    single.setup()
    before = single.trainable_state()
    single.train()
    ref = single.trainable_state()
    moved = max(float((ref[k] - before[k]).abs().max()) for k in ref)
    assert moved > 1e-4  # training really changed the weights
    worst = max(float((ref[k] - r0[k]).abs().max()) for k in ref)
    assert math.isfinite(worst) and worst < 1e-4, worst


# --------------------------------------------------------------------------- real-data knobs


def test_augmentation_turns_the_feature_cache_off(data_dir, tmp_path, caplog):
    """Augmented inputs change every epoch: cached features would be paired with a mask of
    another geometry, so the cache must be off, and say why."""
    params = _params(data={"fit": "pad", "resize": 32, "crop": 32, "augment": {"enable": True}})
    t = _trainer(params, 1, data_dir, tmp_path)
    with caplog.at_level(logging.INFO, logger="cdsam"):
        t.setup()
    assert t.cache is None
    assert "feature cache off: random augmentation changes the input every epoch" in caplog.text
    batch = next(iter(t.train_loader))
    assert batch["image"].shape[-1] == 32
    t.train()  # and it trains


@pytest.mark.parametrize("select,expected", [("best", 2), ("last", 3)])
def test_stage_keeps_the_selected_epoch(data_dir, tmp_path, select, expected):
    from cdsam.models.checkpoint import load_checkpoint

    scripted = iter([0.2, 0.9, 0.1])  # val mIoU per epoch: epoch 2 is the best
    snapshots = []

    def scored(trainer, epoch, res):
        res.miou = next(scripted)
        snapshots.append(trainer.trainable_state())

    t = _trainer(_params(stage1={"epochs": 3, "select": select}), 1, data_dir, tmp_path,
                 hooks=EpochHooks(after_validation=scored))
    t.setup()
    summary = t.train()
    t.save()
    assert summary["selected_epoch"] == expected and summary["best_miou"] == 0.9
    assert summary["miou"] == [0.2, 0.9, 0.1][expected - 1]
    model, meta = load_checkpoint(tmp_path / "stage1")
    assert meta.extra["selected_epoch"] == expected and meta.extra["select"] == select
    saved = dict(model.named_parameters())
    for name, value in snapshots[expected - 1].items():
        torch.testing.assert_close(saved[name].detach(), value, rtol=0, atol=0)
    assert not all(torch.equal(saved[n].detach(), v) for n, v in snapshots[0].items())


def test_val_loss_uses_the_training_weights(data_dir, tmp_path):
    """Train and val losses come from one objective: with the Dice weight at 0 and the CLIP
    and instance terms off, the val loss is BCE alone (it once ignored both weights)."""
    from cdsam.evaluation.scoring import evaluate_model
    from cdsam.models.losses import bce_loss

    params = _params(loss={"dice_weight": 0.0, "bce_weight": 2.0, "clip_align_weight": 0.0,
                           "presence_weight": 0.0, "centre_weight": 0.0, "iou_weight": 0.0})
    t = _trainer(params, 1, data_dir, tmp_path)
    t.setup()
    res = evaluate_model(t.model, t.val_loader, t.objective, t.precision)
    total, n = 0.0, 0
    with torch.no_grad():
        for batch in t.val_loader:
            out = t.model(batch["image"], batch["prompt"])
            total += 2.0 * bce_loss(out.masks.float(), batch["mask"], batch["valid"]).item() * \
                len(batch["prompt"])
            n += len(batch["prompt"])
    assert res.loss == pytest.approx(total / n, rel=1e-5)


def _stage3_checkpoint(params, out: Path) -> Path:
    """A stage-3 checkpoint as stage 3 would leave it (DINO LoRA injected), untrained."""
    from cdsam.config.parse import to_dict
    from cdsam.models.checkpoint import CheckpointMeta, save_checkpoint
    from cdsam.models.model import build_model
    from cdsam.training.curriculum import apply_stage

    model = build_model(params.model, seed=0)
    apply_stage(model, 3, params.lora.sam, params.lora.dino)
    save_checkpoint(out, model, CheckpointMeta(stage=3, model=to_dict(params.model),
                                               prompts=["a red circle"], parent=None, extra={}))
    return out


def _resume_worker(rank: int, world: int, port: int, data_dir: str, out: str,
                   stop_after: int | None) -> None:
    """Each rank keeps its own resume folder, as on nodes without a shared filesystem."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    from cdsam import distributed

    p = _params(optim={"batch_size": 2, "warmup_steps": 1})
    t = _trainer(p, 1, Path(data_dir), Path(out) / f"rank{rank}",
                 dist=DistInfo(rank, world, rank, world))
    try:
        t.setup()
        t.train(stop_after=stop_after)
        if stop_after is None:
            save_file(t.trainable_state(), str(Path(out) / f"rank{rank}.safetensors"))
            (Path(out) / f"rank{rank}.epochs").write_text(str(len(t.history)))
    finally:
        distributed.shutdown()


def test_ranks_that_see_different_resume_states_start_over_together(data_dir, tmp_path):
    """Only rank 0 writes the state; a rank on another node (here: another folder) sees none.
    Resuming on rank 0 alone would leave the ranks in different epochs' collectives."""
    for stop_after in (1, None):
        ctx = mp.start_processes(_resume_worker, nprocs=2, join=False, start_method="spawn",
                                 args=(2, _free_port(), str(data_dir), str(tmp_path),
                                       stop_after))
        deadline = time.monotonic() + 300
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                for proc in ctx.processes:
                    proc.kill()
                pytest.fail("the ranks hung")
    assert [(tmp_path / f"rank{r}.epochs").read_text() for r in (0, 1)] == ["2", "2"]
    r0 = load_file(str(tmp_path / "rank0.safetensors"))
    r1 = load_file(str(tmp_path / "rank1.safetensors"))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)


def test_ddp_stage4_full_sam_finishes(data_dir, tmp_path):
    """`stage4.sam_mode: full` once marked SAM parameters trainable that never get a gradient,
    and DDP (find_unused_parameters off) stopped on them."""
    parent = _stage3_checkpoint(_params(), tmp_path / "stage3")
    port = _free_port()
    over = {"stage4": {"epochs": 1, "sam_mode": "full"}}
    mp.start_processes(_ddp_worker, args=(2, port, str(data_dir), str(tmp_path), 4, str(parent),
                                          over), nprocs=2, join=True, start_method="spawn")
    r0 = load_file(str(tmp_path / "rank0.safetensors"))
    r1 = load_file(str(tmp_path / "rank1.safetensors"))
    assert any(k.startswith("sam.mask_decoder.") for k in r0)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k


def test_gradient_accumulation_matches_a_bigger_batch(data_dir, tmp_path):
    """batch 4 x accumulation 2 == batch 8 (the CLIP term is off: it averages over the
    samples with foreground in each batch, which does not split evenly)."""
    states = {}
    for batch, accum in ((8, 1), (4, 2)):
        p = _params(optim={"batch_size": batch, "grad_accum_steps": accum, "warmup_steps": 1},
                    loss={"clip_align_weight": 0.0}, stage1={"epochs": 1})
        t = _trainer(p, 1, data_dir, tmp_path / f"b{batch}")
        t.setup()
        t.train()
        states[batch] = t.trainable_state()
    for k, v in states[8].items():
        torch.testing.assert_close(states[4][k], v, atol=2e-5, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_last_partial_accumulation_window_is_averaged_over_its_batches(data_dir, tmp_path):
    """An epoch of 3 batches with accumulation 4 is one partial window: its single step must use
    the mean of the 3 batches' gradients (it once divided by 4)."""
    p = _params(optim={"batch_size": 10, "grad_accum_steps": 4, "warmup_steps": 1,
                       "grad_clip": 0.0}, loss={"clip_align_weight": 0.0}, stage1={"epochs": 1})
    t = _trainer(p, 1, data_dir, tmp_path / "acc")
    t.setup()
    ref = _trainer(p, 1, data_dir, tmp_path / "ref")
    ref.setup()  # same seed: the same initial weights
    assert len(t.train_loader) == 3
    seen = []
    original = t.optimizer.step

    def record(*args, **kwargs):
        seen.append({k: q.grad.clone() for k, q in t.model.named_parameters()
                     if q.grad is not None})
        return original(*args, **kwargs)

    t.optimizer.step = record
    t.train_epoch(0)
    assert len(seen) == 1
    ref.train_mode()
    ref.train_sampler.set_epoch(0)
    for batch in ref.train_loader:
        loss, _ = ref.compute_loss(batch)
        (loss / 3).backward()
    for k, g in seen[0].items():
        torch.testing.assert_close(g, dict(ref.model.named_parameters())[k].grad, atol=1e-6,
                                   rtol=1e-5)


def test_resume_state_is_stale_after_a_code_edit(data_dir, tmp_path, caplog, monkeypatch):
    """The fingerprint covers the source of every loaded cdsam module: a probe module stands in
    for e.g. cdsam/models/losses.py, is edited between the killed run and the rerun."""
    import sys
    import types

    probe = tmp_path / "probe.py"
    probe.write_text("WEIGHT = 1.0\n")
    module = types.ModuleType("cdsam._probe")
    module.__file__ = str(probe)
    monkeypatch.setitem(sys.modules, "cdsam._probe", module)
    first = _trainer(_params(), 1, data_dir, tmp_path)
    first.setup()
    first.train(stop_after=1)
    probe.write_text("WEIGHT = 2.0\n")  # the edit
    t = _trainer(_params(), 1, data_dir, tmp_path)
    t.setup()
    with caplog.at_level(logging.INFO, logger="cdsam"):
        t.train()
    assert "discarding stale resume state" in caplog.text and "resuming" not in caplog.text


def test_resume_state_is_stale_when_the_data_content_changes(tmp_path, caplog):
    """Same sample index (same ids, prompts, splits), other pixels: 32-px vs 40-px scenes."""
    for size in (32, 40):
        prepare(PrepareConfig(val_fraction=0.25, synthetic=SyntheticConfig(
            num_images=8, image_size=size)), 0, tmp_path / f"d{size}", show_progress=False,
            data=tiny_params().data)
    assert (tmp_path / "d32" / "samples.csv").read_bytes() == \
        (tmp_path / "d40" / "samples.csv").read_bytes()
    first = _trainer(_params(), 1, tmp_path / "d32", tmp_path)
    first.setup()
    first.train(stop_after=1)
    import shutil

    shutil.rmtree(tmp_path / "d32")
    shutil.copytree(tmp_path / "d40", tmp_path / "d32")  # prepared again, same path
    t = _trainer(_params(), 1, tmp_path / "d32", tmp_path)
    t.setup()
    with caplog.at_level(logging.INFO, logger="cdsam"):
        t.train()
    assert "discarding stale resume state" in caplog.text and "resuming" not in caplog.text
