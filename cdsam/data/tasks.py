"""One image's work for ``prepare`` and ``cdsam data check``, and the process pool that runs it.

A source lists its images first (cheap: names, split, the annotations of that image) as
:class:`Task` objects; each task's ``load`` decodes the image and builds its masks. Loading,
fitting and encoding run in ``prepare.workers`` processes, results come back in task order, so
what is written does not depend on the number of workers.
"""

from __future__ import annotations

import ctypes
import itertools
import multiprocessing
import signal
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from PIL import Image

from cdsam.data.manifest import BadFiles, Sample
from cdsam.runtime import usable_cores

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class Item:
    """A decoded image and its samples; ``instances``: one mask per object where the source
    has objects (a class's sample is the union of its instances)."""

    image: Image.Image
    samples: list[Sample]
    instances: list[Sample] = field(default_factory=list)


@dataclass(frozen=True)
class Task:
    """What a worker needs to load one image: ``load(*args, bad=...)`` → Item, or None after
    reporting a bad file (a module-level function, so it travels to worker processes)."""

    stem: str
    split: str
    load: Callable[..., Item | None]
    args: tuple = ()
    keep_image: bool = False  # prepare also saves the image itself (synthetic test scenes)

    def run(self, bad: BadFiles) -> Item | None:
        return self.load(*self.args, bad=bad)


def resolve_workers(workers: int | None) -> int:
    """``prepare.workers``: null or 0 = the cores available."""
    return workers if workers and workers > 0 else usable_cores()


def _worker_start() -> None:
    # A worker dies with prepare, even killed by SIGKILL (it would otherwise wait on its
    # queue for ever, holding memory).
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    # Each worker fits one image at a time; torch's own thread pool in every worker would
    # oversubscribe the cores the pool already uses.
    import torch

    torch.set_num_threads(1)


def pool_map(fn: Callable[[T], R], items: Iterable[T], workers: int, total: int
             ) -> Iterator[R]:
    """``fn`` over ``items``, in order, on ``workers`` processes (1: in this one). At most a
    few items per worker are in flight, so results never pile up ahead of the writer (at a
    1024 crop each is ~4 MB). An exception in a worker is raised here, as in one process."""
    if workers <= 1 or total <= 1:
        yield from map(fn, items)
        return
    # fork: the workers start at once and inherit what the listing built; each one only ever
    # runs numpy, PIL and single-threaded torch, as a DataLoader worker does.
    ctx = multiprocessing.get_context("fork")
    window = 4 * workers
    it = iter(items)
    # An executor, not multiprocessing.Pool: a task that raises leaves its worker alive and
    # the pool usable, a worker that dies (the OOM killer) fails the run with
    # BrokenProcessPool instead of a wait for ever, and shutting down never kills a worker
    # mid-write on the result queue (Pool.terminate() can, and then hangs in its join).
    pool = ProcessPoolExecutor(min(workers, total), mp_context=ctx, initializer=_worker_start)
    pending: deque[Future] = deque()
    try:
        pending.extend(pool.submit(fn, x) for x in itertools.islice(it, window))
        while pending:
            result = pending.popleft().result()
            for x in itertools.islice(it, 1):
                pending.append(pool.submit(fn, x))
            yield result
    finally:
        # A failed task, or a caller that stops early: nothing more is submitted, the tasks
        # in flight finish (at most ``window``), then the workers exit and are joined.
        pool.shutdown(wait=True, cancel_futures=True)
