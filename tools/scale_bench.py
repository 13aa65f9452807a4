"""What a dataset's size costs: prepare, files, bytes, a stage's start, an epoch, memory, DVC.

For each size it makes a small DVC project from a cdsam checkout (``--code``, default this one:
its ``cdsam/``, ``stages/``, ``dvc.yaml``, ``data/raw``, ``weights``), sets synthetic scenes of
``--size`` px with ~5 prompts each (4-6 objects, one absent-object negative), and measures:

- ``prepare s``: ``dvc repro prepare`` (the stage, and DVC hashing and caching its output);
- ``files`` / ``MB``: what ``data/prepared`` holds;
- ``setup s``: stage 1's data setup (opening, or decoding, train + val) in a fresh process;
- ``steps s``: the first ``--epoch-steps`` steps of its first epoch, batch ``--batch`` (a tiny
  model: the step is the same at every size, so this shows what the data path adds as the set
  grows);
- ``peak RSS MB`` of that process (memory-mapped pages it touched count: up to
  ``data.memory_mb`` a split is mapped; ``--memory-mb 0`` reads every row from disk);
- ``status s`` / ``noop repro s``: ``dvc status`` and ``dvc repro prepare`` with nothing to do.

    python tools/scale_bench.py --images 2000 8000 32000                   # this checkout
    python tools/scale_bench.py --images 2000 8000 32000 --code /tmp/old   # a before

Run it on an idle machine (2 cores: a test run beside it doubles every figure).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
COPY = ("cdsam", "stages", "dvc.yaml", "data/raw", "weights", "pyproject.toml")

# Stage 1 in a fresh process: its data setup alone (as the checkout's trainer does it: decode
# and pack each split before, open the shards after), the trainer's whole setup, the first
# epoch's steps, and the process's peak RSS.
DRIVER = r"""
import json, resource, sys, time
from pathlib import Path
try:
    import cdsam.training.trainer as T
    from cdsam.config.stage_view import load_stage_params
except ImportError:  # a --code checkout from before the package's folders
    import cdsam.train as T
    from cdsam.stage_params import load_stage_params

steps = int(sys.argv[1])
params = load_stage_params("stage1", "params.yaml")
data = Path("data/prepared")
t = time.perf_counter()
for split in ("train", "val"):
    if hasattr(T, "pack_split"):  # before: every stage decoded and fitted every split
        T.pack_split(T.ManifestDataset(data, split, params.data), params.data.memory_mb)
    else:
        T.PreparedSplit.open(data, split, params.data)
data_s = time.perf_counter() - t
paths = T.StagePaths(data=data, out=Path("models/stage1"), metrics=Path("metrics/stage1"),
                     resume=Path(".cdsam/resume"))
if hasattr(T, "TrainerOptions"):
    trainer = T.StageTrainer(params, 1, paths, T.TrainerOptions(show_progress=False))
else:
    trainer = T.StageTrainer(params, 1, paths, show_progress=False)
t = time.perf_counter()
trainer.setup()
setup_all = time.perf_counter() - t
loader = trainer.train_loader
loader.set_epoch(0)
(getattr(trainer, "train_mode", None) or getattr(trainer, "_set_train_mode"))()
t = time.perf_counter()
done = 0
for batch in loader:
    if done == steps:
        break
    trainer.train_step(batch).item()
    done += 1
print(json.dumps({"setup_s": data_s, "setup_all_s": setup_all,
                  "epoch_s": time.perf_counter() - t, "steps": done,
                  "samples": len(trainer.train_set),
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE)
    return time.perf_counter() - t


def project(code: Path, work: Path, images: int, size: int, batch: int,
            memory_mb: int | None = None) -> Path:
    """A git + DVC project holding ``code``'s pipeline, set to ``images`` scenes."""
    repo = work / f"n{images}"
    shutil.rmtree(repo, ignore_errors=True)
    repo.mkdir(parents=True)
    for rel in COPY:
        src = code / rel
        if src.is_dir():
            shutil.copytree(src, repo / rel, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.is_file():
            shutil.copy2(src, repo / rel)
    params = yaml.safe_load((code / "params.yaml").read_text())
    params["prepare"]["synthetic"].update(num_images=images, image_size=size, min_objects=4,
                                          max_objects=6)
    params["prepare"]["negatives_per_image"] = 1
    params["data"].update(fit="pad", resize=size, crop=size)
    params["model"]["dino"].update(img_size=size, patch_size=16, embed_dim=32, depth=2,
                                   num_heads=2)
    params["optim"]["batch_size"] = batch
    if memory_mb is not None:
        params["data"]["memory_mb"] = memory_mb
    params["stage1"]["epochs"] = 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"],
                ["git", "add", "-A"], ["git", "-c", "user.name=b", "-c", "user.email=b@b",
                                       "commit", "-qm", "bench"]):
        subprocess.run(cmd, cwd=repo, check=True, stdout=subprocess.DEVNULL)
    return repo


def measure(code: Path, work: Path, images: int, size: int, batch: int, steps: int,
            memory_mb: int | None = None) -> dict[str, float]:
    repo = project(code, work, images, size, batch, memory_mb)
    env = {**os.environ, "PYTHONPATH": str(repo), "DVC_NO_ANALYTICS": "1",
           "HF_HUB_OFFLINE": "1"}
    row: dict[str, float] = {"images": images}
    row["prepare_s"] = _run(["dvc", "repro", "-q", "prepare"], repo, env)
    files = [f for f in (repo / "data" / "prepared").rglob("*") if f.is_file()]
    row["files"] = len(files)
    row["mb"] = sum(f.stat().st_size for f in files) / 2**20
    out = subprocess.run([sys.executable, "-c", DRIVER, str(steps)], cwd=repo, env=env,
                         check=True, capture_output=True, text=True)
    row.update(json.loads(out.stdout.strip().splitlines()[-1]))
    row["status_s"] = _run(["dvc", "status"], repo, env)
    row["noop_repro_s"] = _run(["dvc", "repro", "-q", "prepare"], repo, env)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, nargs="+", default=[2000, 8000, 32000])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--code", type=Path, default=ROOT, help="the cdsam checkout to measure")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epoch-steps", type=int, default=50)
    ap.add_argument("--memory-mb", type=int, default=None,
                    help="data.memory_mb (default: params.yaml's; 0 reads every row from disk)")
    ap.add_argument("--work", type=Path, default=None, help="scratch (default: a temp folder)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="cdsam-scale-"))
    rows = []
    print(f"code {args.code.resolve()} at {args.size}px, batch {args.batch}, "
          f"{args.epoch_steps} steps, data.memory_mb "
          f"{'as in params.yaml' if args.memory_mb is None else args.memory_mb}")
    print(f"{'images':>7} {'samples':>8} {'prepare s':>10} {'files':>7} {'MB':>8} "
          f"{'setup s':>8} {'steps s':>8} {'peak RSS MB':>12} {'status s':>9} "
          f"{'noop repro s':>13}", flush=True)
    for n in args.images:
        r = measure(args.code.resolve(), work, n, args.size, args.batch, args.epoch_steps,
                    args.memory_mb)
        rows.append(r)
        print(f"{n:>7} {r['samples']:>8} {r['prepare_s']:>10.1f} {r['files']:>7} "
              f"{r['mb']:>8.0f} {r['setup_s']:>8.2f} {r['epoch_s']:>8.1f} {r['rss_mb']:>12.0f} "
              f"{r['status_s']:>9.1f} {r['noop_repro_s']:>13.1f}", flush=True)
        shutil.rmtree(work / f"n{n}", ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
