"""Image-major batches (``data.batch_by: image``): DINO once per image, every prompt of the
image decoded against it; the same samples give the same losses and gradients as (image,
prompt) rows, each image is seen once an epoch across ranks, and a killed run resumes
bit-exactly."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from cdsam.config.parse import parse_params
from cdsam.config.schema import AugmentConfig, PrepareConfig, SyntheticConfig
from cdsam.data.batch_augment import augment_batch, draw_augment
from cdsam.data.packed import PackedLoader, image_groups
from cdsam.data.prepare import prepare
from cdsam.data.prepared import PreparedSplit
from cdsam.errors import UserError
from cdsam.evaluation.scoring import evaluate_model
from cdsam.models.forward import forward_batch
from cdsam.training.trainer import StagePaths, StageTrainer, TrainerOptions
from tests.conftest import tiny_params

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def multi_dir(tmp_path_factory):
    """16 synthetic images with 2-4 classes each plus an absent-class prompt: several
    samples per image, negatives among them."""
    out = tmp_path_factory.mktemp("multi") / "prepared"
    cfg = PrepareConfig(val_fraction=0.25, test_fraction=0.0, negatives="absent",
                        synthetic=SyntheticConfig(num_images=16, image_size=32))
    prepare(cfg, seed=0, out=out, show_progress=False, data=tiny_params().data)
    return out


def _split(root, name="train") -> PreparedSplit:
    return PreparedSplit.open(root, name, tiny_params().data)


def _params(batch_by="image", **over):
    base = {"device": "cpu", "optim": {"batch_size": 3, "warmup_steps": 1},
            "stage1": {"epochs": 2}, "data": {"resize": 32, "crop": 32, "batch_by": batch_by}}
    base.update(over)
    return tiny_params(**base)


def _trainer(params, root, tmp, stage=1) -> StageTrainer:
    paths = StagePaths(data=root, out=tmp / f"stage{stage}", metrics=tmp / "metrics",
                       resume=tmp / "resume")
    return StageTrainer(params, stage, paths, TrainerOptions(show_progress=False))


def test_image_batches_hold_each_image_once_with_all_its_samples(multi_dir):
    split = _split(multi_dir)
    groups = image_groups(split)
    assert sum(len(g) for g in groups) == len(split) and max(len(g) for g in groups) > 1
    sampler = DistributedSampler(range(len(groups)), num_replicas=1, rank=0, seed=7)
    loader = PackedLoader(split, 5, CPU, sampler=sampler, by_image=True)
    seen_images, seen_samples = [], []
    for batch in loader:
        assert batch["image"].shape[0] == len(batch["image_key"]) <= 5
        rows = batch["image_row"].numpy()
        keys = np.array(split.cache_keys)[rows]
        # Each sample's image_of points at its own image in the batch.
        assert list(keys) == [batch["image_key"][j] for j in batch["image_of"].tolist()]
        seen_images += [split.cache_keys.index(k) for k in batch["image_key"]]
        seen_samples += batch["index"].tolist()
    assert sorted(seen_images) == list(range(len(groups)))
    assert sorted(seen_samples) == list(range(len(split)))
    assert len(loader) == -(-len(groups) // 5)


def test_prompts_per_image_draws_a_seeded_subset_per_epoch(multi_dir):
    split = _split(multi_dir)
    loader = PackedLoader(split, 4, CPU, by_image=True, prompts_per_image=2, seed=3)
    big = [i for i, g in enumerate(loader.groups) if len(g) > 2]
    assert big
    picks = {e: [tuple(loader.image_samples(i, e)) for i in big] for e in range(4)}
    for e, chosen in picks.items():
        assert all(len(c) == 2 for c in chosen)
        assert chosen == [tuple(loader.image_samples(i, e)) for i in big]  # seeded
        assert all(set(c) <= set(loader.groups[i].tolist()) for c, i in zip(chosen, big, strict=True))
    assert len({tuple(v) for v in picks.values()}) > 1  # another subset another epoch
    small = [i for i, g in enumerate(loader.groups) if len(g) <= 2]
    for i in small:
        assert loader.image_samples(i, 1).tolist() == loader.groups[i].tolist()


def test_image_major_step_equals_sample_major_on_the_same_samples(multi_dir, tmp_path):
    """Same samples, same weights (DINO trainable, no cache): per-sample logits, the loss and
    every gradient agree with the (image, prompt) rows that encode each image per prompt."""
    t = _trainer(_params(train={"feature_cache": False}), multi_dir, tmp_path)
    t.setup()
    # The SSL term too: a frozen stage-start copy of DINO, then DINO trains.
    teacher = copy.deepcopy(t.model.dino).eval().requires_grad_(False)
    t.objective = dataclasses.replace(
        t.objective, cfg=dataclasses.replace(t.objective.cfg, ssl_weight=0.5), teacher=teacher)
    t.model.dino.requires_grad_(True)
    t.train_mode()
    split = t.packs["train"]
    policy = t.train_set.spatial
    by_image = next(iter(PackedLoader(split, 3, CPU, by_image=True, indices=[2, 0, 5],
                                      spatial=policy, seed=t.params.seed)))
    idx = by_image["index"].tolist()
    assert len(idx) > 3 and by_image["image"].shape[0] == 3
    by_sample = next(iter(PackedLoader(split, len(idx), CPU, indices=idx, spatial=policy,
                                       seed=t.params.seed)))
    assert "image_of" not in by_sample and by_sample["image"].shape[0] == len(idx)
    assert torch.equal(by_image["mask"], by_sample["mask"])
    assert torch.equal(by_image["points"], by_sample["points"])

    results = {}
    for name, batch in (("image", by_image), ("sample", by_sample)):
        t.model.zero_grad(set_to_none=True)  # DINO is not in the optimizer
        step = forward_batch(t.net, t.model, batch, t.objective, t.precision, None)
        step.loss.backward()
        assert "ssl" in step.parts
        grads = {n: p.grad.clone() for n, p in t.model.named_parameters()
                 if p.requires_grad and p.grad is not None}
        results[name] = (step.out.masks.detach(), step.loss.detach(), grads)
    (mi, li, gi), (ms, ls, gs) = results["image"], results["sample"]
    torch.testing.assert_close(mi, ms, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(li, ls, rtol=1e-5, atol=1e-6)
    assert gi.keys() == gs.keys() and any(n.startswith("dino.") for n in gi)
    for n in gi:
        torch.testing.assert_close(gi[n], gs[n], rtol=1e-4, atol=1e-6, msg=n)


def test_one_warp_per_image_is_the_per_sample_warp_repeated():
    cfg = AugmentConfig(enable=True)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=gen)
    masks = torch.randint(0, 2, (5, 1, 16, 16), dtype=torch.uint8, generator=gen)
    image_of = torch.tensor([0, 0, 1, 1, 1])
    theta, colour = (torch.from_numpy(a) for a in draw_augment(cfg, [11, 12]))
    x, m = augment_batch(images, masks, theta, colour, image_of)
    xs, ms = augment_batch(images[image_of], masks, theta[image_of], colour[image_of])
    assert x.shape[0] == 2 and m.shape[0] == 5
    assert torch.equal(x[image_of], xs) and torch.equal(m, ms)


def test_image_major_validation_scores_as_sample_major(multi_dir, tmp_path):
    t = _trainer(_params(train={"feature_cache": False}), multi_dir, tmp_path)
    t.setup()
    val = t.packs["val"]
    image = evaluate_model(t.model, t.val_loader, t.objective, t.precision)
    assert t.val_loader.by_image
    sample = evaluate_model(t.model, PackedLoader(val, 32, CPU), t.objective, t.precision)
    assert image.ids == sample.ids  # the same samples, in the same order
    for key, value in sample.figures.items():
        if key != "loss":  # the loss's BCE and CLIP terms average within a batch
            assert image.figures[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    # The loss too, over (image, prompt) rows cut into the same batches.
    cuts = [b["index"].tolist() for b in t.val_loader]
    same = evaluate_model(t.model, [next(iter(PackedLoader(val, len(c), CPU, indices=c)))
                                    for c in cuts], t.objective, t.precision)
    assert image.loss == pytest.approx(same.loss, rel=1e-5)
    # Batches of whole images, at most the val batch of samples each.
    budget = t.val_loader.sample_budget
    for batch in PackedLoader(val, budget, CPU, by_image=True, sample_budget=4):
        assert len(batch["prompt"]) <= 4 or batch["image"].shape[0] == 1


def test_image_major_resume_is_bit_exact(multi_dir, tmp_path):
    p = _params(stage1={"epochs": 2}, data={"resize": 32, "crop": 32, "batch_by": "image",
                                            "prompts_per_image": 2})
    straight = _trainer(p, multi_dir, tmp_path / "a")
    straight.setup()
    straight.train()
    straight.save()
    first = _trainer(p, multi_dir, tmp_path / "b")
    first.setup()
    first.train(stop_after=1)
    again = _trainer(p, multi_dir, tmp_path / "b")
    again.setup()
    again.train()
    again.save()
    a = (tmp_path / "a" / "stage1" / "model.safetensors").read_bytes()
    b = (tmp_path / "b" / "stage1" / "model.safetensors").read_bytes()
    assert a == b
    # Batches of 3 images: fewer steps than samples / 3.
    assert len(straight.step_losses[0]) == -(-len(straight.packs["train"].image_keys) // 3)


def test_ranks_split_the_images(multi_dir):
    split = _split(multi_dir)
    n = len(split.image_keys)
    seen = []
    for rank in (0, 1):
        sampler = DistributedSampler(range(n), num_replicas=2, rank=rank, seed=5)
        sampler.set_epoch(1)
        loader = PackedLoader(split, 2, CPU, sampler=sampler, by_image=True)
        seen += [k for b in loader for k in b["image_key"]]
    assert n % 2 == 0 and sorted(seen) == sorted(split.cache_keys)


@pytest.mark.parametrize("key, value, words", [
    ("batch_by", "prompt", "data.batch_by"), ("prompts_per_image", 0, "data.prompts_per_image")])
def test_bad_batch_keys_name_themselves(key, value, words):
    with pytest.raises(UserError, match=words):
        parse_params({"data": {key: value}})


def test_ddp_image_major_ranks_agree(multi_dir, tmp_path):
    """Two gloo ranks, each on its half of the images: DDP keeps their weights equal."""
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    from tests.test_train import _ddp_worker, _free_port

    over = {"data": {"resize": 32, "crop": 32, "batch_by": "image"}}
    mp.start_processes(_ddp_worker, args=(2, _free_port(), str(multi_dir), str(tmp_path), 1,
                                          None, over), nprocs=2, join=True, start_method="spawn")
    r0 = load_file(str(tmp_path / "rank0.safetensors"))
    r1 = load_file(str(tmp_path / "rank1.safetensors"))
    assert r0.keys() == r1.keys() and r0
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k


def test_decode_finds_prompted_rows_per_sample():
    """Clicks without the host's row mask: the rows are the samples', not the images'."""
    from cdsam.models.model import build_model

    model = build_model(tiny_params().model, seed=0).eval()
    images = torch.randn(2, 3, 32, 32)
    image_of = torch.tensor([0, 0, 1, 1])
    prompts = ["a red circle", "a blue square", "a red circle", "a green triangle"]
    points = (torch.tensor([[[5.0, 5.0]], [[0.0, 0.0]], [[20.0, 9.0]], [[0.0, 0.0]]]),
              torch.tensor([[1], [-1], [1], [-1]]))
    with torch.no_grad():
        told = model(images, prompts, points=points, image_of=image_of,
                     rows=np.array([True, False, True, False]))
        found = model(images, prompts, points=points, image_of=image_of)
        rows = model(images[image_of], prompts, points=points)
    assert torch.equal(told.masks, found.masks)
    torch.testing.assert_close(found.masks, rows.masks, rtol=1e-4, atol=1e-5)
