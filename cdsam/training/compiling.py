"""``train.compile``: ``torch.compile`` the model's tensor-only parts, or say why not and train
uncompiled.

Only the parts that see tensors alone are compiled — each DINO block, the two heads and the SAM
decoder — not the whole model: its forward takes prompt strings and a Python-side text cache,
which made dynamo recompile per prompt batch and give up after 8 tries.

Compilation is lazy (the first call compiles), so a compiler that cannot handle this torch /
device / model fails inside the first training step: torch 2.11's inductor did so on an H200
(``InductorError`` in ``tiling_utils.get_pw_red_splits``). :func:`compile_or_fall_back` runs
one probe step first; when it raises, the parts go back to eager, one line says so, and
training goes on uncompiled.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger("cdsam.training.trainer")


def tensor_parts(model: nn.Module) -> Iterator[nn.Module]:
    """The modules `compile_parts` compiles: each DINO block, the heads, the SAM decoder."""
    yield from model.dino.blocks
    yield from (model.token_to_mask, model.text_to_prompt, model.sam)


def compile_parts(model: nn.Module, backend: str | Callable = "inductor") -> None:
    for part in tensor_parts(model):
        part.compile(backend=backend)


def uncompile_parts(model: nn.Module) -> None:
    """Back to eager: `nn.Module.compile` keeps the compiled callable in
    ``_compiled_call_impl`` and calls it when set; unset, the module runs its own forward."""
    for part in tensor_parts(model):
        part._compiled_call_impl = None
    torch._dynamo.reset()  # drop the failed frames' guards and caches


def is_compiled(model: nn.Module) -> bool:
    return any(getattr(part, "_compiled_call_impl", None) is not None
               for part in tensor_parts(model))


def compile_or_fall_back(model: nn.Module, probe: Callable[[], None],
                         backend: str | Callable = "inductor") -> bool:
    """Compile `tensor_parts` and run ``probe`` (one forward + backward, which compiles them);
    True when that worked. Otherwise log one line naming the error and the torch version,
    restore eager execution and return False."""
    compile_parts(model, backend)
    try:
        probe()
    except Exception as exc:  # noqa: BLE001 - dynamo/inductor raise many types; all mean "no"
        uncompile_parts(model)
        log.warning("train.compile: torch.compile failed on torch %s (%s); training uncompiled",
                    torch.__version__, describe_failure(exc))
        return False
    return True


def describe_failure(exc: BaseException) -> str:
    """One line for a compiler error: the wrapper's type, the original error, its first
    message line, and where it was raised (an inductor assertion often has no message)."""
    root = exc
    # dynamo keeps a backend's exception as `inner_exception` (raised "from None") or as the
    # cause; inductor wraps its own the same way.
    while (inner := getattr(root, "inner_exception", None) or root.__cause__) is not None:
        root = inner
    text = next((line.strip() for line in str(root).splitlines() if line.strip()), "")
    frames = traceback.extract_tb(root.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name}" \
        if frames else ""
    kind = type(exc).__name__ if root is exc else f"{type(exc).__name__} from " \
        f"{type(root).__name__}"
    return f"{kind}{': ' + text[:160] if text else ''}{where}"
