"""The CLIP text encoder (open_clip), its features cached per prompt string while it is frozen.

Any open_clip text tower works (OpenAI CLIP, EVA-CLIP, SigLIP / SigLIP 2): pooling, context
length and output width are the tower's own, read from its open_clip config. Towers whose
tokenizer lives on the Hugging Face hub (SigLIP 2's Gemma tokenizer) take it, offline, from the
downloaded hub repo folder that ``model.clip.pretrained`` may name instead of a weights file.
"""

from __future__ import annotations

import logging
from pathlib import Path

import open_clip
import torch
from torch import nn

from cdsam.config.schema import ClipConfig
from cdsam.errors import UserError
from cdsam.io import check_weights_name, looks_like_file

_CONFIG_DIR = Path(__file__).parent / "configs"
open_clip.add_model_config(_CONFIG_DIR)  # registers "cdsam-tiny-text", the offline default


class ClipTextEncoder(nn.Module):
    """Prompts → L2-normalised CLIP text features, TxD. Frozen unless a stage tunes it
    (``stageN.clip``, `cdsam.training.curriculum`).

    Prompts come from a small vocabulary, so each distinct string is encoded once and the
    feature is kept; ``calls`` counts real text-tower forwards (the benchmark reads it). A tower
    being tuned (:attr:`tuning`) bypasses the cache while gradients are on, encoding the
    prompts of the call in one batch; the trainer clears the cache after the weights move.
    """

    def __init__(self, clip: nn.Module, tokenizer) -> None:
        super().__init__()
        self.clip = clip
        self.tokenizer = tokenizer
        self.calls = 0
        self._cache: dict[str, torch.Tensor] = {}
        self._train_flag = False
        self.requires_grad_(False)
        self.eval()

    @property
    def width(self) -> int:
        # CLIP keeps the projection on the model, CustomTextCLIP (SigLIP 2) on its text tower.
        for owner in (self.clip, getattr(self.clip, "text", None)):
            proj = getattr(owner, "text_projection", None)
            if isinstance(proj, nn.Parameter):
                return int(proj.shape[1])
            if isinstance(proj, nn.Linear):
                return int(proj.out_features)
        text = getattr(self.clip, "text", None)
        if text is not None and getattr(text, "output_dim", None):
            return int(text.output_dim)
        return int(self.clip.embed_dim)

    def train(self, mode: bool = True) -> ClipTextEncoder:
        # No dropout even when the tower trains (a tuned tower stays close to the one that
        # was pretrained without it); the flag only says whether a training step is running.
        self._train_flag = mode
        return super().train(False)

    @property
    def tuning(self) -> bool:
        """In a training step with weights to train: features come with gradients."""
        return self._train_flag and torch.is_grad_enabled() and \
            any(p.requires_grad for p in self.parameters())

    def clear_cache(self) -> None:
        self._cache.clear()

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """``prompts`` in one batch through the tower, with gradients when enabled, no cache."""
        device = next(self.clip.parameters()).device
        with torch.autocast(device.type, enabled=False):  # as the cached features are
            tokens = self.tokenizer(list(prompts)).to(device)
            self.calls += 1
            return self.clip.encode_text(tokens, normalize=True).float()

    def forward(self, prompts: list[str]) -> torch.Tensor:
        if self.tuning:
            unique = sorted(set(prompts))
            index = {p: i for i, p in enumerate(unique)}
            feats = self.encode(unique)
            return feats[torch.tensor([index[p] for p in prompts], device=feats.device)]
        with torch.no_grad():
            return self._cached(prompts)

    def _cached(self, prompts: list[str]) -> torch.Tensor:
        missing = sorted({p for p in prompts if p not in self._cache})
        if not missing:
            return torch.stack([self._cache[p] for p in prompts])
        device = next(self.clip.parameters()).device
        # Encoded in the tower's own dtype whatever autocast the caller runs under: setup
        # fills the cache outside autocast, a refill (after a resume state's load_state_dict
        # cleared it) happens inside a training step's, and both must give the same feature.
        with torch.autocast(device.type, enabled=False):
            for prompt in missing:
                # One prompt per forward: a feature never depends on which prompts were
                # encoded with it, so a refill in another order is bit-exact.
                tokens = self.tokenizer([prompt]).to(device)
                self._cache[prompt] = self.clip.encode_text(tokens, normalize=True).float()[0]
                self.calls += 1
        return torch.stack([self._cache[p] for p in prompts])

    def groups(self, groups: list[list[str]]) -> torch.Tensor:
        """One feature per group of texts (prompt ensembling, `cdsam.data.templates`): the mean
        of their features, renormalised; a group of one is its text's feature as is."""
        flat = [t for g in groups for t in g]
        return mean_features(self(flat), [len(g) for g in groups])

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self.clear_cache()  # new weights make old features stale
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        self.clear_cache()  # .to(device)/.half(): recompute on the new device/dtype
        return super()._apply(fn, recurse)


def mean_features(feats: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Consecutive runs of ``sizes`` rows of ``feats`` (L2-normalised) → their mean direction,
    one row each; a run of one is returned as it is (bit for bit)."""
    out, start = [], 0
    for n in sizes:
        run = feats[start:start + n]
        out.append(run[0] if n == 1 else torch.nn.functional.normalize(run.mean(0), dim=-1))
        start += n
    return torch.stack(out)


# Weight files of a hub repo folder, in the order open_clip's own hub loader prefers them.
FOLDER_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def folder_weights(folder: Path) -> Path:
    """The open_clip weights file inside a downloaded hub repo folder."""
    for name in FOLDER_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    raise UserError(f"model.clip.pretrained: {folder} has none of {', '.join(FOLDER_WEIGHTS)} "
                    f"(a folder must be the model's hub repo, downloaded whole)")


def build_tokenizer(name: str, folder: Path | None = None):
    """open_clip's tokenizer for ``name``; a hub tokenizer from ``folder`` when given."""
    text_cfg = (open_clip.get_model_config(name) or {}).get("text_cfg", {})
    hub = text_cfg.get("hf_tokenizer_name")
    if not hub or folder is None:
        # CLIP's BPE and the SigLIP 1 files ship in open_clip; a hub tokenizer is fetched.
        try:
            return open_clip.get_tokenizer(name)
        except (OSError, ImportError, ValueError) as exc:
            if not hub:
                raise
            raise UserError(
                f"model.clip.pretrained: {name!r} needs the tokenizer {hub!r} from the Hugging "
                f"Face hub ({type(exc).__name__}); download that repo where there is network "
                f"(hf download {hub} --local-dir weights/{name}) and set model.clip.pretrained "
                f"to the folder") from None
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(f"model.clip.pretrained: {folder} has no tokenizer ({' or '.join(TOKENIZER_FILES)}) "
                        f"for {name!r}; download its hub repo {hub!r} whole")
    from open_clip.tokenizer import HFTokenizer

    try:
        return HFTokenizer(str(folder), context_length=text_cfg.get("context_length"),
                           tokenizer_mode=text_cfg.get("tokenizer_mode"),
                           **text_cfg.get("tokenizer_kwargs", {}))
    except (OSError, ValueError) as exc:
        raise UserError(f"model.clip.pretrained: the tokenizer in {folder} does not load "
                        f"({str(exc).splitlines()[0][:160]})") from None


def build_clip_text(cfg: ClipConfig, load_weights: bool = True) -> ClipTextEncoder:
    """open_clip model ``model.clip.name`` with weights ``model.clip.pretrained`` (a tag, a
    file, or a downloaded hub repo folder holding the weights and the tokenizer)."""
    if cfg.name not in open_clip.list_models():
        raise UserError(f"model.clip.name: open_clip has no model {cfg.name!r} "
                        f"(see open_clip.list_models())")
    folder = Path(cfg.pretrained) if cfg.pretrained and Path(cfg.pretrained).is_dir() else None
    pretrained = cfg.pretrained if load_weights else None
    if pretrained and folder is not None:
        pretrained = str(folder_weights(folder))
    elif pretrained and looks_like_file(pretrained) and not Path(pretrained).is_file():
        raise UserError(f"model.clip.pretrained: file not found: {pretrained}")
    if pretrained and Path(pretrained).is_file():
        check_weights_name(pretrained, "model.clip.pretrained")
    if torch.empty(0).device.type == "meta":
        # Planning memory (`build_model(meta=True)`): the text tower is frozen and holds no
        # activations, so any tokenizer of the model's context length stands in for its own
        # (which may be a hub download not made yet).
        from open_clip.tokenizer import SimpleTokenizer

        text_cfg = (open_clip.get_model_config(cfg.name) or {}).get("text_cfg", {})
        tokenizer = SimpleTokenizer(context_length=text_cfg.get("context_length", 77))
    else:
        tokenizer = build_tokenizer(cfg.name, folder)  # before the weights: fails fast
    root = logging.getLogger()
    level = root.level
    if not pretrained:
        # open_clip warns on the root logger for every random init; here it is on purpose.
        root.setLevel(logging.ERROR)
    try:
        # Built where the default device is (the meta device when planning memory).
        clip = open_clip.create_model(cfg.name, pretrained=pretrained or None,
                                      pretrained_text=False, pretrained_image=False,
                                      device=torch.empty(0).device)
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
    return ClipTextEncoder(clip, tokenizer)
