"""The ``yolo`` source: a YOLO segmentation dataset, described by its ``data.yaml``
(``prepare.annotations``): ``names`` (a list, or ids → names), ``path`` and the ``train`` /
``val`` / ``test`` image folders, each split as listed. ``prepare.images`` instead names one
image folder, split by the fractions.

Labels follow YOLO's own rule: an image ``…/images/…/x.jpg`` has its labels in
``…/labels/…/x.txt``, one object a line: ``class x1 y1 x2 y2 …`` (a polygon, coordinates
normalised to [0, 1]) or ``class cx cy w h`` (a box). An image with no label file, or an empty
one, is a negative image, as YOLO reads it. The format has no ignore regions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cdsam.config.schema import PrepareConfig
from cdsam.data.draw import box_mask, outside, polygon_mask
from cdsam.data.folders import image_files
from cdsam.data.manifest import SPLITS, BadFiles, stable_splits
from cdsam.data.objects import objects_to_samples
from cdsam.data.tasks import Item, Task
from cdsam.errors import DataError


def label_path(image: Path) -> Path:
    """YOLO's label file of an image: the last ``images`` folder of its path → ``labels``."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def _names(data: dict[str, Any], where: Path) -> list[str]:
    names = data.get("names")
    if isinstance(names, dict):
        try:
            ids = sorted(int(k) for k in names)
        except ValueError:
            ids = []
        if ids != list(range(len(names))):
            raise DataError(f"{where}: names must be ids 0..{len(names) - 1} → class names")
        return [str(names[k] if k in names else names[str(k)]) for k in ids]
    if isinstance(names, list) and names:
        return [str(n) for n in names]
    raise DataError(f"{where}: names (the class names, a list or ids → names) is required")


def read_data_yaml(cfg: PrepareConfig) -> tuple[list[str], dict[str, Path], Path]:
    """(class names, split → image folder, the yaml)."""
    if not cfg.annotations:
        raise DataError("prepare.annotations: required for prepare.source: yolo (its "
                        "data.yaml)")
    where = Path(cfg.annotations)
    if not where.is_file():
        raise DataError(f"prepare.annotations: file not found: {where}")
    try:
        data = yaml.safe_load(where.read_text(encoding="utf-8"))
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{where}: not a readable YAML file ({exc})") from None
    if not isinstance(data, dict):
        raise DataError(f"{where}: not a YOLO data.yaml (a mapping with names, train, val)")
    base = Path(data.get("path") or ".")
    base = base if base.is_absolute() else where.parent / base
    folders = {}
    for split in SPLITS:
        entry = data.get(split)
        if not entry:
            continue
        if not isinstance(entry, str):
            raise DataError(f"{where}: {split} must be one image folder (lists of folders "
                            f"or .txt image lists are not read)")
        folder = Path(entry) if Path(entry).is_absolute() else base / entry
        if not folder.is_dir():
            raise DataError(f"{where}: {split} folder not found: {folder}")
        folders[split] = folder
    return _names(data, where), folders, where


def _objects(path: Path, names: list[str], size: tuple[int, int], bad: BadFiles
             ) -> list[tuple[str, np.ndarray]] | None:
    if not path.is_file():
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        bad.bad(path, f"unreadable label file ({exc})", "unreadable")
        return None
    w, h = size
    objects = []
    for n, line in enumerate(lines, 1):
        fields = line.split()
        if not fields:
            continue
        try:
            cls = int(fields[0])
            xy = np.asarray([float(v) for v in fields[1:]]).reshape(-1, 2)
        except ValueError:
            bad.bad(path, f"line {n}: expected a class id and an even number of coordinates")
            return None
        if not 0 <= cls < len(names):
            bad.bad(path, f"line {n}: class {cls} is not in names ({len(names)} classes)")
            return None
        if len(xy) == 2:  # cx cy w h: a detection box
            (cx, cy), (bw, bh) = xy
            xy = np.array([[cx - bw / 2, cy - bh / 2], [cx + bw / 2, cy + bh / 2]])
        elif len(xy) < 3:
            bad.bad(path, f"line {n}: a polygon needs 3 or more points")
            return None
        pixels = xy * (w, h)
        if outside(pixels, size):
            bad.bad(path, f"line {n}: coordinates outside [0, 1]")
            return None
        if len(xy) == 2:
            objects.append((names[cls], box_mask(*pixels[0], *pixels[1], size)))
        else:
            objects.append((names[cls], polygon_mask([tuple(p) for p in pixels], size)))
    return objects


def load_yolo_image(cfg: PrepareConfig, seed: int, stem: str, path: Path, names: list[str],
                    classes: list[str], *, bad: BadFiles) -> Item | None:
    """One image and its label file → samples and instances (no label file: a negative)."""
    image = bad.open(path, "RGB")
    if image is None:
        return None
    objects = _objects(label_path(path), names, image.size, bad)
    if objects is None:
        return None
    keep = set(classes)
    samples, instances = objects_to_samples(
        cfg, seed, stem, [(c, m) for c, m in objects if c in keep], classes,
        (image.size[1], image.size[0]))
    return Item(image, samples, instances)


def yolo_tasks(cfg: PrepareConfig, seed: int, bad: BadFiles, required: list[str]
               ) -> list[Task]:
    """A task per image; splits from data.yaml's folders, or the fractions over
    ``prepare.images``. ``test`` is then required only when data.yaml lists it."""
    names, folders, where = read_data_yaml(cfg)
    if cfg.images:
        files = image_files(Path(cfg.images), "prepare.images", bad)
        splits = stable_splits(list(files), cfg.val_fraction, cfg.test_fraction, seed)
        listed = [(stem, splits[stem], path) for stem, path in files.items()]
    else:
        if "train" not in folders or "val" not in folders:
            raise DataError(f"{where}: train and val image folders are required (or set "
                            f"prepare.images to split one folder by the fractions)")
        if "test" not in folders and "test" in required:
            required.remove("test")
        listed = []
        for split, folder in folders.items():
            listed += [(stem, split, path) for stem, path in
                       image_files(folder, f"{where.name} {split}", bad).items()]
    unknown = [c for c in cfg.classes or [] if c not in names]
    if unknown:
        raise DataError(f"prepare.classes: {unknown[0]!r} is not in {where}'s names")
    classes = list(cfg.classes or names)
    return [Task(stem, split, load_yolo_image, (cfg, seed, stem, path, names, classes))
            for stem, split, path in listed]
