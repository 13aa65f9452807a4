"""Seeded train-time augmentation of one sample, applied to image and mask together: the
per-sample path (`ManifestDataset`); training applies the same augmentations to whole batches
on the device (`cdsam.data.batch_augment`), and both seed a sample's draw with
:func:`sample_seed`.

Each sample's random draw is seeded by ``(seed, epoch, index)``, so the augmented stream is the
same with 0 or N loader workers, after a resume, and on every rank. Geometric transforms move
the mask with the image (nearest for masks); pixels they uncover are ignore in the mask and the
ImageNet mean in the image. Colour jitter touches the image only.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from cdsam.config.schema import AugmentConfig
from cdsam.data.geometry import PAD_RGB
from cdsam.data.manifest import IGNORE


def build_augment(cfg: AugmentConfig, size: int) -> v2.Compose | None:
    """The transform for ``data.augment`` at a ``size``×``size`` input, or None when off."""
    if not cfg.enable:
        return None
    fill = {tv_tensors.Image: list(PAD_RGB), tv_tensors.Mask: IGNORE}
    ops: list[v2.Transform] = []
    if cfg.scale > 0:
        ops.append(v2.RandomResizedCrop(size, scale=(1 - cfg.scale, 1.0), antialias=True))
    if cfg.hflip > 0:
        ops.append(v2.RandomHorizontalFlip(cfg.hflip))
    if cfg.rotate > 0:
        ops.append(v2.RandomRotation(cfg.rotate, fill=fill))
    if cfg.colour > 0:
        ops.append(v2.ColorJitter(cfg.colour, cfg.colour, cfg.colour))
    return v2.Compose(ops) if ops else None


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """One well-mixed 63-bit seed per (run seed, epoch, sample)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint64)[0]
               >> np.uint64(1))


IMAGE_STREAM = 0x1A6E  # image-major draws: apart from every sample's (seed, epoch, index)


def image_seed(seed: int, epoch: int, image: int) -> int:
    """One well-mixed 63-bit seed per (run seed, epoch, image row): the draws an image-major
    batch makes once per image (its warp, its prompt subset)."""
    return int(np.random.SeedSequence([seed, epoch, image, IMAGE_STREAM])
               .generate_state(2, np.uint64)[0] >> np.uint64(1))


def augment_pair(transform: v2.Compose, image: tv_tensors.Image, mask: tv_tensors.Mask,
                 seed: int) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    """Apply ``transform`` under its own seed, leaving the global torch RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(image, mask)
