"""The prepare stage's work: read a source, fit every image once, write the training-ready
shards of ``data/prepared/`` (`cdsam.data.shards`) atomically."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from cdsam import io
from cdsam.config.schema import DataConfig, PrepareConfig
from cdsam.data.coco import coco_files, coco_stems, iter_coco, load_coco
from cdsam.data.folders import iter_folders, list_folders
from cdsam.data.manifest import BadFiles, Sample, split_ids
from cdsam.data.negatives import absent_samples
from cdsam.data.shards import ShardWriter
from cdsam.data.synthetic import COMBOS, make_scene, prompt_for
from cdsam.data.templates import PromptEnsembles, class_prompt, templates_of
from cdsam.data.voc import iter_voc, list_voc, voc_splits
from cdsam.errors import DataError

log = logging.getLogger(__name__)

# (stem, image, samples, split)
Entry = tuple[str, Image.Image, list[Sample], str]


def _synthetic(cfg: PrepareConfig, seed: int) -> Iterator[Entry]:
    n = cfg.synthetic.num_images
    splits = split_ids(list(range(n)), cfg.val_fraction, cfg.test_fraction, seed)
    # The scenes name their shapes "a red circle"; with prompt_templates the class name ("red
    # circle") goes into the first template instead (one template: the names stay as they are).
    named = {prompt_for(c, s): class_prompt(cfg, f"{c} {s}") if cfg.prompt_templates
             else prompt_for(c, s) for c, s in COMBOS}
    vocab = list(named.values())
    for i in range(n):
        image, samples = make_scene(seed, i, cfg.synthetic)
        for sample in samples:
            sample.prompt = named[sample.prompt]
        stem = samples[0].stem
        samples += absent_samples(cfg, seed, stem, vocab, [s.prompt for s in samples],
                                  (image.height, image.width))
        yield stem, image, samples, splits[i]


def _folders(cfg: PrepareConfig, seed: int, bad: BadFiles) -> Iterator[Entry]:
    # The split is drawn over the listed stems, so images are decoded one at a time (holding
    # them all until the last was read grew with the data: about 5 MB a 1024² image).
    listing = list_folders(cfg)
    splits = split_ids(listing.stems, cfg.val_fraction, cfg.test_fraction, seed)
    for stem, image, samples in iter_folders(cfg, bad, seed, listing):
        yield stem, image, samples, splits[stem]


def _voc(cfg: PrepareConfig, seed: int, bad: BadFiles, required: list[str]) -> Iterator[Entry]:
    stems = list_voc(cfg)
    listed = voc_splits(Path(cfg.root))
    if listed is not None:
        stems = [s for s in stems if s in listed]
        splits = listed
        if "test" not in listed.values() and "test" in required:
            required.remove("test")
    else:
        splits = split_ids(stems, cfg.val_fraction, cfg.test_fraction, seed)
    for stem, image, samples in iter_voc(cfg, stems, bad, seed):
        yield stem, image, samples, splits[stem]


def _coco(cfg: PrepareConfig, seed: int, bad: BadFiles, required: list[str]) -> Iterator[Entry]:
    files = coco_files(cfg)
    if "test" in files and "test" not in required:
        required.append("test")
    for which, (ann_file, images, key) in files.items():
        coco = load_coco(ann_file, key)
        stems = coco_stems(coco)
        if which == "main":
            splits = split_ids(stems, cfg.val_fraction, cfg.test_fraction, seed)
            # A split with its own file takes nothing from the main one.
            splits = {s: "train" if sp in files else sp for s, sp in splits.items()}
        else:
            splits = dict.fromkeys(stems, which)
        for stem, image, samples in iter_coco(cfg, seed, coco, Path(ann_file), images, bad):
            yield stem, image, samples, splits[stem]


def _entries(cfg: PrepareConfig, seed: int, bad: BadFiles, required: list[str]
             ) -> Iterable[Entry]:
    if cfg.source == "synthetic":
        return _synthetic(cfg, seed)
    if cfg.source == "folders":
        return _folders(cfg, seed, bad)
    if cfg.source == "voc":
        return _voc(cfg, seed, bad, required)
    if cfg.source == "coco":
        return _coco(cfg, seed, bad, required)
    raise DataError(f"prepare.source: unknown source {cfg.source!r}")


def remove_stale_temps(out: Path) -> list[Path]:
    """Temp siblings a killed ``prepare`` left behind (``.prepared.*.tmp``), removed."""
    stale = sorted(out.parent.glob(f".{out.name}.*.tmp")) if out.parent.is_dir() else []
    for path in stale:
        log.info("removing %s (left by a prepare that did not finish)", path)
        shutil.rmtree(path, ignore_errors=True)
    return stale


def prepare(cfg: PrepareConfig, seed: int, out: str | Path, show_progress: bool = True,
            data: DataConfig | None = None) -> dict[str, Any]:
    """Write the shards for ``cfg.source`` into ``out``, fitted as ``data`` says (``fit``,
    ``resize``, ``crop``); return a summary.

    The folder is built in a temporary sibling and renamed into place at the end, so a
    failure or a kill leaves any earlier ``out`` untouched (a killed run's sibling is removed
    by the next one).
    """
    out = Path(out)
    data = data or DataConfig()
    bad = BadFiles(cfg.on_bad_file)
    required = ["train", "val"] + (["test"] if cfg.test_fraction > 0 else [])
    without = 0
    remove_stale_temps(out)
    with io.atomic_dir(out) as tmp:
        writer = ShardWriter(tmp, data)
        entries = _entries(cfg, seed, bad, required)
        for stem, image, samples, split in tqdm(entries, desc=f"prepare {cfg.source}",
                                                disable=not show_progress):
            if not samples:  # e.g. a VOC image with no class, and no negatives asked for
                without += 1
                continue
            writer.add_image(stem, image, samples, split)
            if cfg.source == "synthetic" and split == "test":
                # The generated scenes exist nowhere else: the held-out ones as PNG files, to
                # predict on (`cdsam predict --input data/prepared/images`, the demo's examples).
                (tmp / "images").mkdir(exist_ok=True)
                image.save(tmp / "images" / f"{stem}.png", optimize=False)
        if not writer.rows:
            raise DataError(f"prepare.source: {cfg.source} produced no samples")
        ensembles = None
        if cfg.prompt_templates:
            ensembles = PromptEnsembles.for_prompts(templates_of(cfg),
                                                    [r["prompt"] for r in writer.rows])
            ensembles.write(tmp)  # before finish: index.json hashes it with the shards
        df = writer.finish(required)
    files = [f for f in out.rglob("*") if f.is_file()]
    summary: dict[str, Any] = {
        "images": int(df["image"].nunique()),
        "files": len(files),
        "bytes": sum(f.stat().st_size for f in files),
        "samples": len(df),
        "positive_samples": int((~df["negative"]).sum()),
        "negative_samples": int(df["negative"].sum()),
        "prompts": int(df["prompt"].nunique()),
        **({"prompt_templates": len(ensembles.templates),
            "ensembled_prompts": len(ensembles.names)} if ensembles else {}),
        "skipped_files": len(bad.skipped),
        "images_without_samples": without,
        "emptied_by_fit": writer.emptied_by_fit,
    }
    for split in ("train", "val", "test"):
        in_split = df["split"] == split
        summary[f"{split}_samples"] = int(in_split.sum())
        summary[f"{split}_negatives"] = int((in_split & df["negative"]).sum())
    if bad.skipped:
        log.warning("skipped %d bad files (listed above)", len(bad.skipped))
    if writer.emptied_by_fit:
        log.warning("%d positive samples became negatives: data.fit %s (resize %d, crop %d) "
                    "leaves their object outside the input", writer.emptied_by_fit, data.fit,
                    data.resize, data.crop)
    return summary
