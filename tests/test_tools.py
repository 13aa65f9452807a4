"""tools/shape_learnability.py: its labels are the scenes' shapes, and it trains both backbones."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from cdsam.data.prepared import read_samples
from cdsam.data.synthetic import SHAPES, attributes
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
