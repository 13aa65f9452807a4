"""``train.compile``: ``torch.compile`` the model's tensor-only parts, or say why not and train
uncompiled.

Only the parts that see tensors alone are compiled — each DINO block, the two heads and the SAM
decoder — not the whole model: its forward takes prompt strings and a Python-side text cache,
which made dynamo recompile per prompt batch and give up after 8 tries.

Compilation is lazy: each part compiles on its first call and again whenever its input
shapes change (the last partial batch, validation without gradients, a click/box split of
another size), so a compiler that cannot handle this torch / device / model may fail at any of
those calls — torch 2.11's inductor did on an H200 (``InductorError`` in
``tiling_utils.get_pw_red_splits``). Every compiled call is therefore guarded
(:class:`Guard`): the first failure puts every part back to eager for the rest of the run,
logs one line, and the call runs again eagerly. The backward graph is compiled together with
the forward (``force_non_lazy_backward_lowering``), so its failures surface inside the guarded
forward too instead of in ``loss.backward()``, where no fallback could catch them and DDP's
reducer would be left mid-iteration. :func:`compile_or_fall_back` runs one probe step at
setup, before DDP wraps the model.
"""

from __future__ import annotations

import contextlib
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


class Guard:
    """The compiled calls of one model's parts: the first that raises sends all of them back
    to eager (one log line for the run) and is answered eagerly."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.failure: str | None = None

    def wrap(self, part: nn.Module, compiled: Callable) -> Callable:
        def call(*args, **kwargs):
            try:
                with _backward_with_forward():
                    return compiled(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - dynamo/inductor raise many types
                if out_of_memory(exc):
                    # The graph ran and ran out of memory: not the compiler's failure. Rerun
                    # eagerly it could pass (hiding the OOM from optim.batch_size: auto) and
                    # would draw its dropout a second time.
                    raise
                self.fall_back(exc)
            # Compilation fails before the graph runs, so nothing ran twice; an error of the
            # model itself raises again here, eagerly, with its own traceback.
            return part._call_impl(*args, **kwargs)
        return call

    def fall_back(self, exc: BaseException) -> None:
        uncompile_parts(self.model)
        if self.failure is None:
            self.failure = describe_failure(exc)
            log.warning("train.compile: torch.compile failed on torch %s (%s); training "
                        "uncompiled", torch.__version__, self.failure)


def _backward_with_forward():
    config = torch._functorch.config
    if hasattr(config, "force_non_lazy_backward_lowering"):
        return config.patch(force_non_lazy_backward_lowering=True)
    return contextlib.nullcontext()


def compile_parts(model: nn.Module, backend: str | Callable = "inductor") -> Guard:
    """Compile `tensor_parts` (lazily), each call guarded by the returned `Guard`."""
    guard = Guard(model)
    for part in tensor_parts(model):
        part.compile(backend=backend)
        part._compiled_call_impl = guard.wrap(part, part._compiled_call_impl)
    return guard


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
    True when the parts are still compiled after it. A failure in the probe or in any later
    compiled call logs one line naming the error and the torch version and leaves the run
    eager from then on."""
    guard = compile_parts(model, backend)
    try:
        probe()
    except Exception as exc:  # noqa: BLE001 - dynamo/inductor raise many types; all mean "no"
        if out_of_memory(exc):
            raise
        guard.fall_back(exc)
    return guard.failure is None


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it wraps, outermost first: dynamo keeps a backend's exception as
    `inner_exception` (raised "from None") or as the cause; inductor wraps its own the same
    way."""
    chain = [exc]
    while (inner := getattr(chain[-1], "inner_exception", None) or chain[-1].__cause__) \
            is not None:
        chain.append(inner)
    return chain


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is, or wraps, a device out-of-memory error."""
    return any(isinstance(e, torch.OutOfMemoryError) for e in _chain(exc))


def describe_failure(exc: BaseException) -> str:
    """One line for a compiler error: the wrapper's type, the original error, its first
    message line, and where it was raised (an inductor assertion often has no message)."""
    root = _chain(exc)[-1]
    text = next((line.strip() for line in str(root).splitlines() if line.strip()), "")
    frames = traceback.extract_tb(root.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name}" \
        if frames else ""
    kind = type(exc).__name__ if root is exc else f"{type(exc).__name__} from " \
        f"{type(root).__name__}"
    return f"{kind}{': ' + text[:160] if text else ''}{where}"
