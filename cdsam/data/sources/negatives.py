"""Absent-object negatives: prompts of classes that are not in an image, with an empty mask.

A text-promptable segmenter must learn that "a horse" in a picture without one means "nothing"
(CLIPSeg's negative sampling, SAM 3's negative phrases). ``prepare.negatives: absent`` draws,
per image, ``prepare.negatives_per_image`` prompts (0: all) from the classes the image does not
contain; the draw is seeded by the run seed and the image's stem, so it does not depend on the
order images are read in.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

import numpy as np

from cdsam.config.schema import PrepareConfig
from cdsam.data.manifest import BACKGROUND, IGNORE, Sample


def absent_samples(cfg: PrepareConfig, seed: int, stem: str, vocabulary: Iterable[str],
                   present: Iterable[str], shape: tuple[int, int],
                   ignore: np.ndarray | None = None) -> list[Sample]:
    """Empty-mask samples for prompts in ``vocabulary`` not in ``present`` (none when
    ``prepare.negatives`` is ``none``). ``ignore``: HxW bool of pixels that stay ignore."""
    if cfg.negatives != "absent":
        return []
    have = set(present)
    absent = [p for p in vocabulary if p not in have]
    if not absent:
        return []
    n = cfg.negatives_per_image
    if 0 < n < len(absent):
        rng = np.random.default_rng([seed, zlib.crc32(stem.encode())])
        absent = [absent[i] for i in sorted(rng.choice(len(absent), size=n, replace=False))]
    mask = np.full(shape, BACKGROUND, np.uint8)
    if ignore is not None:
        mask[ignore] = IGNORE
    return [Sample(stem, prompt, mask, absent=True) for prompt in absent]
