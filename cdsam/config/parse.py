"""Read ``params.yaml`` into :class:`~cdsam.config.schema.Params`, collecting every problem.

Parsing collects every problem (unknown keys with the nearest valid name, wrong types, out of
range values, cross-field conflicts) and raises one :class:`ConfigError` listing them all, each
line naming the params key and the bad value. Nothing here touches weights or files other
than ``params.yaml``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import operator
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from cdsam.config.schema import Params
from cdsam.config.validate import validate
from cdsam.errors import ConfigError, UserError


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = tuple(a for a in typing.get_args(tp) if a is not type(None))
        optional = len(args) < len(typing.get_args(tp))
        if len(args) == 1:
            return args[0], optional
        return functools.reduce(operator.or_, args), optional
    return tp, False


def _coerce(value: Any, tp: Any, key: str, errors: list[str], base: Any = None) -> Any:
    inner, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        errors.append(f"{key}: must not be null")
        return None
    if _is_dataclass_type(inner):
        return parse_section(inner, value, key, errors, base)
    if typing.get_origin(inner) in (typing.Union, types.UnionType):
        # `int | str` (a number or a word such as auto): the first type that takes the value;
        # validation then checks the word.
        for option in typing.get_args(inner):
            trial: list[str] = []
            parsed = _coerce(value, option, key, trial)
            if not trial:
                return parsed
        names = " or ".join({int: "an integer", str: "a string", float: "a number"}.get(o, str(o))
                            for o in typing.get_args(inner))
        errors.append(f"{key}: expected {names}, got {value!r}")
        return None
    if inner is bool:
        if isinstance(value, bool):
            return value
        errors.append(f"{key}: expected true or false, got {value!r}")
        return None
    if inner is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        errors.append(f"{key}: expected an integer, got {value!r}")
        return None
    if inner is float:
        # YAML 1.1 reads `1e-3` (no dot) as a string; accept it as the number it means.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        errors.append(f"{key}: expected a number, got {value!r}")
        return None
    if inner is str:
        if isinstance(value, str):
            return value
        errors.append(f"{key}: expected a string, got {value!r}")
        return None
    if typing.get_origin(inner) is list:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        errors.append(f"{key}: expected a list of strings, got {value!r}")
        return None
    raise TypeError(f"unsupported config type {tp} for {key}")  # a bug, not user input


def parse_section(cls: type, data: Any, prefix: str, errors: list[str], base: Any = None) -> Any:
    """``data`` over ``base`` (the section's default instance): keys left out keep the
    defaults of *this* section (stage3's LR, not StageConfig's)."""
    base = cls() if base is None else base
    if not isinstance(data, dict):
        errors.append(f"{prefix}: expected a mapping, got {data!r}")
        return base
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            hint = f" (did you mean {prefix + '.' if prefix else ''}{near[0]}?)" if near else ""
            valid = ", ".join(names)
            errors.append(f"{full}: unknown key{hint}; valid keys here: {valid}")
            continue
        parsed = _coerce(value, hints[key], full, errors, getattr(base, key))
        if parsed is not None or value is None:
            kwargs[key] = parsed
    return dataclasses.replace(base, **kwargs)


def parse_params(data: dict[str, Any] | None) -> Params:
    """Build :class:`Params` from a params mapping; raise ConfigError listing every problem."""
    errors: list[str] = []
    params = parse_section(Params, data or {}, "", errors)
    if not errors:
        validate(params, errors)
    if errors:
        raise ConfigError(errors)
    if params.model.dino.img_size is None:
        # The DINO input is data.crop; recorded in the checkpoint's model config.
        params.model.dino.img_size = params.data.crop
    return params


def read_params_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise UserError(f"{path}: params file not found") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({exc})".replace("\n", " ")) from None
    if data is not None and not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping at the top level")
    return data or {}


def load_params(path: str | Path = "params.yaml") -> Params:
    return parse_params(read_params_file(path))


def to_dict(obj: Any) -> Any:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj
