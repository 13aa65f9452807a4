"""`python -m cdsam.evaluation.bench`: the instance-decoding cost figures, from one run."""

from __future__ import annotations

import pytest
import torch

from cdsam.config.parse import to_dict
from cdsam.evaluation.bench import time_split
from cdsam.models.checkpoint import CheckpointMeta, save_checkpoint
from cdsam.models.model import build_model
from tests.conftest import prepare_tiny, tiny_params


def test_bench_times_both_passes_and_counts_decoder_rows(tmp_path):
    data = prepare_tiny(tmp_path / "data", num_images=8)
    p = tiny_params()
    model = build_model(p.model, seed=0)
    with torch.no_grad():  # a centre head that fires everywhere: seeds to decode
        model.centre_head.body[-1].bias.fill_(2.0)
    save_checkpoint(tmp_path / "ckpt", model, CheckpointMeta(stage=1, model=to_dict(p.model)))
    r = time_split(tmp_path / "ckpt", data, "val", repeats=1, device="cpu")
    assert r["images"] == 2 and r["pairs"] >= 2
    assert r["seeds_per_pair"] > 0
    assert r["decoder_rows_per_image"] == pytest.approx(
        r["pairs"] * (1 + r["seeds_per_pair"]) / r["images"])
    assert r["semantic_s_per_image"] > 0 and r["instances_s_per_image"] > 0
