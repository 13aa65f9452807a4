import dataclasses

import pytest
import torch

from cdsam.config.parse import to_dict
from cdsam.errors import CheckpointError
from cdsam.models.checkpoint import (
    WEIGHTS,
    CheckpointMeta,
    load_checkpoint,
    read_meta,
    read_state,
    save_checkpoint,
)
from cdsam.models.delta_base import Base, tensor_digest
from cdsam.models.lora import lora_parameters, merge_lora
from cdsam.models.model import build_model
from cdsam.training.curriculum import apply_stage


def _ckpt(tmp_path, params, stage=2):
    model = build_model(params.model, seed=0)
    apply_stage(model, 2, params.lora.sam, params.lora.dino)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_()
    path = tmp_path / "ckpt"
    save_checkpoint(path, model, CheckpointMeta(stage=stage, model=to_dict(params.model),
                                                prompts=["a red circle"]))
    return model, path


def test_round_trip_is_bit_exact(tmp_path, params):
    model, path = _ckpt(tmp_path, params)
    loaded, meta = load_checkpoint(path)
    assert meta.stage == 2 and meta.prompts == ["a red circle"] and meta.lora
    ref = model.state_dict()
    got = loaded.state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0)


def test_truncated_weights_name_the_file(tmp_path, params):
    _, path = _ckpt(tmp_path, params)
    w = path / WEIGHTS
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"model.safetensors: corrupt or truncated"):
        load_checkpoint(path)


def test_other_architecture_names_the_mismatch(tmp_path, params):
    _, path = _ckpt(tmp_path, params)
    meta = read_meta(path)
    other = dataclasses.replace(params.model.dino, embed_dim=48)
    cfg = to_dict(dataclasses.replace(params.model, dino=other))
    (path / "meta.json").write_text((path / "meta.json").read_text().replace(
        '"embed_dim": 32', '"embed_dim": 48'))
    assert read_meta(path).model["dino"]["embed_dim"] == cfg["dino"]["embed_dim"] != \
        meta.model["dino"]["embed_dim"]
    with pytest.raises(CheckpointError, match=r"does not fit the model \(shape mismatch dino\."):
        load_checkpoint(path)


def _delta(tmp_path, params, stage=2, name="delta"):
    """A stage-2-like model saved as a delta over its seeded base."""
    model = build_model(params.model, seed=params.seed)
    base = Base.of(model, params.seed)
    apply_stage(model, stage, params.lora.sam, params.lora.dino if stage in (2, 3) else None)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
    path = tmp_path / name
    save_checkpoint(path, model, CheckpointMeta(stage=stage, model=to_dict(params.model)), base)
    return model, path


def test_delta_checkpoint_stores_what_training_changed_and_round_trips(tmp_path, params):
    model, path = _delta(tmp_path, params)
    stored = read_state(path)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(stored) == trainable  # LoRA factors, heads: nothing frozen is copied
    assert not any(k.startswith(("clip_text.", "dino.patch_embed")) for k in stored)
    assert read_meta(path).base["sha256"].keys() >= {"dino", "clip_text", "sam"}
    loaded, _ = load_checkpoint(path)
    ref, got = model.state_dict(), loaded.state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0)


def test_stage4_stores_dino_in_full(tmp_path, params):
    model = build_model(params.model, seed=params.seed)
    base = Base.of(model, params.seed)
    apply_stage(model, 2, params.lora.sam, params.lora.dino)
    merge_lora(model.dino)
    apply_stage(model, 4, params.lora.sam, None)
    with torch.no_grad():
        for p in model.dino.parameters():
            p.add_(0.01)
    save_checkpoint(tmp_path / "s4", model, CheckpointMeta(4, to_dict(params.model)), base)
    stored = read_state(tmp_path / "s4")
    assert {f"dino.{k}" for k in model.dino.state_dict()} <= set(stored)
    assert not any(k.startswith("clip_text.") for k in stored)


def test_delta_refuses_another_base_naming_both(tmp_path, params):
    _, path = _delta(tmp_path, params)
    meta = path / "meta.json"
    meta.write_text(meta.read_text().replace('"seed": 0', '"seed": 7'))
    with pytest.raises(CheckpointError, match=r"other base weights than it was trained on: "
                       r"\w+ was trained on .*seed 0.*but the base built now is .*seed 7"):
        load_checkpoint(path)


def test_delta_over_a_weights_file_refuses_a_replaced_file(tmp_path, params):
    import dataclasses

    import timm

    d = params.model.dino
    def write(seed):
        torch.manual_seed(seed)
        ref = timm.create_model(d.name, num_classes=0, img_size=d.img_size,
                                patch_size=d.patch_size, embed_dim=d.embed_dim, depth=d.depth,
                                num_heads=d.num_heads)
        torch.save(ref.state_dict(), tmp_path / "dino.pth")
    write(1)
    p = dataclasses.replace(params, model=dataclasses.replace(
        params.model, dino=dataclasses.replace(d, checkpoint=str(tmp_path / "dino.pth"))))
    _, path = _delta(tmp_path, p)
    load_checkpoint(path)  # same file: fine
    write(2)  # same path, other weights
    with pytest.raises(CheckpointError, match=r"dino was trained on .*dino.pth \(sha256 \w+\), "
                       r"but the base built now is .*dino.pth \(sha256 \w+\)"):
        load_checkpoint(path)


def test_tensor_digest_sees_dtype_shape_and_bytes():
    a = torch.zeros(2, 3)
    assert tensor_digest(a) == tensor_digest(torch.zeros(2, 3))
    assert tensor_digest(a) != tensor_digest(torch.zeros(3, 2))
    assert tensor_digest(a) != tensor_digest(torch.zeros(2, 3, dtype=torch.float64))
    b = a.clone()
    b[1, 2] = 1e-30
    assert tensor_digest(a) != tensor_digest(b)


def test_missing_checkpoint_dir(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        load_checkpoint(tmp_path / "nope")


def test_non_finite_weights_are_never_saved(tmp_path, params):
    model = build_model(params.model, seed=0)
    with torch.no_grad():
        model.token_proj.proj.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="non-finite"):
        save_checkpoint(tmp_path / "bad", model, CheckpointMeta(1, to_dict(params.model)))
    assert not (tmp_path / "bad").exists()


def test_outputs_get_umask_permissions_not_private_temp_modes(tmp_path):
    import os
    import stat

    from cdsam import io

    old = os.umask(0o022)
    try:
        io.write_text(tmp_path / "a.json", "{}")
        with io.atomic_dir(tmp_path / "d") as d:
            (d / "f.bin").write_bytes(b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "d" / "f.bin").stat().st_mode) == 0o644


def test_loading_leaves_the_global_rng_alone(tmp_path, params):
    _, path = _delta(tmp_path, params)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_checkpoint(path)
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)


def test_a_checkpoint_from_before_the_instance_heads_loads_without_them(tmp_path, params):
    """meta.json written before ``model.heads.instances`` existed: the model is rebuilt without
    the presence and centre heads, from the same base, and decodes exactly as saved."""
    import json

    old = dataclasses.replace(params.model, heads=dataclasses.replace(params.model.heads,
                                                                      instances=False))
    model = build_model(old, seed=0)
    apply_stage(model, 1, params.lora.sam, params.lora.dino)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_()
    path = tmp_path / "old"
    save_checkpoint(path, model, CheckpointMeta(stage=1, model=to_dict(old), prompts=["x"]),
                    base=Base.of(build_model(old, seed=0), 0))
    meta = json.loads((path / "meta.json").read_text())
    del meta["model"]["heads"]["instances"]
    (path / "meta.json").write_text(json.dumps(meta))
    loaded, _ = load_checkpoint(path)
    assert not loaded.has_instance_heads and loaded.presence_head is None
    model.eval()
    loaded.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a, b = model(x, ["a red circle"] * 2), loaded(x, ["a red circle"] * 2)
    torch.testing.assert_close(b.masks, a.masks, rtol=0, atol=0)
    assert b.presence is None and b.centres is None
