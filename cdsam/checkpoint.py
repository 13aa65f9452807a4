"""Checkpoints: a directory with ``model.safetensors`` (no pickle) and ``meta.json``.

``meta.json`` holds the stage, the ``model`` config, the LoRA layout, the prompt vocabulary
and the parent checkpoint; loading rebuilds the same structure (same injections as in
training) before the weights go in, so LoRA weights are really used.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cdsam import io
from cdsam.config import ModelConfig, _parse_section
from cdsam.errors import CheckpointError
from cdsam.lora import LoRASpec, apply_specs, lora_specs
from cdsam.models.model import CDSAM, build_model

WEIGHTS = "model.safetensors"
META = "meta.json"
FORMAT = "cdsam-checkpoint/1"


@dataclass
class CheckpointMeta:
    stage: int
    model: dict[str, Any]
    lora: list[dict[str, Any]] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    parent: dict[str, str] | None = None  # {"path": ..., "sha256": ...}
    extra: dict[str, Any] = field(default_factory=dict)  # train config, metrics, …

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "stage": self.stage, "model": self.model, "lora": self.lora,
                "prompts": self.prompts, "parent": self.parent, "extra": self.extra}


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tensors_sha256(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over names and bytes of tensors, in the order given."""
    h = hashlib.sha256()
    for name, t in named:
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def parent_ref(path: str | Path) -> dict[str, str]:
    """How a child checkpoint records its parent: relative path and weights hash."""
    return {"path": str(path), "sha256": file_sha256(Path(path) / WEIGHTS)}


def check_finite(model: torch.nn.Module) -> None:
    bad = [n for n, t in model.state_dict().items()
           if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise CheckpointError(f"refusing to save non-finite weights ({', '.join(bad[:3])})")


def save_checkpoint(path: str | Path, model: CDSAM, meta: CheckpointMeta) -> None:
    """Write the checkpoint directory atomically (a crash leaves the old one or none)."""
    check_finite(model)
    meta.lora = [s.to_dict() for s in lora_specs(model)]
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with io.atomic_dir(path) as tmp:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        (tmp / META).write_text(json.dumps(meta.to_dict(), indent=2, sort_keys=True) + "\n")


def read_meta(path: str | Path) -> CheckpointMeta:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    meta_path = path / META
    try:
        raw = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{meta_path}: missing (not a cdsam checkpoint)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{meta_path}: corrupt JSON ({exc})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: not a {FORMAT} file")
    return meta_from_dict(raw, meta_path)


def meta_from_dict(raw: dict[str, Any], where: str | Path) -> CheckpointMeta:
    """The fields of a checkpoint's (or an export's) meta.json."""
    try:
        return CheckpointMeta(stage=int(raw["stage"]), model=raw["model"],
                              lora=list(raw.get("lora", [])),
                              prompts=list(raw.get("prompts", [])), parent=raw.get("parent"),
                              extra=dict(raw.get("extra", {})))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: missing or bad field ({exc})") from None


def model_config_of(meta: CheckpointMeta, where: str) -> ModelConfig:
    errors: list[str] = []
    cfg = _parse_section(ModelConfig, meta.model, "model", errors)
    if errors:
        raise CheckpointError(f"{where}: bad model config in meta.json ({errors[0]})")
    return cfg


def read_state(path: str | Path) -> dict[str, torch.Tensor]:
    weights = Path(path) / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing")
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        msg = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{weights}: corrupt or truncated safetensors ({msg})") from None


def load_state_into(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Strict load that names the first differing keys and shapes instead of a stack trace."""
    ours = model.state_dict()
    missing = [k for k in ours if k not in state]
    unexpected = [k for k in state if k not in ours]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in ours.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append("shape mismatch " + "; ".join(shapes[:3]))
        if missing:
            parts.append(f"missing keys {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:3]}")
        raise CheckpointError(f"{where}: checkpoint does not fit the model ("
                              + "; ".join(parts) + ")")
    model.load_state_dict(state, strict=True)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu"
                    ) -> tuple[CDSAM, CheckpointMeta]:
    """Rebuild the model a checkpoint was trained as (LoRA included) and load its weights."""
    path = Path(path)
    meta = read_meta(path)
    state = read_state(path)
    model = build_model(model_config_of(meta, str(path)), load_weights=False)
    try:
        apply_specs(model, [LoRASpec(**s) for s in meta.lora])
    except (AttributeError, TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path / META}: LoRA layout does not fit the model ({exc})"
                              ) from None
    load_state_into(model, state, str(path / WEIGHTS))
    return model.to(device), meta
