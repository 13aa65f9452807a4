"""Embedded synthetic scenes: coloured shapes on textured, noisy backgrounds.

Each image holds several objects with distinct (colour, shape) pairs laid out so that colour
alone and shape alone are both ambiguous (see `_pick_combos`): the prompt ("a red circle"),
both words of it, is the only way to tell which mask is wanted. Each class appears 1 …
``max_per_class`` times, so a prompt has objects to count and separate (touching copies of a
class are where connected components fail). Later objects occlude earlier ones; masks are the
visible parts. Seeded per image, so image i is the same whatever
``num_images`` is.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from PIL import Image, ImageDraw

from cdsam.config.schema import SyntheticConfig
from cdsam.data.manifest import BACKGROUND, FOREGROUND, Sample

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 45, 40),
    "green": (45, 170, 60),
    "blue": (45, 80, 215),
    "yellow": (230, 205, 45),
}
SHAPES = ("circle", "square", "triangle")
COMBOS = list(itertools.product(COLOURS, SHAPES))


def prompt_for(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


def attributes(prompt: str) -> tuple[str, str] | None:
    """``"a red circle"`` (or the name in another template, ``"a photo of a red circle"``) →
    ``("red", "circle")``; ``None`` for any other prompt."""
    words = prompt.split()
    if len(words) >= 3 and words[-2] in COLOURS and words[-1] in SHAPES:
        return words[-2], words[-1]
    return None


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Low-frequency colour blotches + stripes + pixel noise, muted so shapes stay visible."""
    coarse = rng.uniform(70, 170, size=(4, 4, 3)).astype(np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), np.float32)
    grey = base.mean(axis=2, keepdims=True)
    base = 0.6 * grey + 0.4 * base  # desaturate: background hues must not look like objects
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rng.uniform(0, math.pi)
    freq = rng.uniform(0.15, 0.5)
    stripes = 12 * np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy))
    return base + stripes[..., None]


def _shape_mask(rng: np.random.Generator, shape: str, size: int) -> np.ndarray:
    r = rng.uniform(0.11, 0.2) * size
    cx, cy = rng.uniform(r, size - r, size=2)
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    else:
        n = 4 if shape == "square" else 3
        rot = rng.uniform(0, 2 * math.pi)
        rad = r * (1.15 if shape == "square" else 1.3)  # similar areas across shapes
        pts = [(cx + rad * math.cos(rot + 2 * math.pi * k / n),
                cy + rad * math.sin(rot + 2 * math.pi * k / n)) for k in range(n)]
        draw.polygon(pts, fill=1)
    return np.asarray(canvas, dtype=bool)


def _pick_combos(rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    """n distinct (colour, shape) pairs in which neither cue alone picks out an object.

    From four objects on, the first four are two colours x two shapes: every one of them has a
    distractor of its colour (other shape) and one of its shape (other colour), so a model
    must read both words. Three objects: an L (one object has both kinds of distractor, the
    others one each); two: they share a colour or a shape.
    """
    colours = [str(c) for c in rng.permutation(list(COLOURS))]
    shapes = [str(s) for s in rng.permutation(SHAPES)]
    if n >= 4:
        picks = [(c, s) for c in colours[:2] for s in shapes[:2]]
    elif n == 3:
        picks = [(colours[0], shapes[0]), (colours[0], shapes[1]), (colours[1], shapes[0])]
    else:
        picks = ([(colours[0], shapes[0]), (colours[0], shapes[1])] if rng.random() < 0.5
                 else [(colours[0], shapes[0]), (colours[1], shapes[0])])
    rest = [c for c in COMBOS if c not in picks]
    picks += [rest[i] for i in rng.choice(len(rest), size=max(0, n - len(picks)), replace=False)]
    return [picks[i] for i in rng.permutation(len(picks))]  # paint order: who occludes whom


def make_scene(seed: int, index: int, cfg: SyntheticConfig) -> tuple[Image.Image, list[Sample]]:
    """One scene: the RGB image and one :class:`Sample` per object (its visible part); objects
    of one class share the prompt."""
    rng = np.random.default_rng([seed, index])
    size = cfg.image_size
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    image = _background(rng, size)
    placed: list[tuple[tuple[str, str], np.ndarray]] = []
    combos = _pick_combos(rng, n)
    copies = rng.integers(1, cfg.max_per_class + 1, size=len(combos))
    # Copies are painted class after class in the combos' order, so the first copy of each
    # class is placed as a one-object scene would place it.
    for (colour, shape), k in zip(combos, copies, strict=True):
        for _ in range(int(k)):
            for _ in range(50):  # retry placements that would hide an earlier object too much
                mask = _shape_mask(rng, shape, size)
                if all((m & ~mask).sum() >= 0.5 * m.sum() for _, m in placed):
                    break
            else:
                continue  # rare in a crowded scene: this object is left out
            placed = [(c, m & ~mask) for c, m in placed] + [((colour, shape), mask)]
            rgb = np.array(COLOURS[colour], np.float32) + rng.uniform(-25, 25, size=3)
            shade = rng.uniform(0.85, 1.1)
            image[mask] = rgb * shade
    image += rng.normal(0, 8, size=image.shape)
    pil = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), mode="RGB")
    samples = []
    for (colour, shape), m in placed:
        enc = np.where(m, FOREGROUND, BACKGROUND).astype(np.uint8)
        samples.append(Sample(stem=f"scene{index:05d}", prompt=prompt_for(colour, shape),
                              mask=enc))
    return pil, samples
