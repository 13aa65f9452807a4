"""Does a checkpoint's DINO carry what the text asks for? Probes on the synthetic scenes.

For every positive sample of a prepared synthetic set (the prompts name a colour and a shape),
the 3 × 3 patch-token window around the object's centre patch is what a decoder query could
read about the object. A probe (linear, then a 256-wide MLP) is fitted on the train split's
windows and scored on val: accuracy at naming the object's **shape** and its **colour**,
next to the same probe on raw pixels (the 3 × 3 window of patches, flattened) and the share of
the most common class (chance).

    python tools/shape_probe.py models/stage1 models/stage4                  # data/prepared
    python tools/shape_probe.py models/stage4 --data ../bigger/data/prepared  # more scenes

The checkpoints' DINO runs on the images as stored (their size must be the model's input).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

# This checkout's cdsam (the code beside the tool), not whichever one is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cdsam.checkout import require_checkout

require_checkout(__file__)

from cdsam.data.manifest import FOREGROUND
from cdsam.data.packed import normalize_batch
from cdsam.data.prepared import PreparedSplit
from cdsam.data.sources.synthetic import COLOURS, SHAPES, attributes
from cdsam.entry import offline_defaults
from cdsam.models.checkpoint import load_checkpoint

PROBE_STEPS = 400


def load_split(root: Path, split: str, patch: int) -> dict[str, torch.Tensor]:
    """Images (B×H×W×3 uint8), per object: its image, centre patch (row, col), shape, colour."""
    p = PreparedSplit.open(root, split)
    images = p.image_rows(np.arange(len(p.image_keys))).transpose(0, 2, 3, 1)
    image_of, centre, shape, colour = [], [], [], []
    positive = np.flatnonzero(~p.df["negative"].to_numpy())
    for i, mask in zip(positive, p.masks(positive), strict=True):
        ys, xs = np.nonzero(mask == FOREGROUND)
        c, s = attributes(p.prompts[i])
        image_of.append(int(p.image_row[i]))
        centre.append((int(ys.mean()) // patch, int(xs.mean()) // patch))
        colour.append(list(COLOURS).index(c))
        shape.append(SHAPES.index(s))
    return {"images": torch.from_numpy(np.ascontiguousarray(images)),
            "image_of": torch.tensor(image_of),
            "centre": torch.tensor(centre), "shape": torch.tensor(shape),
            "colour": torch.tensor(colour)}


def pixel_grid(images: torch.Tensor, patch: int) -> torch.Tensor:
    """B×H×W×3 uint8 → B×n×n×(3·patch²) raw patches in [0, 1]."""
    x = images.permute(0, 3, 1, 2).float() / 255
    u = x.unfold(2, patch, patch).unfold(3, patch, patch)  # B C n n p p
    b, _, n = u.shape[:3]
    return u.permute(0, 2, 3, 1, 4, 5).reshape(b, n, n, -1)


@torch.no_grad()
def token_grid(model: torch.nn.Module, images: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    """B×H×W×3 uint8 → B×n×n×C DINO patch tokens (the decoder's input)."""
    x = normalize_batch(images.permute(0, 3, 1, 2).contiguous())
    tokens = torch.cat([model.encode_image(x[i:i + chunk]) for i in range(0, len(x), chunk)])
    n = int(round(tokens.shape[1] ** 0.5))
    return tokens.reshape(len(x), n, n, -1)


def windows(grid: torch.Tensor, image_of: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """The 3 × 3 cells around each object's centre patch (zero beyond the border), flattened."""
    g = torch.nn.functional.pad(grid.permute(0, 3, 1, 2), (1, 1, 1, 1)).permute(0, 2, 3, 1)
    cells = [g[image_of, centre[:, 0] + dy, centre[:, 1] + dx]
             for dy in range(3) for dx in range(3)]
    return torch.cat(cells, 1)


def probe_accuracy(x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor,
                   y_val: torch.Tensor, hidden: int | None) -> float:
    """Val accuracy of a linear (``hidden`` None) or one-hidden-layer probe, full-batch Adam."""
    torch.manual_seed(0)
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_val = (x_train - mu) / sd, (x_val - mu) / sd
    k = int(max(y_train.max(), y_val.max())) + 1
    net = torch.nn.Linear(x_train.shape[1], k) if hidden is None else torch.nn.Sequential(
        torch.nn.Linear(x_train.shape[1], hidden), torch.nn.GELU(), torch.nn.Linear(hidden, k))
    opt = torch.optim.Adam(net.parameters(), 3e-3, weight_decay=1e-3)
    for _ in range(PROBE_STEPS):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x_train), y_train).backward()
        opt.step()
    with torch.no_grad():
        return (net(x_val).argmax(1) == y_val).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="*", type=Path, help="stage checkpoint folders")
    ap.add_argument("--data", type=Path, default=Path("data/prepared"),
                    help="a prepared synthetic set (default data/prepared)")
    args = ap.parse_args()
    offline_defaults()
    models = [load_checkpoint(c)[0].eval() for c in args.checkpoints]
    patch = models[0].patch_size if models else 8
    train, val = (load_split(args.data, s, patch) for s in ("train", "val"))
    print(f"{args.data}: {len(train['shape'])} train / {len(val['shape'])} val objects, "
          f"patch {patch}")
    sources = {"raw pixels": lambda ims: pixel_grid(ims, patch)}
    for path, model in zip(args.checkpoints, models, strict=True):
        sources[str(path)] = lambda ims, m=model: token_grid(m, ims)
    chance = {t: torch.bincount(val[t]).max().item() / len(val[t]) for t in ("shape", "colour")}
    print(f"{'features':<24}{'shape lin':>10}{'shape mlp':>10}{'colour lin':>11}{'colour mlp':>11}")
    print(f"{'chance':<24}{chance['shape']:>10.3f}{chance['shape']:>10.3f}"
          f"{chance['colour']:>11.3f}{chance['colour']:>11.3f}")
    for name, features in sources.items():
        xt = windows(features(train["images"]), train["image_of"], train["centre"])
        xv = windows(features(val["images"]), val["image_of"], val["centre"])
        accs = [probe_accuracy(xt, train[t], xv, val[t], h)
                for t in ("shape", "colour") for h in (None, 256)]
        print(f"{name:<24}{accs[0]:>10.3f}{accs[1]:>10.3f}{accs[2]:>11.3f}{accs[3]:>11.3f}")


if __name__ == "__main__":
    main()
