"""The CLIP text tower tuned in a stage (``stageN.clip: lora | full``): weight-space LoRA math,
gradients, merge, checkpoints, resume, DDP and the text-drift guard."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from cdsam.config.schema import ClipLoraConfig, SamLoraConfig
from cdsam.errors import ConfigError, UserError
from cdsam.evaluation.stage_score import checkpoint_drift
from cdsam.evaluation.text_drift import TextDrift, feature_drift, general_prompts, tower_is_base
from cdsam.models.checkpoint import load_checkpoint, read_meta, read_state
from cdsam.models.delta_base import Base
from cdsam.models.lora import LoRAWeight, has_lora, lora_weights, merge_lora
from cdsam.models.model import build_model
from cdsam.training.curriculum import apply_stage, clip_lora_targets, component_counts
from tests.conftest import prepare_tiny, tiny_params
from tests.test_train import _ddp_worker, _free_port, _params, _train_and_save, _trainer

PROMPTS = ["a red circle", "a blue square", "a photo of a dog"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return prepare_tiny(tmp_path_factory.mktemp("data") / "prepared")


def _model(clip_mode: str = "lora"):
    params = tiny_params()
    model = build_model(params.model, load_weights=False, seed=0)
    base = Base.of(model, 0)
    apply_stage(model, 1, SamLoraConfig(), clip_mode=clip_mode, clip_lora=ClipLoraConfig())
    return model, base


def test_weight_lora_is_the_low_rank_update_and_starts_as_the_identity():
    w = torch.randn(12, 5)
    lora = LoRAWeight(w, rank=2, alpha=4.0)
    assert torch.equal(lora(w), w)  # B = 0
    with torch.no_grad():
        lora.lora_B.normal_()
    torch.testing.assert_close(lora(w), w + 2.0 * lora.lora_B @ lora.lora_A)


def test_clip_lora_sits_on_attention_and_mlp_weights_and_counts_apart():
    model, _ = _model()
    fresh = build_model(tiny_params().model, load_weights=False, seed=0)
    found = [n for n, _ in lora_weights(model)]
    assert found == clip_lora_targets(fresh, ClipLoraConfig())
    depth = len(model.clip_text.clip.transformer.resblocks)
    assert len(found) == 4 * depth
    assert sum(n.endswith("attn.in_proj_weight") for n in found) == depth
    assert sum(n.endswith("mlp.c_fc.weight") for n in found) == depth
    counts = component_counts(model)
    assert counts["clip_lora"]["trainable"] == counts["clip_lora"]["total"] > 0
    assert counts["clip_text"]["trainable"] == 0


def test_clip_lora_gets_gradients_and_the_base_tower_does_not_move():
    model, _ = _model()
    tower = model.clip_text
    before = {k: v.clone() for k, v in tower.state_dict().items() if "lora_" not in k}
    lora = [p for n, p in tower.named_parameters() if "lora_" in n]
    opt = torch.optim.SGD(lora, lr=1.0)
    tower.train()
    assert tower.tuning
    feats = tower(PROMPTS)
    assert feats.requires_grad
    (feats * torch.randn_like(feats)).sum().backward()
    grads = [p.grad for n, p in tower.named_parameters() if n.endswith("lora_B")]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for n, p in tower.named_parameters() if "lora_" not in n)
    opt.step()
    after = {k: v for k, v in tower.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(before[k], after[k]) for k in before)
    tower.eval()
    assert not tower.tuning
    assert feature_drift(tower(PROMPTS), feats.detach()) > 0  # the adapters moved the features


def test_clip_lora_merge_is_exact():
    model, _ = _model()
    tower = model.clip_text
    with torch.no_grad():
        for _, w in lora_weights(tower):
            w.lora_B.normal_(std=0.05)
    tower.clear_cache()
    with_lora = tower(PROMPTS)
    assert merge_lora(tower) == 8 and not has_lora(tower)
    tower.clear_cache()
    torch.testing.assert_close(tower(PROMPTS), with_lora, rtol=0, atol=1e-6)


def test_drift_of_a_tower_whose_lora_b_is_zero_is_zero():
    model, _ = _model()
    fresh = build_model(tiny_params().model, load_weights=False, seed=0).clip_text
    drift = TextDrift.against(fresh, PROMPTS, general_prompts()[:20])
    assert not tower_is_base(model.clip_text, None)
    assert drift.measure(model.clip_text) == {"text_drift": 0.0, "text_drift_general": 0.0}
    with torch.no_grad():
        for _, w in lora_weights(model.clip_text):
            w.lora_B.normal_(std=0.05)
    model.clip_text.clear_cache()
    moved = drift.measure(model.clip_text)
    assert 0 < moved["text_drift"] < 1 and 0 < moved["text_drift_general"] < 1


def test_frozen_tower_is_its_base():
    model, base = _model("frozen")
    assert tower_is_base(model.clip_text, base)
    with torch.no_grad():
        model.clip_text.clip.ln_final.weight.add_(1e-3)
    assert not tower_is_base(model.clip_text, base)


def test_bad_clip_mode_and_drift_bound_are_one_line_each():
    with pytest.raises(ConfigError, match=r"stage4\.clip: must be one of frozen, lora, full"):
        tiny_params(stage4={"clip": "half"})
    with pytest.raises(ConfigError, match=r"stage2\.max_text_drift: bounds best-epoch"):
        tiny_params(stage2={"max_text_drift": 0.1, "select": "last"})
    with pytest.raises(ConfigError, match=r"lora\.clip\.rank: must be >= 1"):
        tiny_params(lora={"clip": {"rank": 0}})


def test_lora_targets_that_match_nothing_name_the_key(data_dir, tmp_path):
    p = _params(stage1={"epochs": 1, "clip": "lora"}, lora={"clip": {"targets": ["nothing"]}})
    with pytest.raises(UserError, match=r"lora\.clip\.targets: no attention or linear layer"):
        _trainer(p, 1, data_dir, tmp_path).setup()


# --------------------------------------------------------------------------- a stage tuning it


@pytest.fixture(scope="module")
def lora_stage(data_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    p = _params(stage1={"epochs": 2, "clip": "lora"})
    t = _trainer(p, 1, data_dir, tmp)
    t.setup()
    summary = t.train()
    t.save()
    return t, summary, tmp / "stage1"


def test_a_lora_stage_trains_the_adapters_and_reports_drift(lora_stage):
    trainer, summary, out = lora_stage
    assert [g["name"] for g in trainer.optimizer.param_groups] == ["base", "lora", "clip"]
    assert trainer.optimizer.param_groups[2]["initial_lr"] == pytest.approx(1e-4)
    assert summary["text_drift"] > 0 and summary["text_drift_general"] > 0
    assert all(row["text_drift"] > 0 for row in trainer.history)
    state = read_state(out)
    clip_keys = [k for k in state if k.startswith("clip_text.")]
    assert clip_keys and all("lora_" in k for k in clip_keys)  # only the adapters are stored
    assert any(s["name"].startswith("clip_text.") for s in read_meta(out).lora)


def test_the_checkpoint_rebuilds_the_tuned_tower_and_evaluate_measures_it(lora_stage):
    trainer, summary, out = lora_stage
    model, meta = load_checkpoint(out)
    drift = checkpoint_drift(model, meta, general_prompts())
    assert drift["text_drift"] == pytest.approx(summary["text_drift"], abs=1e-6)
    assert drift["text_drift_general"] == pytest.approx(summary["text_drift_general"], abs=1e-6)


def test_frozen_stages_report_zero_drift_exactly(data_dir, tmp_path):
    t = _trainer(_params(stage1={"epochs": 1}), 1, data_dir, tmp_path)
    t.setup()
    summary = t.train()
    t.save()
    assert summary["text_drift"] == 0.0 and summary["text_drift_general"] == 0.0
    assert not any(k.startswith("clip_text.") for k in read_state(tmp_path / "stage1"))
    model, meta = load_checkpoint(tmp_path / "stage1")
    assert checkpoint_drift(model, meta, ["a photo of a cat"]) == \
        {"text_drift": 0.0, "text_drift_general": 0.0}


def test_a_frozen_child_inherits_the_tuned_tower(lora_stage, data_dir, tmp_path):
    _, summary, parent = lora_stage
    p = _params(stage2={"epochs": 1})
    child = _trainer(p, 2, data_dir, tmp_path, parent=parent)
    child.setup()
    kept = child.train()
    assert child.counts["clip_lora"]["trainable"] == 0 and child.counts["clip_lora"]["total"] > 0
    # Measured against the rebuilt base: the parent's drift, unchanged by a frozen stage.
    assert kept["text_drift"] == pytest.approx(summary["text_drift"], abs=1e-6)


def test_full_mode_trains_the_whole_tower_at_clip_lr(data_dir, tmp_path):
    p = _params(stage1={"epochs": 1, "clip": "full", "clip_lr": 3e-5})
    t = _trainer(p, 1, data_dir, tmp_path)
    t.setup()
    assert t.optimizer.param_groups[-1]["name"] == "clip"
    assert t.optimizer.param_groups[-1]["initial_lr"] == pytest.approx(3e-5)
    assert t.optimizer.param_groups[-1]["weight_decay"] == 0.0
    summary = t.train()
    t.save()
    assert summary["text_drift"] > 0
    stored = [k for k in read_state(tmp_path / "stage1") if k.startswith("clip_text.")]
    assert "clip_text.clip.transformer.resblocks.0.attn.in_proj_weight" in stored
    assert "clip_text.clip.logit_scale" not in stored  # unused by text encoding: not trained


def test_max_text_drift_skips_every_epoch_beyond_it(data_dir, tmp_path):
    p = _params(stage1={"epochs": 1, "clip": "lora", "max_text_drift": 0.0})
    t = _trainer(p, 1, data_dir, tmp_path)
    t.setup()
    with pytest.raises(UserError, match=r"stage1\.max_text_drift: every epoch drifted beyond"):
        t.train()
    assert not (tmp_path / "stage1").exists()


def test_resume_with_clip_lora_is_bit_exact(data_dir, tmp_path, caplog):
    p = _params(stage1={"epochs": 2, "clip": "lora", "select": "last"})
    straight = _train_and_save(_trainer(p, 1, data_dir, tmp_path / "a"))
    first = _trainer(p, 1, data_dir, tmp_path / "b")
    first.setup()
    first.train(stop_after=1)
    with caplog.at_level(logging.INFO, logger="cdsam"):
        resumed = _train_and_save(_trainer(p, 1, data_dir, tmp_path / "b"))
    assert "resuming stage1 from epoch 1/2" in caplog.text
    assert resumed == straight


def test_ddp_with_clip_lora_matches_one_process(data_dir, tmp_path):
    over = {"stage1": {"epochs": 1, "clip": "lora"}}
    mp.start_processes(_ddp_worker, args=(2, _free_port(), str(data_dir), str(tmp_path), 1, None,
                                          over), nprocs=2, join=True, start_method="spawn")
    r0 = load_file(str(tmp_path / "rank0.safetensors"))
    r1 = load_file(str(tmp_path / "rank1.safetensors"))
    clip = [k for k in r0 if k.startswith("clip_text.")]
    assert clip and all(torch.equal(r0[k], r1[k]) for k in r0)
    single = _trainer(_params(optim={"batch_size": 4, "warmup_steps": 1},
                              stage1={"epochs": 1, "clip": "lora"}), 1, data_dir,
                      tmp_path / "single")
    single.setup()
    before = single.trainable_state()
    single.train()
    ref = single.trainable_state()
    assert max(float((ref[k] - before[k]).abs().max()) for k in clip) > 0  # the adapters moved
    worst = max(float((ref[k] - r0[k]).abs().max()) for k in ref)
    assert worst < 1e-4, worst
