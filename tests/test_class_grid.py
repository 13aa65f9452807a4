"""VOC/COCO class IoU (cdsam.evaluation.class_grid): every class on every image, so a model that fires on
every prompt is scored for it, where the figure over the sampled rows is not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cdsam.config.schema import DataConfig, PrepareConfig, SyntheticConfig
from cdsam.data.manifest import IGNORE
from cdsam.data.prepare import prepare
from cdsam.data.prepared import PreparedSplit
from cdsam.evaluation.class_grid import image_truths, score_class_grid
from cdsam.evaluation.metrics import SplitScores, pixel_counts, summarize


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> PreparedSplit:
    root = tmp_path_factory.mktemp("grid") / "prepared"
    cfg = PrepareConfig(synthetic=SyntheticConfig(num_images=40, image_size=32),
                        negatives_per_image=1)
    prepare(cfg, 0, root, show_progress=False, data=DataConfig(resize=32, crop=32))
    return PreparedSplit.open(root, "val")


def always_on(images: torch.Tensor, prompts) -> torch.Tensor:
    return torch.full((images.shape[0], len(prompts), *images.shape[-2:]), 5.0)


def test_an_always_on_model_is_scored_on_every_absent_class(split):
    vocab = sorted(set(split.prompts))
    grid = score_class_grid(split, vocab, always_on, pairs_per_call=7)  # chunks of one image
    # by hand: predicted = every valid pixel of every (image, class); truth = present masks
    rows = np.arange(len(split))
    masks = split.masks(rows)
    inter = {p: 0 for p in vocab}
    for i, m in enumerate(masks):
        inter[split.prompts[i]] += int((m == 1).sum())
    valid_any = {}
    for i, m in enumerate(masks):
        r = int(split.image_row[i])
        valid_any[r] = valid_any.get(r, np.zeros_like(m, bool)) | (m != IGNORE)
    union = {p: 0 for p in vocab}
    for r, v in valid_any.items():
        own = {split.prompts[i]: masks[i] for i in rows if split.image_row[i] == r}
        for p in vocab:
            union[p] += int((own[p] != IGNORE).sum()) if p in own else int(v.sum())
    expected = np.mean([inter[p] / union[p] for p in vocab])
    assert grid.images == len(valid_any) and grid.class_iou == pytest.approx(expected)

    # the same model over the sampled rows only (one drawn negative per image)
    scores = SplitScores()
    logits = always_on(torch.zeros(len(rows), 3, split.crop, split.crop), ["x"])
    target = torch.from_numpy((masks == 1).astype(np.float32)).unsqueeze(1)
    valid = torch.from_numpy((masks != IGNORE).astype(np.float32)).unsqueeze(1)
    scores.add(split.prompts, pixel_counts(logits, target, valid))
    sampled = summarize(scores.sums(vocab), vocab)["sampled_class_iou"]
    print(f"always-on model: sampled_class_iou {sampled:.3f}, class_iou {grid.class_iou:.3f}")
    assert sampled > 2 * grid.class_iou, (sampled, grid.class_iou)


def test_absent_classes_are_empty_truths_with_the_images_valid_pixels(split):
    vocab = sorted(set(split.prompts))
    samples = [i for i in range(len(split)) if split.image_row[i] == 0]
    truth, valid = image_truths(split, 0, samples, vocab)
    masks = split.masks(samples)
    present = {split.prompts[i]: m for i, m in zip(samples, masks, strict=True)}
    for k, p in enumerate(vocab):
        if p in present:
            np.testing.assert_array_equal(truth[k], present[p] == 1)
            np.testing.assert_array_equal(valid[k], present[p] != IGNORE)
        else:
            assert not truth[k].any()
            np.testing.assert_array_equal(valid[k], (masks != IGNORE).any(axis=0))
    assert len(present) < len(vocab)  # the image has absent classes to score


def test_class_grid_runs_in_the_evaluation_precision_a_batch_at_a_time(split, monkeypatch):
    """miou runs under the run's autocast; the class grid did in fp32. And with one class,
    ``evaluate.batch_size`` x 16 images went through DINO in one call."""
    from cdsam.evaluation import stage_score
    from cdsam.models.model import build_model
    from cdsam.runtime import Precision
    from tests.conftest import tiny_params

    params = tiny_params(evaluate={"batch_size": 2})
    model = build_model(params.model, seed=0).eval()
    seen: list[tuple[int, bool]] = []
    encode = model.encode_image

    def recording(x):
        seen.append((x.shape[0], torch.is_autocast_enabled("cpu")))
        return encode(x)

    monkeypatch.setattr(model, "encode_image", recording)
    one_class = split.prompts[0]
    monkeypatch.setattr(split, "prompts", [one_class] * len(split.prompts))
    bf16 = Precision(torch.device("cpu"), amp=True, dtype=torch.bfloat16)
    stage_score.class_grid(model, params, split, bf16)
    assert seen and all(n <= 2 and autocast for n, autocast in seen), seen
