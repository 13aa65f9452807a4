"""Masks from a `cdsam export --mode onnx` folder with numpy, Pillow, tokenizers, ftfy and
onnxruntime only.

    pip install onnxruntime numpy pillow tokenizers ftfy
    python onnx_predict.py EXPORT_DIR IMAGE [IMAGE ...] --prompt "a red circle" --out masks/

Writes ``<stem>__<prompt>.png`` (0/255) per image and prompt. Any text works with the default
export (``text.onnx`` encodes it, ``tokenizer.json`` tokenizes it); ``--class NAME`` puts a
name in every prompt template the model trained with and uses the mean of their features.
Without ``--prompt`` / ``--class``: the training vocabulary the sidecar lists. An export made
with ``--fixed-prompts`` answers only the prompts baked into it. No cdsam, torch or open_clip
needed: the fit and the tokenization are read from EXPORT_DIR/cdsam-onnx.json.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import string
from pathlib import Path

import ftfy
import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps


def fit(image: Image.Image, spec: dict) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """RGB image → (3xCxC float32 0–255, (top, left, rh, rw)): the input window's offset in
    the resized image and that resized image's size, which `unfit` needs to map back."""
    c = spec["crop"]
    w, h = image.size
    if spec["fit"] == "pad":
        scale = c / max(h, w)
        rh, rw = max(1, round(h * scale)), max(1, round(w * scale))
        canvas = Image.new("RGB", (c, c), tuple(spec["pad_rgb"]))
        canvas.paste(image.resize((rw, rh), Image.BILINEAR), (0, 0))
        window = (0, 0, rh, rw)
    else:  # crop: shorter side to `resize`, centre crop `crop`
        r = spec["resize"]
        rh, rw = (r, int(r * w / h)) if h <= w else (int(r * h / w), r)
        top, left = round((rh - c) / 2), round((rw - c) / 2)
        canvas = image.resize((rw, rh), Image.BILINEAR).crop((left, top, left + c, top + c))
        window = (top, left, rh, rw)
    return np.asarray(canvas, np.float32).transpose(2, 0, 1), window


def unfit(logits: np.ndarray, window: tuple[int, int, int, int], spec: dict,
          size: tuple[int, int]) -> np.ndarray:
    """CxC logits → HxW logits at the image's size (outside a crop: background)."""
    top, left, rh, rw = window
    if spec["fit"] == "pad":
        frame = logits[:rh, :rw]
    else:
        c = spec["crop"]
        frame = np.full((rh, rw), -1e4, np.float32)
        frame[top:top + c, left:left + c] = logits[:rh - top, :rw - left]
    return resize_bilinear(frame, size[1], size[0])


def resize_bilinear(a: np.ndarray, h: int, w: int) -> np.ndarray:
    """Plain bilinear resampling with half-pixel centres and no antialiasing (PyTorch's
    ``interpolate(mode="bilinear", align_corners=False)``, which cdsam uses here). Pillow's
    resize would antialias when shrinking, spreading the -1e4 background into the mask."""
    def taps(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), (src - lo).astype(np.float32)

    y0, y1, wy = taps(h, a.shape[0])
    x0, x1, wx = taps(w, a.shape[1])
    rows = a[y0] * (1 - wy)[:, None] + a[y1] * wy[:, None]
    return rows[:, x0] * (1 - wx) + rows[:, x1] * wx


def clean(text: str, how: str) -> str:
    """open_clip's cleaning before its tokenizer (the sidecar's ``clean``)."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    if how == "canonicalize":
        text = text.replace("_", " ").translate(str.maketrans("", "", string.punctuation))
    text = " ".join(text.split())
    return text if how == "whitespace" else text.lower()


def token_ids(tokenizer, spec: dict, texts: list[str]) -> np.ndarray:
    """PxL int64 ids, as the sidecar's ``text`` entry says: the text cleaned as ``clean``
    names, the tokenizer's ids (start and end tokens included), cut to ``context_length``
    (the last id then ``end_id``), padded with ``pad_id``. (cdsam's export checks itself with
    the same rule, `cdsam.inference.text_onnx`; this file stays free of cdsam.)"""
    length, rows = spec["context_length"], []
    for text in texts:
        ids = list(tokenizer.encode(clean(text, spec["clean"])).ids)
        if len(ids) > length:
            ids = ids[:length]
            if spec.get("end_id") is not None:
                ids[-1] = spec["end_id"]
        rows.append(ids + [spec["pad_id"]] * (length - len(ids)))
    return np.asarray(rows, dtype=np.int64)


def text_features(export_dir: Path, spec: dict, prompts: list[str],
                  classes: list[str]) -> tuple[list[str], np.ndarray]:
    """(labels, PxD features): each prompt as written, each class the renormalised mean of its
    name in every training template (the one template "{}" when the model had one)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(export_dir / spec["tokenizer"]))
    session = ort.InferenceSession(str(export_dir / spec["graph"]))

    def encode(texts: list[str]) -> np.ndarray:
        return session.run(["text"], {"tokens": token_ids(tokenizer, spec, texts)})[0]

    feats = [encode(prompts)] if prompts else []
    for name in classes:
        mean = encode([t.format(name) for t in spec.get("templates", ["{}"])]).mean(0)
        feats.append((mean / np.linalg.norm(mean))[None])
    return prompts + classes, np.concatenate(feats).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export_dir", type=Path)
    ap.add_argument("images", nargs="+", type=Path)
    ap.add_argument("--prompt", action="append", default=[], help="any text; repeat")
    ap.add_argument("--class", dest="classes", action="append", default=[], metavar="NAME",
                    help="a class name in every training template, their mean; repeat")
    ap.add_argument("--out", type=Path, default=Path("masks"))
    args = ap.parse_args()
    sidecar = json.loads((args.export_dir / "cdsam-onnx.json").read_text())
    spec, prompts = sidecar["input"], sidecar["output"]["prompts"]
    feeds = {}
    if "text" in sidecar:
        if not args.prompt and not args.classes:
            args.prompt = list(prompts)
        prompts, feeds["text"] = text_features(args.export_dir, sidecar["text"], args.prompt,
                                               args.classes)
    elif args.prompt or args.classes:
        raise SystemExit(f"{args.export_dir}: exported with --fixed-prompts, it answers only "
                         f"{prompts}")
    session = ort.InferenceSession(str(args.export_dir / "model.onnx"))
    args.out.mkdir(parents=True, exist_ok=True)
    for path in args.images:
        image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")  # as displayed
        x, window = fit(image, spec)
        logits = session.run(["logits"], {"images": x[None], **feeds})[0][0]  # P x C x C
        for prompt, frame in zip(prompts, logits, strict=True):
            mask = unfit(frame, window, spec, image.size) > 0
            name = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
            Image.fromarray(mask.astype(np.uint8) * 255).save(args.out / f"{path.stem}__{name}.png")
        print(f"{path}: {len(prompts)} masks -> {args.out}")


if __name__ == "__main__":
    main()
