"""Real photographs and micrographs from ../shared/real-data (skipped when absent)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cdsam.config.schema import DataConfig, PrepareConfig
from cdsam.data.geometry import BACKGROUND_LOGIT
from cdsam.data.manifest import FOREGROUND, IGNORE
from cdsam.data.prepare import prepare
from cdsam.data.prepared import read_samples
from cdsam.inference.predictor import load_model
from cdsam.training.trainer import StagePaths, StageTrainer, TrainerOptions
from tests.conftest import prepared_arrays, real_data, tiny_params


def test_em_slices_prepare_as_binary_folders(tmp_path):
    em = real_data("isbi2012-em")
    cfg = PrepareConfig(source="folders", images=str(em / "images"), masks=str(em / "masks"),
                        prompt="a cell", val_fraction=0.2, test_fraction=0.2)
    summary = prepare(cfg, 0, tmp_path / "p", show_progress=False,
                      data=DataConfig(fit="pad", crop=512))
    assert summary["images"] == 30 and summary["test_samples"] == 6
    df = read_samples(tmp_path / "p")
    masks, images = prepared_arrays(tmp_path / "p")
    m = masks[df["id"][0]]
    assert m.shape == (512, 512) and set(np.unique(m)) == {0, FOREGROUND}
    image = images[df["image"][0]]
    assert image.shape == (3, 512, 512) and (image[0] == image[2]).all()  # grey → RGB


def test_voc_photos_with_negatives(tmp_path):
    voc = real_data("voc-samples")
    cfg = PrepareConfig(source="voc", root=str(voc), negatives="absent", negatives_per_image=2,
                        val_fraction=0.3)
    summary = prepare(cfg, 0, tmp_path / "p", show_progress=False)
    assert summary["images"] == 14 and summary["negative_samples"] == 28
    df = read_samples(tmp_path / "p")
    neg = prepared_arrays(tmp_path / "p")[0][df.loc[df["negative"], "id"].iloc[0]]
    assert IGNORE in neg and FOREGROUND not in neg  # borders stay ignore in a negative


@pytest.fixture(scope="module")
def voc_pad_stage1(tmp_path_factory):
    """Stage 1 on the VOC photos: pad fit, augmentation, negatives, a test split."""
    voc = real_data("voc-samples")
    root = tmp_path_factory.mktemp("voc")
    cfg = PrepareConfig(source="voc", root=str(voc), negatives="absent", val_fraction=0.25,
                        test_fraction=0.15)
    params = tiny_params(device="cpu", data={"fit": "pad", "resize": 32, "crop": 32,
                                             "augment": {"enable": True}},
                         optim={"batch_size": 4, "warmup_steps": 1}, stage1={"epochs": 2})
    prepare(cfg, 0, root / "prepared", show_progress=False, data=params.data)
    paths = StagePaths(data=root / "prepared", out=root / "stage1", metrics=root / "metrics",
                       resume=root / "resume")
    trainer = StageTrainer(params, 1, paths, TrainerOptions(show_progress=False))
    trainer.setup()
    summary = trainer.train()
    trainer.save()
    return root, summary


def test_real_photos_train_with_pad_and_augmentation(voc_pad_stage1):
    _, summary = voc_pad_stage1
    assert summary["selected_epoch"] in (1, 2)
    for key in ("miou", "sampled_class_iou", "fp_rate", "loss"):
        assert np.isfinite(summary[key])


def test_pad_prediction_covers_a_wide_image(voc_pad_stage1, tmp_path):
    root, _ = voc_pad_stage1
    photo = Image.open(sorted((real_data("voc-samples") / "JPEGImages").glob("*.jpg"))[0])
    wide = Image.new("RGB", (photo.width * 2, photo.height))
    wide.paste(photo, (0, 0))
    wide.paste(photo, (photo.width, 0))
    pred = load_model(root / "stage1").predict(wide, ["a photo of a person", "a photo of a cat"],
                                               return_logits=True)
    assert pred.masks.shape == (2, wide.height, wide.width)
    # every pixel, the outer thirds included, has a model logit (not the "unseen" fill)
    assert (torch.from_numpy(pred.logits) > BACKGROUND_LOGIT / 2).all()
