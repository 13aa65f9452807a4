"""End to end: the real dvc.yaml, real `dvc repro` and `dvc exp run` in a temporary git repo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cdsam.presets import DEFAULT_PARAMS

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

TINY_PIPELINE = {
    "seed": 0,
    "device": "cpu",
    "prepare": {"synthetic": {"num_images": 24, "image_size": 32}, "val_fraction": 0.25},
    "data": {"resize": 32, "crop": 32},
    "model": {"dino": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 4,
                       "num_heads": 2}},
    "lora": {"sam": {"rank": 2, "alpha": 4}, "dino": {"rank": 2, "alpha": 4,
                                                     "last_k_blocks": 1}},
    "optim": {"batch_size": 8, "warmup_steps": 1},
    "stage1": {"epochs": 1}, "stage2": {"epochs": 1}, "stage3": {"epochs": 1},
    "stage4": {"epochs": 1, "sam_mode": "lora"},
    "evaluate": {"batch_size": 8, "num_overlays": 2},
}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) \
            else v
    return out


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    home = tmp / "home"
    home.mkdir(exist_ok=True)
    env.update({
        "HOME": str(home), "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1",
        "DVC_SITE_CACHE_DIR": str(tmp / "dvc-site"),
        "DVC_GLOBAL_CONFIG_DIR": str(tmp / "dvc-global"),
        "DVC_SYSTEM_CONFIG_DIR": str(tmp / "dvc-system"),
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com",
    })
    env.pop("DVCLIVE_TEST", None)
    return env


def copy_checkout(dst_root: Path, items: tuple[str, ...]) -> None:
    """Files and folders of this checkout (paths relative to it) into ``dst_root``."""
    for item in items:
        src, dst = REPO / item, dst_root / item
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dst)


def _project(repo: Path, params: dict) -> None:
    """The pipeline's files in ``repo``: dvc.yaml, the scripts, the package, the input folders
    (weights/, data/raw/ with their READMEs and .gitignore rules) and ``params``."""
    repo.mkdir()
    copy_checkout(repo, ("dvc.yaml", "stages", "cdsam", ".gitignore", "weights/README.md",
                         "weights/.gitignore", "data/raw/README.md", "data/raw/.gitignore"))
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _tiny_clip_file(path: Path, seed: int) -> None:
    """An open_clip state dict of the shipped tiny text tower, as a user's weights file."""
    import open_clip
    import torch

    import cdsam.models.clip_text  # noqa: F401  (registers the cdsam-tiny-text config)

    torch.manual_seed(seed)
    torch.save(open_clip.create_model("cdsam-tiny-text").state_dict(), path)


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    r = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    out = r.stdout + r.stderr
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({r.returncode}):\n{out[-4000:]}")
    return out


@pytest.fixture(scope="module")
def pipeline_repo(tmp_path_factory) -> tuple[Path, dict[str, str], str]:
    tmp = tmp_path_factory.mktemp("pipe")
    repo = tmp / "repo"
    # The CLIP text tower comes from a weights file, tracked the way README says (dvc add).
    full = _merge(yaml.safe_load(DEFAULT_PARAMS.read_text()),
                  _merge(TINY_PIPELINE, {"model": {"clip": {"pretrained": "weights/clip.pt"}}}))
    _project(repo, full)
    _tiny_clip_file(repo / "weights" / "clip.pt", seed=0)
    env = _env(tmp)
    _run(["git", "init", "-q"], repo, env)
    _run([str(BIN / "dvc"), "init", "-q"], repo, env)
    _run([str(BIN / "dvc"), "add", "-q", "weights/clip.pt"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "init"], repo, env)
    out = _run([str(BIN / "dvc"), "repro"], repo, env)
    return repo, env, out


@pytest.mark.slow
def test_repro_runs_all_stages_and_writes_outputs(pipeline_repo):
    repo, env, out = pipeline_repo
    for stage in ("prepare", "stage1", "stage2", "stage3", "stage4", "evaluate"):
        assert f"Running stage '{stage}'" in out
    assert "epoch 1/1 train_loss=" in out
    for n in (1, 2, 3, 4):
        assert (repo / f"models/stage{n}/model.safetensors").is_file()
        m = json.loads((repo / f"metrics/stage{n}/metrics.json").read_text())
        for key in ("epochs", "selected_epoch", "trainable_params", "total_params",
                    "throughput_img_s", "peak_mem_mb"):
            assert key in m
        assert {"loss", "miou", "dice", "sampled_class_iou", "fp_rate"} <= set(m["val"])
    ev = json.loads((repo / "metrics/evaluate.json").read_text())
    assert set(ev) == {"split", "stage1", "stage2", "stage3", "stage4"}
    assert ev["split"] == "test"  # the held-out split, not the one that chose the epochs
    assert {"miou", "dice", "class_iou", "sampled_class_iou", "fp_rate", "neg_area", "negatives",
            "pairs", "pairs_miou", "pairs_overlap"} <= set(ev["stage4"])
    assert ev["stage4"]["negatives"] > 0
    # The instance heads' figures, the components baseline beside them, presence gating.
    for stage in ("stage1", "stage2", "stage3", "stage4"):
        assert {"ap", "ap50", "ap75", "count_mae", "pmf1", "il_mcc", "cgf1", "presence_auroc",
                "fp_rate_ungated"} <= set(ev[stage])
        assert {"ap", "ap50", "count_mae"} <= set(ev[stage]["components"])
        assert ev[stage]["fp_rate"] <= ev[stage]["fp_rate_ungated"]
    meta = json.loads((repo / "models/stage4/meta.json").read_text())
    assert 0 < meta["extra"]["presence_threshold"] < 1
    assert set(meta["extra"]["instance_min_quality"]) == {"prompts", "watershed"}
    s2 = json.loads((repo / "metrics/stage2/metrics.json").read_text())
    assert s2["world_size"] == 1 and s2["feature_cache_images"] > 0
    assert not (repo / ".cdsam/resume/stage2").exists()  # removed once outputs exist
    assert (repo / "metrics/eval/overlays/stage4.png").is_file()
    status = _run([str(BIN / "dvc"), "status"], repo, env)
    assert "up to date" in status


@pytest.mark.slow
def test_a_weights_file_replaced_at_the_same_path_is_seen(pipeline_repo):
    repo, env, _ = pipeline_repo
    dvc = str(BIN / "dvc")
    path = repo / "weights" / "clip.pt"
    original = path.read_bytes()
    try:
        path.unlink()  # a new file, not a write into DVC's cache through a link
        _tiny_clip_file(path, seed=1)
        status = _run([dvc, "status"], repo, env)
        for stage in ("stage1", "stage2", "stage3", "stage4", "evaluate"):
            assert f"{stage}:" in status
        assert "modified:           weights" in status
        assert "prepare:" not in status  # prepare does not read weights
        dry = _run([dvc, "repro", "--dry"], repo, env)
        assert "Running stage 'stage1'" in dry and "Running stage 'prepare'" not in dry
    finally:
        path.unlink()
        path.write_bytes(original)
    assert "up to date" in _run([dvc, "status"], repo, env)


@pytest.mark.slow
def test_a_raw_mask_replaced_at_the_same_path_reruns_prepare(tmp_path):
    import numpy as np
    from PIL import Image

    repo = tmp_path / "repo"
    params = _merge(yaml.safe_load(DEFAULT_PARAMS.read_text()), {"prepare": {
        "source": "folders", "images": "data/raw/cells/images", "masks": "data/raw/cells/masks",
        "prompt": "a cell", "negatives": "none"}})
    _project(repo, params)
    rng = np.random.default_rng(0)
    for folder in ("images", "masks"):
        (repo / "data/raw/cells" / folder).mkdir(parents=True)
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(
            repo / f"data/raw/cells/images/c{i}.png")
        Image.fromarray((rng.random((24, 24)) > 0.5).astype(np.uint8) * 255).save(
            repo / f"data/raw/cells/masks/c{i}.png")
    env = _env(tmp_path)
    dvc = str(BIN / "dvc")
    for cmd in (["git", "init", "-q"], [dvc, "init", "-q"], ["git", "add", "-A"],
                ["git", "commit", "-qm", "init"], [dvc, "repro", "prepare"]):
        _run(cmd, repo, env)
    assert "up to date" in _run([dvc, "status", "prepare"], repo, env)
    Image.fromarray(np.zeros((24, 24), np.uint8)).save(repo / "data/raw/cells/masks/c3.png")
    status = _run([dvc, "status", "prepare"], repo, env)
    assert "modified:           data/raw" in status


@pytest.mark.slow
def test_remote_push_pull_gives_a_teammate_every_stage_cached(pipeline_repo, tmp_path):
    repo, env, _ = pipeline_repo
    dvc = str(BIN / "dvc")
    _run([dvc, "remote", "add", "-d", "store", str(tmp_path / "remote")], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "repro + remote"], repo, env)
    _run([dvc, "push"], repo, env)
    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(repo), str(clone)], tmp_path, env)
    assert not (clone / "models/stage1").exists()
    _run([dvc, "pull"], clone, env)
    # The weights file came through DVC too (dvc add), not through git.
    assert (clone / "weights/clip.pt").read_bytes() == (repo / "weights/clip.pt").read_bytes()
    for n in (1, 2, 3, 4):
        a = (repo / f"models/stage{n}/model.safetensors").read_bytes()
        assert (clone / f"models/stage{n}/model.safetensors").read_bytes() == a
    out = _run([dvc, "repro"], clone, env)
    assert "Running stage" not in out
    for stage in ("prepare", "stage1", "stage2", "stage3", "stage4", "evaluate"):
        assert f"Stage '{stage}' didn't change, skipping" in out


@pytest.mark.slow
def test_exp_run_reruns_only_dino_lora_stages(pipeline_repo):
    repo, env, _ = pipeline_repo
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "repro", "--allow-empty"], repo, env)
    out = _run([str(BIN / "dvc"), "exp", "run", "-S", "lora.dino.last_k_blocks=2"], repo, env)
    assert "Stage 'prepare' didn't change, skipping" in out
    assert "Stage 'stage1' didn't change, skipping" in out
    for stage in ("stage2", "stage3", "stage4", "evaluate"):
        assert f"Running stage '{stage}'" in out
    diff = json.loads(_run([str(BIN / "dvc"), "metrics", "diff", "--json"], repo, env))
    s2 = diff["metrics/stage2/metrics.json"]
    assert s2["trainable_params"]["diff"] > 0
