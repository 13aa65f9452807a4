"""Instance and presence figures against hand-computed cases (cdsam.evaluation.instance_metrics,
cdsam.evaluation.presence)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cdsam.evaluation.instance_metrics import InstanceScores
from cdsam.evaluation.presence import auroc, best_threshold, mcc
from cdsam.inference.instances import Instances


def _square(y: int, x: int, side: int = 4, size: int = 16) -> np.ndarray:
    m = np.zeros((size, size), bool)
    m[y:y + side, x:x + side] = True
    return m


def _found(masks: list[np.ndarray], scores: list[float], presence: float = 1.0) -> Instances:
    arr = np.stack(masks) if masks else np.zeros((0, 16, 16), bool)
    q = np.asarray(scores, float)
    return Instances(arr, presence * q, q, presence)


def test_coco_ap_of_one_hit_and_one_false_positive_is_51_over_101():
    # Two objects; the best-scored detection hits one, the second lands on nothing. Recall
    # reaches 0.5 at precision 1: COCO's 101-point interpolated AP is 51/101 at every IoU.
    s = InstanceScores(presence_threshold=0.5, min_quality=0.25)
    truth = np.stack([_square(0, 0), _square(8, 8)])
    s.add(1, "a cell", truth, _found([_square(0, 0), _square(0, 10)], [0.9, 0.8]))
    ap = s.average_precision()
    assert ap["ap"] == pytest.approx(51 / 101) and ap["ap50"] == pytest.approx(51 / 101)


def test_perfect_objects_score_one_and_negatives_count_against():
    s = InstanceScores(0.5, 0.25)
    truth = np.stack([_square(0, 0), _square(8, 8)])
    s.add(1, "a cell", truth, _found([_square(0, 0), _square(8, 8)], [0.9, 0.8]))
    assert s.average_precision()["ap"] == pytest.approx(1.0)
    f = s.figures()
    assert f["pmf1"] == 1.0 and f["count_mae"] == 0.0
    # A negative (no objects) with a confident detection: AP drops below 1 (it outranks a
    # true object), the count is off by one there, and the image-level decision is wrong.
    s.add(2, "a cell", np.zeros((0, 16, 16), bool), _found([_square(4, 4)], [0.85]))
    f = s.figures()
    assert f["ap"] < 1.0
    assert f["count_mae"] == 0.5
    assert f["pmf1"] == 1.0  # pmF1 reads only pairs that have objects


def test_pmf1_il_mcc_cgf1_and_count_by_hand():
    s = InstanceScores(presence_threshold=0.5, min_quality=0.25)
    # Pair 1: 2 objects, 1 hit + 1 false positive returned: TP 1, FP 1, FN 1 → F1 0.5.
    s.add(1, "a", np.stack([_square(0, 0), _square(8, 8)]),
          _found([_square(0, 0), _square(0, 10)], [0.9, 0.8]))
    # Pair 2: absent, nothing returned (presence below the threshold gates the detection).
    s.add(1, "b", np.zeros((0, 16, 16), bool), _found([_square(4, 4)], [0.9], presence=0.2))
    # Pair 3: absent, one object returned: a false "present".
    s.add(2, "a", np.zeros((0, 16, 16), bool), _found([_square(4, 4)], [0.9]))
    # Pair 4: 1 object, a detection of low quality (not returned): a miss.
    s.add(2, "b", np.stack([_square(2, 2)]), _found([_square(2, 2)], [0.1]))
    f = s.figures()
    # Positives: TP 1, FP 1, FN 1 + 1 → F1 = 2 / (2 + 1 + 2) at every IoU threshold.
    assert f["pmf1"] == pytest.approx(0.4)
    # Returned any / has any: (T, T), (F, F), (T, F), (F, T) → MCC 0.
    assert f["il_mcc"] == pytest.approx(0.0)
    assert f["cgf1"] == pytest.approx(0.0)
    assert f["count_mae"] == pytest.approx((0 + 0 + 1 + 1) / 4)


def test_a_crowd_region_neither_rewards_nor_penalises():
    s = InstanceScores(0.5, 0.25)
    ignore = np.zeros((16, 16), bool)
    ignore[10:16, 0:6] = True
    s.add(1, "a", np.stack([_square(0, 0)]),
          _found([_square(0, 0), _square(11, 1)], [0.5, 0.9]), ignore=ignore)
    assert s.average_precision()["ap"] == pytest.approx(1.0)


def test_presence_auroc_mcc_and_threshold_by_hand():
    scores = np.array([0.9, 0.8, 0.3, 0.6, 0.1])
    labels = np.array([True, True, True, False, False])
    # Pairs (pos, neg) ordered right: 0.9>0.6, 0.9>0.1, 0.8>0.6, 0.8>0.1, 0.3>0.1 → 5 of 6.
    assert auroc(scores, labels) == pytest.approx(5 / 6)
    assert math.isnan(auroc(scores, np.ones(5, bool)))
    # TP 2, TN 2, FP 0, FN 1: (4 - 0) / sqrt(2 * 3 * 3 * 2).
    assert mcc(scores >= 0.7, labels) == pytest.approx(4 / 6)
    t, best = best_threshold(scores, labels)
    assert t == pytest.approx(0.7) and best == pytest.approx(4 / 6)
    # Without negatives there is no cut to learn: never gate.
    assert best_threshold(scores, np.ones(5, bool)) == (0.0, 0.0)


def test_min_quality_is_chosen_by_cgf1_and_by_pmf1_without_negatives():
    from cdsam.evaluation.instance_metrics import choose_min_quality

    a, junk = _square(0, 0), _square(10, 10)
    # A true object at quality 0.6 with a junk one at 0.2; a negative with junk at 0.3. Only
    # 0.3 < min_quality <= 0.6 returns the object alone and nothing on the negative.
    pairs = [(np.stack([a]), _found([a, junk], [0.6, 0.2])),
             (np.zeros((0, 16, 16), bool), _found([junk], [0.3]))]
    q, score = choose_min_quality(pairs, presence_threshold=0.5)
    assert q == pytest.approx(0.35) and score == pytest.approx(1.0)
    # Without the negative the IL_MCC is 0 for any choice: pmF1 decides (0.2 < q <= 0.6).
    q, score = choose_min_quality(pairs[:1], presence_threshold=0.5)
    assert q == pytest.approx(0.25) and score == pytest.approx(1.0)


def test_ap_with_more_objects_than_coco_s_100_detections():
    """COCOeval.summarize reads its overall AP at maxDets 100 whatever params.maxDets says
    (-1 beyond it): the figures come from the accumulated precision at the raised maxDets."""
    s = InstanceScores(0.5, 0.25)
    masks = []
    for k in range(120):  # 2x2 objects on a 64x64 image, 2 pixels apart
        m = np.zeros((64, 64), bool)
        y, x = divmod(k, 16)
        m[4 * y:4 * y + 2, 4 * x:4 * x + 2] = True
        masks.append(m)
    truth = np.stack(masks)
    s.add(1, "a nucleus", truth, Instances(truth, np.linspace(0.9, 0.5, 120),
                                          np.linspace(0.9, 0.5, 120), 1.0))
    ap = s.average_precision()
    assert ap["ap"] == pytest.approx(1.0) and ap["ap50"] == pytest.approx(1.0)


def test_a_checkpoints_min_quality_is_read_per_decode_path():
    from cdsam.inference.instances import DEFAULT_MIN_QUALITY, stored_min_quality

    both = {"instance_min_quality": {"prompts": 0.3, "watershed": 0.55}}
    assert stored_min_quality(both, "prompts") == 0.3
    assert stored_min_quality(both, "watershed") == 0.55
    # One number: chosen for the prompts path (before there were two); none: the default.
    assert stored_min_quality({"instance_min_quality": 0.1}, "prompts") == 0.1
    assert stored_min_quality({"instance_min_quality": 0.1}, "watershed") == DEFAULT_MIN_QUALITY
    assert stored_min_quality({}, "prompts") == DEFAULT_MIN_QUALITY
