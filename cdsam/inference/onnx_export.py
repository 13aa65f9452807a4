"""ONNX export: fitted images → mask logits for a fixed prompt set, runnable without cdsam.

The graph's one input, ``images``, is Bx3xCxC float32 RGB in 0–255, already fitted to the
model's square input the way the checkpoint was trained (``data.fit``; `cdsam.data.geometry`);
its one output, ``logits``, is BxPxCxC: one map per prompt in that same frame. Normalisation
is inside the graph, and the CLIP text features of the P prompts are computed at export and
stored as constants, so neither open_clip nor a tokenizer is needed to run it. The batch
dimension is dynamic. ``cdsam-onnx.json`` next to the model says how to fit an image (and
the same facts are in the model's metadata), ``examples/onnx_predict.py`` does it with
numpy, Pillow and onnxruntime only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cdsam.data.geometry import IMAGENET_MEAN, IMAGENET_STD, PAD_RGB
from cdsam.errors import UserError
from cdsam.inference.predictor import input_geometry
from cdsam.models.checkpoint import load_checkpoint
from cdsam.models.lora import merge_lora
from cdsam.models.model import CDSAM

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
SIDECAR = "cdsam-onnx.json"
# Above this many bytes of weights the model goes to an external-data file (protobuf's 2 GB
# limit on one message); below it one self-contained .onnx is easier to ship.
SINGLE_FILE_BYTES = 1_500_000_000


class PromptSetGraph(nn.Module):
    """Bx3xCxC 0–255 RGB → BxPxCxC logits for the prompts whose text features it holds."""

    def __init__(self, model: CDSAM, text: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("text", text.float())
        self.register_buffer("mean", 255 * torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", 255 * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images - self.mean) / self.std
        m = self.model
        size = tuple(x.shape[-2:])
        grid = (size[0] // m.patch_size, size[1] // m.patch_size)
        embeddings = m.token_to_mask(m.encode_image(x), grid)  # DINO once per image
        prompt_tokens = m.text_to_prompt(self.text)  # once per prompt
        b, n = x.shape[0], self.text.shape[0]
        # Every image with every prompt: rows image-major, as `Predictor.frame_logits` pairs them.
        embeddings = embeddings.unsqueeze(1).expand(-1, n, -1, -1, -1).flatten(0, 1)
        prompt_tokens = prompt_tokens.unsqueeze(0).expand(b, -1, -1, -1).flatten(0, 1)
        low, _ = m.sam(embeddings, prompt_tokens)
        masks = F.interpolate(low, size=size, mode="bilinear", align_corners=False)
        return masks.view(b, n, *size)


def build_onnx_graph(model: CDSAM, prompts: list[str]) -> PromptSetGraph:
    """LoRA folded into its base layers (fewer, larger matmuls), text features computed."""
    merge_lora(model)
    with torch.no_grad():
        text = model.clip_text(list(prompts))
    return PromptSetGraph(model, text).eval()


def input_spec(resize: int, crop: int, fit: str) -> dict[str, Any]:
    """How to turn an image into the graph's input, in words a non-cdsam caller can follow."""
    how = (f"resize the longer side to {crop} (bilinear, antialiased), pad bottom and right to "
           f"{crop}x{crop} with RGB {list(PAD_RGB)}; logits[:, :, :h, :w] cover the image"
           if fit == "pad" else
           f"resize the shorter side to {resize} (bilinear, antialiased), centre-crop "
           f"{crop}x{crop}; pixels outside the crop are background")
    return {"name": "images", "shape": ["batch", 3, crop, crop], "dtype": "float32",
            "range": [0, 255], "channels": "RGB", "fit": fit, "resize": resize, "crop": crop,
            "pad_rgb": list(PAD_RGB), "how": how}


def onnxruntime_parity(graph: PromptSetGraph, path: Path, crop: int, batch: int = 2,
                       seed: int = 0) -> dict[str, Any]:
    """Run the saved graph in onnxruntime on seeded images; max |logit difference| vs PyTorch."""
    import onnxruntime as ort

    gen = np.random.default_rng(seed)
    images = gen.integers(0, 256, (batch, 3, crop, crop)).astype(np.float32)
    with torch.no_grad():
        ref = graph(torch.from_numpy(images)).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"images": images})[0]
    return {"batch": batch, "max_abs_diff": float(np.abs(got - ref).max()),
            "mask_agreement": float(((got > 0) == (ref > 0)).mean()),
            "onnxruntime": ort.__version__}


def export_onnx(checkpoint: Path, out: Path, prompts: list[str] | None = None,
                opset: int | None = None, check: bool = True) -> dict[str, Any]:
    """Write ``out/model.onnx`` and ``out/cdsam-onnx.json``; returns the sidecar's content."""
    try:
        import onnx  # noqa: F401  (torch.onnx needs both; say so before loading anything)
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise UserError(f"--mode onnx needs the onnx extra: pip install -e \".[onnx]\" "
                        f"({exc.name} is missing)") from None
    model, meta = load_checkpoint(checkpoint)
    prompts = list(prompts or meta.prompts)
    if not prompts:
        raise UserError(f"{checkpoint}: the checkpoint names no prompts; give --prompt")
    resize, crop, fit = input_geometry(model, meta)  # the geometry `cdsam predict` uses
    graph = build_onnx_graph(model, prompts)
    weight_bytes = sum(t.numel() * t.element_size() for t in graph.state_dict().values())
    sidecar = {
        "format": "cdsam-onnx/1",
        "from": str(checkpoint),
        "stage": meta.stage,
        "input": input_spec(resize, crop, fit),
        "output": {"name": "logits", "shape": ["batch", len(prompts), crop, crop],
                   "prompts": prompts, "threshold_logit": 0.0,
                   "meaning": "mask logits per prompt in the input frame; > 0 is foreground"},
    }
    batch = torch.export.Dim("batch", min=1, max=4096)
    example = torch.zeros(2, 3, crop, crop)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written beside `out` and moved in at the end: a failed export leaves `out` as it was.
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        path = Path(tmp) / ONNX_FILE
        start = time.perf_counter()
        log.info("exporting %s to ONNX (%d prompts, %dx%d input; a minute at ViT-B size)",
                 checkpoint, len(prompts), crop, crop)
        # torch.onnx prints its progress on stdout and onnxscript's optimizer logs every
        # initializer it dedupes: keep stdout for our JSON and the log readable.
        with contextlib.redirect_stdout(sys.stderr), _quiet("onnxscript", "onnx_ir"):
            program = torch.onnx.export(
                graph, (example,), str(path), input_names=["images"], output_names=["logits"],
                dynamic_shapes={"images": {0: batch}}, dynamo=True, opset_version=opset,
                external_data=weight_bytes > SINGLE_FILE_BYTES, verbose=False)
        sidecar["opset"] = int(program.model.opset_imports[""])
        sidecar["export_s"] = round(time.perf_counter() - start, 1)
        _stamp_metadata(path, sidecar)
        if check:
            sidecar["parity"] = onnxruntime_parity(graph, path, crop)
        (Path(tmp) / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n")
        out.mkdir(exist_ok=True)
        for f in Path(tmp).iterdir():
            shutil.move(str(f), out / f.name)
    sidecar["bytes"] = sum(f.stat().st_size for f in out.iterdir() if f.name != SIDECAR)
    return sidecar


@contextlib.contextmanager
def _quiet(*names: str):
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _stamp_metadata(path: Path, sidecar: dict[str, Any]) -> None:
    """The sidecar's facts inside the model too, as metadata_props (onnxruntime:
    ``session.get_modelmeta().custom_metadata_map``)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    fields = {"cdsam.prompts": json.dumps(sidecar["output"]["prompts"]),
              "cdsam.input": json.dumps(sidecar["input"]), "cdsam.from": sidecar["from"]}
    for key, value in fields.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
