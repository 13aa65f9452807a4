"""The ``folders`` source: an images folder and masks with the same stems.

``prepare.mask_format`` says how masks name their objects:

- ``binary``: ``masks/<stem>.png``, >0 is foreground, one prompt (``prepare.prompt``) for the
  set. An all-zero mask is a true negative ("no such object here"), not a bad file.
- ``indexed``: ``masks/<stem>.png`` with 0 = background, k = ``prepare.classes[k-1]``,
  255 = ignore; one sample per class present, prompt from ``prepare.prompt_template``.
- ``per_class``: ``masks/<class>/<stem>.png``, one binary mask folder per name in
  ``prepare.classes``; a class whose folder has no file for an image is absent from it.

With ``prepare.negatives: absent`` classes absent from an image also give empty-mask samples.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cdsam.config.schema import PrepareConfig
from cdsam.data.manifest import (
    BACKGROUND,
    FOREGROUND,
    IGNORE,
    IMAGE_EXTS,
    BadFiles,
    Sample,
)
from cdsam.data.negatives import absent_samples
from cdsam.data.templates import class_prompt
from cdsam.errors import DataError

Item = tuple[str, Image.Image, list[Sample]]


def _by_stem(folder: Path, key: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise DataError(f"{key}: folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    return {p.stem: p for p in files}


def _read_mask(path: Path, size: tuple[int, int], bad: BadFiles) -> np.ndarray | None:
    """A mask file → HxW array of its values, or None after reporting it bad."""
    pil = bad.open(path, what="mask")
    if pil is None:
        return None
    mask = np.asarray(pil)
    if mask.ndim == 3:
        mask = mask.max(axis=2)
    if (mask.shape[1], mask.shape[0]) != size:
        bad.bad(path, f"mask is {mask.shape[1]}x{mask.shape[0]}, its image is {size[0]}x{size[1]}")
        return None
    return mask


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


def _per_class_samples(cfg: PrepareConfig, seed: int, stem: str, folders: dict[str, dict],
                       size: tuple[int, int], bad: BadFiles) -> list[Sample] | None:
    samples = []
    for name, files in folders.items():
        if stem not in files:
            continue  # absent from this image
        mask = read_binary_mask(files[stem], size, bad)
        if mask is None:
            return None
        samples.append(Sample(stem, class_prompt(cfg, name), mask))
    vocab = [class_prompt(cfg, c) for c in folders]
    return samples + absent_samples(cfg, seed, stem, vocab, [s.prompt for s in samples],
                                    (size[1], size[0]))


@dataclass(frozen=True)
class FolderListing:
    """The files of a folders source, by stem, before anything is decoded."""

    images: dict[str, Path]
    masks: dict[str, Path]  # binary / indexed
    per_class: dict[str, dict[str, Path]]  # per_class: class name -> stem -> mask

    @property
    def stems(self) -> list[str]:
        """The images with a mask to read, in file order (what the split is drawn over)."""
        if self.per_class:
            return list(self.images)
        return [s for s in self.images if s in self.masks]


def list_folders(cfg: PrepareConfig) -> FolderListing:
    """The source's files, checked for the keys the format needs; nothing decoded."""
    if not cfg.images:
        raise DataError("prepare.images: required for prepare.source: folders")
    if not cfg.masks:
        raise DataError("prepare.masks: required for prepare.source: folders")
    if cfg.mask_format == "binary" and not cfg.prompt:
        raise DataError("prepare.prompt: required for prepare.source: folders with "
                        "prepare.mask_format: binary")
    images = _by_stem(Path(cfg.images), "prepare.images")
    if not images:
        raise DataError(f"prepare.images: no images ({', '.join(IMAGE_EXTS)}) in {cfg.images}")
    masks_dir = Path(cfg.masks)
    per_class: dict[str, dict[str, Path]] = {}
    masks: dict[str, Path] = {}
    if cfg.mask_format == "per_class":
        for name in _class_names(cfg):
            per_class[name] = _by_stem(masks_dir / name, f"prepare.masks ({name!r})")
    else:
        masks = _by_stem(masks_dir, "prepare.masks")
    return FolderListing(images, masks, per_class)


def iter_folders(cfg: PrepareConfig, bad: BadFiles, seed: int = 0,
                 listing: FolderListing | None = None) -> Iterator[Item]:
    """Yields (stem, RGB image, samples) for each image whose masks are good, decoding one
    image at a time."""
    listing = listing or list_folders(cfg)
    for stem, path in listing.images.items():
        if cfg.mask_format != "per_class" and stem not in listing.masks:
            bad.bad(path, f"no mask with the same stem in {cfg.masks}")
            continue
        image = bad.open(path, "RGB")
        if image is None:
            continue
        if cfg.mask_format == "binary":
            mask = read_binary_mask(listing.masks[stem], image.size, bad)
            samples = None if mask is None else [Sample(stem, cfg.prompt, mask)]
        elif cfg.mask_format == "indexed":
            samples = _indexed_samples(cfg, seed, stem, listing.masks[stem], image.size, bad)
        else:
            samples = _per_class_samples(cfg, seed, stem, listing.per_class, image.size, bad)
        if samples is not None:
            yield stem, image, samples
