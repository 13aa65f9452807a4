"""`cdsam data check`: what a source holds per split, its bad files, exit 0/1, --json."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cdsam.config.schema import DataConfig, PrepareConfig
from cdsam.data.check import check_source
from cdsam.data.prepare import prepare
from cdsam.errors import DataError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "real-data"
VOC = SHARED / "voc-samples"
EM = SHARED / "isbi2012-em"


def _check(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cdsam.cli", "data", "check", "--no-progress",
                           *args], cwd=cwd, capture_output=True, text=True)


@pytest.mark.skipif(not VOC.is_dir(), reason="../shared/real-data/voc-samples is absent")
def test_the_shared_voc_samples_check_clean(tmp_path):
    r = _check("--source", "voc", "--root", str(VOC), "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["ok"] and not report["problems"]
    assert sum(s["images"] for s in report["splits"].values()) == 14
    person = report["splits"]["train"]["classes"].get("a photo of a person")
    assert person is None or 0 < person["pixel_share"] < 1


def _broken_folder(tmp_path: Path) -> Path:
    """Eight EM slices with one truncated image, one mask of another size and a second file
    of one stem (cell1.png and cell1.tif)."""
    root = tmp_path / "em"
    for d in ("images", "masks"):
        (root / d).mkdir(parents=True)
        for i in range(8):
            shutil.copy(EM / d / f"{i}.png", root / d / f"cell{i}.png")
    (root / "images" / "cell3.png").write_bytes((EM / "images" / "3.png").read_bytes()[:300])
    Image.open(EM / "masks" / "5.png").resize((100, 80)).save(root / "masks" / "cell5.png")
    Image.open(EM / "images" / "1.png").save(root / "images" / "cell1.tif")
    return root


@pytest.mark.skipif(not EM.is_dir(), reason="../shared/real-data/isbi2012-em is absent")
def test_a_corrupt_image_and_a_wrong_size_mask_are_both_listed(tmp_path):
    root = _broken_folder(tmp_path)
    args = ("--source", "folders", "--images", str(root / "images"), "--masks",
            str(root / "masks"), "--prompt", "a cell")
    r = _check(*args, cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "cell3.png: unreadable image" in r.stdout
    assert "cell5.png: mask is 100x80, its image is 512x512" in r.stdout
    assert "cell1.tif: same stem as cell1.png" in r.stdout
    report = json.loads(_check(*args, "--json", cwd=tmp_path).stdout)
    kinds = sorted(p["kind"] for p in report["problems"])
    assert kinds == ["duplicate", "size", "unreadable"] and not report["ok"]
    assert sum(s["images"] for s in report["splits"].values()) == 6  # the good ones
    # prepare stops at the first of them, one line naming it; nothing is written.
    cfg = PrepareConfig(source="folders", images=str(root / "images"),
                        masks=str(root / "masks"), prompt="a cell")
    with pytest.raises(DataError, match="cell1.tif: same stem as cell1.png"):
        prepare(cfg, 0, tmp_path / "p", show_progress=False)
    assert not (tmp_path / "p").exists()


def test_prepare_logs_the_check_it_passed(tmp_path, caplog):
    rng = np.random.default_rng(0)
    for d in ("images", "masks"):
        (tmp_path / d).mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
            tmp_path / "images" / f"a{i}.png")
        m = np.zeros((16, 16), np.uint8)
        m[: 2 * i] = 255  # a0 is an empty mask: a true negative
        Image.fromarray(m).save(tmp_path / "masks" / f"a{i}.png")
    cfg = PrepareConfig(source="folders", images=str(tmp_path / "images"),
                        masks=str(tmp_path / "masks"), prompt="a band")
    report = check_source(cfg, 0, show_progress=False)
    with caplog.at_level(logging.INFO, logger="cdsam"):
        prepare(cfg, 0, tmp_path / "p", show_progress=False, data=DataConfig(crop=16))
    assert report.render() in caplog.text
    assert sum(s.empty_masks for s in report.splits.values()) == 1
    assert sum(s.no_objects for s in report.splits.values()) == 1
    assert report.ok


def test_a_missing_folder_is_one_line_and_exit_2(tmp_path):
    r = _check("--source", "labelme", "--images", str(tmp_path / "nope"), cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"error: prepare.images: folder not found: {tmp_path / 'nope'}"]


def test_a_stem_in_two_splits_is_a_duplicate():
    """A COCO val file naming an image like a train one: its samples would share ids."""
    from cdsam.data.check import DataReport, ItemStats
    from cdsam.data.tasks import Task

    report = DataReport("coco", ["train", "val"])
    stats = ItemStats(100, [("a photo of a dog", 10, False)])
    for split in ("train", "val"):
        report.add(Task("000000000139", split, print), stats)
    assert not report.ok
    assert report.to_dict()["problems"] == [
        {"kind": "duplicate", "path": "000000000139", "reason": "stem in train and val"}]
    assert "duplicate   000000000139: stem in train and val" in report.render()
