"""The DINO image encoder: a timm Vision Transformer, run block range by block range.

We keep timm's own module (so official state dicts and timm's checkpoint filters apply) and
walk its public pieces: ``patch_embed`` → ``_pos_embed`` → ``patch_drop`` → ``norm_pre`` →
``blocks`` → ``norm``. Splitting the block loop lets a caller reuse the output of frozen
leading blocks (the feature cache) and run only the trainable tail.

Two timm families run: ``VisionTransformer`` (DINO, DINOv2) and ``Eva`` (DINOv3, EVA-02), whose
blocks also take a rotary position table. That table depends only on the token grid, so each
block range rebuilds it from the grid (it is never cached with the tokens: the feature cache
stores tokens only, and a grid change gives a new table).
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from cdsam.config.schema import DinoConfig
from cdsam.errors import UserError
from cdsam.io import check_weights_name

SIZE_KEYS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads")


def build_dino(cfg: DinoConfig, load_weights: bool = True) -> nn.Module:
    """Create the timm ViT named by ``model.dino``.

    ``load_weights=False`` skips hub/file weights (used when a cdsam checkpoint supplies them).
    """
    kwargs = {k: getattr(cfg, k) for k in SIZE_KEYS if getattr(cfg, k) is not None}
    kwargs.update(num_classes=0, drop_path_rate=cfg.drop_path_rate)
    try:
        if load_weights and cfg.checkpoint:
            path = Path(cfg.checkpoint)
            if not path.is_file():
                raise UserError(f"model.dino.checkpoint: file not found: {path}")
            check_weights_name(path, "model.dino.checkpoint")
            try:
                # timm's checkpoint filter resamples the positional embeddings to img_size.
                # custom_load: timm's own .npz reader for big_vision files; a state dict
                # must not go there (timm 1.0.17 sent every file of an .npz-tagged model).
                overlay = {"file": str(path), "custom_load": path.suffix == ".npz"}
                vit = timm.create_model(cfg.name, pretrained=True,
                                        pretrained_cfg_overlay=overlay, **kwargs)
            except (RuntimeError, AttributeError, KeyError, ValueError) as exc:
                # Another family's file fails in timm's checkpoint filter before the state dict
                # check on some versions (timm 1.0.20's Eva filter: AttributeError).
                if "Unknown model" in str(exc):
                    raise
                raise UserError(f"model.dino.checkpoint: {path} does not fit {cfg.name!r} as "
                                f"configured ({_first_line(exc)})") from None
        elif load_weights and cfg.pretrained:
            try:
                vit = timm.create_model(cfg.name, pretrained=True, **kwargs)
            except (OSError, RuntimeError, ValueError) as exc:
                if "Unknown model" in str(exc):
                    raise
                if _is_shape_mismatch(exc):
                    raise UserError(f"model.dino.pretrained: the hub weights of {cfg.name!r} do "
                                    f"not fit the model as configured ({_first_line(exc)}); "
                                    f"leave the model.dino size keys null") from None
                raise UserError(
                    f"model.dino.pretrained: could not fetch hub weights for {cfg.name!r} "
                    f"({type(exc).__name__}); download the weights where there is network and "
                    f"set model.dino.checkpoint to the local file") from None
        else:
            vit = timm.create_model(cfg.name, pretrained=False, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            hint = " (DINOv3 needs timm >= 1.0.20)" if "dinov3" in cfg.name else ""
            raise UserError(f"model.dino.name: timm {timm.__version__} has no model "
                            f"{cfg.name!r}{hint}") from None
        raise
    if isinstance(vit, Eva):
        _prepare_eva(vit, cfg.name)
    elif not isinstance(vit, VisionTransformer):
        raise UserError(f"model.dino.name: {cfg.name!r} is not a timm Vision Transformer or "
                        f"EVA-family model; use e.g. vit_small_patch14_dinov2, "
                        f"vit_small_patch16_224.dino or vit_small_patch16_dinov3")
    return vit


def _prepare_eva(vit: Eva, name: str) -> None:
    """Make a timm ``Eva`` walkable block by block and ready for LoRA on ``attn.qkv``."""
    if vit.patch_drop is not None:
        raise UserError(f"model.dino.name: {name!r} is built with patch dropout, which drops "
                        f"tokens the decoder needs; build it without")
    for block in vit.blocks:
        attn = block.attn
        if getattr(attn, "qkv", None) is not None and getattr(attn, "q_bias", None) is not None:
            # With q/v biases timm calls F.linear(x, attn.qkv.weight, bias) and so would skip a
            # LoRA wrapper on qkv; timm's own switch applies qkv(x) and then adds the bias.
            attn.qkv_bias_separate = True


def _rope_tables(vit: Eva, grid: tuple[int, int]) -> torch.Tensor | None:
    rope = vit.rope
    if rope is None:
        return None
    if not vit.dynamic_img_size and hasattr(rope, "feat_shape"):
        return rope.get_embed()  # the model's own grid: timm keeps this table
    # Building a table is a chain of small kernels, once or twice a step (prefix and tail):
    # keep the last one while the grid, the rope's buffers and the autocast state are the
    # same. Not with learnt frequencies (parameters) or coordinate augmentation, which give a
    # new table each call.
    if next(rope.parameters(), None) is not None or (rope.training and getattr(
            rope, "aug_active", False)):
        return rope.get_embed(shape=list(grid))
    buffers = list(rope.buffers())
    kind = buffers[0].device.type if buffers else "cpu"
    key = (tuple(grid), tuple((b.device, b.dtype, b._version) for b in buffers),
           torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
    kept = getattr(rope, "_cdsam_table", None)
    if kept is None or kept[0] != key:
        kept = (key, rope.get_embed(shape=list(grid)))
        rope._cdsam_table = kept
    return kept[1]


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines[:2])[:240] or type(exc).__name__


def _is_shape_mismatch(exc: Exception) -> bool:
    text = str(exc)
    return "size mismatch" in text or "Error(s) in loading state_dict" in text


def dino_patch_size(vit: nn.Module) -> int:
    return int(vit.patch_embed.patch_size[0])


def dino_depth(vit: nn.Module) -> int:
    return len(vit.blocks)


def dino_width(vit: nn.Module) -> int:
    return int(vit.embed_dim)


def dino_grid(vit: nn.Module, images: torch.Tensor) -> tuple[int, int]:
    p = dino_patch_size(vit)
    return images.shape[-2] // p, images.shape[-1] // p


def dino_embed(vit: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Bx3xHxW images → BxTxC tokens (prefix tokens included) before block 0."""
    x = vit.patch_embed(images)
    if isinstance(vit, Eva):
        x, _ = vit._pos_embed(x)  # rotary table rebuilt per block range (dino_blocks)
    else:
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
    return vit.norm_pre(x)


def set_activation_checkpointing(vit: nn.Module, enable: bool) -> None:
    """Recompute, in the backward pass, each block :func:`dino_blocks` runs with gradients.

    timm's own switch holds the flag (``grad_checkpointing``); its ``forward_features`` is never
    called here, so :func:`dino_blocks` reads the flag and checkpoints block by block.
    """
    vit.set_grad_checkpointing(enable)


def _run_block(vit: nn.Module, block: nn.Module, x: torch.Tensor, **kwargs) -> torch.Tensor:
    if getattr(vit, "grad_checkpointing", False) and torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in block.parameters())):
        # Non-reentrant: LoRA behind a frozen input still gets its gradient, keyword inputs
        # (Eva's rope) pass through, and the RNG state is replayed, so drop-path and dropout
        # draw the same in the recomputation: gradients equal the run without.
        return checkpoint(block, x, use_reentrant=False, **kwargs)
    return block(x, **kwargs)


def dino_blocks(vit: nn.Module, x: torch.Tensor, start: int, end: int,
                grid: tuple[int, int]) -> torch.Tensor:
    """Run blocks ``start … end-1`` on BxTxC tokens of an image with token ``grid`` (h, w)."""
    if not isinstance(vit, Eva):
        for blk in vit.blocks[start:end]:
            x = _run_block(vit, blk, x)
        return x
    rope = _rope_tables(vit, grid)
    mixed = getattr(vit, "rope_mixed", False) and rope is not None  # one table per block
    for i in range(start, end):
        x = _run_block(vit, vit.blocks[i], x, rope=rope[i] if mixed else rope)
    return x


def dino_finish(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Final norm, then drop the prefix tokens (cls, registers): BxTxC → BxNxC."""
    return vit.norm(x)[:, vit.num_prefix_tokens:]


def dino_patch_tokens(vit: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Bx3xHxW → (BxNxC patch tokens, grid (h, w)) with N = h*w."""
    grid = dino_grid(vit, images)
    x = dino_finish(vit, dino_blocks(vit, dino_embed(vit, images), 0, len(vit.blocks), grid))
    return x, grid
