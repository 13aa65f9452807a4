"""Masks from a `cdsam export --mode onnx` folder with numpy, Pillow, tokenizers, ftfy and
onnxruntime only.

    pip install onnxruntime numpy pillow tokenizers ftfy [scikit-image]
    python onnx_predict.py EXPORT_DIR IMAGE [IMAGE ...] --prompt "a red circle" --out masks/
                           [--instances]

Writes ``<stem>__<prompt>.png`` (0/255) per image and prompt; with ``--instances`` (an export
of a model with the instance heads; needs scikit-image too) also ``<stem>__instances.png``, the
16-bit object ids ``cdsam predict --instances`` writes: centre-heatmap seeds on the mask, each
decoded as a click by ``seeds.onnx``, NMS, the checkpoint's presence gate and quality cut. Any text works with the default
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


def cell_foreground(prob: np.ndarray, cells: tuple[int, int]) -> np.ndarray:
    """CxC probabilities → hxw bool: a cell is on the mask when any pixel of its bin is (bins
    as PyTorch's adaptive max pooling cuts them: floor(i C / h) to ceil((i + 1) C / h))."""
    out = np.zeros(cells, bool)
    (ch, cw), (h, w) = prob.shape, cells
    for i in range(h):
        y0, y1 = (i * ch) // h, -((-(i + 1) * ch) // h)
        for j in range(w):
            x0, x1 = (j * cw) // w, -((-(j + 1) * cw) // w)
            out[i, j] = prob[y0:y1, x0:x1].max() > 0.5
    return out


def find_seeds(heat: np.ndarray, fg: np.ndarray, cfg: dict) -> tuple[np.ndarray, np.ndarray]:
    """(Kx2 row, col, K strengths), strongest first: the heatmap's maxima rising
    ``seed_prominence`` above their saddles (h-maxima), at or above ``seed_threshold``, on the
    mask; one seed, the highest cell, per maximal plateau."""
    from scipy import ndimage
    from skimage.morphology import h_maxima

    tops = h_maxima(heat, cfg["seed_prominence"]).astype(bool) & fg & \
        (heat >= cfg["seed_threshold"])
    regions, n = ndimage.label(tops, structure=np.ones((3, 3), bool))
    if n == 0:
        return np.zeros((0, 2), np.int64), np.zeros(0)
    peaks = np.asarray(ndimage.maximum_position(heat, regions, np.arange(1, n + 1)),
                       np.int64).reshape(-1, 2)
    strength = heat[peaks[:, 0], peaks[:, 1]].astype(np.float64)
    order = np.argsort(-strength, kind="stable")[:cfg["max_seeds"]]
    return peaks[order], strength[order]


def nms(masks: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy mask NMS, best first: indices of the masks kept."""
    order = np.argsort(-scores, kind="stable")
    flat = masks[order].reshape(len(order), -1).astype(np.float32)
    inter = flat @ flat.T
    area = flat.sum(axis=1)
    ious = inter / np.maximum(area[:, None] + area[None, :] - inter, 1)
    keep: list[int] = []
    for i in range(len(order)):
        if all(ious[i, j] <= iou for j in keep):
            keep.append(i)
    return order[keep]


def prompt_objects(seeds, embeddings: np.ndarray, text: np.ndarray, logits: np.ndarray,
                   presence: float, heat: np.ndarray, cfg: dict, budget: int = 64
                   ) -> tuple[np.ndarray, np.ndarray]:
    """One (image, prompt): (KxCxC bool masks in the input frame, K scores) of the objects
    returned, best first."""
    crop = logits.shape[-1]
    fg = cell_foreground(1 / (1 + np.exp(-logits)), heat.shape)
    peaks, strength = find_seeds(heat, fg, cfg)
    scale = crop / heat.shape[0], crop / heat.shape[1]
    points = np.stack([(peaks[:, 1] + 0.5) * scale[1] - 0.5,
                       (peaks[:, 0] + 0.5) * scale[0] - 0.5], axis=1).astype(np.float32)
    masks, iou = np.zeros((len(peaks), crop, crop), bool), np.zeros(len(peaks))
    for lo in range(0, len(peaks), budget):
        n = len(points[lo:lo + budget])
        m, q = seeds.run(["masks", "iou"], {
            "embeddings": embeddings[None], "text": np.repeat(text[None], n, axis=0),
            "points": points[lo:lo + n], "image_of": np.zeros(n, np.int64)})
        masks[lo:lo + n], iou[lo:lo + n] = m > 0, np.clip(q, 0, 1)
    quality = strength * iou
    big = masks.reshape(len(masks), crop * crop).sum(axis=1) >= cfg["min_area"]
    masks, quality = masks[big], quality[big]
    keep = nms(masks, quality, cfg["nms_iou"]) if len(quality) else np.zeros(0, np.int64)
    masks, quality = masks[keep], quality[keep]
    returned = quality >= cfg["min_quality"]
    if presence < (cfg["presence_threshold"] or 0.0):
        returned[:] = False
    order = np.argsort(-(presence * quality[returned]), kind="stable")
    return masks[returned][order], (presence * quality[returned])[order]


def id_png(objects: list[tuple[np.ndarray, float]], size: tuple[int, int]) -> np.ndarray:
    """HxW uint16 ids, objects numbered in order from 1, painted worst score first."""
    ids = np.zeros((size[1], size[0]), np.uint16)
    for k in np.argsort(np.asarray([s for _, s in objects], np.float64), kind="stable"):
        ids[objects[k][0]] = k + 1
    return ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export_dir", type=Path)
    ap.add_argument("images", nargs="+", type=Path)
    ap.add_argument("--prompt", action="append", default=[], help="any text; repeat")
    ap.add_argument("--class", dest="classes", action="append", default=[], metavar="NAME",
                    help="a class name in every training template, their mean; repeat")
    ap.add_argument("--out", type=Path, default=Path("masks"))
    ap.add_argument("--instances", action="store_true",
                    help="also <stem>__instances.png: each object's id (16-bit)")
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
    objects = sidecar.get("instances")
    if args.instances and objects is None:
        raise SystemExit(f"{args.export_dir}: no seeds.onnx (a model without the instance "
                         f"heads, or exported with --fixed-prompts): no --instances")
    session = ort.InferenceSession(str(args.export_dir / "model.onnx"))
    seeds = ort.InferenceSession(str(args.export_dir / objects["graph"])) \
        if args.instances else None
    outputs = ["logits", "presence", "centres", "embeddings"] if args.instances else ["logits"]
    args.out.mkdir(parents=True, exist_ok=True)
    for path in args.images:
        image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")  # as displayed
        x, window = fit(image, spec)
        got = session.run(outputs, {"images": x[None], **feeds})
        logits = got[0][0]  # P x C x C
        for prompt, frame in zip(prompts, logits, strict=True):
            mask = unfit(frame, window, spec, image.size) > 0
            name = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
            Image.fromarray(mask.astype(np.uint8) * 255).save(args.out / f"{path.stem}__{name}.png")
        said = f"{len(prompts)} masks"
        if seeds is not None:
            found = []
            for k in range(len(prompts)):
                masks, scores = prompt_objects(seeds, got[3][0], feeds["text"][k], logits[k],
                                               float(got[1][0, k]), got[2][0, k], objects)
                for m, score in zip(masks, scores, strict=True):
                    full = unfit(np.where(m, 1.0, -1.0).astype(np.float32), window, spec,
                                 image.size) > 0
                    if full.any():
                        found.append((full, float(score)))
            Image.fromarray(id_png(found, image.size)).save(
                args.out / f"{path.stem}__instances.png")
            said += f", {len(found)} objects"
        print(f"{path}: {said} -> {args.out}")


if __name__ == "__main__":
    main()
