"""Can a random-init backbone *learn* shape from the synthetic scenes, and how fast?

The shape probe (`tools/shape_probe.py`) asks whether trained tokens carry shape. This asks the
question before it: given direct supervision — every patch-grid cell labelled with the shape of
the object covering it (background, circle, square, triangle) — how quickly does a backbone
trained from random init learn to name the shape under each cell? The default's DINO ViT (from
params.yaml, random init, trained whole with a linear head per token) is compared with a small
CNN (half the parameters) that ends on the same grid. Accuracy is over object pixels of the val
split (the token's prediction painted over its patch), printed after each epoch, with the wall
time.

    python tools/shape_learnability.py                       # data/prepared, both backbones
    python tools/shape_learnability.py --data ../bigger/data/prepared --epochs 6
    python tools/shape_learnability.py --backbone dino --set depth=4 embed_dim=64 num_heads=2

(A bigger set: a clone with ``prepare.synthetic.num_images: 2400`` in params.yaml, after
``dvc repro prepare``.) If the DINO cannot learn the labels here, no loss on masks will teach
it shape in the default's budget either; if the CNN can, the scenes are not the
obstacle.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

# This checkout's cdsam (the code beside the tool), not whichever one is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cdsam.checkout import require_checkout

require_checkout(__file__)

from cdsam.config.parse import parse_params, read_params_file
from cdsam.data.manifest import FOREGROUND
from cdsam.data.packed import normalize_batch
from cdsam.data.prepared import PreparedSplit
from cdsam.data.sources.synthetic import SHAPES, attributes
from cdsam.entry import run
from cdsam.errors import UserError
from cdsam.models.dino import build_dino, dino_patch_size, dino_patch_tokens

CLASSES = 1 + len(SHAPES)  # background first
BACKGROUND_WEIGHT = 0.2  # background covers most pixels; it must not drown the shapes


def load_labels(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised images Bx3xHxW and per-pixel labels BxHxW (0 background, 1 + shape index)."""
    p = PreparedSplit.open(root, split)
    images = p.image_rows(np.arange(len(p.image_keys)))
    labels = np.zeros((len(images), *images.shape[2:]), np.int64)
    positive = np.flatnonzero(~p.df["negative"].to_numpy())
    for i, mask in zip(positive, p.masks(positive), strict=True):
        labels[p.image_row[i]][mask == FOREGROUND] = 1 + SHAPES.index(attributes(p.prompts[i])[1])
    return normalize_batch(torch.from_numpy(images)), torch.from_numpy(labels)


class TokenClassifier(nn.Module):
    """The DINO with a linear head on each patch token; logits painted over their patches."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit
        self.head = nn.Sequential(nn.LayerNorm(vit.embed_dim), nn.Linear(vit.embed_dim, CLASSES))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens, (h, w) = dino_patch_tokens(self.vit, images)
        cells = self.head(tokens).transpose(1, 2).reshape(len(images), CLASSES, h, w)
        return F.interpolate(cells, size=images.shape[-2:], mode="nearest")


class ConvReference(nn.Module):
    """Eight 3×3 conv layers (three at stride 2) to the same grid as a patch-8 ViT."""

    def __init__(self, stride: int) -> None:
        super().__init__()
        halvings = int(math.log2(stride))  # on layers 1, 3, 5, ...: stride 8 → three
        layers, width = [], 3
        for i, out in enumerate((32, 64, 64, 96, 96, 96, 96, 96)):
            step = 2 if i % 2 == 1 and i // 2 < halvings else 1
            layers += [nn.Conv2d(width, out, 3, step, 1), nn.BatchNorm2d(out), nn.ReLU()]
            width = out
        self.body = nn.Sequential(*layers, nn.Conv2d(width, CLASSES, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.body(images), size=images.shape[-2:], mode="nearest")


@torch.no_grad()
def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    net.eval()
    pred = torch.cat([net(x[i:i + 64]).argmax(1) for i in range(0, len(x), 64)])
    net.train()
    objects = y > 0
    return (pred[objects] == y[objects]).float().mean().item()


def train(name: str, net: nn.Module, data: dict[str, tuple[torch.Tensor, torch.Tensor]],
          epochs: int, lr: float, batch: int) -> None:
    (xt, yt), (xv, yv) = data["train"], data["val"]
    weight = torch.tensor([BACKGROUND_WEIGHT] + [1.0] * len(SHAPES))
    opt = torch.optim.AdamW(net.parameters(), lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    params = sum(p.numel() for p in net.parameters())
    print(f"{name}: {params / 1e6:.2f} M params, lr {lr}, batch {batch}; chance ≈ "
          f"{torch.bincount(yv[yv > 0]).max().item() / int((yv > 0).sum()):.3f}")
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), batch):
            idx = order[i:i + batch]
            loss = F.cross_entropy(net(xt[idx]), yt[idx], weight=weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"  epoch {epoch:>2}: train {accuracy(net, xt[:300], yt[:300]):.3f}  "
              f"val {accuracy(net, xv, yv):.3f}  ({time.perf_counter() - start:.0f} s)",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("data/prepared"),
                    help="a prepared synthetic set (default data/prepared)")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--backbone", choices=("dino", "cnn", "both"), default="both")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="override model.dino keys for this run, e.g. depth=4 patch_size=4")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    torch.manual_seed(0)
    # --set goes through cdsam.config like params.yaml does: typed, unknown keys named.
    raw = read_params_file(args.params)
    dino = raw.setdefault("model", {}).setdefault("dino", {})
    for item in args.set:
        key, _, value = item.partition("=")
        if not value:
            raise UserError(f"--set {item}: not a model.dino key=value")
        dino[key] = yaml.safe_load(value)
    dino.update(pretrained=False, checkpoint=None)
    dino_cfg = parse_params(raw).model.dino
    if not (args.data / "samples.csv").is_file():
        raise UserError(f"--data {args.data}: no samples.csv (a prepared synthetic set, as "
                        f"`dvc repro prepare` writes)")
    data = {s: load_labels(args.data, s) for s in ("train", "val")}
    print(f"{args.data}: {len(data['train'][0])} train / {len(data['val'][0])} val images")
    if args.backbone in ("dino", "both"):
        vit = build_dino(dino_cfg, load_weights=False)
        train(f"DINO {dino_cfg.name} (patch {dino_patch_size(vit)}, width {vit.embed_dim}, "
              f"depth {len(vit.blocks)})", TokenClassifier(vit), data, args.epochs, args.lr,
              args.batch)
    if args.backbone in ("cnn", "both"):
        torch.manual_seed(0)
        train("CNN reference", ConvReference(dino_cfg.patch_size or 8), data, args.epochs,
              args.lr, args.batch)


if __name__ == "__main__":
    run(main, "shape_learnability")
