"""Shapes of annotation tools → HxW bool masks, each drawn by the rule of the tool that wrote it.

One polygon is not one mask everywhere: a 10x10 square with integer corners is 121 pixels
drawn with its outline (labelme's PIL rule, Ultralytics' ``cv2.fillPoly`` on integer corners)
and 100 pixels by pycocotools' area rule (COCO, CVAT's mask export). A source rasterizes as
its own tool does, so a mask trains on what its annotator saw in that tool:

- labelme (``labelme.utils.shape_to_mask``): PIL ``polygon`` / ``rectangle`` / ``ellipse`` with
  ``outline=1, fill=1`` at the float points → :func:`pil_polygon`, :func:`pil_box`,
  :func:`pil_circle`.
- COCO and CVAT polygons and boxes (pycocotools ``frPyObjects``, which CVAT's mask export and
  Datumaro call) → :func:`coco_polygon`; CVAT ellipses (its ``EllipsesToMasks``:
  ``cv2.ellipse`` at the rounded centre and axes, ``rotation`` in degrees) →
  :func:`cv2_ellipse`; CVAT's rotated boxes turn about their centre (its
  ``RotatedBoxesToPolygons``) → :func:`rotated_corners`.
- YOLO (Ultralytics ``polygon2mask``: pixel coordinates cast to int32, ``cv2.fillPoly``) →
  :func:`cv2_polygon`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

Point = tuple[float, float]


def _canvas(size: tuple[int, int]) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("L", size, 0)
    return image, ImageDraw.Draw(image)


def pil_polygon(points: Sequence[Point], size: tuple[int, int]) -> np.ndarray:
    """``points`` in pixels (x, y); ``size`` (width, height). Outline included."""
    image, draw = _canvas(size)
    draw.polygon([(float(x), float(y)) for x, y in points], outline=1, fill=1)
    return np.asarray(image, bool)


def pil_box(x0: float, y0: float, x1: float, y1: float, size: tuple[int, int]) -> np.ndarray:
    image, draw = _canvas(size)
    draw.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], outline=1, fill=1)
    return np.asarray(image, bool)


def pil_circle(cx: float, cy: float, r: float, size: tuple[int, int]) -> np.ndarray:
    image, draw = _canvas(size)
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=1, fill=1)
    return np.asarray(image, bool)


def coco_polygon(points: Sequence[Point], size: tuple[int, int]) -> np.ndarray:
    """pycocotools' polygon rule (a pixel is in when the polygon covers its area's centre
    line, the far edges out): what COCO files and CVAT's mask export mean."""
    w, h = size
    flat = [float(v) for xy in points for v in xy]
    rle = mask_utils.merge(mask_utils.frPyObjects([flat], h, w))
    return mask_utils.decode(rle).astype(bool)


def rotated_corners(x0: float, y0: float, x1: float, y1: float, degrees: float
                    ) -> list[Point]:
    """A box's four corners turned ``degrees`` about its centre, clockwise on screen (image
    y points down), as CVAT turns its ``rotation``."""
    a = math.radians(degrees)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    c, s = math.cos(a), math.sin(a)
    return [(cx + c * (x - cx) - s * (y - cy), cy + s * (x - cx) + c * (y - cy))
            for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1))]


def cv2_ellipse(cx: float, cy: float, rx: float, ry: float, degrees: float,
                size: tuple[int, int]) -> np.ndarray:
    """CVAT's ellipse: ``cv2.ellipse`` filled, centre and semi-axes rounded to pixels."""
    w, h = size
    out = np.zeros((h, w), np.uint8)
    cv2.ellipse(out, (round(cx), round(cy)), (round(rx), round(ry)), float(degrees), 0, 360,
                1, thickness=-1)
    return out.astype(bool)


def cv2_polygon(points: Sequence[Point] | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Ultralytics' ``polygon2mask``: pixel coordinates truncated to int32, ``cv2.fillPoly``."""
    w, h = size
    out = np.zeros((h, w), np.uint8)
    cv2.fillPoly(out, [np.asarray(points, np.float64).astype(np.int32).reshape(-1, 2)], 1)
    return out.astype(bool)


def outside(points: Sequence[Point], size: tuple[int, int], slack: float = 1.0) -> bool:
    """Whether a point lies beyond the image by more than ``slack`` pixels (tools often put
    a border point exactly on the edge, or half a pixel past it)."""
    xy = np.asarray(points, float).reshape(-1, 2)
    w, h = size
    return bool((xy[:, 0] < -slack).any() or (xy[:, 1] < -slack).any()
                or (xy[:, 0] > w + slack).any() or (xy[:, 1] > h + slack).any())
