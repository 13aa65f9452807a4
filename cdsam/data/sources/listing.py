"""``prepare.source`` → the tasks of its images (`cdsam.data.tasks`), listed before any decode.

Every source but ``synthetic`` lists its images in stem order and splits them by a hash of
(seed, stem), so images added later go to the end of their split's shards and never move the
ones already prepared. The synthetic scenes are numbered and keep their seeded permutation.
"""

from __future__ import annotations

from pathlib import Path

from cdsam.config.schema import PrepareConfig
from cdsam.data.manifest import BadFiles, split_ids, stable_splits
from cdsam.data.sources.coco import coco_files, coco_stems, coco_tasks, load_coco
from cdsam.data.sources.cvat import cvat_tasks
from cdsam.data.sources.folders import folder_tasks
from cdsam.data.sources.labelme import labelme_tasks
from cdsam.data.sources.negatives import absent_samples
from cdsam.data.sources.objects import class_unions
from cdsam.data.sources.synthetic import COMBOS, make_scene, prompt_for
from cdsam.data.sources.voc import voc_tasks
from cdsam.data.sources.yolo import yolo_inputs, yolo_tasks
from cdsam.data.tasks import Item, Task
from cdsam.data.templates import class_prompt
from cdsam.errors import DataError


def load_scene(cfg: PrepareConfig, seed: int, index: int, named: dict[str, str], *,
               bad: BadFiles) -> Item:
    """Synthetic scene ``index`` with its prompts named as ``prepare`` asks."""
    image, objects = make_scene(seed, index, cfg.synthetic)
    for obj in objects:
        obj.prompt = named[obj.prompt]
    samples = class_unions(objects)
    samples += absent_samples(cfg, seed, samples[0].stem, list(named.values()),
                              [s.prompt for s in samples], (image.height, image.width))
    return Item(image, samples, objects)


def _synthetic(cfg: PrepareConfig, seed: int) -> list[Task]:
    n = cfg.synthetic.num_images
    splits = split_ids(list(range(n)), cfg.val_fraction, cfg.test_fraction, seed)
    # The scenes name their shapes "a red circle"; with prompt_templates the class name ("red
    # circle") goes into the first template instead (one template: the names stay as they are).
    named = {prompt_for(c, s): class_prompt(cfg, f"{c} {s}") if cfg.prompt_templates
             else prompt_for(c, s) for c, s in COMBOS}
    # The held-out scenes exist nowhere else: prepare saves them as PNG files, to predict on
    # (`cdsam predict --input data/prepared/images`, the demo's examples).
    return [Task(f"scene{i:05d}", splits[i], load_scene, (cfg, seed, i, named),
                 keep_image=splits[i] == "test") for i in range(n)]


def _coco(cfg: PrepareConfig, seed: int, bad: BadFiles, required: list[str]) -> list[Task]:
    files = coco_files(cfg)
    if "test" in files and "test" not in required:
        required.append("test")
    tasks = []
    for which, (ann_file, images, key) in files.items():
        coco = load_coco(ann_file, key)
        stems = coco_stems(coco)
        if which == "main":
            splits = stable_splits(stems, cfg.val_fraction, cfg.test_fraction, seed)
            # A split with its own file takes nothing from the main one.
            splits = {s: "train" if sp in files else sp for s, sp in splits.items()}
        else:
            splits = dict.fromkeys(stems, which)
        tasks += coco_tasks(cfg, seed, coco, Path(ann_file), images, splits, bad)
    return tasks


def source_tasks(cfg: PrepareConfig, seed: int, bad: BadFiles
                 ) -> tuple[list[Task], list[str]]:
    """The source's images as tasks, in the order their rows are written, and the splits that
    must have samples (train, val, test when asked for; a source with its own split lists
    may say otherwise)."""
    required = ["train", "val"] + (["test"] if cfg.test_fraction > 0 else [])
    if cfg.source == "synthetic":
        return _synthetic(cfg, seed), required
    if cfg.source == "folders":
        tasks = folder_tasks(cfg, seed, bad)
    elif cfg.source == "voc":
        tasks = voc_tasks(cfg, seed, bad, required)
    elif cfg.source == "coco":
        tasks = _coco(cfg, seed, bad, required)
    elif cfg.source == "labelme":
        tasks = labelme_tasks(cfg, seed, bad)
    elif cfg.source == "cvat":
        tasks = cvat_tasks(cfg, seed, bad)
    elif cfg.source == "yolo":
        tasks = yolo_tasks(cfg, seed, bad, required)
    else:
        raise DataError(f"prepare.source: unknown source {cfg.source!r}")
    return sorted(tasks, key=lambda t: t.stem), required


def source_inputs(cfg: PrepareConfig) -> list[tuple[str, str]]:
    """(what names it, path) of the files a source's own annotation file makes prepare read,
    beyond the ``prepare`` keys (which the stage checks itself): a YOLO data.yaml's folders,
    image lists and the images they list."""
    if cfg.source == "yolo" and not cfg.images:
        return yolo_inputs(cfg)
    return []
