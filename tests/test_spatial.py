"""Point/box prompts: sampling from masks, the slot layout, mixed batches, training with them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from cdsam.config.schema import DataConfig
from cdsam.data.dataset import ManifestDataset, collate
from cdsam.data.manifest import FOREGROUND, IGNORE
from cdsam.data.spatial import (
    BOX,
    CLICK,
    POINT_SLOTS,
    MaskStats,
    SpatialPolicy,
    batch_prompts,
    draw_prompts,
    prompt_arrays,
    sample_prompts,
)
from cdsam.models.model import build_model
from tests.test_train import _ddp_worker, _free_port, _params, _trainer, data_dir  # noqa: F401


def _mask() -> torch.Tensor:
    m = torch.zeros(20, 30, dtype=torch.uint8)
    m[4:9, 10:17] = FOREGROUND  # rows 4-8, columns 10-16
    m[:, 25:] = IGNORE
    return m


def test_click_lands_inside_and_negative_outside_never_on_ignore():
    m = _mask()
    policy = SpatialPolicy(point=1.0, negative=1.0)
    for seed in range(50):
        s = sample_prompts(m, policy, seed)
        (px, py), (nx, ny) = s["points"].tolist()
        assert s["point_labels"].tolist() == [1, 0]
        assert m[int(py), int(px)] == FOREGROUND
        assert m[int(ny), int(nx)] == 0  # background, not ignore
        assert not s["has_box"]


def test_tight_box_and_jittered_box():
    m = _mask()
    tight = sample_prompts(m, BOX, seed=3)
    assert tight["has_box"] and tight["box"].tolist() == [10.0, 4.0, 16.0, 8.0]
    assert (tight["point_labels"] == -1).all()
    boxes = torch.stack([sample_prompts(m, SpatialPolicy(box=1.0, jitter=0.1), s)["box"]
                         for s in range(200)])
    assert not torch.equal(boxes[0], boxes[1])
    assert (boxes[:, 0] <= boxes[:, 2]).all() and (boxes[:, 1] <= boxes[:, 3]).all()
    assert (boxes >= 0).all() and (boxes[:, 2] <= 29).all() and (boxes[:, 3] <= 19).all()
    # centred on the tight box, spread about 10 % of its side
    assert boxes.mean(0).sub(tight["box"]).abs().max() < 0.5
    assert 0.3 < float(boxes[:, 0].std()) < 1.2


def test_probabilities_and_seeding():
    m = _mask()
    policy = SpatialPolicy(point=0.5, negative=0.5, box=0.25)
    draws = [sample_prompts(m, policy, s) for s in range(2000)]
    clicks = np.mean([d["point_labels"][0] == 1 for d in draws])
    negatives = np.mean([d["point_labels"][1] == 0 for d in draws])
    boxes = np.mean([bool(d["has_box"]) for d in draws])
    assert abs(clicks - 0.5) < 0.05 and abs(negatives - 0.25) < 0.05 and abs(boxes - 0.25) < 0.05
    a, b = sample_prompts(m, policy, 7), sample_prompts(m, policy, 7)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_empty_target_and_disabled_policy_give_empty_slots():
    empty = torch.zeros(10, 10, dtype=torch.uint8)
    for mask, policy in ((empty, CLICK), (_mask(), SpatialPolicy())):
        s = sample_prompts(mask, policy, 0)
        assert (s["point_labels"] == -1).all() and not s["has_box"]
    assert s["points"].shape == (POINT_SLOTS, 2)


def test_text_only_rows_ignore_their_batch_mates_prompts(model_cfg):
    """A mixed batch decodes text-only rows exactly as a text-only batch would."""
    model = build_model(model_cfg, seed=0).eval()
    images = torch.randn(3, 3, 32, 32)
    prompts = ["a red circle", "a blue square", "a green triangle"]
    points = (torch.tensor([[[5.0, 6.0], [0.0, 0.0]]] * 3),
              torch.tensor([[1, -1], [-1, -1], [1, 0]]))
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0]] * 3)
    box_valid = torch.tensor([False, False, True])
    with torch.no_grad():
        plain = model(images, prompts).masks
        mixed = model(images, prompts, points=points, boxes=boxes, box_valid=box_valid).masks
        alone = model(images[:1], prompts[:1], points=(points[0][:1], points[1][:1]),
                      boxes=boxes[:1], box_valid=box_valid[:1]).masks
    torch.testing.assert_close(mixed[1], plain[1])  # row 1 has no point and no box
    assert not torch.allclose(mixed[0], plain[0]) and not torch.allclose(mixed[2], plain[2])
    torch.testing.assert_close(mixed[0], alone[0], rtol=1e-5, atol=1e-5)


def test_dataset_draws_per_epoch_and_the_batch_becomes_model_arguments(data_dir):  # noqa: F811
    policy = SpatialPolicy(point=1.0, negative=1.0, box=1.0)
    ds = ManifestDataset(data_dir, "train", DataConfig(resize=32, crop=32), seed=0,
                         spatial=policy)
    a, again, later = ds[(0, 0)], ds[(0, 0)], ds[(1, 0)]
    assert torch.equal(a["points"], again["points"])
    assert not torch.equal(a["points"], later["points"])
    assert a["mask"][0, int(a["points"][0, 1]), int(a["points"][0, 0])] == 1
    batch = collate([ds[(0, i)] for i in range(4)])
    args = batch_prompts(batch, torch.device("cpu"))
    assert args["points"][0].shape == (4, POINT_SLOTS, 2) and args["boxes"].shape == (4, 4)
    plain = collate([ManifestDataset(data_dir, "train", DataConfig(resize=32, crop=32))[i]
                     for i in range(4)])
    assert batch_prompts(plain, torch.device("cpu")) == {}


def test_training_with_spatial_prompts_changes_the_run(data_dir, tmp_path):  # noqa: F811
    def losses(**train):
        t = _trainer(_params(train=train, stage1={"epochs": 1}), 1, data_dir,
                     tmp_path / str(sorted(train.items())))
        t.setup()
        t.train()
        return t.step_losses[0]

    text_only = losses(point_prompts=0.0, box_prompts=0.0)
    assert losses(point_prompts=1.0, box_prompts=1.0) != text_only


@pytest.mark.parametrize("stage", [1])
def test_ddp_ranks_agree_with_spatial_prompts(data_dir, tmp_path, stage):  # noqa: F811
    port = _free_port()
    over = {"train": {"point_prompts": 0.5, "box_prompts": 0.5}}
    mp.start_processes(_ddp_worker, args=(2, port, str(data_dir), str(tmp_path), stage, None,
                                          over), nprocs=2, join=True, start_method="spawn")
    r0 = load_file(str(tmp_path / "rank0.safetensors"))
    r1 = load_file(str(tmp_path / "rank1.safetensors"))
    assert r0 and all(torch.equal(r0[k], r1[k]) for k in r0)


def _nonzero_reference(m: np.ndarray, policy: SpatialPolicy, seed: int) -> dict[str, list]:
    """The draw written the plain way (scan the whole mask for every pick): what the per-row
    counts of MaskStats must reproduce exactly."""
    out = {"points": [[0.0, 0.0], [0.0, 0.0]], "point_labels": [-1, -1],
           "box": [0.0, 0.0, 0.0, 0.0], "has_box": False}
    fy, fx = np.nonzero(m == FOREGROUND)
    if len(fx) == 0:
        return out
    rng = np.random.default_rng([seed, 0x5A])
    if rng.random() < policy.point:
        i = int(rng.integers(len(fx)))
        out["points"][0], out["point_labels"][0] = [float(fx[i]), float(fy[i])], 1
        by, bx = np.nonzero(m == 0)
        if len(bx) and rng.random() < policy.negative:
            i = int(rng.integers(len(bx)))
            out["points"][1], out["point_labels"][1] = [float(bx[i]), float(by[i])], 0
    if rng.random() < policy.box:
        box = np.array([fx.min(), fy.min(), fx.max(), fy.max()], dtype=np.float64)
        side = np.array([box[2] - box[0] + 1, box[3] - box[1] + 1] * 2)
        box = box + rng.normal(0.0, policy.jitter, 4) * side
        box = np.clip(box, 0, [m.shape[1] - 1, m.shape[0] - 1] * 2)
        x0, x1 = sorted(box[0::2])
        y0, y1 = sorted(box[1::2])
        out["box"], out["has_box"] = [x0, y0, x1, y1], True
    return out


def test_draws_from_row_counts_equal_a_full_mask_scan():
    rng = np.random.default_rng(0)
    policy = SpatialPolicy(point=0.7, negative=0.6, box=0.6)
    masks = rng.choice([0, 1, 255], size=(60, 17, 23), p=[0.5, 0.3, 0.2]).astype(np.uint8)
    masks[5] = 255  # nothing labelled
    masks[6] = FOREGROUND  # no background for a negative click
    stats = MaskStats.of(masks, chunk=7)  # chunks must not change the counts
    for k in range(len(masks)):
        for seed in range(4):
            got = sample_prompts(torch.from_numpy(masks[k]), policy, 100 * k + seed)
            arrays = prompt_arrays(1)
            draw_prompts(stats, k, masks[k], policy, 100 * k + seed, arrays, 0)
            want = _nonzero_reference(masks[k], policy, 100 * k + seed)
            for name, value in want.items():
                expected = torch.tensor(value, dtype=got[name].dtype)
                assert torch.equal(got[name], expected), (k, seed, name)
                assert torch.equal(torch.from_numpy(arrays[name])[0], expected), (k, name)
