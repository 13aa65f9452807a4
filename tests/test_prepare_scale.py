"""prepare at scale: workers give the same bytes as one process, shards append, splits stay."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from source_fixtures import WRITERS

from cdsam.config.parse import parse_params
from cdsam.config.schema import DataConfig, PrepareConfig, SyntheticConfig
from cdsam.data.manifest import stable_splits
from cdsam.data.prepare import prepare
from cdsam.data.prepared import PreparedSplit, read_index, read_samples
from cdsam.data.shards import auto_shard_images


def _files(root: Path) -> dict[str, bytes]:
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*"))
            if f.is_file()}


@pytest.mark.parametrize("fmt", ["synthetic", "labelme", "coco-like-instances"])
def test_two_workers_write_the_bytes_one_writes(tmp_path, fmt):
    if fmt == "synthetic":
        cfg = PrepareConfig(synthetic=SyntheticConfig(num_images=40, image_size=32))
    else:
        over = WRITERS["labelme" if fmt == "labelme" else "instances"](tmp_path / "src")
        cfg = parse_params({"prepare": over}).prepare
    out = {}
    for workers in (1, 2):
        cfg.workers = workers
        prepare(cfg, 0, tmp_path / f"w{workers}", show_progress=False,
                data=DataConfig(fit="crop", resize=40, crop=32))
        out[workers] = _files(tmp_path / f"w{workers}")
    assert out[1] == out[2]


def test_a_bad_file_in_a_worker_is_the_same_one_line(tmp_path):
    from cdsam.errors import DataError

    over = WRITERS["labelme"](tmp_path / "src")
    (tmp_path / "src" / "im5.png").write_bytes(b"not a png")
    cfg = parse_params({"prepare": {**over, "workers": 2}}).prepare
    with pytest.raises(DataError, match=r"im5.png: unreadable image"):
        prepare(cfg, 0, tmp_path / "p", show_progress=False, data=DataConfig(crop=32))


def test_stable_splits_keep_every_id_where_it_was():
    ids = [f"img{i:05d}" for i in range(2000)]
    before = stable_splits(ids, 0.2, 0.1, 7)
    after = stable_splits(ids + [f"new{i}" for i in range(300)], 0.2, 0.1, 7)
    assert all(after[i] == before[i] for i in ids)
    share = {s: sum(v == s for v in before.values()) / len(ids) for s in ("val", "test")}
    assert abs(share["val"] - 0.2) < 0.03 and abs(share["test"] - 0.1) < 0.03
    for n in (2, 3, 4):  # tiny sets: every split that is needed still gets an id
        got = set(stable_splits([f"a{i}" for i in range(n)], 0.2, 0.2, 0).values())
        assert got == {"train", "val", "test"}.intersection(["train", "val", "test"][:n])


def _folder(root: Path, stems: list[str]) -> dict:
    rng = np.random.default_rng(len(stems))
    for d in ("images", "masks"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for stem in stems:
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(
            root / "images" / f"{stem}.png")
        m = np.zeros((20, 24), np.uint8)
        m[rng.integers(0, 10):15, 3:rng.integers(8, 24)] = 255
        Image.fromarray(m).save(root / "masks" / f"{stem}.png")
    return {"source": "folders", "images": str(root / "images"), "masks": str(root / "masks"),
            "prompt": "a spot", "shard_images": 4}


def test_added_images_append_shards_and_leave_the_earlier_ones_alone(tmp_path):
    over = _folder(tmp_path / "src", [f"im{i:03d}" for i in range(40)])
    cfg = parse_params({"prepare": over}).prepare
    data = DataConfig(crop=24)
    prepare(cfg, 0, tmp_path / "a", show_progress=False, data=data)
    _folder(tmp_path / "src", [f"im{i:03d}" for i in range(40, 50)])  # 10 more, after them
    prepare(cfg, 0, tmp_path / "b", show_progress=False, data=data)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    index = read_index(tmp_path / "a")
    changed = {name for name in a if a[name] != b.get(name)}
    last = {f"{split}-{kind}-{len(info['shards']) - 1:05d}.u8"
            for split, info in index["splits"].items() for kind in ("images", "labels", "luts")}
    assert changed - last <= {"index.json", "samples.csv", "images.csv"}
    assert len(index["splits"]["train"]["shards"]) >= 5  # several shards per split
    assert len(b) > len(a)  # new shards for what did not fit the last ones
    # The reader maps rows across shards: each sample's mask as one-shard prepare gives it.
    cfg.shard_images = None
    prepare(cfg, 0, tmp_path / "one", show_progress=False, data=data)
    for split in ("train", "val", "test"):
        many, one = PreparedSplit.open(tmp_path / "b", split), PreparedSplit.open(
            tmp_path / "one", split)
        assert many.ids == one.ids
        order = np.random.default_rng(0).permutation(len(many))
        np.testing.assert_array_equal(many.masks(order), one.masks(order))
        rows = np.random.default_rng(1).permutation(len(many.image_keys))
        np.testing.assert_array_equal(many.image_rows(rows), one.image_rows(rows))
    assert set(read_samples(tmp_path / "a")["id"]) < set(read_samples(tmp_path / "b")["id"])


def test_the_default_shard_is_about_one_and_a_half_gigabytes():
    for crop in (64, 224, 518, 1024):
        per_image = 4 * crop * crop  # 3 image channels and a label map
        assert 1.2e9 < auto_shard_images(crop) * per_image <= 1.7e9
