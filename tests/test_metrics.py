"""Split scores: per-sample mIoU on positives, per-class IoU, negatives' false positives."""

import numpy as np
import pytest
import torch

from cdsam.evaluation.metrics import SplitScores, per_prompt, pixel_counts, summarize

BIG = 20.0  # a logit that thresholds to certainly-on (or, negated, off)


def _logits(pred: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.where(pred, BIG, -BIG)).float()[None, None]


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.float32))[None, None]


def test_counts_skip_ignore_pixels():
    pred = np.zeros((4, 4), bool)
    pred[:2] = True  # 8 predicted
    truth = np.zeros((4, 4))
    truth[1:3] = 1  # 8 true, 4 shared
    valid = np.ones((4, 4))
    valid[0] = 0  # the first row (4 predicted, 0 true) is ignore
    counts = pixel_counts(_logits(pred), _t(truth), _t(valid))
    assert counts[0].tolist() == [4.0, 4.0, 8.0, 12.0]
    s = SplitScores()
    s.add(["a"], counts)
    row = s.frame().iloc[0]
    assert row["iou"] == pytest.approx(4 / 8) and row["dice"] == pytest.approx(8 / 12)


def test_positive_miou_sampled_class_iou_and_negative_false_positives():
    s = SplitScores()
    ones = np.ones((4, 4))
    a = np.zeros((4, 4))
    a[:2] = 1  # 8 px
    # "cat": a perfect positive, and a negative where 4 px are predicted (a false positive)
    fp = np.zeros((4, 4), bool)
    fp[0] = True
    # "dog": a positive half found, and a negative correctly empty
    half = np.zeros((4, 4), bool)
    half[0] = True
    batch = [(_logits(a > 0), _t(a)), (_logits(fp), _t(0 * a)), (_logits(half), _t(a)),
             (_logits(np.zeros((4, 4), bool)), _t(0 * a))]
    counts = torch.cat([pixel_counts(lg, t, _t(ones)) for lg, t in batch])
    vocab = ["cat", "dog"]
    s.add(["cat", "cat", "dog", "dog"], counts)
    f = summarize(s.sums(vocab), vocab)
    assert f["positives"] == 2 and f["negatives"] == 2
    assert f["miou"] == pytest.approx((1.0 + 0.5) / 2)
    # cat: I 8, U 8 + 4 (the negative's predicted pixels); dog: I 4, U 8
    assert f["sampled_class_iou"] == pytest.approx((8 / 12 + 4 / 8) / 2)
    assert f["fp_rate"] == pytest.approx(0.5)
    assert f["neg_area"] == pytest.approx((4 / 16 + 0) / 2)
    rows = per_prompt(s).set_index("prompt")
    assert rows.loc["cat", "fp_rate"] == 1.0 and rows.loc["dog", "fp_rate"] == 0.0
    assert rows.loc["dog", "miou"] == pytest.approx(0.5)


def test_sums_add_over_ranks():
    """Two shards summed give the figures of the whole split (what all_reduce does)."""
    rng = np.random.default_rng(0)
    vocab = ["a", "b", "c"]
    whole, shards = SplitScores(), [SplitScores(), SplitScores()]
    for i in range(12):
        pred = rng.random((6, 6)) > 0.5
        truth = (rng.random((6, 6)) > 0.6) * (i % 3 != 0)  # every third sample a negative
        c = pixel_counts(_logits(pred), _t(truth), _t(np.ones((6, 6))))
        p = [vocab[i % 3]]
        whole.add(p, c)
        shards[i % 2].add(p, c)
    total = np.add(shards[0].sums(vocab), shards[1].sums(vocab)).tolist()
    assert summarize(total, vocab) == pytest.approx(summarize(whole.sums(vocab), vocab))


def test_lr_schedule_warmup_then_cosine_to_the_floor():
    from cdsam.training.optim import lr_lambda

    fn = lr_lambda(total_steps=110, warmup=10, min_ratio=0.05)
    assert fn(0) == pytest.approx(0.1) and fn(9) == pytest.approx(1.0)  # linear warmup
    assert fn(10) == pytest.approx(1.0)  # cosine starts at the top
    assert fn(60) == pytest.approx(0.05 + 0.95 * 0.5)  # halfway
    assert fn(110) == pytest.approx(0.05) and fn(500) == pytest.approx(0.05)  # the floor


def test_dice_and_bce_values():
    from cdsam.models.losses import bce_loss, dice_loss

    target = torch.tensor([[[[1.0, 0.0]]]])
    valid = torch.ones_like(target)
    logits = torch.tensor([[[[0.0, 0.0]]]])  # p = 0.5 everywhere
    # soft Dice with eps 1: 1 - (2 * 0.5 + 1) / (1.0 + 1 + 1)
    assert dice_loss(logits, target, valid).item() == pytest.approx(1 - 2 / 3)
    assert bce_loss(logits, target, valid).item() == pytest.approx(np.log(2))
    valid[..., 1] = 0  # an ignore pixel counts nowhere
    assert bce_loss(torch.tensor([[[[0.0, -50.0]]]]), target, valid).item() == \
        pytest.approx(np.log(2))


def test_prompt_pairs_split_overlap_by_what_the_prompts_share():
    import torch

    from cdsam.evaluation.pairs import PairOverlaps, pair_relation, prompt_pairs

    assert pair_relation("a red circle", "a red square") == "same_colour"
    assert pair_relation("a red circle", "a blue circle") == "same_shape"
    assert pair_relation("a red circle", "a blue square") is None
    assert pair_relation("a photo of a cat", "a photo of a dog") is None
    a = torch.zeros(4, 4, dtype=torch.bool)
    a[:2] = True
    b = a.clone()
    c = ~a
    overlaps = PairOverlaps([(0, 1), (0, 2), (1, 2)])
    for row, mask in enumerate([a, b, c]):
        overlaps.add(row, mask)
    prompts = ["a red circle", "a red square", "a blue circle"]
    out = prompt_pairs(overlaps, [1.0, 0.5, 0.0], prompts)
    assert out["pairs"] == 3 and out["pairs_miou"] == 0.5
    assert out["pairs_overlap_same_colour"] == 1.0  # identical masks for two colours' words
    assert out["pairs_overlap_same_shape"] == 0.0
    assert abs(out["pairs_overlap"] - 1 / 3) < 1e-9


def test_clip_align_loss_skips_empty_masks_without_indexing():
    """Rows whose mask is empty on the grid are weighted out: the value and the gradients are
    the cross-entropy over the other rows alone; a batch with none left gives 0."""
    import torch.nn.functional as F

    from cdsam.models.losses import clip_align_loss

    g = torch.Generator().manual_seed(0)
    projected = torch.randn(3, 4, 8, generator=g, requires_grad=True)  # B x (2x2 grid) x D
    vocab = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    labels = torch.tensor([1, 3, 4])
    target = torch.zeros(3, 1, 8, 8)
    target[0, :, :4, :4] = 1
    target[2, :, 4:, :] = 1  # row 1 stays empty
    valid = torch.ones_like(target)
    loss = clip_align_loss(projected, (2, 2), target, valid, vocab, labels, 0.07)
    loss.backward()
    weights = F.adaptive_avg_pool2d(target, (2, 2)).flatten(1)
    ref_in = projected.detach().clone().requires_grad_(True)
    pooled = F.normalize((weights.unsqueeze(-1) * ref_in).sum(1) / weights.sum(1, keepdim=True)
                         .clamp_min(1e-6), dim=-1)
    keep = torch.tensor([0, 2])
    ref = F.cross_entropy(pooled[keep] @ vocab.t() / 0.07, labels[keep])
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert torch.allclose(projected.grad, ref_in.grad, atol=1e-6)
    assert projected.grad[1].abs().max() == 0

    none_left = clip_align_loss(projected, (2, 2), torch.zeros_like(target), valid, vocab,
                                labels, 0.07)
    none_left.backward()  # still part of the graph
    assert none_left.item() == 0.0


def test_pair_overlaps_hold_one_image_of_masks_at_a_time():
    """Scored as the rows come: the most masks held at once is one image's positives, however
    many images the split has, and the figures are those of every mask kept."""
    import pandas as pd
    import torch

    from cdsam.evaluation.pairs import PairOverlaps, pair_rows

    rng = np.random.default_rng(0)
    images = 200
    samples = pd.DataFrame({"image": np.repeat([f"im{i:03d}" for i in range(images)], 4),
                            "negative": np.tile([False, False, False, True], images)})
    pairs = pair_rows(samples)
    masks = [torch.from_numpy(rng.random((8, 8)) > 0.5) for _ in range(len(samples))]
    overlaps = PairOverlaps(pairs)
    for row, mask in enumerate(masks):
        overlaps.add(row, mask)
    assert overlaps.peak == 3 and not overlaps.live
    expected = [((masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()).item()
                for a, b in pairs]
    assert overlaps.overlaps == pytest.approx(expected)
