import pytest
import torch

from cdsam.cli import summarize_stage
from cdsam.config.parse import to_dict
from cdsam.models.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from cdsam.models.lora import lora_parameters, lora_specs
from cdsam.models.model import build_model
from cdsam.training.curriculum import apply_stage, param_groups


@pytest.fixture
def tiny_params_file(tmp_path):
    import yaml

    from tests.conftest import TINY

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return str(path)


def test_stage_table_matches_design(tiny_params_file):
    s = {n: summarize_stage(tiny_params_file, n) for n in (1, 2, 3, 4)}
    for c in s.values():
        assert c["clip_text"]["trainable"] == 0 and c["clip_text"]["total"] > 0
        assert c["heads"]["trainable"] == c["heads"]["total"] > 0
        assert c["sam"]["trainable"] == 0  # SAM base frozen in every stage (mode lora)
        assert c["sam_lora"]["trainable"] == c["sam_lora"]["total"] > 0
    assert s[1]["dino"]["trainable"] == 0 and s[1]["dino_lora"]["total"] == 0
    for n in (2, 3):
        assert s[n]["dino"]["trainable"] == 0
        assert s[n]["dino_lora"]["trainable"] == s[n]["dino_lora"]["total"] > 0
    assert s[2]["dino_lora"] == s[3]["dino_lora"]
    assert s[4]["dino"]["trainable"] == s[4]["dino"]["total"] == s[1]["dino"]["total"]
    assert s[4]["dino_lora"]["total"] == 0


def test_dino_lora_sits_on_last_k_blocks(params):
    model = build_model(params.model, seed=0)
    apply_stage(model, 1, params.lora.sam)
    apply_stage(model, 2, params.lora.sam, params.lora.dino)
    blocks = {s.name.split(".")[2] for s in lora_specs(model) if s.name.startswith("dino.")}
    assert blocks == {"2", "3"}  # depth 4, K = 2


def test_two_optimizer_groups(params):
    model = build_model(params.model, seed=0)
    apply_stage(model, 2, params.lora.sam, params.lora.dino)
    groups = {g["name"]: g for g in param_groups(model, params.optim)}
    assert groups["lora"]["weight_decay"] == 0.0
    assert groups["lora"]["lr"] == params.optim.lora_lr
    assert groups["base"]["weight_decay"] == params.optim.wd
    lora_ids = {id(p) for p in lora_parameters(model)}
    assert {id(p) for p in groups["lora"]["params"]} == lora_ids
    assert not lora_ids & {id(p) for p in groups["base"]["params"]}


def _save(model, stage, path, params):
    save_checkpoint(path, model, CheckpointMeta(stage=stage, model=to_dict(params.model)))


def test_chain_2_3_4_through_checkpoints(tmp_path, params):
    model = build_model(params.model, seed=0)
    apply_stage(model, 1, params.lora.sam)
    _save(model, 1, tmp_path / "s1", params)
    m2, _ = load_checkpoint(tmp_path / "s1")
    apply_stage(m2, 2, params.lora.sam, params.lora.dino)
    with torch.no_grad():  # pretend stage 2 trained its adapters
        for p in lora_parameters(m2):
            p.normal_(0, 0.05)
    _save(m2, 2, tmp_path / "s2", params)
    m3, meta = load_checkpoint(tmp_path / "s2")
    assert len(meta.lora) == len(lora_specs(m2))
    apply_stage(m3, 3, params.lora.sam, params.lora.dino)
    assert [s.name for s in lora_specs(m3)] == [s.name for s in lora_specs(m2)]
    _save(m3, 3, tmp_path / "s3", params)
    m4, _ = load_checkpoint(tmp_path / "s3")
    x = torch.randn(2, 3, 32, 32)
    prompts = ["a red circle", "a blue square"]
    m3.eval(), m4.eval()
    with torch.no_grad():
        before = m4(x, prompts).masks
        torch.testing.assert_close(before, m3(x, prompts).masks)
        apply_stage(m4, 4, params.lora.sam, sam_mode="lora")
        after = m4(x, prompts).masks
    assert not any(s.name.startswith("dino.") for s in lora_specs(m4))
    assert all(p.requires_grad for p in m4.dino.parameters())
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_stage4_sam_modes(params):
    for mode, sam_trainable in (("frozen", False), ("full", True)):
        model = build_model(params.model, seed=0)
        apply_stage(model, 1, params.lora.sam)
        apply_stage(model, 4, params.lora.sam, sam_mode=mode)
        used = [p for n, p in model.sam.named_parameters() if "transformer" in n]
        assert all(p.requires_grad == sam_trainable for p in used), mode


def missing_gradients(model, loss_cfg) -> list[str]:
    """Trainable parameters one step of the real objective (Dice + BCE + CLIP alignment) on
    two 32-px images leaves without a gradient."""
    from cdsam.models.objective import Objective

    prompts = ["a red circle", "a blue square"]
    objective = Objective.for_model(model, loss_cfg, prompts)
    images = torch.randn(2, 3, 32, 32)
    target = torch.zeros(2, 1, 32, 32)
    target[:, :, 8:20, 8:20] = 1
    out = model(images, prompts)
    loss, _ = objective(out, images, target, torch.ones_like(target), prompts)
    loss.backward()
    assert any(p.requires_grad for p in model.parameters())
    return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


@pytest.mark.parametrize("stage,sam_mode", [(1, "lora"), (2, "lora"), (3, "lora"), (4, "lora"),
                                            (4, "frozen"), (4, "full")])
def test_every_trainable_parameter_gets_a_gradient(params, stage, sam_mode):
    """DDP runs with find_unused_parameters off: a trainable parameter without a gradient
    stops it. One step of the real objective reaches them all."""
    model = build_model(params.model, seed=0)
    apply_stage(model, stage, params.lora.sam, params.lora.dino if stage in (2, 3) else None,
                sam_mode)
    missing = missing_gradients(model, params.loss)
    assert not missing, missing
