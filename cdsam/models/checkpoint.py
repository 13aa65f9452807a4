"""Checkpoints: a directory with ``model.safetensors`` (no pickle) and ``meta.json``.

``meta.json`` holds the stage, the ``model`` config, the LoRA layout, the prompt vocabulary
and the parent checkpoint; loading rebuilds the same structure (same injections as in
training) before the weights go in, so LoRA weights are really used.

Two kinds, one loader. A *delta* checkpoint (what training stages write) stores only what
training changed and ``meta.base`` — the seed and, per component, the base weights' source and
sha256 (see :mod:`cdsam.models.delta_base`); loading rebuilds that base and refuses any other. A *full*
checkpoint (``meta.base`` null: merged exports, older checkpoints) stores every tensor.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cdsam import io
from cdsam.config.parse import parse_section
from cdsam.config.schema import ModelConfig
from cdsam.errors import CheckpointError, UserError
from cdsam.models.delta_base import (
    Base,
    compare,
    describe_sources,
    left_out_fingerprints,
    split_state,
)
from cdsam.models.lora import LoRASpec, apply_specs, lora_specs
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
    # Delta checkpoints: {"seed", "sha256": {component: …}, "sources": {component: …}};
    # None: every tensor is stored.
    base: dict[str, Any] | None = None
    # The rebuilt base's per-tensor digests after loading (not written): a stage trained from
    # this checkpoint saves its own delta against the same base.
    base_state: Base | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "stage": self.stage, "model": self.model, "lora": self.lora,
                "prompts": self.prompts, "parent": self.parent, "extra": self.extra,
                "base": self.base}


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def parent_ref(path: str | Path) -> dict[str, str]:
    """How a child checkpoint records its parent: relative path and weights hash."""
    return {"path": str(path), "sha256": file_sha256(Path(path) / WEIGHTS)}


def check_finite(model: torch.nn.Module, state: dict[str, torch.Tensor] | None = None) -> None:
    bad = [n for n, t in (model.state_dict() if state is None else state).items()
           if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise CheckpointError(f"refusing to save non-finite weights ({', '.join(bad[:3])})")


def save_checkpoint(path: str | Path, model: CDSAM, meta: CheckpointMeta,
                    base: Base | None = None,
                    state: dict[str, torch.Tensor] | None = None) -> None:
    """Write the checkpoint directory atomically (a crash leaves the old one or none).

    With ``base`` (the model as built before training) only the tensors that differ from it
    are written, plus its fingerprint; without, every tensor (a self-contained checkpoint).
    ``state``: the model's full state dict where ``model`` holds only shards of it (FSDP).
    """
    full = model.state_dict() if state is None else state
    check_finite(model, full)
    meta.lora = [s.to_dict() for s in lora_specs(model)]
    if base is None:
        tensors, meta.base = full, None
    else:
        tensors, sha = split_state(model, base, full)
        meta.base = {"seed": base.seed, "sha256": sha,
                     "sources": describe_sources(meta.model, base.seed)}
    state = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
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
    """The fields of a checkpoint's meta.json."""
    try:
        base = raw.get("base")
        if base is not None and not (isinstance(base, dict) and isinstance(base["sha256"], dict)):
            raise TypeError("base must hold a sha256 table")
        return CheckpointMeta(stage=int(raw["stage"]), model=raw["model"],
                              lora=list(raw.get("lora", [])),
                              prompts=list(raw.get("prompts", [])), parent=raw.get("parent"),
                              extra=dict(raw.get("extra", {})), base=base)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: missing or bad field ({exc})") from None


def model_config_of(meta: CheckpointMeta, where: str) -> ModelConfig:
    errors: list[str] = []
    model = meta.model
    sam = model.get("sam") if isinstance(model, dict) else None
    if isinstance(sam, dict) and "prompt_map" not in sam:
        # Written before clicks and boxes were drawn as a map: its mask-input encoder never
        # trained, so it decodes as it was trained.
        model = {**model, "sam": {**sam, "prompt_map": False}}
    heads = model.get("heads") if isinstance(model, dict) else None
    if isinstance(heads, dict) and "instances" not in heads:
        # Written before the presence and centre heads: built without them.
        model = {**model, "heads": {**heads, "instances": False}}
    cfg = parse_section(ModelConfig, model, "model", errors)
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


def load_state_into(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str,
                    partial: bool = False) -> None:
    """Strict load that names the first differing keys and shapes instead of a stack trace.
    ``partial``: keys absent from ``state`` keep the model's values (the base's)."""
    ours = model.state_dict()
    missing = [] if partial else [k for k in ours if k not in state]
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
    model.load_state_dict(state, strict=not partial)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu"
                    ) -> tuple[CDSAM, CheckpointMeta]:
    """Rebuild the model a checkpoint was trained as (LoRA included) and load its weights.

    A delta checkpoint rebuilds its base (the weight files its ``model`` config names, or the
    seeded init) and checks it is the one training started from."""
    path = Path(path)
    meta = read_meta(path)
    state = read_state(path)
    cfg = model_config_of(meta, str(path))
    # Loading leaves the caller's RNG alone (random inits, the base's reseeding, LoRA factors
    # drawn before the stored ones replace them): a stage seeds itself before it loads its
    # parent, and that seed must still hold after.
    with torch.random.fork_rng(devices=[]):
        if meta.base is None:
            model = build_model(cfg, load_weights=False)
        else:
            seed = meta.base.get("seed")
            try:
                model = build_model(cfg, load_weights=True, seed=seed)
            except UserError as exc:  # a weight file the base needs is gone or unreadable
                raise CheckpointError(
                    f"{path}: cannot rebuild the base weights it was trained on ({exc}); the "
                    f"checkpoint stores only what training changed: restore that file (dvc "
                    f"pull) or use a merged export") from None
            meta.base_state = Base.of(model, seed)
        try:
            apply_specs(model, [LoRASpec(**s) for s in meta.lora])
        except (AttributeError, TypeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{path / META}: LoRA layout does not fit the model ({exc})"
                                  ) from None
    load_state_into(model, state, str(path / WEIGHTS), partial=meta.base is not None)
    if meta.base is not None:
        _check_base(path, model, state, meta)
    return model.to(device), meta


def _check_base(path: Path, model: CDSAM, state: dict[str, torch.Tensor],
                meta: CheckpointMeta) -> None:
    """Refuse a rebuilt base that is not the one the delta was computed against."""
    assert meta.base is not None and meta.base_state is not None
    now, missing = left_out_fingerprints(model, state, meta.base_state)
    if missing:
        raise CheckpointError(f"{path / WEIGHTS}: checkpoint does not fit the model (missing "
                              f"keys {missing[:3]})")
    then_src = meta.base.get("sources") or {}
    now_src = describe_sources(meta.model, meta.base.get("seed"))
    problem = compare(meta.base["sha256"], now, then_src, now_src)
    if problem:
        raise CheckpointError(f"{path}: other base weights than it was trained on: {problem}")
