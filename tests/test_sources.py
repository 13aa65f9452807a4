"""The annotation-tool sources (labelme, CVAT 1.1, YOLO-seg, instance PNGs): masks, negatives,
ignore regions, instances, bad files, and one stage trained through `dvc repro` on each."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from source_fixtures import IGNORE_REGIONS, WRITERS, cvat_rle, objects, truth
from test_pipeline import BIN, TINY_PIPELINE, _env, _merge, _project, _run

from cdsam.config.parse import parse_params
from cdsam.config.schema import DataConfig
from cdsam.data.manifest import IGNORE
from cdsam.data.prepare import prepare
from cdsam.data.prepared import PreparedSplit, read_index, read_instances, read_samples
from cdsam.errors import DataError

WHOLE = DataConfig(fit="pad", crop=32)  # the fixtures' size: masks keep their pixels


def _prepared(tmp_path: Path, fmt: str, **over) -> Path:
    cfg = parse_params({"prepare": {**WRITERS[fmt](tmp_path / fmt), **over}}).prepare
    prepare(cfg, 0, tmp_path / "p", show_progress=False, data=WHOLE)
    return tmp_path / "p"


def _masks(root: Path) -> dict[str, np.ndarray]:
    out = {}
    for split in read_index(root)["splits"]:
        p = PreparedSplit.open(root, split)
        out.update(zip(p.ids, p.masks(np.arange(len(p))), strict=True))
    return out


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_each_source_gives_the_boxes_it_holds(tmp_path, fmt):
    root = _prepared(tmp_path, fmt)
    masks = _masks(root)
    df = read_samples(root)
    assert set(df["prompt"]) == {"a photo of a cat", "a photo of a dog"}
    for i in range(1, 10):
        ignore = np.zeros((32, 32), bool)
        if fmt in IGNORE_REGIONS:
            for name, box in objects(i):
                if name == "__ignore__":
                    ignore |= truth(box)
        for name in ("cat", "dog"):
            want = np.zeros((32, 32), bool)
            for n, box in objects(i):
                want |= truth(box) if n == name else False
            got = masks[f"im{i}__a-photo-of-a-{name}"]
            np.testing.assert_array_equal(got == 1, want, err_msg=f"im{i} {name}")
            np.testing.assert_array_equal(got == IGNORE, ignore & ~want)
    # im0 has no object: a negative image, its samples absent-class draws with empty masks.
    im0 = df[df["image"] == "im0"]
    assert len(im0) == 1 and im0["negative"].all()
    assert not masks[im0["id"].iloc[0]].any()


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_each_source_keeps_its_objects_as_instances(tmp_path, fmt):
    root = _prepared(tmp_path, fmt)
    seen = 0
    for split in read_index(root)["splits"]:
        p = PreparedSplit.open(root, split)
        inst = read_instances(root, split)
        decoded = p.decode(inst["label_row"].to_numpy(), inst["lut"].to_numpy())
        for image, rows in inst.groupby("image"):
            i = int(image[2:])
            want = [truth(b) for n, b in objects(i) if n != "__ignore__"]
            got = [decoded[k] == 1 for k in rows.index]
            assert len(got) == len(want)
            for g in got:  # each object is one of the image's boxes (order is the format's)
                assert any((g == w).all() for w in want), image
            seen += len(got)
    assert seen == sum(len([o for o in objects(i) if o[0] != "__ignore__"]) for i in range(10))


def test_labelme_cvat_and_instance_pngs_prepare_the_same_bytes(tmp_path):
    """The same scenes written by three tools: one prepared folder, byte for byte."""
    roots = {}
    for fmt in ("labelme", "cvat", "instances"):
        roots[fmt] = _prepared(tmp_path / fmt, fmt)
    files = sorted(f.name for f in roots["labelme"].iterdir())
    assert "instances.csv" in files
    for fmt in ("cvat", "instances"):
        assert sorted(f.name for f in roots[fmt].iterdir()) == files
        for name in files:
            assert (roots[fmt] / name).read_bytes() == (roots["labelme"] / name).read_bytes(), \
                (fmt, name)


def test_yolo_splits_are_data_yamls_folders(tmp_path):
    root = _prepared(tmp_path, "yolo")
    splits = read_samples(root).groupby("image")["split"].first()
    assert set(splits[splits == "val"].index) == {"im7", "im8", "im9"}
    assert "test" not in read_index(root)["splits"]  # data.yaml lists none


def test_instance_pngs_without_a_table_are_one_class(tmp_path):
    over = WRITERS["instances"](tmp_path / "inst")
    over.pop("instance_classes")
    cfg = parse_params({"prepare": {**over, "prompt": "an object"}}).prepare
    prepare(cfg, 0, tmp_path / "p", show_progress=False, data=WHOLE)
    df = read_samples(tmp_path / "p")
    assert set(df["prompt"]) == {"an object"}
    # im2's ignore box is an object like any other here: no table says otherwise.
    assert sum(len(read_instances(tmp_path / "p", s)) for s in ("train", "val", "test")) == 20


def _break(fmt: str, root: Path) -> str:
    """Spoil one file of a fixture the way users' files go wrong; the name the error gives."""
    if fmt == "labelme":
        doc = json.loads((root / "im3.json").read_text())
        doc["shapes"][0]["points"][1] = [80, 3]
        (root / "im3.json").write_text(json.dumps(doc))
        return "im3.json: shape 0 ('cat'): a polygon point lies outside the image 32x32"
    if fmt == "cvat":
        xml = (root / "annotations.xml").read_text()
        rle = cvat_rle((3, 20, 9, 28))["rle"]
        (root / "annotations.xml").write_text(xml.replace(f'rle="{rle}"', 'rle="0, 7"'))
        return "annotations.xml: image im1.png: mask 2 ('dog'): RLE covers 7 pixels"
    if fmt == "yolo":
        (root / "labels" / "train" / "im3.txt").write_text("5 0.1 0.1 0.2 0.2\n")
        return "im3.txt: line 1: class 5 is not in names (2 classes)"
    table = (root / "classes.csv").read_text().splitlines()
    (root / "classes.csv").write_text("\n".join(r for r in table if not r.startswith("im4,"))
                                      + "\n")
    return "im4.png: instance 301 has no row in"


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_a_bad_file_is_one_line_naming_it(tmp_path, fmt):
    over = WRITERS[fmt](tmp_path / fmt)
    want = _break(fmt, tmp_path / fmt)
    cfg = parse_params({"prepare": over}).prepare
    with pytest.raises(DataError) as err:
        prepare(cfg, 0, tmp_path / "p", show_progress=False, data=WHOLE)
    assert want in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "p").exists()
    cfg.on_bad_file = "skip"
    assert prepare(cfg, 0, tmp_path / "p", show_progress=False, data=WHOLE)["skipped_files"] == 1


def test_labelme_images_without_a_json_are_listed_not_prepared(tmp_path):
    over = WRITERS["labelme"](tmp_path / "lm")
    (tmp_path / "lm" / "im9.json").unlink()
    from cdsam.data.check import check_source

    report = check_source(parse_params({"prepare": over}).prepare, 0, show_progress=False)
    assert report.ok and report.unannotated == [str(tmp_path / "lm" / "im9.png")]
    assert sum(s.images for s in report.splits.values()) == 9


@pytest.mark.slow
@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_each_source_trains_a_stage_through_dvc_repro(tmp_path, fmt):
    repo = tmp_path / "repo"
    from cdsam.presets import DEFAULT_PARAMS

    params = _merge(yaml.safe_load(DEFAULT_PARAMS.read_text()), TINY_PIPELINE)
    _project(repo, params)
    raw = repo / "data" / "raw" / fmt
    over = WRITERS[fmt](raw)
    rel = {k: str(Path(v).relative_to(repo)) if str(v).startswith(str(repo)) else v
           for k, v in over.items()}
    params["prepare"] = {**params["prepare"], **rel, "val_fraction": 0.3, "test_fraction": 0.0}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = _env(tmp_path)
    dvc = str(BIN / "dvc")
    for cmd in (["git", "init", "-q"], [dvc, "init", "-q"], ["git", "add", "-A"],
                ["git", "commit", "-qm", "init"]):
        _run(cmd, repo, env)
    out = _run([dvc, "repro", "stage1"], repo, env)
    assert "Running stage 'prepare'" in out and "Running stage 'stage1'" in out
    assert (repo / "models" / "stage1" / "model.safetensors").is_file()
    metrics = json.loads((repo / "metrics" / "stage1" / "metrics.json").read_text())
    assert 0 <= metrics["val"]["miou"] <= 1
    prepared = json.loads((repo / "metrics" / "prepare.json").read_text())
    assert prepared["instances"] == 19 and prepared["images"] == 10
    shutil.rmtree(repo / ".dvc" / "cache", ignore_errors=True)
