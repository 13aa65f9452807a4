"""Training-ready arrays: each split decoded and fitted once, uint8, batches by indexing.

`ManifestDataset` fetches one sample at a time (decode → fit → augment → normalise) and a
``DataLoader`` stacks them, a Python loop per sample. The fit is deterministic, so training
packs each split once at a stage's setup instead:

- ``images``: I×3×C×C uint8, one row per distinct image (an image with several prompts is
  decoded and stored once), in order of first appearance in the manifest;
- ``masks``: N×C×C uint8 (0 background, 1 target, 255 ignore), one row per manifest row;
- ``image_row``: N int64, the image row of each sample.

A batch is then ``images[image_row[idx]]`` and ``masks[idx]``: two index operations, copied to
the device as uint8 (a quarter of float32), normalised there on the whole batch. Targets and
ignore maps are derived on the device too, and augmentation (when on) runs there on whole
batches (`cdsam.data.batch_augment`). Arrays beyond ``data.memory_mb`` go to a memory-mapped
scratch file and are read from disk as batches need them.

Without augmentation the samples are exactly those `ManifestDataset` yields (same fit, same
normalisation, same spatial prompts under the same seeds): tests compare the two paths value
for value, and the default pipeline's losses are unchanged bit for bit.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import tv_tensors
from tqdm import tqdm

from cdsam.config import AugmentConfig
from cdsam.data.augment import sample_seed
from cdsam.data.batch_augment import augment_batch, draw_augment
from cdsam.data.dataset import ManifestDataset
from cdsam.data.geometry import normalize_transform
from cdsam.data.manifest import FOREGROUND, IGNORE
from cdsam.data.spatial import MaskStats, SpatialPolicy, draw_prompts, prompt_arrays
from cdsam.runtime import usable_cores

log = logging.getLogger("cdsam.data")

_SLOTS = ("points", "point_labels", "box", "has_box")


@dataclass
class PackedSplit:
    """One split as uint8 arrays (see the module docstring)."""

    images: torch.Tensor  # I x 3 x C x C uint8
    masks: torch.Tensor  # N x C x C uint8
    image_row: torch.Tensor  # N int64
    image_keys: list[str]  # I: the manifest's image path of each image row
    prompts: list[str]  # N
    ids: list[str]  # N
    stats: MaskStats  # per-row counts and boxes: spatial prompts without scanning masks
    on_disk: bool = False  # arrays memory-mapped from a scratch file
    _scratch: Any = field(default=None, repr=False)  # keeps the scratch folder alive

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def nbytes(self) -> int:
        return self.images.numel() + self.masks.numel()


def _array(shape: tuple[int, ...], on_disk: Path | None, name: str) -> np.ndarray:
    if on_disk is None:
        return np.empty(shape, dtype=np.uint8)
    return np.lib.format.open_memmap(on_disk / f"{name}.npy", mode="w+", dtype=np.uint8,
                                     shape=shape)


# Images per decoding worker below which its start-up costs more than it saves: a forked
# worker starts in ~0.1 s, a spawned one imports torch first (~3 s on 2 cores).
MIN_IMAGES_PER_WORKER = {"fork": 64, "spawn": 1000}
MAX_DECODE_WORKERS = 16


def decode_start_method() -> str:
    """fork, unless this process has a CUDA context: a fork then risks hanging (an earlier
    GPU run hung starting forked loader workers), so workers are spawned."""
    return "spawn" if torch.cuda.is_initialized() else "fork"


def decode_workers(n_images: int, start_method: str = "fork") -> int:
    """Processes that decode a split of ``n_images`` at setup: one per usable core (the main
    process only copies results), none for a split too small to repay their start-up."""
    n = min(usable_cores(), MAX_DECODE_WORKERS, n_images // MIN_IMAGES_PER_WORKER[start_method])
    return n if n >= 2 else 0


class _Groups(Dataset):
    """Image group g → (g, its fitted uint8 image, its masks): one decode per image."""

    def __init__(self, ds: ManifestDataset, groups: list[list[int]]) -> None:
        self.ds, self.groups = ds, groups

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, g: int) -> tuple[int, np.ndarray, np.ndarray]:
        # numpy, not tensors: a tensor from a worker travels through a shared-memory file of
        # its own, which cost more than the decode saved (2 cores, 224²); arrays are pickled.
        image, masks, _ = self.ds.fitted_group(self.groups[g])
        return g, image.numpy(), np.concatenate([m.numpy() for m in masks])


def _as_is(item: Any) -> Any:
    return item


def pack_split(ds: ManifestDataset, memory_mb: float, show_progress: bool = False,
               scratch: Path | None = None, workers: int | None = None,
               start_method: str | None = None) -> PackedSplit:
    """Decode and fit every row of ``ds`` once (each image once) into uint8 arrays.

    Arrays larger than ``memory_mb`` together are written to a memory-mapped file in a
    temporary folder (under ``scratch`` when given), deleted with the returned object.
    ``workers``: decoding processes (default `decode_workers`; 0 decodes here), started by
    ``start_method`` (default `decode_start_method`). The arrays are the same either way:
    every image is decoded on its own, deterministically.
    """
    keys = ds.df["image"].tolist()
    distinct = list(dict.fromkeys(keys))
    row_of = {k: i for i, k in enumerate(distinct)}
    c = ds.crop
    need = (len(distinct) * 3 + len(keys)) * c * c
    tmp = None
    if need > memory_mb * 2**20:
        if scratch is not None:
            scratch.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.TemporaryDirectory(prefix="cdsam-packed-",
                                          dir=str(scratch) if scratch else None)
        log.info("%s split: %.0f MB of decoded data > data.memory_mb (%.0f): memory-mapped from "
                 "%s", ds.split, need / 2**20, memory_mb, tmp.name)
    folder = Path(tmp.name) if tmp else None
    images = _array((len(distinct), 3, c, c), folder, f"{ds.split}-images")
    masks = _array((len(keys), c, c), folder, f"{ds.split}-masks")
    groups = ds.image_groups()
    bar = tqdm(total=len(keys), desc=f"decode {ds.split}", leave=False,
               disable=not show_progress)
    start_method = start_method or decode_start_method()
    workers = decode_workers(len(groups), start_method) if workers is None else workers
    # Each image is decoded and fitted on its own; worker processes (a DataLoader over the
    # image groups) do it in parallel.
    # Its own generator: a DataLoader draws a seed for its workers on every iteration, which
    # would otherwise shift the global RNG stream (LoRA init, dropout) of the training run.
    decoded = DataLoader(_Groups(ds, groups), batch_size=None, num_workers=workers,
                         collate_fn=_as_is, prefetch_factor=8 if workers else None,
                         multiprocessing_context=start_method if workers else None,
                         generator=torch.Generator())
    for g, image, group_masks in decoded:
        images[g] = image
        for idx, m in zip(groups[g], group_masks, strict=True):
            masks[idx] = m
        bar.update(len(groups[g]))
    bar.close()
    if folder is not None:
        images.flush()
        masks.flush()
    return PackedSplit(
        images=torch.from_numpy(images), masks=torch.from_numpy(masks),
        image_row=torch.tensor([row_of[k] for k in keys], dtype=torch.int64),
        image_keys=distinct, prompts=ds.df["prompt"].tolist(), ids=ds.df["id"].tolist(),
        stats=MaskStats.of(masks), on_disk=folder is not None, _scratch=tmp)


_NORMALIZE = normalize_transform()


def gather_rows(src: torch.Tensor, index: torch.Tensor, pin: bool = False) -> torch.Tensor:
    """``src[index]`` along dim 0, the fast way: straight into pinned memory for a CUDA copy,
    else numpy's ``take`` (a row memcpy; 2-6x faster than torch's advanced indexing on uint8
    rows here)."""
    if pin:
        out = torch.empty((len(index), *src.shape[1:]), dtype=src.dtype, pin_memory=True)
        return torch.index_select(src, 0, index, out=out)
    return torch.from_numpy(np.take(src.numpy(), index.numpy(), axis=0))


def normalize_batch(images: torch.Tensor) -> torch.Tensor:
    """Bx3xHxW uint8 → float32 normalised, on whatever device it is on: the transform
    `ManifestDataset` applies per sample, applied to the whole batch (same values)."""
    return _NORMALIZE(tv_tensors.Image(images)).as_subclass(torch.Tensor)


def pixel_placeholder(batch: int, size: int, device: torch.device) -> torch.Tensor:
    """A Bx3xCxC tensor that holds no memory (a broadcast zero): for steps whose DINO input
    comes entirely from the feature cache, where the model reads only the batch's shape."""
    return torch.zeros((), device=device).expand(batch, 3, size, size)


class PackedLoader:
    """Batches of a :class:`PackedSplit`, on ``device``, in the order of ``sampler`` (a
    seeded per-epoch permutation, as the DataLoader path uses) or of ``indices``.

    Each batch is the dict `cdsam.data.dataset.collate` builds, already on the device, plus
    ``image_row``. ``pixels = False`` (set by the trainer when the feature cache holds every
    image) skips the image copy and hands the model :func:`pixel_placeholder`.
    ``prefetch``: assemble the next batch on a background thread while the current one is
    used (CUDA: the host work then overlaps the step; off on the CPU, where it would only
    compete with the step for the cores). ``augment``: ``data.augment`` applied on the device
    to whole batches (`cdsam.data.batch_augment`); spatial prompts are then drawn from the
    augmented masks.
    """

    def __init__(self, split: PackedSplit, batch_size: int, device: torch.device,
                 sampler: DistributedSampler | None = None,
                 indices: Sequence[int] | None = None, spatial: SpatialPolicy | None = None,
                 seed: int = 0, prefetch: bool = False,
                 augment: AugmentConfig | None = None) -> None:
        self.split = split
        self.batch_size = batch_size
        self.device = device
        self.sampler = sampler
        self.indices = list(range(len(split))) if indices is None else list(indices)
        self.spatial = spatial if spatial is not None and spatial.enabled else None
        self.seed = seed
        self.prefetch = prefetch
        self.augment = augment if augment is not None and augment.enable else None
        self.pixels = True
        self.pin = device.type == "cuda"

    def set_epoch(self, epoch: int) -> None:
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

    def _order(self) -> list[int]:
        return list(self.sampler) if self.sampler is not None else self.indices

    def __len__(self) -> int:
        n = len(self.sampler) if self.sampler is not None else len(self.indices)
        return math.ceil(n / self.batch_size)

    def host_batch(self, idx: list[int], epoch: int) -> dict[str, Any]:
        """The CPU side of one batch: uint8 rows by indexing, spatial prompts (or, with
        augmentation, the per-sample warp and colour draws), labels."""
        s = self.split
        index = torch.tensor(idx, dtype=torch.int64)
        rows = s.image_row[index]
        masks = gather_rows(s.masks, index, self.pin)
        out: dict[str, Any] = {
            "mask_u8": masks, "index": index, "image_row": rows,
            "prompt": [s.prompts[i] for i in idx], "id": [s.ids[i] for i in idx],
            "image_key": [s.image_keys[r] for r in rows.tolist()],
        }
        if self.pixels:
            out["image_u8"] = gather_rows(s.images, rows, self.pin)
        slots = prompt_arrays(len(idx))
        seeds = [sample_seed(self.seed, epoch, i) for i in idx] \
            if self.augment is not None or self.spatial is not None else []
        if self.augment is not None:
            theta, colour = draw_augment(self.augment, seeds)
            out["theta"], out["colour"] = torch.from_numpy(theta), torch.from_numpy(colour)
            out["seeds"] = seeds  # the prompts are drawn after the warp (to_device)
        elif self.spatial is not None:
            # The one per-sample step: each draw is seeded by (seed, epoch, sample), as in
            # ManifestDataset, so both paths give every sample the same prompts.
            m = masks.numpy()
            for j, i in enumerate(idx):
                draw_prompts(s.stats, i, m[j], self.spatial, seeds[j], slots, j)
        out.update({k: torch.from_numpy(v) for k, v in slots.items()})
        if self.pin:
            for k in (*_SLOTS, "theta", "colour"):
                if k in out:
                    out[k] = out[k].pin_memory()
        return out

    def to_device(self, host: dict[str, Any]) -> dict[str, Any]:
        """Copy (non-blocking from pinned memory) and finish the batch on the device."""
        dev = self.device
        seeds = host.pop("seeds", None)
        m = host.pop("mask_u8").to(dev, non_blocking=True).unsqueeze(1)
        u8 = host.pop("image_u8", None)
        if u8 is None:
            image = pixel_placeholder(m.shape[0], m.shape[-1], dev)
        elif "theta" in host:
            image, m = augment_batch(u8.to(dev, non_blocking=True), m,
                                     host.pop("theta").to(dev, non_blocking=True),
                                     host.pop("colour").to(dev, non_blocking=True))
            if self.spatial is not None:
                # Clicks and boxes must come from the mask as augmented: read it back (uint8,
                # small) and draw on the host under the same per-sample seeds.
                warped = m[:, 0].cpu().numpy()
                stats = MaskStats.of(warped)
                slots = {k: host[k].numpy() for k in _SLOTS}  # views: filled in place
                for j, seed in enumerate(seeds):
                    draw_prompts(stats, j, warped[j], self.spatial, seed, slots, j)
        else:
            image = normalize_batch(u8.to(dev, non_blocking=True))
        return {**host, "image": image, "mask": (m == FOREGROUND).float(),
                "valid": (m != IGNORE).float(),
                **{k: host[k].to(dev, non_blocking=True) for k in _SLOTS}}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch = self.sampler.epoch if self.sampler is not None else 0
        order = self._order()
        chunks = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if not self.prefetch:
            for idx in chunks:
                yield self.to_device(self.host_batch(idx, epoch))
            return
        with ThreadPoolExecutor(1, thread_name_prefix="cdsam-batches") as pool:
            pending = pool.submit(self.host_batch, chunks[0], epoch) if chunks else None
            for k in range(len(chunks)):
                host = pending.result()
                if k + 1 < len(chunks):
                    pending = pool.submit(self.host_batch, chunks[k + 1], epoch)
                yield self.to_device(host)
