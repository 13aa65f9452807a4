"""Pictures of masks: a tinted overlay of a prediction (and its truth) on the input image."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from cdsam.data.geometry import IMAGENET_MEAN, IMAGENET_STD

PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128)]


def denormalize(image: torch.Tensor) -> np.ndarray:
    """3xHxW normalised tensor → HxWx3 uint8."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    rgb = (image.detach().cpu().float() * std + mean).clamp(0, 1)
    return (rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def tint(rgb: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int],
         alpha: float = 0.5) -> np.ndarray:
    out = rgb.astype(np.float32).copy()
    out[mask] = (1 - alpha) * out[mask] + alpha * np.array(colour, np.float32)
    return out.round().astype(np.uint8)


def outline(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a boolean mask (4-neighbourhood)."""
    m = mask.astype(bool)
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    return m & ~inner


def sample_panel(rgb: np.ndarray, pred: np.ndarray, truth: np.ndarray | None, caption: str,
                 scale: int = 3) -> Image.Image:
    """Prediction tinted red, truth outlined white, caption below; upscaled for viewing."""
    img = tint(rgb, pred, (230, 25, 75))
    if truth is not None:
        img[outline(truth)] = (255, 255, 255)
    return captioned(img, caption[:40], scale)


def captioned(img: np.ndarray, text: str, scale: int = 3) -> Image.Image:
    """HxWx3 uint8 upscaled ``scale`` times (nearest) with ``text`` on a white strip below."""
    h, w = img.shape[:2]
    pil = Image.fromarray(img).resize((w * scale, h * scale), Image.NEAREST)
    panel = Image.new("RGB", (pil.width, pil.height + 14), (255, 255, 255))
    panel.paste(pil, (0, 0))
    ImageDraw.Draw(panel).text((2, pil.height + 1), text, fill=(0, 0, 0))
    return panel


def grid(panels: list[Image.Image], columns: int) -> Image.Image:
    if not panels:
        return Image.new("RGB", (1, 1), (255, 255, 255))
    w, h = panels[0].size
    rows = (len(panels) + columns - 1) // columns
    out = Image.new("RGB", (w * min(columns, len(panels)), h * rows), (255, 255, 255))
    for i, p in enumerate(panels):
        out.paste(p, ((i % columns) * w, (i // columns) * h))
    return out
