"""Clicks and boxes drawn as a map for SAM's mask-input encoder (`cdsam.models.prompt_map`)."""

from __future__ import annotations

import torch

from cdsam.config.parse import to_dict
from cdsam.models.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from cdsam.models.model import build_model
from cdsam.models.prompt_map import MAP_LOGIT, draw_prompt_map, map_size
from cdsam.training.curriculum import SAM_PROMPT_MAP, apply_stage

CPU = torch.device("cpu")


def _points(xy: list[list[float]], labels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([xy], dtype=torch.float32), torch.tensor([labels])


def test_map_has_sam_mask_input_resolution():
    assert map_size((16, 20)) == (64, 80)  # two stride-2 convolutions back to the grid


def test_a_box_fills_the_map_pixels_it_touches():
    # 64x64 input on a 16x16 map: map pixel j covers input pixels 4j .. 4j+3.
    m = draw_prompt_map((16, 16), (64, 64), None, torch.tensor([[8.0, 4.0, 19.0, 40.0]]),
                        None, 1, CPU)[0, 0]
    expect = torch.zeros(16, 16)
    expect[1:11, 2:5] = MAP_LOGIT  # rows 4..40 → map rows 1..10, columns 8..19 → 2..4
    assert torch.equal(m, expect)
    tiny = draw_prompt_map((16, 16), (64, 64), None, torch.tensor([[9.0, 9.0, 9.0, 9.0]]),
                           None, 1, CPU)[0, 0]
    assert tiny.sum() == MAP_LOGIT and tiny[2, 2] == MAP_LOGIT


def test_clicks_mark_disks_background_wins_and_empty_slots_mark_nothing():
    fg = draw_prompt_map((32, 32), (32, 32), _points([[10, 10], [0, 0]], [1, -1]), None, None,
                         1, CPU, click_radius=0.75)[0, 0]
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    disk = (ys - 10) ** 2 + (xs - 10) ** 2 <= 3 ** 2  # 0.75 cells = 3 map pixels
    assert torch.equal(fg == MAP_LOGIT, disk) and fg[~disk].eq(0).all()
    both = draw_prompt_map((32, 32), (32, 32), _points([[10, 10], [12, 10]], [1, 0]),
                           torch.tensor([[0.0, 0.0, 31.0, 31.0]]), None, 1, CPU,
                           click_radius=0.75)[0, 0]
    assert both[10, 12] == -MAP_LOGIT and both[10, 8] == MAP_LOGIT and both[30, 30] == MAP_LOGIT
    none = draw_prompt_map((32, 32), (32, 32), _points([[10, 10]], [-1]),
                           torch.tensor([[0.0, 0.0, 31.0, 31.0]]), torch.tensor([False]), 1, CPU)
    assert not none.any()


def test_rows_keep_their_own_prompts():
    points = (torch.tensor([[[4.0, 4.0]], [[28.0, 28.0]]]), torch.tensor([[1], [1]]))
    m = draw_prompt_map((32, 32), (32, 32), points, None, None, 2, CPU, click_radius=0.75)[:, 0]
    assert m[0, 4, 4] == MAP_LOGIT and m[0, 28, 28] == 0
    assert m[1, 28, 28] == MAP_LOGIT and m[1, 4, 4] == 0


def test_a_box_reaches_the_mask_through_the_map(params):
    """Same weights, map on vs off: only the map differs, and it moves the boxed row."""
    images = torch.randn(2, 3, 32, 32)
    prompts = ["a red circle", "a blue square"]
    boxes = torch.tensor([[0.0, 0.0, 15.0, 15.0]] * 2)
    outs = {}
    for on in (True, False):
        model = build_model(params.model, seed=0).eval()
        model.sam.prompt_map = on
        with torch.no_grad():
            outs[on] = model(images, prompts, boxes=boxes).masks
    assert not torch.allclose(outs[True], outs[False], atol=1e-3)


def test_the_map_encoder_trains_in_every_stage_only_with_the_map(params):
    for stage, mode in ((1, "lora"), (2, "lora"), (4, "full"), (4, "frozen")):
        for on in (True, False):
            model = build_model(params.model, seed=0)
            model.sam.prompt_map = on
            apply_stage(model, 1, params.lora.sam)
            if stage != 1:
                apply_stage(model, stage, params.lora.sam,
                            params.lora.dino if stage in (2, 3) else None, mode)
            enc = model.sam.get_submodule(SAM_PROMPT_MAP)
            assert all(p.requires_grad == on for p in enc.parameters()), (stage, mode, on)


def test_a_checkpoint_from_before_the_map_decodes_without_it(tmp_path, params):
    model = build_model(params.model, seed=0)
    old = to_dict(params.model)
    del old["sam"]["prompt_map"]
    save_checkpoint(tmp_path / "old", model, CheckpointMeta(stage=1, model=old))
    save_checkpoint(tmp_path / "new", model, CheckpointMeta(stage=1, model=to_dict(params.model)))
    assert load_checkpoint(tmp_path / "old")[0].sam.prompt_map is False
    assert load_checkpoint(tmp_path / "new")[0].sam.prompt_map is True


def test_the_click_radius_is_counted_in_embedding_cells(params):
    click = _points([[16, 16]], [1])  # on a map pixel's centre: lattice points in a disk
    small = draw_prompt_map((32, 32), (32, 32), click, None, None, 1, CPU, click_radius=0.75)
    large = draw_prompt_map((32, 32), (32, 32), click, None, None, 1, CPU, click_radius=2.0)
    assert int(small.sum()) == 29 and int(large.sum()) == 197  # r = 3 and 8 map pixels
    model = build_model(params.model, seed=0)
    assert model.sam.click_radius == params.model.sam.click_radius


def test_a_radius_that_is_not_positive_names_its_key():
    import pytest

    from cdsam.config.parse import parse_params
    from cdsam.errors import ConfigError

    with pytest.raises(ConfigError, match="model.sam.click_radius"):
        parse_params({"model": {"sam": {"click_radius": 0}}})
