"""One mask per object from a text prompt: centre-heatmap peaks → point prompts through SAM's
decoder → mask NMS (``evaluate.instances`` holds the knobs).

The centre head (`cdsam.models.instance_heads`) gives per (image, prompt) a heatmap at the
decoder's mask resolution; its local maxima (scikit-image's ``peak_local_max``) above
``seed_threshold`` are the seeds. Each seed is a positive click next to the prompt's text,
decoded against the image's one encoding, all seeds of a batch in batched decoder calls: SAM's
decoder merges every sparse token given together into one mask, so each seed is its own
decoder row (as micro-sam's automatic instance segmentation feeds its seeds). Training taught
the decoder that text + a click inside one object means that object
(`cdsam.data.spatial.focus_clicked_objects`). Masks smaller than ``min_area`` are dropped, the
rest go through greedy mask NMS (``nms_iou``), best quality first.

Scores: an object's *quality* is its seed's strength (the heatmap at the peak) × SAM's
predicted IoU; its *score* is the prompt's presence probability × quality (SAM 3 multiplies
query and presence scores alike). An object is *kept* (returned, counted) when the presence
passes the checkpoint's ``presence_threshold`` and its quality reaches ``min_quality``;
average precision ranks every decoded object by score.

:func:`mask_components` is the baseline the figures are read against: each connected piece
(8-connected, SciPy's ``ndimage.label``) of the thresholded semantic mask as an object, scored
presence × its mean probability.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from skimage.feature import peak_local_max

from cdsam.config.schema import InstanceConfig
from cdsam.data.spatial import POINT_SLOTS
from cdsam.models.model import CDSAM, CDSAMOutput

_EIGHT = np.ones((3, 3), bool)


@dataclass
class Instances:
    """The objects found for one (image, prompt)."""

    masks: np.ndarray  # KxHxW bool, at the input size
    scores: np.ndarray  # K: presence x quality
    quality: np.ndarray  # K: seed strength x predicted IoU (components: mean probability)
    presence: float  # the prompt's presence probability
    seeds: int = 0  # seeds decoded for it (one decoder row each)

    def __len__(self) -> int:
        return len(self.scores)

    def kept(self, presence_threshold: float, min_quality: float) -> np.ndarray:
        """K bool: the objects returned at the deployment thresholds."""
        if self.presence < presence_threshold:
            return np.zeros(len(self), bool)
        return self.quality >= min_quality

    @classmethod
    def empty(cls, size: tuple[int, int], presence: float) -> Instances:
        return cls(np.zeros((0, *size), bool), np.zeros(0), np.zeros(0), presence)


def find_seeds(heat: np.ndarray, cfg: InstanceConfig) -> tuple[np.ndarray, np.ndarray]:
    """(Kx2 int row, col of the peaks, strongest first; K heat values) of an hxw heatmap."""
    peaks = peak_local_max(heat, min_distance=cfg.min_distance, threshold_abs=cfg.seed_threshold,
                           exclude_border=False, num_peaks=cfg.max_seeds)
    peaks = np.asarray(peaks, np.int64).reshape(-1, 2)
    return peaks, heat[peaks[:, 0], peaks[:, 1]].astype(np.float64)


def seed_points(peaks: np.ndarray, heat_size: tuple[int, int],
                image_size: tuple[int, int]) -> np.ndarray:
    """Kx2 (row, col) heatmap cells → Kx2 xy input pixels at the cells' centres."""
    sy, sx = image_size[0] / heat_size[0], image_size[1] / heat_size[1]
    return np.stack([(peaks[:, 1] + 0.5) * sx - 0.5, (peaks[:, 0] + 0.5) * sy - 0.5],
                    axis=1).astype(np.float32)


def mask_nms(masks: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Indices kept by greedy NMS on mask IoU, best score first: a mask overlapping a kept one
    by more than ``iou`` is dropped."""
    order = np.argsort(-scores, kind="stable")
    flat = torch.from_numpy(masks[order].reshape(len(order), -1)).float()
    inter = flat @ flat.T
    area = flat.sum(dim=1)
    ious = (inter / (area[:, None] + area[None, :] - inter).clamp(min=1)).numpy()
    keep: list[int] = []
    for i in range(len(order)):
        if all(ious[i, j] <= iou for j in keep):
            keep.append(i)
    return order[keep]


@torch.no_grad()
def decode_instances(model: CDSAM, out: CDSAMOutput, text: torch.Tensor,
                     image_size: tuple[int, int], cfg: InstanceConfig,
                     budget: int = 64) -> list[Instances]:
    """The objects of each row of ``out`` (a text-only pass of ``model`` with the instance
    heads; ``text``: its rows' text features), decoding at most ``budget`` seeds a call."""
    rows = out.presence.shape[0]
    presence = torch.sigmoid(out.presence.float()).cpu().numpy()
    heat = torch.sigmoid(out.centres[:, 0].float()).cpu().numpy()
    image_of = out.image_of if out.image_of is not None else \
        torch.arange(rows, device=out.tokens.device)
    seeds = [find_seeds(heat[s], cfg) for s in range(rows)]
    row_of = np.concatenate([np.full(len(p), s, np.int64) for s, (p, _) in enumerate(seeds)])
    points = np.concatenate([seed_points(p, heat.shape[-2:], image_size) for p, _ in seeds]) \
        if rows else np.zeros((0, 2), np.float32)
    strength = np.concatenate([v for _, v in seeds]) if rows else np.zeros(0)
    masks = np.zeros((len(row_of), *image_size), bool)
    iou = np.zeros(len(row_of))
    dev = out.tokens.device
    for lo in range(0, len(row_of), budget):
        idx = row_of[lo:lo + budget]
        n = len(idx)
        pts = torch.zeros((n, POINT_SLOTS, 2), dtype=torch.float32)
        labels = torch.full((n, POINT_SLOTS), -1, dtype=torch.int64)
        pts[:, 0] = torch.from_numpy(points[lo:lo + n])
        labels[:, 0] = 1
        sel = torch.from_numpy(idx).to(dev)
        res = model.decode(out.tokens, out.grid, text[sel], image_size,
                           points=(pts.to(dev), labels.to(dev)),
                           boxes=torch.zeros((n, 4), device=dev),
                           box_valid=torch.zeros(n, dtype=torch.bool, device=dev),
                           rows=np.ones(n, bool), image_of=image_of[sel])
        masks[lo:lo + n] = (res.masks[:, 0] > 0).cpu().numpy()
        iou[lo:lo + n] = res.iou[:, 0].float().clamp(0, 1).cpu().numpy()
    found = []
    for s in range(rows):
        mine = np.flatnonzero(row_of == s)
        m, q = masks[mine], strength[mine] * iou[mine]
        big = m.reshape(len(mine), -1).sum(axis=1) >= cfg.min_area if len(mine) else \
            np.zeros(0, bool)
        m, q = m[big], q[big]
        keep = mask_nms(m, q, cfg.nms_iou) if len(q) else np.zeros(0, np.int64)
        found.append(Instances(m[keep], float(presence[s]) * q[keep], q[keep],
                               float(presence[s]), seeds=len(mine)))
    return found


def mask_components(prob: np.ndarray, threshold: float, presence: float,
                    min_area: int) -> Instances:
    """The baseline: each 8-connected piece of ``prob > threshold`` (HxW probabilities) with at
    least ``min_area`` pixels, quality its mean probability."""
    labels, n = ndimage.label(prob > threshold, structure=_EIGHT)
    if n == 0:
        return Instances.empty(prob.shape, presence)
    ids = np.arange(1, n + 1)
    area = ndimage.sum_labels(np.ones_like(prob), labels, ids)
    mean = ndimage.mean(prob, labels, ids)
    ids, mean = ids[area >= min_area], mean[area >= min_area]
    masks = labels[None] == ids[:, None, None]
    return Instances(masks, presence * mean, mean, presence)
