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

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cdsam.data.manifest import BACKGROUND, FOREGROUND, IGNORE

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
    return {k: torch.from_numpy(v)[0] for k, v in prompt_arrays(1).items()}


@dataclass(frozen=True)
class MaskStats:
    """Per-row pixel counts and foreground boxes of N masks: enough to draw any sample's
    prompts with one short row scan instead of scanning the whole mask (the packed loader
    computes them per batch; :func:`sample_prompts` for one mask)."""

    fg_cum: np.ndarray  # N x H int32: foreground pixels in rows 0..y, cumulative
    bg_cum: np.ndarray  # N x H int32: background pixels likewise
    boxes: np.ndarray  # N x 4 int32: foreground x0, y0, x1, y1 (inclusive); -1 without any

    @classmethod
    def of(cls, masks: np.ndarray, chunk: int = 256) -> MaskStats:
        """``masks``: NxHxW uint8 (a memory-mapped array is read ``chunk`` masks at a time)."""
        n, h, w = masks.shape
        fg_cum = np.empty((n, h), np.int32)
        bg_cum = np.empty((n, h), np.int32)
        boxes = np.full((n, 4), -1, np.int32)
        for i in range(0, n, chunk):
            m = np.asarray(masks[i:i + chunk])
            fg = m == FOREGROUND
            fg_cum[i:i + chunk] = np.cumsum(fg.sum(axis=2), axis=1)
            bg_cum[i:i + chunk] = np.cumsum((m == BACKGROUND).sum(axis=2), axis=1)
            rows, cols = fg.any(axis=2), fg.any(axis=1)
            has = rows.any(axis=1)
            idx = np.nonzero(has)[0]
            boxes[i + idx, 0] = cols[idx].argmax(axis=1)
            boxes[i + idx, 1] = rows[idx].argmax(axis=1)
            boxes[i + idx, 2] = w - 1 - cols[idx][:, ::-1].argmax(axis=1)
            boxes[i + idx, 3] = h - 1 - rows[idx][:, ::-1].argmax(axis=1)
        return cls(fg_cum, bg_cum, boxes)


def _pick(rng: np.random.Generator, cum: np.ndarray, mask: np.ndarray, value: int,
          ) -> list[float]:
    """A uniformly drawn pixel equal to ``value``: the i-th in row-major order, found from the
    per-row counts and one row scan (the same pixel ``np.nonzero(mask == value)[i]`` gives)."""
    i = int(rng.integers(int(cum[-1])))
    y = int(np.searchsorted(cum, i, side="right"))
    before = int(cum[y - 1]) if y else 0
    x = int(np.flatnonzero(mask[y] == value)[i - before])
    return [float(x), float(y)]


def prompt_arrays(n: int) -> dict[str, np.ndarray]:
    """Empty slots for ``n`` samples as numpy arrays (:func:`draw_prompts` fills rows)."""
    return {"points": np.zeros((n, POINT_SLOTS, 2), np.float32),
            "point_labels": np.full((n, POINT_SLOTS), -1, np.int64),
            "box": np.zeros((n, 4), np.float32), "has_box": np.zeros(n, np.bool_)}


def draw_prompts(stats: MaskStats, k: int, mask: np.ndarray, policy: SpatialPolicy, seed: int,
                 out: dict[str, np.ndarray], j: int) -> None:
    """Draw the spatial prompts of mask ``k`` of ``stats`` into row ``j`` of ``out``
    (:func:`prompt_arrays`). ``mask``: that HxW mask (0 background, 1 target, 255 ignore);
    pixel xy. Clicks land on labelled pixels only (never on ignore or padding)."""
    fg_cum, bg_cum = stats.fg_cum[k], stats.bg_cum[k]
    if fg_cum[-1] == 0 or not policy.enabled:
        return
    rng = np.random.default_rng([seed, _STREAM])
    if rng.random() < policy.point:
        out["points"][j, 0] = _pick(rng, fg_cum, mask, FOREGROUND)
        out["point_labels"][j, 0] = 1
        if bg_cum[-1] and rng.random() < policy.negative:
            out["points"][j, 1] = _pick(rng, bg_cum, mask, BACKGROUND)
            out["point_labels"][j, 1] = 0
    if rng.random() < policy.box:
        box = stats.boxes[k].astype(np.float64)
        if policy.jitter > 0:
            side = np.array([box[2] - box[0] + 1, box[3] - box[1] + 1] * 2)
            box = box + rng.normal(0.0, policy.jitter, 4) * side
        h, w = mask.shape
        box = np.clip(box, 0, [w - 1, h - 1, w - 1, h - 1])
        x0, x1 = sorted(box[0::2])
        y0, y1 = sorted(box[1::2])
        out["box"][j] = [x0, y0, x1, y1]
        out["has_box"][j] = True


def focus_clicked_objects(masks: np.ndarray, objects: np.ndarray, slots: dict[str, np.ndarray],
                          seeds: Sequence[int], policy: SpatialPolicy) -> list[int]:
    """Samples whose drawn prompts hold a positive click on one of their objects: the target
    becomes that object alone (``masks`` rewritten in place, ignore pixels kept) and the
    prompts are drawn again from it under the same seed (the click then lands inside the
    object; a box, if drawn, frames it; a negative click may land on a sibling object, which
    is what "not that one" means). Returns the rows changed."""
    changed = []
    for j in np.flatnonzero(slots["point_labels"][:, 0] == 1).tolist():
        x, y = (int(v) for v in slots["points"][j, 0])
        k = int(objects[j, y, x])
        if k == 0:
            continue
        fg = objects[j] == k
        masks[j] = np.where(fg, FOREGROUND, np.where(masks[j] == IGNORE, IGNORE, BACKGROUND))
        draw_prompts(MaskStats.of(masks[j][None]), 0, masks[j], policy, seeds[j], slots, j)
        changed.append(j)
    return changed


def sample_prompts(mask: torch.Tensor, policy: SpatialPolicy, seed: int,
                   ) -> dict[str, torch.Tensor]:
    """Spatial prompts for one HxW mask (0 background, 1 target, 255 ignore), pixel xy."""
    m = mask.numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    out = prompt_arrays(1)
    draw_prompts(MaskStats.of(m[None]), 0, m, policy, seed, out, 0)
    return {k: torch.from_numpy(v)[0] for k, v in out.items()}


def prompted_rows(point_labels: np.ndarray, has_box: np.ndarray) -> np.ndarray:
    """B bool: the rows of a batch's slots with at least one click or a box."""
    return (point_labels >= 0).any(axis=1) | has_box


def batch_prompts(batch: dict, device: torch.device) -> dict[str, object]:
    """A collated batch's slots as the model's ``points`` / ``boxes`` / ``box_valid`` / ``rows``
    arguments; empty when no row has a point or box (the text-only path).

    The packed loader puts the prompted rows (``spatial_rows``) in the batch from the host
    arrays before the slots go to the device, so nothing here waits for the device; a batch
    without them (collated on the host) gets them from its slots."""
    rows = batch.get("spatial_rows")
    if rows is None:
        rows = prompted_rows(batch["point_labels"].cpu().numpy(), batch["has_box"].cpu().numpy())
    if not rows.any():
        return {}
    return {"points": (batch["points"].to(device, non_blocking=True),
                       batch["point_labels"].to(device, non_blocking=True)),
            "boxes": batch["box"].to(device, non_blocking=True),
            "box_valid": batch["has_box"].to(device, non_blocking=True), "rows": rows}
