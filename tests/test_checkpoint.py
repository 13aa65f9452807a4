import dataclasses

import pytest
import torch

from cdsam.checkpoint import WEIGHTS, CheckpointMeta, load_checkpoint, read_meta, save_checkpoint
from cdsam.config import to_dict
from cdsam.curriculum import apply_stage
from cdsam.errors import CheckpointError
from cdsam.lora import lora_parameters
from cdsam.models.model import build_model


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
