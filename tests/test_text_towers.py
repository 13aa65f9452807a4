"""Any open_clip text tower: width, pooling and context length are the tower's; a tower whose
tokenizer lives on the Hugging Face hub (SigLIP 2) reads it from the downloaded repo folder."""

from __future__ import annotations

import copy
import json

import open_clip
import pytest
import torch

from cdsam.config.schema import ClipConfig
from cdsam.errors import UserError
from cdsam.models.clip_text import build_clip_text
from cdsam.models.model import build_model
from tests.conftest import tiny_params
from tests.hub_files import write_open_clip_repo

TINY_SIGLIP2 = "cdsam-test-siglip2-tiny"


@pytest.fixture(scope="module")
def tiny_siglip2(tmp_path_factory) -> str:
    """ViT-B-16-SigLIP2's text config (Gemma tokenizer from the hub, context 64, last-token
    pooling, projection with bias) at a tiny width and vocabulary, registered with open_clip."""
    cfg = copy.deepcopy(open_clip.get_model_config("ViT-B-16-SigLIP2"))
    cfg["embed_dim"] = 24
    cfg["vision_cfg"] = {"image_size": 32, "layers": 1, "width": 32, "head_width": 32,
                         "patch_size": 16}
    cfg["text_cfg"].update(vocab_size=300, width=32, heads=2, layers=1)
    folder = tmp_path_factory.mktemp("configs")
    (folder / f"{TINY_SIGLIP2}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)
    return TINY_SIGLIP2


def test_siglip2_style_tower_reads_weights_and_tokenizer_from_its_repo_folder(tiny_siglip2,
                                                                              tmp_path):
    repo = write_open_clip_repo(tmp_path / "repo", tiny_siglip2, seed=4)
    enc = build_clip_text(ClipConfig(name=tiny_siglip2, pretrained=str(repo)))
    assert enc.width == 24  # the tower's projection, not CLIP's text_projection attribute
    assert enc.tokenizer.context_length == 64
    ids = enc.tokenizer(["A Red circle."])[0]
    assert ids[:4].tolist() == [4, 7, 11, 1]  # canonicalised, the folder's vocabulary, <eos>
    file = open_clip.create_model(tiny_siglip2, pretrained=str(repo / "open_clip_model"
                                                                  ".safetensors"))
    for k, v in file.text.state_dict().items():
        torch.testing.assert_close(enc.clip.text.state_dict()[k], v, rtol=0, atol=0)
    feats = enc(["a red circle", "a blue square"])
    assert feats.shape == (2, 24)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(2))
    assert not torch.allclose(feats[0], feats[1])


def test_the_text_heads_are_sized_from_the_tower(tiny_siglip2, tmp_path):
    repo = write_open_clip_repo(tmp_path / "repo", tiny_siglip2)
    p = tiny_params(model={"dino": {"img_size": 32, "patch_size": 8, "embed_dim": 32,
                                    "depth": 4, "num_heads": 2},
                           "clip": {"name": tiny_siglip2, "pretrained": str(repo)}})
    model = build_model(p.model, seed=0).eval()
    assert model.text_to_prompt.mlp[0].in_features == 24
    assert model.token_proj.proj.out_features == 24  # DINO tokens aligned to the text space
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32), ["a red circle", "a blue square"])
    assert out.masks.shape == (2, 1, 32, 32)


def test_repo_folder_without_tokenizer_or_weights_is_one_line(tiny_siglip2, tmp_path):
    repo = write_open_clip_repo(tmp_path / "repo", tiny_siglip2)
    (repo / "tokenizer.json").unlink()
    (repo / "tokenizer_config.json").unlink()
    with pytest.raises(UserError, match=r"model\.clip\.pretrained: .*repo has no tokenizer"):
        build_clip_text(ClipConfig(name=tiny_siglip2, pretrained=str(repo)))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=r"model\.clip\.pretrained: .*empty has none of "
                                        r"open_clip_model\.safetensors"):
        build_clip_text(ClipConfig(name=tiny_siglip2, pretrained=str(empty)))


def test_hub_tokenizer_offline_without_a_folder_is_one_line(tiny_siglip2, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"model\.clip\.pretrained: .* needs the tokenizer "
                                        r"'timm/ViT-B-16-SigLIP2' .*hf download") as err:
        build_clip_text(ClipConfig(name=tiny_siglip2))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["ViT-B-32-quickgelu", "ViT-B-16-SigLIP2", "EVA02-B-16",
                                  "ViT-B-16-SigLIP", "RN50"])
def test_width_is_the_towers_embedding_size(name):
    from cdsam.models.clip_text import ClipTextEncoder

    with torch.device("meta"):
        clip = open_clip.create_model(name, pretrained=None, device="meta")
    assert ClipTextEncoder(clip, tokenizer=None).width == open_clip.get_model_config(
        name)["embed_dim"]


@pytest.mark.parametrize("name", ["ViT-B-16", "ViT-B-16-SigLIP2", "EVA02-B-16"])
def test_clip_lora_finds_four_weights_a_layer_in_every_tower(name):
    """`lora.clip`'s default targets on the towers the recipes and users load: the packed
    attention in-projection, out_proj, and the MLP's two linears of every text layer."""
    from types import SimpleNamespace

    from cdsam.config.schema import ClipLoraConfig
    from cdsam.models.clip_text import ClipTextEncoder
    from cdsam.models.lora import inject_weight_lora, lora_parameters
    from cdsam.training.curriculum import clip_lora_targets

    with torch.device("meta"):
        clip = open_clip.create_model(name, pretrained=None, device="meta")
        clip.visual = None
        model = SimpleNamespace(clip_text=ClipTextEncoder(clip, tokenizer=None))
        names = clip_lora_targets(model, ClipLoraConfig())
        layers = open_clip.get_model_config(name)["text_cfg"].get("layers", 12)
        assert len(names) == 4 * layers
        assert sum(n.endswith("in_proj_weight") for n in names) == layers
        inject_weight_lora(model.clip_text, [n[len("clip_text."):] for n in names], 8, 16)
    assert sum(p.numel() for p in lora_parameters(model.clip_text)) > 0


def test_siglip2_style_tokenizer_exports_with_its_cleaning_and_end_token(tiny_siglip2,
                                                                         tmp_path):
    """A Hugging Face tokenizer (open_clip's clean="canonicalize") in the ONNX export: the
    sidecar names the cleaning, and a prompt longer than the context keeps its end token as
    transformers' truncation keeps it; every probe gives the tower's own ids."""
    from cdsam.inference.onnx_export import TOKENIZER_PROBES
    from cdsam.inference.text_onnx import export_tokenizer, tokenizer_agrees

    repo = write_open_clip_repo(tmp_path / "repo", tiny_siglip2)
    tower = build_clip_text(ClipConfig(name=tiny_siglip2, pretrained=str(repo)))
    spec = export_tokenizer(tower, tmp_path)
    assert spec["clean"] == "canonicalize"
    probes = [*TOKENIZER_PROBES, " ".join(["red"] * 100)]
    assert tokenizer_agrees(tower, tmp_path, spec, probes)["identical"] == len(probes)
    assert tower.tokenizer([probes[-1]])[0][-1].item() == 1  # <eos> kept at the cut
