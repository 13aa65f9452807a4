"""The ``cvat`` source: a "CVAT for images 1.1" XML export (``prepare.annotations``) and the
image folder ``prepare.images`` (image ``name`` attributes are paths below it).

Shapes → masks as CVAT's own mask export draws them (``cvat/apps/dataset_manager/formats``:
``RotatedBoxesToPolygons``, ``EllipsesToMasks``, ``CVATRleToCOCORle``, then pycocotools):
``polygon`` (``points="x,y;x,y;…"``) and ``box`` (``xtl ytl xbr ybr``) by pycocotools' polygon
rule, a box's ``rotation`` (degrees, clockwise on screen) turning its corners about its
centre; ``ellipse`` (``cx cy rx ry rotation``) by ``cv2.ellipse`` at the rounded centre and
semi-axes; ``mask`` (CVAT's RLE: run lengths over the box ``left top width height``, row by
row, starting with a run of 0s) as stored. Images are read upright (EXIF orientation applied),
as CVAT shows them.

Polylines, points, skeletons, cuboids and tags have no area: their label is neither a positive
nor "absent" on that image (a crack drawn as a polyline must not teach "no crack here").
Skeleton sub-labels (``<label>`` with a ``<parent>``: a skeleton's keypoints) are never
classes. Labels are the classes (``prepare.classes`` picks and orders them; default: the
labels drawn with area somewhere, in ``<meta>`` order); ``__ignore__`` marks an ignore region.
Shapes of one label sharing a ``group_id`` are one object. An image element with no shape is
a negative image; an image file no element names is not prepared (listed).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from cdsam.config.schema import PrepareConfig
from cdsam.data.manifest import IMAGE_EXTS, BadFiles, stable_splits
from cdsam.data.sources.draw import coco_polygon, cv2_ellipse, outside, rotated_corners
from cdsam.data.sources.objects import IGNORE_CLASS, objects_to_samples
from cdsam.data.tasks import Item, Task
from cdsam.errors import DataError

AREA_SHAPES = ("polygon", "box", "ellipse", "mask")
MARK_SHAPES = ("polyline", "points", "skeleton", "cuboid", "tag")  # a label without area
Shape = tuple[str, str, dict[str, str]]  # (element tag, label, attributes)


def _floats(attrs: dict[str, str], *keys: str) -> list[float]:
    return [float(attrs[k]) for k in keys]


def rle_mask(attrs: dict[str, str], size: tuple[int, int]) -> np.ndarray:
    """A CVAT 1.1 ``<mask>``: runs of 0s and 1s over its box, row-major, 0s first."""
    left, top, width, height = (int(float(attrs[k])) for k in ("left", "top", "width",
                                                                "height"))
    runs = np.array([int(v) for v in attrs["rle"].replace(" ", "").split(",") if v], np.int64)
    if runs.sum() != width * height:
        raise ValueError(f"RLE covers {runs.sum()} pixels, its box {width}x{height} has "
                         f"{width * height}")
    if left < 0 or top < 0 or left + width > size[0] or top + height > size[1]:
        raise ValueError(f"mask box {width}x{height} at ({left}, {top}) lies outside the "
                         f"image {size[0]}x{size[1]}")
    values = np.repeat(np.arange(len(runs)) % 2 == 1, runs)
    out = np.zeros((size[1], size[0]), bool)
    out[top:top + height, left:left + width] = values.reshape(height, width)
    return out


def shape_mask(tag: str, attrs: dict[str, str], size: tuple[int, int]) -> np.ndarray:
    """One area shape's mask (ValueError / KeyError say why it cannot be drawn)."""
    if tag == "mask":
        return rle_mask(attrs, size)
    rotation = float(attrs.get("rotation") or 0.0)
    if tag == "polygon":
        points = [tuple(float(v) for v in p.split(",")) for p in attrs["points"].split(";")]
        if len(points) < 3 or any(len(p) != 2 for p in points):
            raise ValueError("a polygon needs 3 or more x,y points")
        check = points
    elif tag == "box":
        x0, y0, x1, y1 = _floats(attrs, "xtl", "ytl", "xbr", "ybr")
        points = rotated_corners(x0, y0, x1, y1, rotation)
        check = points
    else:
        cx, cy, rx, ry = _floats(attrs, "cx", "cy", "rx", "ry")
        # The box of the turned ellipse (CVAT keeps a rotated ellipse inside the image).
        a = np.radians(rotation)
        ex = float(np.hypot(rx * np.cos(a), ry * np.sin(a)))
        ey = float(np.hypot(rx * np.sin(a), ry * np.cos(a)))
        check = [(cx - ex, cy - ey), (cx + ex, cy + ey)]
    if outside(check, size):
        raise ValueError(f"a {tag} point lies outside the image {size[0]}x{size[1]}")
    if tag == "ellipse":
        return cv2_ellipse(cx, cy, rx, ry, rotation, size)
    return coco_polygon(points, size)


def load_cvat_image(cfg: PrepareConfig, seed: int, stem: str, path: Path, where: Path,
                    size: tuple[int, int], shapes: list[Shape], classes: list[str],
                    seen: frozenset[str], *, bad: BadFiles) -> Item | None:
    """One ``<image>`` element's file and area shapes → samples and instances; ``seen``:
    the labels marked on it without area."""
    image = bad.open(path, "RGB")
    if image is None:
        return None
    if image.size != size:
        bad.bad(path, f"image is {image.size[0]}x{image.size[1]}, {where.name} says "
                      f"{size[0]}x{size[1]}", "size")
        return None
    groups: dict[tuple[str, object], np.ndarray] = {}
    for n, (tag, label, attrs) in enumerate(shapes):
        try:
            m = shape_mask(tag, attrs, size)
        except (ValueError, KeyError) as exc:
            bad.bad(where, f"image {path.name}: {tag} {n} ({label!r}): {exc}")
            return None
        gid = attrs.get("group_id")
        key = (label, ("group", gid) if gid not in (None, "", "0") else ("shape", n))
        groups[key] = groups[key] | m if key in groups else m
    objects = [(label, m) for (label, _), m in groups.items()]
    samples, instances = objects_to_samples(cfg, seed, stem, objects, classes,
                                            (size[1], size[0]), seen=seen)
    return Item(image, samples, instances)


def _parse(path: Path) -> ET.Element:
    if not path.is_file():
        raise DataError(f"prepare.annotations: file not found: {path}")
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise DataError(f"{path}: not a readable XML file ({exc})") from None
    if root.tag != "annotations" or root.find("image") is None and root.find("meta") is None:
        raise DataError(f"{path}: not a CVAT for images 1.1 export (<annotations> with "
                        f"<image> elements)")
    return root


def cvat_tasks(cfg: PrepareConfig, seed: int, bad: BadFiles) -> list[Task]:
    """A task per ``<image>`` element whose file exists; its shapes travel with it."""
    if not cfg.annotations:
        raise DataError("prepare.annotations: required for prepare.source: cvat (the "
                        "annotations.xml of a CVAT for images 1.1 export)")
    if not cfg.images:
        raise DataError("prepare.images: required for prepare.source: cvat")
    where = Path(cfg.annotations)
    root = _parse(where)
    folder = Path(cfg.images)
    if not folder.is_dir():
        raise DataError(f"prepare.images: folder not found: {folder}")
    # Skeleton keypoints are labels of their own in <meta>, each naming its skeleton in
    # <parent>: parts of an object, never a class.
    meta = [e.findtext("name") for e in root.iter("label")
            if e.findtext("name") and not (e.findtext("parent") or "").strip()]
    entries: dict[str, tuple[Path, tuple[int, int], list[Shape], frozenset[str]]] = {}
    drawn: set[str] = set()  # labels with area somewhere
    for el in root.findall("image"):
        name = el.get("name", "")
        path = folder / name
        stem = Path(name).stem
        if stem in entries:
            bad.bad(path, f"same stem as {entries[stem][0].name} in {where.name}", "duplicate")
            continue
        shapes = [(s.tag, s.get("label", ""), dict(s.attrib)) for s in el
                  if s.tag in AREA_SHAPES]
        marks = frozenset(s.get("label", "") for s in el if s.tag in MARK_SHAPES)
        drawn |= {label for _, label, _ in shapes}
        if not path.is_file():
            bad.bad(path, f"image listed in {where.name} not found", "missing")
            continue
        try:
            size = (int(el.get("width", "")), int(el.get("height", "")))
        except ValueError:
            bad.bad(where, f"image {name}: width and height must be integers")
            continue
        entries[stem] = (path, size, shapes, marks)
    order = list(dict.fromkeys(meta)) + sorted(drawn - set(meta))
    classes = list(cfg.classes or [c for c in order if c in drawn and c != IGNORE_CLASS])
    keep = set(classes) | {IGNORE_CLASS}
    named = {e[0].resolve() for e in entries.values()}
    for p in sorted(folder.rglob("*")):
        if p.suffix.lower() in IMAGE_EXTS and p.resolve() not in named:
            bad.note(p, f"no <image> in {where.name} names it: not prepared")
    splits = stable_splits(list(entries), cfg.val_fraction, cfg.test_fraction, seed)
    return [Task(stem, splits[stem], load_cvat_image,
                 (cfg, seed, stem, path, where, size,
                  [s for s in shapes if s[1] in keep], classes, marks & frozenset(classes)))
            for stem, (path, size, shapes, marks) in entries.items()]
