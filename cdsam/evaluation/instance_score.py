"""A checkpoint's instance figures on the held-out split: the instance heads' objects
(`cdsam.inference.instances`) and, from the same text-only pass, the components baseline,
both scored against the split's objects (`cdsam.evaluation.instance_metrics`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from cdsam.config.schema import EvaluateConfig, InstanceConfig
from cdsam.data.manifest import FOREGROUND
from cdsam.data.prepared import PreparedSplit
from cdsam.evaluation.instance_metrics import InstanceScores, choose_min_quality
from cdsam.inference.instances import Instances, decode_instances, mask_components
from cdsam.inference.overlay import PALETTE, captioned, denormalize, outline, tint
from cdsam.models.forward import PrefixCache
from cdsam.models.model import CDSAM
from cdsam.models.objective import Objective
from cdsam.runtime import Precision

COMPONENTS = "components"  # evaluate.json key of the baseline's figures


@dataclass
class InstanceResult:
    figures: dict[str, Any]  # the heads' figures, the baseline's under COMPONENTS
    decoder_rows: int = 0  # seeds decoded over the split (one decoder row each)
    pairs: int = 0
    shown: dict[int, tuple[np.ndarray, Instances]] = field(default_factory=dict)  # overlays


def truth_objects(split: PreparedSplit, row: int) -> np.ndarray:
    """KxCxC bool: sample ``row``'s objects."""
    pairs = split.objects[row]
    if not len(pairs):
        return np.zeros((0, split.crop, split.crop), bool)
    return split.decode(pairs[:, 0], pairs[:, 1]) == FOREGROUND


@dataclass
class Pair:
    """One (image, prompt) of a split as the instance figures read it."""

    row: int  # its sample row
    truth: np.ndarray  # KxCxC bool objects
    found: Instances  # the heads' objects
    components: Instances  # the baseline's
    ignore: np.ndarray  # CxC bool


@torch.no_grad()
def instance_pairs(model: CDSAM, loader: Iterable[dict[str, Any]], split: PreparedSplit,
                   objective: Objective, precision: Precision, cfg: InstanceConfig,
                   threshold: float, budget: int, cache: PrefixCache | None = None,
                   show: Iterable[int] = (), progress: bool = True,
                   ) -> Iterator[tuple[Pair, np.ndarray | None]]:
    """Every (image, prompt) of ``loader`` (text prompts, as the semantic figures): its
    objects from the heads and from the components of the semantic mask (``threshold``),
    with, for the sample rows in ``show``, its image (HxWx3 uint8) for an overlay.
    ``cache``: the training run's DINO prefix cache (its batches may carry no pixels)."""
    model.eval()
    show = set(show)
    dev = precision.device
    start = 0 if cache is None else cache.end_block
    for batch in tqdm(loader, desc="instances", leave=False, disable=not progress):
        images = batch["image"].to(dev, non_blocking=True)
        image_of = batch.get("image_of")
        extra = {} if image_of is None else {"image_of": image_of.to(dev)}
        with precision.autocast():
            prefix = None if cache is None else cache.lookup(
                batch["image_key"], images, lambda x: model.dino_prefix(x, start))
            text, _ = objective.step_text(model, batch["prompt"], None)
            if text is None:
                text = model.clip_text(batch["prompt"])
            out = model(images, batch["prompt"], prefix=prefix, start_block=start, text=text,
                        **extra)
            found = decode_instances(model, out, text.to(out.tokens.dtype),
                                     tuple(images.shape[-2:]), cfg, threshold, budget=budget)
        probs = torch.sigmoid(out.masks[:, 0].float()).cpu().numpy()
        ignore = (batch["valid"][:, 0] == 0).cpu().numpy()
        for j, i in enumerate(batch["index"].tolist()):
            pair = Pair(i, truth_objects(split, i), found[j],
                        mask_components(probs[j], threshold, found[j].presence, cfg.min_area),
                        ignore[j])
            rgb = None
            if i in show:
                k = j if image_of is None else int(image_of[j])
                rgb = denormalize(batch["image"][k].cpu())
            yield pair, rgb


def score_instances(model: CDSAM, loader: Iterable[dict[str, Any]], split: PreparedSplit,
                    objective: Objective, precision: Precision, ev: EvaluateConfig,
                    presence_threshold: float, min_quality: float,
                    show: Iterable[int] = ()) -> InstanceResult:
    """The split's instance figures at the deployment thresholds; ``show``: sample rows whose
    image and objects are kept for the overlay."""
    heads = InstanceScores(presence_threshold, min_quality)
    comps = InstanceScores(presence_threshold, min_quality)
    result = InstanceResult({})
    for pair, rgb in instance_pairs(model, loader, split, objective, precision, ev.instances,
                                    ev.threshold, ev.batch_size, show=show):
        image, prompt = int(split.image_row[pair.row]) + 1, split.prompts[pair.row]
        result.decoder_rows += pair.found.decoder_rows
        result.pairs += 1
        heads.add(image, prompt, pair.truth, pair.found, pair.ignore)
        comps.add(image, prompt, pair.truth, pair.components, pair.ignore)
        if rgb is not None:
            result.shown[pair.row] = (rgb, pair.found)
    base = comps.figures()
    result.figures = {**heads.figures(),
                      COMPONENTS: {k: base[k] for k in ("ap", "ap50", "count_mae", "pmf1")}}
    return result


def instance_panel(rgb: np.ndarray, found: Instances, presence_threshold: float,
                   min_quality: float, caption: str, scale: int = 3) -> Image.Image:
    """The returned objects, one colour each with a white outline, and their count."""
    img = rgb
    kept = found.kept(presence_threshold, min_quality)
    for n, m in enumerate(found.masks[kept]):
        img = tint(img, m, PALETTE[n % len(PALETTE)], alpha=0.6)
        img[outline(m)] = (255, 255, 255)
    return captioned(img, f"{caption[:28]}: {int(kept.sum())} (p {found.presence:.2f})", scale)


def choose_thresholds(model: CDSAM, loader: Iterable[dict[str, Any]], split: PreparedSplit,
                      objective: Objective, precision: Precision, cfg: InstanceConfig,
                      threshold: float, budget: int, presence_threshold: float,
                      cache: PrefixCache | None = None) -> tuple[float, float]:
    """(min_quality, its cgF1) on ``split`` (val): what a training stage stores."""
    pairs = [(p.truth, p.found) for p, _ in instance_pairs(
        model, loader, split, objective, precision, cfg, threshold, budget, cache,
        progress=False)]
    return choose_min_quality(pairs, presence_threshold)
