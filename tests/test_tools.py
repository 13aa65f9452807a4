"""tools/shape_learnability.py: its labels are the scenes' shapes, and it trains both backbones."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from cdsam.data.prepared import read_samples
from cdsam.data.sources.synthetic import SHAPES, attributes
from tests.conftest import TINY, prepared_arrays
from tests.test_train import data_dir  # noqa: F401  (the small prepared set)

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_learnability_labels_each_object_pixel_with_its_shape(data_dir):  # noqa: F811
    tool = _tool("shape_learnability")
    images, labels = tool.load_labels(data_dir, "train")
    masks, _ = prepared_arrays(data_dir)
    df = read_samples(data_dir, "train")
    assert images.shape[0] == labels.shape[0] == df["image"].nunique()
    assert images.dtype.is_floating_point and labels.shape[1:] == images.shape[2:]
    for i, (_, rows) in enumerate(df.groupby("image_row", sort=True)):
        covered = np.zeros(labels.shape[1:], bool)
        for sid, prompt in zip(rows["id"], rows["prompt"], strict=True):
            mask = masks[sid] > 0
            covered |= mask
            assert (labels[i].numpy()[mask] == 1 + SHAPES.index(attributes(prompt)[1])).all()
        assert (labels[i].numpy()[~covered] == 0).all()


def test_learnability_tool_trains_the_dino_and_the_cnn(data_dir, tmp_path):  # noqa: F811
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"model": TINY["model"], "data": TINY["data"]}))
    out = subprocess.run([sys.executable, str(TOOLS / "shape_learnability.py"), "--data",
                          str(data_dir), "--params", str(params), "--epochs", "1",
                          "--set", "depth=2"],
                         check=True, capture_output=True, text=True)
    headers = [line for line in out.stdout.splitlines() if "M params" in line]
    assert headers[0].startswith("DINO") and "depth 2" in headers[0]
    assert headers[1].startswith("CNN reference")
    scores = [float(line.split("val")[1].split()[0]) for line in out.stdout.splitlines()
              if line.strip().startswith("epoch")]
    assert len(scores) == 2 and all(0.0 <= s <= 1.0 for s in scores)


def test_cast_count_shows_fewer_casts_with_frozen_weights_held(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"model": TINY["model"], "data": TINY["data"]}))
    out = subprocess.run([sys.executable, str(TOOLS / "cast_count.py"), "--params", str(params),
                          "--preset", "default", "--stages", "1", "4"],
                         check=True, capture_output=True, text=True)
    rows = [line.strip("|").split("|") for line in out.stdout.splitlines()
            if line.startswith("| 1 ") or line.startswith("| 4 ")]
    for stage, plain, held, tensors, _ in rows:
        assert int(held) < int(plain) and int(tensors) > 0, (stage, plain, held)


def test_spatial_split_groups_targets_by_a_same_colour_object_in_the_scene():
    import pandas as pd
    import torch

    from cdsam.evaluation.scoring import EvalResult

    tool = _tool("spatial_split")
    df = pd.DataFrame({"image": ["a", "a", "a", "b", "b"],
                       "prompt": ["a red circle", "a red square", "a blue circle",
                                  "a red circle", "a green square"],
                       "negative": [False, False, False, False, True]})
    res = {"text": EvalResult(0, 0, 0, ious=[0.2, 0.4, 0.9, 0.8, 0.0]),
           "click": EvalResult(0, 0, 0, ious=[0.6, 0.6, 0.5, 0.7, 0.0])}
    table = tool.split_table(df, res)
    shared = table.loc["a same-colour object in the scene"]
    alone = table.loc["the only object of its colour"]
    assert shared["rows"] == 2 and abs(shared["text"] - 0.3) < 1e-9 and shared["click"] == 0.6
    assert alone["rows"] == 2 and abs(alone["text"] - 0.85) < 1e-9 and alone["click"] == 0.6
    assert table.loc["all positives", "rows"] == 4  # the negative row is left out
    a = [torch.tensor([True, True, False, False]), torch.zeros(4, dtype=torch.bool)]
    b = [torch.tensor([True, False, False, False]), torch.zeros(4, dtype=torch.bool)]
    iou, ratio = tool.mask_agreement(a, b)
    assert iou.tolist() == [0.5, 1.0] and ratio.tolist() == [0.5, 0.0]


def test_the_folders_import_along_the_layers_and_the_picture_is_current():
    tool = _tool("layers")
    assert tool.violations() == []
    # evaluation never reaches the trainer: the evaluate stage must not rerun on its edits
    assert not any(a == "evaluation" and b == "training" for a, b in tool.edges())
    picture = (TOOLS.parent / "docs" / "architecture.md").read_text()
    assert tool.mermaid() in picture, "docs/architecture.md: rerun python tools/layers.py"


def test_an_import_against_the_layers_is_named(tmp_path, monkeypatch):
    tool = _tool("layers")
    pkg = tmp_path / "cdsam"
    for folder in ("evaluation", "training"):
        (pkg / folder).mkdir(parents=True)
    (pkg / "training" / "trainer.py").write_text("X = 1\n")
    (pkg / "evaluation" / "scoring.py").write_text("from cdsam.training.trainer import X\n")
    monkeypatch.setattr(tool, "REPO", tmp_path)
    monkeypatch.setattr(tool, "PACKAGE", pkg)
    assert tool.violations() == ["cdsam.evaluation.scoring -> cdsam.training.trainer"]


def test_click_geometry_counts_the_pieces_a_click_cannot_name(tmp_path):
    """A target of two equal squares: the click's piece holds half of it; one square: all."""
    from PIL import Image

    from cdsam.config.schema import DataConfig, PrepareConfig
    from cdsam.data.prepare import prepare

    pytest.importorskip("scipy", reason="tools/click_geometry.py needs scipy")
    geometry = _tool("click_geometry")
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for i, squares in enumerate([[(4, 4)], [(4, 4), (20, 20)]] * 3):
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "images" / f"{i}.png")
        m = np.zeros((32, 32), np.uint8)
        for y, x in squares:
            m[y:y + 8, x:x + 8] = 255
        Image.fromarray(m).save(tmp_path / "masks" / f"{i}.png")
    cfg = PrepareConfig(source="folders", images=str(tmp_path / "images"),
                        masks=str(tmp_path / "masks"), prompt="a square", negatives="none",
                        val_fraction=0.34, test_fraction=0.0)
    prepare(cfg, 0, tmp_path / "p", show_progress=False, data=DataConfig(crop=32))
    f = geometry.figures(tmp_path / "p", radius_px=2.0)
    assert f["positives"] == 6 and f["pieces_mean"] == 1.5 and f["one_piece"] == 0.5
    assert f["clicked_piece"] == 0.75  # (1 + 0.5) / 2
    assert 0 < f["target_in_disk"] < f["disk_on_target"] <= 1
