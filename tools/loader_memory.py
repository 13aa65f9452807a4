"""Peak memory of the training data path, per-sample (DataLoader + collate, each image kept
decoded after its first fetch) against packed uint8 arrays (`cdsam.data.packed`), in RAM and
memory-mapped from disk (``data.memory_mb: 0``), and packed in this one process (no decoding
workers: the "before" of the decode time).

    python tools/loader_memory.py --images 2000 --size 224 --size 518 --work /tmp/loader-mem

For each size it prepares the synthetic set once (``--work/<size>``, reused when present), then
measures each path in a fresh interpreter: the peak RSS over two epochs of training batches
(train split, batch 16, spatial prompts on as in the default) minus the RSS before the data was
touched (torch and cdsam already imported), so the figure is what the data costs. ``anon MB``:
anonymous (not file-backed) resident memory after the epochs, minus the same before; memory-
mapped pages are file-backed (the kernel may drop them), so they count in RSS only.
``decode s``: packing, every image decoded and fitted once (by worker processes, one per
core, unless the mode says otherwise; their memory is theirs and not in the figures); the
per-sample path decodes during its first epoch instead. Torch ops on one thread, batch 16.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

MODES = ("per-sample", "packed-one-process", "packed", "packed-on-disk")


def status_mb(field: str = "VmRSS") -> float:
    """A /proc/self/status memory line in MB (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure(mode: str, data: Path, size: int) -> dict:
    import torch
    from torch.utils.data import DataLoader, DistributedSampler

    from cdsam.config import DataConfig
    from cdsam.data.dataset import EpochSampler, ManifestDataset, collate
    from cdsam.data.packed import PackedLoader, pack_split
    from cdsam.data.spatial import SpatialPolicy

    torch.set_num_threads(1)
    cfg = DataConfig(fit="pad", resize=size, crop=size)
    policy = SpatialPolicy(point=0.25, box=0.25)
    base, base_anon = status_mb(), status_mb("RssAnon")
    t0 = time.perf_counter()
    ds = ManifestDataset(data, "train", cfg, seed=0, spatial=policy)
    sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=1)
    if mode == "per-sample":
        loader = DataLoader(ds, batch_size=16, sampler=EpochSampler(sampler), collate_fn=collate)
        pack_s = 0.0
    else:
        pack = pack_split(ds, memory_mb=0 if mode == "packed-on-disk" else 1 << 20,
                          workers=0 if mode == "packed-one-process" else None)
        pack_s = time.perf_counter() - t0
        loader = PackedLoader(pack, 16, torch.device("cpu"), sampler=sampler, spatial=policy)
    n = sum(b["image"].shape[0] for b in loader)
    first_epoch = time.perf_counter() - t0
    t0 = time.perf_counter()
    n = sum(b["image"].shape[0] for b in loader)
    second_epoch = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "size": size, "samples": n,
            "images": int(ds.df["image"].nunique()), "data_peak_mb": peak - base,
            "data_anon_mb": status_mb("RssAnon") - base_anon,
            "decode_s": pack_s, "first_epoch_s": first_epoch, "epoch_s": second_epoch}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--size", type=int, action="append", help="image size (repeatable)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/cdsam-loader-mem"))
    ap.add_argument("--measure", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.data, args.size[0])))
        return
    from cdsam.config import PrepareConfig, SyntheticConfig
    from cdsam.data.prepare import prepare

    rows = []
    for size in args.size or [224]:
        data = args.work / f"{args.images}x{size}"
        if not (data / "manifest.csv").is_file():
            print(f"preparing {args.images} synthetic images at {size}² in {data} ...",
                  file=sys.stderr, flush=True)
            prepare(PrepareConfig(synthetic=SyntheticConfig(num_images=args.images,
                                                            image_size=size)),
                    seed=0, out=data, show_progress=False)
        for mode in MODES:
            out = subprocess.run(
                [sys.executable, __file__, "--measure", mode, "--data", str(data),
                 "--size", str(size)], check=True, capture_output=True, text=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"})
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"{'size':>6} {'path':<19}{'images':>8}{'samples':>9}{'data peak MB':>14}"
          f"{'anon MB':>9}{'decode s':>10}{'s/1000 img':>12}{'1st epoch s':>13}{'epoch s':>9}")
    for r in rows:
        per_k = f"{1000 * r['decode_s'] / r['images']:.2f}" if r["decode_s"] else "-"
        print(f"{r['size']:>6} {r['mode']:<19}{r['images']:>8}{r['samples']:>9}"
              f"{r['data_peak_mb']:>14.0f}{r['data_anon_mb']:>9.0f}{r['decode_s']:>10.1f}"
              f"{per_k:>12}{r['first_epoch_s']:>13.1f}{r['epoch_s']:>9.1f}")


if __name__ == "__main__":
    main()
