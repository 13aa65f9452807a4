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

``--workers 1 2`` prepares each size once per ``prepare.workers`` value (``dvc repro -f
prepare``: a speed knob reruns nothing by itself) and says whether ``data/prepared`` came out
the same (the md5 DVC records). ``--source folders`` first writes the scenes as image and
indexed-mask PNG files under ``data/raw`` and prepares those, as a user's folders;
``--append 10`` then adds 10 scenes after them and prepares again: which files of
``data/prepared`` changed (DVC stores and pushes only those).

    python tools/scale_bench.py --images 2000 8000 32000                   # this checkout
    python tools/scale_bench.py --images 2000 8000 32000 --code /tmp/old   # a before
    python tools/scale_bench.py --images 8000 --workers 1 2                # the pool
    python tools/scale_bench.py --images 32000 --source folders --append 10 --epoch-steps 0

Run it on an idle machine (2 cores: a test run beside it doubles every figure).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# The folders source's scenes come from this checkout's generator.
sys.path.insert(0, str(ROOT))
from cdsam.checkout import require_checkout  # noqa: E402

require_checkout(__file__)

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


def _scenes(args: tuple[str, int, int, int, int]) -> None:
    """Write scenes ``lo..hi`` as image and indexed-mask PNGs (runs in a pool)."""
    raw, lo, hi, size, seed = args
    import numpy as np
    from PIL import Image

    from cdsam.config.schema import SyntheticConfig
    from cdsam.data.sources.synthetic import COMBOS, make_scene, prompt_for

    index = {prompt_for(c, s): k + 1 for k, (c, s) in enumerate(COMBOS)}
    cfg = SyntheticConfig(num_images=hi, image_size=size, min_objects=4, max_objects=6)
    for i in range(lo, hi):
        image, samples = make_scene(seed, i, cfg)
        labels = np.zeros((size, size), np.uint8)
        for sample in samples:  # visible parts: they never overlap
            labels[sample.mask == 1] = index[sample.prompt]
        image.save(f"{raw}/images/scene{i:06d}.png", compress_level=1)
        Image.fromarray(labels).save(f"{raw}/masks/scene{i:06d}.png")


def write_scenes(raw: Path, lo: int, hi: int, size: int, seed: int = 0) -> None:
    (raw / "images").mkdir(parents=True, exist_ok=True)
    (raw / "masks").mkdir(parents=True, exist_ok=True)
    step = 500
    parts = [(str(raw), a, min(a + step, hi), size, seed) for a in range(lo, hi, step)]
    with multiprocessing.get_context("spawn").Pool() as pool:
        pool.map(_scenes, parts)


def class_names() -> list[str]:
    from cdsam.data.sources.synthetic import COMBOS

    return [f"{c} {s}" for c, s in COMBOS]


def _prepared_files(repo: Path) -> dict[str, str]:
    """data/prepared's files → md5, as DVC recorded them (its .dir listing in the cache)."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    md5 = next(o["md5"] for o in lock["stages"]["prepare"]["outs"]
               if o["path"] == "data/prepared")
    listing = repo / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
    return {e["relpath"]: e["md5"] for e in json.loads(listing.read_text())}


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE)
    return time.perf_counter() - t


def project(code: Path, work: Path, images: int, size: int, batch: int,
            memory_mb: int | None = None, source: str = "synthetic") -> Path:
    """A git + DVC project holding ``code``'s pipeline, set to ``images`` scenes (generated
    by prepare, or written as files first)."""
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
    if source == "folders":
        write_scenes(repo / "data" / "raw" / "scenes", 0, images, size)
        params["prepare"].update(source="folders", images="data/raw/scenes/images",
                                 masks="data/raw/scenes/masks", mask_format="indexed",
                                 classes=class_names(), prompt_template="a {}")
    params["stage1"]["epochs"] = 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"],
                ["git", "add", "-A"], ["git", "-c", "user.name=b", "-c", "user.email=b@b",
                                       "commit", "-qm", "bench"]):
        subprocess.run(cmd, cwd=repo, check=True, stdout=subprocess.DEVNULL)
    return repo


def _set_workers(repo: Path, workers: int) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["prepare"]["workers"] = workers
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def measure(code: Path, work: Path, images: int, size: int, batch: int, steps: int,
            memory_mb: int | None = None, workers: list[int] | None = None,
            source: str = "synthetic", append: int = 0) -> dict[str, float]:
    repo = project(code, work, images, size, batch, memory_mb, source)
    env = {**os.environ, "PYTHONPATH": str(repo), "DVC_NO_ANALYTICS": "1",
           "HF_HUB_OFFLINE": "1"}
    row: dict = {"images": images}
    for k, w in enumerate(workers or [None]):
        if w is not None:
            _set_workers(repo, w)
        force = ["-f"] if k else []  # prepare.workers is no DVC param: nothing reruns by itself
        row.setdefault("prepare_by_workers", {})[str(w)] = _run(
            ["dvc", "repro", "-q", *force, "prepare"], repo, env)
        row.setdefault("prepared_md5", {})[str(w)] = yaml.safe_load(
            (repo / "dvc.lock").read_text())["stages"]["prepare"]["outs"][0]["md5"]
    row["prepare_s"] = next(iter(row["prepare_by_workers"].values()))
    files = [f for f in (repo / "data" / "prepared").rglob("*") if f.is_file()]
    row["files"] = len(files)
    row["mb"] = sum(f.stat().st_size for f in files) / 2**20
    index = json.loads((repo / "data" / "prepared" / "index.json").read_text())
    row["train_shards"] = len(index["splits"]["train"].get("shards", [None]))
    out = subprocess.run([sys.executable, "-c", DRIVER, str(steps)], cwd=repo, env=env,
                         check=True, capture_output=True, text=True)
    row.update(json.loads(out.stdout.strip().splitlines()[-1]))
    row["status_s"] = _run(["dvc", "status"], repo, env)
    row["noop_repro_s"] = _run(["dvc", "repro", "-q", "prepare"], repo, env)
    if append:
        before = _prepared_files(repo)
        write_scenes(repo / "data" / "raw" / "scenes", images, images + append, size)
        row["append_prepare_s"] = _run(["dvc", "repro", "-q", "prepare"], repo, env)
        after = _prepared_files(repo)
        row["append_changed"] = sorted(f for f in after if before.get(f) != after[f])
        row["append_unchanged_mb"] = sum(
            (repo / "data" / "prepared" / f).stat().st_size for f in after
            if before.get(f) == after[f]) / 2**20
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
    ap.add_argument("--workers", type=int, nargs="+", default=None,
                    help="prepare each size once per prepare.workers value (default: once, "
                         "as params.yaml says)")
    ap.add_argument("--source", choices=("synthetic", "folders"), default="synthetic",
                    help="folders: write the scenes as PNG files first and prepare those")
    ap.add_argument("--append", type=int, default=0,
                    help="--source folders: then add this many scenes and prepare again")
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
    if args.append and args.source != "folders":
        ap.error("--append needs --source folders (synthetic scenes are numbered, not added)")
    for n in args.images:
        r = measure(args.code.resolve(), work, n, args.size, args.batch, args.epoch_steps,
                    args.memory_mb, args.workers, args.source, args.append)
        rows.append(r)
        print(f"{n:>7} {r['samples']:>8} {r['prepare_s']:>10.1f} {r['files']:>7} "
              f"{r['mb']:>8.0f} {r['setup_s']:>8.2f} {r['epoch_s']:>8.1f} {r['rss_mb']:>12.0f} "
              f"{r['status_s']:>9.1f} {r['noop_repro_s']:>13.1f}", flush=True)
        if args.workers:
            md5s = set(r["prepared_md5"].values())
            print("        prepare s by prepare.workers: " + ", ".join(
                f"{w}: {t:.1f}" for w, t in r["prepare_by_workers"].items())
                + f"; data/prepared {'identical' if len(md5s) == 1 else 'DIFFERS'} "
                  f"({', '.join(sorted(md5s))}); train split in {r['train_shards']} shards",
                flush=True)
        if args.append:
            print(f"        +{args.append} images: prepare {r['append_prepare_s']:.1f} s; "
                  f"changed {len(r['append_changed'])} files ({', '.join(r['append_changed'])});"
                  f" {r['append_unchanged_mb']:.0f} MB unchanged", flush=True)
        shutil.rmtree(work / f"n{n}", ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
