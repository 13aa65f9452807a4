import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cdsam.config.parse import load_params, parse_params
from cdsam.config.schema import OptimConfig, Params
from cdsam.config.stage_view import check_inputs_tracked, declared_keys, restrict
from cdsam.config.stages import stage_keys, stage_rule, stages
from cdsam.errors import ConfigError, UserError
from cdsam.presets import DEFAULT_PARAMS

REPO = Path(__file__).resolve().parents[1]
# tools/ is a script folder, not a package: load the dvc.yaml writer from its file.
_spec = importlib.util.spec_from_file_location("dvc_yaml", REPO / "tools" / "dvc_yaml.py")
dvc_yaml = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dvc_yaml)


def test_the_embedded_default_params_file_is_valid():
    """The shipped file parses and validates (values are tunable: `dvc exp run -S …` may change
    any of them, so none is pinned here). The checkout's params.yaml is the user's: no test
    reads it."""
    p = load_params(DEFAULT_PARAMS)
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
        "evaluate": {"instances": {"decode": "blobs", "seed_prominence": 0}},
    }
    with pytest.raises(ConfigError) as exc:
        parse_params(bad)
    text = "\n".join(exc.value.problems)
    for key in ("lora.dino.last_k_blocks", "lora.dino.rank", "lora.dino.dropout",
                "lora.sam.alpha", "optim.lr", "optim.batch_size", "stage2.epochs",
                "model.sam.type", "data.crop", "evaluate.instances.decode",
                "evaluate.instances.seed_prominence"):
        assert key in text, key
    assert len(exc.value.problems) >= 11


def test_types_are_checked_and_1e_strings_accepted():
    assert parse_params({"optim": {"lr": "1e-3"}}).optim.lr == pytest.approx(1e-3)
    with pytest.raises(ConfigError, match="optim.batch_size: must be an integer >= 1 or auto"):
        parse_params({"optim": {"batch_size": "big"}})
    with pytest.raises(ConfigError, match="stage4.batch_size: expected an integer or a string"):
        parse_params({"stage4": {"batch_size": 1.5}})
    with pytest.raises(ConfigError, match="optim.lr_scaling: must be one of linear, sqrt, none"):
        parse_params({"optim": {"lr_scaling": "cubic"}})
    p = parse_params({"stage4": {"batch_size": "auto"}})
    assert p.optim_for(4).batch_size == "auto"
    assert p.optim_for(3).batch_size == OptimConfig().batch_size  # the shipped default


def test_crop_larger_than_resize():
    with pytest.raises(ConfigError, match="data.crop"):
        parse_params({"data": {"fit": "crop", "resize": 32, "crop": 64}})


def test_stage_view_blocks_undeclared_sections():
    keys = declared_keys("stage1", "dvc.yaml")
    assert "lora.sam" in keys and "lora.dino" not in keys
    view = restrict(load_params(DEFAULT_PARAMS), keys, "stage1")
    assert view.lora.sam.rank >= 1
    with pytest.raises(RuntimeError, match="lora.dino"):
        _ = view.lora.dino.rank
    with pytest.raises(RuntimeError, match="stage2"):
        _ = view.stage2.epochs


def test_every_stage_declares_what_it_needs():
    for n in stages():
        keys = declared_keys(f"stage{n}", "dvc.yaml")
        for k in ("seed", "device", "data.crop", "data.augment", "model", "lora.sam", "optim",
                  "loss", "train.point_prompts", f"stage{n}"):
            assert k in keys, (n, k)
        assert ("lora.dino" in keys) == stage_rule(n).reads_dino_lora
        assert keys == stage_keys(n)
    # prepare fits the images once, so it reads the fit's keys of `data` (and no others), and
    # every prepare key but its speed knob (prepare.workers: the same bytes for any number)
    from dataclasses import fields

    from cdsam.config.schema import PrepareConfig

    prepare_keys = {f"prepare.{f.name}" for f in fields(PrepareConfig)} - {"prepare.workers"}
    assert set(declared_keys("prepare", "dvc.yaml")) == {"seed", "data.fit", "data.resize",
                                                          "data.crop"} | prepare_keys


def test_speed_knobs_are_no_dvc_params_but_stages_read_them():
    """Changing data.memory_mb, train.feature_cache_mb or train.compile reruns nothing."""
    from cdsam.config.stage_view import load_stage_params
    from cdsam.config.stages import SPEED_KEYS

    for stage in [f"stage{n}" for n in stages()] + ["evaluate"]:
        keys = declared_keys(stage, "dvc.yaml")
        for speed in SPEED_KEYS:
            section = speed.split(".")[0]
            assert speed not in keys and section not in keys, (stage, speed)
    view = load_stage_params("stage1", DEFAULT_PARAMS, REPO / "dvc.yaml")
    assert view.data.memory_mb >= 0 and view.train.feature_cache_mb >= 0
    assert view.train.compile in (True, False)


def test_user_input_folders_are_dependencies():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert "data/raw" in stages["prepare"]["deps"]
    for name in ("stage1", "stage2", "stage3", "stage4", "evaluate"):
        assert "weights" in stages[name]["deps"], name  # delta checkpoints rebuild the base
    for folder in ("weights", "data/raw"):
        assert (REPO / folder / "README.md").is_file()  # exists on a fresh clone


@pytest.fixture
def project(tmp_path):
    (tmp_path / "dvc.yaml").write_bytes((REPO / "dvc.yaml").read_bytes())
    (tmp_path / "weights").mkdir()
    (tmp_path / "data" / "raw").mkdir(parents=True)
    return tmp_path


def test_weight_files_outside_weights_are_refused(project):
    ok = parse_params({"model": {"sam": {"checkpoint": "weights/sam.pth"},
                                 "clip": {"pretrained": "openai"}}})  # a hub tag: not a file
    check_inputs_tracked(ok, "stage1", project / "dvc.yaml")
    bad = parse_params({"model": {"sam": {"checkpoint": "/elsewhere/sam.pth"}}})
    with pytest.raises(UserError, match=r"^model.sam.checkpoint: /elsewhere/sam.pth is outside "
                       r"the folders dvc.yaml lists for stage 'stage2'.*under weights/"):
        check_inputs_tracked(bad, "stage2", project / "dvc.yaml")
    clip = parse_params({"model": {"clip": {"pretrained": "../clip.bin"}}})
    with pytest.raises(UserError, match=r"^model.clip.pretrained: \.\./clip.bin is outside"):
        check_inputs_tracked(clip, "stage1", project / "dvc.yaml")
    check_inputs_tracked(bad, "prepare", project / "dvc.yaml")  # prepare does not read model


def test_data_outside_data_raw_and_folder_symlinks_are_refused(project, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    check_inputs_tracked(parse_params({"prepare": {"source": "voc", "root": "data/raw/VOC"}}),
                         "prepare", project / "dvc.yaml")
    with pytest.raises(UserError, match=r"^prepare.root: .* under data/raw/"):
        check_inputs_tracked(parse_params({"prepare": {"source": "voc", "root": str(outside)}}),
                             "prepare", project / "dvc.yaml")
    (project / "data" / "raw" / "VOC").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UserError, match=r"^prepare.root: .*VOC is a symlink to a folder, which "
                       r"DVC does not follow"):
        check_inputs_tracked(parse_params({"prepare": {"source": "voc",
                                                       "root": "data/raw/VOC"}}),
                             "prepare", project / "dvc.yaml")
    # Keys a source does not read are not checked (a leftover path is harmless).
    check_inputs_tracked(parse_params({"prepare": {"source": "synthetic",
                                                   "images": str(outside)}}),
                         "prepare", project / "dvc.yaml")


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


def test_sam_types_are_sam1_and_sam2_config_names():
    assert parse_params({"model": {"sam": {"type": "sam2.1_hiera_b+"}}}).model.sam.type == \
        "sam2.1_hiera_b+"
    with pytest.raises(ConfigError) as exc:
        parse_params({"model": {"sam": {"type": "sam3"}}})
    assert len(exc.value.problems) == 1
    assert exc.value.problems[0].startswith("model.sam.type: must be one of vit_b, vit_l, vit_h, "
                                            "sam2_hiera_t, ")
