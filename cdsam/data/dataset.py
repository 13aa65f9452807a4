"""The per-sample dataset over a prepared split: (augmentation) → Normalize, plus the sample's
point/box prompt slots (`cdsam.data.spatial`).

Training and evaluation take whole batches from the same shards (`cdsam.data.packed`); this
one-sample-at-a-time view is what overlays, tests and the benchmark's per-sample "before" use.
The images and masks it returns are the prepared, already fitted ones (`cdsam.data.shards`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler, Sampler
from torchvision import tv_tensors

from cdsam.config.schema import DataConfig
from cdsam.data.augment import augment_pair, build_augment, sample_seed
from cdsam.data.geometry import normalize_transform
from cdsam.data.manifest import FOREGROUND, IGNORE
from cdsam.data.prepared import PreparedSplit
from cdsam.data.spatial import (
    SpatialPolicy,
    empty_prompts,
    focus_clicked_objects,
    sample_prompts,
)
from cdsam.data.templates import template_draw


class ManifestDataset(Dataset):
    """Rows of one split → dicts with image 3xHxW, mask 1xHxW (0/1), valid 1xHxW, prompt, id.

    ``valid`` is False on ignore pixels (mask value 255, padding, pixels an augmentation
    uncovered), which losses and metrics skip. ``augment``: apply ``data.augment`` (train only);
    an index may then be ``(epoch, i)`` (see :class:`EpochSampler`) to seed the draw.
    ``spatial``: draw point/box prompts from each (augmented) mask under the same seeding;
    without it the slots are empty. ``prepared``: the split already opened (shared, not copied).
    ``templates``: above one, each item carries the prompt ``template`` it shows (seeded the
    same way as the packed loader's).
    """

    def __init__(self, root: str | Path, split: str, data: DataConfig, augment: bool = False,
                 seed: int = 0, spatial: SpatialPolicy | None = None,
                 prepared: PreparedSplit | None = None, templates: int = 1) -> None:
        self.root = Path(root)
        self.templates = templates
        self.data = prepared if prepared is not None else \
            PreparedSplit.open(self.root, split, data)
        self.df = self.data.df
        self.split = split
        self.crop = data.crop
        self.normalize = normalize_transform()
        self.augment = build_augment(data.augment, data.crop) if augment else None
        self.seed = seed
        self.spatial = spatial if spatial is not None and spatial.enabled else None
        # The feature cache's key, as the packed loader's: stems can repeat across splits.
        self._image_of = [self.data.cache_keys[r] for r in self.data.image_row.tolist()]
        self._prompt_of = self.data.prompts
        self._id_of = self.data.ids

    def __len__(self) -> int:
        return len(self.df)

    @property
    def prompts(self) -> list[str]:
        return sorted(self.df["prompt"].unique())

    def fitted(self, idx: int) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        """Sample ``idx``'s uint8 image and mask at the model's input size."""
        row = int(self.data.image_row[idx])
        image = torch.from_numpy(self.data.image_rows([row])[0])
        mask = torch.from_numpy(self.data.masks([idx])[0])[None]
        return tv_tensors.Image(image), tv_tensors.Mask(mask)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        epoch, idx = key if isinstance(key, tuple) else (0, key)
        img_t, mask_t = self.fitted(idx)
        if self.augment is not None:
            img_t, mask_t = augment_pair(self.augment, img_t, mask_t,
                                         sample_seed(self.seed, epoch, idx))
        m = mask_t.as_subclass(torch.Tensor)
        spatial = empty_prompts() if self.spatial is None else \
            sample_prompts(m[0], self.spatial, sample_seed(self.seed, epoch, idx))
        # Objects as the packed loader gives them (there under augmentation too; here the
        # object map is not warped, so only without it): the centre target, and a click on
        # one object targets that object.
        objects = self.data.object_ids([idx]) \
            if self.augment is None and self.data.objects is not None else None
        if self.spatial is not None and objects is not None:
            masks = m.numpy().copy()
            slots = {k: v.numpy()[None].copy() for k, v in spatial.items()}
            if focus_clicked_objects(masks, objects, slots, [sample_seed(self.seed, epoch, idx)],
                                     self.spatial):
                m = torch.from_numpy(masks)
                spatial = {k: torch.from_numpy(np.asarray(v[0])) for k, v in slots.items()}
        return {
            "image": self.normalize(img_t).as_subclass(torch.Tensor),
            "mask": (m == FOREGROUND).float(),
            "valid": (m != IGNORE).float(),
            "prompt": self._prompt_of[idx],
            "id": self._id_of[idx],
            "image_key": self._image_of[idx],  # samples of one image share DINO features
            "index": idx,
            **spatial,
            **({"template": template_draw(self.seed, epoch, idx, self.templates)}
               if self.templates > 1 else {}),
            **({"objects": torch.from_numpy(objects)} if objects is not None else {}),
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
        **({"template": [b["template"] for b in batch]} if "template" in batch[0] else {}),
        **({"objects": torch.stack([b["objects"] for b in batch])}
           if "objects" in batch[0] else {}),
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
