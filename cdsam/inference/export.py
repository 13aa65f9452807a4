"""Export a checkpoint: ``merged`` (LoRA folded in, every tensor stored, no base needed) or
``onnx`` (a text graph and an image + text → masks graph, or one graph for a fixed prompt set:
`cdsam.inference.onnx_export`).

Stage checkpoints hold only what training changed and rebuild their base weights on load
(:mod:`cdsam.models.delta_base`); a merged export is the self-contained form to ship: an ordinary checkpoint
directory (``model.safetensors`` + ``meta.json``) whose layout has no LoRA modules at all.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from cdsam.errors import UserError
from cdsam.models.checkpoint import WEIGHTS, load_checkpoint, save_checkpoint
from cdsam.models.lora import merge_lora

MODES = ("merged", "onnx")


def export_merged(checkpoint: Path, out: Path) -> dict[str, Any]:
    model, meta = load_checkpoint(checkpoint)
    merged = merge_lora(model)
    meta = copy.deepcopy(meta)
    meta.extra["export"] = {"mode": "merged", "from": str(checkpoint), "merged_lora": merged}
    save_checkpoint(out, model, meta)  # no base: every tensor, loadable without the weights
    return {"mode": "merged", "merged_lora": merged, "bytes": (out / WEIGHTS).stat().st_size}


def export(checkpoint: str | Path, out: str | Path, mode: str,
           prompts: list[str] | None = None, check: bool = True,
           fixed_prompts: bool = False) -> dict[str, Any]:
    if mode not in MODES:
        raise UserError(f"--mode: {mode!r} is not one of {', '.join(MODES)}")
    checkpoint, out = Path(checkpoint), Path(out)
    if out.resolve() == checkpoint.resolve():
        raise UserError(f"--out: {out} is the checkpoint itself; choose another directory")
    if mode == "onnx":
        from cdsam.inference.onnx_export import export_onnx

        return {"mode": "onnx", **export_onnx(checkpoint, out, prompts, check=check,
                                              fixed_prompts=fixed_prompts)}
    if prompts or fixed_prompts:
        raise UserError("--prompt / --fixed-prompts: only --mode onnx takes prompts")
    return export_merged(checkpoint, out)

