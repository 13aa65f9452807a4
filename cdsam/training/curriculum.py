"""Apply a curriculum stage to a model: freeze, inject, merge and unfreeze as its rule says.

The rules themselves (parents, DINO modes, what each stage reads) are `cdsam.config.stages`.

| stage | DINO                              | CLIP text | heads     | SAM                      |
|-------|-----------------------------------|-----------|-----------|--------------------------|
| 1     | frozen                            | frozen    | trainable | base frozen, LoRA        |
| 2     | frozen + LoRA on the last K blocks| frozen    | trainable | LoRA                     |
| 3     | as 2 (from stage 2, lower LR)     | frozen    | trainable | LoRA                     |
| 4     | DINO LoRA merged, all trainable   | frozen    | trainable | lora / frozen / full     |
|       | (or only the last K blocks + norm)|           |           |                          |

The CLIP column is ``stageN.clip``, ``frozen`` by default in every stage: ``lora`` puts
weight-space adapters (`cdsam.models.lora.LoRAWeight`, ``lora.clip``) on the text transformer's
attention and MLP weights, ``full`` merges any and trains the whole text tower; both at
``optim.clip_lr``, the seed's "CLIP tuning late, at a low LR" (docs/knobs.md, "The text tower").
A later stage inherits the tuned tower; a frozen stage keeps it as it came.

"heads" are cdsam's own modules (`HEAD_MODULES`) and SAM's mask head: the hypernetwork MLP
that turns the decoder's mask token into the per-pixel weights of the one mask cdsam decodes
(`SAM_MASK_HEAD`, ~140 k parameters at SAM's width). It is trained in full in every stage and SAM
mode, as MedSAM and SAMed train SAM's decoder: behind a frozen MLP (random in the embedded
default, SAM's own with real weights), with LoRA alone, stage 1's masks ignored the text (two
prompts of one scene overlapped 0.93, every absent-object prompt got a mask); trained, the
text steers them from stage 1 on (docs/default.md, "Stage 1 learns the text").
With ``model.sam.prompt_map`` SAM's mask-input encoder (`SAM_PROMPT_MAP`, ~4.7 k parameters)
counts as a head too: it reads the drawn click/box map (`cdsam.models.prompt_map`), which it
was not made for, so it trains in every stage and mode. With the instance heads
(``model.heads.instances``) SAM's IoU head (`SAM_IOU_HEAD`) does too: it scores each object.

The LoRA targets are module-name substrings (``lora.sam.targets``, ``lora.dino.targets``) and
fit every supported family: in SAM 1 and SAM 2 / 2.1 decoders ``q/k/v/out_proj`` and the MLPs
(SAM 2's ``mlp.layers.N`` too; 32 adapters either way), never the unused hypernetwork MLPs, IoU
head or SAM 2's object-score head (`_SAM_UNUSED`); in DINO / DINOv2 (timm ViT) and DINOv3
(timm Eva) ``attn.qkv`` (fused), ``attn.proj`` and ``mlp.fc1/fc2`` of the last K blocks.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from cdsam.config.schema import ClipLoraConfig, DinoLoraConfig, OptimConfig, SamLoraConfig
from cdsam.config.stages import StagePlan, stage_rule
from cdsam.errors import UserError
from cdsam.models.lora import (
    find_targets,
    has_lora,
    inject_lora,
    inject_weight_lora,
    lora_parameters,
    merge_lora,
)
from cdsam.models.model import CDSAM, head_modules

# SAM decodes one mask (token 0); the other hypernetwork MLPs never see a gradient, so they
# get no adapters (they would only add dead trainable parameters and upset DDP). Nor does SAM 2's
# object-score head (its token still attends with the others, so that token trains in full).
_SAM_UNUSED = re.compile(r"output_hypernetworks_mlps\.[1-9]|pred_obj_score_head")
# Token 0's MLP is trained in full (see the module doc), so it needs no adapter either.
SAM_MASK_HEAD = "mask_decoder.output_hypernetworks_mlps.0"
SAM_PROMPT_MAP = "prompt_encoder.mask_downscaling"
# SAM's IoU prediction scores each instance (`cdsam.inference.instances`): a head with them.
SAM_IOU_HEAD = "mask_decoder.iou_prediction_head"


def sam_heads(model: CDSAM) -> list[str]:
    """The SAM modules trained in full in every stage (names under ``model.sam``); the IoU
    head only with the instance heads, whose instance score reads it."""
    return [SAM_MASK_HEAD] + ([SAM_PROMPT_MAP] if model.sam.prompt_map else []) + \
        ([SAM_IOU_HEAD] if model.has_instance_heads else [])


def sam_lora_targets(model: CDSAM, cfg: SamLoraConfig) -> list[str]:
    names = find_targets(model.sam.mask_decoder, cfg.targets, prefix="sam.mask_decoder.")
    return [n for n in names
            if not _SAM_UNUSED.search(n) and not n.startswith(f"sam.{SAM_MASK_HEAD}.")
            and not n.startswith(f"sam.{SAM_IOU_HEAD}.")]


def dino_lora_targets(model: CDSAM, cfg: DinoLoraConfig) -> list[str]:
    depth = model.depth
    if not 1 <= cfg.last_k_blocks <= depth:
        raise UserError(f"lora.dino.last_k_blocks: {cfg.last_k_blocks} is outside 1..{depth} "
                        f"(the DINO has {depth} blocks)")
    names = []
    for i in range(depth - cfg.last_k_blocks, depth):
        names += find_targets(model.dino.blocks[i], cfg.targets, prefix=f"dino.blocks.{i}.")
    return names


def clip_lora_targets(model: CDSAM, cfg: ClipLoraConfig) -> list[str]:
    """The text tower's weights that get adapters: the packed attention in-projection of every
    ``nn.MultiheadAttention`` (or open_clip's own ``Attention``) and the weight of every
    ``nn.Linear`` whose module path holds a target substring. The projection to the joint
    space and the logit scale stay as they are."""
    names = []
    for name, module in model.clip_text.named_modules(prefix="clip_text"):
        if not any(t in name.split(".", 2)[-1] for t in cfg.targets) or \
                "text_projection" in name:
            continue
        packed = getattr(module, "in_proj_weight", None)
        if isinstance(packed, nn.Parameter):
            names.append(f"{name}.in_proj_weight")
        elif isinstance(module, nn.Linear):
            names.append(f"{name}.weight")
    if not names:
        raise UserError(f"lora.clip.targets: no attention or linear layer of the text tower "
                        f"matches {cfg.targets} (module paths such as "
                        f"{_example_paths(model.clip_text)})")
    return names


def _example_paths(module: nn.Module) -> str:
    linear = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    return ", ".join(linear[:3]) or "none"


# Parameters of the text tower that encode_text never uses (they scale image-text logits).
_CLIP_UNUSED = ("logit_scale", "logit_bias")


def apply_clip_mode(model: CDSAM, mode: str, cfg: ClipLoraConfig) -> None:
    """The text tower frozen (as it came: adapters a parent trained stay, frozen), with LoRA
    (kept or injected), or trained in full (adapters merged first)."""
    tower = model.clip_text
    tower.requires_grad_(False)
    if mode == "lora":
        if not has_lora(tower):
            inject_weight_lora(model, clip_lora_targets(model, cfg), cfg.rank, cfg.alpha)
        for p in lora_parameters(tower):
            p.requires_grad_(True)
    elif mode == "full":
        merge_lora(tower)
        for name, p in tower.named_parameters():
            p.requires_grad_(name.rsplit(".", 1)[-1] not in _CLIP_UNUSED)
    elif mode != "frozen":
        raise ValueError(f"unknown CLIP mode {mode!r}")


def dino_trainable_range(model: CDSAM, blocks: int | None) -> range:
    """The DINO blocks a full-DINO stage trains: all, or the last ``blocks``."""
    depth = model.depth
    if blocks is None:
        return range(depth)
    if not 1 <= blocks <= depth:
        raise UserError(f"stage4.dino_trainable_blocks: {blocks} is outside 1..{depth} (the DINO "
                        f"has {depth} blocks)")
    return range(depth - blocks, depth)


def apply_stage(model: CDSAM, stage: int, sam_lora: SamLoraConfig,
                dino_lora: DinoLoraConfig | None = None, sam_mode: str = "lora",
                dino_trainable_blocks: int | None = None, clip_mode: str = "frozen",
                clip_lora: ClipLoraConfig | None = None) -> None:
    """Freeze, inject, merge and unfreeze ``model`` in place as the stage table says.

    Safe to call on a model loaded from the parent stage's checkpoint: adapters that are
    already there are kept (stage 3 continues stage 2's DINO LoRA).
    """
    rule = stage_rule(stage)
    if not rule.sam_mode_key and sam_mode != "lora":
        raise ValueError(f"stage {stage} has no configurable SAM mode")
    model.requires_grad_(False)

    # SAM: LoRA (base frozen), frozen, or full (adapters merged, all that text prompts reach).
    if sam_mode == "lora":
        if not has_lora(model.sam) and sam_lora.enable:
            inject_lora(model, sam_lora_targets(model, sam_lora), sam_lora.rank,
                        sam_lora.alpha, sam_lora.dropout)
        for p in lora_parameters(model.sam):
            p.requires_grad_(True)
    elif sam_mode == "full":
        merge_lora(model.sam)
        model.sam.requires_grad_(True)
        # SAM's sparse point/box embeddings stay as loaded, as SAMed and MedSAM keep them:
        # they see a gradient only in batches that draw a click or a box (DDP, with
        # find_unused_parameters off, stops on a trainable parameter without one), and
        # training them changed nothing on the default (text + click 0.419 vs 0.420 in stage
        # 1: docs/default.md). The mask-input encoder is a head (below) or unused.
        pe = model.sam.prompt_encoder
        for unused in (pe.point_embeddings, pe.not_a_point_embed, pe.mask_downscaling):
            unused.requires_grad_(False)
    elif sam_mode != "frozen":
        raise ValueError(f"unknown SAM mode {sam_mode!r}")

    # DINO.
    if rule.dino == "lora":
        if dino_lora is None:
            raise ValueError(f"stage {stage} needs lora.dino")
        if dino_lora.enable and not has_lora(model.dino):
            inject_lora(model, dino_lora_targets(model, dino_lora), dino_lora.rank,
                        dino_lora.alpha, dino_lora.dropout)
        for p in lora_parameters(model.dino):
            p.requires_grad_(True)
    elif rule.dino == "full":
        merge_lora(model.dino)  # exact: W + (alpha/r)·BA
        if dino_trainable_blocks is None:
            model.dino.requires_grad_(True)
        else:
            # The leading blocks keep the merged weights they came with; being a frozen prefix,
            # they go through the feature cache, and the delta checkpoint leaves out those that
            # still equal the base. (Merging made new parameters: freeze them again.)
            model.dino.requires_grad_(False)
            for i in dino_trainable_range(model, dino_trainable_blocks):
                model.dino.blocks[i].requires_grad_(True)
            model.dino.norm.requires_grad_(True)
    elif has_lora(model.dino):
        raise ValueError(f"stage {stage} expects a DINO without LoRA")

    for name in head_modules(model):
        getattr(model, name).requires_grad_(True)
    for name in sam_heads(model):
        model.sam.get_submodule(name).requires_grad_(True)
    apply_clip_mode(model, clip_mode, clip_lora or ClipLoraConfig())
    # Parameters of adapter-free unused SAM outputs stay frozen whatever the mode says.
    for name, p in model.sam.named_parameters():
        if _SAM_UNUSED.search(name) or (name.startswith(SAM_IOU_HEAD)
                                         and not model.has_instance_heads):
            p.requires_grad_(False)


def apply_plan(model: CDSAM, plan: StagePlan) -> None:
    """:func:`apply_stage` with what the stage's plan says."""
    apply_stage(model, plan.stage, plan.lora_sam, plan.lora_dino, plan.sam_mode,
                plan.dino_trainable_blocks, plan.clip_mode, plan.lora_clip)


def param_groups(model: nn.Module, optim: OptimConfig) -> list[dict]:
    """AdamW groups: base (lr, wd) and LoRA (lora_lr, wd 0), split by module type, and the CLIP
    text tower's trainable weights, LoRA or not (clip_lr, wd 0: decay would pull every token
    embedding a batch never uses towards zero, drift with no gradient behind it)."""
    clip = getattr(model, "clip_text", None)
    clip_ids = {id(p) for p in clip.parameters()} if clip is not None else set()
    lora_ids = {id(p) for p in lora_parameters(model)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    base = [p for p in trainable if id(p) not in lora_ids and id(p) not in clip_ids]
    lora = [p for p in trainable if id(p) in lora_ids and id(p) not in clip_ids]
    text = [p for p in trainable if id(p) in clip_ids]
    groups = []
    if base:
        groups.append({"name": "base", "params": base, "lr": optim.lr, "weight_decay": optim.wd})
    if lora:
        groups.append({"name": "lora", "params": lora, "lr": optim.lora_lr, "weight_decay": 0.0})
    if text:
        groups.append({"name": "clip", "params": text, "lr": optim.clip_lr, "weight_decay": 0.0})
    return groups


def component_counts(model: CDSAM) -> dict[str, dict[str, int]]:
    """Trainable/total parameter counts per component, LoRA counted apart from its host."""
    lora_ids = {id(p) for p in lora_parameters(model)}

    def count(params, keep) -> dict[str, int]:
        ps = [p for p in params if keep(p)]
        return {"trainable": sum(p.numel() for p in ps if p.requires_grad),
                "total": sum(p.numel() for p in ps)}

    def not_lora(p: torch.Tensor) -> bool:
        return id(p) not in lora_ids

    def is_lora(p: torch.Tensor) -> bool:
        return id(p) in lora_ids

    sam_head = [p for n in sam_heads(model) for p in model.sam.get_submodule(n).parameters()]
    heads = [p for n in head_modules(model) for p in getattr(model, n).parameters()] + sam_head
    head_ids = {id(p) for p in sam_head}
    return {
        "dino": count(model.dino.parameters(), not_lora),
        "dino_lora": count(model.dino.parameters(), is_lora),
        "clip_text": count(model.clip_text.parameters(), not_lora),
        "clip_lora": count(model.clip_text.parameters(), is_lora),
        "heads": count(heads, not_lora),  # cdsam's heads and SAM's (sam_heads)
        "sam": count(model.sam.parameters(), lambda p: not_lora(p) and id(p) not in head_ids),
        "sam_lora": count(model.sam.parameters(), is_lora),
    }
