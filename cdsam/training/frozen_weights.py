"""Frozen matmul weights held in the autocast dtype on the device.

Under autocast every linear / convolution casts its fp32 weight to bf16 (or fp16) on each use:
one cast kernel per frozen weight per forward, every step, and a second one wherever a layer runs
twice (a mixed click/text batch decodes twice). Autocast keeps its casts only for weights that
train; the frozen ones (DINO before stage 4, SAM's LoRA bases, the SSL teacher) are cast again
each time. Holding them in the autocast dtype removes those kernels and half their memory, and
changes no value: autocast's cast and this one round the same fp32 numbers to the same bf16
numbers.

Only weights whose every use is a matmul or convolution (`LOW_PRECISION_LAYERS`) are held:
norms and embeddings run in fp32 under autocast and would lose bits. The fp32 originals stay on
the host, and `FrozenHold.full_precision` puts them back while a checkpoint is written, so the
saved bytes (and the delta over the base) are the ones the stage started from.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from cdsam.models.model import CDSAM
from cdsam.runtime import Precision

log = logging.getLogger("cdsam.train")

# Layers whose weight and bias only enter ops that autocast runs in its lower precision.
LOW_PRECISION_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.modules.conv._ConvNd)


@dataclass
class FrozenHold:
    """The parameters held in ``dtype``, each with its fp32 original on the host."""

    dtype: torch.dtype | None = None
    held: list[tuple[nn.Parameter, torch.Tensor]] = field(default_factory=list)

    @property
    def nbytes_saved(self) -> int:
        """Device bytes the held copies free, next to fp32 weights."""
        return sum(p.numel() * (orig.element_size() - p.element_size()) for p, orig in self.held)

    @contextmanager
    def full_precision(self) -> Iterator[None]:
        """The fp32 originals in place, on the host, for the block: to write a checkpoint or a
        resume state from, not to run the model with."""
        devices = [param.device for param, _ in self.held]
        for param, original in self.held:
            param.data = original
        try:
            yield
        finally:
            for (param, original), device in zip(self.held, devices, strict=True):
                param.data = original.to(device=device, dtype=self.dtype)

    def release(self) -> None:
        """Back to the fp32 weights on the device for good (the benchmark then times the step
        as autocast runs it by itself)."""
        for param, original in self.held:
            param.data = original.to(param.device)
        self.held = []


def held_parameters(modules: Iterable[nn.Module], dtype: torch.dtype,
                    frozen: Callable[[nn.Parameter], bool] = lambda p: not p.requires_grad
                    ) -> list[nn.Parameter]:
    """The parameters :func:`hold_frozen` casts to ``dtype``: the ``frozen`` weights and biases
    of linears and convolutions. Parameters that train, are already in ``dtype``, or are
    shared with a layer of another kind are left alone (a tied weight may also feed an fp32
    op). Works on the meta device (``cdsam plan`` counts with it)."""
    layer_params: dict[int, nn.Parameter] = {}
    other_params: set[int] = set()
    for module in modules:
        for layer in module.modules():
            own = layer.parameters(recurse=False)
            if isinstance(layer, LOW_PRECISION_LAYERS):
                layer_params.update((id(p), p) for p in own)
            else:
                other_params.update(id(p) for p in own)
    return [param for key, param in layer_params.items()
            if frozen(param) and key not in other_params and param.dtype != dtype
            and param.is_floating_point()]


def hold_frozen(modules: Iterable[nn.Module], dtype: torch.dtype) -> FrozenHold:
    """Cast :func:`held_parameters` of ``modules`` to ``dtype`` in place."""
    hold = FrozenHold(dtype)
    for param in held_parameters(modules, dtype):
        hold.held.append((param, param.detach().to("cpu", copy=True)))
        param.data = param.data.to(dtype)
    return hold


def held_parts(model: CDSAM, teacher: nn.Module | None) -> list[nn.Module]:
    """The modules whose frozen weights a step holds in the autocast dtype: every part the
    step runs and the objective's teacher; not the CLIP text tower, which runs once per prompt
    and in which open_clip picks its compute dtype from its weights'."""
    parts = [m for name, m in model.named_children() if name != "clip_text"]
    return parts + ([teacher] if teacher is not None else [])


def hold_for_stage(model: CDSAM, teacher: nn.Module | None, precision: Precision,
                   enabled: bool = True) -> FrozenHold:
    """Under autocast, the frozen weights of :func:`held_parts`, held in its dtype. Nothing
    without autocast."""
    if not (precision.amp and enabled):
        return FrozenHold()
    hold = hold_frozen(held_parts(model, teacher), precision.dtype)
    log.info("%d frozen weight tensors held in %s on %s (%.0f MB less than fp32)",
             len(hold.held), str(precision.dtype).removeprefix("torch."), precision.device,
             hold.nbytes_saved / 2**20)
    return hold
