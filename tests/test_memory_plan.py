"""``cdsam plan``: parameter, optimizer and activation bytes per stage, before anything runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cdsam.cli import build_parser
from cdsam.config.parse import parse_params
from cdsam.training.memory_plan import parse_bytes, plan_memory
from tests.conftest import TINY

GIB = 2**30
PROBE = Path(__file__).with_name("activation_probe.py")


def plan(*argv: str) -> None:
    args = build_parser().parse_args(["plan", *argv])
    args.func(args)


def _data(**over) -> dict:
    data = {k: dict(v) for k, v in TINY.items()}
    data.update(over)
    return data


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_estimate_is_within_a_quarter_of_the_measured(checkpointing):
    """Stage 4 (all of DINO trains) of a 96-wide ViT at 64 px, batch 32, fp32 on the CPU."""
    data = _data(model={"dino": {"img_size": 64, "patch_size": 8, "embed_dim": 96, "depth": 4,
                                 "num_heads": 2}}, data={"resize": 64, "crop": 64})
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, str(PROBE), json.dumps(data), "4", "32",
                          str(int(checkpointing))], env=env, capture_output=True, text=True,
                         check=True)
    measured = json.loads(run.stdout.strip().splitlines()[-1])["per_image"]
    estimate = plan_memory(parse_params(data), 4, amp=False).activations_per_image(checkpointing)
    assert abs(estimate - measured) <= 0.25 * measured, (estimate, measured)


def _measure(data: dict, stage: int, batch: int, checkpointing: bool, amp: bool) -> int:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, str(PROBE), json.dumps(data), str(stage), str(batch),
                          str(int(checkpointing)), str(int(amp))], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])["bytes"]


@pytest.mark.parametrize("stage", [1, 4])
def test_activation_estimate_under_bf16_autocast_is_within_a_quarter(stage):
    """The CPU's bf16 autocast, frozen weights held as the trainer holds them: per image is
    the growth from 16 to 32 images (autocast's weight copies do not grow with the batch)."""
    data = _data(model={"dino": {"img_size": 64, "patch_size": 8, "embed_dim": 96, "depth": 4,
                                 "num_heads": 2}}, data={"resize": 64, "crop": 64},
                 train={"feature_cache": False})
    measured = (_measure(data, stage, 32, False, True) - _measure(data, stage, 16, False, True)
                ) / 16
    estimate = plan_memory(parse_params(data), stage, amp=True).activations_per_image(False)
    assert abs(estimate - measured) <= 0.25 * measured, (estimate, measured)


def test_per_image_activations_do_not_depend_on_the_probe_batch():
    """Under AMP the weight copies are a fixed term, not activations divided by the probe's
    images (which overstated them and understated the largest batch)."""
    from cdsam.training import memory_plan

    p = parse_params(_data())
    got = []
    for probes in ((2, 4), (4, 8)):
        memory_plan.PROBE_IMAGES = probes
        try:
            got.append(plan_memory(p, 1, amp=True))
        finally:
            memory_plan.PROBE_IMAGES = (2, 4)
    assert got[0].activations == got[1].activations
    assert got[0].saved_fixed == got[1].saved_fixed and got[0].saved_fixed["plain"] > 0


def test_frozen_bytes_are_what_the_trainer_holds():
    """Under AMP the plan counts the frozen weights as `hold_for_stage` leaves them (bf16
    linears, fp32 text tower, norms and embeddings), on the real model."""
    import torch

    from cdsam.config.stages import curriculum_to
    from cdsam.models.model import build_model
    from cdsam.runtime import Precision
    from cdsam.training.curriculum import apply_plan
    from cdsam.training.frozen_weights import hold_for_stage

    p = parse_params(_data())
    for stage in (1, 2, 4):
        model = build_model(p.model, seed=0)
        for step in curriculum_to(p, stage):
            apply_plan(model, step)
        hold_for_stage(model, None, Precision(torch.device("cpu"), True, torch.bfloat16))
        held = sum(q.numel() * q.element_size() for q in model.parameters()
                   if not q.requires_grad)
        assert plan_memory(p, stage, amp=True).frozen_weights == held, stage


def test_counts_follow_the_stage_and_the_knobs():
    p = parse_params(_data())
    m1, m4 = plan_memory(p, 1), plan_memory(p, 4)
    assert m4.trainable_params > m1.trainable_params
    assert m4.optimizer == 8 * m4.trainable_params and m4.gradients == 4 * m4.trainable_params
    assert m1.start_block == 4 and m1.feature_cache > 0  # DINO frozen: all of it is cached
    assert m4.start_block == 0 and m4.feature_cache == 0
    assert m4.activations["checkpointed"] < m4.activations["plain"]
    part = plan_memory(parse_params(_data(stage4={"epochs": 1, "dino_trainable_blocks": 1})), 4)
    assert part.trainable_params < m4.trainable_params and part.start_block == 3


@pytest.mark.slow
def test_7b_stage4_needs_fsdp(tmp_path, capsys):
    """DINOv3 ViT-7B at 224: stage 4 does not fit one 80 GB GPU under DDP, and fits 8 under
    FSDP (with activation checkpointing)."""
    data = _data(model={"dino": {"name": "vit_7b_patch16_dinov3", "img_size": 224}},
                 data={"resize": 224, "crop": 224},
                 train={"activation_checkpointing": True})
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    plan("--params", str(path), "--gpu-memory", "80GB", "--gpus", "8", "--json")
    s4 = json.loads(capsys.readouterr().out)["stages"]["stage4"]
    assert s4["trainable_params"] > 6e9
    assert s4["fits"] == {"ddp": False, "fsdp": True}
    assert s4["bytes_per_rank"]["ddp"] > 80 * GIB > s4["bytes_per_rank"]["fsdp"]
    assert s4["max_batch"]["fsdp"] >= 16 and s4["max_batch"]["ddp"] == 0
    plan("--params", str(path), "--gpu-memory", "80GB", "--gpus", "1")
    table = capsys.readouterr().out
    assert "stage4: does not fit under DDP" in table


def test_plan_a_preset_offline(capsys):
    """A recipe's weight files need not exist: nothing is loaded."""
    plan("--preset", "dinov3-s16-224", "--json")
    report = json.loads(capsys.readouterr().out)
    assert set(report["stages"]) == {"stage1", "stage2", "stage3", "stage4"}
    assert all(s["fits"]["ddp"] for s in report["stages"].values())


def test_gpu_memory_sizes():
    assert parse_bytes("80GB") == 80 * GIB == parse_bytes("80GiB") == parse_bytes("80g")
    assert parse_bytes("512MB") == 512 * 2**20
    for bad in ("80x", "-1GB", ""):
        with pytest.raises(ValueError):
            parse_bytes(bad)


def test_image_major_batches_count_images_and_prompts_apart(tmp_path):
    """A batch image brings DINO once and the decoder once per prompt: per image the row's
    bytes plus (P - 1) decoder shares, and P = 1 is the row itself."""
    rows = parse_params(_data(data={"resize": 32, "crop": 32, "batch_by": "sample"}))
    images = parse_params(_data(data={"resize": 32, "crop": 32, "batch_by": "image"}))
    for stage in (1, 4):
        row = plan_memory(rows, stage, amp=False)
        one = plan_memory(images, stage, amp=False, prompts_per_image=1.0)
        four = plan_memory(images, stage, amp=False, prompts_per_image=4.0)
        assert row.prompts_per_image is None and four.prompts_per_image == 4.0
        dec = four.decoder_per_sample
        assert 0 < dec < row.activations_per_image()
        assert one.activations_per_image() == row.activations_per_image()
        assert four.activations_per_image() == row.activations_per_image() + 3 * dec
    # P: given, else the prepared train mean (capped), else the cap, else 1 (said so).
    from cdsam.data.shards import FORMAT
    from cdsam.errors import UserError
    from cdsam.training.memory_plan import prompts_per_image

    assert prompts_per_image(rows, None, None) == (None, "")
    capped = parse_params(_data(data={"resize": 32, "crop": 32, "batch_by": "image",
                                      "prompts_per_image": 3}))
    assert prompts_per_image(capped, None, tmp_path)[0] == 3.0
    assert prompts_per_image(capped, 2.5, tmp_path)[0] == 2.5
    assert "assumed" in prompts_per_image(images, None, tmp_path)[1]
    (tmp_path / "index.json").write_text(json.dumps(
        {"format": FORMAT, "splits": {"train": {"images": 10, "samples": 41}}}))
    assert prompts_per_image(images, None, tmp_path)[0] == 4.1
    assert prompts_per_image(capped, None, tmp_path)[0] == 3.0
    with pytest.raises(UserError, match="--prompts-per-image"):
        prompts_per_image(images, 0.5, tmp_path)
