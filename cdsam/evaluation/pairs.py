"""Prompt pairs in one image: does each prompt find its own object, and do the two masks differ?

Two positive prompts of one scene (e.g. "a red circle" and "a red square") must give two
different masks; on the synthetic scenes also split by whether the pair shares a colour or a
shape, so the text alone must decide.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import torch

from cdsam.data.sources.synthetic import attributes


def pair_rows(samples: pd.DataFrame) -> list[tuple[int, int]]:
    """Every two positive samples of one image as row-index pairs of the split's sample table
    (``negative``, ``image`` columns), image by image."""
    pos = samples[~samples["negative"]]
    return [pair for _, rows in pos.groupby("image", sort=True)
            for pair in itertools.combinations(rows.index.tolist(), 2)]


def pair_relation(a: str, b: str) -> str | None:
    """``same_colour`` / ``same_shape`` for two synthetic prompts that share exactly one of the
    two words, ``None`` otherwise (other data sources have no such vocabulary)."""
    pa, pb = attributes(a), attributes(b)
    if pa is None or pb is None:
        return None
    if pa[0] == pb[0] and pa[1] != pb[1]:
        return "same_colour"
    if pa[1] == pb[1] and pa[0] != pb[0]:
        return "same_shape"
    return None


class PairOverlaps:
    """The IoU between the two predicted masks of each pair, computed as the masks arrive in
    split order: a mask is held only until the last pair it belongs to is scored (pairs lie
    within one image, so memory stays flat in the split's size)."""

    def __init__(self, pairs: list[tuple[int, int]]) -> None:
        self.pairs = pairs
        self.of_row: dict[int, list[int]] = {}
        for k, (a, b) in enumerate(pairs):
            self.of_row.setdefault(a, []).append(k)
            self.of_row.setdefault(b, []).append(k)
        self.pending = {row: len(ks) for row, ks in self.of_row.items()}
        self.live: dict[int, torch.Tensor] = {}
        self.overlaps: list[float | None] = [None] * len(pairs)
        self.peak = 0  # most masks held at once

    def add(self, row: int, mask: torch.Tensor) -> None:
        """``mask``: sample ``row``'s thresholded HxW bool mask."""
        if row not in self.of_row:
            return
        self.live[row] = mask
        self.peak = max(self.peak, len(self.live))
        for k in self.of_row[row]:
            a, b = self.pairs[k]
            if a in self.live and b in self.live and self.overlaps[k] is None:
                inter = (self.live[a] & self.live[b]).sum().item()
                union = (self.live[a] | self.live[b]).sum().item()
                self.overlaps[k] = inter / union if union else 1.0
                for r in (a, b):
                    self.pending[r] -= 1
                    if not self.pending[r]:
                        del self.live[r]


def prompt_pairs(overlaps: PairOverlaps, ious: list[float], prompts: list[str],
                 ) -> dict[str, float]:
    """``overlaps`` fed every sample's mask, ``ious`` and ``prompts`` per sample in split
    order. ``pairs_miou``: mean IoU of each paired prompt's mask with its truth;
    ``pairs_overlap``: mean IoU between the two predicted masks (1.0 when both are empty);
    ``pairs``: how many pairs; ``pairs_overlap_same_colour`` / ``_same_shape`` on synthetic
    scenes.
    """
    pairs = overlaps.pairs
    if not pairs:
        return {"pairs": 0, "pairs_miou": 0.0, "pairs_overlap": 0.0}
    if any(o is None for o in overlaps.overlaps):
        raise ValueError("prompt_pairs: some pairs' masks never arrived")
    by_relation: dict[str, list[float]] = {"all": []}
    for (a, b), overlap in zip(pairs, overlaps.overlaps, strict=True):
        by_relation["all"].append(overlap)
        relation = pair_relation(prompts[a], prompts[b])
        if relation:
            by_relation.setdefault(relation, []).append(overlap)
    rows = sorted({r for pair in pairs for r in pair})
    out = {"pairs": len(pairs), "pairs_miou": float(np.mean([ious[r] for r in rows])),
           "pairs_overlap": float(np.mean(by_relation["all"]))}
    for relation in ("same_colour", "same_shape"):
        if relation in by_relation:
            out[f"pairs_overlap_{relation}"] = float(np.mean(by_relation[relation]))
    return out
