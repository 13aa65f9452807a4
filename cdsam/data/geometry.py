"""How an image of any size becomes the model's square input, and how logits come back.

Two fits (``data.fit``):

- ``crop``: shorter side resized to ``data.resize``, then a centre crop of ``data.crop``
  (torchvision's ``Resize(int)`` → ``CenterCrop``). Pixels outside the crop are never seen.
- ``pad``: longer side resized to ``data.crop``, then padded at the bottom and right (as SAM
  pads) to a ``crop``×``crop`` square. Every pixel is seen; padded pixels are ignore in the
  mask and filled with the ImageNet mean in the image (zero after normalisation).

The same :class:`Geometry` drives training, evaluation and prediction, so a prediction maps
back onto exactly the pixels the model was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from cdsam.data.manifest import IGNORE

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PAD_RGB = tuple(round(255 * m) for m in IMAGENET_MEAN)  # normalises to ~0
BACKGROUND_LOGIT = -1e4  # outside the crop (crop fit): certainly background


@dataclass(frozen=True)
class Geometry:
    """Where the model's square input sits in the (resized) original image."""

    size: tuple[int, int]  # original H, W
    resized: tuple[int, int]  # after the fit's resize
    top: int  # offset of the input window in the resized frame (crop fit; 0 for pad)
    left: int
    crop: int  # the square input's side
    fit: str = "crop"

    @classmethod
    def of(cls, h: int, w: int, resize: int, crop: int, fit: str = "crop") -> Geometry:
        if fit == "pad":
            scale = crop / max(h, w)
            rh, rw = max(1, round(h * scale)), max(1, round(w * scale))
            return cls((h, w), (rh, rw), 0, 0, crop, "pad")
        # torchvision's Resize(int) and CenterCrop arithmetic, so training and inference agree.
        short, long = (h, w) if h <= w else (w, h)
        new_long = int(resize * long / short)
        rh, rw = (resize, new_long) if h <= w else (new_long, resize)
        return cls((h, w), (rh, rw), int(round((rh - crop) / 2.0)),
                   int(round((rw - crop) / 2.0)), crop, "crop")

    def to_crop(self, x: float, y: float) -> tuple[float, float]:
        """Original pixel coordinates → model-input pixel coordinates."""
        return (x * self.resized[1] / self.size[1] - self.left,
                y * self.resized[0] / self.size[0] - self.top)

    def to_original(self, logits: torch.Tensor) -> torch.Tensor:
        """PxCxC input-frame logits → PxHxW logits at the original size.

        Crop fit: the window is pasted into a background canvas of the resized frame. Pad fit:
        the padding is cut off. Either way the frame is then resized to the original.
        """
        rh, rw = self.resized
        canvas = torch.full((logits.shape[0], 1, rh, rw), BACKGROUND_LOGIT, dtype=logits.dtype)
        h = min(self.crop, rh - self.top)
        w = min(self.crop, rw - self.left)
        canvas[:, 0, self.top:self.top + h, self.left:self.left + w] = logits[:, :h, :w]
        return F.interpolate(canvas, size=self.size, mode="bilinear", align_corners=False)[:, 0]


def fit_transform(fit: str, resize: int, crop: int) -> v2.Transform:
    """Image and mask together → the square model input (uint8 stays uint8)."""
    if fit == "pad":
        return PadFit(crop)
    return v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(crop)])


def normalize_transform() -> v2.Compose:
    return v2.Compose([
        v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class PadFit(v2.Transform):
    """Longer side → ``crop`` (masks nearest), then pad bottom/right to ``crop``×``crop``:
    the image with the ImageNet mean, the mask with the ignore value."""

    def __init__(self, crop: int) -> None:
        super().__init__()
        self.crop = crop

    def make_params(self, flat_inputs: list) -> dict:
        h, w = v2.query_size(flat_inputs)
        return {"geo": Geometry.of(h, w, self.crop, self.crop, "pad")}

    def transform(self, inpt, params: dict):
        if not isinstance(inpt, (tv_tensors.Image, tv_tensors.Mask)):
            return inpt
        geo: Geometry = params["geo"]
        rh, rw = geo.resized
        out = TF.resize(inpt, [rh, rw], antialias=True)
        fill = IGNORE if isinstance(inpt, tv_tensors.Mask) else list(PAD_RGB)
        return TF.pad(out, [0, 0, self.crop - rw, self.crop - rh], fill=fill)
