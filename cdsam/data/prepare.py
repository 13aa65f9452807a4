"""The prepare stage's work: list a source's images, load, fit and encode each in
``prepare.workers`` processes, append them in order to the shards of ``data/prepared/``
(`cdsam.data.shards`), atomically."""

from __future__ import annotations

import functools
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from cdsam import io
from cdsam.config.schema import DataConfig, PrepareConfig
from cdsam.data.check import DataReport, ItemStats, item_stats
from cdsam.data.geometry import fit_transform
from cdsam.data.manifest import BadFiles, Problem
from cdsam.data.shards import Encoded, ShardWriter, encode_image
from cdsam.data.sources.listing import source_tasks
from cdsam.data.sources.objects import component_instances
from cdsam.data.tasks import Task, pool_map, resolve_workers
from cdsam.data.templates import PromptEnsembles, templates_of
from cdsam.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class Done:
    """A worker's result for one task: the encoded image (None when it was bad or had no
    sample), its figures, the bad files it found, and the image itself when the task keeps it."""

    encoded: Encoded | None
    stats: ItemStats | None
    problems: list[Problem] = field(default_factory=list)
    image: np.ndarray | None = None


@functools.lru_cache(maxsize=4)
def _fit(fit: str, resize: int, crop: int) -> Any:
    return fit_transform(fit, resize, crop)


def _prepare_one(task: Task, policy: str, fit: tuple[str, int, int],
                 instances_from: str = "objects") -> Done:
    # An error policy raises in the worker, and the pool raises it again in prepare; a skip
    # policy collects, and prepare logs what was skipped in task order.
    bad = BadFiles("error" if policy == "error" else "collect")
    item = task.run(bad)
    if item is None:
        return Done(None, None, bad.problems)
    if instances_from == "components":
        item.instances = component_instances(item.samples)
    stats = item_stats(item)
    encoded = encode_image(_fit(*fit), task.stem, item.image, item.samples,
                           item.instances) if item.samples else None
    kept = np.asarray(item.image) if task.keep_image else None
    return Done(encoded, stats, bad.problems, kept)


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
    ``resize``, ``crop``); return a summary (and log the source's :class:`DataReport`).

    The folder is built in a temporary sibling and renamed into place at the end, so a
    failure or a kill leaves any earlier ``out`` untouched (a killed run's sibling is removed
    by the next one).
    """
    out = Path(out)
    data = data or DataConfig()
    bad = BadFiles(cfg.on_bad_file)
    without = 0
    remove_stale_temps(out)
    tasks, required = source_tasks(cfg, seed, bad)
    report = DataReport(cfg.source, required)
    report.listed(bad)
    workers = resolve_workers(cfg.workers)
    work = functools.partial(_prepare_one, policy=cfg.on_bad_file,
                             fit=(data.fit, data.resize, data.crop),
                             instances_from=cfg.instances_from)
    with io.atomic_dir(out) as tmp:
        writer = ShardWriter(tmp, data, cfg.shard_images)
        results = pool_map(work, tasks, workers, len(tasks))
        bar = tqdm(results, total=len(tasks), disable=not show_progress,
                   desc=f"prepare {cfg.source} ({workers} worker{'s' * (workers > 1)})")
        for task, done in zip(tasks, bar, strict=True):
            for problem in done.problems:
                bad.bad(problem.path, problem.reason, problem.kind)
            report.extend(done.problems)
            if done.stats is not None:
                report.add(task, done.stats)
            if done.encoded is None:
                without += done.stats is not None  # e.g. a VOC image with no class, no negatives
                continue
            writer.write(done.encoded, task.split)
            if done.image is not None:
                (tmp / "images").mkdir(exist_ok=True)
                Image.fromarray(done.image).save(tmp / "images" / f"{task.stem}.png",
                                                 optimize=False)
        if not writer.rows:
            raise DataError(f"prepare.source: {cfg.source} produced no samples")
        ensembles = None
        if cfg.prompt_templates:
            ensembles = PromptEnsembles.for_prompts(templates_of(cfg),
                                                    [r["prompt"] for r in writer.rows])
            ensembles.write(tmp)  # before finish: index.json hashes it with the shards
        df = writer.finish(required)
    log.info("what prepare read:\n%s", report.render())
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
        **({"instances": len(writer.instances)} if writer.instances else {}),
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
