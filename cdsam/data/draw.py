"""Shapes of annotation tools → HxW bool masks, drawn with PIL as labelme draws its own
(a polygon's outline is part of it, so thin shapes keep their pixels)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

Point = tuple[float, float]


def _canvas(size: tuple[int, int]) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("L", size, 0)
    return image, ImageDraw.Draw(image)


def polygon_mask(points: Sequence[Point], size: tuple[int, int]) -> np.ndarray:
    """``points`` in pixels (x, y); ``size`` (width, height)."""
    image, draw = _canvas(size)
    draw.polygon([(float(x), float(y)) for x, y in points], outline=1, fill=1)
    return np.asarray(image, bool)


def box_mask(x0: float, y0: float, x1: float, y1: float, size: tuple[int, int]) -> np.ndarray:
    image, draw = _canvas(size)
    draw.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], outline=1, fill=1)
    return np.asarray(image, bool)


def ellipse_mask(cx: float, cy: float, rx: float, ry: float, size: tuple[int, int]
                 ) -> np.ndarray:
    image, draw = _canvas(size)
    draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], outline=1, fill=1)
    return np.asarray(image, bool)


def outside(points: Sequence[Point], size: tuple[int, int], slack: float = 1.0) -> bool:
    """Whether a point lies beyond the image by more than ``slack`` pixels (tools often put
    a border point exactly on the edge, or half a pixel past it)."""
    xy = np.asarray(points, float).reshape(-1, 2)
    w, h = size
    return bool((xy[:, 0] < -slack).any() or (xy[:, 1] < -slack).any()
                or (xy[:, 0] > w + slack).any() or (xy[:, 1] > h + slack).any())
