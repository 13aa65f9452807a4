"""FSDP2 sharding of a stage's model under torchrun (``CDSAM_PARALLEL=fsdp``).

DDP keeps a whole replica of the model, its gradients and AdamW state on every rank; FSDP2
(``torch.distributed.fsdp.fully_shard``) keeps 1/N of each and all-gathers a unit's weights
just before it runs. The units: each DINO block, the token projection, then the root (the DINO
embedding and final norm, SAM's decoder and prompt encoder, the small heads). The frozen CLIP
text tower is left out (replicated): it runs once per distinct prompt and is small next to DINO.

Everything that reads or writes whole tensors goes through here: the checkpoint and the resume
state are gathered to rank 0 in full (CPU offload) with ``torch.distributed.checkpoint``'s
state-dict helpers, so the files are the same format as a one-process run's, and a resumed
FSDP run loads them back into its shards. Sharding changes memory, not what is learned: under
gloo on the CPU a 2-rank FSDP run matches DDP within float tolerance (tests/test_sharding.py).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (
    FSDPModule,
    MixedPrecisionPolicy,
    fully_shard,
    register_fsdp_forward_method,
)
from torch.nn.modules.module import _IncompatibleKeys

from cdsam.errors import UserError
from cdsam.models.model import CDSAM
from cdsam.runtime import Precision

log = logging.getLogger("cdsam.fsdp")

# Gathered in full on rank 0, in host memory: what one file on disk holds.
_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def shard_model(model: CDSAM, device: torch.device, precision: Precision,
                world_size: int) -> CDSAM:
    """Shard ``model`` in place over ``world_size`` ranks on ``device`` and return it.

    Under autocast the gathered weights are in its dtype and gradients are reduced in fp32;
    fp16 would also need a sharded GradScaler, which is not built (every GPU with bf16 uses
    bf16 here).
    """
    if precision.needs_scaler:
        raise UserError("CDSAM_PARALLEL=fsdp: this GPU has no bf16, and FSDP with fp16 and a "
                        "GradScaler is not supported; use CDSAM_PARALLEL=ddp")
    # An explicit mesh: the default follows the accelerator, also for a run on the CPU (gloo).
    mesh = init_device_mesh(device.type, (world_size,))
    mp = MixedPrecisionPolicy(param_dtype=precision.dtype, reduce_dtype=torch.float32) \
        if precision.amp else MixedPrecisionPolicy()
    kw: dict[str, Any] = {"mesh": mesh, "mp_policy": mp}
    for block in model.dino.blocks:
        fully_shard(block, **kw)
    # The objective calls it outside the model's forward (CLIP alignment): a unit of its own.
    fully_shard(model.token_proj, **kw)
    # SAM goes with the root: its decoder runs once or twice a batch (text-only rows apart
    # from rows with clicks or boxes), and a unit must run as often on every rank; its prompt
    # encoder and tokens are read directly, outside any submodule's forward.
    fully_shard(model, ignored_params=set(model.clip_text.parameters()), **kw)
    # The feature cache runs the frozen prefix outside forward: gather the root's weights for
    # it too (the blocks gather their own).
    register_fsdp_forward_method(model, "dino_prefix")
    # FSDP2 warns once per epoch and rank that a unit returned a view (a linear layer on
    # BxTxC tokens does, as does dropping DINO's prefix tokens): the hazard is an in-place
    # op on it, which cdsam does not do (the gradients equal one process's, tested).
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDP\w+\) returned a "
                            r"view tensor")
    units = len(model.dino.blocks) + 2
    log.info("FSDP2: %d units sharded over %d ranks on %s (%s weights in the forward, fp32 "
             "gradient reduction); the CLIP text tower stays whole on every rank", units,
             world_size, device.type,
             str(precision.dtype).removeprefix("torch.") if precision.amp else "fp32")
    return model


def full_state(model: nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The model's state dict in full: on every rank without sharding, on rank 0 alone (host
    memory; other ranks get ``{}``) when sharded. Every rank must call it when sharded."""
    if not is_sharded(model):
        state = model.state_dict()
    else:
        state = get_model_state_dict(model, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only))
    if trainable_only:
        keep = {n for n, p in model.named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if k in keep}
    return state


def load_state(model: nn.Module, state: dict[str, torch.Tensor], from_rank0: bool = False
               ) -> Any:
    """Load a full (possibly partial) state dict into the model, sharded or not; returns the
    missing / unexpected keys. ``from_rank0``: only rank 0 holds ``state`` (the others pass
    ``{}``); it is broadcast."""
    if not is_sharded(model):
        return model.load_state_dict(state, strict=False)
    own = model.state_dict().keys()
    # Worked out before loading, on a copy: set_model_state_dict fills the dict it is given
    # with the model's own values for what a partial state leaves out (and turns its values
    # into DTensors), so afterwards nothing would look missing and the caller's dict (the
    # trainer's best state) would have changed. It drops unknown keys: say which, as
    # load_state_dict does.
    keys = _IncompatibleKeys([k for k in own if k not in state] if state else [],
                             [k for k in state if k not in own])
    set_model_state_dict(model, dict(state), options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=from_rank0, strict=False))
    return keys


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state dict; sharded: gathered on rank 0 and keyed by parameter name."""
    if not is_sharded(model):
        return optimizer.state_dict()
    return get_optimizer_state_dict(model, optimizer, options=_GATHER)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                         state: dict[str, Any]) -> None:
    """The inverse of :func:`full_optimizer_state`; every rank passes the full state."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    set_optimizer_state_dict(model, optimizer, state,
                             options=StateDictOptions(full_state_dict=True))
