"""Training and evaluation batches straight from the prepared shards, by indexing.

A batch is ``images[image_row[idx]]`` and each sample's mask ``luts[lut][labels[label_row]]``
(`cdsam.data.prepared`): a few index operations over memory-mapped uint8 rows, copied to the
device as uint8 (a quarter of float32), normalised there on the whole batch. Targets and
ignore maps are derived on the device too, and augmentation (when on) runs there on whole
batches (`cdsam.data.batch_augment`). Nothing is decoded at a stage's start: ``prepare`` wrote
the fitted arrays once.

Image-major batches (``data.batch_by: image``) take whole images with all their samples:
each image's pixels once, its samples' masks and prompts after it, and ``image_of`` saying
which image each sample is on, so the model runs DINO once per image.

Without augmentation the samples are exactly those `ManifestDataset` yields (same arrays, same
normalisation, same spatial prompts under the same seeds): tests compare the two paths value
for value.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch.utils.data import DistributedSampler
from torchvision import tv_tensors

from cdsam.config.schema import AugmentConfig
from cdsam.data.augment import image_seed, sample_seed
from cdsam.data.batch_augment import augment_batch, draw_augment
from cdsam.data.geometry import normalize_transform
from cdsam.data.manifest import FOREGROUND, IGNORE
from cdsam.data.prepared import PreparedSplit
from cdsam.data.spatial import (
    MaskStats,
    SpatialPolicy,
    draw_prompts,
    focus_clicked_objects,
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


def image_groups(split: PreparedSplit) -> list[np.ndarray]:
    """Per image row, its sample rows in row order."""
    order = np.argsort(split.image_row, kind="stable")
    ends = np.cumsum(np.bincount(split.image_row, minlength=len(split.image_keys)))
    return np.split(order, ends[:-1])


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

    ``by_image``: image-major batches. ``sampler`` / ``indices`` then order image rows, and a
    batch is ``batch_size`` images with all their samples (``prompts_per_image`` caps them: a
    subset seeded per (seed, epoch, image)), or with ``sample_budget`` as many whole images as
    fit that many samples (at least one: evaluation bounds its batches by samples). ``image``
    and ``image_key`` are then one per image, and ``image_of`` (S int64) names each sample's
    image in the batch; augmentation warps each image once, its masks with it.
    """

    def __init__(self, split: PreparedSplit, batch_size: int, device: torch.device,
                 sampler: DistributedSampler | None = None,
                 indices: Sequence[int] | None = None, spatial: SpatialPolicy | None = None,
                 seed: int = 0, prefetch: bool = False,
                 augment: AugmentConfig | None = None, templates: int = 1,
                 by_image: bool = False, prompts_per_image: int | None = None,
                 sample_budget: int | None = None, object_clicks: bool = True) -> None:
        self.split = split
        self.objects = split.objects is not None
        self.object_clicks = object_clicks and self.objects
        self.templates = templates
        self.batch_size = batch_size
        self.device = device
        self.sampler = sampler
        self.by_image = by_image
        self.prompts_per_image = prompts_per_image
        self.sample_budget = sample_budget
        self.groups = image_groups(split) if by_image else []
        units = len(self.groups) if by_image else len(split)
        self.indices = list(range(units)) if indices is None else list(indices)
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
        if self.by_image and self.sample_budget is not None:
            return len(self._chunks(self._order(), 0))
        n = len(self.sampler) if self.sampler is not None else len(self.indices)
        return math.ceil(n / self.batch_size)

    def image_samples(self, image: int, epoch: int) -> np.ndarray:
        """Image row ``image``'s sample rows this epoch: all of them, or a seeded subset of
        ``prompts_per_image`` (in row order) when it has more."""
        rows = self.groups[image]
        cap = self.prompts_per_image
        if cap is None or len(rows) <= cap:
            return rows
        rng = np.random.default_rng(image_seed(self.seed, epoch, image))
        return np.sort(rng.choice(rows, cap, replace=False))

    def _chunks(self, order: list[int], epoch: int
                ) -> list[tuple[list[int], list[int] | None, list[int] | None]]:
        """(sample rows, image rows or None, samples per image or None) of each batch."""
        if not self.by_image:
            return [(order[i:i + self.batch_size], None, None)
                    for i in range(0, len(order), self.batch_size)]
        if self.sample_budget is None:
            groups = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        else:
            groups, size = [], 0
            cap = self.prompts_per_image
            for image in order:
                n = len(self.groups[image]) if cap is None else min(cap, len(self.groups[image]))
                if groups and size + n <= self.sample_budget:
                    groups[-1].append(image)
                    size += n
                else:
                    groups.append([image])
                    size = n
        chunks = []
        for imgs in groups:
            picked = [self.image_samples(g, epoch) for g in imgs]  # drawn once per image
            chunks.append(([int(i) for rows in picked for i in rows], imgs,
                           [len(rows) for rows in picked]))
        return chunks

    def host_batch(self, idx: list[int], epoch: int, images: list[int] | None = None,
                   counts: list[int] | None = None) -> dict[str, Any]:
        """The CPU side of one batch: uint8 rows by indexing, spatial prompts (or, with
        augmentation, the per-sample warp and colour draws), labels. ``images``: an
        image-major batch's image rows, ``counts`` their samples (``idx``, image by image)."""
        s = self.split
        index = torch.tensor(idx, dtype=torch.int64)
        sample_rows = s.image_row[idx]
        rows = sample_rows if images is None else np.asarray(images, dtype=np.int64)
        c = s.crop
        masks = host_buffer((len(idx), c, c), self.pin)
        s.masks(idx, out=masks.numpy())
        out: dict[str, Any] = {
            "mask_u8": masks, "index": index, "image_row": torch.from_numpy(sample_rows),
            "prompt": [s.prompts[i] for i in idx], "id": [s.ids[i] for i in idx],
            "image_key": [s.cache_keys[r] for r in rows.tolist()],
        }
        if self.objects:
            ids = host_buffer((len(idx), c, c), self.pin)
            s.object_ids(idx, out=ids.numpy())
            out["objects_u8"] = ids
        if images is not None:
            out["image_of"] = torch.from_numpy(np.repeat(np.arange(len(images)), counts))
        if self.pixels:
            buf = host_buffer((len(rows), 3, c, c), self.pin)
            s.image_rows(rows, out=buf.numpy())
            out["image_u8"] = buf
        if self.templates > 1:
            out["template"] = [template_draw(self.seed, epoch, i, self.templates) for i in idx]
        slots = prompt_arrays(len(idx))
        seeds = [sample_seed(self.seed, epoch, i) for i in idx] \
            if self.augment is not None or self.spatial is not None else []
        if self.augment is not None:
            # One warp per image: drawn per sample, or per image row in an image-major batch.
            warp_seeds = seeds if images is None else \
                [image_seed(self.seed, epoch, r) for r in images]
            theta, colour = draw_augment(self.augment, warp_seeds)
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
            if self.object_clicks:
                focus_clicked_objects(m, out["objects_u8"].numpy(), slots, seeds, self.spatial)
        out.update({k: torch.from_numpy(v) for k, v in slots.items()})
        if self.pin:
            for k in (*_SLOTS, "theta", "colour", "image_of"):
                if k in out:
                    out[k] = out[k].pin_memory()
        return out

    def to_device(self, host: dict[str, Any]) -> dict[str, Any]:
        """Copy (non-blocking from pinned memory) and finish the batch on the device."""
        dev = self.device
        seeds = host.pop("seeds", None)
        m = host.pop("mask_u8").to(dev, non_blocking=True).unsqueeze(1)
        objects = host.pop("objects_u8", None)
        if objects is not None:
            objects = objects.to(dev, non_blocking=True).unsqueeze(1)
        u8 = host.pop("image_u8", None)
        image_of = host["image_of"].to(dev, non_blocking=True) if "image_of" in host else None
        if u8 is None:
            image = pixel_placeholder(len(host["image_key"]), m.shape[-1], dev)
        elif "theta" in host:
            both = m if objects is None else torch.cat([m, objects], dim=1)
            image, both = augment_batch(u8.to(dev, non_blocking=True), both,
                                        host.pop("theta").to(dev, non_blocking=True),
                                        host.pop("colour").to(dev, non_blocking=True), image_of)
            m = both[:, :1]
            if objects is not None:
                # Uncovered pixels came back as ignore (255): no object there.
                objects = torch.where(both[:, 1:] == IGNORE, 0, both[:, 1:])
            if self.spatial is not None:
                # Clicks and boxes must come from the mask as augmented: read it back (uint8,
                # small) and draw on the host under the same per-sample seeds.
                warped = m[:, 0].cpu().numpy()
                stats = MaskStats.of(warped)
                slots = {k: host[k].numpy() for k in _SLOTS}  # views: filled in place
                for j, seed in enumerate(seeds):
                    draw_prompts(stats, j, warped[j], self.spatial, seed, slots, j)
                if self.object_clicks:
                    focus_clicked_objects(warped, objects[:, 0].cpu().numpy(), slots, seeds,
                                          self.spatial)
                    m = torch.from_numpy(warped).to(dev).unsqueeze(1)
        else:
            image = normalize_batch(u8.to(dev, non_blocking=True))
        # Which rows carry a click or box, from the host arrays: the model splits the batch
        # by it without reading anything back from the device.
        rows = prompted_rows(host["point_labels"].numpy(), host["has_box"].numpy())
        if image_of is not None:
            host = {**host, "image_of": image_of}
        if objects is not None:
            host = {**host, "objects": objects}
        return {**host, "image": image, "mask": (m == FOREGROUND).float(),
                "valid": (m != IGNORE).float(), "spatial_rows": rows,
                **{k: host[k].to(dev, non_blocking=True) for k in _SLOTS}}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch = self.sampler.epoch if self.sampler is not None else 0
        chunks = self._chunks(self._order(), epoch)
        if not self.prefetch:
            for chunk in chunks:
                yield self.to_device(self.host_batch(chunk[0], epoch, *chunk[1:]))
            return
        with ThreadPoolExecutor(1, thread_name_prefix="cdsam-batches") as pool:
            pending = pool.submit(self.host_batch, chunks[0][0], epoch, *chunks[0][1:]) \
                if chunks else None
            for k in range(len(chunks)):
                host = pending.result()
                if k + 1 < len(chunks):
                    idx, images, counts = chunks[k + 1]
                    pending = pool.submit(self.host_batch, idx, epoch, images, counts)
                yield self.to_device(host)
