"""Peak memory of `cdsam predict` on large images, whole and tiled.

Writes ``--images`` photos-sized images (``--width`` × ``--height``, smooth random colours) and
runs ``cdsam predict`` on them with ``--prompts`` prompts (the checkpoint's own vocabulary,
repeated when it has fewer), in a fresh process per case, with the cdsam of a checkout
(``--code``, default this one), and prints wall time and that process's peak RSS:

- ``whole``: every image through the model at the training geometry, logits back at full size;
- ``tiled``: ``--tile`` windows overlapping by ``--overlap``, blended.

    python tools/predict_memory.py --checkpoint models/stage4                   # this checkout
    python tools/predict_memory.py --checkpoint models/stage4 --code /tmp/old   # a before

Run it on an idle machine (2 cores: a test run beside it skews every figure).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

RUN = r"""
import resource, sys
# This checkout's cdsam (the code beside the tool), not whichever one is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cdsam.checkout import require_checkout

require_checkout(__file__)

from cdsam.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    if e.code:
        raise
print("PEAK_RSS_MB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def write_images(folder: Path, n: int, width: int, height: int) -> None:
    """Smooth colour fields (a low-resolution random image, upscaled): PNG-compressible, so
    writing them is quick, and every pixel differs."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((width, height), Image.BILINEAR).save(
            folder / f"large{i:02d}.png", compress_level=1)


def vocabulary(checkpoint: Path, n: int) -> list[str]:
    known = json.loads((checkpoint / "meta.json").read_text()).get("prompts") or ["a thing"]
    return [known[i % len(known)] + ("" if i < len(known) else f" ({i})") for i in range(n)]


def measure(code: Path, checkpoint: Path, images: Path, prompts: list[str], out: Path,
            extra: list[str]) -> tuple[float, float]:
    args = ["predict", "--checkpoint", str(checkpoint), "--input", str(images), "--out",
            str(out), "--batch-size", "8", "--no-progress", *extra]
    for p in prompts:
        args += ["--prompt", p]
    env = {**os.environ, "PYTHONPATH": str(code)}
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", RUN, *args], env=env, capture_output=True,
                         text=True, cwd=code)
    wall = time.perf_counter() - t0
    if res.returncode:
        raise SystemExit(f"cdsam predict failed:\n{res.stderr[-2000:]}")
    peak = float(res.stdout.split("PEAK_RSS_MB")[-1])
    return wall, peak


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--code", type=Path, default=ROOT, help="the cdsam checkout to measure")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--width", type=int, default=4000)
    ap.add_argument("--height", type=int, default=3000)
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--tile", type=int, default=1024)
    ap.add_argument("--overlap", type=int, default=128)
    args = ap.parse_args()
    checkpoint = args.checkpoint.resolve()
    prompts = vocabulary(checkpoint, args.prompts)
    mp = args.width * args.height / 1e6
    print(f"code {args.code.resolve()}: {args.images} images of {args.width}x{args.height} "
          f"({mp:.0f} MP) x {len(prompts)} prompts, batch 8")
    print(f"{'case':<24} {'wall s':>8} {'peak RSS MB':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_images(work / "images", args.images, args.width, args.height)
        for name, extra in (("whole", []),
                            (f"tiled {args.tile}/{args.overlap}",
                             ["--tile", str(args.tile), "--overlap", str(args.overlap)])):
            wall, peak = measure(args.code.resolve(), checkpoint, work / "images", prompts,
                                 work / name.split()[0], extra)
            print(f"{name:<24} {wall:>8.1f} {peak:>12.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
