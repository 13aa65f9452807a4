"""The centre head's target: per sample, a heatmap that peaks at the centre of each of its
objects, built on the device from the batch's object-id maps (`cdsam.data.packed`), after any
augmentation warped them.

Inside object k the value is ``exp(-d² / 2σ²)``, d the distance to the object's centroid and
σ half its equivalent radius (``sqrt(area / π) / 2``, at least one pixel), so it is 1 at the
centre and ~0.14 at the edge of a disk; outside every object it is 0. Each pixel reads its own
object's centre only, so two touching objects keep two peaks with a trough between them, which
is what separates them where the class mask is one connected piece. The map is then averaged
down to the decoder's mask resolution (``area`` interpolation).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_IDS = 256  # object ids are uint8


def centre_heatmap(objects: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``objects``: Sx1xHxW uint8 object ids (0: none) → Sx1x``size`` float32 targets."""
    s, _, h, w = objects.shape
    ids = objects[:, 0].long()
    dev = ids.device
    flat = (ids + _IDS * torch.arange(s, device=dev).view(-1, 1, 1)).flatten()
    yy, xx = torch.meshgrid(torch.arange(h, device=dev, dtype=torch.float64),
                            torch.arange(w, device=dev, dtype=torch.float64), indexing="ij")
    # Integer sums in float64 are exact, so the centroids do not depend on summation order.
    def total(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(s * _IDS, dtype=torch.float64, device=dev).index_add_(
            0, flat, values.expand(s, h, w).flatten())

    count = total(torch.ones((), dtype=torch.float64, device=dev))
    cx = total(xx) / count.clamp(min=1)
    cy = total(yy) / count.clamp(min=1)
    sigma = (count / math.pi).sqrt().div(2).clamp(min=1.0)
    d2 = (xx - cx[flat].view(s, h, w)) ** 2 + (yy - cy[flat].view(s, h, w)) ** 2
    heat = torch.exp(-d2 / (2 * sigma[flat].view(s, h, w) ** 2))
    heat = torch.where(ids > 0, heat, torch.zeros((), dtype=heat.dtype, device=dev))
    heat = heat.float().unsqueeze(1)
    return heat if (h, w) == tuple(size) else F.interpolate(heat, size=size, mode="area")
