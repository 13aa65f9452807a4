"""The ``labelme`` source: labelme JSON files in the ``prepare.images`` folder, each beside its
image (``imagePath``, relative to the JSON; ``imageData`` when the file is not there).

Shapes → masks as labelme draws them: ``polygon``, ``rectangle``, ``circle`` (centre and a
point on the rim) and ``mask`` (a PNG of the shape's box). Lines and points have no area and
are left out. A label is a class (``prepare.classes`` picks and orders them; default: every
label found), ``__ignore__`` marks an ignore region, ``_background_`` is background. Shapes of
one label sharing a ``group_id`` are one object; every other shape is an object of its own.
A JSON with no shapes is a negative image; an image with no JSON is not prepared (listed).
"""

from __future__ import annotations

import base64
import io as _io
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cdsam.config.schema import PrepareConfig
from cdsam.data.draw import box_mask, ellipse_mask, outside, polygon_mask
from cdsam.data.folders import image_files
from cdsam.data.manifest import UNREADABLE, BadFiles, stable_splits, to_rgb
from cdsam.data.objects import IGNORE_CLASS, objects_to_samples
from cdsam.data.tasks import Item, Task
from cdsam.errors import DataError

BACKGROUND_LABEL = "_background_"
AREA_SHAPES = ("polygon", "rectangle", "circle", "mask")


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


def _image_name(path: Path, data: dict[str, Any]) -> str:
    return Path(str(data.get("imagePath") or path.with_suffix(".png").name)).name


def _shape_mask(shape: dict[str, Any], size: tuple[int, int]) -> np.ndarray | str:
    """One area shape's mask, or why it cannot be drawn."""
    kind = shape.get("shape_type") or "polygon"
    points = shape.get("points") or []
    need = {"polygon": 3, "rectangle": 2, "circle": 2, "mask": 2}[kind]
    if len(points) < need:
        return f"a {kind} needs {need} or more points, has {len(points)}"
    if kind == "mask":
        return _mask_shape(shape, points, size)
    if outside(points, size):
        return f"a {kind} point lies outside the image {size[0]}x{size[1]}"
    if kind == "polygon":
        return polygon_mask(points, size)
    if kind == "rectangle":
        (x0, y0), (x1, y1) = points[:2]
        return box_mask(x0, y0, x1, y1, size)
    (cx, cy), (px, py) = points[:2]
    r = float(np.hypot(cx - px, cy - py))
    return ellipse_mask(cx, cy, r, r, size)


def _mask_shape(shape: dict[str, Any], points: list, size: tuple[int, int]) -> np.ndarray | str:
    """labelme's ``mask`` shape: a base64 PNG covering the box from points[0] to points[1]."""
    try:
        with Image.open(_io.BytesIO(base64.b64decode(shape.get("mask") or ""))) as im:
            part = np.asarray(im.convert("L")) > 0
    except (*UNREADABLE, TypeError) as exc:
        return f"unreadable mask data ({exc})"
    x0, y0 = (int(round(v)) for v in points[0])
    h, w = part.shape
    if x0 < 0 or y0 < 0 or x0 + w > size[0] or y0 + h > size[1]:
        return f"a {w}x{h} mask at ({x0}, {y0}) lies outside the image {size[0]}x{size[1]}"
    out = np.zeros((size[1], size[0]), bool)
    out[y0:y0 + h, x0:x0 + w] = part
    return out


def _open_image(path: Path, data: dict[str, Any], bad: BadFiles) -> Image.Image | None:
    image_path = path.parent / _image_name(path, data)
    if image_path.is_file():
        return bad.open(image_path, "RGB")
    if data.get("imageData"):
        try:
            with Image.open(_io.BytesIO(base64.b64decode(data["imageData"]))) as im:
                im.load()
                return to_rgb(im)
        except (*UNREADABLE, TypeError) as exc:
            bad.bad(path, f"unreadable imageData ({exc})", "unreadable")
            return None
    bad.bad(image_path, f"image named by {path.name} not found (and no imageData)", "missing")
    return None


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
    groups: dict[tuple[str, Any], np.ndarray] = {}
    known = set(classes)
    for n, shape in enumerate(data["shapes"]):
        label = str(shape.get("label", ""))
        if (shape.get("shape_type") or "polygon") not in AREA_SHAPES or label == BACKGROUND_LABEL:
            continue
        if label != IGNORE_CLASS and label not in known:
            continue  # a label prepare.classes leaves out
        m = _shape_mask(shape, size)
        if isinstance(m, str):
            bad.bad(path, f"shape {n} ({label!r}): {m}")
            return None
        gid = shape.get("group_id")
        key = (label, ("group", gid) if gid is not None else ("shape", n))
        groups[key] = groups[key] | m if key in groups else m
    objects = [(label, m) for (label, _), m in groups.items()]
    samples, instances = objects_to_samples(cfg, seed, stem, objects, classes,
                                            (size[1], size[0]))
    return Item(image, samples, instances)


def labelme_tasks(cfg: PrepareConfig, seed: int, bad: BadFiles) -> list[Task]:
    """A task per labelme JSON; the classes are read from all of them first."""
    if not cfg.images:
        raise DataError("prepare.images: required for prepare.source: labelme (the folder of "
                        "labelme JSONs and their images)")
    folder = Path(cfg.images)
    images = image_files(folder, "prepare.images", bad)
    found: dict[str, Path] = {}
    labels: set[str] = set()
    # Parsed here for the labels and the image name only; the worker parses it again rather
    # than carry every JSON (imageData can be megabytes) from the listing to the pool.
    for path in sorted(folder.glob("*.json")):
        data = _read_json(path, bad)
        if data is None:
            continue
        stem = Path(_image_name(path, data)).stem
        if stem in found:
            bad.bad(path, f"names the same image as {found[stem].name}", "duplicate")
            continue
        found[stem] = path
        labels |= {str(s.get("label", "")) for s in data["shapes"]}
    if not found:
        raise DataError(f"prepare.images: no labelme JSON files in {folder}")
    classes = list(cfg.classes or sorted(labels - {IGNORE_CLASS, BACKGROUND_LABEL, ""}))
    for stem, path in images.items():
        if stem not in found:
            bad.note(path, "no labelme JSON names it: not prepared")
    splits = stable_splits(list(found), cfg.val_fraction, cfg.test_fraction, seed)
    return [Task(stem, splits[stem], load_labelme, (cfg, seed, stem, path, classes))
            for stem, path in found.items()]
