"""The base a checkpoint is a delta over.

The base is the model :func:`cdsam.models.model.build_model` gives before any training: the
weight files (or hub weights) the ``model`` params name, and the seeded random init for
everything else (the toy backbones, the heads). A stage checkpoint stores only the tensors
training made differ from that base (LoRA, heads, SAM LoRA, DINO in full once stage 4 trains
it) plus, per component, the base's name and a sha256 over the tensors it left out. Loading
rebuilds the base from the same params and seed, checks that fingerprint, and fills the stored
tensors in — so a frozen CLIP text tower or DINO is never copied into every stage directory,
and a checkpoint put on other base weights fails with both named instead of predicting garbage.

Tensors are compared under their names without LoRA (``…qkv.base.weight`` is the base's
``…qkv.weight``, ``…attn.parametrizations.in_proj_weight.original`` its ``…attn.in_proj_weight``),
so an adapter-wrapped layer whose base weight did not change is left out too.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cdsam.models.lora import has_lora, lora_modules

# A parametrized weight's stored original (weight-space LoRA): the base's plain weight.
_PARAMETRIZED = re.compile(r"\.parametrizations\.([^.]+)\.original$")


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of one tensor's dtype, shape and bytes."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # buffer, no copy
    return h.hexdigest()


def canonical_names(model: nn.Module) -> dict[str, str]:
    """state-dict key → the same tensor's key in the model without LoRA wrappers."""
    wrapped = sorted((name for name, _ in lora_modules(model)), key=len, reverse=True)
    names = {}
    for key in model.state_dict():
        canon = _PARAMETRIZED.sub(r".\1", key)
        for w in wrapped:
            if key.startswith(w + ".base."):
                canon = w + "." + key[len(w) + len(".base."):]
                break
        names[key] = canon
    return names


def component_of(key: str) -> str:
    """The top-level part a key belongs to (``dino``, ``clip_text``, ``sam``, a head)."""
    return key.split(".", 1)[0]


@dataclass
class Base:
    """Per-tensor digests of a freshly built model (no LoRA), and the seed it was built with."""

    seed: int | None
    digests: dict[str, str]

    @classmethod
    def of(cls, model: nn.Module, seed: int | None) -> Base:
        """Fingerprint ``model`` as built, before LoRA injection or training."""
        if has_lora(model):
            raise ValueError("a base is fingerprinted before LoRA is injected")
        return cls(seed, {k: tensor_digest(v) for k, v in model.state_dict().items()})


def _fingerprints(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """component → sha256 over sorted (name, digest) pairs of the tensors left out."""
    by_part: dict[str, list[tuple[str, str]]] = {}
    for name, digest in pairs:
        by_part.setdefault(component_of(name), []).append((name, digest))
    out = {}
    for part, items in sorted(by_part.items()):
        h = hashlib.sha256()
        for name, digest in sorted(items):
            h.update(f"{name}\0{digest}\0".encode())
        out[part] = h.hexdigest()
    return out


def split_state(model: nn.Module, base: Base, state: dict[str, torch.Tensor] | None = None
                ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors to store, per-component fingerprint of the base tensors left out).

    Stored: every trainable parameter, every tensor the base does not have (LoRA factors), and
    every frozen tensor whose bytes differ from the base (e.g. a merged layer). ``state``: the
    model's full state dict, where the model holds only shards of it.
    """
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    names = canonical_names(model)
    stored: dict[str, torch.Tensor] = {}
    left_out = []
    for key, value in (model.state_dict() if state is None else state).items():
        canon = names[key]
        want = base.digests.get(canon)
        if key in trainable or want is None:
            stored[key] = value
            continue
        digest = tensor_digest(value)
        if digest == want:
            left_out.append((canon, digest))
        else:
            stored[key] = value
    return stored, _fingerprints(left_out)


def left_out_fingerprints(model: nn.Module, stored: Iterable[str],
                          base: Base) -> tuple[dict[str, str], list[str]]:
    """For a rebuilt base with the checkpoint's LoRA layout: the fingerprints of the tensors a
    checkpoint did not store, and the keys among them the base does not have (missing)."""
    stored = set(stored)
    names = canonical_names(model)
    pairs, missing = [], []
    for key in model.state_dict():
        if key in stored:
            continue
        canon = names[key]
        digest = base.digests.get(canon)
        if digest is None:
            missing.append(key)
        else:
            pairs.append((canon, digest))
    return _fingerprints(pairs), missing


def describe_sources(model_cfg: dict[str, Any], seed: int | None) -> dict[str, str]:
    """What each component's base weights are, in words, for messages and ``meta.json``."""
    dino, clip, sam = (model_cfg.get(k) or {} for k in ("dino", "clip", "sam"))
    init = f"seeded random init (seed {seed})"
    if dino.get("checkpoint"):
        dino_src = f"{dino.get('name')} from {dino['checkpoint']}"
    elif dino.get("pretrained"):
        dino_src = f"{dino.get('name')} hub weights"
    else:
        dino_src = f"{dino.get('name')}, {init}"
    clip_src = f"{clip.get('name')} " + (f"weights {clip['pretrained']}" if clip.get("pretrained")
                                         else init)
    sam_src = f"SAM {sam.get('type')} " + (f"from {sam['checkpoint']}" if sam.get("checkpoint")
                                           else init)
    return {"dino": dino_src, "clip_text": clip_src, "sam": sam_src}


def compare(recorded: dict[str, str], now: dict[str, str], sources_then: dict[str, str],
            sources_now: dict[str, str]) -> str | None:
    """The first component whose base differs, described with both sources; None if all match."""
    for part in sorted(set(recorded) | set(now)):
        if recorded.get(part) != now.get(part):
            then = sources_then.get(part, f"{part}: seeded init")
            cur = sources_now.get(part, f"{part}: seeded init")
            return (f"{part} was trained on {then} (sha256 {str(recorded.get(part))[:12]}), "
                    f"but the base built now is {cur} (sha256 {str(now.get(part))[:12]})")
    return None
