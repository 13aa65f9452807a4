"""Is params.yaml on main the packaged default, and the config dataclasses' defaults key for key?

One source of truth for the shipped values: `cdsam.config` holds them (a params file may leave
any key out), and the repository's params.yaml spells every one out because DVC tracks keys.
The only keys allowed to differ are the embedded default's toy DINO sizes, which exist in
params.yaml alone (absent or null means the named timm model's own architecture).

A check for this repository's CI, not a test: a user's tuned params.yaml is meant to differ.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from cdsam.config.parse import to_dict
from cdsam.config.schema import Params
from cdsam.presets import DEFAULT_PARAMS

MISSING = object()
TOY_ONLY = {f"model.dino.{k}" for k in ("img_size", "patch_size", "embed_dim", "depth",
                                         "num_heads")}


def flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def main() -> int:
    # `cdsam init --default` and the tests use the packaged copy: on main they are one file.
    if Path("params.yaml").read_bytes() != DEFAULT_PARAMS.read_bytes():
        print(f"params.yaml differs from {DEFAULT_PARAMS}: edit both", file=sys.stderr)
        return 1
    shipped = flatten(yaml.safe_load(Path("params.yaml").read_text()))
    defaults = flatten(to_dict(Params()))
    # A key params.yaml leaves out is null (e.g. stage overrides of `optim`).
    problems = [f"{k}: params.yaml {shipped.get(k, '<absent>')!r}, cdsam.config {v!r}"
                for k, v in defaults.items()
                if k not in TOY_ONLY and shipped.get(k, MISSING if v is not None else None) != v]
    problems += [f"{k}: in params.yaml, not in cdsam.config" for k in shipped if k not in defaults]
    for line in problems:
        print(line, file=sys.stderr)
    print(f"params.yaml vs cdsam.config defaults: {len(problems)} difference(s) "
          f"({len(defaults) - len(TOY_ONLY)} keys compared, toy DINO sizes excepted)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
