"""How much a click can say about a target: the evaluation click (one uniformly drawn target
pixel) against each positive mask, at the model's input size, for the embedded default and the
real image sets in ../shared/real-data.

    python tools/click_geometry.py                     # data and model as in params.yaml
    python tools/click_geometry.py --crop 224 --patch 14 --radius 1

Per set, over the positive samples of every split (prepared into a temporary folder with the
params' fit): the target's share of the labelled pixels, its connected pieces (8-connected), the
share of the target in the piece the click is on, and the click's disk (``model.sam.click_radius``
tokens of ``patch`` pixels: what the prompt map marks) against the target — the share of the
disk on the target, the share of the target under the disk, and their IoU. A click can single
out one object of a scene; it cannot say where the other pieces of a many-piece target are, and
a disk that already covers most of a large target adds little the text did not.

Needs scipy for the connected pieces (in the ``dev`` extra).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

# This checkout's cdsam (the code beside the tool), not whichever one is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cdsam.checkout import require_checkout

require_checkout(__file__)

from cdsam.config.parse import load_params
from cdsam.config.schema import DataConfig, PrepareConfig
from cdsam.data.manifest import FOREGROUND, IGNORE
from cdsam.data.prepare import prepare
from cdsam.data.prepared import PreparedSplit, read_index
from cdsam.data.spatial import CLICK, sample_prompts

REAL = Path(__file__).resolve().parents[2] / "shared" / "real-data"


def sources(params_prepare: PrepareConfig) -> dict[str, PrepareConfig]:
    """The default's own source, and each real set that is present."""
    out = {"default (synthetic)": params_prepare}
    em, voc = REAL / "isbi2012-em", REAL / "voc-samples"
    if em.is_dir():
        out["EM membranes (a cell)"] = PrepareConfig(
            source="folders", images=str(em / "images"), masks=str(em / "masks"),
            mask_format="binary", prompt="a cell", negatives="none")
    if voc.is_dir():
        out["VOC samples (classes)"] = PrepareConfig(source="voc", root=str(voc),
                                                    negatives="none")
    return out


def disk(shape: tuple[int, int], x: float, y: float, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (xx + 0.5 - (x + 0.5)) ** 2 + (yy + 0.5 - (y + 0.5)) ** 2 <= radius ** 2


def figures(root: Path, radius_px: float) -> dict[str, float]:
    from scipy import ndimage

    rows = {k: [] for k in ("share", "pieces", "clicked_piece", "disk_on_target",
                            "target_in_disk", "disk_iou")}
    for split in read_index(root)["splits"]:
        pack = PreparedSplit.open(root, split)
        positives = np.flatnonzero(~pack.df["negative"].to_numpy())
        masks = pack.masks(positives)
        for k, mask in zip(positives.tolist(), masks, strict=True):
            target = mask == FOREGROUND
            labelled = mask != IGNORE
            x, y = sample_prompts(mask, CLICK, seed=k)["points"][0].tolist()
            pieces, count = ndimage.label(target, structure=np.ones((3, 3)))
            d = disk(mask.shape, x, y, radius_px) & labelled
            on = (d & target).sum()
            rows["share"].append(target.sum() / labelled.sum())
            rows["pieces"].append(count)
            rows["clicked_piece"].append((pieces == pieces[int(y), int(x)]).sum() / target.sum())
            rows["disk_on_target"].append(on / d.sum())
            rows["target_in_disk"].append(on / target.sum())
            rows["disk_iou"].append(on / (d | target).sum())
    out = {"positives": len(rows["share"])}
    out["share_median"] = float(np.median(rows["share"]))
    out["pieces_mean"] = float(np.mean(rows["pieces"]))
    out["one_piece"] = float(np.mean(np.array(rows["pieces"]) == 1))
    for key in ("clicked_piece", "disk_on_target", "target_in_disk", "disk_iou"):
        out[key] = float(np.mean(rows[key]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--crop", type=int, help="input size (default data.crop)")
    ap.add_argument("--patch", type=int, help="DINO patch (default model.dino.patch_size)")
    ap.add_argument("--radius", type=float, help="click disk in tokens (model.sam.click_radius)")
    args = ap.parse_args()
    p = load_params(args.params)
    crop = args.crop or p.data.crop
    patch = args.patch or p.model.dino.patch_size or 16
    radius = args.radius if args.radius is not None else p.model.sam.click_radius
    data = DataConfig(fit=p.data.fit, resize=crop if p.data.fit == "pad" else p.data.resize,
                      crop=crop)
    print(f"input {crop} px, fit {data.fit}, patch {patch} px: a {crop // patch}x{crop // patch} "
          f"token grid; click disk radius {radius:g} tokens = {radius * patch:g} px")
    header = (f"{'set':<24}{'positives':>10}{'target share':>13}{'pieces':>8}{'1 piece':>8}"
              f"{'clicked piece':>14}{'disk on tgt':>12}{'tgt in disk':>12}{'disk IoU':>9}")
    print(header)
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in sources(p.prepare).items():
            root = Path(tmp) / name.split()[0]
            prepare(cfg, p.seed, root, show_progress=False, data=data)
            f = figures(root, radius * patch)
            print(f"{name:<24}{f['positives']:>10}{f['share_median']:>13.2f}"
                  f"{f['pieces_mean']:>8.1f}{f['one_piece']:>8.2f}{f['clicked_piece']:>14.2f}"
                  f"{f['disk_on_target']:>12.2f}{f['target_in_disk']:>12.2f}"
                  f"{f['disk_iou']:>9.2f}")


if __name__ == "__main__":
    main()
