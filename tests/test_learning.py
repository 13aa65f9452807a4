"""Does training learn, and does it learn from the text? A tiny stage-1 run on synthetic scenes
must pass a val mIoU threshold and beat the same run trained on shuffled prompts (each train
mask paired with another sample's text; val keeps the true prompts)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cdsam.config.schema import DataConfig, PrepareConfig, SyntheticConfig
from cdsam.data.prepare import prepare
from cdsam.data.prepared import read_samples
from cdsam.training.trainer import StagePaths, StageTrainer, TrainerOptions
from tests.conftest import tiny_params

SIZE = 48
EPOCHS = 8


def _data(tmp: Path, shuffle: bool) -> Path:
    out = tmp / ("shuffled" if shuffle else "true")
    prepare(PrepareConfig(synthetic=SyntheticConfig(num_images=160, image_size=SIZE),
                          val_fraction=0.25, test_fraction=0.0, negatives="none"),
            seed=0, out=out, show_progress=False, data=DataConfig(fit="crop", resize=SIZE, crop=SIZE))
    if shuffle:
        path = out / "samples.csv"
        df = read_samples(out)
        train = df.index[df["split"] == "train"]
        df.loc[train, "prompt"] = np.random.default_rng(0).permutation(
            df.loc[train, "prompt"].to_numpy())
        df.assign(negative=df["negative"].astype(int)).to_csv(path, index=False)
    return out


def _val_miou(data: Path, tmp: Path, epochs: int) -> float:
    p = tiny_params(device="cpu", seed=0,
                    model={"dino": {"img_size": SIZE, "patch_size": 8, "embed_dim": 32,
                                    "depth": 4, "num_heads": 2}},
                    data={"fit": "crop", "resize": SIZE, "crop": SIZE},
                    optim={"batch_size": 16, "lr": 3e-3, "lora_lr": 3e-3, "warmup_steps": 5},
                    train={"point_prompts": 0.0, "box_prompts": 0.0},  # the text alone
                    stage1={"epochs": epochs, "select": "last"})
    paths = StagePaths(data=data, out=tmp / "ckpt", metrics=tmp / "metrics",
                       resume=tmp / "resume")
    trainer = StageTrainer(p, 1, paths, TrainerOptions(show_progress=False))
    trainer.setup()
    return trainer.train()["miou"]


@pytest.mark.slow
def test_text_prompts_are_learned(tmp_path):
    learned = _val_miou(_data(tmp_path, False), tmp_path / "a", EPOCHS)
    shuffled = _val_miou(_data(tmp_path, True), tmp_path / "b", EPOCHS)
    print(f"val miou after {EPOCHS} epochs: {learned:.3f} with the true prompts, "
          f"{shuffled:.3f} with shuffled prompts")
    # Measured when written: 0.51 vs 0.22 (shuffled prompts learn "some object" only).
    assert learned > 0.35
    assert learned > shuffled + 0.15


@pytest.fixture(scope="module")
def stage_1_default_policy(tmp_path_factory) -> dict[str, float]:
    """Stage 1 as the default trains it: absent-object negatives, clicks and boxes next to the
    text, the default learning rates; its test-split metrics."""
    from cdsam.evaluation.report import evaluate_stages

    tmp = tmp_path_factory.mktemp("stage1")
    data = tmp / "data"
    prepare(PrepareConfig(synthetic=SyntheticConfig(num_images=240, image_size=SIZE),
                          val_fraction=0.2, test_fraction=0.2),
            seed=0, out=data, show_progress=False,
            data=DataConfig(fit="crop", resize=SIZE, crop=SIZE))
    p = tiny_params(device="cpu", seed=0,
                    model={"dino": {"img_size": SIZE, "patch_size": 8, "embed_dim": 32,
                                    "depth": 4, "num_heads": 2}},
                    data={"fit": "crop", "resize": SIZE, "crop": SIZE},
                    stage1={"epochs": 6})
    paths = StagePaths(data=data, out=tmp / "stage1", metrics=tmp / "metrics",
                       resume=tmp / "resume")
    trainer = StageTrainer(p, 1, paths, TrainerOptions(show_progress=False))
    trainer.setup()
    trainer.train()
    trainer.save()
    m = evaluate_stages(p, {"stage1": paths.out}, data, tmp / "eval",
                        tmp / "evaluate.json")["stage1"]
    print({k: round(m[k], 3) for k in ("miou", "miou_click", "miou_click_object", "miou_box",
                                       "class_iou", "fp_rate", "fp_rate_ungated", "pairs_overlap",
                                       "ap50", "presence_auroc")},
          {k: round(v, 3) for k, v in m["components"].items()})
    return m


@pytest.mark.slow
def test_stage_1_reads_the_text_under_the_default_sample_policy(stage_1_default_policy):
    """Two prompts of one scene must get different masks and an absent-object prompt must not
    always get one (before SAM's mask head trained, stage 1's masks ignored the text: the two
    masks of a pair overlapped ~0.93, fp_rate 1.0)."""
    m = stage_1_default_policy
    assert m["pairs"] > 20
    assert m["pairs_overlap"] < 0.7 and m["fp_rate"] < 0.95


@pytest.mark.slow
def test_a_click_or_a_box_next_to_the_text_lifts_the_mask(stage_1_default_policy):
    """SAM's premise: a click inside the object, and more so a box around it, beat the text
    alone. Measured when written (test mIoU text / click / box): 0.297 / 0.317 / 0.323 with
    sparse tokens only, 0.329 / 0.544 / 0.638 with the drawn map (`cdsam.models.prompt_map`,
    click radius 2 tokens; 0.301 / 0.429 / 0.624 at 0.75)."""
    m = stage_1_default_policy
    # A click now trains on the object under it: it lifts that object's mask above what the
    # text gives the class (scored against the class union it selects one object: lower).
    assert m["miou_click_object"] > m["miou"] + 0.06
    assert m["miou_box"] > m["miou"] + 0.15


@pytest.mark.slow
def test_stage_1_objects_beat_the_components_of_its_mask(stage_1_default_policy):
    """The instance heads' objects against the connected pieces of the same checkpoint's
    mask (the default's scenes hold 1-3 objects a class, often touching), and the presence
    gate removes absent-object masks the mask alone returns (measured when written, default
    stage 1: AP50 0.301 vs 0.113, fp_rate 0.333 vs 0.542 ungated)."""
    m = stage_1_default_policy
    assert m["ap50"] > m["components"]["ap50"]
    assert m["fp_rate"] < m["fp_rate_ungated"]
