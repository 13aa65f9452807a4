"""Class IoU as PASCAL VOC and COCO report it: every class scored on every image of a split.

The sample index holds each image's present classes and the negatives prepare drew (with
``negatives_per_image: 1``, one absent class per image), so IoU summed over its rows counts a
class's false positives only on the few images where that class happened to be drawn: a model
that fires on every prompt scores high. Here each image is decoded with *every* class of the
split's vocabulary. The truth of a present class is its prepared mask; an absent class's truth is
empty, with the pixels valid in any of the image's masks as its valid pixels (padding and VOC's
border stay ignored, another class's crowd region does not). DINO runs once per image and the
text tower once per class; only the decoder runs per (image, class).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from cdsam.data.manifest import IGNORE
from cdsam.data.prepared import PreparedSplit

# Bx3xCxC uint8 images, P class prompts -> BxPxCxC logits (any device)
LogitsFn = Callable[[torch.Tensor, Sequence[str]], torch.Tensor]


@dataclass
class ClassGrid:
    """Per class: intersection and union summed over every image of the split."""

    vocab: list[str]
    inter: np.ndarray
    union: np.ndarray
    images: int

    @property
    def class_iou(self) -> float:
        """Mean IoU over the classes with a non-empty union (present or predicted somewhere)."""
        seen = self.union > 0
        return float((self.inter[seen] / self.union[seen]).mean()) if seen.any() else 0.0

    def per_class(self) -> pd.DataFrame:
        iou = np.where(self.union > 0, self.inter / np.maximum(self.union, 1), np.nan)
        return pd.DataFrame({"prompt": self.vocab, "class_iou": iou})


def image_truths(split: PreparedSplit, image_row: int, samples: list[int], vocab: list[str]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """PxCxC truth and valid (bool) of every class of ``vocab`` on one image; ``samples`` are
    the image's rows in the sample index."""
    masks = split.masks(samples)
    valid_any = (masks != IGNORE).any(axis=0)
    crop = split.crop
    truth = np.zeros((len(vocab), crop, crop), bool)
    valid = np.broadcast_to(valid_any, truth.shape).copy()
    where = {p: i for i, p in enumerate(vocab)}
    for sample, mask in zip(samples, masks, strict=True):
        k = where.get(split.prompts[sample])
        if k is not None:
            truth[k], valid[k] = mask == 1, mask != IGNORE
    return truth, valid


def score_class_grid(split: PreparedSplit, vocab: Sequence[str], logits_fn: LogitsFn,
                     pairs_per_call: int = 256, threshold: float = 0.5,
                     show_progress: bool = False, images_per_call: int | None = None
                     ) -> ClassGrid:
    """Decode every image of ``split`` with every class of ``vocab``; see the module doc.
    ``images_per_call`` caps the images one ``logits_fn`` call encodes (a small vocabulary
    would otherwise put ``pairs_per_call`` images through DINO at once)."""
    vocab = list(vocab)
    per_image: dict[int, list[int]] = {}
    for sample, row in enumerate(split.image_row.tolist()):
        per_image.setdefault(row, []).append(sample)
    rows = sorted(per_image)
    inter = np.zeros(len(vocab), np.float64)
    union = np.zeros(len(vocab), np.float64)
    step = max(1, pairs_per_call // max(len(vocab), 1))
    if images_per_call is not None:
        step = min(step, max(1, images_per_call))
    cut = float(np.log(threshold / (1 - threshold)))  # sigmoid(x) > t  <=>  x > logit(t)
    for start in tqdm(range(0, len(rows), step), desc="class grid", leave=False,
                      disable=not show_progress):
        chunk = rows[start:start + step]
        images = torch.from_numpy(split.image_rows(chunk))
        pred = (logits_fn(images, vocab).float() > cut).cpu().numpy()
        for j, row in enumerate(chunk):
            truth, valid = image_truths(split, row, per_image[row], vocab)
            p, t = pred[j] & valid, truth & valid
            inter += (p & t).sum(axis=(1, 2))
            union += (p | t).sum(axis=(1, 2))
    return ClassGrid(vocab, inter, union, len(rows))
