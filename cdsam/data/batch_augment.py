"""Train-time augmentation of whole batches on the training device (the packed path).

The same augmentations as ``data.augment`` describes — random resized crop (70–100 % of the
area at the default ``scale: 0.3``, aspect 3/4–4/3), horizontal flip, rotation, colour jitter —
but drawn per sample on the host (a few numbers each, seeded by ``(seed, epoch, sample)``, so a
sample's draw does not depend on its batch, its rank or a resume) and applied to the batch at
once: the crop, flip and rotation fold into one affine per sample, and one ``grid_sample``
warps every image (bilinear) and mask (nearest). Pixels the warp uncovers are the ImageNet mean
in the image (0 after normalisation) and ignore in the mask, as in the per-sample path.

This is not the per-sample path's pixels: torchvision's v2 transforms antialias the resize and
apply the colour ops in a random order, this applies brightness → contrast → saturation. Both
are seeded and reproducible; the default (augmentation off) never reaches this module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cdsam.config.schema import AugmentConfig
from cdsam.data.geometry import IMAGENET_MEAN, IMAGENET_STD
from cdsam.data.manifest import IGNORE

_STREAM = 0xA6  # separates these draws from the spatial prompts' generator
_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))


def draw_augment(cfg: AugmentConfig, seeds: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per sample: the 2x3 affine (output → input, in ``affine_grid``'s normalised
    coordinates) and the (brightness, contrast, saturation) factors."""
    theta = np.zeros((len(seeds), 2, 3), np.float32)
    colour = np.ones((len(seeds), 3), np.float32)
    for j, seed in enumerate(seeds):
        rng = np.random.default_rng([seed, _STREAM])
        # Random resized crop: a window of area a and aspect r, placed uniformly.
        a = rng.uniform(1 - cfg.scale, 1.0) if cfg.scale > 0 else 1.0
        r = math.exp(rng.uniform(*_LOG_RATIO)) if cfg.scale > 0 else 1.0
        w, h = min(1.0, math.sqrt(a * r)), min(1.0, math.sqrt(a / r))
        cx = rng.uniform(-(1 - w), 1 - w)
        cy = rng.uniform(-(1 - h), 1 - h)
        flip = -1.0 if rng.random() < cfg.hflip else 1.0
        angle = math.radians(rng.uniform(-cfg.rotate, cfg.rotate)) if cfg.rotate > 0 else 0.0
        cos, sin = math.cos(angle), math.sin(angle)
        # output point → rotate → flip → into the crop window of the input.
        theta[j] = [[w * flip * cos, -w * flip * sin, cx], [h * sin, h * cos, cy]]
        if cfg.colour > 0:
            colour[j] = rng.uniform(1 - cfg.colour, 1 + cfg.colour, 3)
    return theta, colour


def _grey(x: torch.Tensor) -> torch.Tensor:
    """Bx3xHxW in [0, 1] → Bx1xHxW luma (ITU-R 601, as torchvision's rgb_to_grayscale)."""
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def augment_batch(images: torch.Tensor, masks: torch.Tensor, theta: torch.Tensor,
                  colour: torch.Tensor, image_of: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``images`` Bx3xCxC uint8, ``masks`` Bx1xCxC uint8 (0/1/255), on one device →
    (normalised float32 images, uint8 masks), warped and colour-jittered per sample.

    ``image_of``: an image-major batch, ``masks`` then Sx1xCxC with sample s on image
    ``image_of[s]``: each image is warped once (its own ``theta``, ``colour``) and its masks
    with the same warp."""
    x = images.float() / 255
    b, c, s = (colour[:, i].view(-1, 1, 1, 1).to(x) for i in range(3))
    x = (x * b).clamp_(0, 1)
    mean = _grey(x).mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * c + mean).clamp_(0, 1)
    grey = _grey(x)
    x = ((x - grey) * s + grey).clamp_(0, 1)
    mean_t = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    x = (x - mean_t) / std_t
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    # Zero padding: the normalised ImageNet mean, what the pad fit fills with.
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if image_of is not None:
        grid = grid[image_of]  # each sample's mask takes its image's warp
    # Masks shifted by one so that "uncovered" (0 after zero padding) is told apart.
    m = F.grid_sample(masks.float() + 1, grid, mode="nearest", padding_mode="zeros",
                      align_corners=False)
    m = torch.where(m == 0, torch.full_like(m, IGNORE), m - 1)
    return x, m.to(torch.uint8)
