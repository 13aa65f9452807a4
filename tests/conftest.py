"""Shared fixtures: tiny seeded configs, offline everything."""

from __future__ import annotations

import os

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
