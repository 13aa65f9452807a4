"""The ``cvat`` source: a "CVAT for images 1.1" XML export (``prepare.annotations``) and the
image folder ``prepare.images`` (image ``name`` attributes are paths below it).

Shapes → masks: ``polygon`` (``points="x,y;x,y;…"``), ``box`` (``xtl ytl xbr ybr``),
``ellipse`` (``cx cy rx ry``) and ``mask`` (CVAT's RLE: run lengths over the box ``left top
width height``, row by row, starting with a run of 0s). Polylines, points, cuboids and tags
have no area and are left out. Labels are the classes (``prepare.classes`` picks and orders
them; default: the labels in ``<meta>``, else every label used); ``__ignore__`` marks an
ignore region. Shapes of one label sharing a ``group_id`` are one object. An image element
with no shape is a negative image; an image file no element names is not prepared (listed).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from cdsam.config.schema import PrepareConfig
from cdsam.data.draw import box_mask, ellipse_mask, outside, polygon_mask
from cdsam.data.manifest import IMAGE_EXTS, BadFiles, stable_splits
from cdsam.data.objects import IGNORE_CLASS, objects_to_samples
from cdsam.data.tasks import Item, Task
from cdsam.errors import DataError

AREA_SHAPES = ("polygon", "box", "ellipse", "mask")
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
    if tag == "polygon":
        points = [tuple(float(v) for v in p.split(",")) for p in attrs["points"].split(";")]
        if len(points) < 3 or any(len(p) != 2 for p in points):
            raise ValueError("a polygon needs 3 or more x,y points")
        check = points
    elif tag == "box":
        x0, y0, x1, y1 = _floats(attrs, "xtl", "ytl", "xbr", "ybr")
        check = [(x0, y0), (x1, y1)]
    else:
        cx, cy, rx, ry = _floats(attrs, "cx", "cy", "rx", "ry")
        check = [(cx - rx, cy - ry), (cx + rx, cy + ry)]
    if outside(check, size):
        raise ValueError(f"a {tag} point lies outside the image {size[0]}x{size[1]}")
    if tag == "polygon":
        return polygon_mask(check, size)
    if tag == "box":
        return box_mask(x0, y0, x1, y1, size)
    return ellipse_mask(cx, cy, rx, ry, size)


def load_cvat_image(cfg: PrepareConfig, seed: int, stem: str, path: Path, where: Path,
                    size: tuple[int, int], shapes: list[Shape], classes: list[str], *,
                    bad: BadFiles) -> Item | None:
    """One ``<image>`` element's file and shapes → samples and instances."""
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
                                            (size[1], size[0]))
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
    meta = [e.findtext("name") for e in root.iter("label") if e.findtext("name")]
    entries: dict[str, tuple[Path, tuple[int, int], list[Shape]]] = {}
    used: set[str] = set()
    for el in root.findall("image"):
        name = el.get("name", "")
        path = folder / name
        stem = Path(name).stem
        if stem in entries:
            bad.bad(path, f"same stem as {entries[stem][0].name} in {where.name}", "duplicate")
            continue
        shapes = [(s.tag, s.get("label", ""), dict(s.attrib)) for s in el
                  if s.tag in AREA_SHAPES]
        used |= {label for _, label, _ in shapes}
        if not path.is_file():
            bad.bad(path, f"image listed in {where.name} not found", "missing")
            continue
        try:
            size = (int(el.get("width", "")), int(el.get("height", "")))
        except ValueError:
            bad.bad(where, f"image {name}: width and height must be integers")
            continue
        entries[stem] = (path, size, shapes)
    classes = list(cfg.classes or [c for c in dict.fromkeys(meta or sorted(used))
                                   if c != IGNORE_CLASS])
    keep = set(classes) | {IGNORE_CLASS}
    named = {p.resolve() for p, _, _ in entries.values()}
    for p in sorted(folder.rglob("*")):
        if p.suffix.lower() in IMAGE_EXTS and p.resolve() not in named:
            bad.note(p, f"no <image> in {where.name} names it: not prepared")
    splits = stable_splits(list(entries), cfg.val_fraction, cfg.test_fraction, seed)
    return [Task(stem, splits[stem], load_cvat_image,
                 (cfg, seed, stem, path, where, size,
                  [s for s in shapes if s[1] in keep], classes))
            for stem, (path, size, shapes) in entries.items()]
