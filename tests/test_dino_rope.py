"""DINOv3 (timm's ``Eva`` with rotary positions) as the DINO: the block-range walk, LoRA on the
fused qkv and its exact merge, the frozen-feature cache, weight files, resume."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import timm
import torch

from cdsam.errors import UserError
from cdsam.models.dino import build_dino, dino_blocks, dino_embed, dino_finish, dino_patch_tokens
from cdsam.models.lora import LoRALinear, lora_modules
from cdsam.models.model import build_model
from cdsam.models.preflight import dino_shape
from cdsam.training.curriculum import apply_stage
from cdsam.training.feature_cache import plan_cache
from tests import test_train
from tests.conftest import tiny_params
from tests.test_curriculum import missing_gradients
from tests.test_train import _train_and_save, _trainer

SIZES = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2}
# The _qkvb variant has q/v biases on the fused qkv: the harder case for LoRA (see build_dino).
NAMES = ["vit_small_patch16_dinov3", "vit_small_patch16_dinov3_qkvb"]


def _params(name: str = NAMES[1], **over):
    base = {"device": "cpu", "optim": {"batch_size": 4, "warmup_steps": 1},
            "model": {"dino": {"name": name, **SIZES}},
            "stage1": {"epochs": 1}, "stage2": {"epochs": 2}}
    base.update(over)
    return tiny_params(**base)


@pytest.mark.parametrize("name", NAMES)
def test_tokens_equal_timm_forward_features_at_any_multiple_of_the_patch(name):
    vit = build_dino(_params(name).model.dino, load_weights=False).eval()
    images = torch.randn(2, 3, 40, 24)  # not the built 32x32, not square
    with torch.no_grad():
        tokens, grid = dino_patch_tokens(vit, images)
        ref = vit.forward_features(images)[:, vit.num_prefix_tokens:]
        # cls + 4 registers dropped; split at block 1 and rejoined
        split = dino_finish(vit, dino_blocks(vit, dino_blocks(
            vit, dino_embed(vit, images), 0, 1, grid), 1, 4, grid))
    assert vit.num_prefix_tokens == 5 and grid == (5, 3)
    assert tokens.shape == (2, 15, 32)
    torch.testing.assert_close(tokens, ref, rtol=0, atol=0)
    torch.testing.assert_close(split, ref, rtol=0, atol=0)


def test_the_rotary_table_is_built_once_per_grid():
    """A step asks for the table twice (prefix and tail); it is kept while the grid, the rope's
    buffers and the autocast state stay the same, and built anew otherwise."""
    from cdsam.models.dino import _rope_tables

    vit = build_dino(_params().model.dino, load_weights=False).eval()
    first = _rope_tables(vit, (4, 4))
    assert _rope_tables(vit, (4, 4)) is first
    other = _rope_tables(vit, (5, 3))
    assert other is not first and other.shape[0] == 15
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _rope_tables(vit, (5, 3)) is not other
    with torch.no_grad():
        for b in vit.rope.buffers():
            b.mul_(1.0)  # an in-place write (as a weight load does) bumps the buffer version
    assert _rope_tables(vit, (5, 3)) is not other
    torch.testing.assert_close(_rope_tables(vit, (4, 4)), vit.rope.get_embed(shape=[4, 4]),
                               rtol=0, atol=0)
    vit.rope.train()
    vit.rope.aug_active = True  # coordinate augmentation: a fresh table on every call
    assert _rope_tables(vit, (4, 4)) is not _rope_tables(vit, (4, 4))


def test_preflight_reads_patch_and_depth_without_weights():
    assert dino_shape(_params().model) == (8, 4)


@pytest.mark.parametrize("name", NAMES)
def test_lora_on_the_fused_qkv_is_used_and_merges_exactly(name):
    p = _params(name)
    model = build_model(p.model, seed=0).eval()
    apply_stage(model, 1, p.lora.sam)
    apply_stage(model, 2, p.lora.sam, p.lora.dino)
    qkv = [n for n, _ in lora_modules(model) if n.endswith("attn.qkv")]
    assert qkv == ["dino.blocks.2.attn.qkv", "dino.blocks.3.attn.qkv"]
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for block in model.dino.blocks:  # layer scale as trained, not timm's 1e-5 init
            block.gamma_1.fill_(1.0)
            block.gamma_2.fill_(1.0)
        before = model.encode_image(images)
        model.get_submodule(qkv[-1]).lora_B.normal_()  # only the qkv adapter moves
        tuned = model.encode_image(images)
        apply_stage(model, 4, p.lora.sam)  # merges every DINO adapter
        merged = model.encode_image(images)
    assert not torch.allclose(before, tuned, atol=1e-3)
    assert not any(isinstance(m, LoRALinear) for m in model.dino.modules())
    torch.testing.assert_close(merged, tuned, rtol=1e-5, atol=1e-5)


def test_cached_prefix_then_tail_equals_the_full_forward():
    p = _params()
    model = build_model(p.model, seed=0)
    apply_stage(model, 1, p.lora.sam)
    apply_stage(model, 2, p.lora.sam, p.lora.dino)
    plan = plan_cache(model, enabled=True)
    assert plan.enabled and plan.end_block == 2
    model.eval()
    images, prompts = torch.randn(2, 3, 32, 32), ["a red circle", "a blue square"]
    with torch.no_grad():
        full = model(images, prompts).masks
        tail = model(images, prompts, prefix=model.dino_prefix(images, 2), start_block=2).masks
    torch.testing.assert_close(tail, full, rtol=0, atol=0)


def test_rotary_coordinate_augmentation_turns_the_cache_off():
    p = _params()
    model = build_model(p.model, seed=0)
    apply_stage(model, 1, p.lora.sam)
    model.dino.rope.aug_active = True  # timm's shift/jitter/rescale of the rope coordinates
    plan = plan_cache(model, enabled=True)
    assert not plan.enabled and "rope" in plan.reason


@pytest.mark.parametrize("stage", [2, 4])
def test_every_trainable_parameter_gets_a_gradient(stage):
    p = _params()
    model = build_model(p.model, seed=0)
    apply_stage(model, 1, p.lora.sam)
    apply_stage(model, stage, p.lora.sam, p.lora.dino if stage in (2, 3) else None)
    missing = missing_gradients(model, p.loss)
    assert not missing, missing
    if stage == 4:
        assert all(q.requires_grad for q in model.dino.parameters())


def test_timm_weights_file_loads_exactly_and_a_wrong_one_is_named(tmp_path):
    cfg = _params().model.dino
    torch.manual_seed(3)
    ref = timm.create_model(cfg.name, pretrained=False, num_classes=0, **SIZES)
    path = tmp_path / "dinov3.pth"
    torch.save(ref.state_dict(), path)
    vit = build_dino(dataclasses.replace(cfg, checkpoint=str(path)))
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(vit.state_dict()[k], v, rtol=0, atol=0)
    wrong = tmp_path / "dinov2.pth"
    torch.save(timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0,
                                 **SIZES).state_dict(), wrong)
    with pytest.raises(UserError, match=r"model\.dino\.checkpoint: .*dinov2\.pth does not fit") \
            as err:
        build_dino(dataclasses.replace(cfg, checkpoint=str(wrong)))
    assert "\n" not in str(err.value)


data_dir = test_train.data_dir  # the loop tests' small prepared set (a module fixture)


@pytest.fixture(scope="module")
def stage1_ckpt(data_dir, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("s1")
    _train_and_save(_trainer(_params(), 1, data_dir, tmp))
    return tmp / "stage1"


def test_stage2_with_cache_resumes_bit_exactly_and_matches_no_cache(data_dir, stage1_ckpt,
                                                                     tmp_path, caplog):
    p = _params()
    straight = _trainer(p, 2, data_dir, tmp_path / "a", parent=stage1_ckpt)
    weights = _train_and_save(straight)
    assert straight.cache is not None and straight.start_block == 2
    assert straight.cache.hits > 0 and straight.cache.misses == 0

    first = _trainer(p, 2, data_dir, tmp_path / "b", parent=stage1_ckpt)
    first.setup()
    first.train(stop_after=1)  # as if killed after epoch 1
    with caplog.at_level(logging.INFO, logger="cdsam"):
        resumed = _train_and_save(_trainer(p, 2, data_dir, tmp_path / "b", parent=stage1_ckpt))
    assert "resuming stage2 from epoch 1/2" in caplog.text
    assert resumed == weights

    uncached = _trainer(_params(train={"feature_cache": False}), 2, data_dir, tmp_path / "c",
                        parent=stage1_ckpt)
    _train_and_save(uncached)
    assert uncached.cache is None
    a = [x for e in straight.step_losses for x in e]
    b = [x for e in uncached.step_losses for x in e]
    assert len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5


def test_an_unknown_name_gives_the_timm_version():
    cfg = dataclasses.replace(_params().model.dino, name="vit_small_patch16_dinov9")
    with pytest.raises(UserError, match=rf"model\.dino\.name: timm {timm.__version__} has no "
                                        r"model 'vit_small_patch16_dinov9'$"):
        build_dino(cfg)
