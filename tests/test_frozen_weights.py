"""Frozen weights held in the autocast dtype (issue 28): fewer casts, the same numbers.

CUDA is not needed to check the claim: CPU autocast casts linear and convolution weights to
bf16 by the same rule, so the step on the CPU under bf16 autocast shows both the cast kernels
that disappear and that no value moves.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cdsam.models.lora import LoRALinear
from cdsam.models.model import build_model
from cdsam.runtime import Precision
from cdsam.training.curriculum import apply_stage
from cdsam.training.frozen_weights import hold_frozen
from cdsam.training.profiling import CastCounter
from cdsam.training.trainer import StagePaths, StageTrainer, TrainerOptions
from tests.conftest import prepare_tiny, tiny_params

BF16 = torch.bfloat16


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.LayerNorm(64),
                        LoRALinear(nn.Linear(64, 16), rank=2, alpha=4), nn.GELU(),
                        nn.Linear(16, 8))
    net.requires_grad_(False)
    for name, p in net.named_parameters():
        p.requires_grad_("lora_" in name or name.startswith("5."))
    return net


def _step(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    with CastCounter(BF16) as casts, torch.autocast("cpu", dtype=BF16):
        out = net(x)
        out.float().square().mean().backward()
    grads = [p.grad.clone() for p in net.parameters() if p.requires_grad]
    net.zero_grad(set_to_none=True)
    return out.detach(), grads, casts.count


def test_only_frozen_matmul_weights_are_held_and_the_step_is_bit_identical():
    x = torch.randn(2, 3, 4, 4)
    plain, held = _net(), _net()
    hold = hold_frozen([held], BF16)
    dtypes = {n: p.dtype for n, p in held.named_parameters()}
    # The frozen conv and LoRA base; not the norm (fp32 under autocast) nor what trains.
    assert {n for n, d in dtypes.items() if d == BF16} == {
        "0.weight", "0.bias", "3.base.weight", "3.base.bias"}
    assert hold.nbytes_saved == 2 * (4 * 3 * 9 + 4 + 16 * 64 + 16)
    out_plain, grads_plain, casts_plain = _step(plain, x)
    out_held, grads_held, casts_held = _step(held, x)
    assert torch.equal(out_plain, out_held)
    assert all(torch.equal(a, b) for a, b in zip(grads_plain, grads_held, strict=True))
    assert casts_held == casts_plain - 4  # the four held tensors are no longer cast


def test_full_precision_gives_back_the_original_bytes():
    net = _net()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    hold = hold_frozen([net], BF16)
    with hold.full_precision():
        state = net.state_dict()
        assert all(torch.equal(state[n], before[n]) and state[n].dtype == torch.float32
                   for n in before)
    assert net[0].weight.dtype == BF16
    assert torch.equal(net[0].weight, before["0.weight"].to(BF16))


def test_a_weight_shared_with_an_fp32_layer_stays_fp32():
    emb, head = nn.Embedding(10, 8), nn.Linear(8, 10, bias=False)
    head.weight = emb.weight  # tied, as in a language model's output layer
    tied = nn.ModuleList([emb, head]).requires_grad_(False)
    assert hold_frozen([tied], BF16).held == []
    assert head.weight.dtype == torch.float32


FAMILIES = {"vit": {}, "dinov3": {"dino": {"name": "vit_small_patch16_dinov3_qkvb"}},
            "sam2": {"sam": {"type": "sam2.1_hiera_b+"}}}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_model_family_gives_the_same_masks_and_gradients(family):
    """Stage 3 (LoRA on DINO's last blocks and on SAM), clicks and boxes on half the rows."""
    if family == "sam2":
        pytest.importorskip("sam2")
    p = tiny_params(model=FAMILIES[family])
    x = torch.randn(4, 3, 32, 32)
    prompts = {"points": (torch.full((4, 2, 2), 12.0), torch.tensor([[1, -1]] * 2 + [[-1, -1]] * 2)),
               "boxes": torch.tensor([[4.0, 4.0, 20.0, 20.0]] * 4),
               "box_valid": torch.tensor([True, False, False, False]),
               "rows": np.array([True, True, False, False])}
    runs = []
    for hold in (False, True):
        model = build_model(p.model, seed=0)
        apply_stage(model, 1, p.lora.sam)
        apply_stage(model, 3, p.lora.sam, p.lora.dino)
        model.train()
        if hold:
            parts = [m for name, m in model.named_children() if name != "clip_text"]
            assert hold_frozen(parts, BF16).held
        with torch.autocast("cpu", dtype=BF16):
            out = model(x, ["a", "b", "a", "b"], **prompts)
            out.masks.float().square().mean().backward()
        runs.append((out.masks.detach(), [q.grad for q in model.parameters()
                                          if q.requires_grad and q.grad is not None]))
    (masks, grads), (held_masks, held_grads) = runs
    assert torch.equal(masks, held_masks)
    assert len(grads) > 10 and all(torch.equal(a, b)
                                   for a, b in zip(grads, held_grads, strict=True))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return prepare_tiny(tmp_path_factory.mktemp("data") / "prepared")


def _trainer(data_dir: Path, tmp: Path, hold: bool) -> StageTrainer:
    # Autocast on the CPU, as `precision_for` turns it on for a bf16 GPU.
    options = TrainerOptions(show_progress=False, hold_frozen=hold,
                             precision=Precision(torch.device("cpu"), True, BF16))
    params = tiny_params(device="cpu", optim={"batch_size": 4},
                         train={"point_prompts": 0.5, "box_prompts": 0.5,
                                "feature_cache": False})
    paths = StagePaths(data=data_dir, out=tmp / "stage1", metrics=tmp / "metrics",
                       resume=tmp / "resume")
    trainer = StageTrainer(params, 1, paths, options)
    trainer.setup()
    return trainer


def test_a_stage_trains_and_saves_the_same_with_frozen_weights_in_bf16(data_dir, tmp_path):
    """Stage 1 with DINO frozen and run whole (no feature cache): the same losses and saved
    bytes, fewer casts per step."""
    runs = {}
    for hold in (False, True):
        trainer = _trainer(data_dir, tmp_path / str(hold), hold)
        trainer.train_mode()
        losses, casts = [], []
        for batch in trainer.train_loader:
            with CastCounter(BF16) as counted:
                losses.append(trainer.train_step(batch).detach())
            casts.append(counted.count)
        trainer.save()
        runs[hold] = (losses, casts, trainer)
    (plain, plain_casts, _), (held, held_casts, trainer) = runs[False], runs[True]
    assert len(trainer.frozen.held) > 0
    assert all(torch.equal(a, b) for a, b in zip(plain, held, strict=True))
    assert all(h < p for h, p in zip(held_casts, plain_casts, strict=True))
    saved = [(tmp_path / str(hold) / "stage1" / "model.safetensors").read_bytes()
             for hold in (False, True)]
    assert saved[0] == saved[1]
    assert trainer.model.dino.patch_embed.proj.weight.dtype == BF16  # held again after saving


def test_the_bench_times_the_step_held_and_cast_in_one_run(data_dir, tmp_path):
    from cdsam.training.bench import split_step_time, table

    trainer = _trainer(data_dir, tmp_path, True)
    held = len(trainer.frozen.held)
    out = split_step_time(trainer, steps=2, cast_frozen=True)
    assert out["frozen_held"] == held > 0 and out["cast_frozen_step_images_s"] > 0
    # Released for good: the weights the step ran with last are fp32 again.
    assert trainer.frozen.held == []
    assert trainer.model.dino.patch_embed.proj.weight.dtype == torch.float32
    with CastCounter(BF16) as casts:
        trainer.train_step(next(iter(trainer.train_loader)))
    assert casts.count > 0
    row = {"epoch_s": 1.0, "images_s": 1.0, "setup_s": 1.0, "peak_mem_mb": 1.0,
           "cache_images": 0, "steps_per_epoch": 1, "epochs": 2, "loader_images_s": 1.0,
           "loader_share": 1.0, "flop_per_image": 1.0, "tflop_s": 1.0, "compiled": False,
           "batch_size": 4, **out}
    assert f"{'stage1_cached':<18}{held:>8}" in table(_bench_result(row))


def _bench_result(row: dict) -> dict:
    return {"preset": "default", "loader": "packed", "device": "cpu", "dino": "tiny",
            "last_k_blocks": 2, "images": 12, "train_samples": 40, "epochs": 2, "batch_size": 4,
            "peak_tflops": None,
            "stage1_cached": row, "stage1_epoch_speedup": 1.0, "stage2_epoch_speedup": 1.0,
            "max_loss_diff": 0.0, "text_encoder_calls_per_epoch": 0, "total_s": 1.0}
