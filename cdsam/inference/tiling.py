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
from cdsam.inference.predictor import Predictor


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


class Blender:
    """Windows' logits blended as they arrive: one PxHxW sum and one HxW weight map, so a large
    image costs its own logits once (not once per window, nor a second copy for the result)."""

    def __init__(self, prompts: int, height: int, width: int, overlap: int) -> None:
        self.acc = torch.zeros(prompts, height, width)
        self.weight = torch.zeros(height, width)
        self.overlap = overlap

    def add(self, window: tuple[int, int, int, int], logits: torch.Tensor,
            seen: torch.Tensor | None = None) -> None:
        """One window's PxhxW logits; ``seen``: the hxW pixels its model input covered (the
        others weigh zero)."""
        top, left, bottom, right = window
        w = ramp(bottom - top, self.overlap)[:, None] * ramp(right - left, self.overlap)[None, :]
        if seen is not None:
            w = w * seen
        self.acc[:, top:bottom, left:right].addcmul_(logits, w)
        self.weight[top:bottom, left:right] += w

    def result(self) -> torch.Tensor:
        """PxHxW: the weighted mean, in place of the sums; ``BACKGROUND_LOGIT`` where no window
        saw a pixel."""
        uncovered = self.weight <= 0
        self.acc.div_(self.weight.clamp(min=torch.finfo(self.weight.dtype).tiny))
        self.acc.masked_fill_(uncovered, BACKGROUND_LOGIT)
        return self.acc


def blend(parts: Sequence[tuple[tuple[int, int, int, int], torch.Tensor]], height: int,
          width: int, overlap: int, seen: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """Per-window PxhxW logits → PxHxW: weighted mean where windows overlap (see `Blender`).
    ``seen``: per window, the hxW pixels its model input covered."""
    if len(parts) == 1:
        return parts[0][1]
    blender = Blender(parts[0][1].shape[0], height, width, overlap)
    for k, (window, logits) in enumerate(parts):
        blender.add(window, logits, None if seen is None else seen[k])
    return blender.result()


def predict_tiled(predictor: Predictor, image: Image.Image, prompts: Sequence[str], tile: int,
                  overlap: int, batch_size: int = 8) -> torch.Tensor:
    """PxHxW logits for a whole image, window by window (``batch_size`` windows per model
    call), each window's full-size logits blended in as soon as it is made."""
    wins = windows(image.height, image.width, tile, overlap)
    if len(wins) == 1:  # the image fits one tile: exactly the untiled prediction
        return predictor.image_logits([image], prompts, batch_size)[0]
    blender = Blender(len(prompts), image.height, image.width, overlap)
    for i in range(0, len(wins), batch_size):
        chunk = wins[i:i + batch_size]
        crops = [image.crop((left, top, right, bottom)) for top, left, bottom, right in chunk]
        for window, logits in zip(chunk, predictor.iter_image_logits(crops, prompts,
                                                                     batch_size), strict=True):
            top, left, bottom, right = window
            blender.add(window, logits, seen_pixels(bottom - top, right - left,
                                                    predictor.resize, predictor.crop,
                                                    predictor.fit))
    return blender.result()
