"""The prepared-data layout and its manifest.

``data/prepared/`` holds ``images/*.png``, ``masks/*.png`` and ``manifest.csv`` with columns
``id, image, mask, prompt, split, negative`` (paths relative to the folder), one row per
(image, prompt, binary mask); ``negative`` is 1 when the mask has no foreground pixel (the
prompt names something absent from the image).

Mask encoding (8-bit PNG, one channel): 0 = background, 1 = foreground, 255 = ignore (VOC
borders); ignore pixels count as neither foreground nor background in losses and metrics.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cdsam import io
from cdsam.errors import DataError

log = logging.getLogger(__name__)

BACKGROUND, FOREGROUND, IGNORE = 0, 1, 255
COLUMNS = ["id", "image", "mask", "prompt", "split", "negative"]
MANIFEST = "manifest.csv"
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


def open_image(path: Path, mode: str | None = None) -> Image.Image:
    """Open and fully decode an image (truncated files fail here, not later)."""
    with Image.open(path) as im:
        im.load()
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


class ManifestWriter:
    """Writes images, masks and the manifest into a (temporary) prepared folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(parents=True, exist_ok=True)
        self.rows: list[dict[str, str]] = []

    def add_image(self, stem: str, image: Image.Image, samples: Iterable[Sample],
                  split: str) -> None:
        image_rel = f"images/{stem}.png"
        image.save(self.root / image_rel, optimize=False)
        for s in samples:
            sid = f"{stem}__{slug(s.prompt)}"
            mask_rel = f"masks/{sid}.png"
            Image.fromarray(s.mask.astype(np.uint8), mode="L").save(self.root / mask_rel)
            self.rows.append({"id": sid, "image": image_rel, "mask": mask_rel,
                              "prompt": s.prompt, "split": split,
                              "negative": int(not (s.mask == FOREGROUND).any())})

    def finish(self, required_splits: Iterable[str]) -> pd.DataFrame:
        df = pd.DataFrame(self.rows, columns=COLUMNS)
        for split in required_splits:
            if not (df["split"] == split).any():
                raise DataError(f"split {split!r} has no samples; check the source data and "
                                f"prepare.val_fraction / prepare.test_fraction")
        if df["id"].duplicated().any():
            dup = df.loc[df["id"].duplicated(), "id"].iloc[0]
            raise DataError(f"two samples share the id {dup!r} (same image stem and prompt)")
        io.write_text(self.root / MANIFEST, df.to_csv(index=False, lineterminator="\n"))
        return df.assign(negative=df["negative"].astype(bool))


def read_manifest(root: str | Path, split: str | None = None) -> pd.DataFrame:
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: manifest not found (run the prepare stage: dvc repro prepare)")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: unreadable manifest ({exc})") from None
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing columns {missing} (prepared by an older cdsam: "
                        f"rerun dvc repro prepare)")
    df["negative"] = df["negative"] == "1"
    if split is not None:
        df = df[df["split"] == split].reset_index(drop=True)
        if df.empty:
            raise DataError(f"{path}: split {split!r} has no samples")
    return df
