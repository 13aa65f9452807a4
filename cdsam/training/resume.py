"""Per-epoch resume state for a training stage, outside DVC's outputs.

After every epoch a stage writes everything needed to continue bit-exactly (model, optimizer,
LR schedule, GradScaler, the RNG states of torch/numpy/python, epoch, history, best metric) to
``.cdsam/resume/stageN/``. The state is keyed by a fingerprint of the stage's params, its parent
checkpoint, the source of the cdsam code it runs and the content of the data files it reads,
so a rerun with any of them changed starts over. Tensors go to
safetensors, everything else to JSON: no pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cdsam import io
from cdsam.models.delta_base import Base, canonical_names, split_state
from cdsam.training.sharding import load_optimizer_state, load_state

log = logging.getLogger("cdsam.training.resume")

FORMAT = "cdsam-resume/1"
TENSORS = "state.safetensors"
META = "state.json"


def code_fingerprint(package: str = "cdsam") -> str:
    """sha256 over the source of every loaded module of ``package``: an edit to the code a
    stage runs (e.g. ``cdsam/models/losses.py``) makes an earlier resume state stale."""
    h = hashlib.sha256()
    for name in sorted(m for m in sys.modules if m == package or m.startswith(package + ".")):
        path = getattr(sys.modules[name], "__file__", None)
        if path and Path(path).is_file():
            h.update(name.encode() + b"\0" + Path(path).read_bytes())
    return h.hexdigest()


def fingerprint(parts: dict[str, Any]) -> str:
    """sha256 of a JSON-able description of everything the run's result depends on."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


@dataclass
class Progress:
    """Where a stage stands after ``epoch`` finished epochs."""

    epoch: int
    history: list[dict[str, float]] = field(default_factory=list)
    best: float = -1.0
    best_epoch: int = 0
    train_time: float = 0.0
    train_images: int = 0
    batch_size: int = 0  # the batch the state trained with (optim.batch_size auto resolves it)


# --------------------------------------------------------------------------- RNG


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, pystate, pygauss = random.getstate()
    meta = {"numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
            "python": [version, list(pystate), pygauss]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    cuda = sorted((k for k in tensors if k.startswith("rng/cuda/")),
                  key=lambda k: int(k.rsplit("/", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    kind, keys, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, pystate, pygauss = meta["python"]
    random.setstate((version, tuple(pystate), pygauss))


# --------------------------------------------------------------------------- optimizer


def flatten_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer state dict as (tensors, JSON): tensors keyed ``optim/<param>/<name>``."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for name, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{idx}/{name}"] = value
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _param_key(idx: str) -> int | str:
    # A plain optimizer keys its state by parameter index, a gathered FSDP one by name.
    return int(idx) if idx.isdigit() else idx


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int | str, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, idx, name = key.split("/", 2)
            state.setdefault(_param_key(idx), {})[name] = value
    for idx, values in meta["scalars"].items():
        state.setdefault(_param_key(idx), {}).update(values)
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


# --------------------------------------------------------------------------- the store


class ResumeStore:
    """``root/stageN/`` holding one stage's latest end-of-epoch state."""

    def __init__(self, root: str | Path, stage: int, key: str) -> None:
        self.dir = Path(root) / f"stage{stage}"
        self.stage = stage
        self.key = key
        self.ignored = False  # set when the ranks of a run disagree on the state (`ignore`)

    def _own_meta(self) -> dict[str, Any] | None:
        """The state's JSON when it belongs to this run (nothing else read), else None."""
        if self.ignored:
            return None
        try:
            meta = json.loads((self.dir / META).read_text())
        except (OSError, ValueError):
            return None
        if meta.get("format") != FORMAT or meta.get("fingerprint") != self.key:
            return None
        return meta

    def saved_epoch(self) -> int | None:
        """The epoch a state of this run was saved after; None without one."""
        meta = self._own_meta()
        return None if meta is None else int(meta["epoch"])

    def ignore(self) -> None:
        """Start over: `load` and `saved_batch` see no state (the next save replaces it)."""
        self.ignored = True

    def save(self, progress: Progress, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: Any, scaler: torch.amp.GradScaler,
             extra: dict[str, torch.Tensor] | None = None, base: Base | None = None,
             full: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None) -> None:
        """``extra``: more tensors to keep (e.g. the best epoch's weights), returned by load.
        ``base``: keep only the model tensors that differ from it (the frozen CLIP tower and
        base weights are rebuilt by the resumed run's own setup, which the fingerprint pins).
        ``full``: the model's and the optimizer's state dicts gathered in full, where the model
        holds shards (`cdsam.training.sharding`)."""
        model_sd, optim_sd = full or (model.state_dict(), optimizer.state_dict())
        state = model_sd if base is None else split_state(model, base, model_sd)[0]
        tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in state.items()}
        tensors.update({k: v.detach().cpu().contiguous() for k, v in (extra or {}).items()})
        opt_t, opt_meta = flatten_optimizer(optim_sd)
        tensors.update({k: v.detach().cpu().contiguous() for k, v in opt_t.items()})
        rng_t, rng_meta = rng_state()
        tensors.update(rng_t)
        meta = {
            "format": FORMAT, "fingerprint": self.key, "stage": self.stage,
            "epoch": progress.epoch, "history": progress.history, "best": progress.best,
            "best_epoch": progress.best_epoch,
            "train_time": progress.train_time, "train_images": progress.train_images,
            "batch_size": progress.batch_size, "optimizer": opt_meta, "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "rng": rng_meta,
        }
        with io.atomic_dir(self.dir) as tmp:
            save_file(tensors, str(tmp / TENSORS), metadata={"format": FORMAT})
            (tmp / META).write_text(json.dumps(meta, indent=1))

    def saved_batch(self) -> int | None:
        """The batch size of a state that belongs to this run (read from its JSON alone), so
        ``optim.batch_size: auto`` resumes with it instead of measuring again; None without
        one."""
        meta = self._own_meta()
        return None if meta is None else int(meta.get("batch_size") or 0) or None

    def load(self) -> tuple[Progress, dict[str, torch.Tensor], dict[str, Any]] | None:
        """The saved state if it belongs to this exact run, else None (stale state removed)."""
        meta_path, tensor_path = self.dir / META, self.dir / TENSORS
        if self.ignored or not meta_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            tensors = load_file(str(tensor_path))
        except (OSError, ValueError, SafetensorError) as exc:
            log.warning("discarding unreadable resume state %s (%s)", self.dir, exc)
            self.clear()
            return None
        if meta.get("format") != FORMAT or meta.get("fingerprint") != self.key:
            log.info("discarding stale resume state %s (params, parent checkpoint, code or data "
                     "changed since it was written)", self.dir)
            self.clear()
            return None
        progress = Progress(epoch=int(meta["epoch"]), history=list(meta["history"]),
                            best=float(meta["best"]),
                            best_epoch=int(meta.get("best_epoch", 0)),
                            train_time=float(meta["train_time"]),
                            train_images=int(meta["train_images"]),
                            batch_size=int(meta.get("batch_size") or 0))
        return progress, tensors, meta

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                scaler: torch.amp.GradScaler, base: Base | None = None) -> None:
        state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
        result = load_state(model, state)
        # What the state left out must be base tensors the resumed run already rebuilt.
        names = canonical_names(model)
        lost = [k for k in result.missing_keys if base is None or names[k] not in base.digests]
        if result.unexpected_keys or lost:
            raise RuntimeError(f"resume state {self.dir} does not fit the model (missing "
                               f"{lost[:3]}, unexpected {result.unexpected_keys[:3]})")
        load_optimizer_state(model, optimizer, unflatten_optimizer(tensors, meta["optimizer"]))
        scheduler.load_state_dict(meta["scheduler"])
        if meta["scaler"]:
            scaler.load_state_dict(meta["scaler"])
        set_rng_state(tensors, meta["rng"])

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
