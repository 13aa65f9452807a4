"""Export a checkpoint: ``merged`` (LoRA folded in, plain model) or ``adapter`` (only what
training changed, to load on top of the base weights).

``merged`` writes an ordinary checkpoint directory (``model.safetensors`` + ``meta.json``)
whose layout has no LoRA modules at all. ``adapter`` writes ``adapter.safetensors`` with the
LoRA tensors and every tensor that differs from the base model ``build_model`` gives for the
recorded config and seed (the heads, plus DINO in stage 4), and a fingerprint of the base
tensors it relies on, so loading onto different base weights fails loudly instead of
silently predicting garbage.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cdsam import io
from cdsam.checkpoint import (
    META,
    WEIGHTS,
    CheckpointMeta,
    load_checkpoint,
    meta_from_dict,
    model_config_of,
    read_meta,
    save_checkpoint,
    tensors_sha256,
)
from cdsam.errors import CheckpointError, UserError
from cdsam.lora import LoRASpec, apply_specs, merge_lora
from cdsam.models.model import CDSAM, build_model

ADAPTER = "adapter.safetensors"
ADAPTER_FORMAT = "cdsam-adapter/1"
MODES = ("merged", "adapter")


def _state_fingerprint(state: dict[str, torch.Tensor], keys: list[str]) -> str:
    return tensors_sha256((k, state[k]) for k in sorted(keys))


def _base_model(meta: CheckpointMeta, where: str) -> CDSAM:
    """The model before any training: configured weights (or the seeded random init)."""
    seed = meta.extra.get("seed")
    base = build_model(model_config_of(meta, where), load_weights=True, seed=seed)
    apply_specs(base, [LoRASpec(**s) for s in meta.lora])
    return base


def export_merged(checkpoint: Path, out: Path) -> dict[str, Any]:
    model, meta = load_checkpoint(checkpoint)
    merged = merge_lora(model)
    meta = copy.deepcopy(meta)
    meta.extra["export"] = {"mode": "merged", "from": str(checkpoint), "merged_lora": merged}
    save_checkpoint(out, model, meta)
    return {"mode": "merged", "merged_lora": merged, "bytes": (out / WEIGHTS).stat().st_size}


def export_adapter(checkpoint: Path, out: Path) -> dict[str, Any]:
    model, meta = load_checkpoint(checkpoint)
    trained = model.state_dict()
    base = _base_model(meta, str(checkpoint)).state_dict()
    lora_keys = {k for k in trained if ".lora_" in k}
    changed = sorted(k for k in trained
                     if k in lora_keys or not torch.equal(trained[k], base[k]))
    same = [k for k in trained if k not in set(changed)]
    tensors = {k: trained[k].detach().contiguous() for k in changed}
    info = meta.to_dict()
    info.update({"format": ADAPTER_FORMAT, "base_sha256": _state_fingerprint(base, same),
                 "base_keys": len(same)})
    with io.atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / ADAPTER), metadata={"format": ADAPTER_FORMAT})
        (tmp / META).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return {"mode": "adapter", "tensors": len(tensors),
            "params": sum(t.numel() for t in tensors.values()),
            "bytes": (out / ADAPTER).stat().st_size}


def export(checkpoint: str | Path, out: str | Path, mode: str) -> dict[str, Any]:
    if mode not in MODES:
        raise UserError(f"--mode: {mode!r} is not one of {', '.join(MODES)}")
    checkpoint, out = Path(checkpoint), Path(out)
    if out.resolve() == checkpoint.resolve():
        raise UserError(f"--out: {out} is the checkpoint itself; choose another directory")
    return (export_merged if mode == "merged" else export_adapter)(checkpoint, out)


def load_adapter(path: Path, device: str | torch.device = "cpu") -> tuple[CDSAM, CheckpointMeta]:
    raw = json.loads((path / META).read_text())
    meta = meta_from_dict(raw, path / META)
    try:
        tensors = load_file(str(path / ADAPTER))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path / ADAPTER}: corrupt or missing ({exc})") from None
    model = _base_model(meta, str(path))
    state = model.state_dict()
    unknown = [k for k in tensors if k not in state]
    shapes = [k for k in tensors if k in state and tensors[k].shape != state[k].shape]
    if unknown or shapes:
        raise CheckpointError(f"{path / ADAPTER}: does not fit the base model (unknown keys "
                              f"{unknown[:3]}, shape mismatches {shapes[:3]})")
    same = [k for k in state if k not in tensors]
    if _state_fingerprint(state, same) != raw.get("base_sha256"):
        raise CheckpointError(f"{path}: the base weights here differ from those the adapter "
                              "was trained on (model.dino / model.clip / model.sam weights or "
                              "seed); load it where the same base weights are available")
    model.load_state_dict(tensors, strict=False)
    return model.to(device), meta


def load_any(path: Path, device: str | torch.device = "cpu") -> tuple[CDSAM, CheckpointMeta]:
    """A checkpoint directory, a merged export or an adapter export."""
    meta_path = path / META
    if meta_path.is_file():
        try:
            fmt = json.loads(meta_path.read_text()).get("format")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            fmt = None
        if fmt == ADAPTER_FORMAT:
            return load_adapter(path, device)
    read_meta(path)  # the clear error for a missing/odd directory
    return load_checkpoint(path, device)
