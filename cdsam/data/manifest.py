"""What the data sources hand to ``prepare``: samples, the mask encoding, splits, bad files.

A sample is (image, prompt, binary mask); ``negative`` when the mask has no foreground pixel
(the prompt names something absent from the image). Mask encoding (uint8): 0 = background,
1 = foreground, 255 = ignore (VOC borders, COCO crowd regions, padding); ignore pixels count as
neither foreground nor background in losses and metrics. How ``prepare`` stores them:
`cdsam.data.shards`.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

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
    absent: bool = False  # an absent-class negative cdsam drew, not a mask the source holds


# What a bad file is, for `cdsam data check`'s table (the message says the rest).
PROBLEM_KINDS = ("unreadable", "size", "annotation", "duplicate", "missing")


@dataclass(frozen=True)
class Problem:
    kind: str  # one of PROBLEM_KINDS
    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass
class BadFiles:
    """The bad-file policy: ``error`` raises on the first one; ``skip`` logs it and counts it;
    ``collect`` (``cdsam data check``, prepare's workers) only records it."""

    policy: str = "error"
    problems: list[Problem] = field(default_factory=list)
    notes: list[Problem] = field(default_factory=list)  # not bad, not prepared: said once

    def note(self, path: Path | str, reason: str) -> None:
        """A file the source holds but does not prepare (an image no annotation names)."""
        self.notes.append(Problem("unannotated", str(path), reason))

    @property
    def skipped(self) -> list[str]:
        return [str(p) for p in self.problems]

    def bad(self, path: Path | str, reason: str, kind: str = "annotation") -> None:
        problem = Problem(kind, str(path), reason)
        if self.policy == "error":
            raise DataError(f"{problem} (set prepare.on_bad_file: skip to skip such files)")
        if self.policy == "skip":
            log.warning("skipping %s", problem)
        self.problems.append(problem)

    def open(self, path: Path, mode: str | None = None, what: str = "image"
             ) -> Image.Image | None:
        """:func:`open_image`, or None after reporting an unreadable file."""
        try:
            return open_image(path, mode)
        except UNREADABLE as exc:
            self.bad(path, f"unreadable {what} ({exc})", "unreadable")
            return None

    def wrong_size(self, path: Path | str, what: str, size: tuple[int, int],
                   image_size: tuple[int, int]) -> None:
        self.bad(path, f"{what} is {size[0]}x{size[1]}, its image is {image_size[0]}x"
                       f"{image_size[1]}", "size")


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


def upright(image: Image.Image) -> Image.Image:
    """The image as viewers show it: its EXIF ``Orientation`` applied (a phone photo stored
    sideways). labelme, CVAT and Ultralytics all annotate the image so displayed."""
    return ImageOps.exif_transpose(image)


def open_image(path: Path | BinaryIO, mode: str | None = None) -> Image.Image:
    """Open and fully decode an image (truncated files fail here, not later). ``"RGB"``: a
    photo to segment, upright (:func:`upright`); other modes read a mask's pixels as stored
    (annotation tools write masks without an orientation)."""
    with Image.open(path) as im:
        im.load()
        if mode == "RGB":
            return to_rgb(upright(im))
        return im.convert(mode) if mode else im.copy()


UNREADABLE = (OSError, SyntaxError, ValueError)  # what PIL raises for a bad or truncated file


def read_image(path: Path, mode: str, what: str = "image") -> Image.Image:
    """:func:`open_image`, failing with one line that names the file."""
    try:
        return open_image(path, mode)
    except UNREADABLE as exc:
        raise DataError(f"{path}: unreadable {what} ({exc})") from None


def by_stem(files: list[Path], key: str, bad: BadFiles) -> dict[str, Path]:
    """``files`` by stem; two files of one stem (``cell1.png`` and ``cell1.tif``) are a bad
    file each after the first, named with the one that is kept."""
    found: dict[str, Path] = {}
    for path in sorted(files):
        if path.stem in found:
            bad.bad(path, f"same stem as {found[path.stem].name} in {key}: rename one "
                          f"(the first, {found[path.stem].name}, is kept)", "duplicate")
            continue
        found[path.stem] = path
    return found


def stable_splits(ids: list[str], val_fraction: float, test_fraction: float, seed: int
                  ) -> dict[str, str]:
    """Each id's split from a hash of (seed, id) alone, so adding images never moves the
    ones already there (their shards stay as they were). A split that is needed (train; val
    from 2 ids; test, when asked for, from 3) but drew no id takes the id nearest its range
    from a split that is not needed or has more than one (tiny sets only)."""
    u = {i: int.from_bytes(hashlib.sha256(f"{seed}:{i}".encode()).digest()[:8], "little")
         / 2.0**64 for i in ids}
    out = {i: "val" if x < val_fraction else "test" if x < val_fraction + test_fraction
           else "train" for i, x in u.items()}
    centres = {"train": (1 + val_fraction + test_fraction) / 2, "val": val_fraction / 2,
               "test": val_fraction + test_fraction / 2}
    wanted = ["train", "val", "test"][:min(len(ids), 3 if test_fraction > 0 else 2)]
    for split in wanted:
        have = list(out.values())
        if split in have:
            continue
        # An id of a split that is not needed, or of one with ids to spare.
        donors = [i for i in ids if out[i] not in wanted or have.count(out[i]) > 1]
        out[min(donors, key=lambda i: (out[i] in wanted, abs(u[i] - centres[split]), i))] = split
    return out


def split_ids(ids: list[str], val_fraction: float, test_fraction: float, seed: int
              ) -> dict[str, str]:
    """Seeded split of image ids by one permutation of the list (the synthetic scenes,
    numbered from 0); each split that is asked for gets at least one image."""
    rng = np.random.default_rng(seed)
    order = [ids[i] for i in rng.permutation(len(ids))]
    n = len(order)
    n_val = max(1, round(n * val_fraction)) if n >= 2 else 0
    n_test = max(1, round(n * test_fraction)) if test_fraction > 0 else 0
    out = {}
    for i, key in enumerate(order):
        out[key] = "val" if i < n_val else "test" if i < n_val + n_test else "train"
    return out
