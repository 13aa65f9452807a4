"""Give a DVC stage only the params keys that ``dvc.yaml`` lists for it.

DVC reruns a stage only when a key under its ``params:`` changes. A script that reads a key
its stage does not list would be silently stale, so the stage gets a view of :class:`Params`
in which every unlisted section raises as soon as it is read. The whole file is still
validated first, so a typo anywhere is reported before any weight loads.

The same holds for files: a weights file or data folder a stage's params name must lie under
one of the stage's ``deps`` (``weights/``, ``data/raw/``), or replacing it at the same path would
leave ``dvc repro`` saying "didn't change"; such a path is one clear error.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import Any

import yaml

from cdsam.config.parse import load_params
from cdsam.config.schema import Params
from cdsam.config.stages import SPEED_KEYS
from cdsam.errors import UserError
from cdsam.io import looks_like_file

# Params keys naming files a stage reads; prepare's only for the sources that read them.
MODEL_FILE_KEYS = ("model.dino.checkpoint", "model.clip.pretrained", "model.sam.checkpoint")
PREPARE_FILE_KEYS = {
    "folders": ("images", "masks", "instance_classes"),
    "voc": ("root",),
    "labelme": ("images",),
    "cvat": ("images", "annotations"),
    "yolo": ("annotations", "images"),
    "coco": ("images", "annotations", "val_annotations", "val_images", "test_annotations",
             "test_images"),
}


class UndeclaredParam:
    """Stands in for a params section the stage does not list in dvc.yaml."""

    def __init__(self, key: str, stage: str) -> None:
        object.__setattr__(self, "_key", key)
        object.__setattr__(self, "_stage", stage)

    def __getattr__(self, name: str) -> Any:
        key, stage = object.__getattribute__(self, "_key"), object.__getattribute__(self, "_stage")
        raise RuntimeError(f"stage {stage!r} reads params key {key}.{name}, but dvc.yaml does "
                           f"not list {key} under its params: (DVC would miss changes to it)")

    def __repr__(self) -> str:
        return f"<undeclared {object.__getattribute__(self, '_key')}>"


def stage_spec(stage: str, dvc_yaml: str | Path = "dvc.yaml") -> dict[str, Any]:
    """``stage``'s entry in ``dvc_yaml``."""
    path = Path(dvc_yaml)
    try:
        spec = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: not found (run from the project root)") from None
    stages = (spec or {}).get("stages", {})
    if stage not in stages:
        raise UserError(f"{path}: no stage {stage!r}")
    return stages[stage] or {}


def declared_keys(stage: str, dvc_yaml: str | Path = "dvc.yaml") -> list[str]:
    """The params keys (from params.yaml) that ``stage`` lists in ``dvc_yaml``."""
    keys: list[str] = []
    for entry in stage_spec(stage, dvc_yaml).get("params", []) or []:
        if isinstance(entry, str):
            keys.append(entry)
        elif isinstance(entry, dict):
            for file, names in entry.items():
                if Path(file).name == "params.yaml":
                    keys.extend(names or [])
    return keys


def restrict(obj: Any, declared: list[str], stage: str, prefix: str = "") -> Any:
    """A shallow copy of a params dataclass with unlisted sections replaced by sentinels."""
    out = copy.copy(obj)
    for f in dataclasses.fields(obj):
        path = f"{prefix}{f.name}"
        if any(path == d or path.startswith(d + ".") for d in declared):
            continue
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and any(d.startswith(path + ".") for d in declared):
            object.__setattr__(out, f.name, restrict(value, declared, stage, path + "."))
        else:
            object.__setattr__(out, f.name, UndeclaredParam(path, stage))
    return out


def file_inputs(params: Params, declared: list[str]) -> list[tuple[str, str]]:
    """(key, path) for every file or folder the declared params name."""
    def covered(key: str) -> bool:
        return any(key == d or key.startswith(d + ".") for d in declared)

    found = []
    for key in MODEL_FILE_KEYS:
        obj: Any = params
        for part in key.split("."):
            obj = getattr(obj, part)
        if covered(key) and isinstance(obj, str) and obj and looks_like_file(obj):
            found.append((key, obj))
    prep = params.prepare
    for name in PREPARE_FILE_KEYS.get(prep.source, ()):
        value = getattr(prep, name)
        if covered(f"prepare.{name}") and value:
            found.append((f"prepare.{name}", value))
    return found


def check_inputs_tracked(params: Params, stage: str, dvc_yaml: str | Path = "dvc.yaml") -> None:
    """Every file the stage's params name lies under one of its dvc.yaml ``deps``, reached
    without a symlinked folder (DVC follows symlinks to files, not to folders)."""
    check_paths_tracked(stage, file_inputs(params, declared_keys(stage, dvc_yaml)), dvc_yaml)


def check_paths_tracked(stage: str, inputs: list[tuple[str, str]],
                        dvc_yaml: str | Path = "dvc.yaml") -> None:
    """:func:`check_inputs_tracked` for (what names it, path) pairs: also the files a
    source's own annotation file names (a YOLO data.yaml's folders and lists)."""
    root = Path(dvc_yaml).absolute().parent
    deps = [os.path.normpath(os.path.join(root, d))
            for d in stage_spec(stage, dvc_yaml).get("deps", []) or [] if isinstance(d, str)]
    for key, value in inputs:
        home = "weights/" if key.startswith("model.") else "data/raw/"
        path = os.path.normpath(os.path.join(root, value))  # not resolved: links stay links
        dep = next((d for d in deps if path == d or path.startswith(d + os.sep)), None)
        if dep is None:
            raise UserError(
                f"{key}: {value} is outside the folders dvc.yaml lists for stage {stage!r}, so "
                f"`dvc repro` would not see it change; put it under {home} (copy, a symlink "
                f"to each file, `dvc add` or `dvc import-url`) and point {key} there")
        rel = Path(path).relative_to(dep).parts
        for i in range(len(rel)):
            part = Path(dep, *rel[: i + 1])
            if part.is_symlink() and part.is_dir():
                raise UserError(
                    f"{key}: {part} is a symlink to a folder, which DVC does not follow (it "
                    f"would not see the files change); put the folder itself, or symlinks to "
                    f"its files, under {home}")


def load_stage_params(stage: str, params_path: str | Path = "params.yaml",
                      dvc_yaml: str | Path = "dvc.yaml") -> Params:
    """Validate the whole params file and the files it names, then return the view ``stage``
    may read."""
    params = load_params(params_path)
    check_inputs_tracked(params, stage, dvc_yaml)
    return restrict(params, declared_keys(stage, dvc_yaml) + list(SPEED_KEYS), stage)
