"""The stage table is the one place a stage rule lives: dvc.yaml's params lists, `cdsam summary`
and the trainer all follow a change to it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from cdsam.cli import summarize_stage
from cdsam.config.stages import (
    STAGE_TABLE,
    StageRule,
    curriculum_to,
    plan_stage,
    stage_keys,
    stages,
)
from cdsam.training.trainer import StagePaths, StageTrainer, TrainerOptions
from tests.conftest import TINY, prepare_tiny, tiny_params

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("dvc_yaml_tool", REPO / "tools" / "dvc_yaml.py")
dvc_yaml = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dvc_yaml)

# Stage 1 trains DINO adapters too: a rule no shipped table has.
STAGE1_WITH_DINO_LORA = StageRule(1, dino="lora", parent=None)


@pytest.fixture
def params_file(tmp_path) -> str:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return str(path)


def test_the_plan_reads_what_the_rule_says():
    p = tiny_params(stage3={"epochs": 2, "lr": 1e-4}, stage4={"epochs": 1, "sam_mode": "full"})
    plans = {n: plan_stage(p, n) for n in stages()}
    assert [plans[n].parent for n in stages()] == [None, 1, 2, 3]
    assert plans[1].lora_dino is None and plans[4].lora_dino is None
    assert plans[2].lora_dino == p.lora.dino == plans[3].lora_dino
    assert plans[3].optim.lr == 1e-4 and plans[3].epochs == 2
    assert plans[4].sam_mode == "full" and plans[3].sam_mode == "lora"
    assert [x.stage for x in curriculum_to(p, 4)] == [1, 2, 3, 4]


def test_dvc_yaml_summary_and_trainer_follow_the_table(monkeypatch, params_file, tmp_path):
    monkeypatch.setattr(dvc_yaml, "code_deps", lambda script: [script])  # no subprocesses
    before = yaml.safe_load(dvc_yaml.render())["stages"]
    assert "lora.dino" not in before["stage1"]["params"]
    assert summarize_stage(params_file, 1)["dino_lora"]["total"] == 0

    monkeypatch.setitem(STAGE_TABLE, 1, STAGE1_WITH_DINO_LORA)
    after = yaml.safe_load(dvc_yaml.render())["stages"]
    assert after["stage1"]["params"] == stage_keys(1)
    assert "lora.dino" in after["stage1"]["params"]
    counts = summarize_stage(params_file, 1)
    assert counts["dino_lora"]["trainable"] == counts["dino_lora"]["total"] > 0

    data = prepare_tiny(tmp_path / "prepared", num_images=4)
    paths = StagePaths(data=data, out=tmp_path / "stage1", metrics=tmp_path / "metrics",
                       resume=tmp_path / "resume")
    trainer = StageTrainer(tiny_params(device="cpu"), 1, paths,
                           TrainerOptions(show_progress=False))
    trainer.setup()
    assert trainer.plan.lora_dino is not None
    assert trainer.counts["dino_lora"]["trainable"] > 0


def test_a_new_parent_reaches_the_pipeline_and_the_summary(monkeypatch, params_file):
    """Stage 3 straight from stage 1: dvc.yaml's deps and the summary's replay follow."""
    monkeypatch.setattr(dvc_yaml, "code_deps", lambda script: [script])
    monkeypatch.setitem(STAGE_TABLE, 3, StageRule(3, dino="lora", parent=1))
    deps = yaml.safe_load(dvc_yaml.render())["stages"]["stage3"]["deps"]
    assert "models/stage1" in deps and "models/stage2" not in deps
    assert [x.stage for x in curriculum_to(tiny_params(), 4)] == [1, 3, 4]
    assert summarize_stage(params_file, 3)["dino_lora"]["trainable"] > 0
