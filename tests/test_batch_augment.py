"""Augmentation of whole batches on the device (cdsam.data.batch_augment) and its use by the
packed loader: geometry, seeding per sample, ignore for uncovered pixels, prompts from the
warped mask."""

from __future__ import annotations

import torch
from torch.utils.data import DistributedSampler

from cdsam.config.schema import AugmentConfig, DataConfig
from cdsam.data.batch_augment import augment_batch, draw_augment
from cdsam.data.dataset import ManifestDataset
from cdsam.data.manifest import FOREGROUND, IGNORE
from cdsam.data.packed import PackedLoader, normalize_batch
from cdsam.data.spatial import SpatialPolicy
from tests.test_packed import mixed_dir  # noqa: F401
from tests.test_train import _params, _trainer, data_dir  # noqa: F401

OFF = dict(hflip=0.0, scale=0.0, rotate=0.0, colour=0.0)


def _batch(n: int = 4, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    masks = torch.randint(0, 2, (n, 1, size, size), dtype=torch.uint8, generator=g)
    masks[:, :, :, -2:] = IGNORE
    return images, masks


def _apply(cfg: AugmentConfig, images, masks, seeds):
    theta, colour = draw_augment(cfg, seeds)
    return augment_batch(images, masks, torch.from_numpy(theta), torch.from_numpy(colour))


def test_nothing_drawn_is_the_identity():
    images, masks = _batch()
    x, m = _apply(AugmentConfig(enable=True, **OFF), images, masks, [1, 2, 3, 4])
    torch.testing.assert_close(x, normalize_batch(images), rtol=0, atol=1e-5)
    assert torch.equal(m, masks)


def test_a_flip_moves_image_and_mask_together():
    images, masks = _batch()
    x, m = _apply(AugmentConfig(enable=True, **{**OFF, "hflip": 1.0}), images, masks, [5] * 4)
    torch.testing.assert_close(x, normalize_batch(images).flip(-1), rtol=0, atol=1e-5)
    assert torch.equal(m, masks.flip(-1))


def test_rotation_marks_uncovered_corners_ignore_and_keeps_labels():
    images, masks = _batch(size=32)
    masks[:, :, :, -2:] = FOREGROUND
    x, m = _apply(AugmentConfig(enable=True, **{**OFF, "rotate": 45.0}), images, masks,
                  list(range(4)))
    assert set(m.unique().tolist()) <= {0, FOREGROUND, IGNORE}
    corners = m[:, 0, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners == IGNORE).float().mean() > 0.5  # |angle| is large for most draws
    # Uncovered pixels are the mean (0 after normalising); bilinear blends the rim a little.
    ignored = m.expand_as(x) == IGNORE
    assert x[ignored].abs().mean() < 0.2 * x[~ignored].abs().mean()


def test_a_sample_gets_the_same_draw_in_any_batch(mixed_dir):  # noqa: F811
    cfg = AugmentConfig(enable=True)
    policy = SpatialPolicy(point=1.0, box=0.5)
    ds = ManifestDataset(mixed_dir, "train", DataConfig(crop=32), seed=4, spatial=policy)
    pack = ds.data
    got = {}
    for bs in (3, 5):
        sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=2)
        loader = PackedLoader(pack, bs, torch.device("cpu"), sampler=sampler, spatial=policy,
                              seed=4, augment=cfg)
        loader.set_epoch(1)
        for b in loader:
            for j, i in enumerate(b["index"].tolist()):
                row = {k: b[k][j] for k in ("image", "mask", "valid", "points", "box")}
                if i in got:
                    for k, v in row.items():
                        assert torch.equal(v, got[i][k]), (i, k)
                got[i] = row
                # The click is on the target as warped, never on an uncovered pixel.
                x, y = b["points"][j, 0].long().tolist()
                if b["point_labels"][j, 0] == 1:
                    assert b["mask"][j, 0, y, x] == 1
    assert len(got) == len(ds)
    plain = ManifestDataset(mixed_dir, "train", DataConfig(crop=32))[0]["image"]
    assert not torch.equal(got[0]["image"], plain)  # it did augment


def test_training_with_augmentation_uses_the_packed_path_and_is_reproducible(data_dir,  # noqa: F811
                                                                             tmp_path):
    p = _params(data={"resize": 32, "crop": 32, "augment": {"enable": True}},
                stage1={"epochs": 1})
    runs = []
    for k in range(2):
        t = _trainer(p, 1, data_dir, tmp_path / str(k))
        t.setup()
        assert t.packs and t.cache is None  # augmentation turns the feature cache off
        t.train()
        runs.append(t.step_losses)
    assert runs[0] == runs[1]
