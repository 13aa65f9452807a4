"""Shared fixtures: tiny seeded configs (the shipped defaults of `cdsam.config`, shrunk),
offline everything."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("DVCLIVE_TEST", "true")

from cdsam.config import ModelConfig, Params, parse_params  # noqa: E402

TINY = {
    "model": {"dino": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 4,
                       "num_heads": 2}},
    "data": {"resize": 32, "crop": 32},
    "lora": {"sam": {"rank": 2, "alpha": 4}, "dino": {"rank": 2, "alpha": 4, "last_k_blocks": 2}},
    **{f"stage{n}": {"epochs": 1} for n in (1, 2, 3, 4)},  # each keeps its other defaults
}


def tiny_params(**overrides) -> Params:
    data = {k: dict(v) for k, v in TINY.items()}
    for key, value in overrides.items():
        data[key] = value
    return parse_params(data)


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
