"""Training-time dataset over the manifest: Resize → CenterCrop → ToTensor → Normalize."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from cdsam.data.manifest import FOREGROUND, IGNORE, read_image, read_manifest
from cdsam.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_transform(resize: int, crop: int) -> v2.Compose:
    """One transform for image and mask together; torchvision resizes masks with nearest."""
    return v2.Compose([
        v2.Resize(resize, antialias=True),
        v2.CenterCrop(crop),
        v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class ManifestDataset(Dataset):
    """Rows of one split → dicts with image 3xHxW, mask 1xHxW (0/1), valid 1xHxW, prompt, id.

    ``valid`` is False on ignore pixels (mask value 255), which losses and metrics skip.
    Decoded samples are kept in memory after first use (the prepared sets are small and the
    transform is deterministic).
    """

    def __init__(self, root: str | Path, split: str, resize: int, crop: int,
                 keep_in_memory: bool = True) -> None:
        self.root = Path(root)
        self.df = read_manifest(self.root, split)
        self.split = split
        self.transform = build_transform(resize, crop)
        self.keep = keep_in_memory
        self._memo: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.df)

    def __getstate__(self) -> dict:
        # DataLoader workers get the manifest, not the main process's decoded samples.
        state = dict(self.__dict__)
        state["_memo"] = {}
        return state

    @property
    def prompts(self) -> list[str]:
        return sorted(self.df["prompt"].unique())

    def _load(self, idx: int) -> dict:
        row = self.df.iloc[idx]
        ipath, mpath = self.root / row["image"], self.root / row["mask"]
        image = read_image(ipath, "RGB")
        mask = np.asarray(read_image(mpath, "L", "mask"))
        if (mask.shape[1], mask.shape[0]) != image.size:
            raise DataError(f"{mpath}: mask size {mask.shape[::-1]} differs from its image "
                            f"{image.size}")
        img_t = pil_to_tv_image(image)
        mask_t = tv_tensors.Mask(torch.from_numpy(mask.copy()).unsqueeze(0))
        img_t, mask_t = self.transform(img_t, mask_t)
        m = mask_t.as_subclass(torch.Tensor)
        return {
            "image": img_t.as_subclass(torch.Tensor),
            "mask": (m == FOREGROUND).float(),
            "valid": (m != IGNORE).float(),
            "prompt": row["prompt"],
            "id": row["id"],
            "image_key": row["image"],  # samples of one image share DINO features
            "index": idx,
        }

    def __getitem__(self, idx: int) -> dict:
        if not self.keep:
            return self._load(idx)
        if idx not in self._memo:
            self._memo[idx] = self._load(idx)
        return self._memo[idx]


def pil_to_tv_image(image: Image.Image) -> tv_tensors.Image:
    """RGB PIL image → uint8 3xHxW tensor the v2 transforms treat as an image."""
    return tv_tensors.Image(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
