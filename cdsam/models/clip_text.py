"""The CLIP text encoder (open_clip), frozen, with its features cached per prompt string."""

from __future__ import annotations

import logging
from pathlib import Path

import open_clip
import torch
from torch import nn

from cdsam.config import ClipConfig
from cdsam.errors import UserError
from cdsam.io import looks_like_file

_CONFIG_DIR = Path(__file__).parent / "configs"
open_clip.add_model_config(_CONFIG_DIR)  # registers "cdsam-tiny-text", the offline default


class ClipTextEncoder(nn.Module):
    """Prompts → L2-normalised CLIP text features, TxD. Always frozen.

    Prompts come from a small vocabulary, so each distinct string is encoded once and the
    feature is kept; ``calls`` counts real text-tower forwards (the benchmark reads it).
    """

    def __init__(self, clip: nn.Module, tokenizer) -> None:
        super().__init__()
        self.clip = clip
        self.tokenizer = tokenizer
        self.calls = 0
        self._cache: dict[str, torch.Tensor] = {}
        self.requires_grad_(False)
        self.eval()

    @property
    def width(self) -> int:
        proj = getattr(self.clip, "text_projection", None)
        if isinstance(proj, nn.Parameter):
            return int(proj.shape[1])
        if isinstance(proj, nn.Linear):
            return int(proj.out_features)
        return int(self.clip.embed_dim if hasattr(self.clip, "embed_dim") else proj.shape[1])

    def train(self, mode: bool = True) -> ClipTextEncoder:
        # Frozen means frozen: no dropout even when the composite model trains.
        return super().train(False)

    def clear_cache(self) -> None:
        self._cache.clear()

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> torch.Tensor:
        missing = sorted({p for p in prompts if p not in self._cache})
        if missing:
            device = next(self.clip.parameters()).device
        for prompt in missing:
            # One prompt per forward: a feature never depends on which prompts were encoded
            # with it, so a resumed run (whose cache refills in another order) is bit-exact.
            tokens = self.tokenizer([prompt]).to(device)
            self._cache[prompt] = self.clip.encode_text(tokens, normalize=True).float()[0]
            self.calls += 1
        return torch.stack([self._cache[p] for p in prompts])

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self.clear_cache()  # new weights make old features stale
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        self.clear_cache()  # .to(device)/.half(): recompute on the new device/dtype
        return super()._apply(fn, recurse)


def build_clip_text(cfg: ClipConfig, load_weights: bool = True) -> ClipTextEncoder:
    """open_clip model ``model.clip.name`` with weights ``model.clip.pretrained`` (tag or file)."""
    if cfg.name not in open_clip.list_models():
        raise UserError(f"model.clip.name: open_clip has no model {cfg.name!r} "
                        f"(see open_clip.list_models())")
    pretrained = cfg.pretrained if load_weights else None
    if pretrained and looks_like_file(pretrained) and not Path(pretrained).is_file():
        raise UserError(f"model.clip.pretrained: file not found: {pretrained}")
    root = logging.getLogger()
    level = root.level
    if not pretrained:
        # open_clip warns on the root logger for every random init; here it is on purpose.
        root.setLevel(logging.ERROR)
    try:
        clip = open_clip.create_model(cfg.name, pretrained=pretrained or None,
                                      pretrained_text=False, pretrained_image=False)
    except RuntimeError as exc:
        if pretrained and not looks_like_file(pretrained):
            raise UserError(
                f"model.clip.pretrained: could not get open_clip weights {cfg.name}/{pretrained} "
                f"({str(exc).splitlines()[0][:160]}); download them where there is network and "
                f"set model.clip.pretrained to the local file") from None
        raise
    finally:
        root.setLevel(level)
    # Only the text tower is used; dropping the image tower saves its memory.
    if hasattr(clip, "visual"):
        clip.visual = None
    return ClipTextEncoder(clip, open_clip.get_tokenizer(cfg.name))
