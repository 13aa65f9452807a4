"""The prepared layout: training-ready shards that every stage opens instead of decoding.

``prepare`` is the only step that decodes. It fits every image once (``data.fit`` / ``resize`` /
``crop``, `cdsam.data.geometry`) and writes, per split and per ``prepare.shard_images`` images
(shard ``K``, numbered from 0):

- ``{split}-images-K.u8``: I x 3 x C x C uint8, one row per image (fitted, CHW);
- ``{split}-labels-K.u8``: L x C x C uint8 label maps, one per image (rarely more, see below);
- ``{split}-luts-K.u8``: T x 256 uint8 look-up tables, label → mask value;

and, for all splits, ``samples.csv`` (one row per (image, prompt): ``id, split, image, prompt,
negative, image_row, label_row, lut``), ``images.csv`` (``split, row, image, width, height``:
the original size), ``instances.csv`` where the source has objects (one row per object: ``split,
image, instance, prompt, image_row, label_row, lut``) and ``index.json`` (fit, shapes, the rows
of each shard, a sha256 of every file, one ``digest``). Row numbers count across a split's
shards. A split's images fill its shards in order, so images added after the last ones append
to the last shard or start new ones: the earlier shard files stay byte for byte as they were,
and DVC stores and moves only what changed.

A sample's mask is ``luts[lut][labels[label_row]]``: value for value the fitted binary mask
(0 background, 1 target, 255 ignore) of that prompt. The label of a pixel numbers the distinct
combination of all the image's masks at that pixel, so overlapping objects, per-class ignore
(COCO crowd regions, VOC borders) and padding are all kept exactly; a prompt's table says what
each combination is for it. An image with more than 256 combinations (many overlapping classes)
gets a second label map for the rest of its masks. Files and bytes grow with the images: a
negative prompt is a row and a table entry it shares with the image's other negatives, no pixels;
an instance is a row and a table (its pixels are combinations the label map already numbers,
unless the image has more than 256 of them).

The shards are raw little-endian uint8 (shapes in ``index.json``), written by appending while
the sha256 of each is computed, so nothing is read back to hash it; stages open them
memory-mapped (`cdsam.data.prepared`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torchvision import tv_tensors

from cdsam import io
from cdsam.config.schema import DataConfig
from cdsam.data.geometry import fit_transform
from cdsam.data.manifest import FOREGROUND, Sample, slug
from cdsam.errors import DataError

FORMAT = 3
INDEX, SAMPLES, IMAGES = "index.json", "samples.csv", "images.csv"
INSTANCES = "instances.csv"  # one row per object, where the source has objects
PROMPTS = "prompts.json"  # prompt ensembles (cdsam.data.templates), with several templates
SAMPLE_COLUMNS = ["id", "split", "image", "prompt", "negative", "image_row", "label_row", "lut"]
IMAGE_COLUMNS = ["split", "row", "image", "width", "height"]
INSTANCE_COLUMNS = ["split", "image", "instance", "prompt", "image_row", "label_row", "lut"]
SHARD_BYTES = 3 * 2**29  # ~1.5 GiB of image and label rows a shard file
SHARDS = ("images", "labels", "luts")
LUT_SIZE = 256  # uint8 labels
_DIGIT = np.full(256, -1, np.int64)
_DIGIT[[0, 1, 255]] = [0, 1, 2]  # mask value -> base-3 digit
_VALUE = np.array([0, 1, 255], np.uint8)
_MAX_COLUMNS = 39  # 3**39 < 2**63: a pixel's combination of up to 39 masks fits one int64 key


def shard_name(split: str, kind: str, shard: int) -> str:
    return f"{split}-{kind}-{shard:05d}.u8"


def _key(masks: list[np.ndarray]) -> np.ndarray:
    """Each pixel's combination of the masks' values as one base-3 int64."""
    key = np.zeros(masks[0].shape, np.int64)
    for k, m in enumerate(masks):
        d = _DIGIT[m]
        if d.min() < 0:
            raise DataError(f"mask value {np.unique(m[d < 0])[0]} is not 0, 1 or 255")
        key += d * 3**k
    return key


def _codes(masks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(the distinct combinations in increasing order, each pixel's index among them)."""
    key = _key(masks)
    if len(masks) <= 12:  # at most 3**12 slots: a table instead of a sort
        present = np.zeros(3**len(masks), bool)
        present[key] = True
        return np.flatnonzero(present), (np.cumsum(present) - 1)[key]
    codes, label = np.unique(key, return_inverse=True)
    return codes, label.reshape(key.shape)


def _tables(codes: np.ndarray, columns: int) -> list[np.ndarray]:
    """Per mask: combination index → that mask's value."""
    luts = []
    for k in range(columns):
        lut = np.zeros(LUT_SIZE, np.uint8)
        lut[:len(codes)] = _VALUE[(codes // 3**k) % 3]
        luts.append(lut)
    return luts


def encode_masks(masks: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray],
                                                     list[tuple[int, int]]]:
    """Fitted binary masks of one image → (label maps, tables, per mask its (label map, table)
    index). Identical masks (an image's negatives) share one table. Exact: ``tables[t][
    labels[l]]`` is the mask, value for value."""
    distinct: dict[bytes, int] = {}
    order: list[np.ndarray] = []
    of_mask = []
    for m in masks:
        k = distinct.setdefault(m.tobytes(), len(order))
        if k == len(order):
            order.append(m)
        of_mask.append(k)

    def coded(members: list[int]) -> tuple[np.ndarray, np.ndarray] | None:
        """The group's codes, or None when they do not fit a uint8 label."""
        if len(members) > _MAX_COLUMNS:
            return None
        codes, label = _codes([order[i] for i in members])
        return (codes, label) if len(codes) <= LUT_SIZE else None

    everything = list(range(len(order)))
    found = coded(everything)
    groups = [(everything, found)]  # the usual case: one label map
    if found is None:
        # Greedy: masks join the current group while the combinations fit a uint8 label
        # (one mask alone always does: three values).
        groups = [([0], coded([0]))]
        for k in everything[1:]:
            trial = coded(groups[-1][0] + [k])
            if trial is None:
                groups.append(([k], coded([k])))
            else:
                groups[-1] = (groups[-1][0] + [k], trial)
    labels, tables, where = [], [], {}
    for g, (members, (codes, label)) in enumerate(groups):
        labels.append(label.astype(np.uint8))
        for i, lut in zip(members, _tables(codes, len(members)), strict=True):
            where[i] = (g, len(tables))
            tables.append(lut)
    return labels, tables, [where[k] for k in of_mask]


@dataclass
class Encoded:
    """One image fitted and encoded (in a worker), ready to append: its pixels, label maps,
    tables, and per sample / instance its (label map, table) index within the image."""

    stem: str
    width: int
    height: int
    pixels: np.ndarray  # 3xCxC
    labels: list[np.ndarray]
    tables: list[np.ndarray]
    rows: list[tuple[str, bool, int, int]]  # (prompt, negative after the fit, label, table)
    instances: list[tuple[str, int, int]]  # (class prompt, label, table)
    emptied_by_fit: int  # positives whose object the fit left outside the input


def fitted(fit: Any, image: Image.Image, masks: list[np.ndarray]
           ) -> tuple[np.ndarray, list[np.ndarray]]:
    """The image (3xCxC) and its masks (CxC) at the model's input size, as training used to
    fit them at every stage start (the same transform, masks nearest)."""
    img = tv_tensors.Image(torch.from_numpy(np.asarray(image.convert("RGB")).copy())
                           .permute(2, 0, 1))
    out_image, first = fit(img, tv_tensors.Mask(torch.from_numpy(masks[0])[None]))
    rest = [fit(tv_tensors.Mask(torch.from_numpy(m)[None])) for m in masks[1:]]
    return out_image.numpy(), [m.numpy()[0] for m in [first, *rest]]


def encode_image(fit: Any, stem: str, image: Image.Image, samples: Iterable[Sample],
                 instances: Iterable[Sample] = ()) -> Encoded:
    """Fit ``image`` and its masks once and encode them (`encode_masks`); each distinct mask
    (an image's negatives share one, an object alone in its class is its class's mask) is
    fitted once."""
    samples, instances = list(samples), list(instances)
    w, h = image.size
    for s in samples + instances:
        if s.mask.shape != (h, w):
            raise DataError(f"{stem}: mask of {s.prompt!r} is {s.mask.shape[1]}x"
                            f"{s.mask.shape[0]}, its image {w}x{h}")
    distinct: dict[bytes, int] = {}
    masks, of_mask = [], []
    for s in samples + instances:
        m = np.ascontiguousarray(s.mask, dtype=np.uint8)
        k = distinct.setdefault(m.tobytes(), len(masks))
        if k == len(masks):
            masks.append(m)
        of_mask.append(k)
    pixels, fitted_masks = fitted(fit, image, masks)
    labels, tables, where = encode_masks(fitted_masks)
    # Negative is what the model is shown: a ``crop`` fit can cut an object out entirely.
    empty = [not (m == FOREGROUND).any() for m in fitted_masks]
    rows, emptied = [], 0
    for s, k in zip(samples, of_mask, strict=False):
        emptied += empty[k] and bool((s.mask == FOREGROUND).any())
        rows.append((s.prompt, empty[k], *where[k]))
    objects = [(s.prompt, *where[k]) for s, k in zip(instances, of_mask[len(samples):],
                                                     strict=True)]
    return Encoded(stem, w, h, pixels, labels, tables, rows, objects, emptied)


def auto_shard_images(crop: int) -> int:
    """Images per shard for ~1.5 GB of image and label rows at ``crop``: large enough that
    DVC hashes and moves few files, small enough that one changed image re-uploads a bounded
    part of a split."""
    return max(1, SHARD_BYTES // (4 * crop * crop))


@dataclass
class _Shard:
    """One append-only shard file and the sha256 of what was appended."""

    path: Path
    rows: int = 0
    sha: Any = field(default_factory=hashlib.sha256)
    fh: Any = None

    def append(self, array: np.ndarray, stream: Any) -> None:
        """Append one row; ``stream``: the hash of the split's rows of this kind, across its
        shards."""
        data = np.ascontiguousarray(array, dtype=np.uint8).tobytes()
        if self.fh is None:
            self.fh = open(self.path, "wb")  # noqa: SIM115 (closed by close())
        self.fh.write(data)
        self.sha.update(data)
        stream.update(data)
        self.rows += 1

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None


class ShardWriter:
    """Appends encoded images to their split's shards, ``shard_images`` images a shard file,
    and writes the indexes at the end."""

    def __init__(self, root: Path, data: DataConfig, shard_images: int | None = None) -> None:
        self.root = root
        self.data = data
        self.fit = fit_transform(data.fit, data.resize, data.crop)
        self.shard_images = shard_images or auto_shard_images(data.crop)
        self.shards: dict[str, list[dict[str, _Shard]]] = {}  # split -> per shard, kind -> file
        self.counts: dict[str, dict[str, int]] = {}  # split -> kind -> rows so far
        self.streams: dict[str, dict[str, Any]] = {}  # split -> kind -> sha256 of all rows
        self.rows: list[dict[str, Any]] = []
        self.images: list[dict[str, Any]] = []
        self.instances: list[dict[str, Any]] = []
        self.emptied_by_fit = 0  # positives whose object the fit left outside the input

    def _files(self, split: str) -> dict[str, _Shard]:
        """The shard files the split's next image goes to (a new set every shard_images)."""
        counts = self.counts.setdefault(split, dict.fromkeys(SHARDS, 0))
        shards = self.shards.setdefault(split, [])
        k = counts["images"] // self.shard_images
        if k == len(shards):
            if shards:
                for shard in shards[-1].values():
                    shard.close()
            shards.append({kind: _Shard(self.root / shard_name(split, kind, k))
                           for kind in SHARDS})
        return shards[k]

    def add_image(self, stem: str, image: Image.Image, samples: Iterable[Sample],
                  split: str, instances: Iterable[Sample] = ()) -> None:
        """Fit, encode and append one image (in this process)."""
        self.write(encode_image(self.fit, stem, image, samples, instances), split)

    def write(self, enc: Encoded, split: str) -> None:
        """Append one encoded image to ``split``'s current shard."""
        files = self._files(split)
        counts = self.counts[split]
        streams = self.streams.setdefault(split, {k: hashlib.sha256() for k in SHARDS})
        image_row, label_base, lut_base = (counts[k] for k in SHARDS)
        files["images"].append(enc.pixels, streams["images"])
        for label in enc.labels:
            files["labels"].append(label, streams["labels"])
        for table in enc.tables:
            files["luts"].append(table, streams["luts"])
        counts["images"] += 1
        counts["labels"] += len(enc.labels)
        counts["luts"] += len(enc.tables)
        self.images.append({"split": split, "row": image_row, "image": enc.stem,
                            "width": enc.width, "height": enc.height})
        self.emptied_by_fit += enc.emptied_by_fit
        for prompt, negative, g, t in enc.rows:
            self.rows.append({
                "id": f"{enc.stem}__{slug(prompt)}", "split": split, "image": enc.stem,
                "prompt": prompt, "negative": int(negative), "image_row": image_row,
                "label_row": label_base + g, "lut": lut_base + t})
        for n, (prompt, g, t) in enumerate(enc.instances):
            self.instances.append({
                "split": split, "image": enc.stem, "instance": n, "prompt": prompt,
                "image_row": image_row, "label_row": label_base + g, "lut": lut_base + t})

    def finish(self, required_splits: Iterable[str]) -> pd.DataFrame:
        """Check the splits and ids, write the sample index and ``index.json``."""
        for shards in self.shards.values():
            for shard in shards[-1].values():
                shard.close()
        df = pd.DataFrame(self.rows, columns=SAMPLE_COLUMNS)
        for split in required_splits:
            if not (df["split"] == split).any():
                raise DataError(f"split {split!r} has no samples; check the source data and "
                                f"prepare.val_fraction / prepare.test_fraction")
        if df["id"].duplicated().any():
            dup = df.loc[df["id"].duplicated(), "id"].iloc[0]
            where = sorted(df.loc[df["id"] == dup, "split"])
            raise DataError(f"two samples share the id {dup!r} (same image stem and prompt, in "
                            f"{' and '.join(where)}): rename one of the images")
        io.write_text(self.root / SAMPLES, df.to_csv(index=False, lineterminator="\n"))
        io.write_text(self.root / IMAGES, pd.DataFrame(self.images, columns=IMAGE_COLUMNS)
                      .to_csv(index=False, lineterminator="\n"))
        if self.instances:
            io.write_text(self.root / INSTANCES, pd.DataFrame(
                self.instances, columns=INSTANCE_COLUMNS).to_csv(index=False,
                                                                 lineterminator="\n"))
        c = self.data.crop
        shapes = {"images": [3, c, c], "labels": [c, c], "luts": [LUT_SIZE]}
        splits = {}
        files = {}
        for split in dict.fromkeys(df["split"]):
            shards = self.shards[split]
            splits[split] = {"samples": int((df["split"] == split).sum()),
                             **self.counts[split],
                             "shards": [{k: f[k].rows for k in SHARDS} for f in shards]}
            for f in shards:
                files.update({shard.path.name: shard.sha.hexdigest() for shard in f.values()})
        for name in (SAMPLES, IMAGES, PROMPTS, INSTANCES):
            if name in (PROMPTS, INSTANCES) and not (self.root / name).is_file():
                continue  # one prompt template / no instances: nothing written beside the rows
            files[name] = hashlib.sha256((self.root / name).read_bytes()).hexdigest()
        files = dict(sorted(files.items()))
        digest = hashlib.sha256(repr(sorted(files.items())).encode()).hexdigest()
        # The same rows cut into other shards (prepare.shard_images, a storage knob) are the
        # same data: what a stage's resume state is keyed by.
        rows = {f"{split}/{kind}": h.hexdigest() for split, kinds in self.streams.items()
                for kind, h in kinds.items()}
        rows.update({name: sha for name, sha in files.items() if not name.endswith(".u8")})
        rows_digest = hashlib.sha256(repr((self.data.fit, self.data.resize, c,
                                           sorted(rows.items()))).encode()).hexdigest()
        io.write_json(self.root / INDEX, {
            "format": FORMAT, "fit": self.data.fit, "resize": self.data.resize, "crop": c,
            "shard_images": self.shard_images, "row_shapes": shapes, "splits": splits,
            "files": files, "digest": digest, "rows_digest": rows_digest})
        return df.assign(negative=df["negative"].astype(bool))
