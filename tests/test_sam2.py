"""SAM 2 / 2.1 decoders from Meta's sam2 package: the official checkpoint's prompt encoder and
mask decoder, the batched forward against sam2's own, the curriculum on them, one-line errors.

Skipped where sam2 is not installed (README: it installs apart, from source)."""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import pytest
import torch

from cdsam.config.schema import SamConfig
from cdsam.errors import CheckpointError, UserError
from cdsam.models.model import build_model
from cdsam.models.sam import build_sam_decoder, load_sam_checkpoint
from cdsam.training.curriculum import apply_stage, sam_lora_targets
from tests.conftest import tiny_params
from tests.hub_files import write_sam2_checkpoint
from tests.test_curriculum import missing_gradients

SAM2 = "sam2.1_hiera_b+"


@pytest.fixture(scope="module")
def official_sam2_file(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """sam2.1_hiera_base_plus.pt as Meta ships it, random values."""
    pytest.importorskip("sam2")
    path = tmp_path_factory.mktemp("sam2") / "sam2.1_hiera_base_plus.pt"
    return path, write_sam2_checkpoint(path, SAM2)


def test_official_checkpoint_gives_its_decoder_tensors_and_says_what_it_ignores(
        official_sam2_file, caplog):
    path, ref = official_sam2_file
    with caplog.at_level(logging.INFO, logger="cdsam.sam"):
        dec = build_sam_decoder(SamConfig(type=SAM2, checkpoint=str(path)), (14, 14), (224, 224))
    ours = dec.state_dict()
    for k, v in ours.items():
        torch.testing.assert_close(v, ref[f"sam_{k}"], rtol=0, atol=0)
    used = [k for k in ref if k.startswith(("sam_prompt_encoder.", "sam_mask_decoder."))]
    assert sorted(f"sam_{k}" for k in ours) == sorted(
        k for k in used if ".conv_s0." not in k and ".conv_s1." not in k)
    assert f"ignored {len(ref) - len(ours)} others" in caplog.text
    assert "high-resolution skip convs (4 tensors" in caplog.text


def test_batched_forward_equals_sam2s_own_decoder(official_sam2_file):
    path, _ = official_sam2_file
    dec = build_sam_decoder(SamConfig(type=SAM2, checkpoint=str(path)), (14, 14), (224, 224))
    emb, tokens = torch.randn(3, 256, 14, 14), torch.randn(3, 5, 256)
    dense = dec.no_mask().expand(3, -1, 14, 14)
    with torch.no_grad():
        masks, iou = dec(emb, tokens)
        ref, ref_iou, _, _ = dec.mask_decoder.predict_masks(
            emb, dec.prompt_encoder.get_dense_pe(), tokens, dense, repeat_image=False)
    torch.testing.assert_close(masks, ref[:, :1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(iou, ref_iou[:, :1], rtol=0, atol=0)
    assert ((iou >= 0) & (iou <= 1)).all()  # SAM 2's IoU head ends in a sigmoid


def test_a_sam1_file_for_a_sam2_type_is_one_line(tmp_path):
    pytest.importorskip("sam2")
    from segment_anything import sam_model_registry

    path = tmp_path / "sam_vit_b.pth"
    torch.save(sam_model_registry["vit_b"]().state_dict(), path)
    dec = build_sam_decoder(SamConfig(type=SAM2), (4, 4), (32, 32), load_weights=False)
    with pytest.raises(CheckpointError, match=r"sam_vit_b\.pth: not a SAM 2 checkpoint for this "
                                              r"decoder \(missing \['mask_decoder\."):
        load_sam_checkpoint(dec, path)


@pytest.mark.parametrize("stage,sam_mode", [(1, "lora"), (2, "lora"), (4, "lora"), (4, "full")])
def test_every_trainable_parameter_gets_a_gradient(stage, sam_mode):
    pytest.importorskip("sam2")
    p = tiny_params(model={"sam": {"type": SAM2}})
    model = build_model(p.model, seed=0)
    targets = sam_lora_targets(model, p.lora.sam)
    assert targets and not any("pred_obj_score_head" in t for t in targets)
    apply_stage(model, 1, p.lora.sam)
    apply_stage(model, stage, p.lora.sam, p.lora.dino if stage in (2, 3) else None, sam_mode)
    missing = missing_gradients(model, p.loss)
    assert not missing, missing
    obj_token = model.sam.mask_decoder.obj_score_token.weight
    assert obj_token.requires_grad == (sam_mode == "full")


def test_without_the_sam2_package_the_type_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "sam2.modeling.sam.mask_decoder", None)  # import fails
    cfg = dataclasses.replace(SamConfig(), type=SAM2)
    with pytest.raises(UserError, match=r"model\.sam\.type: 'sam2\.1_hiera_b\+' needs Meta's "
                                        r"sam2 package .*SAM2_BUILD_CUDA=0 pip install"):
        build_sam_decoder(cfg, (4, 4), (32, 32), load_weights=False)
