"""What the data sources hand to ``prepare``: samples, the mask encoding, splits, bad files.

A sample is (image, prompt, binary mask); ``negative`` when the mask has no foreground pixel
(the prompt names something absent from the image). Mask encoding (uint8): 0 = background,
1 = foreground, 255 = ignore (VOC borders, COCO crowd regions, padding); ignore pixels count as
neither foreground nor background in losses and metrics. How ``prepare`` stores them:
`cdsam.data.shards`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cdsam.errors import DataError

log = logging.getLogger(__name__)

BACKGROUND, FOREGROUND, IGNORE = 0, 1, 255
SPLITS = ("train", "val", "test")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def slug(text: str) -> str:
    """Lower case, runs of non-alphanumerics → '-', trimmed: "a Red circle!" → "a-red-circle"."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


@dataclass
class Sample:
    """One prepared row before it is written: the arrays and their labels."""

    stem: str
    prompt: str
    mask: np.ndarray  # HxW uint8 in the encoding above


@dataclass
class BadFiles:
    """The bad-file policy: raise on the first one, or log it and count it."""

    policy: str = "error"
    skipped: list[str] | None = None

    def __post_init__(self) -> None:
        self.skipped = []

    def bad(self, path: Path | str, reason: str) -> None:
        msg = f"{path}: {reason}"
        if self.policy == "error":
            raise DataError(msg + " (set prepare.on_bad_file: skip to skip such files)")
        log.warning("skipping %s", msg)
        self.skipped.append(msg)

    def open(self, path: Path, mode: str | None = None, what: str = "image"
             ) -> Image.Image | None:
        """:func:`open_image`, or None after reporting an unreadable file."""
        try:
            return open_image(path, mode)
        except UNREADABLE as exc:
            self.bad(path, f"unreadable {what} ({exc})")
            return None


# One-channel modes with more than 8 bits (16-bit TIFF / PNG, 32-bit integer or float):
# PIL's convert("RGB") clips them at 255, which saturates most of a microscopy image.
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def to_rgb(image: Image.Image) -> Image.Image:
    """An RGB image; a wide one-channel image is first scaled by its own range (its minimum
    to 0, its maximum to 255), as viewers show it."""
    if image.mode not in WIDE_MODES:
        return image.convert("RGB")
    values = np.asarray(image, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    return Image.fromarray(np.rint(scaled).astype(np.uint8)).convert("RGB")


def open_image(path: Path, mode: str | None = None) -> Image.Image:
    """Open and fully decode an image (truncated files fail here, not later)."""
    with Image.open(path) as im:
        im.load()
        if mode == "RGB":
            return to_rgb(im)
        return im.convert(mode) if mode else im.copy()


UNREADABLE = (OSError, SyntaxError, ValueError)  # what PIL raises for a bad or truncated file


def read_image(path: Path, mode: str, what: str = "image") -> Image.Image:
    """:func:`open_image`, failing with one line that names the file."""
    try:
        return open_image(path, mode)
    except UNREADABLE as exc:
        raise DataError(f"{path}: unreadable {what} ({exc})") from None


def split_ids(ids: list[str], val_fraction: float, test_fraction: float, seed: int
              ) -> dict[str, str]:
    """Seeded split of image ids; each split that is asked for gets at least one image."""
    rng = np.random.default_rng(seed)
    order = [ids[i] for i in rng.permutation(len(ids))]
    n = len(order)
    n_val = max(1, round(n * val_fraction)) if n >= 2 else 0
    n_test = max(1, round(n * test_fraction)) if test_fraction > 0 else 0
    out = {}
    for i, key in enumerate(order):
        out[key] = "val" if i < n_val else "test" if i < n_val + n_test else "train"
    return out
