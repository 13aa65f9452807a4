"""The ``folders`` source: an images folder and masks with the same stems.

``prepare.mask_format`` says how masks name their objects:

- ``binary``: ``masks/<stem>.png``, >0 is foreground, one prompt (``prepare.prompt``) for the
  set. An all-zero mask is a true negative ("no such object here"), not a bad file.
- ``indexed``: ``masks/<stem>.png`` with 0 = background, k = ``prepare.classes[k-1]``,
  255 = ignore; one sample per class present, prompt from ``prepare.prompt_template``.
- ``per_class``: ``masks/<class>/<stem>.png``, one binary mask folder per name in
  ``prepare.classes``; a class whose folder has no file for an image is absent from it.
- ``instances``: ``masks/<stem>.png`` (8 or 16 bit, one channel) whose values are object ids,
  0 background; in an 8-bit file 255 is an ignore region (VOC's ``SegmentationObject`` void
  border) unless the class table names an object 255. ``prepare.instance_classes`` names a
  CSV ``image,instance,class`` (class ``__ignore__``: an ignore region); without it every
  object is ``prepare.prompt``. One sample per class (the union of its objects); each object
  is kept as an instance.

Colour masks count their largest colour channel; an alpha channel is opacity (a transparent
pixel is background; a mask drawn in opacity alone is its alpha). Images are read upright
(EXIF orientation applied); masks as stored.

With ``prepare.negatives: absent`` classes absent from an image also give empty-mask samples.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from cdsam.config.schema import PrepareConfig
from cdsam.data.manifest import (
    BACKGROUND,
    FOREGROUND,
    IGNORE,
    IMAGE_EXTS,
    BadFiles,
    Sample,
    by_stem,
    stable_splits,
)
from cdsam.data.sources.negatives import absent_samples
from cdsam.data.sources.objects import IGNORE_CLASS, objects_to_samples
from cdsam.data.tasks import Item, Task
from cdsam.data.templates import class_prompt
from cdsam.errors import DataError

VOC_VOID = 255


def image_files(folder: Path, key: str, bad: BadFiles) -> dict[str, Path]:
    """The image files of ``folder`` by stem (a repeated stem is a bad file)."""
    if not folder.is_dir():
        raise DataError(f"{key}: folder not found: {folder}")
    return by_stem([p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS], key, bad)


def _read_mask(path: Path, size: tuple[int, int], bad: BadFiles, one_channel: bool = False
               ) -> np.ndarray | None:
    """A mask file → HxW array of its values, or None after reporting it bad."""
    pil = bad.open(path, what="mask")
    if pil is None:
        return None
    mask = np.asarray(pil)
    if mask.ndim == 3:
        if one_channel:
            bad.bad(path, f"an instance mask must have one channel (ids), not mode {pil.mode}")
            return None
        mask = _flatten(mask, "A" in pil.getbands())
    if (mask.shape[1], mask.shape[0]) != size:
        bad.wrong_size(path, "mask", (mask.shape[1], mask.shape[0]), size)
        return None
    return mask


def _flatten(mask: np.ndarray, alpha: bool) -> np.ndarray:
    """HxWxC → HxW: the largest colour channel. An alpha channel is opacity, not a colour:
    a fully transparent pixel is background, and a mask whose colours are all zero (drawn
    in opacity alone) is its alpha."""
    if not alpha:
        return mask.max(axis=2)
    colour, opacity = mask[..., :-1].max(axis=2), mask[..., -1]
    if not colour.any():
        return opacity
    return np.where(opacity > 0, colour, 0).astype(mask.dtype)


def read_binary_mask(path: Path, size: tuple[int, int], bad: BadFiles) -> np.ndarray | None:
    """A binary mask file → encoded HxW array (>0 is foreground; all zero is a negative)."""
    mask = _read_mask(path, size, bad)
    if mask is None:
        return None
    return np.where(mask > 0, FOREGROUND, BACKGROUND).astype(np.uint8)


def _class_names(cfg: PrepareConfig) -> list[str]:
    if not cfg.classes:
        raise DataError(f"prepare.classes: required with prepare.mask_format: {cfg.mask_format}")
    return list(cfg.classes)


def _indexed_samples(cfg: PrepareConfig, seed: int, stem: str, path: Path,
                     size: tuple[int, int], bad: BadFiles) -> list[Sample] | None:
    labels = _read_mask(path, size, bad)
    if labels is None:
        return None
    classes = _class_names(cfg)
    ignore = labels == IGNORE
    present = [int(c) for c in np.unique(labels) if c not in (0, IGNORE)]
    beyond = [c for c in present if c > len(classes)]
    if beyond:
        bad.bad(path, f"label {beyond[0]} is beyond prepare.classes ({len(classes)} names: "
                      f"labels 1..{len(classes)}, 0 background, 255 ignore)")
        return None
    samples = []
    for c in present:
        enc = np.where(labels == c, FOREGROUND, BACKGROUND).astype(np.uint8)
        enc[ignore] = IGNORE
        samples.append(Sample(stem, class_prompt(cfg, classes[c - 1]), enc))
    vocab = [class_prompt(cfg, c) for c in classes]
    return samples + absent_samples(cfg, seed, stem, vocab, [s.prompt for s in samples],
                                    labels.shape, ignore)


def _per_class_samples(cfg: PrepareConfig, seed: int, stem: str, masks: dict[str, Path],
                       vocab: list[str], size: tuple[int, int], bad: BadFiles
                       ) -> list[Sample] | None:
    samples = []
    for name, path in masks.items():
        mask = read_binary_mask(path, size, bad)
        if mask is None:
            return None
        samples.append(Sample(stem, class_prompt(cfg, name), mask))
    return samples + absent_samples(cfg, seed, stem, vocab, [s.prompt for s in samples],
                                    (size[1], size[0]))


def read_instance_table(cfg: PrepareConfig) -> dict[tuple[str, int], str] | None:
    """``prepare.instance_classes`` (CSV ``image,instance,class``) → (stem, id) → class."""
    if not cfg.instance_classes:
        return None
    path = Path(cfg.instance_classes)
    if not path.is_file():
        raise DataError(f"prepare.instance_classes: file not found: {path}")
    try:
        df = pd.read_csv(path, dtype={"image": str, "class": str}, keep_default_na=False)
        table = {(str(i), int(k)): str(c)
                 for i, k, c in zip(df["image"], df["instance"], df["class"], strict=True)}
    except (KeyError, ValueError, OSError, pd.errors.ParserError) as exc:
        raise DataError(f"{path}: not a CSV with columns image, instance, class ({exc})") from None
    names = sorted({c for c in table.values() if c != IGNORE_CLASS})
    known = set(cfg.classes or names)
    unknown = [c for c in names if c not in known]
    if unknown:
        raise DataError(f"{path}: class {unknown[0]!r} is not in prepare.classes")
    return table


def instance_vocab(cfg: PrepareConfig, table: dict[tuple[str, int], str] | None) -> list[str]:
    """The class names of an instances folder: prepare.classes, the table's, or the prompt."""
    if table is None:
        return [cfg.prompt]
    return list(cfg.classes or sorted({c for c in table.values() if c != IGNORE_CLASS}))


def _instance_item(cfg: PrepareConfig, seed: int, stem: str, path: Path, image: Image.Image,
                   table: dict[tuple[str, int], str] | None, vocab: list[str], bad: BadFiles
                   ) -> Item | None:
    ids = _read_mask(path, image.size, bad, one_channel=True)
    if ids is None:
        return None
    objects = []
    for k in (int(v) for v in np.unique(ids) if v != 0):
        if k == VOC_VOID and ids.dtype == np.uint8 and (table is None
                                                         or (stem, k) not in table):
            # An 8-bit id map's 255 is VOC's void border (SegmentationObject), an ignore
            # region, unless the class table names an object 255.
            objects.append((IGNORE_CLASS, ids == k))
            continue
        name = cfg.prompt if table is None else table.get((stem, k))
        if name is None:
            bad.bad(path, f"instance {k} has no row in {cfg.instance_classes}")
            return None
        objects.append((name, ids == k))
    # Without a table the one prompt is used as it is, as in the binary format.
    samples, instances = objects_to_samples(cfg, seed, stem, objects, vocab, ids.shape,
                                            (lambda name: name) if table is None else None)
    return Item(image, samples, instances)


@dataclass(frozen=True)
class FolderListing:
    """The files of a folders source, by stem, before anything is decoded."""

    images: dict[str, Path]
    masks: dict[str, Path]  # binary / indexed / instances
    per_class: dict[str, dict[str, Path]]  # per_class: class name -> stem -> mask

    @property
    def stems(self) -> list[str]:
        """The images with a mask to read, in file order (what the split is drawn over)."""
        if self.per_class:
            return list(self.images)
        return [s for s in self.images if s in self.masks]


def list_folders(cfg: PrepareConfig, bad: BadFiles | None = None) -> FolderListing:
    """The source's files, checked for the keys the format needs; nothing decoded."""
    bad = bad or BadFiles()
    if not cfg.images:
        raise DataError("prepare.images: required for prepare.source: folders")
    if not cfg.masks:
        raise DataError("prepare.masks: required for prepare.source: folders")
    if cfg.mask_format == "binary" and not cfg.prompt:
        raise DataError("prepare.prompt: required for prepare.source: folders with "
                        "prepare.mask_format: binary")
    if cfg.mask_format == "instances" and not (cfg.prompt or cfg.instance_classes):
        raise DataError("prepare.instance_classes: required for prepare.mask_format: "
                        "instances (or prepare.prompt: every object one class)")
    images = image_files(Path(cfg.images), "prepare.images", bad)
    if not images:
        raise DataError(f"prepare.images: no images ({', '.join(IMAGE_EXTS)}) in {cfg.images}")
    masks_dir = Path(cfg.masks)
    per_class: dict[str, dict[str, Path]] = {}
    masks: dict[str, Path] = {}
    if cfg.mask_format == "per_class":
        for name in _class_names(cfg):
            per_class[name] = image_files(masks_dir / name, f"prepare.masks ({name!r})", bad)
    else:
        masks = image_files(masks_dir, "prepare.masks", bad)
    return FolderListing(images, masks, per_class)


def load_folder_image(cfg: PrepareConfig, seed: int, stem: str, path: Path,
                      masks: tuple[tuple[str, Path], ...], extra: Any, *, bad: BadFiles
                      ) -> Item | None:
    """One image of a folders source and its masks (``masks``: (class, file) pairs for
    per_class, one ("", file) otherwise; ``extra``: the instance table or the vocabulary)."""
    image = bad.open(path, "RGB")
    if image is None:
        return None
    if cfg.mask_format == "instances":
        table, vocab = extra
        return _instance_item(cfg, seed, stem, masks[0][1], image, table, vocab, bad)
    if cfg.mask_format == "binary":
        mask = read_binary_mask(masks[0][1], image.size, bad)
        samples = None if mask is None else [Sample(stem, cfg.prompt, mask)]
    elif cfg.mask_format == "indexed":
        samples = _indexed_samples(cfg, seed, stem, masks[0][1], image.size, bad)
    else:
        samples = _per_class_samples(cfg, seed, stem, dict(masks), extra, image.size, bad)
    return None if samples is None else Item(image, samples)


def folder_tasks(cfg: PrepareConfig, seed: int, bad: BadFiles) -> list[Task]:
    """A task per image with its masks, split by :func:`stable_splits` over the stems."""
    listing = list_folders(cfg, bad)
    if cfg.mask_format != "per_class":
        for stem, path in listing.images.items():
            if stem not in listing.masks:
                bad.bad(path, f"no mask with the same stem in {cfg.masks}", "missing")
    stems = listing.stems
    splits = stable_splits(stems, cfg.val_fraction, cfg.test_fraction, seed)
    extra: Any = None
    if cfg.mask_format == "instances":
        table = read_instance_table(cfg)
        extra = (table, instance_vocab(cfg, table))
    elif cfg.mask_format == "per_class":
        extra = [class_prompt(cfg, c) for c in listing.per_class]
    tasks = []
    for stem in stems:
        if listing.per_class:
            masks = tuple((name, files[stem]) for name, files in listing.per_class.items()
                          if stem in files)
        else:
            masks = (("", listing.masks[stem]),)
        tasks.append(Task(stem, splits[stem], load_folder_image,
                          (cfg, seed, stem, listing.images[stem], masks, extra)))
    return tasks


def iter_folders(cfg: PrepareConfig, bad: BadFiles, seed: int = 0
                 ) -> Iterator[tuple[str, Image.Image, list[Sample]]]:
    """(stem, RGB image, samples) for each image whose masks are good, in one process."""
    for task in folder_tasks(cfg, seed, bad):
        item = task.run(bad)
        if item is not None:
            yield task.stem, item.image, item.samples
