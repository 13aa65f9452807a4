"""A training step never reads a value back from the device (issue 28).

On a GPU every such read (``.item()``, ``bool(t)``, ``nonzero``, boolean-mask indexing) makes
the host wait until the device has finished all queued work, so the next kernels are launched
into an empty queue. The CPU cannot show the wait, but it can show the ops: a dispatch mode
records every op that needs a tensor's values on the host, over forward + backward of real
training batches with clicks, boxes and text-only rows mixed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cdsam.training.trainer import StagePaths, StageTrainer, TrainerOptions
from tests.conftest import prepare_tiny, tiny_params

aten = torch.ops.aten
# Ops whose result depends on tensor values the host must read (a device sync on CUDA).
READS_VALUES = {aten._local_scalar_dense.default, aten.nonzero.default,
                aten.masked_select.default, aten.is_nonzero.default, aten.equal.default,
                aten._unique2.default, aten.unique_consecutive.default}


class HostReads(TorchDispatchMode):
    """Records ops that read tensor values on the host, with the shapes they were called on."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        bool_index = func is aten.index.Tensor and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ()))
        if func in READS_VALUES or bool_index:
            self.seen.append(str(func))
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return prepare_tiny(tmp_path_factory.mktemp("data") / "prepared")


def _trainer(data_dir: Path, tmp: Path, feature_cache: bool) -> StageTrainer:
    params = tiny_params(device="cpu", optim={"batch_size": 8},
                         train={"point_prompts": 0.5, "box_prompts": 0.5,
                                "feature_cache": feature_cache},
                         loss={"clip_align_weight": 0.1})
    paths = StagePaths(data=data_dir, out=tmp / "stage1", metrics=tmp / "metrics",
                       resume=tmp / "resume")
    trainer = StageTrainer(params, 1, paths, TrainerOptions(show_progress=False))
    trainer.setup()
    return trainer


@pytest.mark.parametrize("feature_cache", [True, False])
def test_forward_and_backward_read_nothing_back(data_dir, tmp_path, feature_cache):
    trainer = _trainer(data_dir, tmp_path, feature_cache)
    trainer.train_mode()
    batches = list(trainer.train_loader)
    rows = np.concatenate([b["spatial_rows"] for b in batches])
    assert rows.any() and not rows.all()  # both decoder paths: prompted and text-only rows
    for batch in batches:
        with HostReads() as reads:
            loss, _ = trainer.compute_loss(batch)
            loss.backward()
        assert reads.seen == [], reads.seen
    assert torch.isfinite(loss)


def test_a_batch_without_the_host_plan_gives_the_same_loss(data_dir, tmp_path):
    """Batches collated on the host (no ``spatial_rows``) are split from their slots."""
    trainer = _trainer(data_dir, tmp_path, feature_cache=True)
    trainer.model.eval()
    batch = next(iter(trainer.train_loader))
    with torch.no_grad():
        planned, _ = trainer.compute_loss(batch)
        unplanned, _ = trainer.compute_loss(
            {k: v for k, v in batch.items() if k != "spatial_rows"})
    assert torch.equal(planned, unplanned)


def test_the_detector_sees_a_read_back():
    with HostReads() as reads:
        x = torch.arange(4.0)
        bool(x.sum() > 1)
        x[x > 1]
    assert len(reads.seen) == 2
