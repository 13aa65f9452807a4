"""`python -m cdsam.evaluation.bench`: the instance-decoding cost figures, from one run."""

from __future__ import annotations

import torch

from cdsam.config.parse import to_dict
from cdsam.evaluation.bench import time_split
from cdsam.models.checkpoint import CheckpointMeta, save_checkpoint
from cdsam.models.model import build_model
from tests.conftest import prepare_tiny, tiny_params


def test_bench_times_every_pass_and_counts_decoder_rows(tmp_path):
    data = prepare_tiny(tmp_path / "data", num_images=8)
    p = tiny_params()
    model = build_model(p.model, seed=0)
    with torch.no_grad():  # a centre head with steep peaks: seeds to decode
        model.centre_head.body[-1].weight.mul_(50.0)
        model.centre_head.body[-1].bias.add_(4.0)
    save_checkpoint(tmp_path / "ckpt", model, CheckpointMeta(stage=1, model=to_dict(p.model)))
    r = time_split(tmp_path / "ckpt", data, "val", repeats=1, device="cpu")
    images, pairs = r["split"]["images"], r["split"]["pairs"]
    assert images == 2 and pairs >= 2
    assert r["semantic"]["decoder_rows_per_image"] == pairs / images
    assert r["prompts"]["decoder_rows_per_image"] > pairs / images  # one row a seed
    assert r["watershed"]["decoder_rows_per_image"] == pairs / images  # no extra rows
    assert all(r[k]["s_per_image"] > 0 for k in ("semantic", "prompts", "watershed"))
