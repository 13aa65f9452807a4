"""Instance figures over a split's (image, prompt) pairs, accumulated pair by pair.

- ``ap`` / ``ap50`` / ``ap75``: mask average precision from pycocotools' ``COCOeval``
  (``iouType="segm"``): images are the split's images, categories its prompts, so every
  (image, prompt) pair is scored as COCO scores an (image, category); detections on a pair
  with no object (prepare's negatives) are false positives. Every decoded object is a
  detection, ranked by its score (presence x quality). Objects are ``iscrowd 0``; a pair's
  ignore pixels (COCO crowd regions, VOC borders, padding) form one ``iscrowd 1`` region, so a
  detection inside them is neither right nor wrong. ``maxDets`` is raised above the largest
  object count of the split; areas are COCO's ranges in pixels at ``data.crop`` (only the
  all-area figures are reported).
- At the deployment thresholds (`cdsam.inference.instances.Instances.kept`): ``count_mae``,
  the mean over pairs of |objects returned - objects there|; ``pmf1``, SAM 3's positive
  micro-F1 (over pairs that have objects, one-to-one matches by Hungarian assignment at IoU
  0.50 … 0.95, micro F1 at each threshold, averaged); ``il_mcc``, the Matthews correlation of
  "returned any object" with "has objects" over all pairs; ``cgf1 = pmf1 x il_mcc``.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy.optimize import linear_sum_assignment

from cdsam.evaluation.presence import mcc
from cdsam.inference.instances import Instances

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # COCO's, and SAM 3's pmF1


def encode(masks: np.ndarray) -> list[dict]:
    """KxHxW bool → COCO RLEs."""
    if len(masks) == 0:
        return []
    return mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))


def pair_ious(pred: list[dict], truth: list[dict]) -> np.ndarray:
    """PxT mask IoU of RLEs ``pred`` against ``truth`` (all ``iscrowd 0``)."""
    if not pred or not truth:
        return np.zeros((len(pred), len(truth)))
    return np.asarray(mask_utils.iou(pred, truth, [0] * len(truth))).reshape(len(pred),
                                                                             len(truth))


def matches(ious: np.ndarray, threshold: float) -> int:
    """One-to-one matches with IoU >= ``threshold`` (the most there can be) in a PxT IoU
    matrix."""
    if not ious.size:
        return 0
    hit = (ious >= threshold).astype(np.float64)
    r, c = linear_sum_assignment(-hit)
    return int(hit[r, c].sum())


class InstanceScores:
    """Accumulates pairs (:meth:`add`), then :meth:`figures`."""

    def __init__(self, presence_threshold: float, min_quality: float) -> None:
        self.presence_threshold = presence_threshold
        self.min_quality = min_quality
        self.images: dict[int, tuple[int, int]] = {}
        self.categories: dict[str, int] = {}
        self.gt: list[dict] = []
        self.dt: list[dict] = []
        self.count_err: list[int] = []
        self.returned: list[bool] = []
        self.present: list[bool] = []
        self.tp = np.zeros(len(IOU_THRESHOLDS))
        self.fp = np.zeros(len(IOU_THRESHOLDS))
        self.fn = np.zeros(len(IOU_THRESHOLDS))
        self.largest = 0

    def add(self, image: int, prompt: str, truth: np.ndarray, found: Instances,
            ignore: np.ndarray | None = None) -> None:
        """One (image, prompt): ``truth`` KxHxW bool objects, ``found`` the decoded ones,
        ``ignore`` HxW bool pixels no object is scored on."""
        h, w = truth.shape[1:] if truth.ndim == 3 else found.masks.shape[1:]
        self.images[image] = (h, w)
        cat = self.categories.setdefault(prompt, len(self.categories) + 1)
        gt_rles = encode(truth)
        for rle in gt_rles:
            self._ann(self.gt, image, cat, rle, iscrowd=0)
        if ignore is not None and ignore.any():
            self._ann(self.gt, image, cat, encode(ignore[None])[0], iscrowd=1)
        dt_rles = encode(found.masks)
        for rle, score in zip(dt_rles, found.scores.tolist(), strict=True):
            self._ann(self.dt, image, cat, rle, score=score)
        kept = found.kept(self.presence_threshold, self.min_quality)
        kept_rles = [r for r, k in zip(dt_rles, kept.tolist(), strict=True) if k]
        self.largest = max(self.largest, len(truth), len(found))
        self.count_err.append(abs(len(kept_rles) - len(truth)))
        self.returned.append(bool(kept_rles))
        self.present.append(len(truth) > 0)
        if len(truth):
            ious = pair_ious(kept_rles, gt_rles)
            for t, threshold in enumerate(IOU_THRESHOLDS):
                tp = matches(ious, threshold)
                self.tp[t] += tp
                self.fp[t] += len(kept_rles) - tp
                self.fn[t] += len(truth) - tp

    def _ann(self, into: list[dict], image: int, cat: int, rle: dict, **kw: float) -> None:
        area = float(mask_utils.area(rle))
        into.append({"id": len(into) + 1, "image_id": image, "category_id": cat,
                     "segmentation": rle, "area": area,
                     "bbox": mask_utils.toBbox(rle).tolist(), **kw})

    def average_precision(self) -> dict[str, float]:
        """COCOeval ``segm`` AP, AP50, AP75 (0 when nothing was detected)."""
        if not self.dt or not any(a["iscrowd"] == 0 for a in self.gt):
            return {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}
        gt = COCO()
        gt.dataset = {"images": [{"id": i, "height": h, "width": w}
                                 for i, (h, w) in sorted(self.images.items())],
                      "categories": [{"id": c, "name": p} for p, c in self.categories.items()],
                      "annotations": self.gt}
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            gt.createIndex()
            dt = gt.loadRes([{k: v for k, v in a.items() if k != "id"} for a in self.dt])
            ev = COCOeval(gt, dt, iouType="segm")
            ev.params.imgIds = sorted(self.images)
            ev.params.maxDets = [1, 10, max(100, self.largest + 1)]
            ev.evaluate()
            ev.accumulate()
        # Read from the accumulated precision (IoU x recall x category x area x maxDets) at
        # all areas and the largest maxDets: COCOeval.summarize reads its overall AP at a fixed
        # maxDets of 100, so with more objects an image it reports -1.
        precision = ev.eval["precision"][:, :, :, 0, -1]

        def mean(p: np.ndarray) -> float:
            p = p[p > -1]
            return float(p.mean()) if p.size else 0.0

        return {"ap": mean(precision), "ap50": mean(precision[0]), "ap75": mean(precision[5])}

    def figures(self) -> dict[str, float]:
        denom = 2 * self.tp + self.fp + self.fn
        f1 = np.where(denom > 0, 2 * self.tp / np.maximum(denom, 1), 0.0)
        pmf1 = float(f1.mean())
        il_mcc = mcc(np.asarray(self.returned), np.asarray(self.present))
        return {**self.average_precision(),
                "count_mae": float(np.mean(self.count_err)) if self.count_err else 0.0,
                "pmf1": pmf1, "il_mcc": il_mcc, "cgf1": pmf1 * il_mcc}


QUALITY_GRID = np.round(np.arange(0.0, 0.95, 0.05), 2)  # min_quality candidates


def choose_min_quality(pairs: list[tuple[np.ndarray, Instances]], presence_threshold: float,
                       grid: np.ndarray = QUALITY_GRID) -> tuple[float, float]:
    """(min_quality, its score): over ``pairs`` (truth KxHxW, found), the candidate whose
    returned objects score the best cgF1 (the lowest such); pmF1 where every pair has objects
    (no negatives: IL_MCC is 0 whatever is returned). Chosen on val by every training stage
    with the instance heads, as the presence threshold is."""
    one_sided = len({len(truth) > 0 for truth, _ in pairs}) < 2
    ious = [pair_ious(encode(found.masks), encode(truth)) for truth, found in pairs]
    best, best_q = -2.0, float(grid[0])
    for q in grid.tolist():
        tp = np.zeros(len(IOU_THRESHOLDS))
        fp, fn = np.zeros_like(tp), np.zeros_like(tp)
        returned, present = [], []
        for (truth, found), iou in zip(pairs, ious, strict=True):
            kept = found.kept(presence_threshold, q)
            sub = iou[kept]
            returned.append(bool(kept.any()))
            present.append(len(truth) > 0)
            if not len(truth):
                continue
            for t, threshold in enumerate(IOU_THRESHOLDS):
                m = matches(sub, threshold)
                tp[t] += m
                fp[t] += len(sub) - m
                fn[t] += len(truth) - m
        denom = 2 * tp + fp + fn
        pmf1 = float(np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0).mean())
        score = pmf1 if one_sided else pmf1 * mcc(np.asarray(returned), np.asarray(present))
        if score > best:
            best, best_q = score, q
    return best_q, best
