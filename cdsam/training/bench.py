"""Benchmark training speed: ``python -m cdsam.training.bench [--json] [--batch-size B]``.

In one run, on the params in ``params.yaml`` (the default config) with a reduced image count
and epoch count, it trains stage 1 and stage 2 with and without the feature cache through the
real training loop and reports the epoch time (epochs after the first), the speedup, the
largest per-step loss difference between the two, CLIP text-tower calls per epoch after the
first, images/s and peak memory. ``--preset dino-heavy`` swaps in a ViT-S-width DINO (384 wide,
depth 8) so DINO dominates the step, as it does with real backbones.

For every run it also splits the time (the "where does a step go" table): the loader alone
(one epoch of batches, made ready on the device, and nothing else), the model step alone
(forward + backward + optimizer on batches already staged on the device) and end to end (the
real epoch), the loader's share of an end-to-end step, and the model FLOPs per image
(counted by ``torch.utils.flop_counter`` over one forward + backward) as FLOP/s end to end
and, given a peak (``--peak-tflops``, or known for the GPU), the model FLOP utilisation.
``--profile DIR`` also runs the staged steps under ``torch.profiler`` (`cdsam.training.profiling`):
a Chrome trace per run in DIR and, per run, the ops that take most of a step, the kernel
launches and host waits per step and the forward / backward / optimizer host time.

``--steps N`` sizes the timing for a GPU: the step alone is timed over N steps after a warm-up
step, and each run trains as many epochs as it takes for the timed epochs (all but the first)
to hold N steps. With ``--compile`` the step alone is timed compiled and eager in the same run
(a compiler failure falls back to eager, and the run says so). With ``--cast-frozen`` it is also
timed with the frozen weights back in fp32, cast by autocast on every use, as before they were
held in bf16 (`cdsam.training.frozen_weights`; GPU runs, nothing is held without autocast).
``--stage4-memory`` trains stage 3, then stage 4 three ways, each in a process of its own so its
peak memory is its own: as params say, with ``train.activation_checkpointing``, and with
``stage4.dino_trainable_blocks`` at ``lora.dino.last_k_blocks``; it reports peak memory, img/s
and whether checkpointing left the weights bit-identical.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import json
import logging
import math
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from cdsam.config.parse import load_params, parse_params
from cdsam.config.schema import Params
from cdsam.config.stages import stage_rule, stages
from cdsam.data.prepare import prepare
from cdsam.entry import offline_defaults
from cdsam.errors import ConfigError
from cdsam.runtime import peak_memory_mb
from cdsam.training.batch_size import REFERENCE_BATCH
from cdsam.training.compiling import is_compiled, uncompile_parts
from cdsam.training.profiling import profile_steps, profile_table, syncs_per_step
from cdsam.training.trainer import EpochHooks, StagePaths, StageTrainer, TrainerOptions

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "default": {},
    # ViT-S width at the default depth/patch/image size: DINO is most of the step.
    "dino-heavy": {"dino": {"embed_dim": 384, "num_heads": 6}},
    # A ViT-B/14-size DINO at 224² (random init), for GPU figures.
    "vitb14-224": {"dino": {"img_size": 224, "patch_size": 14, "embed_dim": 768, "depth": 12,
                            "num_heads": 12},
                   "data": {"resize": 224, "crop": 224}, "synthetic": {"image_size": 224}},
}


# Dense bf16 matrix peak (TFLOP/s) by device name, from the vendors' data sheets (SXM parts).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}
STAGED_BATCHES = 8  # batches pre-staged on the device for the model-step-alone figure
STEP_PASSES = 2  # without --steps: the staged batches this many times for the step alone


def known_peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def batch_size_arg(text: str) -> int | str:
    """``--batch-size``: read as ``optim.batch_size`` is, so the rule lives in cdsam.config."""
    try:
        return parse_params({"optim": {"batch_size": yaml.safe_load(text)}}).optim.batch_size
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc.problems[0]}") from None


def bench_params(params: Params, images: int, epochs: int, preset: str,
                 compile_model: bool = False, batch_size: int | str | None = None) -> Params:
    p = params
    pre = PRESETS[preset]
    syn = dataclasses.replace(p.prepare.synthetic, num_images=images, **pre.get("synthetic", {}))
    prep = dataclasses.replace(p.prepare, source="synthetic", synthetic=syn)
    dino = dataclasses.replace(p.model.dino, **pre.get("dino", {}))
    model = dataclasses.replace(p.model, dino=dino)
    data = dataclasses.replace(p.data, **pre.get("data", {}))
    sections = {f"stage{n}": dataclasses.replace(p.stage(n), epochs=epochs) for n in stages()}
    train = dataclasses.replace(p.train, compile=compile_model or p.train.compile)
    optim = dataclasses.replace(p.optim, batch_size=batch_size or p.optim.batch_size)
    return dataclasses.replace(p, prepare=prep, model=model, data=data, train=train,
                               optim=optim, **sections)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _on_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class TextCalls:
    """CLIP text-encoder calls in each epoch's training steps (epoch hooks): 0 after the first,
    where the text features are cached."""

    def __init__(self) -> None:
        self.per_epoch: list[int] = []
        self._start = 0

    def before(self, trainer: StageTrainer, epoch: int) -> None:
        self._start = trainer.model.clip_text.calls

    def after(self, trainer: StageTrainer, epoch: int, row: dict[str, float]) -> None:
        self.per_epoch.append(trainer.model.clip_text.calls - self._start)


class StepPeak:
    """The largest resident set while training steps run (epoch hooks; Linux CPU runs): the
    kernel's high-water mark is reset before each epoch's steps and read after them, so the
    setup, validation and checkpoint writing do not count."""

    def __init__(self) -> None:
        self.mb = 0.0

    @staticmethod
    def available(device: torch.device) -> bool:
        return device.type == "cpu" and Path("/proc/self/clear_refs").exists()

    def before(self, trainer: StageTrainer, epoch: int) -> None:
        if self.available(trainer.device):
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS

    def after(self, trainer: StageTrainer, epoch: int, row: dict[str, float]) -> None:
        if not self.available(trainer.device):
            return
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                self.mb = max(self.mb, int(line.split()[1]) / 1024)


def _batches(trainer: StageTrainer) -> Iterator[dict[str, Any]]:
    """The training batches as the step receives them, on the device (the packed loader
    already yields them there; the per-sample DataLoader path copies them)."""
    for batch in trainer.train_loader:
        yield _on_device(batch, trainer.device)


def _time_steps(trainer: StageTrainer, staged: list[dict[str, Any]], steps: int) -> float:
    """Images/s of ``steps`` steps over the staged batches (cycled), CUDA-synchronised."""
    dev = trainer.device
    _sync(dev)
    t0 = time.perf_counter()
    m = 0
    for i in range(steps):
        batch = staged[i % len(staged)]
        trainer.train_step(batch)
        m += len(batch["prompt"])  # samples (an image-major batch holds fewer images)
    _sync(dev)
    return m / (time.perf_counter() - t0)


def split_step_time(trainer: StageTrainer, trace: Path | None = None,
                    steps: int | None = None, cast_frozen: bool = False) -> dict[str, Any]:
    """Loader alone, model step alone and FLOPs per image for a trained-and-set-up stage;
    with ``trace``, also the staged steps under the profiler (after the timed ones). A
    compiled trainer's step is timed compiled and then eager; with ``cast_frozen``, last,
    with the held frozen weights released to fp32."""
    dev = trainer.device
    _sync(dev)
    t0 = time.perf_counter()
    n = 0
    for batch in _batches(trainer):
        n += len(batch["prompt"])
    _sync(dev)
    loader_s = time.perf_counter() - t0
    staged = list(islice(_batches(trainer), STAGED_BATCHES))
    trainer.train_mode()
    with FlopCounterMode(display=False) as flops:
        trainer.train_step(staged[0])  # also the warm-up step
    flop_per_image = flops.get_total_flops() / len(staged[0]["prompt"])  # per sample
    timed = steps or STEP_PASSES * len(staged)
    out: dict[str, Any] = {"loader_images_s": n / loader_s,
                           "step_images_s": _time_steps(trainer, staged, timed),
                           "timed_steps": timed, "flop_per_image": flop_per_image,
                           "syncs_per_step": syncs_per_step(trainer.train_step, staged, dev)}
    if trace is not None:
        out["profile"] = profile_steps(trainer.train_step, staged, dev, trace)
    if is_compiled(trainer.model):
        uncompile_parts(trainer.model)
        trainer.train_step(staged[0])  # warm-up, eager
        out["eager_step_images_s"] = _time_steps(trainer, staged, timed)
    if cast_frozen:
        out["frozen_held"] = len(trainer.frozen.held)
        if trainer.frozen.held:
            trainer.frozen.release()
            trainer.train_step(staged[0])  # warm-up with the fp32 weights
            out["cast_frozen_step_images_s"] = _time_steps(trainer, staged, timed)
    return out


def run_stage(params: Params, stage: int, cached: bool, root: Path, parent: Path | None,
              save: bool, per_sample: bool = False, profile_dir: Path | None = None,
              steps: int | None = None, cast_frozen: bool = False,
              out_name: str | None = None) -> dict[str, Any]:
    """One stage through the real trainer, feature cache on or off, batches packed or
    fetched per sample; its checkpoint goes to ``root/out_name`` (default ``stageN``)."""
    train_cfg = dataclasses.replace(params.train, feature_cache=cached)
    p = dataclasses.replace(params, train=train_cfg)
    tag = out_name or f"stage{stage}-{'cached' if cached else 'uncached'}"
    paths = StagePaths(data=root / "data", out=root / (out_name or f"stage{stage}"),
                       metrics=root / "metrics" / tag, parent=parent,
                       resume=root / "resume" / tag)
    text_calls, step_peak = TextCalls(), StepPeak()

    def before(t: StageTrainer, epoch: int) -> None:
        text_calls.before(t, epoch)
        step_peak.before(t, epoch)

    def after(t: StageTrainer, epoch: int, row: dict[str, float]) -> None:
        text_calls.after(t, epoch, row)
        step_peak.after(t, epoch, row)

    hooks = EpochHooks(before_epoch=before, after_train=after)
    trainer = StageTrainer(p, stage, paths, TrainerOptions(
        show_progress=False, pack_batches=not per_sample, hooks=hooks))
    gc.collect()  # the previous run's model and cache must not count towards this one
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()  # peak memory per run, not per process
    t0 = time.perf_counter()
    trainer.setup()
    setup_s = time.perf_counter() - t0
    per_epoch = len(trainer.train_loader)
    if steps:  # enough epochs after the first (untimed) one to hold `steps` steps
        trainer.set_epochs(max(trainer.epochs, 1 + math.ceil(steps / per_epoch)))
    trainer.train()
    if save:
        trainer.save()
    later = trainer.epoch_times[1:] or trainer.epoch_times
    epoch_s = sum(later) / len(later)
    # After save: it trains on, changing the weights.
    compiled = is_compiled(trainer.model)  # train.compile may have fallen back
    split = split_step_time(trainer, None if profile_dir is None else profile_dir / f"{tag}.json",
                            steps, cast_frozen)
    return {
        "setup_s": setup_s, "epoch_s": epoch_s, "steps_per_epoch": per_epoch,
        "epochs": trainer.epochs, "compiled": compiled,
        "images_s": len(trainer.train_set) / epoch_s, **split,
        # Distinct images an epoch trains on, per second (samples/s above counts prompts).
        "distinct_images_s": len(trainer.packs["train"].image_keys) / epoch_s
        if trainer.packs else None,
        "batch_by": p.data.batch_by,
        "packed": bool(trainer.packs), "batch_size": trainer.optim_cfg.batch_size,
        "train_samples": len(trainer.train_set),
        "losses": [x for e in trainer.step_losses for x in e],
        "text_calls_after_first": text_calls.per_epoch[1:],
        "peak_mem_mb": peak_memory_mb(trainer.device),
        # CUDA: the run's peak allocation; CPU: the resident set's peak during the steps.
        "step_peak_mb": step_peak.mb or peak_memory_mb(trainer.device),
        "cache_images": len(trainer.cache) if trainer.cache else 0,
        "start_block": trainer.start_block,
        "trainable_by_component": {k: v["trainable"] for k, v in trainer.counts.items()},
    }


def stage4_variants(params: Params) -> dict[str, Params]:
    """Stage 4 as params say with activation checkpointing off and on, and with only the last
    ``lora.dino.last_k_blocks`` DINO blocks trainable (``stage4.dino_trainable_blocks``)."""
    def with_train(**over: Any) -> Params:
        return dataclasses.replace(params, train=dataclasses.replace(params.train, **over))

    partial = dataclasses.replace(params.stage4,
                                  dino_trainable_blocks=params.lora.dino.last_k_blocks)
    return {"stage4_plain": with_train(activation_checkpointing=False),
            "stage4_ckpt": with_train(activation_checkpointing=True),
            "stage4_partial": dataclasses.replace(
                with_train(activation_checkpointing=False), stage4=partial)}


MMAP_VAR = "MALLOC_MMAP_THRESHOLD_"


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _stage4_child(params: Params, root: str, name: str, per_sample: bool,
                  steps: int | None) -> dict[str, Any]:
    """One stage-4 variant in a process of its own, so its peak memory is its own (on the
    CPU the peak resident set only grows within a process)."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    start = _rss_mb() if sys.platform.startswith("linux") else 0.0
    row = run_stage(params, 4, True, Path(root), Path(root) / "stage3", save=True,
                    per_sample=per_sample, steps=steps, out_name=name)
    row["peak_over_start_mb"] = row["step_peak_mb"] - start \
        if row["step_peak_mb"] > start else row["step_peak_mb"]
    row["weights_sha256"] = hashlib.sha256(
        (Path(root) / name / "model.safetensors").read_bytes()).hexdigest()
    row["trainable_params"] = sum(row.pop("trainable_by_component", {}).values()) or None
    return row


def _parent_dir(root: Path, stage: int) -> Path | None:
    parent = stage_rule(stage).parent
    return None if parent is None else root / f"stage{parent}"


def run_header(params: Params) -> dict[str, Any]:
    """The device and the DINO a result was measured with."""
    d = params.model.dino
    return {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "dino": f"{d.name} img {d.img_size} patch {d.patch_size} dim {d.embed_dim} depth "
                    f"{d.depth}", "last_k_blocks": params.lora.dino.last_k_blocks}


def with_batch_by(params: Params, batch_by: str, batch_size: int) -> Params:
    data = dataclasses.replace(params.data, batch_by=batch_by)
    optim = dataclasses.replace(params.optim, batch_size=batch_size)
    return dataclasses.replace(params, data=data, optim=optim)


def compare_batch_by(params: Params, root: Path, show: bool, steps: int | None,
                     rows: int | str | None = None) -> dict[str, dict[str, Any]]:
    """Stages 2-4 sample-major at ``rows`` (default `REFERENCE_BATCH`) and image-major on one
    prepared set, each stage from the same parent (the sample-major run's checkpoint).
    Image-major batches hold rows / P images (P the mean prompts an image), so both steps
    decode about the same number of samples and the difference is DINO run once per image
    instead of once per prompt."""
    if rows == "auto":
        raise ConfigError(["--batch-by-compare: give --batch-size a number (both modes must "
                           "decode about the same samples a step)"])
    b = REFERENCE_BATCH if rows is None else int(rows)
    from cdsam.data.prepared import PreparedSplit

    split = PreparedSplit.open(root / "data", "train", params.data)
    per_image = len(split) / max(len(split.image_keys), 1)
    images_b = max(1, round(b / per_image))
    results: dict[str, dict[str, Any]] = {}
    if show:
        print("  stage1 ...", file=sys.stderr, flush=True)
    results["stage1"] = run_stage(with_batch_by(params, "sample", b), 1, True, root, None,
                                  save=True, steps=steps, out_name="stage1")
    for stage in (2, 3, 4):
        parent = root / f"stage{stage - 1}"
        for mode, size in (("sample", b), ("image", images_b)):
            if show:
                print(f"  stage{stage} {mode}-major ...", file=sys.stderr, flush=True)
            name = f"stage{stage}" if mode == "sample" else f"stage{stage}-image"
            row = run_stage(with_batch_by(params, mode, size), stage, True, root, parent,
                            save=mode == "sample", steps=steps, out_name=name)
            row["prompts_per_image"] = per_image
            results[f"stage{stage}_{mode}"] = row
    return results


def run(params_path: str, images: int, epochs: int, preset: str, show: bool = True,
        all_stages: bool = False, compile_model: bool = False,
        batch_size: int | str | None = None,
        peak_tflops: float | None = None, per_sample: bool = False,
        profile_dir: Path | None = None, steps: int | None = None,
        cast_frozen: bool = False, stage4_memory: bool = False,
        batch_by_compare: bool = False, negatives_per_image: int | None = None
        ) -> dict[str, Any]:
    params = bench_params(load_params(params_path), images, epochs, preset, compile_model,
                          batch_size)
    if per_sample:  # the per-sample DataLoader yields (image, prompt) rows
        params = dataclasses.replace(params, data=dataclasses.replace(params.data,
                                                                      batch_by="sample"))
    if negatives_per_image is not None:
        params = dataclasses.replace(params, prepare=dataclasses.replace(
            params.prepare, negatives="absent", negatives_per_image=negatives_per_image))
    t_start = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="cdsam-bench-") as tmp:
        root = Path(tmp)
        prepare(params.prepare, params.seed, root / "data", show_progress=False, data=params.data)
        if batch_by_compare:
            results = compare_batch_by(params, root, show, steps, batch_size)
            return batch_by_summary(params, preset, images, epochs, results,
                                    time.perf_counter() - t_start)
        for stage in (1, 2):
            parent = _parent_dir(root, stage)
            for cached in (False, True):
                key = f"stage{stage}_{'cached' if cached else 'uncached'}"
                if show:
                    print(f"  {key} ...", file=sys.stderr, flush=True)
                # The cached runs write the checkpoints the next stage starts from.
                keep = cached and (stage == 1 or stage4_memory)
                results[key] = run_stage(params, stage, cached, root, parent,
                                         save=all_stages or keep,
                                         per_sample=per_sample, profile_dir=profile_dir,
                                         steps=steps, cast_frozen=cast_frozen)
        later = (3, 4) if all_stages else (3,) if stage4_memory else ()
        for stage in later:
            if show:
                print(f"  stage{stage} ...", file=sys.stderr, flush=True)
            results[f"stage{stage}"] = run_stage(params, stage, True, root,
                                                 _parent_dir(root, stage), save=True,
                                                 per_sample=per_sample, profile_dir=profile_dir,
                                                 steps=steps, cast_frozen=cast_frozen)
        if stage4_memory:
            # spawn: a fresh process per variant (CUDA-safe, and nothing inherited). Large
            # blocks mmap'ed, so a freed activation leaves the resident set at once (glibc
            # keeps heap memory otherwise) and its peak follows what is live.
            ctx = multiprocessing.get_context("spawn")
            mmap = os.environ.get(MMAP_VAR)
            os.environ[MMAP_VAR] = "65536"
            try:
                for name, variant in stage4_variants(params).items():
                    if show:
                        print(f"  {name} (own process) ...", file=sys.stderr, flush=True)
                    with ctx.Pool(1) as pool:
                        results[name] = pool.apply(
                            _stage4_child, (variant, str(root), name, per_sample, steps))
            finally:
                if mmap is None:
                    os.environ.pop(MMAP_VAR, None)
                else:
                    os.environ[MMAP_VAR] = mmap
    # Cached and uncached runs train the same batches (same losses) unless batch_size auto
    # gave them different batches (the cached step needs less memory).
    same = [s for s in (1, 2) if results[f"stage{s}_cached"]["batch_size"]
            == results[f"stage{s}_uncached"]["batch_size"]]
    diffs = [abs(a - b) for s in same
             for a, b in zip(results[f"stage{s}_cached"]["losses"],
                             results[f"stage{s}_uncached"]["losses"], strict=True)]
    calls = [c for r in results.values() for c in r["text_calls_after_first"]]
    out: dict[str, Any] = {
        "preset": preset, "loader": "per-sample" if per_sample else "packed",
        **run_header(params), "images": images, "train_samples": results["stage1_cached"]["train_samples"],
        "epochs": epochs, "batch_size": params.optim.batch_size, "steps": steps,
        "compile": params.train.compile,
        "peak_tflops": peak_tflops or known_peak_tflops(),
        "stage1_epoch_speedup": results["stage1_uncached"]["epoch_s"]
        / results["stage1_cached"]["epoch_s"],
        "stage2_epoch_speedup": results["stage2_uncached"]["epoch_s"]
        / results["stage2_cached"]["epoch_s"],
        "max_loss_diff": max(diffs) if diffs else None,
        "text_encoder_calls_per_epoch": max(calls) if calls else 0,
        "total_s": time.perf_counter() - t_start,
    }
    if stage4_memory:
        plain, ckpt = results["stage4_plain"], results["stage4_ckpt"]
        out["stage4_checkpointing_same_weights"] = \
            plain["weights_sha256"] == ckpt["weights_sha256"]
        out["stage4_checkpointing_peak_ratio"] = \
            ckpt["peak_over_start_mb"] / plain["peak_over_start_mb"]
    for key, r in results.items():
        out[key] = {k: v for k, v in r.items() if k not in ("losses", "text_calls_after_first")}
        row = out[key]
        row["loader_share"] = row["images_s"] / row["loader_images_s"]
        row["tflop_s"] = row["flop_per_image"] * row["images_s"] / 1e12
        if out["peak_tflops"]:
            row["mfu"] = row["tflop_s"] / out["peak_tflops"]
    return out


def batch_by_summary(params: Params, preset: str, images: int, epochs: int,
                     results: dict[str, dict[str, Any]], total_s: float) -> dict[str, Any]:
    out: dict[str, Any] = {
        "mode": "batch_by_compare", "preset": preset, **run_header(params), "images": images, "epochs": epochs,
        "batch_size": results["stage2_sample"]["batch_size"],
        "negatives_per_image": params.prepare.negatives_per_image,
        "prompts_per_image": results["stage2_image"]["prompts_per_image"],
        "total_s": total_s,
    }
    for key, r in results.items():
        out[key] = {k: v for k, v in r.items() if k not in ("losses", "text_calls_after_first",
                                                            "trainable_by_component")}
    for stage in (2, 3, 4):
        out[f"stage{stage}_speedup"] = \
            out[f"stage{stage}_image"]["images_s"] / out[f"stage{stage}_sample"]["images_s"]
    return out


def batch_by_table(r: dict[str, Any]) -> str:
    lines = [f"cdsam.training.bench --batch-by-compare  preset={r['preset']}  "
             f"device={r['device']}  DINO {r['dino']}, K={r['last_k_blocks']}, {r['images']} "
             f"images, {r['prompts_per_image']:.2f} prompts an image (negatives_per_image "
             f"{r['negatives_per_image']}), {r['epochs']} epochs (the first not timed)",
             f"{'run':<16}{'batch':>16}{'samples/s':>11}{'images/s':>10}{'step peak MB':>14}"
             f"{'vs sample':>11}"]
    for stage in (2, 3, 4):
        base = r[f"stage{stage}_sample"]["images_s"]
        for mode in ("sample", "image"):
            s = r[f"stage{stage}_{mode}"]
            batch = f"{s['batch_size']} {'samples' if mode == 'sample' else 'images'}"
            name = f"stage{stage} {mode}"
            lines.append(f"{name:<16}{batch:>16}"
                         f"{s['images_s']:>11.1f}{s['distinct_images_s']:>10.1f}"
                         f"{s['step_peak_mb']:>14.0f}{s['images_s'] / base:>10.2f}x")
    lines.append(f"(image-major batches hold batch / prompts-an-image images, so both decode "
                 f"about the same samples a step; total {r['total_s']:.0f} s)")
    return "\n".join(lines)


RUNS = ("stage1_uncached", "stage1_cached", "stage2_uncached", "stage2_cached", "stage3",
        "stage4", "stage4_plain", "stage4_ckpt", "stage4_partial")


def table(r: dict[str, Any]) -> str:
    lines = [f"cdsam.training.bench  preset={r['preset']}  loader={r['loader']}  device={r['device']}  "
             f"DINO {r['dino']}, K={r['last_k_blocks']}, {r['images']} images "
             f"({r['train_samples']} train samples), {r['epochs']} epochs",
             f"{'run':<18}{'epoch s':>9}{'img/s':>9}{'setup s':>9}{'peak MB':>9}"
             f"{'cached imgs':>12}{'steps/epoch':>12}{'epochs':>7}"]
    runs = [(key, r[key]) for key in RUNS if key in r]
    for key, s in runs:
        lines.append(f"{key:<18}{s['epoch_s']:>9.2f}{s['images_s']:>9.1f}{s['setup_s']:>9.2f}"
                     f"{s['peak_mem_mb']:>9.0f}{s['cache_images']:>12}"
                     f"{s.get('steps_per_epoch', '-'):>12}{s.get('epochs', r['epochs']):>7}")
    lines += ["", f"where a step goes (optim.batch_size {r['batch_size']}; loader share = loader "
              f"time per image / end-to-end time per image; peak {r['peak_tflops'] or '-'} "
              f"TFLOP/s)",
              f"{'run':<18}{'batch':>6}{'loader':>9}{'step':>9}{'e2e':>9}{'e2e/step':>9}"
              f"{'loader':>8}{'GFLOP':>8}{'TFLOP/s':>9}{'MFU':>7}{'waits':>7}",
              f"{'':<18}{'':>6}{'img/s':>9}{'img/s':>9}{'img/s':>9}{'':>9}{'share':>8}"
              f"{'/img':>8}{'':>9}{'':>7}{'/step':>7}"]
    for key, s in runs:
        mfu = f"{100 * s['mfu']:.1f}%" if "mfu" in s else "-"
        waits = "-" if s.get("syncs_per_step") is None else f"{s['syncs_per_step']:.1f}"
        lines.append(f"{key:<18}{s['batch_size']:>6}{s['loader_images_s']:>9.1f}"
                     f"{s['step_images_s']:>9.1f}"
                     f"{s['images_s']:>9.1f}{s['images_s'] / s['step_images_s']:>9.2f}"
                     f"{100 * s['loader_share']:>7.1f}%{s['flop_per_image'] / 1e9:>8.2f}"
                     f"{s['tflop_s']:>9.3f}{mfu:>7}{waits:>7}")
    timed = next((s.get("timed_steps") for _, s in runs), None)
    if timed:
        lines.append(f"(step alone timed over {timed} steps after a warm-up step; waits: host "
                     f"waits for the device per step, CUDA only)")
    if r.get("compile"):
        lines += ["", "train.compile: the step alone compiled and eager, same run",
                  f"{'run':<18}{'compiled':>9}{'eager':>9}{'ratio':>7}"]
        for key, s in runs:
            if not s["compiled"]:
                lines.append(f"{key:<18}  fell back to eager (see the log line above)")
                continue
            lines.append(f"{key:<18}{s['step_images_s']:>9.1f}{s['eager_step_images_s']:>9.1f}"
                         f"{s['step_images_s'] / s['eager_step_images_s']:>6.2f}x")
    if any("frozen_held" in s for _, s in runs):
        lines += ["", "frozen weights (--cast-frozen): the step alone held in bf16 and cast each "
                  "step, same run",
                  f"{'run':<18}{'tensors':>8}{'held img/s':>11}{'cast img/s':>11}{'ratio':>7}"]
        for key, s in runs:
            if not s.get("frozen_held"):
                lines.append(f"{key:<18}  none held (no autocast on this device, or none "
                             "frozen)")
                continue
            # A compiled run's fp32 timing is eager: compare it with the eager bf16 one.
            held = s.get("eager_step_images_s", s["step_images_s"])
            cast = s["cast_frozen_step_images_s"]
            lines.append(f"{key:<18}{s['frozen_held']:>8}{held:>11.1f}{cast:>11.1f}"
                         f"{held / cast:>6.2f}x")
    lines += ["", f"stage1_epoch_speedup          {r['stage1_epoch_speedup']:.2f}x",
              f"stage2_epoch_speedup          {r['stage2_epoch_speedup']:.2f}x",
              "max_loss_diff                 " + (
                  f"{r['max_loss_diff']:.2e}" if r["max_loss_diff"] is not None
                  else "- (cached and uncached runs picked different batches)"),
              f"text_encoder_calls_per_epoch  {r['text_encoder_calls_per_epoch']}",
              f"total                         {r['total_s']:.0f} s"]
    if "stage4_checkpointing_same_weights" in r:
        lines += ["", "stage 4 memory (--stage4-memory; each run in a process of its own; "
                  "peak: CUDA allocated, or on the CPU the resident set while the training "
                  "steps run, over the process's start)",
                  f"{'run':<18}{'trainable':>12}{'peak MB':>9}{'img/s':>9}{'start block':>12}"]
        for key in ("stage4_plain", "stage4_ckpt", "stage4_partial"):
            s = r[key]
            lines.append(f"{key:<18}{s['trainable_params'] or 0:>12,}"
                         f"{s['peak_over_start_mb']:>9.0f}{s['images_s']:>9.1f}"
                         f"{s['start_block']:>12}")
        lines += [f"checkpointing: peak x{r['stage4_checkpointing_peak_ratio']:.2f}, weights "
                  + ("bit-identical" if r["stage4_checkpointing_same_weights"]
                     else "DIFFER")]
    profiled = [(key, s) for key, s in runs if "profile" in s]
    if profiled:
        lines += ["", "profile of the staged steps (--profile; self time per op)"]
        for key, s in profiled:
            lines += profile_table(key, s["profile"], s.get("syncs_per_step"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m cdsam.training.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--images", type=int, default=200, help="synthetic images (default 200)")
    ap.add_argument("--epochs", type=int, default=2, help="epochs per run (>= 2; default 2)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="default")
    ap.add_argument("--compile", action="store_true",
                    help="set train.compile (the first epoch then includes compilation); the "
                         "step alone is then timed compiled and eager")
    ap.add_argument("--cast-frozen", action="store_true",
                    help="also time the step alone with the frozen weights in fp32, cast by "
                         "autocast each step, against their bf16 copies (GPU)")
    ap.add_argument("--steps", type=int, default=None,
                    help="time the step alone over this many steps, and train enough epochs "
                         "that the timed ones (all but the first) hold as many (GPU runs: 100 "
                         "or more; default: 2 passes over 8 staged batches, the epochs given)")
    ap.add_argument("--all-stages", action="store_true",
                    help="also time stages 3 and 4 (images/s, peak memory)")
    ap.add_argument("--stage4-memory", action="store_true",
                    help="also train stage 3, then stage 4 with activation checkpointing off "
                         "and on and with only the last lora.dino.last_k_blocks blocks "
                         "trainable, each in its own process: peak memory, img/s, and whether "
                         "checkpointing left the weights bit-identical")
    ap.add_argument("--batch-by-compare", action="store_true",
                    help="instead of the runs above: stages 2-4 sample-major and image-major "
                         "(data.batch_by) side by side: samples/s, images/s, peak memory")
    ap.add_argument("--negatives-per-image", type=int, default=None,
                    help="prepare.negatives_per_image for the synthetic set (more prompts an "
                         "image: 7 gives ~10 on the default's 12 classes)")
    ap.add_argument("--batch-size", type=batch_size_arg, default=None,
                    help="optim.batch_size for every stage, a number or auto (default: "
                         "params.yaml's)")
    ap.add_argument("--per-sample-loader", action="store_true",
                    help="the per-sample DataLoader path (one fetch per sample, then collated), "
                         "which training used before the packed arrays")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the device's peak TFLOP/s for the MFU column (default: known for "
                         "H100/H200/A100/L40S/A10G, none on the CPU)")
    ap.add_argument("--profile", type=Path, default=None, metavar="DIR",
                    help="also profile each run's staged steps: a Chrome trace per run in DIR, "
                         "the top ops and kernel launches per step in the table")
    args = ap.parse_args(argv)
    if args.epochs < 2:
        ap.error("--epochs must be >= 2 (the first epoch is not timed)")
    if args.steps is not None and args.steps < 1:
        ap.error("--steps must be >= 1")
    offline_defaults()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    result = run(args.params, args.images, args.epochs, args.preset, show=not args.json,
                 all_stages=args.all_stages, compile_model=args.compile,
                 batch_size=args.batch_size, peak_tflops=args.peak_tflops,
                 per_sample=args.per_sample_loader, profile_dir=args.profile,
                 steps=args.steps, cast_frozen=args.cast_frozen,
                 stage4_memory=args.stage4_memory, batch_by_compare=args.batch_by_compare,
                 negatives_per_image=args.negatives_per_image)
    text = batch_by_table if args.batch_by_compare else table
    print(json.dumps(result, indent=2) if args.json else text(result))


if __name__ == "__main__":
    main()
