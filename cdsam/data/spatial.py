"""Point and box prompts drawn from a target mask, as SAM trains and evaluates them.

Every sample carries the same slots, so a batch stacks without padding logic: two point slots
(a positive click inside the target, a negative click outside it; label -1 = empty) and one box
(``has_box`` False = empty; the model then feeds SAM's "not a point" token). Training draws
them with the probabilities ``train.point_prompts`` / ``train.box_prompts`` from a generator
seeded by (seed, epoch, sample), so 0 or N loader workers, DDP ranks and a resumed run see the
same prompts; evaluation uses fixed policies (one positive click; the tight box). A target with
no foreground pixel (an absent-object negative) gets no spatial prompt: a click on an absent
object has no meaning.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cdsam.data.manifest import BACKGROUND, FOREGROUND

POINT_SLOTS = 2  # [positive click, negative click]
_STREAM = 0x5A  # separates this generator's seed from the augmentation's


@dataclass(frozen=True)
class SpatialPolicy:
    point: float = 0.0  # probability of a positive click inside the target
    negative: float = 0.5  # given a click: probability of a negative click outside it too
    box: float = 0.0  # probability of a box around the target
    jitter: float = 0.1  # box corners move by N(0, jitter × box side) pixels, as SAM trains

    @property
    def enabled(self) -> bool:
        return self.point > 0 or self.box > 0


CLICK = SpatialPolicy(point=1.0, negative=0.0)  # evaluation: text + one positive click
BOX = SpatialPolicy(box=1.0, jitter=0.0)  # evaluation: text + the tight box


def empty_prompts() -> dict[str, torch.Tensor]:
    """The slots with nothing in them."""
    return {"points": torch.zeros(POINT_SLOTS, 2),
            "point_labels": torch.full((POINT_SLOTS,), -1, dtype=torch.int64),
            "box": torch.zeros(4), "has_box": torch.tensor(False)}


def _pick(rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray) -> list[float]:
    i = int(rng.integers(len(xs)))
    return [float(xs[i]), float(ys[i])]


def sample_prompts(mask: torch.Tensor, policy: SpatialPolicy, seed: int,
                   ) -> dict[str, torch.Tensor]:
    """Spatial prompts for one HxW mask (0 background, 1 target, 255 ignore), pixel xy.

    Clicks land on labelled pixels only (never on ignore or padding).
    """
    out = empty_prompts()
    m = mask.numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    fy, fx = np.nonzero(m == FOREGROUND)
    if len(fx) == 0 or not policy.enabled:
        return out
    rng = np.random.default_rng([seed, _STREAM])
    if rng.random() < policy.point:
        out["points"][0] = torch.tensor(_pick(rng, fy, fx))
        out["point_labels"][0] = 1
        by, bx = np.nonzero(m == BACKGROUND)
        if len(bx) and rng.random() < policy.negative:
            out["points"][1] = torch.tensor(_pick(rng, by, bx))
            out["point_labels"][1] = 0
    if rng.random() < policy.box:
        box = np.array([fx.min(), fy.min(), fx.max(), fy.max()], dtype=np.float64)
        if policy.jitter > 0:
            side = np.array([box[2] - box[0] + 1, box[3] - box[1] + 1] * 2)
            box = box + rng.normal(0.0, policy.jitter, 4) * side
        h, w = m.shape
        box = np.clip(box, 0, [w - 1, h - 1, w - 1, h - 1])
        x0, x1 = sorted(box[0::2])
        y0, y1 = sorted(box[1::2])
        out["box"] = torch.tensor([x0, y0, x1, y1], dtype=torch.float32)
        out["has_box"] = torch.tensor(True)
    return out


def batch_prompts(batch: dict, device: torch.device) -> dict[str, object]:
    """A collated batch's slots as the model's ``points`` / ``boxes`` / ``box_valid``
    arguments; empty when no row has a point or box (the text-only path)."""
    labels, has_box = batch["point_labels"], batch["has_box"]
    if not bool((labels >= 0).any()) and not bool(has_box.any()):
        return {}
    return {"points": (batch["points"].to(device, non_blocking=True),
                       labels.to(device, non_blocking=True)),
            "boxes": batch["box"].to(device, non_blocking=True),
            "box_valid": has_box.to(device, non_blocking=True)}
