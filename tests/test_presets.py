"""`cdsam init --preset`: real-size recipes written into params.yaml, comments kept, validated."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from cdsam.cli import main
from cdsam.config import load_params
from cdsam.models.preflight import dino_shape
from cdsam.presets import list_presets

REPO = Path(__file__).resolve().parents[1]


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _keys(d: dict) -> set[str]:
    return set(_flat(d))


def test_three_recipes_ship():
    assert {"dinov2-s14-224", "dinov2-b14-448", "dino-s16-224"} <= set(list_presets())


@pytest.mark.parametrize("name", list_presets())
def test_preset_writes_a_valid_params_file_and_keeps_the_rest(name, tmp_path, capsys):
    path = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", path)
    before = path.read_text()
    with pytest.raises(SystemExit) as exc:
        main(["init", "--preset", name, "--params", str(path)])
    assert not exc.value.code
    after = path.read_text()
    assert "set" in capsys.readouterr().out
    # the same keys (DVC tracks them), the comments kept
    assert _keys(yaml.safe_load(after)) == _keys(yaml.safe_load(before))
    assert before.splitlines()[0] in after and "# auto = CUDA when present, else CPU" in after
    assert f"# cdsam init --preset {name}" in after and "img_size: null" in after
    p = load_params(path)
    d = p.model.dino
    assert d.checkpoint and (d.patch_size, d.embed_dim, d.depth, d.num_heads) == (None,) * 4
    assert d.img_size == p.data.crop and p.model.clip.name.endswith("-quickgelu")
    patch, depth = dino_shape(p.model)
    assert p.data.crop % patch == 0 and p.lora.dino.last_k_blocks <= depth
    unchanged = {k for k in _keys(yaml.safe_load(before))
                 if not k.startswith(("model.", "data.crop", "data.resize"))}
    flat_b, flat_a = _flat(yaml.safe_load(before)), _flat(yaml.safe_load(after))
    assert all(flat_b[k] == flat_a[k] for k in unchanged)


def test_unknown_preset_is_one_line(tmp_path, capsys):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    with pytest.raises(SystemExit) as exc:
        main(["init", "--preset", "vit-huge", "--params", str(tmp_path / "params.yaml")])
    assert exc.value.code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "--preset: unknown preset 'vit-huge'" in err[0]
    assert (tmp_path / "params.yaml").read_text() == (REPO / "params.yaml").read_text()
