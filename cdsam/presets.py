"""Real-size recipes: ``cdsam init --preset NAME`` writes one into params.yaml.

``cdsam init --default`` writes the embedded default itself (``cdsam/defaults/params.yaml``, the
file a fresh clone's params.yaml starts as; the tests build their params from it, so a user's
edits to params.yaml never break the suite).

A recipe (``cdsam/recipes/<name>.yaml``) sets only the keys that differ from the embedded
default (model names, local weight files, the input size). It is applied onto the existing
params.yaml with ruamel.yaml's round-trip mode, so the file's comments and every other key stay
as they are, and the result is validated (including the named-model checks of
`cdsam.models.preflight`) before anything is written.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from cdsam.config.parse import parse_params
from cdsam.errors import UserError

RECIPES = Path(__file__).parent / "recipes"
DEFAULT_PARAMS = Path(__file__).parent / "defaults" / "params.yaml"


def list_presets() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def _overlay(target: Any, overlay: dict, prefix: str, changed: list[str], note: str) -> None:
    for key, value in overlay.items():
        path = f"{prefix}{key}"
        if key not in target:
            raise UserError(f"preset key {path}: not in params.yaml (an older params file?)")
        if isinstance(value, dict):
            _overlay(target[key], value, path + ".", changed, note)
        elif target[key] != value:
            target[key] = value
            # The default's comment ("tiny text tower shipped with cdsam") would now be false.
            target.yaml_add_eol_comment(note, key, column=24)
            changed.append(path)


def _represent_null(representer, _value):
    return representer.represent_scalar("tag:yaml.org,2002:null", "null")


def apply_preset(name: str, params_path: str | Path = "params.yaml") -> list[str]:
    """Write preset ``name`` into ``params_path``; returns the keys it changed."""
    if name not in list_presets():
        raise UserError(f"--preset: unknown preset {name!r} (known: {', '.join(list_presets())})")
    path = Path(params_path)
    if not path.is_file():
        raise UserError(f"{path}: params file not found")
    yaml = YAML()  # round-trip: comments, quotes and key order survive
    yaml.width = 4096
    yaml.preserve_quotes = True
    yaml.representer.add_representer(type(None), _represent_null)
    doc = yaml.load(path.read_text())
    recipe = YAML(typ="safe").load((RECIPES / f"{name}.yaml").read_text())
    changed: list[str] = []
    _overlay(doc, recipe, "", changed, f"# cdsam init --preset {name}")
    buf = io.StringIO()
    yaml.dump(doc, buf)
    params = parse_params(YAML(typ="safe").load(buf.getvalue()))  # every problem, one line each
    from cdsam.models.preflight import check_model

    check_model(params.model, params.data.crop)
    path.write_text(buf.getvalue())
    return changed


def write_default(params_path: str | Path = "params.yaml", force: bool = False) -> bool:
    """Write the embedded default params file; False when ``params_path`` already is it.

    A different file there (a user's tuned params) is overwritten only with ``force``.
    """
    path, text = Path(params_path), DEFAULT_PARAMS.read_text()
    if path.is_file():
        if path.read_text() == text:
            return False
        if not force:
            raise UserError(f"{path}: exists and differs from the embedded default; --force "
                            f"overwrites it (git keeps the old one)")
    path.write_text(text)
    return True
