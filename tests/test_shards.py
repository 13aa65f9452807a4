"""The prepared layout (cdsam.data.shards / cdsam.data.prepared): masks kept value for value
through label maps and tables, cost in images not prompts, a killed prepare loses nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from cdsam.config.schema import DataConfig, PrepareConfig, SyntheticConfig
from cdsam.data.geometry import fit_transform
from cdsam.data.manifest import IGNORE
from cdsam.data.prepare import prepare
from cdsam.data.prepared import PreparedSplit, prepared_digest, read_samples
from cdsam.data.shards import encode_masks
from cdsam.errors import DataError


def _random_masks(rng: np.random.Generator, k: int, shape=(24, 24)) -> list[np.ndarray]:
    return [rng.choice(np.array([0, 1, 255], np.uint8), size=shape, p=[0.5, 0.4, 0.1])
            for _ in range(k)]


@pytest.mark.parametrize("k", [1, 3, 8])
def test_label_maps_and_tables_give_back_every_mask(k):
    masks = _random_masks(np.random.default_rng(k), k)
    masks.append(masks[0].copy())  # identical masks share a table
    labels, tables, where = encode_masks(masks)
    for m, (g, t) in zip(masks, where, strict=True):
        assert labels[g].dtype == np.uint8
        np.testing.assert_array_equal(tables[t][labels[g]], m)
    assert where[0] == where[-1] and len(tables) == k


def test_more_than_256_combinations_take_a_second_label_map():
    masks = _random_masks(np.random.default_rng(0), 9, (40, 40))  # up to 3**9 combinations
    labels, tables, where = encode_masks(masks)
    assert len(labels) >= 2
    for m, (g, t) in zip(masks, where, strict=True):
        np.testing.assert_array_equal(tables[t][labels[g]], m)
    with pytest.raises(DataError, match="mask value 7 is not 0, 1 or 255"):
        encode_masks([np.full((4, 4), 7, np.uint8)])


def _classes(tmp_path: Path) -> tuple[PrepareConfig, dict[str, list[np.ndarray]]]:
    """Non-square images, one mask folder per class, overlapping classes."""
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    rng = np.random.default_rng(3)
    truth: dict[str, list[np.ndarray]] = {}
    for c in ("crack", "dent", "rust"):
        (tmp_path / "masks" / c).mkdir(parents=True)
    for i, (h, w) in enumerate([(30, 50), (44, 26), (40, 40), (33, 47)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            img_dir / f"p{i}.png")
        for c, (y, x) in zip(("crack", "dent", "rust"), [(2, 3), (8, 9), (5, 5)], strict=True):
            m = np.zeros((h, w), np.uint8)
            m[y:y + 15, x:x + 14] = 255  # overlaps the other classes
            Image.fromarray(m).save(tmp_path / "masks" / c / f"p{i}.png")
    cfg = PrepareConfig(source="folders", images=str(img_dir), masks=str(tmp_path / "masks"),
                        mask_format="per_class", classes=["crack", "dent", "rust"],
                        prompt_template="a {}", negatives="absent", val_fraction=0.25,
                        test_fraction=0.25)
    return cfg, truth


@pytest.mark.parametrize("data", [DataConfig(fit="pad", crop=32),
                                  DataConfig(fit="crop", resize=36, crop=32),
                                  DataConfig(fit="crop", resize=24, crop=32)],
                         ids=["pad", "crop", "crop-smaller"])
def test_prepared_masks_are_each_mask_fitted_on_its_own(tmp_path, data):
    """What stages used to do at every start (decode, fit each mask nearest), value for value."""
    from cdsam.data.manifest import BadFiles
    from cdsam.data.sources.folders import iter_folders

    cfg, _ = _classes(tmp_path)
    prepare(cfg, 0, tmp_path / "p", show_progress=False, data=data)
    fit = fit_transform(data.fit, data.resize, data.crop)
    want = {}
    for stem, image, samples in iter_folders(cfg, BadFiles(), 0):
        img = tv_tensors.Image(torch.from_numpy(np.array(image)).permute(2, 0, 1))
        for s in samples:
            fitted_image, m = fit(img, tv_tensors.Mask(torch.from_numpy(s.mask)[None]))
            want[f"{stem}__a-{s.prompt[2:]}"] = (fitted_image.numpy(), m.numpy()[0])
    seen = 0
    for split in ("train", "val", "test"):
        p = PreparedSplit.open(tmp_path / "p", split, data)
        masks = p.masks(np.arange(len(p)))
        for i, sid in enumerate(p.ids):
            np.testing.assert_array_equal(masks[i], want[sid][1], err_msg=sid)
            np.testing.assert_array_equal(p.image_rows([p.image_row[i]])[0], want[sid][0])
            seen += 1
    assert seen == len(want) == 12
    crack, dent = want["p0__a-crack"][1], want["p0__a-dent"][1]
    assert ((crack == 1) & (dent == 1)).any()  # overlapping objects each keep their pixels
    assert data.fit != "pad" or (crack == IGNORE).any()  # padding is ignore


def _synthetic(tmp_path: Path, name: str, **over) -> dict:
    cfg = PrepareConfig(synthetic=SyntheticConfig(num_images=30, image_size=32), **over)
    return prepare(cfg, 0, tmp_path / name, show_progress=False, data=DataConfig(crop=32))


def test_files_and_pixels_grow_with_images_not_prompts(tmp_path):
    one = _synthetic(tmp_path, "one", negatives_per_image=1)
    every = _synthetic(tmp_path, "every", negatives_per_image=0)  # every absent prompt
    assert every["negative_samples"] > 5 * one["negative_samples"]
    scenes = len(list((tmp_path / "one" / "images").iterdir()))  # the test scenes, as PNG
    assert scenes == one["test_negatives"] > 0  # one absent-object negative per image
    # shards, the tables (samples, images, instances, index), the test scenes
    assert every["files"] == one["files"] == 3 * 3 + 4 + scenes
    for split in ("train", "val", "test"):
        for kind in ("images", "labels"):
            name = f"{split}-{kind}-00000.u8"
            assert (tmp_path / "one" / name).read_bytes() == \
                (tmp_path / "every" / name).read_bytes(), name
        # The negatives of an image share one 256-byte table: no pixels at all.
        assert (tmp_path / "every" / f"{split}-luts-00000.u8").stat().st_size == \
            (tmp_path / "one" / f"{split}-luts-00000.u8").stat().st_size


def test_the_digest_changes_with_the_content(tmp_path):
    _synthetic(tmp_path, "a")
    _synthetic(tmp_path, "b")
    assert prepared_digest(tmp_path / "a") == prepared_digest(tmp_path / "b")
    prepare(PrepareConfig(synthetic=SyntheticConfig(num_images=30, image_size=32)), 1,
            tmp_path / "c", show_progress=False, data=DataConfig(crop=32))
    assert prepared_digest(tmp_path / "c") != prepared_digest(tmp_path / "a")


def test_a_truncated_shard_is_one_line(tmp_path):
    _synthetic(tmp_path, "a")
    path = tmp_path / "a" / "val-labels-00000.u8"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match=r"val-labels-00000.u8: \d+ bytes, index.json says"):
        PreparedSplit.open(tmp_path / "a", "val", DataConfig(crop=32))


def test_a_killed_prepare_leaves_the_previous_output_whole(tmp_path):
    _synthetic(tmp_path, "prepared")
    def files() -> dict[str, bytes]:
        return {str(f): f.read_bytes() for f in (tmp_path / "prepared").rglob("*")
                if f.is_file()}

    before = files()
    script = ("from cdsam.config.schema import DataConfig, PrepareConfig, SyntheticConfig\n"
              "from cdsam.data.prepare import prepare\n"
              "prepare(PrepareConfig(synthetic=SyntheticConfig(num_images=100000)), 0, "
              f"{str(tmp_path / 'prepared')!r}, show_progress=False, data=DataConfig())\n")
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 60
    while not list(tmp_path.glob(".prepared.*.tmp/*-images-*.u8")) and time.time() < deadline:
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(tmp_path.glob(".prepared.*.tmp"))  # killed half-way, mid-write
    assert files() == before
    read_samples(tmp_path / "prepared")  # still opens
    _synthetic(tmp_path, "prepared")  # the next run clears what the killed one left
    assert not list(tmp_path.glob(".prepared.*.tmp"))


def test_resharding_keeps_the_rows_digest_resume_states_are_keyed_by(tmp_path):
    """prepare.shard_images cuts the same rows into other files: the files' digest changes,
    the rows' (what a stage's resume state checks) does not."""
    from cdsam.config.schema import PrepareConfig, SyntheticConfig
    from cdsam.data.prepare import prepare
    from cdsam.data.prepared import prepared_digest, read_index
    from tests.conftest import tiny_params

    digests = []
    for n in (2, 5):
        cfg = PrepareConfig(val_fraction=0.25, test_fraction=0.0, shard_images=n,
                            synthetic=SyntheticConfig(num_images=12, image_size=32))
        prepare(cfg, seed=0, out=tmp_path / str(n), show_progress=False,
                data=tiny_params().data)
        index = read_index(tmp_path / str(n))
        assert len(index["splits"]["train"]["shards"]) == -(-9 // n)
        digests.append((index["digest"], prepared_digest(tmp_path / str(n))))
    assert digests[0][0] != digests[1][0] and digests[0][1] == digests[1][1]
