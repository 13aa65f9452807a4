"""ONNX export: fitted images and prompts → mask logits, runnable without cdsam or torch.

Two graphs by default, so a deployed model takes any prompt: ``text.onnx`` (``tokens``, PxL
int64 ids → ``text``, PxD L2-normalised features; `cdsam.inference.text_onnx`, with the
tower's ``tokenizer.json`` beside it) and ``model.onnx`` (``images`` Bx3xCxC float32 RGB in
0–255, already fitted to the model's square input the way the checkpoint was trained
(``data.fit``; `cdsam.data.geometry`), and ``text`` PxD → ``logits`` BxPxCxC: one map per
prompt in that same frame). With ``--fixed-prompts`` there is one graph, ``images`` →
``logits``, the P prompts' text features stored in it as constants (no tokenizer at all).
Normalisation is inside the graph; batch and prompt counts are dynamic. ``cdsam-onnx.json``
next to the model says how to fit an image and make token ids (the same facts are in the
model's metadata); ``examples/onnx_predict.py`` does both with numpy, Pillow, tokenizers and
onnxruntime only. The export checks itself in onnxruntime, on a prompt it never saw when the
text is an input.

A model with the instance heads also gives ``presence`` (BxP), ``centres`` (BxPx4hx4w) and
``embeddings`` (Bx256xhxw) from ``model.onnx``, and ``seeds.onnx`` decodes one click a row
against those embeddings: the seed loop of `cdsam.inference.instances` (``decode: prompts``)
runs outside torch (``examples/onnx_predict.py --instances``); the sidecar's ``instances``
entry holds its knobs and the checkpoint's deployment point.
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

from cdsam.config.schema import InstanceConfig
from cdsam.data.geometry import IMAGENET_MEAN, IMAGENET_STD, PAD_RGB
from cdsam.data.spatial import POINT_SLOTS
from cdsam.data.templates import PromptEnsembles
from cdsam.errors import UserError
from cdsam.inference.instances import stored_min_quality
from cdsam.inference.predictor import ensembles_of, input_geometry
from cdsam.inference.text_onnx import (
    TEXT_FILE,
    TOKENIZER_FILE,
    TextGraph,
    export_tokenizer,
    token_ids,
    tokenizer_agrees,
)
from cdsam.models.checkpoint import load_checkpoint
from cdsam.models.lora import merge_lora
from cdsam.models.model import CDSAM
from cdsam.models.prompt_map import draw_prompt_map, map_size

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
SEEDS_FILE = "seeds.onnx"  # the seed decoder of models with the instance heads
SIDECAR = "cdsam-onnx.json"
# Prompts the free-prompt export checks itself on: none is in the default's vocabulary.
UNSEEN_PROMPTS = ("a photo of a dog", "a small purple hexagon", "something red")
# Texts the exported tokenizer must split as the tower's own does, beside the vocabulary:
# case, runs of spaces, punctuation, contractions, digits, and one longer than any context.
# Texts open_clip's cleaning changes (ftfy: curly quotes, full-width letters, ligatures,
# mojibake; HTML entities, twice unescaped) and a prompt longer than the context.
TOKENIZER_PROBES = (*UNSEEN_PROMPTS, "A  Green   TRIANGLE!", "it's the cell's 2nd nucleus",
                    "lesion, 3 mm; left-lower lobe", " ".join(["word"] * 80),
                    "a cat\u2019s toy", "Tom &amp; Jerry", "Tom &amp;amp; Jerry",
                    "\uff32\uff25\uff24 circle", "a \ufb01sh", "caf\u00c3\u00a9 table",
                    "a \u201cred\u201d\tsquare\n", "snake_case_label")
# Above this many bytes of weights the model goes to an external-data file (protobuf's 2 GB
# limit on one message); below it one self-contained .onnx is easier to ship.
SINGLE_FILE_BYTES = 1_500_000_000


class ImageTextGraph(nn.Module):
    """(Bx3xCxC 0–255 RGB, PxD text features) → BxPxCxC logits."""

    def __init__(self, model: CDSAM) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", 255 * torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", 255 * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.rows(images, text)[0]

    def rows(self, images: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(BxPxCxC logits, Bx256xhxw embeddings, B*P rows of: embeddings, text, low-res
        logits; BxNxC DINO tokens)."""
        x = (images - self.mean) / self.std
        m = self.model
        size = tuple(x.shape[-2:])
        grid = (size[0] // m.patch_size, size[1] // m.patch_size)
        tokens = m.encode_image(x)  # DINO once per image
        per_image = m.token_to_mask(tokens, grid)
        prompt_tokens = m.text_to_prompt(text)  # once per prompt
        b, n = x.shape[0], text.shape[0]
        # Every image with every prompt: rows image-major, as `Predictor.frame_logits` pairs them.
        embeddings = per_image.unsqueeze(1).expand(-1, n, -1, -1, -1).flatten(0, 1)
        prompt_tokens = prompt_tokens.unsqueeze(0).expand(b, -1, -1, -1).flatten(0, 1)
        low, _ = m.sam(embeddings, prompt_tokens)
        masks = F.interpolate(low, size=size, mode="bilinear", align_corners=False)
        text_rows = text.unsqueeze(0).expand(b, -1, -1).flatten(0, 1)
        return masks.view(b, n, *size), per_image, embeddings, text_rows, low, tokens


class ImageTextObjectsGraph(ImageTextGraph):
    """(images, text) → (BxPxCxC logits, BxP presence probabilities, BxPx4hx4w centre
    heatmaps, Bx256xhxw SAM image embeddings for `SeedGraph`): the instance heads' inputs to
    `cdsam.inference.instances`' seed decoding, as `CDSAM.decode` computes them."""

    def forward(self, images: torch.Tensor, text: torch.Tensor  # type: ignore[override]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        m = self.model
        logits, per_image, embeddings, text_rows, low, tokens = self.rows(images, text)
        b, n = logits.shape[:2]
        weights = F.adaptive_avg_pool2d(torch.sigmoid(low.float()), embeddings.shape[-2:])
        clip_tokens = m.token_proj(tokens).unsqueeze(1).expand(-1, n, -1, -1).flatten(0, 1)
        presence = torch.sigmoid(m.presence_head(embeddings, text_rows, weights, clip_tokens))
        centres = torch.sigmoid(m.centre_head(embeddings, text_rows))
        return (logits, presence.view(b, n), centres.view(b, n, *centres.shape[-2:]),
                per_image)


class SeedGraph(nn.Module):
    """(Ix256xhxw embeddings, SxD text, Sx2 clicks (x, y) in the input frame, S image index)
    → (SxCxC logits, S predicted IoU): each seed a positive click next to its prompt's text,
    decoded as `cdsam.inference.instances.prompted_instances` decodes it."""

    def __init__(self, model: CDSAM) -> None:
        super().__init__()
        self.model = model

    def forward(self, embeddings: torch.Tensor, text: torch.Tensor, points: torch.Tensor,
                image_of: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        size = (embeddings.shape[-2] * m.patch_size, embeddings.shape[-1] * m.patch_size)
        rows = embeddings[image_of]
        n = text.shape[0]
        # The slot layout decode_instances gives: the click first, the other slots empty, an
        # empty box.
        pts = torch.cat([points[:, None, :], points.new_zeros(n, POINT_SLOTS - 1, 2)], dim=1)
        labels = torch.cat([torch.ones(n, 1, dtype=torch.int64),
                            torch.full((n, POINT_SLOTS - 1), -1, dtype=torch.int64)], dim=1)
        boxes, valid = points.new_zeros(n, 4), torch.zeros(n, dtype=torch.bool)
        extra = m.sam.encode_prompts(n, size, (pts, labels), boxes, valid)
        tokens = torch.cat([m.text_to_prompt(text), extra.to(text.dtype)], dim=1)
        dense = None
        if m.sam.prompt_map:
            dense = m.sam.encode_map(draw_prompt_map(
                map_size(tuple(rows.shape[-2:])), size, (pts, labels), boxes, valid, n,
                rows.device, click_radius=m.sam.click_radius))
        low, iou = m.sam(rows, tokens, dense)
        return F.interpolate(low, size=size, mode="bilinear", align_corners=False)[:, 0], iou[:, 0]


class PromptSetGraph(nn.Module):
    """Bx3xCxC 0–255 RGB → BxPxCxC logits for the prompts whose text features it holds."""

    def __init__(self, model: CDSAM, text: torch.Tensor) -> None:
        super().__init__()
        # (not `graph`: the exporter's FX module has an attribute of that name)
        self.image_text = ImageTextGraph(model)
        self.register_buffer("text", text.float())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_text(images, self.text)


def build_onnx_graph(model: CDSAM, prompts: list[str],
                     ensembles: PromptEnsembles | None = None) -> PromptSetGraph:
    """LoRA folded into its base layers (fewer, larger matmuls), text features computed (the
    mean over the training templates for a prompt of a known class)."""
    merge_lora(model)
    with torch.no_grad():
        text = model.clip_text.groups([ensembles.variants(p) if ensembles else [p]
                                       for p in prompts])
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
                opset: int | None = None, check: bool = True,
                fixed_prompts: bool = False) -> dict[str, Any]:
    """Write ``out/model.onnx`` (+ ``text.onnx`` and ``tokenizer.json`` unless
    ``fixed_prompts``) and ``out/cdsam-onnx.json``; returns the sidecar's content."""
    try:
        import onnx  # noqa: F401  (torch.onnx needs both; say so before loading anything)
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise UserError(f"--mode onnx needs the onnx extra: pip install -e \".[onnx]\" "
                        f"({exc.name} is missing)") from None
    model, meta = load_checkpoint(checkpoint)
    ensembles = ensembles_of(meta, checkpoint)
    prompts = list(prompts or meta.prompts)
    if not prompts:
        raise UserError(f"{checkpoint}: the checkpoint names no prompts; give --prompt")
    resize, crop, fit = input_geometry(model, meta)  # the geometry `cdsam predict` uses
    fixed = build_onnx_graph(model, prompts, ensembles)
    # The instance heads and the seed decoder travel with the free-prompt export.
    objects = model.has_instance_heads and not fixed_prompts
    weight_bytes = sum(t.numel() * t.element_size() for t in fixed.state_dict().values())
    sidecar: dict[str, Any] = {
        "format": "cdsam-onnx/1" if fixed_prompts else "cdsam-onnx/2",
        "from": str(checkpoint),
        "stage": meta.stage,
        "input": input_spec(resize, crop, fit),
        "output": {"name": "logits", "shape": ["batch", len(prompts), crop, crop],
                   "prompts": prompts, "threshold_logit": 0.0,
                   "meaning": "mask logits per prompt in the input frame; > 0 is foreground"},
    }
    if not fixed_prompts:
        sidecar["output"]["shape"][1] = "prompts"
        sidecar["output"]["prompts_meaning"] = "the training vocabulary (any text works)"
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written beside `out` and moved in at the end: a failed export leaves `out` as it was.
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp_name:
        tmp = Path(tmp_name)
        start = time.perf_counter()
        log.info("exporting %s to ONNX (%s, %dx%d input; a minute at ViT-B size)", checkpoint,
                 f"{len(prompts)} fixed prompts" if fixed_prompts else "text graph + image graph",
                 crop, crop)
        batch = torch.export.Dim("batch", min=1, max=4096)
        images = torch.zeros(2, 3, crop, crop)
        if fixed_prompts:
            program = _export(fixed, (images,), tmp / ONNX_FILE, ["images"], ["logits"],
                              {"images": {0: batch}}, opset, weight_bytes)
        else:
            tower = model.clip_text
            spec = export_tokenizer(tower, tmp)
            n = torch.export.Dim("prompts", min=1, max=4096)
            text = torch.zeros(3, tower.width)
            graph = ImageTextObjectsGraph(model).eval() if objects else fixed.image_text
            outputs = list(OBJECT_OUTPUTS) if objects else ["logits"]
            program = _export(graph, (images, text), tmp / ONNX_FILE, ["images", "text"],
                              outputs, {"images": {0: batch}, "text": {0: n}}, opset,
                              weight_bytes)
            if objects:
                sidecar["instances"] = export_seeds(model, meta.extra, tmp, crop, opset,
                                                    weight_bytes)
            text_graph = TextGraph(tower).eval()
            text_bytes = sum(t.numel() * t.element_size()
                             for t in text_graph.state_dict().values())
            _export(text_graph, (tower.tokenizer(list(UNSEEN_PROMPTS[:2])),), tmp / TEXT_FILE,
                    ["tokens"], ["text"], {"tokens": {0: n}}, opset, text_bytes)
            sidecar["text"] = {
                "graph": TEXT_FILE,
                "input": {"name": "tokens", "dtype": "int64",
                          "shape": ["prompts", spec["context_length"]]},
                "output": {"name": "text", "shape": ["prompts", tower.width],
                           "meaning": "L2-normalised text features, the image graph's text"},
                **spec,
                "tokenizer_check": tokenizer_agrees(tower, tmp, spec,
                                                    prompts + list(TOKENIZER_PROBES)),
                # Prompt ensembling: a class's text is the normalised mean over templates.
                **({"templates": ensembles.templates, "names": ensembles.names}
                   if ensembles else {}),
            }
        sidecar["opset"] = int(program.model.opset_imports[""])
        sidecar["export_s"] = round(time.perf_counter() - start, 1)
        _stamp_metadata(tmp / ONNX_FILE, sidecar)
        if check:
            sidecar["parity"] = onnxruntime_parity(fixed, tmp / ONNX_FILE, crop) \
                if fixed_prompts else free_prompt_parity(fixed.image_text, model, tmp, spec, crop)
            if objects:
                sidecar["parity"]["instances"] = objects_parity(model, tmp, spec, crop)
        (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n")
        out.mkdir(exist_ok=True)
        for f in tmp.iterdir():
            shutil.move(str(f), out / f.name)
    sidecar["bytes"] = sum(f.stat().st_size for f in out.iterdir() if f.name != SIDECAR)
    return sidecar


OBJECT_OUTPUTS = ("logits", "presence", "centres", "embeddings")


def export_seeds(model: CDSAM, extra: dict[str, Any], folder: Path, crop: int,
                 opset: int | None, weight_bytes: int) -> dict[str, Any]:
    """Write ``seeds.onnx`` (`SeedGraph`); → the sidecar's ``instances`` entry: what
    `cdsam.inference.instances` does with model.onnx's extra outputs and this graph, and the
    checkpoint's deployment point (the prompts path's)."""
    h = crop // model.patch_size
    s = torch.export.Dim("seeds", min=1, max=1 << 16)
    images = torch.export.Dim("images", min=1, max=4096)
    args = (torch.zeros(2, 256, h, h), torch.zeros(3, model.clip_text.width),
            torch.zeros(3, 2), torch.tensor([0, 1, 1]))
    _export(SeedGraph(model).eval(), args, folder / SEEDS_FILE,
            ["embeddings", "text", "points", "image_of"], ["masks", "iou"],
            {"embeddings": {0: images}, "text": {0: s}, "points": {0: s}, "image_of": {0: s}},
            opset, weight_bytes)
    cfg = InstanceConfig()
    return {
        "graph": SEEDS_FILE,
        "model_outputs": {"presence": "BxP probability that the prompt's object is in the image",
                          "centres": "BxPx4hx4w centre heatmap (probabilities)",
                          "embeddings": "Bx256xhxw SAM image embeddings, seeds.onnx's input"},
        "inputs": {"embeddings": "model.onnx's", "text": "SxD: each seed's prompt's text",
                   "points": "Sx2 float (x, y) in the input frame", "image_of": "S int64"},
        "outputs": {"masks": "SxCxC logits", "iou": "S predicted IoU"},
        "decode": "prompts", "semantic_threshold": 0.5,
        "seed_threshold": cfg.seed_threshold, "seed_prominence": cfg.seed_prominence,
        "max_seeds": cfg.max_seeds, "nms_iou": cfg.nms_iou, "min_area": cfg.min_area,
        "presence_threshold": extra.get("presence_threshold"),
        "min_quality": stored_min_quality(extra, "prompts"),
    }


def objects_parity(model: CDSAM, folder: Path, spec: dict[str, Any], crop: int,
                   seed: int = 0) -> dict[str, Any]:
    """model.onnx's presence and centres and seeds.onnx's masks vs PyTorch on unseen prompts:
    max |difference|."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    gen = np.random.default_rng(seed)
    images = gen.integers(0, 256, (2, 3, crop, crop)).astype(np.float32)
    texts = list(UNSEEN_PROMPTS)
    with torch.no_grad():
        feats = model.clip_text(texts)
        ref = ImageTextObjectsGraph(model).eval()(torch.from_numpy(images), feats)
        n = 5
        points = torch.from_numpy(gen.uniform(0, crop - 1, (n, 2)).astype(np.float32))
        image_of = torch.from_numpy(gen.integers(0, 2, n))
        text = feats[torch.from_numpy(gen.integers(0, len(texts), n))]
        seeds_ref = SeedGraph(model).eval()(ref[3], text, points, image_of)
    providers = ["CPUExecutionProvider"]
    ids = token_ids(Tokenizer.from_file(str(folder / TOKENIZER_FILE)), spec, texts)
    got_text = ort.InferenceSession(str(folder / TEXT_FILE), providers=providers).run(
        ["text"], {"tokens": ids})[0]
    got = ort.InferenceSession(str(folder / ONNX_FILE), providers=providers).run(
        list(OBJECT_OUTPUTS), {"images": images, "text": got_text})
    seeds = ort.InferenceSession(str(folder / SEEDS_FILE), providers=providers).run(
        ["masks", "iou"], {"embeddings": got[3], "text": text.numpy(),
                           "points": points.numpy(), "image_of": image_of.numpy()})
    return {name: float(np.abs(g - r.numpy()).max()) for name, g, r in
            (("presence", got[1], ref[1]), ("centres", got[2], ref[2]),
             ("seed_masks", seeds[0], seeds_ref[0]), ("seed_iou", seeds[1], seeds_ref[1]))}


def _export(graph: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str],
            dynamic: dict, opset: int | None, weight_bytes: int):
    # torch.onnx prints its progress on stdout and onnxscript's optimizer logs every
    # initializer it dedupes: keep stdout for our JSON and the log readable.
    with contextlib.redirect_stdout(sys.stderr), _quiet("onnxscript", "onnx_ir"):
        return torch.onnx.export(
            graph, args, str(path), input_names=inputs, output_names=outputs,
            dynamic_shapes=dynamic, dynamo=True, opset_version=opset,
            external_data=weight_bytes > SINGLE_FILE_BYTES, verbose=False)


def free_prompt_parity(graph: ImageTextGraph, model: CDSAM, folder: Path,
                       spec: dict[str, Any], crop: int, batch: int = 2, seed: int = 0
                       ) -> dict[str, Any]:
    """Prompts the export never saw, tokenized and encoded as a deployment does (tokenizers +
    text.onnx), then decoded by model.onnx, vs PyTorch end to end: max |logit difference|."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    gen = np.random.default_rng(seed)
    images = gen.integers(0, 256, (batch, 3, crop, crop)).astype(np.float32)
    texts = list(UNSEEN_PROMPTS)
    with torch.no_grad():
        feats = model.clip_text(texts)
        ref = graph(torch.from_numpy(images), feats).numpy()
    providers = ["CPUExecutionProvider"]
    ids = token_ids(Tokenizer.from_file(str(folder / TOKENIZER_FILE)), spec, texts)
    got_text = ort.InferenceSession(str(folder / TEXT_FILE), providers=providers).run(
        ["text"], {"tokens": ids})[0]
    got = ort.InferenceSession(str(folder / ONNX_FILE), providers=providers).run(
        ["logits"], {"images": images, "text": got_text})[0]
    return {"batch": batch, "prompts": texts, "max_abs_diff": float(np.abs(got - ref).max()),
            "text_max_abs_diff": float(np.abs(got_text - feats.numpy()).max()),
            "mask_agreement": float(((got > 0) == (ref > 0)).mean()),
            "onnxruntime": ort.__version__}


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
