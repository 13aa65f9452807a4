"""Objects (a class name and a mask each, as annotation tools hold them) → cdsam's samples:
one per class present, the union of its objects, and each object kept as an instance."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from scipy import ndimage

from cdsam.config.schema import PrepareConfig
from cdsam.data.manifest import BACKGROUND, FOREGROUND, IGNORE, Sample
from cdsam.data.sources.negatives import absent_samples
from cdsam.data.templates import class_prompt

IGNORE_CLASS = "__ignore__"  # labelme's name for regions no class is scored on


def objects_to_samples(cfg: PrepareConfig, seed: int, stem: str,
                       objects: list[tuple[str, np.ndarray]], classes: list[str],
                       shape: tuple[int, int], prompt_of: Callable[[str], str] | None = None,
                       seen: Iterable[str] = ()) -> tuple[list[Sample], list[Sample]]:
    """Objects (class name or ``__ignore__``, HxW bool) → (one sample per class present, the
    union of its objects, plus absent-class negatives from ``classes``; one instance per
    object). Ignore regions are 255 in every mask that does not claim the pixel. ``seen``:
    classes marked on the image without area (lines, points, skeletons), which are neither
    positives nor absent there. Prompts are ``prompt_of(name)``, by default the name in
    ``prepare.prompt_template``."""
    prompt_of = prompt_of or (lambda name: class_prompt(cfg, name))
    ignore = np.zeros(shape, bool)
    for name, m in objects:
        if name == IGNORE_CLASS:
            ignore |= m
    union: dict[str, np.ndarray] = {}
    instances = []
    for name, m in objects:
        if name == IGNORE_CLASS:
            continue
        union[name] = union[name] | m if name in union else m.copy()
        instances.append(Sample(stem, prompt_of(name), encode_binary(m, ignore)))
    samples = [Sample(stem, prompt_of(name), encode_binary(m, ignore))
               for name, m in sorted(union.items())]
    present = [s.prompt for s in samples] + [prompt_of(name) for name in seen]
    samples += absent_samples(cfg, seed, stem, [prompt_of(c) for c in classes], present,
                              shape, ignore if ignore.any() else None)
    return samples, instances


def encode_binary(fg: np.ndarray, ignore: np.ndarray | None = None) -> np.ndarray:
    """HxW bool → the mask encoding: 1 where ``fg``, else 255 where ``ignore``, else 0."""
    enc = np.where(fg, FOREGROUND, BACKGROUND).astype(np.uint8)
    if ignore is not None:
        enc[ignore & ~fg] = IGNORE
    return enc


def class_unions(objects: list[Sample]) -> list[Sample]:
    """Objects (one sample each, objects of a class sharing a prompt) → one sample per prompt,
    the union of its objects' foreground, in prompt order."""
    union: dict[str, Sample] = {}
    for obj in objects:
        if obj.prompt in union:
            u = union[obj.prompt]
            u.mask = np.where(obj.mask == FOREGROUND, FOREGROUND, u.mask).astype(np.uint8)
        else:
            union[obj.prompt] = Sample(obj.stem, obj.prompt, obj.mask.copy())
    return [union[p] for p in sorted(union)]


# 8-connectivity: pixels touching at a corner are one piece (as skimage.measure.label's
# default for 2-D, connectivity=2).
_EIGHT = np.ones((3, 3), bool)


def component_instances(samples: list[Sample]) -> list[Sample]:
    """Each connected piece of each positive sample's foreground as an object
    (``prepare.instances_from: components``): the sample's ignore pixels are kept in every
    piece's mask, so the piece is encoded as the sample is."""
    pieces = []
    for s in samples:
        fg = s.mask == FOREGROUND
        if not fg.any():
            continue
        labels, n = ndimage.label(fg, structure=_EIGHT)
        for k in range(1, n + 1):
            m = np.where(labels == k, FOREGROUND, np.where(s.mask == IGNORE, IGNORE, BACKGROUND))
            pieces.append(Sample(s.stem, s.prompt, m.astype(np.uint8)))
    return pieces
