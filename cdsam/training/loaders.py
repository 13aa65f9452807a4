"""A stage's data: the prepared splits opened once, and the train/val loaders over them.

Batches come packed from the shards (`cdsam.data.packed`); the per-sample DataLoader path over
`ManifestDataset` stays for the benchmark's "before" and for tests that compare the two.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from cdsam.config.schema import Params
from cdsam.data.dataset import EpochSampler, ManifestDataset, collate
from cdsam.data.packed import PackedLoader, normalize_batch
from cdsam.data.prepared import PreparedSplit
from cdsam.data.spatial import SpatialPolicy
from cdsam.data.templates import PromptEnsembles, read_ensembles
from cdsam.distributed import DistInfo

log = logging.getLogger("cdsam.train")

SPLITS = ("train", "val")


@dataclass
class StageData:
    splits: dict[str, PreparedSplit]  # train, val: the shards, opened (nothing decoded)
    train_set: ManifestDataset  # with the stage's augmentation and click/box policy
    val_set: ManifestDataset
    ensembles: PromptEnsembles | None = None  # prepared with several prompt templates

    @property
    def templates(self) -> int:
        """How many templates a training sample draws from."""
        return template_count(self.ensembles)

    @property
    def vocab(self) -> list[str]:
        """Every prompt of both splits, sorted: the text features the run encodes once."""
        return sorted(set(self.train_set.prompts) | set(self.val_set.prompts))


def template_count(ensembles: PromptEnsembles | None) -> int:
    """Templates per prompt: those of the prepared ensembles, else the one."""
    return len(ensembles.templates) if ensembles is not None else 1


def open_stage_data(root: Path, params: Params) -> StageData:
    """The prepared train and val splits (memory-mapped or read per batch; no decode here)."""
    p = params
    t0 = time.perf_counter()
    splits = {name: PreparedSplit.open(root, name, p.data) for name in SPLITS}
    ensembles = read_ensembles(root)
    train_set = ManifestDataset(
        root, "train", p.data, augment=p.data.augment.enable, seed=p.seed,
        spatial=SpatialPolicy(point=p.train.point_prompts, box=p.train.box_prompts),
        prepared=splits["train"],
        templates=template_count(ensembles))
    val_set = ManifestDataset(root, "val", p.data, prepared=splits["val"])
    log.info("opened %d images (%d samples, %.1f MB of prepared rows%s) in %.3f s",
             sum(len(x.image_keys) for x in splits.values()),
             sum(len(x) for x in splits.values()),
             sum(x.nbytes for x in splits.values()) / 2**20,
             ", read from disk per batch" if any(x.on_disk for x in splits.values())
             else ", memory-mapped", time.perf_counter() - t0)
    if ensembles is not None:
        log.info("prompt ensembles: %d templates (%s); training draws one per sample and "
                 "epoch, validation averages them", len(ensembles.templates),
                 " | ".join(ensembles.templates))
    return StageData(splits, train_set, val_set, ensembles)


@dataclass
class StageLoaders:
    train: Any  # PackedLoader, or a DataLoader on the per-sample path
    sampler: Any  # what set_epoch(epoch) goes to before each epoch
    val: Any


def build_loaders(data: StageData, params: Params, stage: int, batch_size: int,
                  device: torch.device, dist: DistInfo, packed: bool,
                  needs_pixels: Callable[[PreparedSplit], bool]) -> StageLoaders:
    """Train and val loaders; ``needs_pixels(split)`` says whether a split's batches must carry
    images (not when the feature cache holds every image's DINO prefix)."""
    p = params
    by_image = p.data.batch_by == "image"
    if by_image and not packed:
        raise ValueError("data.batch_by: image needs packed batches")
    # The same sampler for one process or many: a per-epoch seeded permutation, rank r
    # taking every world_size-th index, so a resumed epoch replays the same order. Image-major
    # batches permute (and shard) image rows.
    units = range(len(data.splits["train"].image_keys)) if by_image else data.train_set
    sampler = DistributedSampler(units, num_replicas=dist.world_size, rank=dist.rank,
                                 shuffle=True, seed=p.seed * 1000 + stage, drop_last=False)
    val_bs = max(batch_size, 32)
    # Val rows split over the ranks (their figures are then summed), except when sharded:
    # every forward is collective there, and ranks with unequal batch counts would hang.
    val_rank, val_world = (0, 1) if dist.sharded else (dist.rank, dist.world_size)
    val_units = len(data.splits["val"].image_keys) if by_image else len(data.val_set)
    val_rows_idx = list(range(val_rank, val_units, val_world))
    if packed:
        on_gpu = device.type == "cuda"
        train = PackedLoader(data.splits["train"], batch_size, device, sampler=sampler,
                             spatial=data.train_set.spatial, seed=p.seed, prefetch=on_gpu,
                             augment=p.data.augment, templates=data.templates,
                             by_image=by_image, prompts_per_image=p.data.prompts_per_image)
        # Image-major validation scores every prompt of an image from one encoding, in
        # batches of whole images holding at most val_bs samples.
        val = PackedLoader(data.splits["val"], val_bs, device, prefetch=on_gpu,
                           indices=val_rows_idx, by_image=by_image,
                           sample_budget=val_bs if by_image else None)
        for loader in (train, val):
            loader.pixels = needs_pixels(loader.split)
        return StageLoaders(train, train, val)
    # The per-sample path: one fetch per sample in this process (the benchmark's "before").
    kw = {"pin_memory": device.type == "cuda"}
    epoch_sampler = EpochSampler(sampler)
    train = DataLoader(data.train_set, batch_size=batch_size, sampler=epoch_sampler,
                       collate_fn=collate, **kw)
    val_rows = data.val_set if val_world == 1 else Subset(data.val_set, val_rows_idx)
    val = DataLoader(val_rows, batch_size=val_bs, shuffle=False, collate_fn=collate, **kw)
    return StageLoaders(train, epoch_sampler, val)


def image_chunks(pack: PreparedSplit, device: torch.device, chunk: int = 64
                 ) -> Iterator[tuple[list[str], torch.Tensor]]:
    """(keys, normalised images on the device), ``chunk`` distinct images at a time."""
    for i in range(0, len(pack.image_keys), chunk):
        rows = range(i, min(i + chunk, len(pack.image_keys)))
        u8 = torch.from_numpy(pack.image_rows(rows)).to(device, non_blocking=True)
        yield pack.cache_keys[i:i + chunk], normalize_batch(u8)
