"""Whole large images: overlapping tiles through the model, logits blended back.

A 4000×3000 micrograph squeezed into a 224-px input loses everything small. With ``tile`` set,
an image larger than a tile is cut into ``tile``×``tile`` windows overlapping by ``overlap``
pixels (the last window in each direction ends on the image's edge), each window goes through
the model at the training geometry, and the per-window logits are blended with weights that
ramp down towards a window's edges, so seams between windows do not show. Where one window
covers a pixel alone, its logit is used (up to float rounding); an image that fits in one tile
is predicted exactly as without tiling. Under the crop fit a window's model input is its centre
crop: the window's other pixels were not seen by the model (their logit is the "background"
fill), so they weigh nothing in the blend, and a pixel no window sees keeps that fill.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from cdsam.data.geometry import BACKGROUND_LOGIT, Geometry
from cdsam.errors import UserError
from cdsam.predict import Predictor


def window_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets along one axis: stride ``tile - overlap``, the last window flush with
    the end."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def windows(height: int, width: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """(top, left, bottom, right) of every window covering a height×width image."""
    if tile < 1 or not 0 <= overlap < tile:
        raise UserError(f"--tile/--overlap: need tile >= 1 and 0 <= overlap < tile, got "
                        f"{tile}/{overlap}")
    return [(y, x, min(y + tile, height), min(x + tile, width))
            for y in window_starts(height, tile, overlap)
            for x in window_starts(width, tile, overlap)]


def ramp(length: int, overlap: int) -> torch.Tensor:
    """1 in the middle, falling linearly over ``overlap`` pixels at each end, never 0."""
    i = torch.arange(length, dtype=torch.float32)
    edge = torch.minimum(i + 1, length - i) / (overlap + 1)
    return edge.clamp(max=1.0)


def seen_pixels(height: int, width: int, resize: int, crop: int, fit: str) -> torch.Tensor:
    """HxW bool: the pixels of a height×width window that the model's input covers (all under
    the pad fit; under the crop fit those the centre crop maps back onto, untouched by the
    background fill)."""
    geo = Geometry.of(height, width, resize, crop, fit)
    return geo.to_original(torch.zeros(1, crop, crop))[0] == 0


def blend(parts: Sequence[tuple[tuple[int, int, int, int], torch.Tensor]], height: int,
          width: int, overlap: int, seen: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """Per-window PxhxW logits → PxHxW: weighted mean where windows overlap. ``seen``: per
    window, the hxW pixels its model input covered; the others weigh zero, and a pixel no
    window saw gets ``BACKGROUND_LOGIT``."""
    if len(parts) == 1:
        return parts[0][1]
    n_prompts = parts[0][1].shape[0]
    acc = torch.zeros(n_prompts, height, width)
    weight = torch.zeros(height, width)
    for k, ((top, left, bottom, right), logits) in enumerate(parts):
        w = ramp(bottom - top, overlap)[:, None] * ramp(right - left, overlap)[None, :]
        if seen is not None:
            w = w * seen[k]
        acc[:, top:bottom, left:right] += logits * w
        weight[top:bottom, left:right] += w
    covered = weight > 0
    return torch.where(covered, acc / weight.clamp(min=torch.finfo(weight.dtype).tiny),
                       torch.tensor(BACKGROUND_LOGIT))


def predict_tiled(predictor: Predictor, image: Image.Image, prompts: Sequence[str], tile: int,
                  overlap: int, batch_size: int = 8) -> torch.Tensor:
    """PxHxW logits for a whole image, window by window (``batch_size`` windows per call)."""
    wins = windows(image.height, image.width, tile, overlap)
    parts = []
    for i in range(0, len(wins), batch_size):
        chunk = wins[i:i + batch_size]
        crops = [image.crop((left, top, right, bottom)) for top, left, bottom, right in chunk]
        parts += list(zip(chunk, predictor.image_logits(crops, prompts, batch_size),
                          strict=True))
    seen = [seen_pixels(bottom - top, right - left, predictor.resize, predictor.crop,
                        predictor.fit) for top, left, bottom, right in wins]
    return blend(parts, image.height, image.width, overlap, seen)
