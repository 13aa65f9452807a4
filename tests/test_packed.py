"""Packed uint8 arrays and batches by indexing (cdsam.data.packed): the same samples as the
per-sample path, on disk beyond the memory budget, and the same training run."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch
from torch.utils.data import DistributedSampler

from cdsam.config import DataConfig, PrepareConfig, SyntheticConfig
from cdsam.data.dataset import EpochSampler, ManifestDataset, collate
from cdsam.data.packed import PackedLoader, decode_workers, pack_split, pixel_placeholder
from cdsam.data.prepare import prepare
from cdsam.data.spatial import SpatialPolicy
from tests.test_train import _params, _trainer, data_dir  # noqa: F401


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory) -> Path:
    """Several prompts per image, absent-object negatives, non-square images."""
    out = tmp_path_factory.mktemp("packed") / "prepared"
    cfg = PrepareConfig(val_fraction=0.25, test_fraction=0.0, negatives="absent",
                        negatives_per_image=1,
                        synthetic=SyntheticConfig(num_images=10, image_size=40))
    prepare(cfg, seed=1, out=out, show_progress=False)
    return out


def _same_batches(ds: ManifestDataset, loader: PackedLoader, epochs: int = 2) -> int:
    """Assert every packed batch equals the collated per-sample batch; return the count."""
    seen = 0
    sampler = loader.sampler
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        order = list(EpochSampler(sampler)) if sampler is not None else \
            [(0, i) for i in loader.indices]
        for b, got in enumerate(loader):
            keys = order[b * loader.batch_size:(b + 1) * loader.batch_size]
            want = collate([ds[k] for k in keys])
            for name in ("image", "mask", "valid", "index", "points", "point_labels", "box",
                         "has_box"):
                assert torch.equal(got[name], want[name]), (epoch, b, name)
            for name in ("prompt", "id", "image_key"):
                assert got[name] == want[name], (epoch, b, name)
            seen += len(keys)
    return seen


@pytest.mark.parametrize("fit", ["pad", "crop"])
def test_packed_batches_are_the_per_sample_batches(mixed_dir, fit):
    data = DataConfig(fit=fit, resize=40, crop=32)
    policy = SpatialPolicy(point=0.6, negative=0.5, box=0.5)
    ds = ManifestDataset(mixed_dir, "train", data, seed=5, spatial=policy)
    pack = pack_split(ds, memory_mb=64)
    assert len(pack.image_keys) < len(pack) == len(ds)  # images shared by several prompts
    assert pack.images.dtype == pack.masks.dtype == torch.uint8 and not pack.on_disk
    sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=7)
    loader = PackedLoader(pack, 3, torch.device("cpu"), sampler=sampler, spatial=policy,
                          seed=5)
    assert _same_batches(ds, loader) == 2 * len(ds)
    # In order, without prompts: the validation loader.
    val = ManifestDataset(mixed_dir, "val", data)
    assert _same_batches(val, PackedLoader(pack_split(val, 64), 4, torch.device("cpu")), 1) \
        == len(val)


def test_prefetching_thread_gives_the_same_batches(mixed_dir):
    data = DataConfig(crop=32)
    policy = SpatialPolicy(point=1.0, box=0.5)
    ds = ManifestDataset(mixed_dir, "train", data, seed=2, spatial=policy)
    sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=1)
    loader = PackedLoader(pack_split(ds, 64), 5, torch.device("cpu"), sampler=sampler,
                          spatial=policy, seed=2, prefetch=True)
    assert _same_batches(ds, loader) == 2 * len(ds)


def test_beyond_the_memory_budget_the_arrays_stream_from_a_scratch_file(mixed_dir, tmp_path):
    ds = ManifestDataset(mixed_dir, "train", DataConfig(crop=32))
    in_ram = pack_split(ds, memory_mb=64)
    on_disk = pack_split(ds, memory_mb=0, scratch=tmp_path / "scratch")
    assert on_disk.on_disk and torch.equal(on_disk.images, in_ram.images)
    assert torch.equal(on_disk.masks, in_ram.masks)
    files = sorted(p.name for p in (tmp_path / "scratch").rglob("*.npy"))
    assert files == ["train-images.npy", "train-masks.npy"]
    del on_disk
    gc.collect()
    assert not list((tmp_path / "scratch").rglob("*.npy"))  # the scratch copy goes with it


def test_worker_processes_decode_the_same_arrays(mixed_dir, tmp_path):
    ds = ManifestDataset(mixed_dir, "train", DataConfig(crop=32))
    here = pack_split(ds, memory_mb=64, workers=0)
    for packed in (pack_split(ds, memory_mb=64, workers=2),
                   pack_split(ds, memory_mb=0, scratch=tmp_path, workers=2),
                   pack_split(ds, memory_mb=64, workers=2, start_method="spawn")):
        assert torch.equal(packed.images, here.images) and torch.equal(packed.masks, here.masks)
        assert torch.equal(packed.image_row, here.image_row)
        assert (packed.stats.boxes == here.stats.boxes).all()


@pytest.mark.parametrize("workers", [0, 2])
def test_packing_leaves_the_global_rng_alone(mixed_dir, workers):
    ds = ManifestDataset(mixed_dir, "val", DataConfig(crop=32))
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    pack_split(ds, memory_mb=64, workers=workers)
    assert torch.equal(torch.rand(3), expected)  # training's LoRA init and dropout draw next


def test_decode_workers_only_for_splits_that_repay_them(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(16)), raising=False)
    assert decode_workers(100) == 0  # one worker's share: decoding here is cheaper
    assert decode_workers(200) == 3
    assert decode_workers(100_000) == 16
    assert decode_workers(1_000, "spawn") == 0  # spawned workers import torch first
    assert decode_workers(5_000, "spawn") == 5
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0}, raising=False)
    assert decode_workers(100_000) == 0  # one core: nothing to split


def test_a_fully_cached_step_copies_no_pixels(mixed_dir):
    ds = ManifestDataset(mixed_dir, "val", DataConfig(crop=32))
    loader = PackedLoader(pack_split(ds, 64), 4, torch.device("cpu"))
    loader.pixels = False
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["image"].stride() == (0, 0, 0, 0)
    assert batch["mask"].shape == (4, 1, 32, 32)
    assert pixel_placeholder(2, 8, torch.device("cpu")).untyped_storage().nbytes() == 4


@pytest.mark.parametrize("stage_train", [{}, {"feature_cache": False}])
def test_training_on_packed_batches_matches_the_per_sample_path(data_dir, tmp_path,  # noqa: F811
                                                                stage_train):
    p = _params(train={"point_prompts": 0.5, "box_prompts": 0.5, **stage_train},
                stage1={"epochs": 2})
    runs = {}
    for packed in (True, False):
        t = _trainer(p, 1, data_dir, tmp_path / str(packed))
        t.pack_batches = packed
        t.setup()
        assert bool(t.packs) == packed
        t.train()
        runs[packed] = (t.step_losses, [h["miou"] for h in t.history])
    assert runs[True] == runs[False]  # bit for bit: losses and val scores
