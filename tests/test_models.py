import dataclasses

import open_clip
import pytest
import timm
import torch
from segment_anything import sam_model_registry

from cdsam.config.schema import ClipConfig
from cdsam.errors import CheckpointError, UserError
from cdsam.models.clip_text import build_clip_text
from cdsam.models.dino import build_dino, dino_patch_tokens
from cdsam.models.model import build_model
from cdsam.models.sam import build_sam_decoder, embed_points, load_sam_checkpoint, read_weights


def test_dino_tokens_drop_prefix(model_cfg):
    vit = build_dino(model_cfg.dino)
    tokens, grid = dino_patch_tokens(vit, torch.randn(2, 3, 32, 32))
    assert grid == (4, 4)
    assert tokens.shape == (2, 16, 32)
    assert vit.num_prefix_tokens == 1


def test_two_prompts_give_different_masks(model_cfg):
    model = build_model(model_cfg, seed=0).eval()
    image = torch.randn(1, 3, 32, 32).repeat(2, 1, 1, 1)
    with torch.no_grad():
        out = model(image, ["a red circle", "a blue square"])
    assert out.masks.shape == (2, 1, 32, 32)
    assert not torch.allclose(out.masks[0], out.masks[1])


def test_batched_decoding_equals_per_sample(model_cfg):
    model = build_model(model_cfg, seed=0).eval()
    images = torch.randn(3, 3, 32, 32)
    prompts = ["a red circle", "a blue square", "a green triangle"]
    with torch.no_grad():
        batched = model(images, prompts).masks
        single = torch.cat([model(images[i:i + 1], [prompts[i]]).masks for i in range(3)])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)


def test_point_and_box_prompts_join_text(model_cfg):
    model = build_model(model_cfg, seed=0).eval()
    images = torch.randn(2, 3, 32, 32)
    points = (torch.tensor([[[5.0, 5.0]], [[20.0, 20.0]]]), torch.ones(2, 1, dtype=torch.int))
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0], [8.0, 8.0, 30.0, 30.0]])
    with torch.no_grad():
        plain = model(images, ["a", "b"]).masks
        prompted = model(images, ["a", "b"], points=points, boxes=boxes).masks
    assert prompted.shape == plain.shape
    assert not torch.allclose(plain, prompted)


def test_clip_text_is_cached_and_frozen():
    enc = build_clip_text(ClipConfig())
    a = enc(["a red circle", "a blue square"])
    calls = enc.calls
    b = enc(["a blue square", "a red circle", "a red circle"])
    assert enc.calls == calls  # no new forward for known prompts
    torch.testing.assert_close(a[0], b[1])
    assert not any(p.requires_grad for p in enc.parameters())


def test_timm_weights_file_loads(tmp_path, model_cfg):
    ref = timm.create_model(model_cfg.dino.name, num_classes=0, img_size=32, patch_size=8,
                            embed_dim=32, depth=4, num_heads=2)
    path = tmp_path / "dino.pth"
    torch.save(ref.state_dict(), path)
    cfg = dataclasses.replace(model_cfg.dino, checkpoint=str(path))
    vit = build_dino(cfg)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(vit.state_dict()[k], v, rtol=0, atol=0)


def test_open_clip_weights_file_loads(tmp_path):
    ref = open_clip.create_model("cdsam-tiny-text")
    path = tmp_path / "clip.pt"
    torch.save(ref.state_dict(), path)
    enc = build_clip_text(ClipConfig(pretrained=str(path)))
    torch.testing.assert_close(enc.clip.token_embedding.weight, ref.token_embedding.weight,
                               rtol=0, atol=0)


def test_missing_local_files_are_one_line_errors(tmp_path, model_cfg):
    with pytest.raises(UserError, match="model.dino.checkpoint: file not found"):
        build_dino(dataclasses.replace(model_cfg.dino, checkpoint=str(tmp_path / "x.pth")))
    with pytest.raises(UserError, match="model.clip.pretrained: file not found"):
        build_clip_text(ClipConfig(pretrained=str(tmp_path / "x.pt")))
    with pytest.raises(UserError, match="model.clip.name"):
        build_clip_text(ClipConfig(name="no-such-model"))


def test_a_weights_file_named_for_another_format_is_a_one_line_error(tmp_path, model_cfg):
    """Readers choose their parser by the extension; a torch file named .safetensors ended in
    safetensors' "header too large" traceback."""
    from safetensors.torch import save_file

    from cdsam.models.sam import read_weights

    state = {"w": torch.zeros(2)}
    pickled, legacy, safe = (tmp_path / "a.safetensors", tmp_path / "b.safetensors",
                             tmp_path / "c.pth")
    torch.save(state, pickled)
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    save_file(state, str(safe))
    with pytest.raises(UserError, match=r"model\.dino\.checkpoint: .*a\.safetensors is named "
                                        r"\.safetensors but holds a torch \(zip\) file"):
        build_dino(dataclasses.replace(model_cfg.dino, checkpoint=str(pickled)))
    with pytest.raises(UserError, match=r"model\.clip\.pretrained: .*holds a torch pickle"):
        build_clip_text(ClipConfig(pretrained=str(legacy)))
    with pytest.raises(UserError, match=r"model\.sam\.checkpoint: .*c\.pth holds safetensors"):
        read_weights(safe)


def test_a_safetensors_header_length_of_any_first_byte_is_safetensors(tmp_path):
    """The header length's first byte can be 0x80, a pickle's first byte."""
    from safetensors.torch import save_file

    from cdsam.io import weights_format

    for pad in range(256):
        path = tmp_path / "w.safetensors"
        save_file({"w": torch.zeros(2)}, str(path), metadata={"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert weights_format(path) == "safetensors"


def test_dino_that_is_not_a_vit_is_a_one_line_error(model_cfg):
    # timm builds it; cdsam's block-range walk cannot run it, so it must not get far.
    with pytest.raises(UserError, match="model.dino.name: 'resnet18' is not a timm Vision "
                                        "Transformer or EVA-family model"):
        build_dino(dataclasses.replace(model_cfg.dino, name="resnet18", img_size=None,
                                       patch_size=None, embed_dim=None, depth=None,
                                       num_heads=None))


@pytest.fixture(scope="module")
def official_sam_file(tmp_path_factory):
    torch.manual_seed(0)
    sam = sam_model_registry["vit_b"]()
    path = tmp_path_factory.mktemp("sam") / "sam_vit_b_test.pth"
    torch.save(sam.state_dict(), path)
    return path, {k: v for k, v in sam.state_dict().items()
                  if k.startswith(("prompt_encoder.", "mask_decoder."))}


def test_official_sam_checkpoint_loads(official_sam_file, model_cfg):
    path, ref = official_sam_file
    cfg = dataclasses.replace(model_cfg.sam, checkpoint=str(path))
    dec = build_sam_decoder(cfg, (4, 4), (32, 32))
    for k, v in ref.items():
        torch.testing.assert_close(dec.state_dict()[k], v, rtol=0, atol=0)


def test_sam_checkpoint_that_does_not_fit(tmp_path, model_cfg):
    path = tmp_path / "other.pth"
    torch.save({"mask_decoder.iou_token.weight": torch.zeros(1, 8)}, path)
    dec = build_sam_decoder(model_cfg.sam, (4, 4), (32, 32), load_weights=False)
    with pytest.raises(CheckpointError, match="other.pth: not a SAM checkpoint"):
        load_sam_checkpoint(dec, path)


class _Boom:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_payload_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"x": _Boom()}, path)
    with pytest.raises(CheckpointError, match="evil.pth: cannot read weights"):
        read_weights(path)


def test_point_embedding_equals_sams_own_without_mask_indexing(model_cfg):
    """cdsam embeds clicks with torch.where (no host read-back); values and gradients are SAM
    1's ``_embed_points`` bit for bit, for every label."""
    pe = build_sam_decoder(model_cfg.sam, (4, 4), (32, 32), load_weights=False).prompt_encoder
    pe.input_image_size = (32, 32)
    coords = torch.rand(4, 2, 2) * 32
    labels = torch.tensor([[1, 0], [1, -1], [-1, -1], [0, 1]])
    ours = embed_points(pe, coords, labels)
    ours.square().sum().backward()
    mine = [p.grad.clone() for p in pe.parameters() if p.grad is not None]
    pe.zero_grad(set_to_none=True)
    theirs = pe._embed_points(coords, labels, pad=False)
    theirs.square().sum().backward()
    assert torch.equal(ours, theirs)
    assert all(torch.equal(a, p.grad) for a, p in
               zip(mine, [p for p in pe.parameters() if p.grad is not None], strict=True))
