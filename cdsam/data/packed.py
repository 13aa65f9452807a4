"""Training and evaluation batches straight from the prepared shards, by indexing.

A batch is ``images[image_row[idx]]`` and each sample's mask ``luts[lut][labels[label_row]]``
(`cdsam.data.prepared`): a few index operations over memory-mapped uint8 rows, copied to the
device as uint8 (a quarter of float32), normalised there on the whole batch. Targets and
ignore maps are derived on the device too, and augmentation (when on) runs there on whole
batches (`cdsam.data.batch_augment`). Nothing is decoded at a stage's start: ``prepare`` wrote
the fitted arrays once.

Without augmentation the samples are exactly those `ManifestDataset` yields (same arrays, same
normalisation, same spatial prompts under the same seeds): tests compare the two paths value
for value.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch.utils.data import DistributedSampler
from torchvision import tv_tensors

from cdsam.config.schema import AugmentConfig
from cdsam.data.augment import sample_seed
from cdsam.data.batch_augment import augment_batch, draw_augment
from cdsam.data.geometry import normalize_transform
from cdsam.data.manifest import FOREGROUND, IGNORE
from cdsam.data.prepared import PreparedSplit
from cdsam.data.spatial import (
    MaskStats,
    SpatialPolicy,
    draw_prompts,
    prompt_arrays,
    prompted_rows,
)
from cdsam.data.templates import template_draw

_SLOTS = ("points", "point_labels", "box", "has_box")


_NORMALIZE = normalize_transform()


def host_buffer(shape: tuple[int, ...], pin: bool) -> torch.Tensor:
    """An empty uint8 batch buffer, in pinned memory for a non-blocking CUDA copy."""
    return torch.empty(shape, dtype=torch.uint8, pin_memory=pin)


def normalize_batch(images: torch.Tensor) -> torch.Tensor:
    """Bx3xHxW uint8 → float32 normalised, on whatever device it is on: the transform
    `ManifestDataset` applies per sample, applied to the whole batch (same values)."""
    return _NORMALIZE(tv_tensors.Image(images)).as_subclass(torch.Tensor)


def pixel_placeholder(batch: int, size: int, device: torch.device) -> torch.Tensor:
    """A Bx3xCxC tensor that holds no memory (a broadcast zero): for steps whose DINO input
    comes entirely from the feature cache, where the model reads only the batch's shape."""
    return torch.zeros((), device=device).expand(batch, 3, size, size)


class PackedLoader:
    """Batches of a :class:`PreparedSplit`, on ``device``, in the order of ``sampler`` (a
    seeded per-epoch permutation, as the DataLoader path uses) or of ``indices``.

    Each batch is the dict `cdsam.data.dataset.collate` builds, already on the device, plus
    ``image_row``. ``pixels = False`` (set by the trainer when the feature cache holds every
    image) skips the image copy and hands the model :func:`pixel_placeholder`.
    ``prefetch``: assemble the next batch on a background thread while the current one is
    used (CUDA: the host work then overlaps the step; off on the CPU, where it would only
    compete with the step for the cores). ``augment``: ``data.augment`` applied on the device
    to whole batches (`cdsam.data.batch_augment`); spatial prompts are then drawn from the
    augmented masks. ``templates``: how many prompt templates the prepared data has; above
    one, each batch carries the ``template`` each sample shows (`cdsam.data.templates`).
    """

    def __init__(self, split: PreparedSplit, batch_size: int, device: torch.device,
                 sampler: DistributedSampler | None = None,
                 indices: Sequence[int] | None = None, spatial: SpatialPolicy | None = None,
                 seed: int = 0, prefetch: bool = False,
                 augment: AugmentConfig | None = None, templates: int = 1) -> None:
        self.split = split
        self.templates = templates
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
        rows = s.image_row[idx]
        c = s.crop
        masks = host_buffer((len(idx), c, c), self.pin)
        s.masks(idx, out=masks.numpy())
        out: dict[str, Any] = {
            "mask_u8": masks, "index": index, "image_row": torch.from_numpy(rows),
            "prompt": [s.prompts[i] for i in idx], "id": [s.ids[i] for i in idx],
            "image_key": [s.cache_keys[r] for r in rows.tolist()],
        }
        if self.pixels:
            images = host_buffer((len(idx), 3, c, c), self.pin)
            s.image_rows(rows, out=images.numpy())
            out["image_u8"] = images
        if self.templates > 1:
            out["template"] = [template_draw(self.seed, epoch, i, self.templates) for i in idx]
        slots = prompt_arrays(len(idx))
        seeds = [sample_seed(self.seed, epoch, i) for i in idx] \
            if self.augment is not None or self.spatial is not None else []
        if self.augment is not None:
            theta, colour = draw_augment(self.augment, seeds)
            out["theta"], out["colour"] = torch.from_numpy(theta), torch.from_numpy(colour)
            out["seeds"] = seeds  # the prompts are drawn after the warp (to_device)
        elif self.spatial is not None:
            # The one per-sample step: each draw is seeded by (seed, epoch, sample), as in
            # ManifestDataset, so both paths give every sample the same prompts. The counts it
            # draws from are the batch's own (nothing per sample is kept between batches).
            m = masks.numpy()
            stats = MaskStats.of(m)
            for j in range(len(idx)):
                draw_prompts(stats, j, m[j], self.spatial, seeds[j], slots, j)
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
        # Which rows carry a click or box, from the host arrays: the model splits the batch
        # by it without reading anything back from the device.
        rows = prompted_rows(host["point_labels"].numpy(), host["has_box"].numpy())
        return {**host, "image": image, "mask": (m == FOREGROUND).float(),
                "valid": (m != IGNORE).float(), "spatial_rows": rows,
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
