"""Compute the frozen part of DINO once per image and reuse it every epoch.

In stage 1 every DINO block is frozen; in stages 2–3 blocks ``0 … L−K−1`` are. With the
deterministic Resize → CenterCrop transform and no dropout/drop-path in those blocks, their
output for an image never changes during a stage, so it is computed once (in fixed chunks in
dataset order, which makes the cached values independent of batch composition and therefore
identical in a resumed run) and read back each step. Entries are keyed by the image: the cache
is built at a stage's setup and dies with the run, so the transform and the frozen weights are
the same for every entry. A memory budget caps the cache; images beyond it are recomputed every
step. Random augmentation turns it off (the input changes every epoch).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from cdsam.config.schema import Params
from cdsam.models.model import CDSAM
from cdsam.runtime import Precision
from cdsam.training.loaders import StageData, image_chunks

log = logging.getLogger("cdsam.cache")


@dataclass(frozen=True)
class CachePlan:
    """Where the frozen prefix ends (``end_block``), or why nothing can be cached."""

    end_block: int
    reason: str = ""

    @property
    def enabled(self) -> bool:
        return self.end_block > 0 and not self.reason


def _active_noise(modules: Iterable[nn.Module]) -> list[str]:
    """Names of dropout / drop-path modules that would make the prefix random in train mode."""
    noisy = []
    for mod in modules:
        for name, sub in mod.named_modules():
            p = getattr(sub, "p", None) if isinstance(sub, nn.modules.dropout._DropoutNd) else \
                getattr(sub, "drop_prob", None)
            if p:
                noisy.append(f"{name or type(sub).__name__} ({p})")
    return noisy


def frozen_prefix_end(model: CDSAM) -> int:
    """Number of leading DINO blocks whose weights (and the embedding's) are all frozen."""
    dino = model.dino
    embed = [dino.patch_embed] + [getattr(dino, n) for n in ("norm_pre",) if hasattr(dino, n)]
    if any(p.requires_grad for m in embed for p in m.parameters()) or \
            any(getattr(dino, n, None) is not None and getattr(dino, n).requires_grad
                for n in ("cls_token", "reg_token", "pos_embed")):
        return 0
    end = 0
    for block in dino.blocks:
        if any(p.requires_grad for p in block.parameters()):
            break
        end += 1
    return end


def plan_cache(model: CDSAM, enabled: bool, augment: bool = False) -> CachePlan:
    """Decide what may be cached for the model as the stage set it up."""
    if not enabled:
        return CachePlan(0, "train.feature_cache is false")
    if augment:
        return CachePlan(0, "random augmentation changes the input every epoch")
    end = frozen_prefix_end(model)
    if end == 0:
        return CachePlan(0, "no frozen DINO prefix (DINO trains from its first block)")
    dino = model.dino
    prefix = [dino.patch_embed, *list(dino.blocks)[:end]]
    prefix += [getattr(dino, n) for n in ("pos_drop", "patch_drop", "norm_pre")
               if getattr(dino, n, None) is not None]  # an Eva's patch_drop is None
    if getattr(getattr(dino, "rope", None), "aug_active", False):
        return CachePlan(0, "rotary coordinate augmentation (shift/jitter/rescale of the rope "
                            "coordinates) changes the prefix every step")
    noisy = _active_noise(prefix)
    if noisy:
        return CachePlan(0, f"dropout/drop-path in the frozen prefix: {', '.join(noisy[:3])}")
    return CachePlan(end)


class FeatureCache:
    """image key → DINO prefix tokens (TxC) up to block ``end_block``, within a byte budget.

    Keyed by the image alone: a cache lives inside one stage run, whose transform and frozen
    prefix weights are fixed for its whole life (it is never saved or shared between runs).
    """

    def __init__(self, budget_mb: float, end_block: int) -> None:
        self.budget = int(budget_mb * 2**20)
        self.end_block = end_block  # the prefix is DINO blocks 0 .. end_block - 1
        self.store: dict[str, torch.Tensor] = {}
        self.bytes = 0
        self.full = False
        self.hits = 0
        self.misses = 0

    def __contains__(self, image_key: str) -> bool:
        return image_key in self.store

    def __len__(self) -> int:
        return len(self.store)

    def put(self, image_key: str, value: torch.Tensor) -> bool:
        size = value.numel() * value.element_size()
        if self.bytes + size > self.budget:
            if not self.full:
                log.info("feature cache full at %.0f MB (train.feature_cache_mb); further images "
                         "are recomputed every step", self.bytes / 2**20)
            self.full = True
            return False
        self.store[image_key] = value
        self.bytes += size
        return True

    def fill(self, items: Iterable[tuple[str, torch.Tensor]],
             compute: Callable[[torch.Tensor], torch.Tensor], chunk: int = 64) -> None:
        """Compute and store every image not yet cached, ``chunk`` images per forward."""
        self.fill_batches(self._chunks(items, chunk), compute)

    def _chunks(self, items: Iterable[tuple[str, torch.Tensor]], chunk: int
                ) -> Iterator[tuple[list[str], torch.Tensor]]:
        """Uncached, distinct images stacked ``chunk`` at a time (lazily: stops once full)."""
        keys: list[str] = []
        images: list[torch.Tensor] = []
        seen: set[str] = set()
        for key, image in items:
            if self.full:
                return
            if key in self.store or key in seen:
                continue
            seen.add(key)
            keys.append(key)
            images.append(image)
            if len(keys) == chunk:
                yield keys, torch.stack(images)
                keys, images = [], []
        if keys:
            yield keys, torch.stack(images)

    def fill_batches(self, batches: Iterable[tuple[list[str], torch.Tensor]],
                     compute: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Compute and store each chunk of (keys, stacked images) not yet cached; the packed
        path passes its image rows, ``chunk`` at a time in dataset order, so the cached values
        are the same as :meth:`fill`'s."""
        for keys, images in batches:
            if self.full:
                break
            out = compute(images)
            for k, v in zip(keys, out, strict=True):
                if k not in self.store:
                    self.put(k, v.clone())

    def covers(self, image_keys: Iterable[str]) -> bool:
        """Whether every one of these images is cached (a step then needs no pixels)."""
        return all(k in self.store for k in image_keys)

    def lookup(self, image_keys: list[str], images: torch.Tensor,
               compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Prefix tokens for a batch: cached rows read back, the rest computed now."""
        miss = [i for i, k in enumerate(image_keys) if k not in self.store]
        self.hits += len(image_keys) - len(miss)
        self.misses += len(miss)
        if not miss:
            return torch.stack([self.store[k] for k in image_keys])
        computed = compute(images[miss])
        rows: list[torch.Tensor] = []
        j = 0
        for i, k in enumerate(image_keys):
            if j < len(miss) and miss[j] == i:
                rows.append(computed[j])
                j += 1
            else:
                rows.append(self.store[k])
        return torch.stack(rows)


def build_feature_cache(model: CDSAM, params: Params, data: StageData, precision: Precision,
                        packed: bool) -> FeatureCache | None:
    """The frozen DINO prefix of every train and val image, computed once in the run's
    precision, or None (with the reason logged) where the stage cannot cache it."""
    plan = plan_cache(model, params.train.feature_cache, augment=params.data.augment.enable)
    if not plan.enabled:
        log.info("feature cache off: %s", plan.reason)
        return None
    cache = FeatureCache(params.train.feature_cache_mb, plan.end_block)
    t0 = time.perf_counter()
    model.dino.eval()
    compute = lambda x: model.dino_prefix(x, plan.end_block)  # noqa: E731
    with torch.no_grad(), precision.autocast():
        for ds in (data.train_set, data.val_set):
            if packed:
                cache.fill_batches(image_chunks(data.splits[ds.split], precision.device), compute)
                continue
            samples = (ds[i] for i in range(len(ds)))
            items = ((s["image_key"], s["image"].to(precision.device)) for s in samples)
            cache.fill(items, compute)
    depth = model.depth
    log.info("feature cache: DINO blocks 0-%d of %d computed once for %d images (%.1f MB) "
             "in %.1f s; each step runs %s", plan.end_block - 1, depth, len(cache),
             cache.bytes / 2**20, time.perf_counter() - t0,
             "only the heads and SAM decoder" if plan.end_block == depth
             else f"DINO blocks {plan.end_block}-{depth - 1} onwards")
    return cache
