"""Inference: ``cdsam.load_model(path).predict(image, prompts)`` → one mask per prompt, and
with ``instances=True`` one mask per object (`cdsam.inference.instances`).

The image goes through the training geometry (``data.fit``, ``data.resize``, ``data.crop``,
read from the checkpoint; see `cdsam.data.geometry`), and the logits come back to the image's
own size. With the ``pad`` fit the whole image is seen and every pixel gets a prediction; with
``crop`` the pixels outside the centre crop were never seen and are background.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cdsam.config.schema import DECODE_MODES, InstanceConfig
from cdsam.data.dataset import pil_to_tv_image
from cdsam.data.geometry import Geometry, fit_transform, normalize_transform
from cdsam.data.manifest import read_image, to_rgb, upright
from cdsam.data.spatial import POINT_SLOTS
from cdsam.data.templates import PromptEnsembles
from cdsam.errors import DataError, UserError
from cdsam.inference.instances import (
    DEFAULT_MIN_QUALITY,
    Instances,
    decode_instances,
    stored_min_quality,
)
from cdsam.models.checkpoint import CheckpointMeta, load_checkpoint
from cdsam.models.model import CDSAM

ImageLike = str | Path | Image.Image | np.ndarray


@dataclass
class Prediction:
    prompts: list[str]
    masks: np.ndarray  # P x H x W bool, the image's own size
    logits: np.ndarray | None = None  # P x H x W float32, when asked for
    # P: the probability that each prompt's object is in the image (checkpoints with the
    # instance heads); a text-only prompt below the predictor's presence_threshold gets an
    # empty mask.
    presence: np.ndarray | None = None
    # P: each prompt's objects, with ``predict(..., instances=True)``.
    instances: list[PromptObjects] | None = None

    @property
    def probs(self) -> np.ndarray:
        if self.logits is None:
            raise ValueError("predict(..., return_logits=True) keeps the logits")
        return torch.sigmoid(torch.from_numpy(self.logits)).numpy()


@dataclass
class PromptObjects:
    """The objects one prompt found in one image, as returned (presence passed, quality at or
    above the predictor's ``min_quality``), best score first."""

    prompt: str
    masks: np.ndarray  # KxHxW bool, the image's size
    scores: np.ndarray  # K: presence x quality (cdsam.inference.instances)
    presence: float  # the prompt's presence probability

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def boxes(self) -> np.ndarray:
        """Kx4 float (x0, y0, x1, y1): each mask's bounding box in pixel edges (a one-pixel
        object at (x, y) is (x, y, x + 1, y + 1))."""
        out = np.zeros((len(self), 4))
        for k, m in enumerate(self.masks):
            ys, xs = np.nonzero(m)
            out[k] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        return out


def objects_at(geo: Geometry, found: Instances, prompt: str, chunk: int = 32) -> PromptObjects:
    """Objects in the model's input frame → at the image's size (each mask through the same
    geometry as the semantic logits: ±1 resized, > 0), best score first; an object the
    resizing leaves without a pixel is dropped."""
    order = np.argsort(-found.scores, kind="stable")
    masks = np.zeros((len(order), *geo.size), bool)
    for lo in range(0, len(order), chunk):
        m = torch.from_numpy(found.masks[order[lo:lo + chunk]]).float() * 2 - 1
        masks[lo:lo + chunk] = (geo.to_original(m) > 0).numpy()
    some = masks.reshape(len(order), -1).any(axis=1) if len(order) else np.zeros(0, bool)
    return PromptObjects(prompt, masks[some], found.scores[order][some], found.presence)


def to_pil(image: ImageLike) -> Image.Image:
    """A path, PIL image or HxW[x3|4] uint8/float array → RGB PIL image (clear errors)."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise DataError(f"{path}: image not found")
        return read_image(path, "RGB")
    if isinstance(image, Image.Image):
        # A PIL image keeps its EXIF: segment it as displayed (a no-op once applied).
        return to_rgb(upright(image))
    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:
            arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8) if arr.max() <= 1 \
                else np.clip(arr, 0, 255).astype(np.uint8)
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, -1)
        if arr.ndim != 3 or arr.shape[2] not in (3, 4):
            raise UserError(f"image array: expected HxW, HxWx3 or HxWx4, got {image.shape}")
        return Image.fromarray(arr[..., :3])
    raise UserError(f"image: expected a path, PIL image or numpy array, got "
                    f"{type(image).__name__}")


class Predictor:
    """A loaded checkpoint, ready for images: see :meth:`predict`."""

    def __init__(self, model: CDSAM, resize: int, crop: int, prompts: list[str],
                 device: torch.device | str = "cpu", fit: str = "crop",
                 ensembles: PromptEnsembles | None = None,
                 presence_threshold: float | None = None,
                 instances: InstanceConfig | None = None,
                 min_quality: float = DEFAULT_MIN_QUALITY,
                 name: str = "model") -> None:
        self.model = model.eval().to(device)
        self.name = name  # what error messages call the checkpoint
        # Object decoding (predict(..., instances=True)): the knobs and the quality an object
        # needs to be returned (load_model: the checkpoint's choice for the decode path).
        self.instance_cfg = instances or InstanceConfig()
        self.min_quality = min_quality
        self.seed_rows = 0  # decoder rows spent on seeds so far (cost figures)
        # Text-only masks of prompts whose presence is below this are emptied ("not in this
        # image"); None: no gating. A click or box says the object is there: never gated.
        self.presence_threshold = presence_threshold if model.has_instance_heads else None
        self.device = torch.device(device)
        self.resize, self.crop, self.fit = resize, crop, fit
        self.known_prompts = prompts  # the training vocabulary (others work, less reliably)
        # Trained with several prompt templates: a prompt of a known class is given the mean
        # of its templates' features, as validation scored it; other text is encoded as is.
        self.ensembles = ensembles
        # The training transforms, same code: fit, then normalise.
        self.fit_image = fit_transform(fit, resize, crop)
        self.normalize = normalize_transform()

    def class_prompt(self, name: str) -> str:
        """The prompt for class ``name`` (``cdsam predict --class``): its name in the first
        training template, answered with the mean over every template."""
        if self.ensembles is None:
            raise UserError(f"--class {name}: the checkpoint was trained with one prompt "
                            f"template (prepare.prompt_templates unset), so it has no ensemble; "
                            f"give the prompt itself with --prompt")
        names = {**self.ensembles.names, self.ensembles.templates[0].format(name): name}
        self.ensembles = PromptEnsembles(self.ensembles.templates, names)
        return self.ensembles.templates[0].format(name)

    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """PxD text features the decoder is given for ``prompts``."""
        if self.ensembles is None:
            return self.model.clip_text(list(prompts))
        return self.model.clip_text.groups([self.ensembles.variants(p) for p in prompts])

    def _spatial(self, geo: Geometry, points: Sequence[tuple[float, float]] | None,
                 box: tuple[float, float, float, float] | None, n: int) -> dict:
        """Clicks and box in the slot layout training uses (`cdsam.data.spatial`): at least
        two point slots (unused ones empty) and a box slot, empty when no box is given. Every
        row carries them, which ``rows`` tells the model (it need not read the slots back)."""
        if not points and box is None:
            return {}
        xy = [geo.to_crop(px, py) for px, py in points or []]
        labels = [1] * len(xy)
        while len(xy) < POINT_SLOTS:
            xy.append((0.0, 0.0))
            labels.append(-1)
        corners = [0.0] * 4
        if box is not None:
            (x0, y0), (x1, y1) = geo.to_crop(*box[:2]), geo.to_crop(*box[2:])
            corners = [x0, y0, x1, y1]
        dev = self.device
        return {"points": (torch.tensor(xy, dtype=torch.float32, device=dev).expand(n, -1, -1),
                           torch.tensor(labels, device=dev).expand(n, -1)),
                "boxes": torch.tensor(corners, device=dev).expand(n, -1),
                "box_valid": torch.full((n,), box is not None, device=dev),
                "rows": np.ones(n, dtype=bool)}

    def prepare(self, image: ImageLike) -> tuple[torch.Tensor, Geometry, Image.Image]:
        """An image → (normalised 3xCxC model input, its geometry, the RGB PIL image)."""
        pil = to_pil(image)
        geo = Geometry.of(pil.height, pil.width, self.resize, self.crop, self.fit)
        x = self.normalize(self.fit_image(pil_to_tv_image(pil))).as_subclass(torch.Tensor)
        return x, geo, pil

    @torch.no_grad()
    def frame_logits(self, inputs: Sequence[torch.Tensor], prompts: Sequence[str],
                     geos: Sequence[Geometry] | None = None,
                     points: Sequence[tuple[float, float]] | None = None,
                     boxes: tuple[float, float, float, float] | None = None,
                     batch_size: int = 16) -> torch.Tensor:
        """B prepared inputs x P prompts → BxPxCxC logits in the model's input frame.

        DINO runs once per image and the CLIP text tower once per distinct prompt (its
        features are cached); only the SAM decoder runs per (image, prompt) pair, in chunks of
        ``batch_size`` pairs. ``points`` / ``boxes`` (need ``geos``) join every prompt.
        Text-only rows are gated by ``presence_threshold`` (:meth:`frame_outputs`).
        """
        return self.frame_outputs(inputs, prompts, geos, points, boxes, batch_size)[0]

    def _encoded(self, inputs: Sequence[torch.Tensor], prompts: Sequence[str]
                 ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int], torch.Tensor]:
        """(Bx3xCxC inputs on the device, their DINO tokens, token grid, PxD text features):
        DINO once per image, the text tower once per prompt."""
        x = torch.stack(list(inputs)).to(self.device)
        tokens = self.model.encode_image(x)
        p = self.model.patch_size
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        return x, tokens, grid, self.text_features(prompts).to(tokens.dtype)

    @torch.no_grad()
    def frame_outputs(self, inputs: Sequence[torch.Tensor], prompts: Sequence[str],
                      geos: Sequence[Geometry] | None = None,
                      points: Sequence[tuple[float, float]] | None = None,
                      boxes: tuple[float, float, float, float] | None = None,
                      batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(:meth:`frame_logits`'s logits, BxP presence probabilities or None without the
        heads). A gated row's logits are -1e4 everywhere (probability 0)."""
        x, tokens, grid, text = self._encoded(inputs, prompts)
        n_img, n_txt = len(inputs), len(prompts)
        out = torch.empty(n_img * n_txt, *x.shape[-2:])
        presence = torch.empty(n_img * n_txt) if self.model.has_instance_heads else None
        for start in range(0, n_img * n_txt, batch_size):
            rows = torch.arange(start, min(start + batch_size, n_img * n_txt))
            img, txt = rows // n_txt, rows % n_txt
            spatial = {}
            if points or boxes is not None:
                if geos is None or n_img != 1:
                    raise UserError("predict: points and boxes are for one image at a time")
                spatial = self._spatial(geos[0], points, boxes, len(rows))
            res = self.model.decode(tokens[img.to(tokens.device)], grid,
                                    text[txt.to(text.device)], tuple(x.shape[-2:]), **spatial)
            out[start:start + len(rows)] = res.masks[:, 0].float().cpu()
            if presence is not None:
                presence[start:start + len(rows)] = torch.sigmoid(res.presence.float()).cpu()
        if presence is not None and self.presence_threshold is not None and \
                not (points or boxes is not None):
            out[presence < self.presence_threshold] = -1e4
        return (out.view(n_img, n_txt, *x.shape[-2:]),
                None if presence is None else presence.view(n_img, n_txt))

    def require_instances(self) -> None:
        """A UserError naming the checkpoint when it has no instance heads."""
        if not self.model.has_instance_heads:
            raise UserError(f"{self.name}: no instance heads (a checkpoint from before them, "
                            f"or trained with model.heads.instances: false): it predicts one "
                            f"mask per prompt, not objects; run without --instances")

    @torch.no_grad()
    def frame_instances(self, inputs: Sequence[torch.Tensor], prompts: Sequence[str],
                        threshold: float = 0.5, batch_size: int = 16
                        ) -> tuple[torch.Tensor, torch.Tensor, list[list[Instances]]]:
        """B prepared inputs x P text prompts → (BxPxCxC logits gated as
        :meth:`frame_outputs`, BxP presence, per image per prompt the objects returned, in
        the input frame). DINO once per image; each (image, prompt) one decoder row plus one a
        seed (``decode: prompts``), ``batch_size`` rows a call; ``threshold``: the semantic
        mask's (seeds lie on it; watershed splits it)."""
        self.require_instances()
        x, tokens, grid, text = self._encoded(inputs, prompts)
        n_img, n_txt = len(inputs), len(prompts)
        logits = torch.empty(n_img * n_txt, *x.shape[-2:])
        presence = torch.empty(n_img * n_txt)
        found: list[Instances] = []
        gate = self.presence_threshold or 0.0
        for start in range(0, n_img * n_txt, batch_size):
            rows = torch.arange(start, min(start + batch_size, n_img * n_txt))
            img, txt = rows // n_txt, rows % n_txt
            sel = text[txt.to(text.device)]
            out = self.model.decode(tokens, grid, sel, tuple(x.shape[-2:]),
                                    image_of=img.to(tokens.device))
            logits[start:start + len(rows)] = out.masks[:, 0].float().cpu()
            presence[start:start + len(rows)] = torch.sigmoid(out.presence.float()).cpu()
            decoded = decode_instances(self.model, out, sel, tuple(x.shape[-2:]),
                                       self.instance_cfg, threshold, budget=batch_size)
            found += [f.select(f.kept(gate, self.min_quality)) for f in decoded]
            self.seed_rows += sum(f.decoder_rows for f in decoded)
        if self.presence_threshold is not None:
            logits[presence < self.presence_threshold] = -1e4
        per_image = [found[i * n_txt:(i + 1) * n_txt] for i in range(n_img)]
        return (logits.view(n_img, n_txt, *x.shape[-2:]), presence.view(n_img, n_txt),
                per_image)

    def image_logits(self, images: Sequence[Image.Image], prompts: Sequence[str],
                     batch_size: int = 8) -> list[torch.Tensor]:
        """Whole images (each through the training geometry, all in one model call) → one
        PxHxW logits tensor per image, at that image's size."""
        return list(self.iter_image_logits(images, prompts, batch_size))

    def iter_image_logits(self, images: Sequence[Image.Image], prompts: Sequence[str],
                          batch_size: int = 8) -> Iterator[torch.Tensor]:
        """:meth:`image_logits` one image at a time: the model runs on all of them at once
        (small input-frame logits), and each image's full-size logits are made only when the
        caller asks for them, so a batch of large images never holds them all."""
        prepared = [self.prepare(image) for image in images]
        frames = self.frame_logits([x for x, _, _ in prepared], list(prompts),
                                   batch_size=batch_size * len(prompts))
        for (_, geo, _), frame in zip(prepared, frames, strict=True):
            yield geo.to_original(frame)

    @torch.no_grad()
    def one_image_logits(self, image: ImageLike, prompts: Sequence[str],
                         points: Sequence[tuple[float, float]] | None = None,
                         boxes: tuple[float, float, float, float] | None = None,
                         batch_size: int = 16) -> torch.Tensor:
        """PxHxW logits at the image's size; ``points`` / ``boxes`` as in :meth:`predict`."""
        x, geo, _ = self.prepare(image)
        return geo.to_original(self.frame_logits([x], prompts, [geo], points, boxes,
                                                 batch_size)[0])

    @torch.no_grad()
    def predict(self, image: ImageLike, prompts: str | Sequence[str],
                points: Sequence[tuple[float, float]] | None = None,
                boxes: tuple[float, float, float, float] | None = None,
                threshold: float = 0.5, return_logits: bool = False,
                batch_size: int = 16, instances: bool = False) -> Prediction:
        """One boolean mask per prompt at the image's size.

        ``points``: foreground clicks (x, y) and ``boxes``: one (x0, y0, x1, y1) box, in the
        image's pixel coordinates; both join every prompt's text tokens. ``instances``: also
        each text prompt's objects (``Prediction.instances``; checkpoints with the instance
        heads).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise UserError("predict: give at least one prompt")
        x, geo, _ = self.prepare(image)
        if instances:
            if points or boxes is not None:
                raise UserError("predict: instances are found from the text alone (a click or "
                                "box already names one object)")
            frame, presence, found = self.frame_instances([x], prompts, threshold, batch_size)
            logits = geo.to_original(frame[0])
            return Prediction(prompts, (torch.sigmoid(logits) > threshold).numpy(),
                              logits.numpy() if return_logits else None, presence[0].numpy(),
                              [objects_at(geo, f, p) for f, p in zip(found[0], prompts,
                                                                      strict=True)])
        frame, presence = self.frame_outputs([x], prompts, [geo], points, boxes, batch_size)
        logits = geo.to_original(frame[0])
        masks = (torch.sigmoid(logits) > threshold).numpy()
        return Prediction(prompts, masks, logits.numpy() if return_logits else None,
                          None if presence is None else presence[0].numpy())


def input_geometry(model: CDSAM, meta: CheckpointMeta) -> tuple[int, int, str]:
    """(resize, crop, fit) the checkpoint was trained with; the model's own input size when
    its meta.json does not say."""
    data = meta.extra.get("data") or {}
    resize, crop = data.get("resize"), data.get("crop")
    if not resize or not crop:
        img = model.dino.patch_embed.img_size
        resize = crop = int(img[0])
    return int(resize), int(crop), data.get("fit", "crop")


def load_model(path: str | Path, device: str | torch.device = "cpu",
               presence_threshold: float | None = None, decode: str = "prompts",
               min_quality: float | None = None) -> Predictor:
    """A checkpoint directory (a training stage's, or a merged export) → :class:`Predictor`,
    gating by ``presence_threshold`` (default: the one the checkpoint chose on val; 0 turns
    gating off); objects decoded by ``decode`` (prompts | watershed) and returned at
    ``min_quality`` (default: the checkpoint's for that path)."""
    if decode not in DECODE_MODES:
        raise UserError(f"decode: {decode!r} is not one of {', '.join(DECODE_MODES)}")
    model, meta = load_checkpoint(Path(path), device)
    resize, crop, fit = input_geometry(model, meta)
    if presence_threshold is None:
        presence_threshold = meta.extra.get("presence_threshold")
    if min_quality is None:
        min_quality = stored_min_quality(meta.extra, decode)
    return Predictor(model, resize, crop, list(meta.prompts), device, fit=fit,
                     ensembles=ensembles_of(meta, Path(path)),
                     presence_threshold=presence_threshold or None,
                     instances=InstanceConfig(decode=decode), min_quality=min_quality,
                     name=str(path))


def ensembles_of(meta: CheckpointMeta, where: Path) -> PromptEnsembles | None:
    """The prompt ensembles a checkpoint was trained with; None with one template."""
    raw = meta.extra.get("prompt_ensembles")
    return None if raw is None else PromptEnsembles.from_dict(raw, str(where / "meta.json"))


def semantic_labels(probs: np.ndarray, threshold: float) -> np.ndarray:
    """PxHxW probabilities → HxW labels: 0 background, i+1 for prompt i (argmax)."""
    best = probs.argmax(0)
    return np.where(probs.max(0) >= threshold, best + 1, 0).astype(np.uint8)


def legend_overlay(image: Image.Image, masks: np.ndarray, prompts: list[str],
                   palette: Sequence[tuple[int, int, int]], alpha: float = 0.5,
                   points: Sequence[tuple[float, float]] | None = None,
                   box: tuple[float, float, float, float] | None = None) -> Image.Image:
    """Every prompt's mask tinted in its colour, with a legend strip underneath; the clicks
    (white dots) and box (white outline) the masks were asked with, when given."""
    from PIL import ImageDraw

    rgb = np.asarray(image.convert("RGB")).astype(np.float32)
    for i, m in enumerate(masks):
        colour = np.array(palette[i % len(palette)], np.float32)
        rgb[m] = (1 - alpha) * rgb[m] + alpha * colour
    out = Image.fromarray(rgb.round().astype(np.uint8))
    scale = max(1, math.ceil(256 / max(out.size)))  # small images: enlarge for reading
    if scale > 1:
        out = out.resize((out.width * scale, out.height * scale), Image.NEAREST)
    row = 14
    width = max(out.width, 160)
    canvas = Image.new("RGB", (width, out.height + row * len(prompts) + 4), (255, 255, 255))
    canvas.paste(out, (0, 0))
    draw = ImageDraw.Draw(canvas)
    if box is not None:
        draw.rectangle([c * scale for c in box], outline=(255, 255, 255), width=2)
    for x, y in points or []:
        r = 4
        draw.ellipse([x * scale - r, y * scale - r, x * scale + r, y * scale + r],
                     fill=(255, 255, 255), outline=(0, 0, 0))
    for i, prompt in enumerate(prompts):
        y = out.height + 2 + i * row
        draw.rectangle([2, y + 2, 12, y + 11], fill=tuple(palette[i % len(palette)]))
        draw.text((16, y), prompt[:60], fill=(0, 0, 0))
    return canvas
