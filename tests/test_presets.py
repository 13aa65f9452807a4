"""`cdsam init --preset`: real-size recipes written into params.yaml, comments kept, validated."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from cdsam.cli import main
from cdsam.config.parse import load_params
from cdsam.models.preflight import dino_shape
from cdsam.presets import DEFAULT_PARAMS, list_presets

REPO = Path(__file__).resolve().parents[1]


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _keys(d: dict) -> set[str]:
    return set(_flat(d))


def test_the_recipes_ship():
    assert {"dinov2-s14-224", "dinov2-b14-448", "dino-s16-224",
            "dinov3-s16-224"} <= set(list_presets())


@pytest.mark.parametrize("name", list_presets())
def test_preset_writes_a_valid_params_file_and_keeps_the_rest(name, tmp_path, capsys):
    path = tmp_path / "params.yaml"
    shutil.copy(DEFAULT_PARAMS, path)
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
    assert d.img_size == p.data.crop
    if "SigLIP" not in p.model.clip.name:  # OpenAI's CLIP weights want QuickGELU
        assert p.model.clip.name.endswith("-quickgelu")
    patch, depth = dino_shape(p.model)
    assert p.data.crop % patch == 0 and p.lora.dino.last_k_blocks <= depth
    unchanged = {k for k in _keys(yaml.safe_load(before))
                 if not k.startswith(("model.", "data.crop", "data.resize"))}
    flat_b, flat_a = _flat(yaml.safe_load(before)), _flat(yaml.safe_load(after))
    assert all(flat_b[k] == flat_a[k] for k in unchanged)


def test_unknown_preset_is_one_line(tmp_path, capsys):
    shutil.copy(DEFAULT_PARAMS, tmp_path / "params.yaml")
    with pytest.raises(SystemExit) as exc:
        main(["init", "--preset", "vit-huge", "--params", str(tmp_path / "params.yaml")])
    assert exc.value.code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "--preset: unknown preset 'vit-huge'" in err[0]
    assert (tmp_path / "params.yaml").read_text() == DEFAULT_PARAMS.read_text()


def test_init_default_writes_the_shipped_file_and_keeps_a_tuned_one(tmp_path, capsys):
    path = tmp_path / "params.yaml"
    for expected in ("wrote", "already is"):
        with pytest.raises(SystemExit) as exc:
            main(["init", "--default", "--params", str(path)])
        assert not exc.value.code and expected in capsys.readouterr().out
        assert path.read_text() == DEFAULT_PARAMS.read_text()
    path.write_text("seed: 3\n")  # a user's tuned file: one line, kept
    with pytest.raises(SystemExit) as exc:
        main(["init", "--default", "--params", str(path)])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert exc.value.code == 2 and len(err) == 1 and "--force" in err[0]
    assert path.read_text() == "seed: 3\n"
    with pytest.raises(SystemExit) as exc:
        main(["init", "--default", "--force", "--params", str(path)])
    assert not exc.value.code and path.read_text() == DEFAULT_PARAMS.read_text()


@pytest.mark.slow
def test_a_users_own_params_yaml_never_breaks_the_suite(tmp_path):
    """The issue's check: params.yaml rewritten by yaml.safe_dump (comments gone) with a tuned
    value; the tests that use params files still pass in that checkout."""
    import subprocess
    import sys

    from tests.test_pipeline import copy_checkout

    copy_checkout(tmp_path, ("cdsam", "tests", "tools", "stages", "dvc.yaml", "pyproject.toml",
                             "weights/README.md", "data/raw/README.md"))
    tuned = yaml.safe_load(DEFAULT_PARAMS.read_text())
    tuned["lora"]["dino"]["last_k_blocks"] = 6
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tuned))
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-m", "not slow",
                          "-p", "no:cacheprovider", "tests/test_presets.py",
                          "tests/test_config.py"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:]
