"""The ``labelme`` source: labelme JSON files in the ``prepare.images`` folder.

Read as labelme reads and draws them (labelme 5-6: ``LabelFile.load`` and
``labelme.utils.shapes_to_label``, tested against the latter):

- The image: ``imageData`` when the JSON holds it (labelme loads it first; its tutorial files
  name the JSON itself in ``imagePath``), else ``imagePath`` relative to the JSON's folder
  (``../images/x.png`` works, Windows backslashes are read as ``/``). Either is taken upright
  (EXIF orientation applied), as labelme shows it while annotating.
- Shapes are painted in file order into one label map, each pixel keeping the last shape that
  covers it: a ``_background_`` shape carves background out of earlier shapes, a later
  ``__ignore__`` shape (an ignore region) overrides an earlier class and a later class an
  earlier ignore. ``polygon``, ``rectangle``, ``circle`` (centre and a rim point),
  ``oriented_rectangle`` (4 corners) and ``mask`` (a PNG over the box from points[0] to
  points[1], corners cast to int as labelme does) are drawn by labelme's PIL rule. Shapes of
  one label sharing a ``group_id`` are one object, any other shape is an object of its own;
  an object is the pixels its shapes still hold after painting.
- ``line``, ``linestrip``, ``point`` and ``points`` have no area: labelme paints them 10 and 5
  pixels wide, cdsam does not train on such bands. Their label is not "absent" on that image
  either (a crack drawn as a line must not teach "no crack here"); like a COCO category seen
  only as a crowd, it gives neither a positive nor a negative there.

A label is a class (``prepare.classes`` picks and orders them; default: every label drawn with
area somewhere). A label ``prepare.classes`` leaves out is not painted. A JSON with no shapes
is a negative image; an image in the folder that no JSON names is not prepared (listed).
"""

from __future__ import annotations

import base64
import binascii
import io as _io
import json
from pathlib import Path, PureWindowsPath
from typing import Any

import numpy as np
from PIL import Image

from cdsam.config.schema import PrepareConfig
from cdsam.data.manifest import UNREADABLE, BadFiles, open_image, stable_splits
from cdsam.data.sources.draw import outside, pil_box, pil_circle, pil_polygon
from cdsam.data.sources.folders import image_files
from cdsam.data.sources.objects import IGNORE_CLASS, objects_to_samples
from cdsam.data.tasks import Item, Task
from cdsam.errors import DataError

BACKGROUND_LABEL = "_background_"
AREA_SHAPES = ("polygon", "rectangle", "circle", "oriented_rectangle", "mask")
LINE_SHAPES = ("line", "linestrip", "point", "points")
_NEED = {"polygon": 3, "rectangle": 2, "circle": 2, "oriented_rectangle": 4, "mask": 2}


def _read_json(path: Path, bad: BadFiles) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        bad.bad(path, f"unreadable labelme JSON ({exc})", "unreadable")
        return None
    if not isinstance(data, dict) or not isinstance(data.get("shapes"), list) \
            or not all(k in data for k in ("imageHeight", "imageWidth")):
        bad.bad(path, "not a labelme JSON (needs shapes, imageHeight, imageWidth)")
        return None
    return data


def kind_of(shape: dict[str, Any]) -> str:
    """A shape's type; labelme writes none for polygons in its oldest files."""
    return str(shape.get("shape_type") or "polygon")


def image_path(path: Path, data: dict[str, Any]) -> Path | None:
    """The image file ``imagePath`` names, relative to the JSON's folder, or None."""
    named = data.get("imagePath")
    if not named:
        return None
    return path.parent / PureWindowsPath(str(named)).as_posix()


def _shape_mask(shape: dict[str, Any], size: tuple[int, int]) -> np.ndarray | str:
    """One area shape's mask, or why it cannot be drawn."""
    kind = kind_of(shape)
    points = shape.get("points") or []
    need = _NEED[kind]
    if len(points) < need:
        return f"a {kind} needs {need} or more points, has {len(points)}"
    if kind == "mask":
        return _mask_shape(shape, points, size)
    if outside(points, size):
        return f"a {kind} point lies outside the image {size[0]}x{size[1]}"
    if kind in ("polygon", "oriented_rectangle"):
        return pil_polygon(points, size)
    if kind == "rectangle":
        (x0, y0), (x1, y1) = points[:2]
        return pil_box(x0, y0, x1, y1, size)
    (cx, cy), (px, py) = points[:2]
    return pil_circle(cx, cy, float(np.hypot(cx - px, cy - py)), size)


def _mask_shape(shape: dict[str, Any], points: list, size: tuple[int, int]) -> np.ndarray | str:
    """labelme's ``mask`` shape: a base64 PNG over the box from points[0], corners cast to
    int (labelme's ``astype(int)``)."""
    try:
        with Image.open(_io.BytesIO(base64.b64decode(shape.get("mask") or ""))) as im:
            part = np.asarray(im.convert("L")) > 0
    except (*UNREADABLE, TypeError, binascii.Error) as exc:
        return f"unreadable mask data ({exc})"
    x0, y0 = (int(v) for v in points[0])
    h, w = part.shape
    if x0 < 0 or y0 < 0 or x0 + w > size[0] or y0 + h > size[1]:
        return f"a {w}x{h} mask at ({x0}, {y0}) lies outside the image {size[0]}x{size[1]}"
    out = np.zeros((size[1], size[0]), bool)
    out[y0:y0 + h, x0:x0 + w] = part
    return out


def _open_image(path: Path, data: dict[str, Any], bad: BadFiles) -> Image.Image | None:
    if data.get("imageData"):
        try:
            return open_image(_io.BytesIO(base64.b64decode(data["imageData"])), "RGB")
        except (*UNREADABLE, TypeError, binascii.Error) as exc:
            bad.bad(path, f"unreadable imageData ({exc})", "unreadable")
            return None
    named = image_path(path, data)
    if named is not None and named.is_file():
        return bad.open(named, "RGB")
    where = named if named is not None else path
    bad.bad(where, f"image named by {path.name} not found (and no imageData)", "missing")
    return None


def paint(shapes: list[dict[str, Any]], classes: list[str], size: tuple[int, int]
          ) -> tuple[list[tuple[str, np.ndarray]], set[str]] | str:
    """Shapes → (objects as painted in file order, the labels drawn on the image), or why a
    shape cannot be drawn. ``objects``: (class or ``__ignore__``, HxW bool) with pixels."""
    values = {name: k for k, name in enumerate(classes, start=1)}
    values[IGNORE_CLASS], values[BACKGROUND_LABEL] = -1, 0
    cls = np.zeros((size[1], size[0]), np.int32)
    ins = np.zeros_like(cls)
    ids: dict[tuple[str, Any], int] = {}  # (label, group) -> instance id, in first-seen order
    seen: set[str] = set()
    for n, shape in enumerate(shapes):
        label, kind = str(shape.get("label", "")), kind_of(shape)
        if label not in values:
            continue  # a label prepare.classes leaves out
        seen.add(label)
        if kind not in AREA_SHAPES:
            if kind not in LINE_SHAPES:
                return f"shape {n} ({label!r}): unknown shape_type {kind!r}"
            continue
        m = _shape_mask(shape, size)
        if isinstance(m, str):
            return f"shape {n} ({label!r}): {m}"
        gid = shape.get("group_id")
        key = (label, ("group", gid) if gid is not None else ("shape", n))
        cls[m] = values[label]
        ins[m] = ids.setdefault(key, len(ids) + 1)
    objects = []
    for (label, _), k in ids.items():
        if label == BACKGROUND_LABEL:
            continue
        m = ins == k
        if m.any():
            objects.append((label, m))
    return objects, seen - {IGNORE_CLASS, BACKGROUND_LABEL}


def load_labelme(cfg: PrepareConfig, seed: int, stem: str, path: Path, classes: list[str], *,
                 bad: BadFiles) -> Item | None:
    """One labelme JSON and its image → samples and instances."""
    data = _read_json(path, bad)
    if data is None:
        return None
    image = _open_image(path, data, bad)
    if image is None:
        return None
    size = (int(data["imageWidth"]), int(data["imageHeight"]))
    if image.size != size:
        bad.bad(path, f"image is {image.size[0]}x{image.size[1]}, the JSON says "
                      f"{size[0]}x{size[1]}", "size")
        return None
    painted = paint(data["shapes"], classes, size)
    if isinstance(painted, str):
        bad.bad(path, painted)
        return None
    objects, seen = painted
    samples, instances = objects_to_samples(cfg, seed, stem, objects, classes,
                                            (size[1], size[0]), seen=seen)
    return Item(image, samples, instances)


def area_labels(shapes: list[dict[str, Any]]) -> set[str]:
    """The labels of a file's shapes that have area (the default classes come from these)."""
    return {str(s.get("label", "")) for s in shapes if kind_of(s) in AREA_SHAPES}


def labelme_tasks(cfg: PrepareConfig, seed: int, bad: BadFiles) -> list[Task]:
    """A task per labelme JSON (its stem names the image); the classes are read from all of
    them first."""
    if not cfg.images:
        raise DataError("prepare.images: required for prepare.source: labelme (the folder of "
                        "labelme JSONs and their images)")
    folder = Path(cfg.images)
    images = image_files(folder, "prepare.images", bad)
    found: dict[str, Path] = {}
    named: dict[Path, Path] = {}  # image file -> the JSON naming it
    labels: set[str] = set()
    # Parsed here for the labels and the image name only; the worker parses it again rather
    # than carry every JSON (imageData can be megabytes) from the listing to the pool.
    for path in sorted(folder.glob("*.json")):
        data = _read_json(path, bad)
        if data is None:
            continue
        image = None if data.get("imageData") else image_path(path, data)
        key = image.resolve() if image is not None else None
        if key is not None and key in named:
            bad.bad(path, f"names the same image as {named[key].name}", "duplicate")
            continue
        if key is not None:
            named[key] = path
        found[path.stem] = path
        labels |= area_labels(data["shapes"])
    if not found:
        raise DataError(f"prepare.images: no labelme JSON files in {folder}")
    classes = list(cfg.classes or sorted(labels - {IGNORE_CLASS, BACKGROUND_LABEL, ""}))
    for stem, path in images.items():
        if stem not in found and path.resolve() not in named:
            bad.note(path, "no labelme JSON names it: not prepared")
    splits = stable_splits(list(found), cfg.val_fraction, cfg.test_fraction, seed)
    return [Task(stem, splits[stem], load_labelme, (cfg, seed, stem, path, classes))
            for stem, path in found.items()]
