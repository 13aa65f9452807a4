"""Named backbones at the crop the user picks, and the one-line errors caught before weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from cdsam.cli import main
from cdsam.config.parse import parse_params
from cdsam.errors import ConfigError, UserError
from cdsam.models.dino import build_dino
from cdsam.models.preflight import check_model, dino_shape

DINOV2_S = "vit_small_patch14_dinov2.lvd142m"


def _params(**over):
    """A named-model config: no size overrides (the toy sizes live in params.yaml only)."""
    return parse_params({"data": {"crop": 224}, **over})


def test_null_sizes_mean_the_named_model_built_for_the_crop():
    p = _params(model={"dino": {"name": DINOV2_S}})
    assert dino_shape(p.model) == (14, 12)
    vit = build_dino(p.model.dino, load_weights=False)
    assert tuple(vit.patch_embed.img_size) == (224, 224)  # DINOv2 is built at 518 by default
    assert vit.embed_dim == 384


def test_crop_not_a_multiple_of_the_named_patch_is_one_line():
    p = parse_params({"model": {"dino": {"name": DINOV2_S}}, "data": {"crop": 64}})
    with pytest.raises(ConfigError) as exc:
        check_model(p.model, p.data.crop)
    assert exc.value.problems == [f"data.crop: 64 is not a multiple of the patch size 14 of "
                                  f"model.dino.name '{DINOV2_S}'"]


def test_k_larger_than_the_named_depth_is_one_line():
    p = _params(model={"dino": {"name": "vit_small_patch16_224"}},
                lora={"dino": {"last_k_blocks": 13}})
    with pytest.raises(ConfigError, match=r"lora.dino.last_k_blocks: 13 is larger than the "
                                          r"depth 12"):
        check_model(p.model, p.data.crop, p.lora.dino)
    check_model(p.model, p.data.crop)  # stages without DINO LoRA do not read K


def test_clip_tag_trained_with_quickgelu_needs_the_quickgelu_name():
    p = _params(model={"dino": {"name": "vit_small_patch16_224"},
                       "clip": {"name": "ViT-B-32", "pretrained": "openai"}})
    with pytest.raises(ConfigError, match="use 'ViT-B-32-quickgelu'"):
        check_model(p.model, p.data.crop)
    ok = _params(model={"dino": {"name": "vit_small_patch16_224"},
                        "clip": {"name": "ViT-B-32-quickgelu", "pretrained": "openai"}})
    check_model(ok.model, ok.data.crop)


def test_img_size_other_than_the_crop_names_both_keys():
    with pytest.raises(ConfigError, match=r"model.dino.img_size: 518 differs from data.crop"):
        _params(model={"dino": {"name": DINOV2_S, "img_size": 518}})


@pytest.fixture(scope="module")
def dinov2_file(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A DINOv2 ViT-S/14 state dict in timm's format at its real size (built at 518)."""
    ref = timm.create_model(DINOV2_S, pretrained=False, num_classes=0)
    path = tmp_path_factory.mktemp("w") / "dinov2_vits14.pth"
    state = ref.state_dict()
    torch.save(state, path)
    return path, state


@pytest.mark.parametrize("crop", [224, 448])
def test_518_weights_load_at_another_crop(dinov2_file, crop):
    path, state = dinov2_file
    p = parse_params({"model": {"dino": {"name": DINOV2_S, "checkpoint": str(path)}},
                      "data": {"crop": crop}})
    vit = build_dino(p.model.dino)
    grid = crop // 14
    assert vit.pos_embed.shape[1] == 1 + grid * grid  # resampled once, at load
    assert torch.equal(vit.blocks[3].attn.qkv.weight, state["blocks.3.attn.qkv.weight"])
    with torch.no_grad():
        out = vit.forward_features(torch.zeros(1, 3, crop, crop))
    assert out.shape == (1, 1 + grid * grid, 384)


def test_weights_of_another_architecture_name_the_file(dinov2_file):
    path, _ = dinov2_file
    p = _params(model={"dino": {"name": "vit_base_patch14_dinov2.lvd142m",
                                "checkpoint": str(path)}})
    with pytest.raises(UserError, match=r"model.dino.checkpoint: .*dinov2_vits14.pth does not "
                                        r"fit 'vit_base_patch14_dinov2.lvd142m'"):
        build_dino(p.model.dino)


def test_summary_with_k_beyond_depth_exits_2_with_one_line(tmp_path, capsys):
    (tmp_path / "params.yaml").write_text(
        "model:\n  dino:\n    name: vit_small_patch16_224\n"
        "data:\n  crop: 224\nlora:\n  dino:\n    last_k_blocks: 20\n")
    with pytest.raises(SystemExit) as exc:
        main(["summary", "--stage", "2", "--params", str(tmp_path / "params.yaml")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "lora.dino.last_k_blocks: 20" in errors[0], err
