"""Each shipped real-size recipe, end to end, as a user runs it: `cdsam init --preset`, weight
files in the official formats at their real sizes (random values: hubs are unreachable here; the
SigLIP 2 repo's tokenizer has a made-up vocabulary of the real size, `tests.hub_files`),
`dvc repro` (prepare → stage1–4 → evaluate) and `cdsam predict`, on a few synthetic 224/448-px
images with one epoch per stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from cdsam.presets import DEFAULT_PARAMS
from cdsam.training.curriculum import SAM_IOU_HEAD, SAM_MASK_HEAD, SAM_PROMPT_MAP
from tests.hub_files import write_open_clip_repo, write_sam2_checkpoint
from tests.test_pipeline import BIN, _env, _merge, _project, _run

# (recipe, timm name of its DINO, weights file the recipe names, crop, fixtures of its text
# and SAM files)
RECIPES = [
    ("dinov2-s14-224", "vit_small_patch14_dinov2.lvd142m", "dinov2_vits14.pth", 224,
     "clip_file", "sam_file"),
    ("dino-s16-224", "vit_small_patch16_224.dino", "dino_vits16.pth", 224, "clip_file",
     "sam_file"),
    ("dinov2-b14-448", "vit_base_patch14_dinov2.lvd142m", "dinov2_vitb14.pth", 448,
     "clip_file", "sam_file"),
    ("dinov3-s16-224", "vit_small_patch16_dinov3.lvd1689m", "dinov3_vits16.safetensors", 224,
     "siglip2_repo", "sam2_file"),
]
SMALL_RUN = {
    "prepare": {"synthetic": {"num_images": 5, "min_objects": 2, "max_objects": 2},
                "val_fraction": 0.2, "test_fraction": 0.2},
    "optim": {"batch_size": 2, "warmup_steps": 1},
    **{f"stage{n}": {"epochs": 1} for n in (1, 2, 3, 4)},
    "evaluate": {"batch_size": 4, "num_overlays": 1},
}


@pytest.fixture(scope="module")
def sam_file(tmp_path_factory) -> Path:
    from segment_anything import sam_model_registry

    path = tmp_path_factory.mktemp("sam") / "sam_vit_b_01ec64.pth"
    torch.manual_seed(0)
    torch.save(sam_model_registry["vit_b"]().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def sam2_file(tmp_path_factory) -> Path:
    """sam2.1_hiera_base_plus.pt as Meta ships it: {"model": the whole SAM2Base's state dict}."""
    pytest.importorskip("sam2")  # installed apart (README)
    path = tmp_path_factory.mktemp("sam2") / "sam2.1_hiera_base_plus.pt"
    write_sam2_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory) -> Path:
    """OpenAI CLIP ViT-B/32 as open_clip's state dict (the three older recipes share it)."""
    import open_clip

    path = tmp_path_factory.mktemp("clip") / "clip_vitb32_quickgelu.bin"
    torch.manual_seed(0)
    torch.save(open_clip.create_model("ViT-B-32-quickgelu", pretrained=None).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def siglip2_repo(tmp_path_factory) -> Path:
    """timm/ViT-B-16-SigLIP2 as `hf download` leaves it (1.5 GB of weights, 256k tokens)."""
    return write_open_clip_repo(tmp_path_factory.mktemp("hub") / "ViT-B-16-SigLIP2",
                                "ViT-B-16-SigLIP2")


def _read(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(path)
    return torch.load(path, weights_only=True)


def _link(src: Path, weights: Path) -> None:
    """File links only (DVC follows links to files, not to folders)."""
    if src.is_dir():
        (weights / src.name).mkdir()
        for f in src.iterdir():
            (weights / src.name / f.name).symlink_to(f)
    else:
        (weights / src.name).symlink_to(src)


def _frozen_equal_files(model, dino_file: Path, files: dict[str, Path], resampled: bool) -> None:
    """The stage-1 model's frozen DINO, CLIP text tower and SAM decoder are the files' tensors
    (all but SAM's mask head, mask-input encoder and, with the instance heads, IoU head, which
    stage 1 trains)."""
    from cdsam.models.delta_base import canonical_names

    names = canonical_names(model)
    state = {names[k]: v for k, v in model.state_dict().items()}
    dino = _read(dino_file)
    for k, v in dino.items():
        if k == "pos_embed" and resampled:
            continue  # resampled from 518 to the crop's grid, by timm, on load
        torch.testing.assert_close(state[f"dino.{k}"], v, rtol=0, atol=0)
    tower = files["clip"]  # a weights file, or a hub repo folder
    clip = _read(tower / "open_clip_model.safetensors" if tower.is_dir() else tower)
    text = [k for k in model.clip_text.clip.state_dict()]
    assert len(text) > 10
    for k in text:
        torch.testing.assert_close(state[f"clip_text.clip.{k}"], clip[k], rtol=0, atol=0)
    sam = torch.load(files["sam"], weights_only=True)
    if "model" in sam:  # SAM 2: its decoder's keys, less the high-resolution skips cdsam omits
        sam = {k.removeprefix("sam_"): v for k, v in sam["model"].items()
               if k.startswith(("sam_prompt_encoder.", "sam_mask_decoder."))
               and ".conv_s" not in k}
    trained_head = [k for k in sam if k.startswith(f"{SAM_MASK_HEAD}.")]
    assert trained_head  # SAM's mask head trains in full from stage 1 on (cdsam.training.curriculum)
    for k, v in sam.items():
        frozen = k.startswith(("mask_decoder.", "prompt_encoder.")) and \
            not k.startswith((f"{SAM_PROMPT_MAP}.", f"{SAM_IOU_HEAD}."))
        if frozen and k not in trained_head:
            torch.testing.assert_close(state[f"sam.{k}"], v, rtol=0, atol=0)
    assert any(not torch.equal(state[f"sam.{k}"], sam[k]) for k in trained_head)


@pytest.mark.slow
@pytest.mark.parametrize("recipe,dino_name,dino_file,crop,text,sam", RECIPES,
                         ids=[r[0] for r in RECIPES])
def test_recipe_trains_evaluates_and_predicts(recipe, dino_name, dino_file, crop, text, sam,
                                              request, tmp_path, monkeypatch):
    import timm
    from PIL import Image

    from cdsam.models.checkpoint import load_checkpoint, read_meta, read_state

    repo = tmp_path / "repo"
    base = yaml.safe_load(DEFAULT_PARAMS.read_text())
    _project(repo, _merge(base, _merge(SMALL_RUN, {"prepare": {"synthetic": {
        "image_size": crop}}})))
    torch.manual_seed(1)
    dino = timm.create_model(dino_name, pretrained=False, num_classes=0)
    if dino_file.endswith(".safetensors"):  # timm's hub format
        save_file({k: v.contiguous() for k, v in dino.state_dict().items()},
                  repo / "weights" / dino_file)
    else:
        torch.save(dino.state_dict(), repo / "weights" / dino_file)
    shared_weights = {"clip": request.getfixturevalue(text),
                      "sam": request.getfixturevalue(sam)}
    for path in shared_weights.values():
        _link(path, repo / "weights")
    env = _env(tmp_path)
    out = _run([str(BIN / "cdsam"), "init", "--preset", recipe], repo, env)
    assert f"preset {recipe} set" in out
    for cmd in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"], ["git", "add", "-A"],
                ["git", "commit", "-qm", "init"]):
        _run(cmd, repo, env)
    log = _run([str(BIN / "dvc"), "repro"], repo, env)
    assert "Traceback" not in log
    for stage in ("prepare", "stage1", "stage2", "stage3", "stage4", "evaluate"):
        assert f"Running stage '{stage}'" in log

    monkeypatch.chdir(repo)  # the weight paths in params (and meta.json) are the project's
    model, meta = load_checkpoint("models/stage1")
    assert tuple(model.dino.patch_embed.img_size) == (crop, crop)
    _frozen_equal_files(model, repo / "weights" / dino_file, shared_weights,
                        resampled=dino_name.endswith("dinov2.lvd142m") and crop != 518)
    stored = read_state("models/stage1")
    assert not any(k.startswith(("dino.", "clip_text.")) for k in stored)  # a delta
    assert meta.base["sources"]["dino"].endswith(f"weights/{dino_file}")
    # LoRA layouts: SAM only in stage 1; + the last K DINO blocks in 2-3; merged in 4.
    depth, k = len(model.dino.blocks), base["lora"]["dino"]["last_k_blocks"]
    s1 = {s["name"].split(".")[0] for s in meta.lora}
    assert s1 == {"sam"}
    s3 = read_meta("models/stage3").lora
    blocks = {int(s["name"].split(".")[2]) for s in s3 if s["name"].startswith("dino.")}
    assert blocks == set(range(depth - k, depth))
    assert not [s for s in read_meta("models/stage4").lora
                if s["name"].startswith("dino.")]
    ev = json.loads((repo / "metrics/evaluate.json").read_text())
    assert 0.0 <= ev["stage4"]["miou"] <= 1.0

    img = next((repo / "data/prepared/images").iterdir())
    out = _run([str(BIN / "cdsam"), "predict", "--checkpoint", "models/stage4", "--image",
                str(img), "--prompt", "a red circle", "--out", "preds", "--no-progress"],
               repo, env)
    masks = sorted((repo / "preds").glob("*__a-red-circle.png"))
    assert len(masks) == 1 and Image.open(masks[0]).size == Image.open(img).size
