"""The per-sample dataset over the manifest: fit → (seeded augmentation) → Normalize, plus the
sample's point/box prompt slots (`cdsam.data.spatial`).

Evaluation reads splits through it, and training packs them from it (`cdsam.data.packed`
decodes every image once via :meth:`ManifestDataset.fitted_group`); fetching training batches
sample by sample through a DataLoader is the slower path the benchmark compares against.
The fit (``data.fit``: crop or pad, see `cdsam.data.geometry`) is deterministic, so its uint8
result is kept in memory: each image once (not once per prompt), each mask once. Augmentation
(train split only) and normalisation run on every fetch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler, Sampler
from torchvision import tv_tensors

from cdsam.config import DataConfig
from cdsam.data.augment import augment_pair, build_augment, sample_seed
from cdsam.data.geometry import fit_transform, normalize_transform
from cdsam.data.manifest import FOREGROUND, IGNORE, read_image, read_manifest
from cdsam.data.spatial import SpatialPolicy, empty_prompts, sample_prompts
from cdsam.errors import DataError


class ManifestDataset(Dataset):
    """Rows of one split → dicts with image 3xHxW, mask 1xHxW (0/1), valid 1xHxW, prompt, id.

    ``valid`` is False on ignore pixels (mask value 255, padding, pixels an augmentation
    uncovered), which losses and metrics skip. ``augment``: apply ``data.augment`` (train only);
    an index may then be ``(epoch, i)`` (see :class:`EpochSampler`) to seed the draw.
    ``spatial``: draw point/box prompts from each (augmented) mask under the same seeding;
    without it the slots are empty.
    """

    def __init__(self, root: str | Path, split: str, data: DataConfig, augment: bool = False,
                 seed: int = 0, keep_in_memory: bool = True,
                 spatial: SpatialPolicy | None = None) -> None:
        self.root = Path(root)
        self.df = read_manifest(self.root, split)
        self.split = split
        self.fit = fit_transform(data.fit, data.resize, data.crop)
        self.crop = data.crop
        self.normalize = normalize_transform()
        self.augment = build_augment(data.augment, data.crop) if augment else None
        self.seed = seed
        self.spatial = spatial if spatial is not None and spatial.enabled else None
        self.keep = keep_in_memory
        self._images: dict[str, tv_tensors.Image] = {}
        self._masks: dict[int, tv_tensors.Mask] = {}
        self._sizes: dict[str, tuple[int, int]] = {}  # original (W, H) of each decoded image
        # Plain lists: a pandas row lookup per fetch costs more than the rest of the fetch.
        self._image_of = self.df["image"].tolist()
        self._mask_of = self.df["mask"].tolist()
        self._prompt_of = self.df["prompt"].tolist()
        self._id_of = self.df["id"].tolist()

    def __len__(self) -> int:
        return len(self.df)

    def __getstate__(self) -> dict:
        # DataLoader workers get the manifest, not the main process's decoded arrays.
        state = dict(self.__dict__)
        state["_images"], state["_masks"], state["_sizes"] = {}, {}, {}
        return state

    @property
    def prompts(self) -> list[str]:
        return sorted(self.df["prompt"].unique())

    def _read_mask(self, idx: int, size: tuple[int, int]) -> tv_tensors.Mask:
        """Row ``idx``'s mask as read, checked against its image's (W, H)."""
        mpath = self.root / self._mask_of[idx]
        mask = tv_tensors.Mask(torch.from_numpy(
            np.asarray(read_image(mpath, "L", "mask")).copy()).unsqueeze(0))
        if (mask.shape[-1], mask.shape[-2]) != size:
            raise DataError(f"{mpath}: mask size {tuple(mask.shape[:0:-1])} differs from its "
                            f"image {size}")
        return mask

    def fitted_group(self, rows: list[int]) -> tuple[tv_tensors.Image, list[tv_tensors.Mask],
                                                     tuple[int, int]]:
        """Rows that share one image → that image and their masks at the input size (uint8),
        and the image's original (W, H); the image is decoded once and nothing is kept (the
        packer, `cdsam.data.packed`, stores the result itself)."""
        key = self._image_of[rows[0]]
        image = read_image(self.root / key, "RGB")
        image_t, first = self.fit(pil_to_tv_image(image), self._read_mask(rows[0], image.size))
        # The fit depends on the size only: every mask of the image gets the same geometry.
        return image_t, [first] + [self.fit(self._read_mask(i, image.size)) for i in rows[1:]], \
            image.size

    def _fitted(self, idx: int) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        """The uint8 image and mask at the model's input size (memoised; an image shared by
        several prompts is decoded and fitted once)."""
        key = self._image_of[idx]
        image_t, mask_t = self._images.get(key), self._masks.get(idx)
        if image_t is not None and mask_t is not None:
            return image_t, mask_t
        if image_t is not None:
            mask_t = self.fit(self._read_mask(idx, self._sizes[key]))
            size = self._sizes[key]
        else:
            image_t, (mask_t,), size = self.fitted_group([idx])
        if self.keep:
            self._images[key], self._sizes[key], self._masks[idx] = image_t, size, mask_t
        return image_t, mask_t

    def image_groups(self) -> list[list[int]]:
        """Row indices grouped by image, in order of each image's first row."""
        groups: dict[str, list[int]] = {}
        for idx, key in enumerate(self._image_of):
            groups.setdefault(key, []).append(idx)
        return list(groups.values())

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        epoch, idx = key if isinstance(key, tuple) else (0, key)
        img_t, mask_t = self._fitted(idx)
        if self.augment is not None:
            img_t, mask_t = augment_pair(self.augment, img_t, mask_t,
                                         sample_seed(self.seed, epoch, idx))
        m = mask_t.as_subclass(torch.Tensor)
        spatial = empty_prompts() if self.spatial is None else \
            sample_prompts(m[0], self.spatial, sample_seed(self.seed, epoch, idx))
        return {
            "image": self.normalize(img_t).as_subclass(torch.Tensor),
            "mask": (m == FOREGROUND).float(),
            "valid": (m != IGNORE).float(),
            "prompt": self._prompt_of[idx],
            "id": self._id_of[idx],
            "image_key": self._image_of[idx],  # samples of one image share DINO features
            "index": idx,
            **spatial,
        }


def collate(batch: list[dict]) -> dict[str, Any]:
    return {
        "image": torch.stack([b["image"] for b in batch]),
        "mask": torch.stack([b["mask"] for b in batch]),
        "valid": torch.stack([b["valid"] for b in batch]),
        "prompt": [b["prompt"] for b in batch],
        "id": [b["id"] for b in batch],
        "image_key": [b["image_key"] for b in batch],
        "index": torch.tensor([b["index"] for b in batch]),
        **{k: torch.stack([b[k] for b in batch])
           for k in ("points", "point_labels", "box", "has_box")},
    }


class EpochSampler(Sampler):
    """Wraps a :class:`DistributedSampler` and yields ``(epoch, index)``, so a sample's
    augmentation is seeded by both, in the main process or any loader worker."""

    def __init__(self, inner: DistributedSampler) -> None:
        self.inner = inner

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def __iter__(self):
        epoch = self.inner.epoch
        return ((epoch, i) for i in self.inner)

    def __len__(self) -> int:
        return len(self.inner)


def pil_to_tv_image(image: Image.Image) -> tv_tensors.Image:
    """RGB PIL image → uint8 3xHxW tensor the v2 transforms treat as an image."""
    return tv_tensors.Image(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
