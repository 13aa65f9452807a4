"""Open the prepared shards (`cdsam.data.shards`) of one split: no decode, no copy.

Every stage, ``evaluate`` and every DDP rank opens the same files. Up to ``data.memory_mb`` the
image and label shards are memory-mapped (the page cache holds them once for all processes);
beyond it each batch's rows are read from disk with ``pread`` into the batch's own buffer, so a
stage's resident memory does not grow with the dataset. The look-up tables (256 bytes per
distinct mask) and the sample index are read into memory.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cdsam.config.schema import DataConfig
from cdsam.data.manifest import FOREGROUND
from cdsam.data.shards import (
    FORMAT,
    IMAGES,
    INDEX,
    INSTANCE_COLUMNS,
    INSTANCES,
    SAMPLE_COLUMNS,
    SAMPLES,
    shard_name,
)
from cdsam.errors import DataError

log = logging.getLogger("cdsam.data")


def read_index(root: str | Path) -> dict[str, Any]:
    """``index.json`` of a prepared folder, checked to be this cdsam's layout."""
    path = Path(root) / INDEX
    if not path.is_file():
        raise DataError(f"{path}: not found (run the prepare stage: dvc repro prepare)")
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: unreadable ({exc})") from None
    if index.get("format") != FORMAT:
        raise DataError(f"{path}: prepared by another cdsam layout (format "
                        f"{index.get('format')}, this cdsam reads {FORMAT}): rerun dvc repro "
                        f"prepare")
    return index


def prepared_digest(root: str | Path) -> str:
    """One sha256 over the prepared rows and tables, computed by ``prepare`` as it wrote them;
    the same whatever shards the rows were cut into (``prepare.shard_images``)."""
    index = read_index(root)
    return index.get("rows_digest") or index["digest"]


def check_fit(root: str | Path, data: DataConfig) -> dict[str, Any]:
    """The index, after checking that it was fitted as ``data`` says (else one line)."""
    index = read_index(root)
    have = {k: index[k] for k in ("fit", "resize", "crop")}
    want = {"fit": data.fit, "resize": data.resize, "crop": data.crop}
    if want["fit"] == "pad":  # resize plays no part in the pad fit
        have.pop("resize")
        want.pop("resize")
    if have != want:
        diff = ", ".join(f"data.{k}: {want[k]} (prepared: {have[k]})" for k in want
                         if want[k] != have[k])
        raise DataError(f"{Path(root) / INDEX}: {diff}; rerun dvc repro prepare (it fits the "
                        f"images once, for every stage)")
    return index


def read_samples(root: str | Path, split: str | None = None) -> pd.DataFrame:
    """The sample index (``samples.csv``), all splits or one, ``negative`` as bool."""
    path = Path(root) / SAMPLES
    read_index(root)
    try:
        df = pd.read_csv(path, dtype={"id": str, "split": str, "image": str, "prompt": str},
                         keep_default_na=False)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: unreadable sample index ({exc})") from None
    missing = [c for c in SAMPLE_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing columns {missing}: rerun dvc repro prepare")
    df["negative"] = df["negative"].astype(int) == 1
    if split is not None:
        df = df[df["split"] == split].reset_index(drop=True)
        if df.empty:
            raise DataError(f"{path}: split {split!r} has no samples")
    return df


def read_images(root: str | Path) -> pd.DataFrame:
    """``images.csv``: split, row, image (stem), original width and height."""
    return pd.read_csv(Path(root) / IMAGES, dtype={"image": str, "split": str},
                       keep_default_na=False)


def read_instances(root: str | Path, split: str) -> pd.DataFrame:
    """``instances.csv`` rows of one split (empty when the source had no objects): per object
    its class prompt and the (label_row, lut) that decode its mask, as a sample's do."""
    path = Path(root) / INSTANCES
    if not path.is_file():
        return pd.DataFrame(columns=INSTANCE_COLUMNS)
    df = pd.read_csv(path, dtype={"split": str, "image": str, "prompt": str},
                     keep_default_na=False)
    return df[df["split"] == split].reset_index(drop=True)


class Rows:
    """A shard of fixed-size uint8 rows: memory-mapped, or read row by row with ``pread``."""

    def __init__(self, path: Path, shape: Sequence[int], mapped: bool) -> None:
        self._fd: int | None = None
        self.path = path
        self.row_shape = tuple(int(s) for s in shape[1:])
        self.n = int(shape[0])
        self.row_bytes = int(np.prod(self.row_shape)) if self.row_shape else 1
        size = path.stat().st_size if path.is_file() else -1
        if size != self.n * self.row_bytes:
            raise DataError(f"{path}: {size} bytes, index.json says {self.n} rows of "
                            f"{self.row_bytes}: rerun dvc repro prepare")
        self.mapped = mapped
        self._map = np.memmap(path, np.uint8, "r", shape=(self.n, *self.row_shape)) \
            if mapped and self.n else None

    def __len__(self) -> int:
        return self.n

    @property
    def nbytes(self) -> int:
        return self.n * self.row_bytes

    def __getstate__(self) -> dict:
        # Worker processes reopen the file (a descriptor or a map does not travel).
        return {"path": self.path, "shape": (self.n, *self.row_shape), "mapped": self.mapped}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["shape"], state["mapped"])

    def take(self, rows: Sequence[int] | np.ndarray, out: np.ndarray | None = None
             ) -> np.ndarray:
        """Rows ``rows`` (in that order) as one array, into ``out`` when given."""
        rows = np.asarray(rows, dtype=np.int64)
        if out is None:
            out = np.empty((len(rows), *self.row_shape), np.uint8)
        if self._map is not None:
            return np.take(self._map, rows, axis=0, out=out)
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        for j, r in enumerate(rows.tolist()):
            view = memoryview(out[j]).cast("B")
            if os.preadv(self._fd, [view], r * self.row_bytes) != self.row_bytes:
                raise DataError(f"{self.path}: short read at row {r}")
        return out

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()


class ShardedRows:
    """A split's rows of one kind across its shard files, numbered as one."""

    def __init__(self, parts: list[Rows]) -> None:
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts])
        self.row_shape = parts[0].row_shape
        self.mapped = parts[0].mapped

    @classmethod
    def open(cls, root: Path, split: str, kind: str, index: dict[str, Any], mapped: bool
             ) -> ShardedRows:
        shape = index["row_shapes"][kind]
        return cls([Rows(root / shard_name(split, kind, k), [n[kind], *shape], mapped)
                    for k, n in enumerate(index["splits"][split]["shards"])])

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def take(self, rows: Sequence[int] | np.ndarray, out: np.ndarray | None = None
             ) -> np.ndarray:
        """Rows ``rows`` (split-wide numbers, in that order) as one array."""
        if len(self.parts) == 1:
            return self.parts[0].take(rows, out)
        rows = np.asarray(rows, dtype=np.int64)
        if out is None:
            out = np.empty((len(rows), *self.row_shape), np.uint8)
        shard = np.searchsorted(self.starts, rows, side="right") - 1
        for k in np.unique(shard).tolist():
            at = np.flatnonzero(shard == k)
            out[at] = self.parts[k].take(rows[at] - self.starts[k])
        return out

    def close(self) -> None:
        for p in self.parts:
            p.close()


@dataclass
class PreparedSplit:
    """One split of the prepared folder, opened: rows of images, label maps and tables, and the
    sample index as plain lists (a pandas lookup per sample costs more than the sample)."""

    root: Path
    split: str
    crop: int
    df: pd.DataFrame
    images: ShardedRows
    labels: ShardedRows
    luts: np.ndarray  # T x 256
    image_row: np.ndarray  # N int64
    label_row: np.ndarray  # N int64
    lut_row: np.ndarray  # N int64
    image_keys: list[str]  # I: the stem of each image row
    prompts: list[str]  # N
    ids: list[str]  # N

    @functools.cached_property
    def cache_keys(self) -> list[str]:
        """A key per image row, unique across the splits of one prepared folder: what the
        feature cache stores by (two images may share a stem, e.g. ``frame_000000`` of two
        videos, or a COCO val file named like a train one)."""
        return [f"{self.split}/{row}" for row in range(len(self.image_keys))]

    @classmethod
    def open(cls, root: str | Path, split: str, data: DataConfig | None = None
             ) -> PreparedSplit:
        """``data``: the stage's ``data`` params, checked against the prepared fit; None
        takes the fit the folder was prepared with (tools, tests)."""
        root = Path(root)
        if data is None:
            index = read_index(root)
            data = DataConfig(fit=index["fit"], resize=index["resize"], crop=index["crop"])
        index = check_fit(root, data)
        df = read_samples(root, split)
        counts = index["splits"][split]
        shapes = index["row_shapes"]
        need = counts["images"] * int(np.prod(shapes["images"])) + \
            counts["labels"] * int(np.prod(shapes["labels"]))
        mapped = need <= data.memory_mb * 2**20
        if not mapped:
            log.info("%s split: %.0f MB of prepared rows > data.memory_mb (%d): each batch reads "
                     "its rows from disk", split, need / 2**20, data.memory_mb)
        images = ShardedRows.open(root, split, "images", index, mapped)
        labels = ShardedRows.open(root, split, "labels", index, mapped)
        lut_shards = ShardedRows.open(root, split, "luts", index, True)
        luts = lut_shards.take(np.arange(len(lut_shards)))
        keys = df.drop_duplicates("image_row").sort_values("image_row")
        if keys["image_row"].tolist() != list(range(counts["images"])):
            raise DataError(f"{root / SAMPLES}: {split} rows do not cover its {counts['images']}"
                            f" images: rerun dvc repro prepare")
        return cls(root, split, int(index["crop"]), df, images, labels, luts,
                   df["image_row"].to_numpy(np.int64), df["label_row"].to_numpy(np.int64),
                   df["lut"].to_numpy(np.int64), keys["image"].tolist(), df["prompt"].tolist(),
                   df["id"].tolist())

    def __len__(self) -> int:
        return len(self.ids)

    @functools.cached_property
    def objects(self) -> list[np.ndarray] | None:
        """Per sample, its objects' (label_row, lut) pairs as a Kx2 int64 array (K = 0 for a
        negative), from ``instances.csv``; None when the prepared data has no objects."""
        inst = read_instances(self.root, self.split)
        if inst.empty:
            return None
        by_key: dict[tuple[int, str], list[tuple[int, int]]] = {}
        for r, p, g, t in zip(inst["image_row"].tolist(), inst["prompt"].tolist(),
                              inst["label_row"].tolist(), inst["lut"].tolist(), strict=True):
            by_key.setdefault((int(r), p), []).append((int(g), int(t)))
        empty = np.zeros((0, 2), np.int64)
        return [np.asarray(by_key[(int(r), p)], np.int64) if (int(r), p) in by_key else empty
                for r, p in zip(self.image_row.tolist(), self.prompts, strict=True)]

    def object_ids(self, idx: Sequence[int] | np.ndarray, out: np.ndarray | None = None
                   ) -> np.ndarray:
        """BxCxC uint8 object-id maps of samples ``idx``: 0 where no object of the sample's
        prompt is, k where its k-th object is (1-based; a later object wins where two
        overlap; objects beyond 254 share id 254). Zero everywhere without objects."""
        idx = np.asarray(idx, dtype=np.int64)
        if out is None:
            out = np.zeros((len(idx), self.crop, self.crop), np.uint8)
        else:
            out[:] = 0
        objects = self.objects
        if objects is None:
            return out
        for j, i in enumerate(idx.tolist()):
            pairs = objects[i]
            if len(pairs):
                masks = self.decode(pairs[:, 0], pairs[:, 1])
                for k, m in enumerate(masks, start=1):
                    out[j][m == FOREGROUND] = min(k, 254)
        return out

    @property
    def on_disk(self) -> bool:
        return not self.images.mapped

    @property
    def nbytes(self) -> int:
        return self.images.nbytes + self.labels.nbytes + self.luts.nbytes

    def image_rows(self, rows: Sequence[int] | np.ndarray, out: np.ndarray | None = None
                   ) -> np.ndarray:
        """Bx3xCxC uint8 images of image rows ``rows``."""
        return self.images.take(rows, out)

    def masks(self, idx: Sequence[int] | np.ndarray, out: np.ndarray | None = None
              ) -> np.ndarray:
        """BxCxC uint8 masks (0 / 1 / 255) of samples ``idx``: each its label map through its
        table."""
        idx = np.asarray(idx, dtype=np.int64)
        return self.decode(self.label_row[idx], self.lut_row[idx], out)

    def decode(self, label_rows: np.ndarray, luts: np.ndarray, out: np.ndarray | None = None
               ) -> np.ndarray:
        """BxCxC masks of (label map, table) pairs: samples', or instances' from
        :func:`read_instances`."""
        labels = self.labels.take(np.asarray(label_rows, dtype=np.int64))
        if out is None:
            out = np.empty_like(labels)
        for j, t in enumerate(np.asarray(luts, dtype=np.int64).tolist()):
            np.take(self.luts[t], labels[j], out=out[j])
        return out
