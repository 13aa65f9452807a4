"""The ``yolo`` source: a YOLO segmentation dataset, described by its ``data.yaml``
(``prepare.annotations``): ``names`` (a list, or ids → names), ``path`` and the ``train`` /
``val`` / ``test`` entries, each split as listed. ``prepare.images`` instead names one image
folder, split by the fractions.

Paths follow Ultralytics' ``check_det_dataset`` and ``YOLODataset.get_img_files``: a split
entry is a folder (its images, searched recursively), a ``.txt`` list of images (one a line,
``./x`` relative to the list's folder; what CVAT's "Ultralytics YOLO" export writes), or a
list of either; an entry ``../x`` that does not exist below ``path`` is read as ``x`` there
(Roboflow's ``train: ../train/images``). Ultralytics reads a relative ``path`` and a list's
other relative lines from where it runs; cdsam runs from the repo root, so it reads them
beside data.yaml (a list's lines below ``path``, then beside the list) first, then from the
repo root. Every folder and file data.yaml names must lie under a ``prepare`` dependency in
dvc.yaml (``data/raw``), checked before anything runs, so editing them reruns prepare.

Labels follow YOLO's own rule: an image ``…/images/…/x.jpg`` has its labels in
``…/labels/…/x.txt``, one object a line: ``class x1 y1 x2 y2 …`` (a polygon, coordinates
normalised to [0, 1]) or ``class cx cy w h`` (a box, drawn as its 4 corners). Polygons are
filled as Ultralytics' ``polygon2mask`` fills them (pixel coordinates cast to int32,
``cv2.fillPoly``). A line repeating an earlier line's class and coordinates is dropped
(Ultralytics drops repeated rows; it compares class and box, so it also drops a different
polygon with the same box, which cdsam keeps). Images are read upright (EXIF orientation
applied), as Ultralytics reads them. An image with no label file, or an empty one, is a
negative image, as YOLO reads it. The format has no ignore regions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cdsam.config.schema import PrepareConfig
from cdsam.data.manifest import IMAGE_EXTS, SPLITS, BadFiles, by_stem, stable_splits
from cdsam.data.sources.draw import cv2_polygon, outside
from cdsam.data.sources.folders import image_files
from cdsam.data.sources.objects import objects_to_samples
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


@dataclass(frozen=True)
class DataYaml:
    """What a data.yaml says: class names, each split's image files, and every folder and
    file it made cdsam read (for dvc.yaml's deps)."""

    where: Path
    names: list[str]
    splits: dict[str, list[Path]]
    read: list[Path]


def _first(*candidates: Path) -> Path | None:
    return next((c for c in candidates if c.exists()), None)


def _root(data: dict[str, Any], where: Path) -> Path:
    entry = data.get("path")
    if not entry:
        return where.parent
    path = Path(str(entry))
    if path.is_absolute():
        found = path if path.exists() else None
    else:
        found = _first(where.parent / path, path)
    if found is None:
        raise DataError(f"{where}: path {entry} not found (read beside data.yaml, then from "
                        f"{Path.cwd()})")
    return found


def _list_file(path: Path, root: Path, where: Path, split: str) -> list[Path]:
    """An image list: one path a line; ``./x`` is beside the list (as Ultralytics reads it)."""
    try:
        lines = path.read_text(encoding="utf-8-sig").strip().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{where}: {split} list {path} unreadable ({exc})") from None
    out = []
    for line in (x.strip().replace("\\", "/") for x in lines):
        if not line or Path(line).suffix.lower() not in IMAGE_EXTS:
            continue
        if line.startswith("./"):
            image = path.parent / line[2:]
        elif Path(line).is_absolute():
            image = Path(line)
        else:
            image = _first(root / line, path.parent / line, Path(line)) or root / line
        out.append(image)
    return out


def _split_files(entry: Any, root: Path, where: Path, split: str, read: list[Path]
                 ) -> list[Path]:
    entries = entry if isinstance(entry, list) else [entry]
    files: list[Path] = []
    for item in entries:
        if not isinstance(item, str):
            raise DataError(f"{where}: {split} must be a folder, a .txt image list, or a list "
                            f"of them")
        path = root / item
        if not path.exists() and item.startswith("../"):
            path = root / item[3:]  # Roboflow's ../train/images, as Ultralytics strips it
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
        elif path.is_file():
            files += _list_file(path, root, where, split)
        else:
            raise DataError(f"{where}: {split} not found: {path}")
        read.append(path)
    return files


def read_data_yaml(cfg: PrepareConfig) -> DataYaml:
    """The data.yaml ``prepare.annotations`` names, its paths resolved."""
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
    names = _names(data, where)
    if cfg.images:
        return DataYaml(where, names, {}, [])
    root = _root(data, where)
    read: list[Path] = []
    splits = {split: _split_files(data[split], root, where, split, read)
              for split in SPLITS if data.get(split)}
    return DataYaml(where, names, splits, read)


def yolo_inputs(cfg: PrepareConfig) -> list[tuple[str, str]]:
    """(what, path) of every folder, list and listed image data.yaml makes prepare read, for
    the check that dvc.yaml's deps cover them."""
    found = read_data_yaml(cfg)
    key = str(found.where)  # the file that names them, in the one-line error
    paths = dict.fromkeys([*found.read, *(p for files in found.splits.values() for p in files)])
    return [(key, str(p)) for p in paths]


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
    rows: set[tuple[float, ...]] = set()
    for n, line in enumerate(lines, 1):
        fields = line.split()
        if not fields:
            continue
        try:
            cls = int(fields[0])
            values = tuple(float(v) for v in fields[1:])
            xy = np.asarray(values).reshape(-1, 2)
        except ValueError:
            bad.bad(path, f"line {n}: expected a class id and an even number of coordinates")
            return None
        if not 0 <= cls < len(names):
            bad.bad(path, f"line {n}: class {cls} is not in names ({len(names)} classes)")
            return None
        if (cls, *values) in rows:
            continue  # a repeated row: one object
        rows.add((cls, *values))
        if len(xy) == 2:  # cx cy w h: a detection box, drawn as its corners
            (cx, cy), (bw, bh) = xy
            x0, y0, x1, y1 = cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2
            xy = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
        elif len(xy) < 3:
            bad.bad(path, f"line {n}: a polygon needs 3 or more points")
            return None
        pixels = xy * (w, h)
        if outside(pixels, size):
            bad.bad(path, f"line {n}: coordinates outside [0, 1]")
            return None
        objects.append((names[cls], cv2_polygon(pixels, size)))
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
    """A task per image; splits from data.yaml's entries, or the fractions over
    ``prepare.images``. ``test`` is then required only when data.yaml lists it."""
    found = read_data_yaml(cfg)
    where = found.where
    if cfg.images:
        files = image_files(Path(cfg.images), "prepare.images", bad)
        splits = stable_splits(list(files), cfg.val_fraction, cfg.test_fraction, seed)
        listed = [(stem, splits[stem], path) for stem, path in files.items()]
    else:
        if "train" not in found.splits or "val" not in found.splits:
            raise DataError(f"{where}: train and val are required (or set prepare.images to "
                            f"split one folder by the fractions)")
        if "test" not in found.splits and "test" in required:
            required.remove("test")
        listed = []
        for split, files in found.splits.items():
            for path in files:
                if not path.is_file():
                    bad.bad(path, f"image listed for {split} in {where.name} not found",
                            "missing")
            present = [p for p in files if p.is_file()]
            listed += [(stem, split, path) for stem, path in
                       by_stem(present, f"{where.name} {split}", bad).items()]
    unknown = [c for c in cfg.classes or [] if c not in found.names]
    if unknown:
        raise DataError(f"prepare.classes: {unknown[0]!r} is not in {where}'s names")
    classes = list(cfg.classes or found.names)
    return [Task(stem, split, load_yolo_image, (cfg, seed, stem, path, found.names, classes))
            for stem, split, path in listed]

