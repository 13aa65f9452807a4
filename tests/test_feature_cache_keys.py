"""The feature cache stores each image row once, even when two images share a stem."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from cdsam.data.manifest import BACKGROUND, FOREGROUND, Sample
from cdsam.data.packed import normalize_batch
from cdsam.data.shards import ShardWriter
from cdsam.models.model import build_model
from cdsam.runtime import precision_for
from cdsam.training.feature_cache import build_feature_cache
from cdsam.training.loaders import open_stage_data
from tests.conftest import tiny_params


def test_images_that_share_a_stem_across_splits_keep_their_own_features(tmp_path):
    """``frame_000000`` in train and in val (two videos, or a COCO val file named like a train
    one): keyed by stem, val was served train's DINO features."""
    params = tiny_params(device="cpu", train={"feature_cache": True})
    writer = ShardWriter(tmp_path, params.data)
    rng = np.random.default_rng(0)
    for split, prompt in (("train", "a red circle"), ("val", "a blue square")):
        pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        mask = np.full((32, 32), BACKGROUND, np.uint8)
        mask[8:20, 8:20] = FOREGROUND
        writer.add_image("frame_000000", Image.fromarray(pixels), [Sample(
            "frame_000000", prompt, mask)], split)
    writer.finish(["train", "val"])
    data = open_stage_data(tmp_path, params)
    model = build_model(params.model, seed=0)
    model.dino.requires_grad_(False)
    for block in model.dino.blocks[2:]:
        block.requires_grad_(True)  # as in stage 2: the frozen prefix is blocks 0-1
    cache = build_feature_cache(model, params, data, precision_for(torch.device("cpu")), True)
    assert cache is not None and len(cache) == 2
    for split in ("train", "val"):
        pack = data.splits[split]
        (key,) = pack.cache_keys
        image = torch.from_numpy(pack.image_rows(range(1)))
        with torch.no_grad():
            expected = model.dino_prefix(normalize_batch(image), cache.end_block)[0]
        torch.testing.assert_close(cache.store[key], expected)
