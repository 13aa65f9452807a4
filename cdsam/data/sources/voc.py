"""The ``voc`` source: JPEGImages/, SegmentationClass/ palette PNGs, ImageSets/Segmentation/.

One binary sample per class present in an image (plus absent-class negatives with
``prepare.negatives: absent``; an image with no class is then all negatives, else it has no
sample). Label 255 marks borders: it is kept as the ignore value (255) in every prepared mask
and is never a class.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cdsam.config.schema import PrepareConfig
from cdsam.data.manifest import (
    BACKGROUND,
    FOREGROUND,
    IGNORE,
    BadFiles,
    Sample,
    stable_splits,
)
from cdsam.data.sources.negatives import absent_samples
from cdsam.data.tasks import Item, Task
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


def load_voc_image(cfg: PrepareConfig, seed: int, stem: str, image_path: Path,
                   label_path: Path, classes: tuple[str, ...], *, bad: BadFiles) -> Item | None:
    """One VOC image and its class samples."""
    image = bad.open(image_path, "RGB")
    if image is None:
        return None
    label = bad.open(label_path, what="label PNG")
    if label is None:
        return None
    if label.mode not in ("P", "L"):
        bad.bad(label_path, f"expected a palette (P) or L label PNG, got mode {label.mode}")
        return None
    labels = np.asarray(label)
    if (labels.shape[1], labels.shape[0]) != image.size:
        bad.wrong_size(label_path, "label", (labels.shape[1], labels.shape[0]), image.size)
        return None
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
            return None
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
    return Item(image, samples)


def voc_tasks(cfg: PrepareConfig, seed: int, bad: BadFiles, required: list[str]) -> list[Task]:
    """A task per labelled image; splits from ImageSets/Segmentation when it exists (then
    test is required only if listed), else :func:`stable_splits`."""
    stems = list_voc(cfg)
    root = Path(cfg.root)
    listed = voc_splits(root)
    if listed is not None:
        stems = [s for s in stems if s in listed]
        splits = listed
        if "test" not in listed.values() and "test" in required:
            required.remove("test")
    else:
        splits = stable_splits(stems, cfg.val_fraction, cfg.test_fraction, seed)
    classes = tuple(cfg.classes) if cfg.classes else VOC_CLASSES
    if cfg.binary and not cfg.prompt:
        raise DataError("prepare.prompt: required with prepare.binary: true (one prompt for "
                        "the single foreground class)")
    tasks = []
    for stem in stems:
        image_path = _image_path(root, stem)
        if image_path is None:
            bad.bad(root / "JPEGImages" / f"{stem}.jpg", "image missing for its label PNG",
                    "missing")
            continue
        tasks.append(Task(stem, splits[stem], load_voc_image,
                          (cfg, seed, stem, image_path,
                           root / "SegmentationClass" / f"{stem}.png", classes)))
    return tasks


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
