"""Prompt ensembling (``prepare.prompt_templates``): prepared prompts, per-sample template draws,
the mean text feature in validation, evaluation and ``cdsam predict --class``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cdsam.config.schema import PrepareConfig, SyntheticConfig
from cdsam.data.prepare import prepare
from cdsam.data.templates import (
    PromptEnsembles,
    name_in,
    read_ensembles,
    template_draw,
)
from cdsam.errors import ConfigError, UserError
from cdsam.evaluation.pairs import attributes
from cdsam.inference.predictor import load_model
from cdsam.models.checkpoint import read_meta
from tests.conftest import tiny_params
from tests.test_train import _params, _trainer

TEMPLATES = ["a {}", "a photo of a {}", "a drawing of a {}"]


@pytest.fixture(scope="module")
def ensembled(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ens") / "prepared"
    cfg = PrepareConfig(val_fraction=0.25, test_fraction=0.0, negatives="none",
                        prompt_templates=TEMPLATES,
                        synthetic=SyntheticConfig(num_images=12, image_size=32))
    prepare(cfg, seed=0, out=out, show_progress=False, data=tiny_params().data)
    return out


def test_names_come_back_out_of_their_template():
    assert name_in("a photo of a {}", "a photo of a red circle") == "red circle"
    assert name_in("a photo of a {}", "a red circle") is None
    assert name_in("{} in a field", "a dog in a field") == "a dog"
    ens = PromptEnsembles.of_classes(TEMPLATES, ["dog"])
    assert ens.variants("a dog") == ["a dog", "a photo of a dog", "a drawing of a dog"]
    assert ens.variants("something else") == ["something else"]


def test_template_draws_are_seeded_and_cover_every_template():
    draws = [template_draw(0, 1, i, 3) for i in range(300)]
    assert draws == [template_draw(0, 1, i, 3) for i in range(300)]
    assert draws != [template_draw(0, 2, i, 3) for i in range(300)]
    assert np.bincount(draws, minlength=3).min() > 60


def test_prepare_writes_the_ensembles_beside_the_rows(ensembled):
    ens = read_ensembles(ensembled)
    assert ens is not None and ens.templates == TEMPLATES
    index = json.loads((ensembled / "index.json").read_text())
    assert "prompts.json" in index["files"]  # hashed: the stages' resume key sees it
    prompts = set(pd.read_csv(ensembled / "samples.csv")["prompt"])
    assert prompts <= set(ens.names) and all(p.startswith("a ") for p in prompts)
    assert attributes("a photo of a red circle") == ("red", "circle")


def test_one_template_writes_nothing_more(tmp_path):
    cfg = PrepareConfig(val_fraction=0.25, test_fraction=0.0, negatives="none",
                        synthetic=SyntheticConfig(num_images=6, image_size=32))
    prepare(cfg, seed=0, out=tmp_path / "p", show_progress=False, data=tiny_params().data)
    assert read_ensembles(tmp_path / "p") is None


def test_bad_templates_are_one_line():
    with pytest.raises(ConfigError, match=r"prepare\.prompt_templates: must be a non-empty"):
        tiny_params(prepare={"prompt_templates": ["a photo"]})
    with pytest.raises(ConfigError, match=r"prepare\.prompt_templates: must be distinct"):
        tiny_params(prepare={"prompt_templates": ["a {}", "a {}"]})


@pytest.fixture(scope="module")
def trained(ensembled, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    t = _trainer(_params(stage1={"epochs": 2}), 1, ensembled, tmp)
    t.setup()
    t.train()
    t.save()
    return t, tmp / "stage1"


def test_training_shows_every_template_and_validation_their_mean(trained):
    trainer, _ = trained
    assert len(trainer.template_draws) == 3 and min(trainer.template_draws) > 0
    assert sum(trainer.template_draws) == 2 * len(trainer.train_set)
    tower, obj = trainer.model.clip_text, trainer.objective
    prompt = obj.vocab[0]
    texts = obj.ensembles.variants(prompt)
    mean = torch.nn.functional.normalize(tower(texts).mean(0), dim=-1)
    torch.testing.assert_close(obj.vocab_feats[0], mean)
    assert not torch.allclose(obj.vocab_feats[0], tower([prompt])[0])


def test_the_checkpoint_carries_the_ensembles_and_predict_class_uses_them(trained):
    _, out = trained
    assert read_meta(out).extra["prompt_ensembles"]["templates"] == TEMPLATES
    predictor = load_model(out)
    prompt = predictor.class_prompt("green triangle")
    assert prompt == "a green triangle"
    feats = predictor.text_features([prompt, "a green triangle, literally"])
    tower = predictor.model.clip_text
    mean = torch.nn.functional.normalize(
        tower(["a green triangle", "a photo of a green triangle",
               "a drawing of a green triangle"]).mean(0), dim=-1)
    torch.testing.assert_close(feats[0], mean)
    torch.testing.assert_close(feats[1], tower(["a green triangle, literally"])[0])


def test_predict_class_without_templates_is_one_line(tmp_path):
    from tests.conftest import prepare_tiny

    data = prepare_tiny(tmp_path / "prepared", num_images=6)
    t = _trainer(_params(stage1={"epochs": 1}), 1, data, tmp_path)
    t.setup()
    t.train()
    t.save()
    with pytest.raises(UserError, match=r"--class dog: the checkpoint was trained with one"):
        load_model(tmp_path / "stage1").class_prompt("dog")
