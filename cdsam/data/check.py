"""What a source holds, per split, before anything is written: ``cdsam data check``, and the
summary ``prepare`` logs of what it read.

Per split: images, samples (positives, negatives), classes with their sample counts and pixel
shares, empty masks (a mask the source holds with no foreground pixel), images with no object,
instances; for the whole source the problems (unreadable files, masks of another size, bad
annotations, duplicated stems, missing files) and the images no annotation names. A source with
a problem, or a required split without samples, fails the check.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from cdsam.config.schema import PrepareConfig
from cdsam.data.manifest import FOREGROUND, PROBLEM_KINDS, BadFiles, Problem
from cdsam.data.sources.listing import source_tasks
from cdsam.data.tasks import Item, Task, pool_map

SPLIT_ORDER = ("train", "val", "test")


@dataclass
class ItemStats:
    """One image's figures, computed where it was loaded (a worker)."""

    pixels: int
    samples: list[tuple[str, int, bool]]  # (prompt, foreground pixels, an absent-class draw)
    instances: int = 0


def item_stats(item: Item) -> ItemStats:
    w, h = item.image.size
    return ItemStats(w * h, [(s.prompt, int(np.count_nonzero(s.mask == FOREGROUND)), s.absent)
                             for s in item.samples], len(item.instances))


@dataclass
class SplitStats:
    images: int = 0
    samples: int = 0
    positives: int = 0
    negatives: int = 0
    empty_masks: int = 0  # source masks with no foreground pixel (absent draws not counted)
    no_objects: int = 0  # images with no positive sample
    instances: int = 0
    pixels: int = 0
    classes: dict[str, list[int]] = field(default_factory=dict)  # prompt -> [samples, pixels]

    def add(self, stats: ItemStats) -> None:
        self.images += 1
        self.pixels += stats.pixels
        self.instances += stats.instances
        positives = 0
        for prompt, fg, absent in stats.samples:
            self.samples += 1
            counts = self.classes.setdefault(prompt, [0, 0])
            if fg:
                positives += 1
                counts[0] += 1
                counts[1] += fg
            else:
                self.negatives += 1
                self.empty_masks += not absent
        self.positives += positives
        self.no_objects += positives == 0

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "classes"}
        out["classes"] = {p: {"samples": n, "pixel_share": px / self.pixels if self.pixels
                              else 0.0} for p, (n, px) in sorted(self.classes.items())}
        return out


@dataclass
class DataReport:
    source: str
    required: list[str]
    splits: dict[str, SplitStats] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    unannotated: list[str] = field(default_factory=list)  # image files no annotation names
    stems: dict[str, list[str]] = field(default_factory=dict)  # stem -> splits it is in

    def add(self, task: Task, stats: ItemStats) -> None:
        self.splits.setdefault(task.split, SplitStats()).add(stats)
        self.stems.setdefault(task.stem, []).append(task.split)

    def extend(self, problems: Iterable[Problem]) -> None:
        self.problems.extend(problems)

    def listed(self, bad: BadFiles) -> None:
        """What the source's listing found: its bad files, and the images it leaves out."""
        self.extend(bad.problems)
        self.unannotated += [n.path for n in bad.notes]

    @property
    def duplicated_stems(self) -> dict[str, list[str]]:
        """Stems of more than one prepared image (their samples would share ids)."""
        return {s: sp for s, sp in sorted(self.stems.items()) if len(sp) > 1}

    @property
    def empty_splits(self) -> list[str]:
        return [s for s in self.required if not self.splits.get(s, SplitStats()).samples]

    @property
    def ok(self) -> bool:
        return not (self.problems or self.duplicated_stems or self.empty_splits)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source, "ok": self.ok,
            "splits": {s: self.splits[s].to_dict() for s in SPLIT_ORDER if s in self.splits},
            "problems": [asdict(p) for p in self.problems]
            + [{"kind": "duplicate", "path": s, "reason": f"stem in {' and '.join(sp)}"}
               for s, sp in self.duplicated_stems.items()],
            "empty_splits": self.empty_splits,
            "unannotated": self.unannotated,
        }

    def render(self) -> str:
        """The report as a few aligned lines (a table per split, then the problems)."""
        cols = ("images", "samples", "positives", "negatives", "empty_masks", "no_objects",
                "instances")
        order = [s for s in SPLIT_ORDER if s in self.splits]
        lines = [f"prepare.source {self.source}: "
                 f"{sum(s.images for s in self.splits.values())} images"]
        lines.append("split  " + "  ".join(f"{c.replace('_', ' '):>11}" for c in cols))
        for split in order:
            st = self.splits[split]
            lines.append(f"{split:<5}  " + "  ".join(f"{getattr(st, c):>11}" for c in cols))
        # Classes with an object somewhere (one only ever drawn as a negative says nothing).
        prompts = sorted({p for s in self.splits.values() for p, (n, _) in s.classes.items()
                          if n})
        if prompts:
            width = max(len(p) for p in prompts)
            lines.append(f"{'class':<{width}}  " + "  ".join(
                f"{s + ' samples, pixels':>22}" for s in order))
            for p in prompts:
                cells = []
                for split in order:
                    st = self.splits[split]
                    n, px = st.classes.get(p, [0, 0])
                    cells.append(f"{n:>10}, {100 * px / max(st.pixels, 1):>8.2f} %")
                lines.append(f"{p:<{width}}  " + "  ".join(f"{c:>22}" for c in cells))
        problems = self.to_dict()["problems"]
        if problems:
            lines.append(f"problems ({len(problems)}):")
            for kind in PROBLEM_KINDS:
                lines += [f"  {kind:<10}  {p['path']}: {p['reason']}" for p in problems
                          if p["kind"] == kind]
        if self.unannotated:
            shown = ", ".join(self.unannotated[:5])
            more = f" and {len(self.unannotated) - 5} more" if len(self.unannotated) > 5 else ""
            lines.append(f"not prepared, no annotation names them ({len(self.unannotated)}): "
                         f"{shown}{more}")
        for split in self.empty_splits:
            lines.append(f"split {split!r} has no samples (prepare.val_fraction / "
                         f"prepare.test_fraction)")
        lines.append("ok" if self.ok else "not ok")
        return "\n".join(lines)


def _check_one(task: Task) -> tuple[ItemStats | None, list[Problem]]:
    bad = BadFiles("collect")
    item = task.run(bad)
    return (None if item is None else item_stats(item)), bad.problems


def check_source(cfg: PrepareConfig, seed: int, workers: int = 1, show_progress: bool = True
                 ) -> DataReport:
    """Read every file of ``cfg``'s source as ``prepare`` would, write nothing, and report."""
    bad = BadFiles("collect")
    tasks, required = source_tasks(cfg, seed, bad)
    report = DataReport(cfg.source, required)
    report.listed(bad)
    results = pool_map(_check_one, tasks, workers, len(tasks))
    for task, (stats, problems) in zip(tasks, tqdm(results, total=len(tasks),
                                                   desc=f"check {cfg.source}",
                                                   disable=not show_progress), strict=True):
        report.extend(problems)
        if stats is not None:
            report.add(task, stats)
    return report
