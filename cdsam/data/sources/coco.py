"""The ``coco`` source: a COCO instances JSON (polygons and RLE) and its images folder.

One binary sample per (image, category present): the union of the category's instances,
decoded by pycocotools. ``iscrowd`` regions are ignore (255) in that category's mask, as COCO's
evaluation ignores them. Prompts come from ``prepare.prompt_template`` and the category name;
``prepare.classes`` picks a subset of categories. Every non-crowd annotation is also kept as an
instance. With ``prepare.negatives: absent``, categories
not in an image give empty-mask samples, and images with no annotation at all are negatives.

Splits: ``prepare.annotations`` is split by ``prepare.val_fraction`` / ``test_fraction``,
unless ``prepare.val_annotations`` / ``prepare.test_annotations`` give those splits their own
files (images under ``prepare.val_images`` / ``test_images``, default ``prepare.images``).
"""

from __future__ import annotations

import contextlib
import io as _io
import json
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from cdsam.config.schema import PrepareConfig
from cdsam.data.manifest import (
    BadFiles,
    Sample,
)
from cdsam.data.sources.negatives import absent_samples
from cdsam.data.sources.objects import encode_binary
from cdsam.data.tasks import Item, Task
from cdsam.data.templates import class_prompt
from cdsam.errors import DataError


def load_coco(path: str | Path, key: str) -> COCO:
    """An instances JSON → pycocotools ``COCO`` index (its chatter on stdout swallowed)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{key}: file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict) or not all(k in data for k in ("images", "annotations",
                                                                 "categories")):
        raise DataError(f"{path}: not a COCO instances file (needs images, annotations, "
                        f"categories)")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(_io.StringIO()):
        coco.createIndex()
    return coco


def select_categories(coco: COCO, cfg: PrepareConfig, where: Path) -> dict[int, str]:
    """category id → name, restricted to ``prepare.classes`` when it is set."""
    cats = {int(c["id"]): str(c["name"]) for c in coco.dataset["categories"]}
    if not cfg.classes:
        return dict(sorted(cats.items()))
    by_name = {name: cid for cid, name in cats.items()}
    unknown = [c for c in cfg.classes if c not in by_name]
    if unknown:
        raise DataError(f"prepare.classes: unknown category {unknown[0]!r} in {where} "
                        f"(known: {', '.join(sorted(by_name))})")
    return {by_name[c]: c for c in cfg.classes}


def _check_polygons(ann: dict, w: int, h: int, where: Path) -> str | None:
    """Why an annotation's polygon cannot be right, or None. One pixel of slack, as COCO's
    own polygons often end exactly on the border."""
    seg = ann.get("segmentation")
    if not isinstance(seg, list):
        return None  # RLE: its size is checked against the image below
    for poly in seg:
        xs, ys = np.asarray(poly[0::2], float), np.asarray(poly[1::2], float)
        if len(xs) < 3 or len(xs) != len(ys):
            return f"annotation {ann.get('id')}: a polygon needs 3 or more (x, y) points"
        if xs.min() < -1 or ys.min() < -1 or xs.max() > w + 1 or ys.max() > h + 1:
            return (f"annotation {ann.get('id')}: polygon point outside the image {w}x{h} "
                    f"(x {xs.min():.1f}..{xs.max():.1f}, y {ys.min():.1f}..{ys.max():.1f})")
    return None


def ann_mask(ann: dict, h: int, w: int) -> np.ndarray:
    """One annotation's HxW bool mask (polygons or RLE), decoded by pycocotools."""
    seg = ann["segmentation"]
    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    elif isinstance(seg.get("counts"), list):  # uncompressed RLE (crowd regions)
        rle = mask_utils.frPyObjects(seg, h, w)
    else:
        rle = seg
    return mask_utils.decode(rle).astype(bool)


def _image_samples(cfg: PrepareConfig, seed: int, info: dict, anns: list[dict],
                   cats: dict[int, str], where: Path) -> tuple[list[Sample], list[Sample]] | str:
    """An image's (samples, instances), or the reason its annotations are bad."""
    h, w = int(info["height"]), int(info["width"])
    stem = Path(info["file_name"]).stem
    fg: dict[int, np.ndarray] = {}
    crowd: dict[int, np.ndarray] = {}
    objects: list[tuple[int, np.ndarray]] = []
    for ann in anns:
        cid = int(ann["category_id"])
        if cid not in cats:
            continue
        why = _check_polygons(ann, w, h, where)
        if why:
            return why
        seg = ann.get("segmentation")
        if isinstance(seg, dict) and list(seg.get("size", [])) != [h, w]:
            return f"annotation {ann.get('id')}: RLE size {seg.get('size')} is not {h}x{w}"
        m = ann_mask(ann, h, w)
        target = crowd if ann.get("iscrowd", 0) else fg
        target[cid] = target[cid] | m if cid in target else m
        if not ann.get("iscrowd", 0):
            objects.append((cid, m))
    samples = [Sample(stem, class_prompt(cfg, cats[cid]), encode_binary(m, crowd.get(cid)))
               for cid, m in sorted(fg.items())]
    # An instance's ignore is its category's crowd region, less the category's other objects.
    instances = [Sample(stem, class_prompt(cfg, cats[cid]), encode_binary(
        m, crowd[cid] & ~fg[cid] if cid in crowd else None)) for cid, m in objects]
    vocab = [class_prompt(cfg, n) for cid, n in cats.items()]
    # A category seen only as a crowd is neither a positive nor absent.
    seen = [class_prompt(cfg, cats[c]) for c in set(fg) | set(crowd)]
    return samples + absent_samples(cfg, seed, stem, vocab, seen, (h, w)), instances


def coco_stems(coco: COCO) -> list[str]:
    """The image stems of an instances file, in image-id order (the manifest's keys)."""
    return [Path(i["file_name"]).stem for i in sorted(coco.dataset["images"],
                                                      key=lambda i: i["id"])]


def load_coco_image(cfg: PrepareConfig, seed: int, info: dict, anns: list[dict],
                    cats: dict[int, str], where: Path, path: Path, *, bad: BadFiles
                    ) -> Item | None:
    """One image of an instances file, checked against what the file says of it."""
    image = bad.open(path, "RGB")
    if image is None:
        return None
    if image.size != (int(info["width"]), int(info["height"])):
        bad.bad(path, f"image is {image.size[0]}x{image.size[1]}, {where} says "
                      f"{info['width']}x{info['height']}", "size")
        return None
    found = _image_samples(cfg, seed, info, anns, cats, where)
    if isinstance(found, str):
        bad.bad(where, f"image {info['file_name']}: {found}")
        return None
    return Item(image, *found)


def coco_tasks(cfg: PrepareConfig, seed: int, coco: COCO, where: Path, images: str | None,
               splits: dict[str, str], bad: BadFiles) -> list[Task]:
    """A task per image of one instances file (its annotations travel with it)."""
    if not images:
        raise DataError("prepare.images: required for prepare.source: coco")
    cats = select_categories(coco, cfg, where)
    root = Path(images)
    if not root.is_dir():
        raise DataError(f"prepare.images: folder not found: {root}")
    tasks = []
    for info in sorted(coco.dataset["images"], key=lambda i: i["id"]):
        path = root / info["file_name"]
        if not path.is_file():
            bad.bad(path, f"image listed in {where} (id {info['id']}) not found", "missing")
            continue
        stem = Path(info["file_name"]).stem
        anns = coco.imgToAnns.get(info["id"], [])
        tasks.append(Task(stem, splits[stem], load_coco_image,
                          (cfg, seed, info, anns, cats, where, path)))
    return tasks


def coco_files(cfg: PrepareConfig) -> dict[str, tuple[str, str | None, str]]:
    """split → (annotations, images, params key) for the splits that have their own file;
    ``"main"`` for ``prepare.annotations``."""
    if not cfg.annotations:
        raise DataError("prepare.annotations: required for prepare.source: coco")
    files = {"main": (cfg.annotations, cfg.images, "prepare.annotations")}
    if cfg.val_annotations:
        files["val"] = (cfg.val_annotations, cfg.val_images or cfg.images,
                        "prepare.val_annotations")
    if cfg.test_annotations:
        files["test"] = (cfg.test_annotations, cfg.test_images or cfg.images,
                         "prepare.test_annotations")
    return files
