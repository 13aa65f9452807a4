"""LoRA for ``nn.Linear``: a drop-in wrapper, injection by target, exact merge, helpers.

The effective weight of a wrapped layer is ``W + (alpha / rank) * B @ A`` with ``A`` Kaiming
initialised and ``B`` zero, so a freshly injected model computes exactly what it did before.
LoRA parameters are always found by module type (:class:`LoRALinear`, :class:`LoRAWeight`),
never by name.

Two forms: :class:`LoRALinear` wraps an ``nn.Linear`` (DINO, SAM; input dropout possible), and
:class:`LoRAWeight` adds ``B @ A`` to a weight tensor as a ``torch.nn.utils.parametrize``
parametrization, for weights a module reads itself instead of calling a Linear: the packed
in-projection of ``nn.MultiheadAttention`` (which also reads ``out_proj.weight`` directly), as
in the CLIP text towers of open_clip. A spec's ``name`` is a module path for the first form and
a parameter path (``….attn.in_proj_weight``) for the second.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize


@dataclass(frozen=True)
class LoRASpec:
    """Where one adapter sits and how it is shaped; stored in checkpoint metadata."""

    name: str  # module path inside the model, e.g. "dino.blocks.7.attn.qkv"
    rank: int
    alpha: float
    dropout: float

    def to_dict(self) -> dict:
        return asdict(self)


class LoRALinear(nn.Module):
    """``base(x) + scale * dropout(x) @ A^T @ B^T`` around a frozen ``nn.Linear``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.rank = rank
        self.alpha = float(alpha)
        self.scale = self.alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.dropout_p = float(dropout)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def merged_weight(self) -> torch.Tensor:
        return self.base.weight + self.scale * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lora = nn.functional.linear(nn.functional.linear(self.dropout(x), self.lora_A), self.lora_B)
        return self.base(x) + self.scale * lora

    def merge(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the adapter folded into its weight."""
        merged = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None,
                           device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            merged.weight.copy_(self.merged_weight())
            if self.base.bias is not None:
                merged.bias.copy_(self.base.bias)
        return merged

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, dropout={self.dropout_p}"


class LoRAWeight(nn.Module):
    """Parametrization ``W -> W + scale * B @ A`` of one 2-D weight; no input dropout (the
    adapter never sees the input)."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if weight.dim() != 2:
            raise ValueError(f"a weight LoRA needs a 2-D weight, got shape {tuple(weight.shape)}")
        self.rank = rank
        self.alpha = float(alpha)
        self.scale = self.alpha / rank
        out_features, in_features = weight.shape
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * (self.lora_B @ self.lora_A)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


def inject_weight_lora(root: nn.Module, names: Iterable[str], rank: int, alpha: float
                       ) -> list[LoRASpec]:
    """Parametrize each named weight (``module.path.param``) with :class:`LoRAWeight`; the
    original weight is frozen. Returns the specs applied."""
    specs = []
    for name in names:
        owner_name, _, attr = name.rpartition(".")
        owner = root.get_submodule(owner_name) if owner_name else root
        weight = getattr(owner, attr, None)
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"{name} is not a weight tensor")
        if parametrize.is_parametrized(owner, attr):
            raise ValueError(f"{name} already carries a LoRA adapter")
        parametrize.register_parametrization(owner, attr, LoRAWeight(weight, rank, alpha))
        owner.parametrizations[attr].original.requires_grad_(False)
        specs.append(LoRASpec(name, rank, float(alpha), 0.0))
    return specs


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def find_targets(root: nn.Module, substrings: Sequence[str], prefix: str = "") -> list[str]:
    """Names of plain ``nn.Linear`` layers under ``root`` whose path contains a substring."""
    found = []
    for name, module in root.named_modules():
        if type(module) is nn.Linear and any(s in name for s in substrings):
            found.append(f"{prefix}{name}")
    return found


def inject_lora(root: nn.Module, names: Iterable[str], rank: int, alpha: float,
                dropout: float = 0.0) -> list[LoRASpec]:
    """Wrap each named ``nn.Linear`` in :class:`LoRALinear`; returns the specs applied."""
    specs = []
    for name in names:
        module = root.get_submodule(name)
        if isinstance(module, LoRALinear):
            raise ValueError(f"{name} already carries a LoRA adapter")
        if type(module) is not nn.Linear:
            raise TypeError(f"{name} is a {type(module).__name__}, not nn.Linear")
        _set_submodule(root, name, LoRALinear(module, rank, alpha, dropout))
        specs.append(LoRASpec(name, rank, float(alpha), float(dropout)))
    return specs


def _names_a_weight(root: nn.Module, name: str) -> bool:
    owner_name, _, attr = name.rpartition(".")
    try:
        owner = root.get_submodule(owner_name) if owner_name else root
    except AttributeError:
        return False
    return not isinstance(getattr(owner, attr, None), nn.Module)


def apply_specs(root: nn.Module, specs: Iterable[LoRASpec]) -> None:
    """Re-create a recorded LoRA layout (used when loading a checkpoint)."""
    for spec in specs:
        if _names_a_weight(root, spec.name):
            inject_weight_lora(root, [spec.name], spec.rank, spec.alpha)
        else:
            inject_lora(root, [spec.name], spec.rank, spec.alpha, spec.dropout)


def lora_modules(root: nn.Module, prefix: str = "") -> Iterator[tuple[str, LoRALinear]]:
    for name, module in root.named_modules():
        if isinstance(module, LoRALinear):
            yield f"{prefix}{name}", module


def lora_weights(root: nn.Module, prefix: str = "") -> Iterator[tuple[str, LoRAWeight]]:
    """(``module.path.param``, adapter) for every :class:`LoRAWeight` under ``root``."""
    for name, module in root.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for attr, chain in module.parametrizations.items():
            for p in chain:
                if isinstance(p, LoRAWeight):
                    yield f"{prefix}{name + '.' if name else ''}{attr}", p


def has_lora(root: nn.Module) -> bool:
    """Whether any adapter, of either form, sits under ``root``."""
    return any(True for _ in lora_modules(root)) or any(True for _ in lora_weights(root))


def lora_specs(root: nn.Module) -> list[LoRASpec]:
    return [LoRASpec(n, m.rank, m.alpha, m.dropout_p) for n, m in lora_modules(root)] + \
        [LoRASpec(n, w.rank, w.alpha, 0.0) for n, w in lora_weights(root)]


def lora_parameters(root: nn.Module) -> list[nn.Parameter]:
    params = []
    for _, module in lora_modules(root):
        params.extend([module.lora_A, module.lora_B])
    for _, weight in lora_weights(root):
        params.extend([weight.lora_A, weight.lora_B])
    return params


def merge_lora(root: nn.Module) -> int:
    """Fold every adapter under ``root`` into its base layer or weight; returns how many were
    merged."""
    names = [n for n, _ in lora_modules(root)]
    for name in names:
        _set_submodule(root, name, root.get_submodule(name).merge())
    weights = [n for n, _ in lora_weights(root)]
    for name in weights:
        owner_name, _, attr = name.rpartition(".")
        owner = root.get_submodule(owner_name) if owner_name else root
        # W + scale·BA written into the original parameter, which stays the module's weight.
        parametrize.remove_parametrizations(owner, attr, leave_parametrized=True)
    return len(names) + len(weights)


def set_lora_trainable(root: nn.Module, trainable: bool = True) -> None:
    for p in lora_parameters(root):
        p.requires_grad_(trainable)
