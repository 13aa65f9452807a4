"""Each reader follows the rules of the tool that wrote its files, checked on files shaped as the
tool writes them and, where the tool's own function is light, against that function itself:
labelme's ``shapes_to_label``, Ultralytics' ``polygon2mask``, pycocotools."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from cdsam.config.parse import parse_params
from cdsam.data.manifest import IGNORE, BadFiles
from cdsam.data.sources.draw import coco_polygon, cv2_polygon, pil_polygon
from cdsam.data.sources.labelme import paint
from cdsam.data.sources.listing import source_tasks
from cdsam.data.tasks import Item
from cdsam.errors import UserError

RED = (255, 0, 0)


def _items(**prepare) -> dict[str, Item]:
    cfg = parse_params({"prepare": {"negatives": "absent", "negatives_per_image": 0,
                                    **prepare}}).prepare
    bad = BadFiles()
    tasks, _ = source_tasks(cfg, 0, bad)
    out = {}
    for task in tasks:
        item = task.run(bad)
        assert item is not None, bad.problems
        out[task.stem] = item
    return out


def _masks(item: Item) -> dict[str, np.ndarray]:
    return {s.prompt: s.mask for s in item.samples}


def _exif_jpeg(path: Path, stored: np.ndarray, orientation: int) -> None:
    """A JPEG stored as ``stored`` (HxWx3) with an EXIF Orientation tag, as phones write."""
    im = Image.fromarray(stored)
    exif = im.getexif()
    exif[0x0112] = orientation
    im.save(path, quality=100, subsampling=0, exif=exif)


def _red_block(h: int, w: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    a = np.full((h, w, 3), 40, np.uint8)
    a[y0:y1, x0:x1] = RED
    return a


def _is_red(image: Image.Image) -> np.ndarray:
    a = np.asarray(image).astype(int)
    return (a[..., 0] > 200) & (a[..., 1] < 60)


# --- EXIF orientation ---------------------------------------------------------------------

def test_yolo_reads_a_rotated_phone_photo_as_displayed(tmp_path):
    """Orientation 3 (stored upside down): the label, drawn on the upright photo as
    Ultralytics shows it, covers the red block there."""
    root = tmp_path / "yolo"
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        # Stored: red at the bottom right; displayed (turned 180°): top left, x 0..8, y 0..6.
        _exif_jpeg(root / "images" / split / f"{split}.jpg",
                   _red_block(24, 32, 24, 18, 32, 24), 3)
        (root / "labels" / split / f"{split}.txt").write_text(
            "0 0 0 0.25 0 0.25 0.25 0 0.25\n")
    (root / "data.yaml").write_text(yaml.safe_dump(
        {"train": "images/train", "val": "images/val", "names": ["block"]}))
    item = _items(source="yolo", annotations=str(root / "data.yaml"))["train"]
    assert item.image.size == (32, 24)
    fg = _masks(item)["a photo of a block"] == 1
    red = _is_red(item.image)
    assert red[:6, :8].all() and (fg & red).sum() == red.sum() == 48


def test_labelme_reads_a_sideways_photo_as_displayed(tmp_path):
    """Orientation 6 (stored turned; displayed 90° clockwise): the JSON's size is the upright
    one, and its polygon covers the red block on the upright photo."""
    root = tmp_path / "lm"
    root.mkdir()
    # Stored 32 wide x 16 high, red in the top-left 4x8 (x 0..4, y 0..8). Displayed: 16 wide,
    # 32 high, red at x 8..16, y 0..4.
    _exif_jpeg(root / "a.jpg", _red_block(16, 32, 0, 0, 4, 8), 6)
    shape = {"label": "block", "points": [[8, 0], [15, 0], [15, 3], [8, 3]],
             "shape_type": "polygon", "group_id": None, "flags": {}}
    (root / "a.json").write_text(json.dumps({"shapes": [shape], "imagePath": "a.jpg",
                                             "imageData": None, "imageHeight": 32,
                                             "imageWidth": 16}))
    item = _items(source="labelme", images=str(root))["a"]
    assert item.image.size == (16, 32)
    red = _is_red(item.image)
    assert red[0:4, 8:16].all() and red.sum() == 32
    np.testing.assert_array_equal(_masks(item)["a photo of a block"] == 1, red)


def test_predict_reads_images_upright(tmp_path):
    from cdsam.inference.predictor import to_pil

    _exif_jpeg(tmp_path / "p.jpg", _red_block(16, 32, 0, 0, 4, 8), 6)
    assert to_pil(tmp_path / "p.jpg").size == (16, 32)
    with Image.open(tmp_path / "p.jpg") as im:
        assert to_pil(im).size == (16, 32)


# --- labelme ------------------------------------------------------------------------------

def _png_b64(a: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_labelme_embedded_image_wins_over_image_path(tmp_path):
    """labelme's tutorial files: ``imageData`` set, ``imagePath`` naming the JSON itself."""
    root = tmp_path / "lm"
    root.mkdir()
    pixels = _red_block(20, 30, 0, 0, 5, 5)
    shape = {"label": "block", "points": [[0, 0], [4, 4]], "shape_type": "rectangle"}
    (root / "apc.json").write_text(json.dumps({
        "shapes": [shape], "imagePath": "apc.json", "imageData": _png_b64(pixels),
        "imageHeight": 20, "imageWidth": 30}))
    item = _items(source="labelme", images=str(root))["apc"]
    np.testing.assert_array_equal(np.asarray(item.image), pixels)
    assert (_masks(item)["a photo of a block"] == 1).sum() == 25


@pytest.mark.parametrize("image_path", ["../images/x.png", "..\\images\\x.png"])
def test_labelme_image_path_is_relative_to_the_json(tmp_path, image_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "json").mkdir()
    Image.fromarray(_red_block(20, 30, 0, 0, 5, 5)).save(tmp_path / "images" / "x.png")
    shape = {"label": "block", "points": [[0, 0], [4, 4]], "shape_type": "rectangle"}
    (tmp_path / "json" / "x.json").write_text(json.dumps({
        "shapes": [shape], "imagePath": image_path, "imageData": None, "imageHeight": 20,
        "imageWidth": 30}))
    item = _items(source="labelme", images=str(tmp_path / "json"))["x"]
    assert _is_red(item.image).sum() == 25


def _labelme_scene() -> tuple[list[dict], np.ndarray]:
    """Overlapping shapes of every area type, in an order where it matters."""
    part = np.zeros((6, 9), np.uint8)
    part[1:5, 2:8] = 255
    shapes = [
        {"label": "cat", "points": [[2, 2], [40, 3], [38, 30], [4, 28]], "shape_type": "polygon"},
        {"label": "_background_", "points": [[10, 10], [20, 20]], "shape_type": "rectangle"},
        {"label": "__ignore__", "points": [[30, 20], [30, 27]], "shape_type": "circle"},
        {"label": "dog", "points": [[34, 14], [47, 30]], "shape_type": "rectangle"},
        {"label": "cat", "points": [[44, 2], [47, 2], [47, 12], [44, 12]],
         "shape_type": "polygon", "group_id": 1},
        {"label": "cat", "points": [[44.7, 25.2], [52.9, 30.8]], "shape_type": "mask",
         "group_id": 1, "mask": _png_b64(part)},
        {"label": "dog", "points": [[5, 40], [25, 34], [28, 44], [8, 50]],
         "shape_type": "oriented_rectangle"},
        {"label": "__ignore__", "points": [[6, 41], [12, 41], [12, 47]], "shape_type": "polygon"},
        {"label": "dog", "points": [[2, 36], [9, 36]], "shape_type": "line"},
    ]
    return shapes, part


def test_labelme_paints_shapes_in_order_as_shapes_to_label_does():
    shapes_to_label = pytest.importorskip("labelme.utils.shape").shapes_to_label
    shapes, part = _labelme_scene()
    size = (60, 56)  # width, height
    classes = ["cat", "dog"]
    got = paint(shapes, classes, size)
    assert not isinstance(got, str), got
    objects, seen = got
    # The oracle: labelme's own painter (its loader turns a mask shape's PNG into an array;
    # line shapes, which cdsam does not paint, left out).
    theirs = [dict(s, mask=part > 0) if s["shape_type"] == "mask" else s for s in shapes
              if s["shape_type"] != "line"]
    values = {"_background_": 0, "__ignore__": -1, "cat": 1, "dog": 2}
    cls, ins = shapes_to_label((size[1], size[0]), theirs, values)
    for name, value in values.items():
        if value <= 0 and name != "__ignore__":
            continue
        mine = np.zeros(cls.shape, bool)
        for n, m in objects:
            if n == name:
                mine |= m
        np.testing.assert_array_equal(mine, cls == value, err_msg=name)
    want = [ins == k for k in np.unique(ins) if k and (ins == k).any()
            and cls[ins == k][0] > 0]
    mine = [m for n, m in objects if n != "__ignore__"]
    assert len(mine) == len(want) == 4  # cat, dog, cat group 1 (two shapes), oriented dog
    for m in mine:
        assert any((m == w).all() for w in want)
    assert seen == {"cat", "dog"}


def test_labelme_background_carves_and_later_ignore_wins(tmp_path):
    shapes, _ = _labelme_scene()
    root = tmp_path / "lm"
    root.mkdir()
    Image.new("RGB", (60, 56)).save(root / "s.png")
    (root / "s.json").write_text(json.dumps({"shapes": shapes, "imagePath": "s.png",
                                             "imageData": None, "imageHeight": 56,
                                             "imageWidth": 60}))
    masks = _masks(_items(source="labelme", images=str(root))["s"])
    cat, dog = masks["a photo of a cat"], masks["a photo of a dog"]
    assert (cat[10:21, 10:21] == 0).all()  # the _background_ hole
    assert dog[43, 11] == IGNORE  # the later __ignore__ polygon over the oriented dog
    assert dog[20, 35] == 1  # the later dog over the earlier ignore circle


# --- lines, points, skeletons: never "absent" ---------------------------------------------

def _labelme_files(root: Path, files: dict[str, list[dict]]) -> None:
    root.mkdir(parents=True)
    for stem, shapes in files.items():
        Image.new("RGB", (32, 32)).save(root / f"{stem}.png")
        (root / f"{stem}.json").write_text(json.dumps({
            "shapes": shapes, "imagePath": f"{stem}.png", "imageData": None,
            "imageHeight": 32, "imageWidth": 32}))


def test_labelme_label_drawn_as_a_line_is_neither_positive_nor_absent(tmp_path):
    crack_line = {"label": "crack", "points": [[2, 2], [20, 20], [25, 5]],
                  "shape_type": "linestrip"}
    crack = {"label": "crack", "points": [[2, 2], [20, 2], [20, 9]], "shape_type": "polygon"}
    dent = {"label": "dent", "points": [[5, 5], [9, 9]], "shape_type": "rectangle"}
    pin = {"label": "pin", "points": [[3, 3]], "shape_type": "point"}  # points only, anywhere
    _labelme_files(tmp_path / "lm", {"a": [crack_line, dent, pin], "b": [crack], "c": []})
    items = _items(source="labelme", images=str(tmp_path / "lm"))
    prompts = {stem: {s.prompt: s.absent for s in item.samples} for stem, item in items.items()}
    assert prompts["a"] == {"a photo of a dent": False}  # no crack sample, positive or not
    assert prompts["b"] == {"a photo of a crack": False, "a photo of a dent": True}
    assert prompts["c"] == {"a photo of a crack": True, "a photo of a dent": True}


def _cvat_xml(images: list[str], labels: str) -> str:
    return ('<?xml version="1.0" encoding="utf-8"?>\n<annotations><version>1.1</version>'
            f'<meta><task><labels>{labels}</labels></task></meta>{"".join(images)}'
            '</annotations>\n')


SKELETON_LABELS = (
    "<label><name>person</name><type>skeleton</type></label>"
    "<label><name>nose</name><type>points</type><parent>person</parent></label>"
    "<label><name>crack</name><type>any</type></label>"
    "<label><name>dent</name><type>any</type></label>")


def test_cvat_polylines_points_and_skeletons_are_never_absent_nor_classes(tmp_path):
    root = tmp_path / "cvat"
    (root / "images").mkdir(parents=True)
    for stem in "abc":
        Image.new("RGB", (32, 32)).save(root / "images" / f"{stem}.png")
    common = 'source="manual" occluded="0" z_order="0"'
    a = ('<image id="0" name="a.png" width="32" height="32">'
         f'<polyline label="crack" {common} points="2,2;20,20;25,5"></polyline>'
         f'<box label="dent" {common} xtl="5" ytl="5" xbr="10" ybr="10"></box>'
         f'<skeleton label="person" {common}><points label="nose" {common} points="4,4">'
         '</points></skeleton></image>')
    b = ('<image id="1" name="b.png" width="32" height="32">'
         f'<polygon label="crack" {common} points="2,2;20,2;20,9"></polygon></image>')
    c = '<image id="2" name="c.png" width="32" height="32"></image>'
    (root / "a.xml").write_text(_cvat_xml([a, b, c], SKELETON_LABELS))
    items = _items(source="cvat", images=str(root / "images"), annotations=str(root / "a.xml"))
    prompts = {stem: {s.prompt: s.absent for s in item.samples} for stem, item in items.items()}
    # person (a skeleton) and nose (its keypoint) have no area anywhere: not classes.
    assert prompts["a"] == {"a photo of a dent": False}
    assert prompts["b"] == {"a photo of a crack": False, "a photo of a dent": True}
    assert prompts["c"] == {"a photo of a crack": True, "a photo of a dent": True}


def test_cvat_rotation_turns_boxes_and_ellipses(tmp_path):
    root = tmp_path / "cvat"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(root / "images" / "r.png")
    common = 'source="manual" occluded="0" z_order="0"'
    # A 30x6 box (pixels 17..46 x 29..34) turned 90° about its centre (32, 32): 6x30 standing.
    r = ('<image id="0" name="r.png" width="64" height="64">'
         f'<box label="bar" {common} xtl="17" ytl="29" xbr="47" ybr="35" rotation="90.0"></box>'
         f'<ellipse label="egg" {common} cx="32" cy="32" rx="20" ry="4" rotation="90.0">'
         '</ellipse></image>')
    (root / "a.xml").write_text(_cvat_xml([r], "<label><name>bar</name></label>"
                                               "<label><name>egg</name></label>"))
    masks = _masks(_items(source="cvat", images=str(root / "images"),
                          annotations=str(root / "a.xml"))["r"])
    bar = masks["a photo of a bar"] == 1
    want = np.zeros((64, 64), bool)
    want[17:47, 29:35] = True
    np.testing.assert_array_equal(bar, want)
    ys, xs = np.nonzero(masks["a photo of a egg"] == 1)
    assert (ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) == (41, 9)  # standing


# --- YOLO data.yaml -----------------------------------------------------------------------

def _yolo_image(folder: Path, stem: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32)).save(folder / f"{stem}.jpg")
    labels = Path(str(folder).replace("images", "labels"))
    labels.mkdir(parents=True, exist_ok=True)
    (labels / f"{stem}.txt").write_text("0 0.1 0.1 0.5 0.1 0.5 0.5\n")
    return folder / f"{stem}.jpg"


def test_yolo_reads_image_lists_as_cvat_exports_them(tmp_path):
    """CVAT's "Ultralytics YOLO" export: data.yaml names train.txt / val.txt, one image a line."""
    root = tmp_path / "export"
    for split, stems in (("train", ["a", "b"]), ("val", ["c"])):
        for stem in stems:
            _yolo_image(root / "images" / split, stem)
        (root / f"{split}.txt").write_text(
            "".join(f"images/{split}/{s}.jpg\n" for s in stems))
    _yolo_image(root / "images" / "train", "unlisted")
    (root / "data.yaml").write_text(yaml.safe_dump(
        {"path": ".", "train": "train.txt", "val": "val.txt", "names": {0: "cat"}}))
    items = _items(source="yolo", annotations=str(root / "data.yaml"))
    assert sorted(items) == ["a", "b", "c"]


def test_yolo_reads_roboflow_parent_paths_and_lists_relative_to_the_list(tmp_path):
    """Roboflow writes data.yaml with ``train: ../train/images`` beside train/ and valid/."""
    root = tmp_path / "rf"
    _yolo_image(root / "train" / "images", "a")
    _yolo_image(root / "valid" / "images", "b")
    (root / "lists").mkdir()
    (root / "lists" / "val.txt").write_text("./../valid/images/b.jpg\n")
    (root / "data.yaml").write_text(yaml.safe_dump(
        {"train": "../train/images", "val": "lists/val.txt", "nc": 1, "names": ["cat"]}))
    items = _items(source="yolo", annotations=str(root / "data.yaml"))
    assert sorted(items) == ["a", "b"]


def test_yolo_path_relative_to_the_run_directory(tmp_path, monkeypatch):
    """A ``path:`` given from where the tool runs (the repo root), as Ultralytics reads it."""
    monkeypatch.chdir(tmp_path)
    _yolo_image(tmp_path / "data" / "raw" / "ds" / "images" / "train", "a")
    _yolo_image(tmp_path / "data" / "raw" / "ds" / "images" / "val", "b")
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "data.yaml").write_text(yaml.safe_dump(
        {"path": "data/raw/ds", "train": "images/train", "val": "images/val",
         "names": ["cat"]}))
    assert sorted(_items(source="yolo", annotations="cfg/data.yaml")) == ["a", "b"]


def test_yolo_drops_repeated_label_rows(tmp_path):
    root = tmp_path / "ds"
    for split in ("train", "val"):
        _yolo_image(root / "images" / split, split)
    row = "0 0.1 0.1 0.5 0.1 0.5 0.5\n"
    (root / "labels" / "train" / "train.txt").write_text(row + "0 0.6 0.6 0.9 0.6 0.9 0.9\n" + row)
    (root / "data.yaml").write_text(yaml.safe_dump(
        {"train": "images/train", "val": "images/val", "names": ["cat"]}))
    assert len(_items(source="yolo", annotations=str(root / "data.yaml"))["train"].instances) == 2


def test_yolo_folders_outside_data_raw_are_refused(tmp_path, monkeypatch):
    """A data.yaml under data/raw naming images elsewhere: DVC would not see them change."""
    from cdsam.config.stage_view import check_paths_tracked
    from cdsam.data.sources.yolo import yolo_inputs

    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(
        {"stages": {"prepare": {"cmd": "x", "deps": ["data/raw"]}}}))
    _yolo_image(tmp_path / "elsewhere" / "images" / "train", "a")
    _yolo_image(tmp_path / "data" / "raw" / "ds" / "images" / "val", "b")
    (tmp_path / "data" / "raw" / "ds" / "data.yaml").write_text(yaml.safe_dump(
        {"train": "../../../elsewhere/images/train", "val": "images/val", "names": ["cat"]}))
    cfg = parse_params({"prepare": {"source": "yolo",
                                    "annotations": "data/raw/ds/data.yaml"}}).prepare
    with pytest.raises(UserError, match="outside the folders dvc.yaml"):
        check_paths_tracked("prepare", yolo_inputs(cfg), tmp_path / "dvc.yaml")
    (tmp_path / "data" / "raw" / "ds" / "data.yaml").write_text(yaml.safe_dump(
        {"train": "images/val", "val": "images/val", "names": ["cat"]}))
    check_paths_tracked("prepare", yolo_inputs(cfg), tmp_path / "dvc.yaml")


# --- alpha masks --------------------------------------------------------------------------

@pytest.mark.parametrize("mask_format", ["binary", "per_class"])
def test_masks_with_an_alpha_channel(tmp_path, mask_format):
    (tmp_path / "images").mkdir()
    masks = tmp_path / "masks" / ("thing" if mask_format == "per_class" else "")
    masks.mkdir(parents=True)
    for stem in ("opaque", "strokes"):
        Image.new("RGB", (16, 16)).save(tmp_path / "images" / f"{stem}.png")
    opaque = np.zeros((16, 16, 4), np.uint8)
    opaque[..., 3] = 255  # fully opaque black, white where the object is
    opaque[2:6, 2:6, :3] = 255
    Image.fromarray(opaque, "RGBA").save(masks / "opaque.png")
    strokes = np.zeros((16, 16, 4), np.uint8)
    strokes[8:12, 3:9, 3] = 255  # black strokes on a transparent canvas
    Image.fromarray(strokes, "RGBA").save(masks / "strokes.png")
    extra = {"classes": ["thing"]} if mask_format == "per_class" else {"prompt": "a thing"}
    items = _items(source="folders", images=str(tmp_path / "images"),
                   masks=str(tmp_path / "masks"), mask_format=mask_format, **extra)
    for stem, count in (("opaque", 16), ("strokes", 24)):
        (mask,) = [s.mask for s in items[stem].samples if not s.absent]
        assert (mask == 1).sum() == count, stem


def test_instance_png_void_border_is_ignore(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "images" / "v.png")
    ids = np.zeros((16, 16), np.uint8)
    ids[2:8, 2:8] = 255  # VOC SegmentationObject: the void border around object 1
    ids[3:7, 3:7] = 1
    Image.fromarray(ids).save(tmp_path / "masks" / "v.png")
    item = _items(source="folders", images=str(tmp_path / "images"),
                  masks=str(tmp_path / "masks"), mask_format="instances", prompt="a cell")["v"]
    assert len(item.instances) == 1
    (mask,) = [s.mask for s in item.samples]
    assert (mask == 1).sum() == 16 and (mask == IGNORE).sum() == 20


# --- one polygon, each tool's pixels ------------------------------------------------------

def test_each_source_rasterizes_as_its_tool():
    square = [(0, 0), (10, 0), (10, 10), (0, 10)]
    assert pil_polygon(square, (20, 20)).sum() == 121  # labelme
    assert coco_polygon(square, (20, 20)).sum() == 100  # COCO, CVAT
    assert cv2_polygon(square, (20, 20)).sum() == 121  # Ultralytics


ULTRALYTICS_ORACLE = """
import json, sys
import numpy as np
from ultralytics.data.utils import polygon2mask
polygons, size, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
np.save(out, np.stack([polygon2mask(tuple(size), [np.asarray(p, float)]) for p in polygons]))
"""


def test_yolo_polygons_equal_ultralytics_polygon2mask(tmp_path):
    """Ultralytics' own ``polygon2mask``, in a child process: importing ultralytics patches
    PIL's ``Image.open`` for the whole process (and tries to pip-install HEIF support)."""
    if importlib.util.find_spec("ultralytics") is None:
        pytest.skip("ultralytics (the dev extra) is not installed")
    rng = np.random.default_rng(0)
    polygons = [rng.uniform(0, 1, (int(rng.integers(3, 9)), 2)) * (37, 23) for _ in range(50)]
    out = tmp_path / "masks.npy"
    env = dict(os.environ, YOLO_OFFLINE="1", YOLO_VERBOSE="False",
               YOLO_CONFIG_DIR=str(tmp_path / "cfg"))
    subprocess.run([sys.executable, "-c", ULTRALYTICS_ORACLE,
                    json.dumps([p.reshape(-1).tolist() for p in polygons]), "[23, 37]",
                    str(out)], check=True, env=env, capture_output=True, timeout=120)
    for xy, want in zip(polygons, np.load(out), strict=True):
        np.testing.assert_array_equal(cv2_polygon(xy, (37, 23)), want.astype(bool))


def test_cvat_polygons_equal_pycocotools(tmp_path):
    """CVAT's mask export decodes polygons with pycocotools (frPyObjects)."""
    from pycocotools import mask as mask_utils

    from cdsam.data.sources.cvat import shape_mask

    rng = np.random.default_rng(1)
    for _ in range(20):
        xy = rng.uniform(0, 1, (6, 2)) * (40, 30)
        points = ";".join(f"{x:.3f},{y:.3f}" for x, y in xy)
        flat = [round(float(v), 3) for v in xy.reshape(-1)]
        want = mask_utils.decode(mask_utils.frPyObjects([flat], 30, 40)[0]).astype(bool)
        np.testing.assert_array_equal(shape_mask("polygon", {"points": points}, (40, 30)), want)
