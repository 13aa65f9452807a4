"""`cdsam predict --instances`: the objects as files other tools open, read back by those
tools' own library (pycocotools) and by `prepare`'s labelme and CVAT sources."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from cdsam import cli
from cdsam.config.parse import parse_params, to_dict
from cdsam.config.schema import DataConfig, SyntheticConfig
from cdsam.data.prepare import prepare
from cdsam.data.prepared import PreparedSplit, read_index, read_instances, read_samples
from cdsam.data.sources.cvat import rle_mask
from cdsam.data.sources.synthetic import make_scene
from cdsam.inference.instance_files import cvat_rle, labelme_shapes
from cdsam.models.checkpoint import CheckpointMeta, save_checkpoint
from cdsam.models.model import build_model
from tests.conftest import tiny_params

PROMPTS = ["a red circle", "a blue square"]
SIZE = 32  # the tiny model's input: prepare at this crop keeps every pixel


def _checkpoint(path, instances: bool = True, min_quality: float | None = None):
    """A tiny checkpoint whose centre head peaks steeply (objects to return); ``min_quality``:
    what it stores as chosen on val (else none: the default applies)."""
    p = tiny_params()
    cfg = dataclasses.replace(p.model, heads=dataclasses.replace(p.model.heads,
                                                                 instances=instances))
    model = build_model(cfg, seed=0)
    if instances:
        with torch.no_grad():  # a centre head with steep peaks: objects to return
            model.centre_head.body[-1].weight.mul_(50.0)
            model.centre_head.body[-1].bias.add_(4.0)
    extra = {"data": to_dict(p.data)}
    if min_quality is not None:
        extra["instance_min_quality"] = {"prompts": min_quality, "watershed": min_quality}
    save_checkpoint(path, model, CheckpointMeta(stage=1, model=to_dict(cfg), prompts=PROMPTS,
                                                extra=extra))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("objects")
    images = root / "in"
    images.mkdir()
    for i in range(8):
        scene, _ = make_scene(0, i, SyntheticConfig(image_size=SIZE))
        scene.save(images / f"s{i}.png")
    out = root / "out"
    with pytest.raises(SystemExit) as exc:
        cli.main(["predict", "--checkpoint", str(_checkpoint(root / "ckpt")), "--input",
                  str(images), *[a for p in PROMPTS for a in ("--prompt", p)], "--out",
                  str(out), "--instances", "--format", "coco", "--format", "labelme",
                  "--format", "cvat", "--min-quality", "0", "--no-progress"])
    assert exc.value.code == 0
    return images, out


def _coco(out):
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(out / "coco.json"))


def _objects(coco: COCO) -> dict[tuple[str, str], list[np.ndarray]]:
    """(image file stem, category name) → the objects' masks."""
    found: dict[tuple[str, str], list[np.ndarray]] = {}
    for ann in coco.dataset["annotations"]:
        stem = coco.imgs[ann["image_id"]]["file_name"].rsplit(".", 1)[0]
        name = coco.cats[ann["category_id"]]["name"]
        found.setdefault((stem, name), []).append(coco.annToMask(ann).astype(bool))
    return found


def _prepared(root) -> dict[tuple[str, str], list[np.ndarray]]:
    """(image stem, prompt) → the objects prepare keeps."""
    found: dict[tuple[str, str], list[np.ndarray]] = {}
    for split in read_index(root)["splits"]:
        p = PreparedSplit.open(root, split)
        inst = read_instances(root, split)
        masks = p.decode(inst["label_row"].to_numpy(), inst["lut"].to_numpy()) == 1
        for (image, prompt), m in zip(zip(inst["image"], inst["prompt"], strict=True), masks,
                                      strict=True):
            found.setdefault((image, prompt), []).append(m)
    return found


def _same_objects(got, want):
    """Equal counts per (image, prompt) and each wanted object read back at IoU >= 0.95."""
    assert {k: len(v) for k, v in got.items()} == {k: len(v) for k, v in want.items() if v}
    for key, objects in want.items():
        for w in objects:
            best = max((g & w).sum() / (g | w).sum() for g in got[key])
            assert best >= 0.95, key


def test_the_run_finds_objects_and_lists_them_alike_in_every_file(run):
    _, out = run
    coco = _coco(out)
    rows = list(csv_rows(out))
    assert len(coco.dataset["annotations"]) == len(rows) > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["instances"]["objects"] == len(rows)
    assert summary["instances"]["formats"] == ["coco", "labelme", "cvat"]
    # COCO results load against the annotation file with pycocotools' own loader.
    with contextlib.redirect_stdout(io.StringIO()):
        res = coco.loadRes(str(out / "coco_results.json"))
    assert len(res.dataset["annotations"]) == len(rows)
    for a, r in zip(coco.dataset["annotations"], res.dataset["annotations"], strict=True):
        assert (coco.annToMask(a) == res.annToMask(r)).all() and a["score"] == r["score"]
    # summary.csv counts each (image, prompt)'s objects.
    per_pair = {(r["image"], r["prompt"]): int(r["objects"]) for r in csv_rows(out, "summary")}
    assert sum(per_pair.values()) == len(rows)


def csv_rows(out, name="instances"):
    import pandas as pd

    return pd.read_csv(out / f"{name}.csv").to_dict("records")


def test_the_id_png_shows_each_pixels_best_object(run):
    _, out = run
    coco = _coco(out)
    by_image = {}
    for ann in coco.dataset["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    for image_id, anns in by_image.items():
        stem = coco.imgs[image_id]["file_name"].rsplit(".", 1)[0]
        ids = np.asarray(Image.open(out / f"{stem}__instances.png"))
        assert ids.dtype == np.uint16 and ids.shape == (SIZE, SIZE)
        masks = [coco.annToMask(a).astype(bool) for a in anns]
        scores = np.array([a["score"] for a in anns])
        covered = np.any(masks, axis=0)
        assert ((ids > 0) == covered).all()
        for y, x in zip(*np.nonzero(covered), strict=True):
            holders = [k for k, m in enumerate(masks) if m[y, x]]
            assert scores[ids[y, x] - 1] == scores[holders].max()


def test_prepare_reads_the_cvat_file_back_as_the_same_objects(run, tmp_path):
    images, out = run
    cfg = parse_params({"prepare": {
        "source": "cvat", "annotations": str(out / "cvat.xml"), "images": str(images),
        "prompt_template": "{}", "negatives": "none", "val_fraction": 0.25,
        "test_fraction": 0.0}}).prepare
    prepare(cfg, 0, tmp_path / "p", show_progress=False, data=DataConfig(fit="pad", crop=SIZE))
    _same_objects(_prepared(tmp_path / "p"), _objects(_coco(out)))


def test_prepare_reads_the_labelme_files_back_as_the_id_png_shows_them(run, tmp_path):
    _, out = run
    cfg = parse_params({"prepare": {
        "source": "labelme", "images": str(out / "labelme"), "prompt_template": "{}",
        "negatives": "none", "val_fraction": 0.25, "test_fraction": 0.0}}).prepare
    prepare(cfg, 0, tmp_path / "p", show_progress=False, data=DataConfig(fit="pad", crop=SIZE))
    # labelme gives an overlapped pixel to the last shape (the better object), as the id
    # PNG does: the objects it reads are the id PNG's.
    rows = csv_rows(out)
    want: dict[tuple[str, str], list[np.ndarray]] = {}
    for stem in {r["image"].rsplit("/", 1)[1].rsplit(".", 1)[0] for r in rows}:
        ids = np.asarray(Image.open(out / f"{stem}__instances.png"))
        for r in rows:
            if r["image"].endswith(f"/{stem}.png") and (ids == r["id"]).any():
                want.setdefault((stem, r["prompt"]), []).append(ids == r["id"])
    assert set(read_samples(tmp_path / "p")["prompt"]) <= set(PROMPTS)
    _same_objects(_prepared(tmp_path / "p"), want)


def test_cvat_runs_and_labelme_polygons_redraw_the_mask_they_came_from():
    rng = np.random.default_rng(0)
    for _ in range(20):
        m = np.zeros((24, 30), bool)
        y, x = rng.integers(0, 20), rng.integers(0, 26)
        m[y:y + rng.integers(1, 5), x:x + rng.integers(1, 5)] = True
        m[y, x] = bool(rng.integers(0, 2)) or m[y, x]
        rle, left, top, width, height = cvat_rle(m)
        attrs = {"rle": rle, "left": str(left), "top": str(top), "width": str(width),
                 "height": str(height)}
        assert (rle_mask(attrs, (30, 24)) == m).all()
    from cdsam.data.sources.labelme import paint

    disk = np.zeros((40, 40), bool)
    yy, xx = np.mgrid[:40, :40]
    disk[(yy - 20) ** 2 + (xx - 18) ** 2 <= 81] = True
    line = np.zeros((40, 40), bool)
    line[3, 5:12] = True  # one pixel wide: a rectangle, not a polygon
    ring = np.zeros((40, 40), bool)
    ring[30:38, 30:38] = True
    ring[32:36, 32:36] = False  # a hole no polygon of labelme's keeps: a mask shape
    shapes = (labelme_shapes(disk, "a", 1, 0.9) + labelme_shapes(line, "b", 2, 0.8)
              + labelme_shapes(ring, "c", 3, 0.7))
    assert [s["shape_type"] for s in shapes] == ["polygon", "rectangle", "mask"]
    objects, _ = paint(shapes, ["a", "b", "c"], (40, 40))
    assert [o[0] for o in objects] == ["a", "b", "c"]
    for (_, got), want in zip(objects, (disk, line, ring), strict=True):
        assert (got == want).all()


def test_instances_from_a_checkpoint_without_the_heads_is_one_line(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "old", instances=False)
    Image.new("RGB", (SIZE, SIZE)).save(tmp_path / "x.png")
    with pytest.raises(SystemExit) as exc:
        cli.main(["predict", "--checkpoint", str(ckpt), "--image", str(tmp_path / "x.png"),
                  "--prompt", "a red circle", "--out", str(tmp_path / "out"), "--instances",
                  "--no-progress"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(ckpt) in err[0] and "no instance heads" in err[0]
    assert not (tmp_path / "out" / "summary.json").exists()


def test_the_python_api_returns_each_prompts_objects_at_the_images_size(tmp_path):
    from cdsam.errors import UserError
    from cdsam.inference.predictor import load_model

    predictor = load_model(_checkpoint(tmp_path / "ckpt"), min_quality=0.0)
    image = np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    pred = predictor.predict(image, PROMPTS, instances=True)
    assert [o.prompt for o in pred.instances] == PROMPTS
    assert sum(len(o) for o in pred.instances) > 0
    for o in pred.instances:
        assert o.masks.shape[1:] == (40, 56) and o.masks.reshape(len(o), -1).any(axis=1).all()
        assert (np.diff(o.scores) <= 0).all()  # best first
        for m, (x0, y0, x1, y1) in zip(o.masks, o.boxes, strict=True):
            ys, xs = np.nonzero(m)
            assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    # The semantic masks are the ones predict gives without instances.
    plain = predictor.predict(image, PROMPTS)
    assert (plain.masks == pred.masks).mean() > 0.999
    with pytest.raises(UserError, match="from the text alone"):
        predictor.predict(image, PROMPTS, points=[(3, 4)], instances=True)


def test_the_predict_bench_times_each_decode_path(tmp_path):
    from cdsam.inference.bench import synthetic_inputs, time_predict

    images = synthetic_inputs(tmp_path / "in", count=2)
    r = time_predict(_checkpoint(tmp_path / "ckpt"), images, PROMPTS, repeats=1,
                     device="cpu")
    assert r["semantic"]["decoder_rows_per_image"] == len(PROMPTS)
    assert r["watershed"]["decoder_rows_per_image"] == len(PROMPTS)  # no rows beyond
    assert r["prompts"]["decoder_rows_per_image"] > len(PROMPTS)  # one a seed
    assert all(v["images_per_s"] > 0 for v in r.values())
