"""One mask per object from a text prompt: seeds from the centre heatmap, then either point
prompts through SAM's decoder or a watershed of the semantic mask (``evaluate.instances``
holds the knobs; ``decode`` picks the path).

The centre head (`cdsam.models.instance_heads`) gives per (image, prompt) a heatmap at 4x the
token grid. A *seed* is a regional maximum of it that stands at least ``seed_prominence``
above the saddle to any higher ground (scikit-image's ``h_maxima``: no distance in pixels, so
one knob serves small and large objects), reaches ``seed_threshold`` and lies on the
prompt's semantic mask.

``prompts``: each seed is a positive click next to the prompt's text, decoded against the
image's one encoding, all seeds of a batch in batched decoder calls: SAM's decoder merges
every sparse token given together into one mask, so each seed is its own decoder row (as
micro-sam's automatic prompt generation feeds its seeds). Training taught the decoder that
text + a click inside one object means that object
(`cdsam.data.spatial.focus_clicked_objects`). Masks smaller than ``min_area`` are dropped, the
rest go through greedy mask NMS (``nms_iou``), best quality first. Quality = the seed's
strength (the heatmap at the peak) x SAM's predicted IoU.

``watershed``: the semantic mask is split by a watershed of the (upsampled) heatmap from the
seeds (scikit-image's ``watershed``, as micro-sam's instance decoder splits its foreground);
a piece of the mask no seed reaches is an object of its own. No decoder rows beyond the
semantic pass. Quality = the object's mean mask probability (as the components baseline);
its score also multiplies the heatmap's peak inside it, so AP ranks split objects by it.

An object's *score* is the prompt's presence probability x quality (SAM 3 multiplies query
and presence scores alike; watershed x the peak as said). An object is *kept* (returned,
counted) when the presence passes the checkpoint's ``presence_threshold`` and its quality
reaches ``min_quality``; average precision ranks every decoded object by score.

:func:`mask_components` is the baseline the figures are read against: each connected piece
(8-connected, SciPy's ``ndimage.label``) of the thresholded semantic mask as an object, scored
presence x its mean probability.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from skimage.morphology import h_maxima
from skimage.segmentation import watershed

from cdsam.config.schema import DECODE_MODES, InstanceConfig
from cdsam.data.spatial import POINT_SLOTS
from cdsam.models.model import CDSAM, CDSAMOutput

_EIGHT = np.ones((3, 3), bool)
DEFAULT_MIN_QUALITY = 0.25  # a checkpoint that chose none (its val split had no objects)


@dataclass
class Instances:
    """The objects found for one (image, prompt)."""

    masks: np.ndarray  # KxHxW bool, at the input size
    scores: np.ndarray  # K: what AP ranks by (presence x quality; watershed also x the peak)
    quality: np.ndarray  # K: what min_quality cuts (see the module's doc, per decode path)
    presence: float  # the prompt's presence probability
    decoder_rows: int = 0  # decoder rows spent beyond the semantic pass (prompts: one a seed)

    def __len__(self) -> int:
        return len(self.scores)

    def kept(self, presence_threshold: float, min_quality: float) -> np.ndarray:
        """K bool: the objects returned at the deployment thresholds."""
        if self.presence < presence_threshold:
            return np.zeros(len(self), bool)
        return self.quality >= min_quality

    def select(self, keep: np.ndarray) -> Instances:
        """The objects ``keep`` (K bool or indices) marks."""
        return Instances(self.masks[keep], self.scores[keep], self.quality[keep],
                         self.presence, self.decoder_rows)

    @classmethod
    def empty(cls, size: tuple[int, int], presence: float) -> Instances:
        return cls(np.zeros((0, *size), bool), np.zeros(0), np.zeros(0), presence)


def stored_min_quality(extra: dict, decode: str) -> float:
    """The ``min_quality`` a checkpoint chose on val for the ``decode`` path (meta.json's
    ``instance_min_quality``: one value a path; a single number was the prompts path's)."""
    chosen = extra.get("instance_min_quality")
    if isinstance(chosen, dict):
        chosen = chosen.get(decode)
    elif decode != "prompts":
        chosen = None
    return DEFAULT_MIN_QUALITY if chosen is None else float(chosen)


def find_seeds(heat: np.ndarray, foreground: np.ndarray, cfg: InstanceConfig
               ) -> tuple[np.ndarray, np.ndarray]:
    """(Kx2 int row, col of the seeds, strongest first; K heat values) of an hxw heatmap:
    its maxima of prominence ``seed_prominence`` at or above ``seed_threshold`` on
    ``foreground`` (hxw bool), one seed (the highest cell) per maximal plateau."""
    tops = h_maxima(heat, cfg.seed_prominence).astype(bool) & foreground & \
        (heat >= cfg.seed_threshold)
    regions, n = ndimage.label(tops, structure=_EIGHT)
    if n == 0:
        return np.zeros((0, 2), np.int64), np.zeros(0)
    peaks = np.asarray(ndimage.maximum_position(heat, regions, np.arange(1, n + 1)),
                       np.int64).reshape(-1, 2)
    strength = heat[peaks[:, 0], peaks[:, 1]].astype(np.float64)
    order = np.argsort(-strength, kind="stable")[:cfg.max_seeds]
    return peaks[order], strength[order]


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
                     image_size: tuple[int, int], cfg: InstanceConfig, threshold: float,
                     budget: int = 64) -> list[Instances]:
    """The objects of each row of ``out`` (a text-only pass of ``model`` with the instance
    heads; ``text``: its rows' text features; ``threshold``: the semantic mask's) by
    ``cfg.decode``, decoding at most ``budget`` seeds a decoder call."""
    presence = torch.sigmoid(out.presence.float()).cpu().numpy()
    prob = torch.sigmoid(out.masks[:, :1].float())
    centres = torch.sigmoid(out.centres[:, :1].float())
    if cfg.decode not in DECODE_MODES:
        raise ValueError(f"decode: {cfg.decode!r} is not one of {DECODE_MODES}")
    if cfg.decode == "watershed":
        heat = F.interpolate(centres, size=prob.shape[-2:], mode="bilinear",
                             align_corners=False)
        return [watershed_instances(h, p, threshold, float(pr), cfg) for h, p, pr in
                zip(heat[:, 0].cpu().numpy(), prob[:, 0].cpu().numpy(), presence, strict=True)]
    # A heatmap cell is on the mask when any pixel it covers is.
    fg = (F.adaptive_max_pool2d(prob, centres.shape[-2:]) > threshold)[:, 0].cpu().numpy()
    heat = centres[:, 0].cpu().numpy()
    return prompted_instances(model, out, text, image_size, cfg, heat, fg, presence, budget)


def prompted_instances(model: CDSAM, out: CDSAMOutput, text: torch.Tensor,
                       image_size: tuple[int, int], cfg: InstanceConfig, heat: np.ndarray,
                       foreground: np.ndarray, presence: np.ndarray, budget: int
                       ) -> list[Instances]:
    """``decode: prompts``: each seed of each row's heatmap (Rxhxw) a click through SAM's
    decoder → min_area → mask NMS."""
    rows = len(presence)
    image_of = out.image_of if out.image_of is not None else \
        torch.arange(rows, device=out.tokens.device)
    seeds = [find_seeds(heat[s], foreground[s], cfg) for s in range(rows)]
    row_of = np.concatenate([np.full(len(p), s, np.int64) for s, (p, _) in enumerate(seeds)]) \
        if rows else np.zeros(0, np.int64)
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
                               float(presence[s]), decoder_rows=len(mine)))
    return found


def watershed_instances(heat: np.ndarray, prob: np.ndarray, threshold: float, presence: float,
                        cfg: InstanceConfig) -> Instances:
    """``decode: watershed``: ``prob > threshold`` (HxW) split by a watershed of ``heat``
    (HxW, the heatmap at the input size) from its seeds; a piece no seed reaches is one
    object."""
    fg = prob > threshold
    peaks, _ = find_seeds(heat, fg, cfg)
    markers = np.zeros(fg.shape, np.int32)
    markers[peaks[:, 0], peaks[:, 1]] = np.arange(1, len(peaks) + 1)
    labels = watershed(-heat, markers, mask=fg, connectivity=2)
    rest, n = ndimage.label(fg & (labels == 0), structure=_EIGHT)
    labels = np.where(rest > 0, rest + len(peaks), labels)
    ids = np.arange(1, len(peaks) + n + 1)
    if not len(ids):
        return Instances.empty(prob.shape, presence)
    area = ndimage.sum_labels(np.ones_like(prob), labels, ids)
    ids = ids[area >= cfg.min_area]
    mean = np.asarray(ndimage.mean(prob, labels, ids), np.float64).reshape(-1)
    peak = np.asarray(ndimage.maximum(heat, labels, ids), np.float64).reshape(-1)
    masks = labels[None] == ids[:, None, None]
    return Instances(masks, presence * mean * peak, mean, presence)


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
