"""The ``voc`` source: JPEGImages/, SegmentationClass/ palette PNGs, ImageSets/Segmentation/.

One binary sample per class present in an image (plus absent-class negatives with
``prepare.negatives: absent``; an image with no class is then all negatives, else it has no
sample). Label 255 marks borders: it is kept as the ignore value (255) in every prepared mask
and is never a class.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from cdsam.config.schema import PrepareConfig
from cdsam.data.manifest import (
    BACKGROUND,
    FOREGROUND,
    IGNORE,
    BadFiles,
    Sample,
)
from cdsam.data.negatives import absent_samples
from cdsam.data.templates import class_prompt
from cdsam.errors import DataError

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "dining table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa",
    "train", "tv monitor",
)
VOC_BORDER = 255


def voc_splits(root: Path) -> dict[str, str] | None:
    """Image id → split from ImageSets/Segmentation/{train,val}.txt, when those exist."""
    sets = root / "ImageSets" / "Segmentation"
    found: dict[str, str] = {}
    for split in ("train", "val", "test"):
        f = sets / f"{split}.txt"
        if f.is_file():
            for line in f.read_text().split():
                found.setdefault(line.strip(), split)
    return found or None


def _image_path(root: Path, stem: str) -> Path | None:
    for ext in (".jpg", ".jpeg", ".png", ".JPG"):
        p = root / "JPEGImages" / f"{stem}{ext}"
        if p.is_file():
            return p
    return None


def iter_voc(cfg: PrepareConfig, stems: list[str], bad: BadFiles, seed: int = 0
             ) -> Iterator[tuple[str, Image.Image, list[Sample]]]:
    root = Path(cfg.root)
    classes = tuple(cfg.classes) if cfg.classes else VOC_CLASSES
    if cfg.binary and not cfg.prompt:
        raise DataError("prepare.prompt: required with prepare.binary: true (one prompt for "
                        "the single foreground class)")
    for stem in stems:
        label_path = root / "SegmentationClass" / f"{stem}.png"
        image_path = _image_path(root, stem)
        if image_path is None:
            bad.bad(root / "JPEGImages" / f"{stem}.jpg", "image missing for its label PNG")
            continue
        image = bad.open(image_path, "RGB")
        if image is None:
            continue
        label = bad.open(label_path, what="label PNG")
        if label is None:
            continue
        if label.mode not in ("P", "L"):
            bad.bad(label_path, f"expected a palette (P) or L label PNG, got mode {label.mode}")
            continue
        labels = np.asarray(label)
        if (labels.shape[1], labels.shape[0]) != image.size:
            bad.bad(label_path, f"label is {labels.shape[1]}x{labels.shape[0]}, its image is "
                                f"{image.size[0]}x{image.size[1]}")
            continue
        ignore = labels == VOC_BORDER
        present = [int(c) for c in np.unique(labels) if c not in (0, VOC_BORDER)]
        groups: list[tuple[str, np.ndarray]] = []
        if cfg.binary:
            vocab = [cfg.prompt]
            if present:
                groups.append((cfg.prompt, (labels != 0) & ~ignore))
        else:
            vocab = [class_prompt(cfg, c) for c in classes]
            unknown = [c for c in present if c > len(classes)]
            if unknown:
                bad.bad(label_path, f"label value {unknown[0]} has no class name "
                                    f"({len(classes)} known; set prepare.classes)")
                continue
            for c in present:
                groups.append((vocab[c - 1], labels == c))
        samples = []
        for prompt, fg in groups:
            enc = np.full(labels.shape, BACKGROUND, np.uint8)
            enc[fg] = FOREGROUND
            enc[ignore] = IGNORE
            samples.append(Sample(stem, prompt, enc))
        samples += absent_samples(cfg, seed, stem, vocab, [s.prompt for s in samples],
                                  labels.shape, ignore)
        yield stem, image, samples


def list_voc(cfg: PrepareConfig) -> list[str]:
    if not cfg.root:
        raise DataError("prepare.root: required for prepare.source: voc")
    root = Path(cfg.root)
    if not root.is_dir():
        raise DataError(f"prepare.root: folder not found: {root}")
    labels = root / "SegmentationClass"
    if not labels.is_dir():
        raise DataError(f"{labels}: missing (expected the VOC layout: JPEGImages/, "
                        f"SegmentationClass/, ImageSets/Segmentation/)")
    stems = sorted(p.stem for p in labels.glob("*.png"))
    if not stems:
        raise DataError(f"{labels}: no label PNGs")
    return stems
