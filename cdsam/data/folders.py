"""The ``folders`` source: an images folder, a masks folder (same stems), one prompt."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from cdsam.config import PrepareConfig
from cdsam.data.manifest import (
    BACKGROUND,
    FOREGROUND,
    IMAGE_EXTS,
    UNREADABLE,
    BadFiles,
    Sample,
    open_image,
)
from cdsam.errors import DataError


def _by_stem(folder: Path, key: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise DataError(f"{key}: folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    return {p.stem: p for p in files}


def read_binary_mask(path: Path, size: tuple[int, int], bad: BadFiles) -> np.ndarray | None:
    """A mask file → encoded HxW array (>0 is foreground), or None after reporting it bad."""
    try:
        mask = np.asarray(open_image(path))
    except UNREADABLE as exc:
        bad.bad(path, f"unreadable mask ({exc})")
        return None
    if mask.ndim == 3:
        mask = mask.max(axis=2)
    if (mask.shape[1], mask.shape[0]) != size:
        bad.bad(path, f"mask is {mask.shape[1]}x{mask.shape[0]}, its image is {size[0]}x{size[1]}")
        return None
    if not (mask > 0).any():
        bad.bad(path, "mask has no foreground")
        return None
    return np.where(mask > 0, FOREGROUND, BACKGROUND).astype(np.uint8)


def iter_folders(cfg: PrepareConfig, bad: BadFiles) -> Iterator[tuple[str, Image.Image, list[Sample]]]:
    """Yields (stem, RGB image, [sample]) for each image with a good mask."""
    if not cfg.images:
        raise DataError("prepare.images: required for prepare.source: folders")
    if not cfg.masks:
        raise DataError("prepare.masks: required for prepare.source: folders")
    if not cfg.prompt:
        raise DataError("prepare.prompt: required for prepare.source: folders")
    images = _by_stem(Path(cfg.images), "prepare.images")
    masks = _by_stem(Path(cfg.masks), "prepare.masks")
    if not images:
        raise DataError(f"prepare.images: no images ({', '.join(IMAGE_EXTS)}) in {cfg.images}")
    for stem, path in images.items():
        if stem not in masks:
            bad.bad(path, f"no mask with the same stem in {cfg.masks}")
            continue
        try:
            image = open_image(path, "RGB")
        except UNREADABLE as exc:
            bad.bad(path, f"unreadable image ({exc})")
            continue
        mask = read_binary_mask(masks[stem], image.size, bad)
        if mask is not None:
            yield stem, image, [Sample(stem, cfg.prompt, mask)]
