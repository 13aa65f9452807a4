"""Atomic file and directory writes: temp + fsync + rename, so a crash never leaves half files."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cdsam.errors import UserError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_mode(path: Path, mode: int) -> None:
    """mkstemp/mkdtemp create 0600/0700; outputs get the usual umask-based permissions."""
    os.chmod(path, mode & ~_umask())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success fsync it and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        _publish_mode(tmp_path, 0o666)
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temp directory; on success it replaces ``path`` as a whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
                _publish_mode(f, 0o666)
            elif f.is_dir():
                _publish_mode(f, 0o777)
        _publish_mode(tmp, 0o777)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def looks_like_file(value: str) -> bool:
    """A weights setting that names a file (vs a hub tag such as ``openai``)."""
    return os.sep in value or value.endswith(WEIGHT_SUFFIXES) or Path(value).exists()


def weights_format(path: str | Path) -> str:
    """What a weights file holds, from its first bytes: ``safetensors`` (an 8-byte header
    length, then JSON), ``zip`` (a torch file since 1.6, or numpy's .npz), ``pickle`` (a legacy
    torch file), else ``unknown``."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    # The header length comes first in safetensors and its first byte can be anything
    # (0x80 included), so that test goes before the others.
    if len(head) == 9 and head[8:9] == b"{" and \
            int.from_bytes(head[:8], "little") <= os.path.getsize(path) - 8:
        return "safetensors"
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"  # PROTO opcode, protocols 2-5
    return "unknown"


def check_weights_name(path: str | Path, key: str) -> None:
    """Readers pick their parser by the extension: stop with one line naming the params
    ``key``, the file and what it holds when the name says safetensors and the bytes do not,
    or the other way round."""
    path = Path(path)
    held = weights_format(path)
    named = "safetensors" if path.suffix == ".safetensors" else "other"
    if named == "safetensors" and held != "safetensors":
        what = {"zip": "a torch (zip) file", "pickle": "a torch pickle"}.get(held, "no safetensors")
        raise UserError(f"{key}: {path} is named .safetensors but holds {what}; rename it to "
                        f".pth (or convert it with safetensors.torch.save_file)")
    if named == "other" and held == "safetensors":
        raise UserError(f"{key}: {path} holds safetensors but is not named .safetensors; "
                        f"rename it to {path.stem}.safetensors")
