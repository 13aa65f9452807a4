"""Instance decoding (cdsam.inference.instances), its targets (cdsam.data.centres), the
point-prompted object target (cdsam.data.packed.focus_clicked_objects), components
(prepare.instances_from) and the synthetic scenes' objects."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cdsam.config.schema import InstanceConfig, PrepareConfig, SyntheticConfig
from cdsam.data.centres import centre_heatmap
from cdsam.data.manifest import BadFiles, Sample
from cdsam.data.sources.listing import load_scene
from cdsam.data.sources.objects import component_instances
from cdsam.data.sources.synthetic import make_scene
from cdsam.data.spatial import SpatialPolicy, focus_clicked_objects, prompt_arrays
from cdsam.inference.instances import (
    Instances,
    find_seeds,
    mask_components,
    mask_nms,
    seed_points,
    watershed_instances,
)


def _blob(size: int, cy: float, cx: float, sigma: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma ** 2))


def test_seeds_are_the_heatmap_peaks_strongest_first():
    heat = np.maximum(0.9 * _blob(32, 8, 10, 2), 0.6 * _blob(32, 20, 22, 2))
    heat = np.maximum(heat, 0.1 * _blob(32, 28, 4, 1))  # below seed_threshold
    everywhere = np.ones_like(heat, bool)
    peaks, strength = find_seeds(heat, everywhere, InstanceConfig(seed_threshold=0.2))
    assert peaks.tolist() == [[8, 10], [20, 22]]
    assert np.allclose(strength, [0.9, 0.6])
    # Cell centres at 4x the heatmap's size: cell (8, 10) → pixel (x 41.5, y 33.5).
    assert seed_points(peaks, (32, 32), (128, 128)).tolist() == [[41.5, 33.5], [89.5, 81.5]]
    # Off the semantic mask, a peak is no seed.
    off = np.ones_like(heat, bool)
    off[15:25, 15:25] = False
    assert find_seeds(heat, off, InstanceConfig(seed_threshold=0.2))[0].tolist() == [[8, 10]]


def test_a_peak_is_a_seed_when_it_rises_above_its_saddle_by_the_prominence():
    # Two peaks 6 cells apart: the lower (0.95) dips to 0.32 before the higher, so both are
    # seeds at prominence 0.1 and one at 0.7; 2 cells apart it dips to 0.88 only: one seed.
    everywhere = np.ones((32, 32), bool)
    two = np.maximum(_blob(32, 10, 10, 2), 0.95 * _blob(32, 10, 16, 2))
    assert len(find_seeds(two, everywhere, InstanceConfig(seed_prominence=0.1))[0]) == 2
    assert len(find_seeds(two, everywhere, InstanceConfig(seed_prominence=0.7))[0]) == 1
    ridge = np.maximum(_blob(32, 10, 10, 2), 0.95 * _blob(32, 10, 12, 2))
    assert len(find_seeds(ridge, everywhere, InstanceConfig(seed_prominence=0.1))[0]) == 1
    # A plateau (an object's flat top) is one seed.
    flat = np.zeros((32, 32))
    flat[4:9, 4:9] = 0.8
    assert len(find_seeds(flat, everywhere, InstanceConfig())[0]) == 1


def test_watershed_splits_touching_objects_and_keeps_unseeded_pieces():
    prob = np.zeros((32, 32))
    prob[4:12, 2:18] = 0.9  # two touching objects: one piece of the mask
    prob[20:26, 20:26] = 0.7  # an object the heatmap missed
    heat = np.maximum(_blob(32, 8, 6, 2), _blob(32, 8, 14, 2))
    found = watershed_instances(heat, prob, 0.5, presence=0.8, cfg=InstanceConfig())
    areas = sorted(found.masks.sum(axis=(1, 2)).tolist())
    # Split at the trough (column 10, between the peaks at 6 and 14: it joins one side), the
    # third whole.
    assert areas == [36, 56, 72]
    assert found.masks.sum(axis=0).max() == 1  # a partition of the mask
    assert (found.masks.any(axis=0) == (prob > 0.5)).all()
    assert sorted(found.quality.round(3).tolist()) == [0.7, 0.9, 0.9]
    assert found.decoder_rows == 0
    # Score = presence x mean probability x the heatmap's peak inside the object.
    unseeded = found.masks[:, 22, 22].argmax()
    assert found.scores[unseeded] == pytest.approx(0.8 * 0.7 * heat[20:26, 20:26].max())
    assert len(watershed_instances(heat, np.zeros((32, 32)), 0.5, 0.8, InstanceConfig())) == 0


def test_mask_nms_keeps_the_better_of_overlapping_masks():
    m = np.zeros((3, 10, 10), bool)
    m[0, 0:5, 0:5] = True
    m[1, 0:5, 0:4] = True  # IoU 0.8 with mask 0
    m[2, 6:9, 6:9] = True
    assert sorted(mask_nms(m, np.array([0.5, 0.9, 0.3]), iou=0.5).tolist()) == [1, 2]
    assert sorted(mask_nms(m, np.array([0.5, 0.9, 0.3]), iou=0.9).tolist()) == [0, 1, 2]


def test_presence_gates_every_instance():
    masks = np.ones((2, 4, 4), bool)
    found = Instances(masks, np.array([0.4, 0.1]), np.array([0.5, 0.125]), presence=0.8)
    assert found.kept(0.5, 0.25).tolist() == [True, False]
    assert found.kept(0.9, 0.25).tolist() == [False, False]  # "not here": nothing returned


def test_components_split_a_mask_into_its_pieces():
    prob = np.zeros((12, 12))
    prob[1:4, 1:4] = 0.9
    prob[6:10, 6:10] = 0.7
    prob[11, 0] = 0.8  # one pixel: below min_area
    found = mask_components(prob, 0.5, presence=0.5, min_area=2)
    assert len(found) == 2
    assert sorted(found.masks.sum(axis=(1, 2)).tolist()) == [9, 16]
    assert sorted(found.scores.round(3).tolist()) == [0.35, 0.45]


def test_centre_heatmap_peaks_at_each_objects_centre():
    ids = torch.zeros(1, 1, 16, 16, dtype=torch.uint8)
    ids[0, 0, 2:7, 2:7] = 1
    ids[0, 0, 2:7, 7:12] = 2  # touching: one connected piece, two objects
    heat = centre_heatmap(ids, (16, 16))[0, 0]
    assert heat[4, 4] == 1 and heat[4, 9] == 1
    assert heat[4, 6] < 1 and heat[4, 7] < 1  # a trough where they touch
    assert heat[ids[0, 0] == 0].abs().max() == 0
    peaks, _ = find_seeds(heat.numpy(), ids[0, 0].numpy() > 0, InstanceConfig())
    assert sorted(peaks.tolist()) == [[4, 4], [4, 9]]
    assert centre_heatmap(ids, (8, 8)).shape == (1, 1, 8, 8)


def test_a_click_on_one_object_targets_that_object_alone():
    mask = np.zeros((1, 12, 12), np.uint8)
    objects = np.zeros((1, 12, 12), np.uint8)
    mask[0, 1:5, 1:5] = 1
    objects[0, 1:5, 1:5] = 1
    mask[0, 6:11, 6:11] = 1
    objects[0, 6:11, 6:11] = 2
    mask[0, 0, 11] = 255  # ignore stays ignore
    policy = SpatialPolicy(point=1.0, negative=0.0)
    slots = prompt_arrays(1)
    slots["points"][0, 0] = [8, 8]  # (x, y) on object 2
    slots["point_labels"][0, 0] = 1
    changed = focus_clicked_objects(mask, objects, slots, [7], policy)
    assert changed == [0]
    assert (mask[0] == 1).sum() == 25 and mask[0, 8, 8] == 1 and mask[0, 2, 2] == 0
    assert mask[0, 0, 11] == 255
    x, y = slots["points"][0, 0].astype(int)
    assert slots["point_labels"][0, 0] == 1 and objects[0, y, x] == 2  # redrawn inside it


def test_a_click_off_every_object_keeps_the_class_target():
    mask = np.zeros((1, 8, 8), np.uint8)
    mask[0, 2:6, 2:6] = 1
    objects = np.zeros((1, 8, 8), np.uint8)  # a class without objects
    slots = prompt_arrays(1)
    slots["points"][0, 0] = [3, 3]
    slots["point_labels"][0, 0] = 1
    assert focus_clicked_objects(mask, objects, slots, [0], SpatialPolicy(point=1.0)) == []
    assert (mask[0] == 1).sum() == 16


def test_components_make_objects_of_mask_pieces():
    m = np.zeros((10, 10), np.uint8)
    m[1:3, 1:3] = 1
    m[3, 3] = 1  # touches (2, 2) at a corner: the same piece (8-connected)
    m[6:9, 6:9] = 1
    m[0, 9] = 255
    pieces = component_instances([Sample("s", "a cell", m), Sample("s", "absent",
                                                                   np.zeros((10, 10), np.uint8))])
    assert [int((p.mask == 1).sum()) for p in pieces] == [5, 9]
    assert all(p.prompt == "a cell" and p.mask[0, 9] == 255 for p in pieces)


def test_synthetic_scenes_hold_several_objects_of_a_class():
    cfg = PrepareConfig(synthetic=SyntheticConfig(num_images=40))
    named = {}
    counts = []
    for i in range(40):
        _, objects = make_scene(0, i, cfg.synthetic)
        named.update({o.prompt: o.prompt for o in objects})
    for i in range(40):
        item = load_scene(cfg, 0, i, named, bad=BadFiles("error"))
        for s in item.samples:
            mine = [o for o in item.instances if o.prompt == s.prompt]
            union = np.zeros_like(s.mask, bool)
            for o in mine:
                union |= o.mask == 1
            assert (union == (s.mask == 1)).all()  # a class's sample is its objects' union
            if (s.mask == 1).any():
                counts.append(len(mine))
    assert 1 <= min(counts) and max(counts) <= cfg.synthetic.max_per_class
    assert len(set(counts)) == cfg.synthetic.max_per_class  # 1, 2 and 3 all occur


def test_instance_terms_read_presence_from_the_target_and_skip_what_has_no_objects():
    import torch.nn.functional as F

    from cdsam.models.model import CDSAMOutput
    from cdsam.models.objective import instance_terms

    target = torch.zeros(3, 1, 8, 8)
    target[0, 0, 2:5, 2:5] = 1  # a positive with one object
    target[1, 0, 1:3, 1:3] = 1  # a positive whose class has no objects
    valid = torch.ones_like(target)
    logits = torch.where(target > 0, 5.0, -5.0)  # masks that hit their targets exactly
    objects = torch.zeros(3, 1, 8, 8, dtype=torch.uint8)
    objects[0, 0, 2:5, 2:5] = 1
    centres = torch.zeros(3, 1, 4, 4, requires_grad=True)
    out = CDSAMOutput(masks=logits, low_res_masks=logits, iou=torch.tensor([[1.0], [0.5], [0.3]]),
                      tokens=torch.zeros(3, 1, 1), grid=(1, 1),
                      presence=torch.tensor([2.0, 1.0, -3.0]), centres=centres)
    terms = instance_terms(out, logits, target, valid, objects)
    want = F.binary_cross_entropy_with_logits(torch.tensor([2.0, 1.0, -3.0]),
                                              torch.tensor([1.0, 1.0, 0.0]))
    assert terms["presence"] == pytest.approx(want.item())
    assert terms["iou"] == pytest.approx((0 + 0.25) / 2)  # positives: reached IoU 1 each
    # Rows 0 (objects) and 2 (negative: no centre anywhere) count; row 1 is left out.
    heat = centre_heatmap(objects, (4, 4))
    per = [F.binary_cross_entropy_with_logits(centres[r], heat[r]).item() for r in (0, 2)]
    assert terms["centre"].item() == pytest.approx(sum(per) / 2)
    none = instance_terms(out, logits, target, valid, None)["centre"]
    assert none.item() == 0 and none.requires_grad  # in the graph, for DDP
