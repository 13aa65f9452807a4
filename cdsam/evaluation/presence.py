"""Presence scores: how well the presence head tells "in the image" from "not here".

- ``presence_auroc``: the area under the ROC curve of the presence probability over the split's
  (image, prompt) rows, positives against prepare's negatives (threshold-free).
- ``il_mcc``: the Matthews correlation of the image-level present / absent decision at a
  threshold (SAM 3's IL_MCC; there the decision is "any object returned").
- :func:`best_threshold`: the threshold with the highest MCC, chosen on val by every training
  stage and stored in the checkpoint (``presence_threshold``), which prediction gates by.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import rankdata


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (ties count half: the Mann-Whitney U over the ranks); NaN
    when one class is missing."""
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def mcc(predicted: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation of two bool arrays (0 when a margin is empty, as sklearn)."""
    p, t = np.asarray(predicted, bool), np.asarray(labels, bool)
    tp, tn = float((p & t).sum()), float((~p & ~t).sum())
    fp, fn = float((p & ~t).sum()), float((~p & t).sum())
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denom if denom > 0 else 0.0


def best_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(threshold, its MCC): the midpoint between consecutive distinct scores that maximises
    MCC (the lowest such); 0.5 and its MCC when the scores cannot separate anything. Without
    any negative (a one-class source with no absent-object prompts) there is no cut to learn:
    0, never gate."""
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    if labels.all():
        return 0.0, 0.0
    distinct = np.unique(scores)
    if len(distinct) < 2:
        return 0.5, mcc(scores >= 0.5, labels)
    cuts = (distinct[:-1] + distinct[1:]) / 2
    values = [mcc(scores >= c, labels) for c in cuts]
    k = int(np.argmax(values))
    return float(cuts[k]), float(values[k])
