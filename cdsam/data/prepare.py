"""The prepare stage's work: read a source, write ``data/prepared/`` atomically."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tqdm import tqdm

from cdsam import io
from cdsam.config import PrepareConfig
from cdsam.data.folders import iter_folders
from cdsam.data.manifest import BadFiles, ManifestWriter, split_ids
from cdsam.data.synthetic import make_scene
from cdsam.data.voc import iter_voc, list_voc, voc_splits
from cdsam.errors import DataError

log = logging.getLogger(__name__)


def prepare(cfg: PrepareConfig, seed: int, out: str | Path, show_progress: bool = True
            ) -> dict[str, Any]:
    """Write images, masks and manifest for ``cfg.source`` into ``out``; return a summary.

    The folder is built in a temporary sibling and renamed into place at the end, so a
    failure leaves any earlier ``out`` untouched.
    """
    out = Path(out)
    bad = BadFiles(cfg.on_bad_file)
    required = ["train", "val"] + (["test"] if cfg.test_fraction > 0 else [])
    with io.atomic_dir(out) as tmp:
        writer = ManifestWriter(tmp)
        if cfg.source == "synthetic":
            n = cfg.synthetic.num_images
            splits = split_ids(list(range(n)), cfg.val_fraction, cfg.test_fraction, seed)
            for i in tqdm(range(n), desc="prepare synthetic", disable=not show_progress):
                image, samples = make_scene(seed, i, cfg.synthetic)
                writer.add_image(samples[0].stem, image, samples, splits[i])
        elif cfg.source == "folders":
            items = list(iter_folders(cfg, bad))
            splits = split_ids([s for s, _, _ in items], cfg.val_fraction, cfg.test_fraction,
                               seed)
            for stem, image, samples in tqdm(items, desc="prepare folders",
                                             disable=not show_progress):
                writer.add_image(stem, image, samples, splits[stem])
        elif cfg.source == "voc":
            stems = list_voc(cfg)
            listed = voc_splits(Path(cfg.root))
            if listed is not None:
                stems = [s for s in stems if s in listed]
                splits = listed
            else:
                splits = split_ids(stems, cfg.val_fraction, cfg.test_fraction, seed)
            if listed is not None and "test" not in listed.values():
                required = ["train", "val"]
            for stem, image, samples in tqdm(iter_voc(cfg, stems, bad), total=len(stems),
                                             desc="prepare voc", disable=not show_progress):
                writer.add_image(stem, image, samples, splits[stem])
        else:
            raise DataError(f"prepare.source: unknown source {cfg.source!r}")
        if not writer.rows:
            raise DataError(f"prepare.source: {cfg.source} produced no samples")
        df = writer.finish(required)
    summary: dict[str, Any] = {
        "images": int(df["image"].nunique()),
        "samples": len(df),
        "prompts": int(df["prompt"].nunique()),
        "skipped_files": len(bad.skipped),
    }
    for split in ("train", "val", "test"):
        summary[f"{split}_samples"] = int((df["split"] == split).sum())
    if bad.skipped:
        log.warning("skipped %d bad files (listed above)", len(bad.skipped))
    return summary
