"""Stage 4 at a size that fits: activation checkpointing (same gradients, same checkpoint) and
partial unfreeze (``stage4.dino_trainable_blocks``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cdsam.cli import summarize_stage
from cdsam.errors import ConfigError
from cdsam.models.dino import set_activation_checkpointing
from cdsam.models.lora import merge_lora
from cdsam.models.model import build_model
from cdsam.models.objective import Objective
from cdsam.training.curriculum import apply_stage
from tests.conftest import TINY, prepare_tiny, tiny_params
from tests.test_train import _params, _train_and_save, _trainer

EVA = {"name": "vit_small_patch16_dinov3_qkvb", "img_size": 32, "patch_size": 8,
       "embed_dim": 32, "depth": 4, "num_heads": 2}


def _loss_and_grads(model, checkpointing: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    set_activation_checkpointing(model.dino, checkpointing)
    model.zero_grad(set_to_none=True)
    prompts = ["a red circle", "a blue square"]
    objective = Objective.for_model(model, tiny_params().loss, prompts)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 32, 32, generator=gen)
    target = torch.zeros(2, 1, 32, 32)
    target[:, :, 8:20, 8:20] = 1
    torch.manual_seed(1)  # drop-path draws: replayed by the recomputation
    loss, _ = objective(model(images, prompts), images, target, torch.ones_like(target), prompts)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None}


@pytest.mark.parametrize("dino", [{}, EVA], ids=["vit", "eva"])
@pytest.mark.parametrize("stage", [2, 4])
def test_checkpointing_gives_equal_loss_and_gradients(dino, stage):
    """LoRA on the last blocks behind a frozen input (stage 2) and a fully trainable DINO with
    drop-path on (stage 4): the loss and every gradient equal the run that keeps activations."""
    model_over = {"dino": {**tiny_params().model.dino.__dict__, **dino, "drop_path_rate": 0.2}}
    p = tiny_params(model=model_over)
    model = build_model(p.model, seed=0)
    apply_stage(model, 1, p.lora.sam)
    apply_stage(model, stage, p.lora.sam, p.lora.dino if stage < 4 else None)
    model.train()
    loss_plain, grads_plain = _loss_and_grads(model, False)
    loss_ckpt, grads_ckpt = _loss_and_grads(model, True)
    assert torch.equal(loss_plain, loss_ckpt)
    assert grads_plain.keys() == grads_ckpt.keys()
    assert any(n.startswith("dino.") for n in grads_plain)
    for name, g in grads_plain.items():
        assert torch.equal(g, grads_ckpt[name]), name


def test_checkpointing_saves_fewer_activations():
    """What autograd keeps for the backward pass of a trainable DINO shrinks to the blocks'
    inputs (counted by saved-tensor hooks)."""
    p = tiny_params()
    model = build_model(p.model, seed=0)
    apply_stage(model, 1, p.lora.sam)
    apply_stage(model, 4, p.lora.sam)
    params = {t.untyped_storage().data_ptr() for t in model.parameters()}

    def saved_bytes(checkpointing: bool) -> int:
        set_activation_checkpointing(model.dino, checkpointing)
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                seen[ptr] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            tokens = model.encode_image(torch.randn(4, 3, 32, 32))
        del tokens
        return sum(seen.values())

    assert saved_bytes(True) * 4 < saved_bytes(False)


@pytest.fixture(scope="module")
def stage3_dir(tmp_path_factory) -> tuple[Path, Path]:
    """Stages 1-3 of the tiny curriculum through the trainer (delta checkpoints, as dvc repro
    writes them)."""
    tmp = tmp_path_factory.mktemp("chain")
    data = prepare_tiny(tmp / "prepared")
    p = _params(stage1={"epochs": 1}, stage2={"epochs": 1}, stage3={"epochs": 1})
    parent = None
    for stage in (1, 2, 3):
        _train_and_save(_trainer(p, stage, data, tmp, parent=parent))
        parent = tmp / f"stage{stage}"
    return data, parent


def test_stage4_checkpoint_is_bit_identical_with_checkpointing(stage3_dir, tmp_path):
    data, stage3 = stage3_dir
    out = {}
    for on in (False, True):
        p = _params(stage4={"epochs": 1}, train={"activation_checkpointing": on})
        out[on] = _train_and_save(_trainer(p, 4, data, tmp_path / str(on), parent=stage3))
    assert out[True] == out[False]


def test_partial_unfreeze_trains_the_last_blocks_only(stage3_dir, tmp_path):
    data, stage3 = stage3_dir
    sizes, counts = {}, {}
    for blocks in ("all", 2):
        p = _params(stage4={"epochs": 1, "dino_trainable_blocks": blocks})
        t = _trainer(p, 4, data, tmp_path / str(blocks), parent=stage3)
        _train_and_save(t)
        sizes[blocks] = (t.paths.out / "model.safetensors").stat().st_size
        counts[blocks] = t.counts["dino"]["trainable"]
        if blocks == 2:
            assert t.cache is not None and t.cache.end_block == 2  # the frozen prefix is cached
            trained = t.model
    assert counts[2] < counts["all"] and sizes[2] < sizes["all"]

    # The frozen blocks are stage 3's, LoRA merged, bit for bit; the trained ones moved.
    from cdsam.models.checkpoint import load_checkpoint

    s3, _ = load_checkpoint(stage3)
    merge_lora(s3.dino)
    for i, (before, after) in enumerate(zip(s3.dino.blocks, trained.dino.blocks, strict=True)):
        same = all(torch.equal(a, b.cpu()) for a, b in
                   zip(before.state_dict().values(), after.state_dict().values(), strict=True))
        assert same == (i < 2), i
    stored = load_file(str(tmp_path / "2" / "stage4" / "model.safetensors"))
    assert not any(k.startswith(("dino.blocks.0.", "dino.patch_embed")) for k in stored)


def test_partial_unfreeze_freezes_merged_blocks_too(params):
    """One trainable block where stage 3 had LoRA on two: the merged one before it stays
    frozen."""
    model = build_model(params.model, seed=0)
    apply_stage(model, 3, params.lora.sam, params.lora.dino)
    apply_stage(model, 4, params.lora.sam, dino_trainable_blocks=1)
    trains = {n.split(".")[0] + "." + n.split(".")[1] if n.startswith("blocks.") else
              n.split(".")[0] for n, p in model.dino.named_parameters() if p.requires_grad}
    assert trains == {"blocks.3", "norm"}


def test_summary_counts_the_partial_unfreeze(tmp_path):
    counts = {}
    for blocks in ("all", 1):
        data = {k: dict(v) for k, v in TINY.items()}
        data["stage4"] = {"epochs": 1, "dino_trainable_blocks": blocks}
        path = tmp_path / f"{blocks}.yaml"
        path.write_text(yaml.safe_dump(data))
        counts[blocks] = summarize_stage(str(path), 4)["dino"]
    assert counts[1]["total"] == counts["all"]["total"]
    assert 0 < counts[1]["trainable"] < counts["all"]["trainable"] / 2


@pytest.mark.parametrize("stage,value,key", [
    (4, 0, "stage4.dino_trainable_blocks"), (4, "some", "stage4.dino_trainable_blocks"),
    (4, 9, "stage4.dino_trainable_blocks"), (3, 2, "stage3.dino_trainable_blocks")])
def test_bad_trainable_blocks_name_the_key(stage, value, key):
    with pytest.raises(ConfigError, match=key):
        tiny_params(**{f"stage{stage}": {"epochs": 1, "dino_trainable_blocks": value}},
                    model={"dino": {**tiny_params().model.dino.__dict__}})
