"""Checks that need the named architectures but no weights: run before anything loads.

The config validation in `cdsam.config` knows only the numbers in params.yaml; with the size
overrides left null it cannot know a named model's patch size or depth, and it cannot know what
activation a named CLIP weight tag was trained with. Here the DINO is built on PyTorch's meta
device (no memory, no weights, a tenth of a second) and open_clip's own tables are read, so
each mismatch is one line naming the key, before a multi-GB weight file is read.
"""

from __future__ import annotations

import open_clip
import torch

from cdsam.config.schema import DinoLoraConfig, ModelConfig
from cdsam.errors import ConfigError
from cdsam.models.dino import build_dino, dino_depth, dino_patch_size


def dino_shape(model: ModelConfig) -> tuple[int, int]:
    """(patch size, depth) of the DINO ``model.dino`` describes, without building it."""
    try:
        with torch.device("meta"):
            vit = build_dino(model.dino, load_weights=False)
    except RuntimeError as exc:
        if "meta" not in str(exc):
            raise
        # Older timm (1.0.17) calls .item() on a tensor in ViT.__init__; meta tensors refuse:
        # build it for real (random init, no weights; seconds at ViT-g size).
        vit = build_dino(model.dino, load_weights=False)
    return dino_patch_size(vit), dino_depth(vit)


def clip_activation_problem(model: ModelConfig) -> str | None:
    """OpenAI's CLIP weights were trained with QuickGELU; open_clip's plain names build GELU and
    only warn, so the frozen text prior would run the wrong activation."""
    name, tag = model.clip.name, model.clip.pretrained
    if not tag or tag not in open_clip.list_pretrained_tags_by_model(name):
        return None  # a local file or no weights: nothing to compare against
    wants = bool(open_clip.get_pretrained_cfg(name, tag).get("quick_gelu", False))
    has = bool((open_clip.get_model_config(name) or {}).get("quick_gelu", False))
    if wants and not has:
        return (f"model.clip.name: the {tag!r} weights of {name!r} were trained with QuickGELU; "
                f"use {name + '-quickgelu'!r}")
    return None


def check_model(model: ModelConfig, crop: int, dino_lora: DinoLoraConfig | None = None) -> None:
    """Raise :class:`ConfigError` listing every mismatch between the named models and
    ``data.crop`` / ``lora.dino.last_k_blocks`` / the CLIP weight tag."""
    problems = []
    patch, depth = dino_shape(model)
    name = model.dino.name
    if crop % patch:
        problems.append(f"data.crop: {crop} is not a multiple of the patch size {patch} of "
                        f"model.dino.name {name!r}")
    if dino_lora is not None and dino_lora.enable and dino_lora.last_k_blocks > depth:
        problems.append(f"lora.dino.last_k_blocks: {dino_lora.last_k_blocks} is larger than the "
                        f"depth {depth} of model.dino.name {name!r}")
    clip = clip_activation_problem(model)
    if clip:
        problems.append(clip)
    if problems:
        raise ConfigError(problems)
