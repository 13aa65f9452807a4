"""Shared fixtures: tiny seeded configs (the shipped defaults of `cdsam.config`, shrunk),
offline everything."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("DVCLIVE_TEST", "true")

import numpy as np  # noqa: E402

from cdsam.config.parse import parse_params
from cdsam.config.schema import ModelConfig, Params  # noqa: E402
from cdsam.data.geometry import Geometry  # noqa: E402
from cdsam.data.prepared import PreparedSplit, read_images, read_index  # noqa: E402

TINY = {
    "model": {"dino": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 4,
                       "num_heads": 2}},
    "data": {"resize": 32, "crop": 32},
    "lora": {"sam": {"rank": 2, "alpha": 4}, "dino": {"rank": 2, "alpha": 4, "last_k_blocks": 2}},
    **{f"stage{n}": {"epochs": 1} for n in (1, 2, 3, 4)},  # each keeps its other defaults
}


def tiny_params(**overrides) -> Params:
    """TINY with ``overrides`` (whole sections). Batches are (image, prompt) rows, 16 a batch,
    unless a test sets ``data.batch_by`` / ``optim.batch_size``: the loop tests compare steps,
    losses and ranks row for row (image-major batches have tests of their own,
    tests/test_image_major.py, and the pipeline tests run the shipped default)."""
    data = {k: dict(v) for k, v in TINY.items()}
    for key, value in overrides.items():
        data[key] = value
    data["data"] = {"batch_by": "sample", **data.get("data", {})}
    data["optim"] = {"batch_size": 16, **(data.get("optim") or {})}
    return parse_params(data)


def prepare_tiny(out: Path, num_images: int = 12) -> Path:
    """A small prepared set the loop tests are sized for: positives only, a quarter val, no
    test split, 32² synthetic shapes."""
    from cdsam.config.schema import PrepareConfig, SyntheticConfig
    from cdsam.data.prepare import prepare

    cfg = PrepareConfig(val_fraction=0.25, test_fraction=0.0, negatives="none",
                        synthetic=SyntheticConfig(num_images=num_images, image_size=32))
    prepare(cfg, seed=0, out=out, show_progress=False, data=tiny_params().data)
    return out


@pytest.fixture
def params() -> Params:
    return tiny_params()


@pytest.fixture
def model_cfg(params) -> ModelConfig:
    return params.model


# Real images shared next to the project (never copied into it); tests that read them skip
# when they are absent. CDSAM_REAL_DATA points elsewhere.
REAL_DATA = Path(os.environ.get("CDSAM_REAL_DATA",
                                Path(__file__).resolve().parents[2] / "shared" / "real-data"))


def real_data(name: str) -> Path:
    path = REAL_DATA / name
    if not path.is_dir():
        pytest.skip(f"real data {path} not found (set CDSAM_REAL_DATA to the shared "
                    f"real-data folder)")
    return path


def prepared_arrays(root: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(mask by sample id, image by stem) as the stages read them from a prepared folder;
    under the pad fit cut to the image's own (resized) extent, so a folder prepared with
    ``data.crop`` = the longer side shows each mask at its original pixels."""
    index = read_index(root)
    sizes = read_images(root).set_index("image")
    masks, images = {}, {}
    for split in index["splits"]:
        p = PreparedSplit.open(root, split)
        all_masks = p.masks(np.arange(len(p)))
        all_images = p.image_rows(np.arange(len(p.image_keys)))
        for key, image in zip(p.image_keys, all_images, strict=True):
            h, w = int(sizes.loc[key, "height"]), int(sizes.loc[key, "width"])
            rh, rw = Geometry.of(h, w, index["resize"], index["crop"], index["fit"]).resized \
                if index["fit"] == "pad" else (index["crop"], index["crop"])
            images[key] = image[:, :rh, :rw]
        for i, sid in enumerate(p.ids):
            key = p.image_keys[p.image_row[i]]
            masks[sid] = all_masks[i][:images[key].shape[1], :images[key].shape[2]]
    return masks, images
