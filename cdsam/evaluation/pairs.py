"""Prompt pairs in one image: does each prompt find its own object, and do the two masks differ?

Two positive prompts of one scene (e.g. "a red circle" and "a red square") must give two
different masks; on the synthetic scenes also split by whether the pair shares a colour or a
shape, so the text alone must decide.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from cdsam.data.synthetic import attributes
from cdsam.evaluation.scoring import EvalResult


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


def prompt_pairs(res: EvalResult, pairs: list[tuple[int, int]], prompts: list[str],
                 ) -> dict[str, float]:
    """``res`` holds per-sample IoU and masks in split order (``keep_masks=True``), ``prompts``
    each sample's prompt. ``pairs_miou``: mean IoU of each paired prompt's mask with its truth;
    ``pairs_overlap``: mean IoU between the two predicted masks (1.0 when both are empty);
    ``pairs``: how many pairs; ``pairs_overlap_same_colour`` / ``_same_shape`` on synthetic
    scenes.
    """
    if not pairs:
        return {"pairs": 0, "pairs_miou": 0.0, "pairs_overlap": 0.0}
    overlaps: dict[str, list[float]] = {"all": []}
    for a, b in pairs:
        inter = (res.masks[a] & res.masks[b]).sum().item()
        union = (res.masks[a] | res.masks[b]).sum().item()
        overlap = inter / union if union else 1.0
        overlaps["all"].append(overlap)
        relation = pair_relation(prompts[a], prompts[b])
        if relation:
            overlaps.setdefault(relation, []).append(overlap)
    rows = sorted({r for pair in pairs for r in pair})
    out = {"pairs": len(pairs), "pairs_miou": float(np.mean([res.ious[r] for r in rows])),
           "pairs_overlap": float(np.mean(overlaps["all"]))}
    for relation in ("same_colour", "same_shape"):
        if relation in overlaps:
            out[f"pairs_overlap_{relation}"] = float(np.mean(overlaps[relation]))
    return out
