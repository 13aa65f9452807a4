import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cdsam.config import Params, load_params, parse_params
from cdsam.errors import ConfigError
from cdsam.stage_params import declared_keys, restrict

REPO = Path(__file__).resolve().parents[1]
# tools/ is a script folder, not a package: load the dvc.yaml writer from its file.
_spec = importlib.util.spec_from_file_location("dvc_yaml", REPO / "tools" / "dvc_yaml.py")
dvc_yaml = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dvc_yaml)


def test_repo_params_yaml_is_valid():
    """The shipped file parses and validates (values are tunable: `dvc exp run -S …` may change
    any of them, so none is pinned here)."""
    p = load_params("params.yaml")
    assert p.lora.dino.last_k_blocks <= (p.model.dino.depth or p.lora.dino.last_k_blocks)


def test_typo_names_key_and_nearest():
    with pytest.raises(ConfigError) as exc:
        parse_params({"lora": {"dino": {"last_k_block": 3}}})
    assert "lora.dino.last_k_block: unknown key (did you mean lora.dino.last_k_blocks?)" in str(
        exc.value)


def test_all_problems_listed_at_once():
    bad = {
        "model": {"dino": {"depth": 4, "patch_size": 8}, "sam": {"type": "vit_x"}},
        "lora": {"dino": {"last_k_blocks": 6, "rank": 0, "dropout": 1.0}, "sam": {"alpha": 0}},
        "optim": {"lr": -1, "batch_size": 0},
        "stage2": {"epochs": 0},
        "data": {"fit": "crop", "resize": 64, "crop": 60},
    }
    with pytest.raises(ConfigError) as exc:
        parse_params(bad)
    text = "\n".join(exc.value.problems)
    for key in ("lora.dino.last_k_blocks", "lora.dino.rank", "lora.dino.dropout",
                "lora.sam.alpha", "optim.lr", "optim.batch_size", "stage2.epochs",
                "model.sam.type", "data.crop"):
        assert key in text, key
    assert len(exc.value.problems) >= 9


def test_types_are_checked_and_1e_strings_accepted():
    assert parse_params({"optim": {"lr": "1e-3"}}).optim.lr == pytest.approx(1e-3)
    with pytest.raises(ConfigError, match="optim.batch_size: expected an integer"):
        parse_params({"optim": {"batch_size": "big"}})


def test_crop_larger_than_resize():
    with pytest.raises(ConfigError, match="data.crop"):
        parse_params({"data": {"fit": "crop", "resize": 32, "crop": 64}})


def test_stage_view_blocks_undeclared_sections():
    keys = declared_keys("stage1", "dvc.yaml")
    assert "lora.sam" in keys and "lora.dino" not in keys
    view = restrict(load_params("params.yaml"), keys, "stage1")
    assert view.lora.sam.rank >= 1
    with pytest.raises(RuntimeError, match="lora.dino"):
        _ = view.lora.dino.rank
    with pytest.raises(RuntimeError, match="stage2"):
        _ = view.stage2.epochs


def test_every_stage_declares_what_it_needs():
    for n in (1, 2, 3, 4):
        keys = declared_keys(f"stage{n}", "dvc.yaml")
        for k in ("seed", "device", "data", "model", "lora.sam", "optim", "loss", f"stage{n}"):
            assert k in keys, (n, k)
        assert ("lora.dino" in keys) == (n in (2, 3))
    assert set(declared_keys("prepare", "dvc.yaml")) == {"seed", "prepare"}


@pytest.mark.parametrize("stage,script", [("prepare", "stages/prepare.py"),
                                          ("stage1", "stages/train.py"),
                                          ("stage4", "stages/train.py"),
                                          ("evaluate", "stages/evaluate.py")])
def test_stage_code_deps_are_exactly_the_modules_the_script_imports(stage, script):
    """Fine-grained deps must not miss code (a change to it would not rerun the stage), nor
    list code the stage never runs (an edit to it would rerun the stage for nothing)."""
    deps = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]["deps"]
    imported = set(dvc_yaml.imported_modules(script))
    code = {d for d in deps if d.startswith("cdsam/") and d.endswith(".py")}
    assert code == imported, (stage, sorted(code - imported), sorted(imported - code))
    # data files the code reads (the shipped tiny CLIP config) where models are built
    assert ("cdsam/models/configs" in deps) == ("cdsam/models/model.py" in imported)
    assert script in deps


def test_dvc_yaml_is_what_the_generator_writes():
    """The per-stage lists are written by tools/dvc_yaml.py, not copied by hand."""
    result = subprocess.run([sys.executable, str(REPO / "tools" / "dvc_yaml.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_a_section_keeps_its_own_defaults_for_keys_left_out():
    """`stage3: {epochs: 2}` keeps stage3's default LR override, not StageConfig's null."""
    p = parse_params({"stage3": {"epochs": 2}, "stage4": {"epochs": 1}})
    default = Params()
    assert p.stage3.epochs == 2 and p.stage4.epochs == 1
    assert (p.stage3.lr, p.stage3.lora_lr) == (default.stage3.lr, default.stage3.lora_lr)
    assert p.stage4.sam_mode == default.stage4.sam_mode
    assert parse_params({}).optim == default.optim


def test_named_dino_sizes_default_to_the_named_model():
    """The toy sizes live in params.yaml alone: a params file without them means the named
    timm model's own architecture, at data.crop, not a silently shrunk one."""
    p = parse_params({"data": {"crop": 224}})
    d = p.model.dino
    assert (d.patch_size, d.embed_dim, d.depth, d.num_heads) == (None,) * 4
    assert d.img_size == 224  # null img_size: built for data.crop
