"""Small datasets in the formats annotation tools write, each holding the same scenes.

Ten 32x32 images ``im0`` … ``im9``: ``im0`` has no object (a negative image), every other one
a cat and a dog, ``im1`` a second dog, ``im2`` an ignore region where the format has them. Every
shape is an axis-aligned box with integer corners, written in the format's own shape type
(labelme polygon / rectangle, CVAT polygon / box / RLE mask, YOLO polygon / box line, an
instance-id PNG), so its true mask is the box, corners included, whatever draws it.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

SIZE = 32
N = 10
Box = tuple[int, int, int, int]  # x0, y0, x1, y1, inclusive


def objects(i: int) -> list[tuple[str, Box]]:
    """The scene of image ``i``: (class, box) pairs; class ``__ignore__`` is an ignore region."""
    if i == 0:
        return []
    found = [("cat", (2 + i % 3, 3, 12 + i % 3, 12)), ("dog", (16, 14 + i % 4, 28, 26 - i % 4))]
    if i == 1:
        found.append(("dog", (3, 20, 9, 28)))
    if i == 2:
        found.append(("__ignore__", (20, 2, 30, 8)))
    return found


def truth(box: Box) -> np.ndarray:
    """HxW bool of a box, corners included."""
    x0, y0, x1, y1 = box
    m = np.zeros((SIZE, SIZE), bool)
    m[y0:y1 + 1, x0:x1 + 1] = True
    return m


def _images(folder: Path, ext: str = ".png") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(N):
        path = folder / f"im{i}{ext}"
        Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _corners(box: Box) -> list[list[float]]:
    x0, y0, x1, y1 = box
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


def write_labelme(root: Path) -> dict:
    """labelme 5.x files: ``imN.json`` beside ``imN.png``, as labelme saves them (relative
    imagePath, no imageData). Cats are polygons, dogs rectangles; im1's dogs share no group."""
    for i, image in enumerate(_images(root)):
        shapes = []
        for name, box in objects(i):
            kind = "polygon" if name == "cat" else "rectangle"
            points = _corners(box) if kind == "polygon" else [list(box[:2]), list(box[2:])]
            shapes.append({"label": name, "points": points, "group_id": None,
                           "description": "", "shape_type": kind, "flags": {}, "mask": None})
        doc = {"version": "5.4.1", "flags": {}, "shapes": shapes, "imagePath": image.name,
               "imageData": None, "imageHeight": SIZE, "imageWidth": SIZE}
        (root / f"im{i}.json").write_text(json.dumps(doc, indent=2))
    return {"source": "labelme", "images": str(root)}


def _edges(box: Box) -> Box:
    """A box of pixels in CVAT's coordinates, which are pixel edges: pixels x0..x1 run from
    x0 to x1 + 1 (what pycocotools' polygon rule, CVAT's mask export, fills back)."""
    x0, y0, x1, y1 = box
    return x0, y0, x1 + 1, y1 + 1


def cvat_rle(box: Box) -> dict[str, str]:
    """A box as CVAT 1.1 writes a ``<mask>``: runs over its box, 0s first."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0 + 1, y1 - y0 + 1
    return {"rle": f"0, {w * h}", "left": str(x0), "top": str(y0), "width": str(w),
            "height": str(h)}


def write_cvat(root: Path) -> dict:
    """A "CVAT for images 1.1" annotations.xml: cats as polygons, dogs as boxes, im1's second
    dog as an RLE mask; ``im0`` an <image> with no shape."""
    images = _images(root / "images")
    lines = ['<?xml version="1.0" encoding="utf-8"?>', "<annotations>",
             "  <version>1.1</version>", "  <meta>", "    <task>", "      <labels>"]
    for name in ("cat", "dog", "__ignore__"):
        lines += ["        <label>", f"          <name>{name}</name>",
                  "          <type>any</type>", "        </label>"]
    lines += ["      </labels>", "    </task>", "  </meta>"]
    for i, image in enumerate(images):
        lines.append(f'  <image id="{i}" name="{image.name}" width="{SIZE}" height="{SIZE}">')
        for n, (name, box) in enumerate(objects(i)):
            common = f'label="{name}" source="manual" occluded="0" z_order="0"'
            if name == "dog" and n == 2:
                attrs = " ".join(f'{k}="{v}"' for k, v in cvat_rle(box).items())
                lines.append(f"    <mask {common} {attrs}></mask>")
            elif name == "cat":
                points = ";".join(f"{x:.2f},{y:.2f}" for x, y in _corners(_edges(box)))
                lines.append(f'    <polygon {common} points="{points}"></polygon>')
            else:
                x0, y0, x1, y1 = _edges(box)
                lines.append(f'    <box {common} xtl="{x0:.2f}" ytl="{y0:.2f}" xbr="{x1:.2f}" '
                             f'ybr="{y1:.2f}"></box>')
        lines.append("  </image>")
    lines.append("</annotations>")
    (root / "annotations.xml").write_text("\n".join(lines) + "\n")
    return {"source": "cvat", "images": str(root / "images"),
            "annotations": str(root / "annotations.xml")}


def write_yolo(root: Path) -> dict:
    """An Ultralytics-style dataset: ``images/{train,val}``, ``labels/{train,val}``,
    ``data.yaml``; cats as polygon lines, dogs as box lines; ``im0`` has no label file.
    im7-im9 are val (ignore regions: YOLO has none)."""
    names = ["cat", "dog"]
    for split in ("train", "val"):
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
    images = _images(root / "images" / "all")
    for i, image in enumerate(images):
        split = "val" if i >= 7 else "train"
        target = root / "images" / split / image.name
        target.parent.mkdir(parents=True, exist_ok=True)
        image.rename(target)
        rows = []
        for name, box in objects(i):
            if name not in names:
                continue
            x0, y0, x1, y1 = (v / SIZE for v in box)
            if name == "cat":
                coords = [v / SIZE for xy in _corners(box) for v in xy]
                rows.append(" ".join([str(names.index(name))] + [f"{v:.6f}" for v in coords]))
            else:
                rows.append(f"1 {(x0 + x1) / 2:.6f} {(y0 + y1) / 2:.6f} {x1 - x0:.6f} "
                            f"{y1 - y0:.6f}")
        if rows:
            (root / "labels" / split / f"im{i}.txt").write_text("\n".join(rows) + "\n")
    (root / "images" / "all").rmdir()
    (root / "data.yaml").write_text(yaml.safe_dump(
        {"path": ".", "train": "images/train", "val": "images/val", "names": dict(enumerate(names))}))
    return {"source": "yolo", "annotations": str(root / "data.yaml")}


def write_instances(root: Path) -> dict:
    """16-bit instance-id PNGs (``masks/imN.png``, 0 background) and the class table CSV."""
    _images(root / "images")
    (root / "masks").mkdir(parents=True, exist_ok=True)
    table = []
    for i in range(N):
        ids = np.zeros((SIZE, SIZE), np.uint16)
        for k, (name, box) in enumerate(objects(i), start=1):
            ids[truth(box) & (ids == 0)] = 300 + k  # ids beyond 255: a 16-bit file
            table.append({"image": f"im{i}", "instance": 300 + k, "class": name})
        Image.fromarray(ids).save(root / "masks" / f"im{i}.png")
    with open(root / "classes.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, ["image", "instance", "class"])
        writer.writeheader()
        writer.writerows(table)
    return {"source": "folders", "mask_format": "instances", "images": str(root / "images"),
            "masks": str(root / "masks"), "instance_classes": str(root / "classes.csv")}


WRITERS = {"labelme": write_labelme, "cvat": write_cvat, "yolo": write_yolo,
           "instances": write_instances}
IGNORE_REGIONS = {"labelme", "cvat", "instances"}  # the formats that hold them
