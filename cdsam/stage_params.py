"""Give a DVC stage only the params keys that ``dvc.yaml`` lists for it.

DVC reruns a stage only when a key under its ``params:`` changes. A script that reads a key
its stage does not list would be silently stale, so the stage gets a view of :class:`Params`
in which every unlisted section raises as soon as it is read. The whole file is still
validated first, so a typo anywhere is reported before any weight loads.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import yaml

from cdsam.config import Params, load_params
from cdsam.errors import UserError


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


def declared_keys(stage: str, dvc_yaml: str | Path = "dvc.yaml") -> list[str]:
    """The params keys (from params.yaml) that ``stage`` lists in ``dvc_yaml``."""
    path = Path(dvc_yaml)
    try:
        spec = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: not found (run from the project root)") from None
    stages = (spec or {}).get("stages", {})
    if stage not in stages:
        raise UserError(f"{path}: no stage {stage!r}")
    keys: list[str] = []
    for entry in stages[stage].get("params", []) or []:
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


def load_stage_params(stage: str, params_path: str | Path = "params.yaml",
                      dvc_yaml: str | Path = "dvc.yaml") -> Params:
    """Validate the whole params file, then return the view ``stage`` may read."""
    params = load_params(params_path)
    return restrict(params, declared_keys(stage, dvc_yaml), stage)
