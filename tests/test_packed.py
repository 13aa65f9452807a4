"""Batches straight from the prepared shards (cdsam.data.packed): the same samples as the
per-sample path, rows read from disk beyond the memory budget, and the same training run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from cdsam.config.schema import DataConfig, PrepareConfig, SyntheticConfig
from cdsam.data.dataset import EpochSampler, ManifestDataset, collate
from cdsam.data.packed import PackedLoader, pixel_placeholder
from cdsam.data.prepare import prepare
from cdsam.data.prepared import PreparedSplit
from cdsam.data.spatial import SpatialPolicy
from tests.test_train import _params, _trainer, data_dir  # noqa: F401

MIXED = PrepareConfig(val_fraction=0.25, test_fraction=0.0, negatives="absent",
                      negatives_per_image=1,
                      synthetic=SyntheticConfig(num_images=10, image_size=40))


def mixed(root: Path, data: DataConfig) -> Path:
    """Several prompts per image and absent-object negatives, fitted as ``data`` says."""
    out = root / f"{data.fit}-{data.resize}-{data.crop}"
    if not out.is_dir():
        prepare(MIXED, seed=1, out=out, show_progress=False, data=data)
    return out


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory) -> Path:
    return mixed(tmp_path_factory.mktemp("packed"), DataConfig(crop=32))


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
def test_packed_batches_are_the_per_sample_batches(tmp_path, fit):
    data = DataConfig(fit=fit, resize=40, crop=32)
    root = mixed(tmp_path, data)
    policy = SpatialPolicy(point=0.6, negative=0.5, box=0.5)
    ds = ManifestDataset(root, "train", data, seed=5, spatial=policy)
    pack = ds.data
    assert len(pack.image_keys) < len(pack) == len(ds)  # images shared by several prompts
    assert not pack.on_disk
    sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=7)
    loader = PackedLoader(pack, 3, torch.device("cpu"), sampler=sampler, spatial=policy,
                          seed=5)
    assert _same_batches(ds, loader) == 2 * len(ds)
    # In order, without prompts: the validation loader.
    val = ManifestDataset(root, "val", data)
    assert _same_batches(val, PackedLoader(val.data, 4, torch.device("cpu")), 1) == len(val)


def test_prefetching_thread_gives_the_same_batches(mixed_dir):
    data = DataConfig(crop=32)
    policy = SpatialPolicy(point=1.0, box=0.5)
    ds = ManifestDataset(mixed_dir, "train", data, seed=2, spatial=policy)
    sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=1)
    loader = PackedLoader(ds.data, 5, torch.device("cpu"), sampler=sampler,
                          spatial=policy, seed=2, prefetch=True)
    assert _same_batches(ds, loader) == 2 * len(ds)


def test_beyond_the_memory_budget_rows_are_read_from_disk(mixed_dir):
    mapped = PreparedSplit.open(mixed_dir, "train", DataConfig(crop=32))
    read = PreparedSplit.open(mixed_dir, "train", DataConfig(crop=32, memory_mb=0))
    assert read.on_disk and not mapped.on_disk
    rows = [3, 0, 3, len(mapped.image_keys) - 1]
    assert np.array_equal(read.image_rows(rows), mapped.image_rows(rows))
    idx = np.arange(len(mapped))[::-1]
    assert np.array_equal(read.masks(idx), mapped.masks(idx))
    sampler = DistributedSampler(range(len(read)), num_replicas=1, rank=0, shuffle=True, seed=3)
    a = [b["mask"] for b in PackedLoader(read, 4, torch.device("cpu"), sampler=sampler)]
    b = [b["mask"] for b in PackedLoader(mapped, 4, torch.device("cpu"), sampler=sampler)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_opening_a_split_leaves_the_global_rng_alone(mixed_dir):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    PreparedSplit.open(mixed_dir, "val", DataConfig(crop=32))
    assert torch.equal(torch.rand(3), expected)  # training's LoRA init and dropout draw next


def test_a_fully_cached_step_copies_no_pixels(mixed_dir):
    ds = ManifestDataset(mixed_dir, "val", DataConfig(crop=32))
    loader = PackedLoader(ds.data, 4, torch.device("cpu"))
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
        t = _trainer(p, 1, data_dir, tmp_path / str(packed), pack_batches=packed)
        t.setup()
        assert bool(t.packs) == packed
        t.train()
        runs[packed] = (t.step_losses, [h["miou"] for h in t.history])
    assert runs[True] == runs[False]  # bit for bit: losses and val scores
