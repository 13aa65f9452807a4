"""Inference API, `cdsam predict`, merged exports."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from cdsam import cli
from cdsam.config.parse import to_dict
from cdsam.data.geometry import Geometry
from cdsam.inference.export import export
from cdsam.inference.predictor import load_model, semantic_labels
from cdsam.models.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from cdsam.models.delta_base import Base
from cdsam.models.lora import lora_modules
from cdsam.models.model import build_model
from cdsam.training.curriculum import apply_stage
from tests.conftest import tiny_params

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A stage-3-like checkpoint: seeded base + LoRA on SAM and DINO + changed heads."""
    p = tiny_params()
    model = build_model(p.model, load_weights=True, seed=p.seed)
    base = Base.of(model, p.seed)
    apply_stage(model, 2, p.lora.sam, p.lora.dino, "lora")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.05)
        for prm in model.text_to_prompt.parameters():
            prm.add_(torch.randn(prm.shape, generator=gen) * 0.05)
    path = tmp_path_factory.mktemp("ckpt") / "stage3"
    meta = CheckpointMeta(stage=3, model=to_dict(p.model), prompts=PROMPTS,
                          extra={"seed": p.seed, "data": to_dict(p.data)})
    save_checkpoint(path, model, meta, base)
    return path


def _image(h=40, w=56) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("h,w", [(40, 56), (56, 40), (32, 32), (77, 33)])
def test_geometry_matches_torchvision(h, w):
    geo = Geometry.of(h, w, resize=36, crop=32)
    resized = v2.Resize(36, antialias=True)(torch.zeros(1, h, w))
    assert tuple(resized.shape[-2:]) == geo.resized
    # A marker at the crop's top-left corner survives CenterCrop at (0, 0).
    marked = torch.zeros(1, *geo.resized)
    marked[0, geo.top, geo.left] = 1
    assert v2.CenterCrop(32)(marked)[0, 0, 0] == 1
    back = geo.to_original(torch.zeros(1, 32, 32))
    assert back.shape == (1, h, w)


def test_predict_returns_one_mask_per_prompt_at_image_size(ckpt, tmp_path):
    pred = load_model(ckpt)
    img = _image()
    out = pred.predict(img, PROMPTS, return_logits=True)
    assert out.masks.shape == (2, 40, 56) and out.masks.dtype == bool
    assert out.logits.shape == (2, 40, 56)
    assert not np.allclose(out.logits[0], out.logits[1])  # the text changes the mask
    path = tmp_path / "x.png"
    Image.fromarray(img).save(path)
    from_path = pred.predict(path, PROMPTS, return_logits=True)
    from_pil = pred.predict(Image.open(path), PROMPTS, return_logits=True)
    np.testing.assert_allclose(from_path.logits, out.logits, atol=1e-5)
    np.testing.assert_allclose(from_pil.logits, out.logits, atol=1e-5)
    single = pred.predict(img, PROMPTS[1], return_logits=True)
    np.testing.assert_allclose(single.logits[0], out.logits[1], atol=1e-4)
    clicked = pred.predict(img, PROMPTS, points=[(10, 12)], boxes=(5, 5, 30, 30),
                           return_logits=True)
    assert clicked.masks.shape == (2, 40, 56)
    assert not np.allclose(clicked.logits, out.logits)


def test_semantic_labels_argmax_with_background():
    probs = np.array([[[0.9, 0.2, 0.6]], [[0.1, 0.3, 0.7]]])
    assert semantic_labels(probs, 0.5).tolist() == [[1, 0, 2]]


def test_merged_export_has_no_lora_and_same_masks(ckpt, tmp_path):
    info = export(ckpt, tmp_path / "merged", "merged")
    assert info["merged_lora"] > 0
    model, meta = load_checkpoint(tmp_path / "merged")
    assert meta.lora == [] and not list(lora_modules(model))
    assert meta.base is None  # self-contained: every tensor, no base weights needed
    assert info["bytes"] > 5 * (ckpt / "model.safetensors").stat().st_size
    img = _image()
    a = load_model(ckpt).predict(img, PROMPTS, return_logits=True)
    b = load_model(tmp_path / "merged").predict(img, PROMPTS, return_logits=True)
    np.testing.assert_allclose(a.logits, b.logits, atol=1e-3)
    assert (a.masks == b.masks).mean() > 0.999


def test_cli_predict_writes_masks_overlay_semantic(ckpt, tmp_path, capsys):
    img_path = tmp_path / "scene 1.png"
    Image.fromarray(_image(36, 50)).save(img_path)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        cli.main(["predict", "--checkpoint", str(ckpt), "--image", str(img_path),
                  "--prompt", "a Red circle!", "--prompt", "a blue square", "--out", str(out),
                  "--semantic", "--no-progress"])
    assert exc.value.code == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["scene 1__a-blue-square.png", "scene 1__a-red-circle.png",
                     "scene 1__overlay.png", "scene 1__semantic.png", "summary.csv",
                     "summary.json"]
    mask = Image.open(out / "scene 1__a-red-circle.png")
    assert mask.size == (50, 36) and set(np.unique(np.asarray(mask))) <= {0, 255}
    sem = Image.open(out / "scene 1__semantic.png")
    assert sem.mode == "P" and sem.size == (50, 36)
    assert set(np.unique(np.asarray(sem))) <= {0, 1, 2}


def test_cli_predict_bad_image_is_one_line(ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["predict", "--checkpoint", str(ckpt), "--image", str(tmp_path / "nope.png"),
                  "--prompt", "a red circle", "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --input: {tmp_path / 'nope.png'}: not found"]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(SystemExit) as exc:
        cli.main(["predict", "--checkpoint", str(ckpt), "--image", str(broken),
                  "--prompt", "a red circle", "--out", str(tmp_path / "o"), "--no-progress"])
    assert exc.value.code == 2
    assert "broken.png: unreadable image" in capsys.readouterr().err


def test_cli_predict_clicks_and_a_box_give_the_masks_predict_gives(ckpt, tmp_path):
    import json

    img_path = tmp_path / "cells.png"
    Image.fromarray(_image(36, 50)).save(img_path)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        cli.main(["predict", "--checkpoint", str(ckpt), "--image", str(img_path),
                  "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--point", "10,12",
                  "--point", "20.5,30", "--box", "5,5,30,30", "--out", str(out),
                  "--save-probs", "npy", "--no-progress"])
    assert exc.value.code == 0
    want = load_model(ckpt).predict(img_path, PROMPTS, points=[(10, 12), (20.5, 30)],
                                    boxes=(5, 5, 30, 30), return_logits=True)
    plain = load_model(ckpt).predict(img_path, PROMPTS, return_logits=True)
    probs = np.load(out / "cells__probs.npy")
    np.testing.assert_allclose(probs, want.probs, atol=2e-3)  # float16 on disk
    assert np.abs(probs - plain.probs).max() > 1e-2  # the clicks and box changed the masks
    summary = json.loads((out / "summary.json").read_text())
    assert summary["points"] == [[10, 12], [20.5, 30]] and summary["box"] == [5, 5, 30, 30]
    overlay = np.asarray(Image.open(out / "cells__overlay.png"))  # 50 px wide: drawn 6x
    assert (overlay[12 * 6, 10 * 6] == 255).all()  # the first click, a white dot


@pytest.mark.parametrize("extra,message", [
    (["--point", "12"], "error: --point: '12' is not X,Y (2 numbers, image pixels)"),
    (["--box", "30,5,5,30"], "error: --box: '30,5,5,30' needs X0 < X1 and Y0 < Y1"),
    (["--point", "60,3"], "error: --point: (60, 3) is outside {img} (50x36 pixels)"),
    (["--point", "50,3"], "error: --point: (50, 3) is outside {img} (50x36 pixels)"),
    (["--point", "1,2", "--image", "{img2}"],
     "error: --point: for one image at a time (2 inputs given)"),
    (["--box", "1,2,3,4", "--tile", "32"],
     "error: --box: not with --tile (a click would fall in some windows only)"),
])
def test_cli_predict_bad_clicks_are_one_line(ckpt, tmp_path, capsys, extra, message):
    img, img2 = tmp_path / "a.png", tmp_path / "b.png"
    for path in (img, img2):
        Image.fromarray(_image(36, 50)).save(path)
    with pytest.raises(SystemExit) as exc:
        cli.main(["predict", "--checkpoint", str(ckpt), "--image", str(img), "--prompt",
                  PROMPTS[0], "--out", str(tmp_path / "o"), "--no-progress",
                  *[e.format(img2=img2) for e in extra]])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [message.format(img=img)]
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("*.png"))


def _folder(tmp_path, n=5):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(n):
        h, w = 30 + 7 * i, 60 - 5 * i  # every image its own size
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            folder / f"im{i}.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_cli_predict_folder_batched_with_summary(ckpt, tmp_path):
    import json

    import pandas as pd

    folder = _folder(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# what to look for\na red circle\n\na blue square\n")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        cli.main(["predict", "--checkpoint", str(ckpt), "--input", str(folder),
                  "--prompts-file", str(prompts), "--out", str(out), "--batch-size", "2",
                  "--device", "auto", "--save-probs", "npy", "--no-progress"])
    assert exc.value.code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 5 and summary["skipped"] == []
    assert summary["text_encoder_calls"] == 2  # once per prompt for the whole run
    assert summary["images_per_s"] > 0
    rows = pd.read_csv(out / "summary.csv")
    assert len(rows) == 10 and set(rows["prompt"]) == {"a red circle", "a blue square"}
    # Batched equals one image at a time (same masks, same probabilities).
    predictor = load_model(ckpt)
    for i in range(5):
        pred = predictor.predict(folder / f"im{i}.png", ["a red circle", "a blue square"],
                                 return_logits=True)
        probs = np.load(out / f"im{i}__probs.npy")
        assert probs.shape == pred.masks.shape
        np.testing.assert_allclose(probs, pred.probs, atol=2e-3)  # float16 on disk
        mask = np.asarray(Image.open(out / f"im{i}__a-red-circle.png")) > 0
        assert (mask == pred.masks[0]).mean() > 0.999
        row = rows[(rows["image"] == str(folder / f"im{i}.png"))
                   & (rows["prompt"] == "a red circle")].iloc[0]
        assert row["area_px"] == mask.sum()


def test_cli_predict_bad_files_stop_or_are_skipped(ckpt, tmp_path, capsys):
    import json

    folder = _folder(tmp_path, n=3)
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    args = ["predict", "--checkpoint", str(ckpt), "--input", str(folder), "--prompt",
            "a red circle", "--no-progress"]
    with pytest.raises(SystemExit) as exc:
        cli.main(args + ["--out", str(tmp_path / "a")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "corrupt.jpg: unreadable image" in err[0]
    with pytest.raises(SystemExit) as exc:
        cli.main(args + ["--out", str(tmp_path / "b"), "--on-bad-file", "skip"])
    assert exc.value.code == 0
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["images"] == 3
    assert [s["image"] for s in summary["skipped"]] == [str(folder / "corrupt.jpg")]
    assert (tmp_path / "b" / "im2__a-red-circle.png").is_file()
    capsys.readouterr()
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n")
    with pytest.raises(SystemExit) as exc:
        cli.main(["predict", "--checkpoint", str(ckpt), "--input", str(folder),
                  "--prompts-file", str(empty), "--out", str(tmp_path / "c")])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip() == \
        f"error: --prompts-file: {empty}: has no prompts (one per line)"


def test_output_names_are_unique_and_stable():
    from pathlib import Path

    from cdsam.inference.files import output_stems

    paths = [Path(p) for p in ("imgs/cell1.png", "imgs/cell1.tif", "2023/01/scan.png",
                               "2024/01/scan.png", "a/b_c.png", "a_b/c.png", "solo.png",
                               "x/01_scan.png")]
    names = output_stems(paths)
    assert len(set(names)) == len(paths), names
    assert names[:2] == ["cell1_png", "cell1_tif"]
    assert names[2:4] == ["2023_01_scan", "2024_01_scan"]
    assert names[6] == "solo" and output_stems(paths) == names
    # Unique stems keep their names (counted once, not once per path).
    many = [Path(f"d{i % 7}/img{i}.png") for i in range(20000)]
    assert output_stems(many) == [p.stem for p in many]


def test_python_m_cdsam_cli_runs_the_cli():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "cdsam.cli", "--help"], capture_output=True,
                         text=True)
    assert out.returncode == 0 and "predict" in out.stdout, out.stderr


@pytest.mark.parametrize("prompt", ["Overlay", "semantic!"])
def test_a_prompt_named_like_an_images_own_file_is_refused(prompt):
    """``{stem}__overlay.png`` and ``{stem}__semantic.png`` are the overlay's and the label
    map's: a prompt with that slug would overwrite one of them."""
    from cdsam.errors import UserError
    from cdsam.inference.files import read_prompts

    with pytest.raises(UserError, match="reword it"):
        read_prompts(["a cell", prompt], None)
    assert read_prompts(["an overlay"], None) == ["an overlay"]


def test_presence_gates_text_masks_not_clicked_ones(ckpt):
    """A prompt whose presence is below the threshold gets an empty mask; with a click the
    user says the object is there, so nothing is gated; no threshold, no gating."""
    img = _image()
    free = load_model(ckpt, presence_threshold=0.0)
    ref = free.predict(img, PROMPTS, return_logits=True, threshold=0.3)
    assert ref.presence.shape == (2,) and ((ref.presence > 0) & (ref.presence < 1)).all()
    cut = float(ref.presence.mean())  # between the two prompts' presence, or above both
    gated = load_model(ckpt, presence_threshold=cut).predict(img, PROMPTS, return_logits=True,
                                                             threshold=0.3)
    below = ref.presence < cut
    assert below.any() and not below.all()
    assert not gated.masks[below].any()
    np.testing.assert_array_equal(gated.masks[~below], ref.masks[~below])
    assert np.allclose(gated.presence, ref.presence)
    clicked = load_model(ckpt, presence_threshold=0.999).predict(img, PROMPTS, points=[(10, 12)])
    clicked_free = free.predict(img, PROMPTS, points=[(10, 12)])
    np.testing.assert_array_equal(clicked.masks, clicked_free.masks)
