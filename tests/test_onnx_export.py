"""`cdsam export --mode onnx`: onnxruntime matches PyTorch on prompts it was and was never
given, and the standalone example works without torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cdsam import cli
from cdsam.config.parse import to_dict
from cdsam.inference.predictor import load_model
from cdsam.models.checkpoint import CheckpointMeta, save_checkpoint
from cdsam.models.delta_base import Base
from cdsam.models.lora import lora_modules
from cdsam.models.model import build_model
from cdsam.training.curriculum import apply_stage
from tests.conftest import tiny_params
from tests.test_predict import PROMPTS, ckpt  # noqa: F401  (the module-scoped checkpoint)

ort = pytest.importorskip("onnxruntime")
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "onnx_predict.py"


def _export(checkpoint: Path, out: Path, *extra: str) -> dict:
    with pytest.raises(SystemExit) as exc:
        cli.main(["export", "--checkpoint", str(checkpoint), "--out", str(out), "--mode", "onnx",
                  *extra])
    assert exc.value.code == 0
    return json.loads((out / "cdsam-onnx.json").read_text())


def _with_fit(checkpoint: Path, dest: Path, fit: str, resize: int) -> Path:
    """The same weights, trained (says meta.json) with another fit: both code paths get run."""
    shutil.copytree(checkpoint, dest)
    meta = json.loads((dest / "meta.json").read_text())
    meta["extra"]["data"].update(fit=fit, resize=resize)
    (dest / "meta.json").write_text(json.dumps(meta))
    return dest


@pytest.fixture(scope="module", params=["pad", "crop"])
def exported(request, ckpt, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp(f"onnx-{request.param}")
    checkpoint = _with_fit(ckpt, root / "ckpt", request.param, 40)
    return checkpoint, root / "onnx", _export(checkpoint, root / "onnx")


def _images(n: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, 256, (30 + 9 * i, 52 - 6 * i, 3), dtype=np.uint8) for i in range(n)]


def _text(out: Path, sidecar: dict, prompts: list[str]) -> np.ndarray:
    """Prompts through tokenizer.json and text.onnx, as a deployment does."""
    from tokenizers import Tokenizer

    from cdsam.inference.text_onnx import token_ids

    spec = sidecar["text"]
    ids = token_ids(Tokenizer.from_file(str(out / spec["tokenizer"])), spec, prompts)
    return ort.InferenceSession(str(out / "text.onnx")).run(["text"], {"tokens": ids})[0]


@pytest.mark.slow  # an export takes ~15 s
@pytest.mark.parametrize("prompts", [PROMPTS, ["a photo of a dog", "a tiny red square"]],
                         ids=["vocabulary", "never-exported"])
def test_onnxruntime_matches_pytorch_logits_with_a_dynamic_batch(exported, prompts):
    checkpoint, out, sidecar = exported
    predictor = load_model(checkpoint)
    assert sidecar["output"]["prompts"] == PROMPTS  # the training vocabulary by default
    assert sidecar["input"]["fit"] == predictor.fit and sidecar["input"]["crop"] == predictor.crop
    assert sidecar["parity"]["max_abs_diff"] < 1e-4  # the export's own check, unseen prompts
    assert not set(sidecar["parity"]["prompts"]) & set(PROMPTS)
    check = sidecar["text"]["tokenizer_check"]
    assert check["identical"] == check["texts"] > len(PROMPTS)
    session = ort.InferenceSession(str(out / "model.onnx"))
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["cdsam.prompts"]) == PROMPTS
    inputs = [predictor.prepare(image)[0] for image in _images()]
    ref = predictor.frame_logits(inputs, prompts).numpy()
    # The graph takes 0-255 pixels: undo the normalisation `prepare` applied.
    mean = np.array([0.485, 0.456, 0.406], np.float32).reshape(3, 1, 1)
    std = np.array([0.229, 0.224, 0.225], np.float32).reshape(3, 1, 1)
    pixels = np.stack([(x.numpy() * std + mean) * 255 for x in inputs]).astype(np.float32)
    text = _text(out, sidecar, prompts)
    for batch in (pixels[:1], pixels):  # batch 1 and 3 from one graph exported at 2
        got = session.run(["logits"], {"images": batch, "text": text})[0]
        diff = np.abs(got - ref[:len(batch)]).max()
        print(f"onnx parity ({sidecar['input']['fit']}, batch {len(batch)}): max |diff| {diff:.2e}")
        assert got.shape == (len(batch), len(prompts), predictor.crop, predictor.crop)
        assert diff < 1e-4
        assert ((got > 0) == (ref[:len(batch)] > 0)).mean() > 0.999


@pytest.mark.slow  # an export takes ~15 s
def test_the_tokenizer_cleans_as_open_clip_and_a_disagreeing_one_is_refused(exported):
    """Curly quotes, HTML entities, full-width letters, ligatures: open_clip cleans them with
    ftfy and html before its BPE; the export's ids agree on every probe, and a tokenizer that
    cleaned otherwise would be refused."""
    from cdsam.errors import UserError
    from cdsam.inference.onnx_export import TOKENIZER_PROBES
    from cdsam.inference.text_onnx import tokenizer_agrees

    checkpoint, out, sidecar = exported
    tower = load_model(checkpoint).model.clip_text
    probes = list(TOKENIZER_PROBES)
    assert "Tom &amp; Jerry" in probes and "a \ufb01sh" in probes
    assert tokenizer_agrees(tower, out, sidecar["text"], probes)["identical"] == len(probes)
    with pytest.raises(UserError, match="other ids than the text tower"):
        tokenizer_agrees(tower, out, dict(sidecar["text"], clean="canonicalize"), probes)


def test_standalone_example_gives_the_masks_cdsam_predict_gives(exported, tmp_path):
    checkpoint, out, _ = exported
    paths = []
    for i, image in enumerate(_images()):
        paths.append(tmp_path / f"im{i}.png")
        Image.fromarray(image).save(paths[-1])
    run = subprocess.run([sys.executable, str(EXAMPLE), str(out), *map(str, paths), "--out",
                          str(tmp_path / "onnx-masks")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    predictor = load_model(checkpoint)
    for path in paths:
        pred = predictor.predict(path, PROMPTS)
        for prompt, mask in zip(PROMPTS, pred.masks, strict=True):
            name = f"{path.stem}__{prompt.replace(' ', '-')}.png"
            got = np.asarray(Image.open(tmp_path / "onnx-masks" / name)) > 0
            assert got.shape == mask.shape
            # Pillow's and torchvision's antialiased resizes round differently in a few pixels.
            assert (got == mask).mean() > 0.99


@pytest.mark.slow  # an export takes ~15 s
def test_the_example_takes_any_prompt_without_torch(exported, tmp_path):
    checkpoint, out, _ = exported
    path = tmp_path / "im.png"
    Image.fromarray(_images(1)[0]).save(path)
    # torch (and so cdsam and open_clip) cannot be imported in this run of the example.
    code = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    run = subprocess.run([sys.executable, "-c", code, str(EXAMPLE), str(out), str(path),
                          "--prompt", "a red circle", "--prompt", "a photo of a dog",
                          "--out", str(tmp_path / "m")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    pred = load_model(checkpoint).predict(path, ["a red circle", "a photo of a dog"])
    for prompt, mask in zip(["a-red-circle", "a-photo-of-a-dog"], pred.masks, strict=True):
        got = np.asarray(Image.open(tmp_path / "m" / f"im__{prompt}.png")) > 0
        assert (got == mask).mean() > 0.99


@pytest.mark.slow  # an export takes ~15 s
def test_chosen_prompts_are_baked_in(ckpt, tmp_path):  # noqa: F811
    sidecar = _export(ckpt, tmp_path / "onnx", "--prompt", "a blue square", "--no-check",
                      "--fixed-prompts")
    assert sidecar["output"]["prompts"] == ["a blue square"]
    assert "parity" not in sidecar and "text" not in sidecar
    assert not (tmp_path / "onnx" / "text.onnx").exists()
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"))
    crop = sidecar["input"]["crop"]
    got = session.run(["logits"], {"images": np.zeros((1, 3, crop, crop), np.float32)})[0]
    assert got.shape == (1, 1, crop, crop)


FAMILIES = {"dinov3": {"dino": {"name": "vit_small_patch16_dinov3_qkvb"}},
            "sam2": {"sam": {"type": "sam2.1_hiera_b+"}}}


@pytest.mark.slow  # an export takes ~15 s
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_dinov3_and_sam2_checkpoints_export_with_parity(family, tmp_path):
    """The rotary DINOv3 and the SAM 2 decoder trace and match in onnxruntime too."""
    if family == "sam2":
        pytest.importorskip("sam2")
    p = tiny_params(model=FAMILIES[family])
    model = build_model(p.model, seed=p.seed)
    base = Base.of(model, p.seed)
    apply_stage(model, 1, p.lora.sam)
    apply_stage(model, 3, p.lora.sam, p.lora.dino)
    with torch.no_grad():  # trained-looking adapters, so the merge is checked too
        for _, m in lora_modules(model):
            m.lora_B.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    meta = CheckpointMeta(stage=3, model=to_dict(p.model), prompts=PROMPTS,
                          extra={"seed": p.seed, "data": to_dict(p.data)})
    save_checkpoint(tmp_path / "ckpt", model, meta, base)
    sidecar = _export(tmp_path / "ckpt", tmp_path / "onnx")
    assert sidecar["parity"]["max_abs_diff"] < 1e-3
    assert sidecar["parity"]["mask_agreement"] > 0.999


def test_missing_base_weights_are_one_line_and_nothing_is_written(ckpt, tmp_path, capsys):  # noqa: F811
    broken = tmp_path / "ckpt"
    shutil.copytree(ckpt, broken)
    meta = json.loads((broken / "meta.json").read_text())
    gone = tmp_path / "weights" / "dino.pth"
    meta["model"]["dino"]["checkpoint"] = str(gone)  # trained on a file that is gone now
    (broken / "meta.json").write_text(json.dumps(meta))
    out = tmp_path / "onnx"
    with pytest.raises(SystemExit) as exc:
        cli.main(["export", "--checkpoint", str(broken), "--out", str(out), "--mode", "onnx"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"error: {broken}: cannot rebuild the base weights")
    assert f"file not found: {gone}" in err[0]
    assert not out.exists()
    assert list(tmp_path.glob(".onnx*")) == []  # no half-written temporary folder either


@pytest.mark.slow  # an export takes ~30 s
def test_the_example_finds_the_objects_cdsam_predict_finds_without_torch(tmp_path):
    from tests.test_instance_files import SIZE, _checkpoint

    objects_ckpt = _checkpoint(tmp_path / "ckpt", min_quality=0.0)
    sidecar = _export(objects_ckpt, tmp_path / "onnx")
    assert sidecar["instances"]["graph"] == "seeds.onnx"
    assert max(sidecar["parity"]["instances"].values()) < 1e-4
    paths = []
    rng = np.random.default_rng(3)
    for i in range(3):  # at the input size: the example's Pillow fit is then exact
        paths.append(tmp_path / f"im{i}.png")
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(paths[-1])
    code = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    run = subprocess.run([sys.executable, "-c", code, str(EXAMPLE), str(tmp_path / "onnx"),
                          *map(str, paths), "--instances", "--out", str(tmp_path / "m")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    with pytest.raises(SystemExit) as exc:
        cli.main(["predict", "--checkpoint", str(objects_ckpt), "--input", *map(str, paths),
                  *[a for p in PROMPTS for a in ("--prompt", p)], "--out",
                  str(tmp_path / "cli"), "--instances", "--no-progress", "--no-overlay"])
    assert exc.value.code == 0
    found = 0
    for path in paths:
        got = np.asarray(Image.open(tmp_path / "m" / f"{path.stem}__instances.png"))
        want = np.asarray(Image.open(tmp_path / "cli" / f"{path.stem}__instances.png"))
        assert got.max() == want.max()  # the same count, numbered alike
        for k in range(1, int(want.max()) + 1):
            a, b = got == k, want == k  # (both empty: object k lies under better ones)
            assert not (a | b).any() or (a & b).sum() / (a | b).sum() >= 0.99
        found += int(want.max())
    assert found > 0


def test_the_examples_seed_loop_returns_nothing_where_no_seed_stands_out():
    import importlib.util

    spec = importlib.util.spec_from_file_location("onnx_predict", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    cfg = {"seed_threshold": 0.2, "seed_prominence": 0.1, "max_seeds": 500, "nms_iou": 0.5,
           "min_area": 4, "min_quality": 0.0, "presence_threshold": None}
    logits = np.full((32, 32), 5.0, np.float32)  # the mask everywhere, a flat heatmap
    masks, scores = example.prompt_objects(None, np.zeros((256, 4, 4), np.float32),
                                           np.zeros(8, np.float32), logits, 0.9,
                                           np.full((16, 16), 0.5), cfg)
    assert masks.shape == (0, 32, 32) and scores.shape == (0,)
    # Its bins are PyTorch's adaptive max pooling's: a 5x5 mask cut into 2x2 cells.
    prob = np.zeros((5, 5))
    prob[2, 2] = 0.9  # the middle pixel lies in all four bins
    assert example.cell_foreground(prob, (2, 2)).all()
