"""The training recipe for one curriculum stage: setup → epochs → save.

Stage N ≥ 2 starts from stage N−1's checkpoint; the stage table (`cdsam.training.curriculum`) decides
what trains. CUDA gets AMP (bf16 where supported, fp16 + GradScaler otherwise), TF32, pinned
memory, fused AdamW, frozen linear/conv weights held in the autocast dtype
(`cdsam.training.frozen_weights`) and optionally ``torch.compile`` (or one line saying why not, then
eager); the CPU runs the same code in fp32, bit-reproducibly for a given seed and thread
count. Under torchrun the trainable model is wrapped in DDP (see `cdsam.distributed`). Frozen
work is done once: CLIP text features per prompt, the frozen DINO prefix per image
(`cdsam.training.feature_cache`). After every epoch the full state goes to a resume folder
(`cdsam.training.resume`), so a killed run continues where it stopped.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import record_function
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

import cdsam
from cdsam import distributed
from cdsam.config.parse import to_dict
from cdsam.config.schema import AUTO, OptimConfig, Params
from cdsam.data.dataset import EpochSampler, ManifestDataset, collate
from cdsam.data.packed import PackedLoader, normalize_batch
from cdsam.data.prepared import PreparedSplit, prepared_digest
from cdsam.data.spatial import SpatialPolicy, batch_prompts
from cdsam.errors import CheckpointError, UserError
from cdsam.evaluation.scoring import evaluate_model
from cdsam.models.checkpoint import (
    CheckpointMeta,
    load_checkpoint,
    parent_ref,
    save_checkpoint,
)
from cdsam.models.delta_base import Base
from cdsam.models.model import CDSAM, build_model
from cdsam.models.objective import Objective
from cdsam.models.preflight import check_model
from cdsam.runtime import (
    amp_settings,
    configure_determinism,
    peak_memory_mb,
    resolve_device,
    seed_everything,
)
from cdsam.training.batch_size import StepMemory, probe_step_memory, resolve_auto_batch, scale_lrs
from cdsam.training.compiling import compile_or_fall_back
from cdsam.training.curriculum import apply_stage, component_counts, param_groups, policy
from cdsam.training.feature_cache import FeatureCache, plan_cache
from cdsam.training.frozen_weights import FrozenHold, hold_frozen
from cdsam.training.profiling import PHASES
from cdsam.training.resume import (
    Progress,
    ResumeStore,
    code_fingerprint,
    fingerprint,
)

log = logging.getLogger("cdsam.training.trainer")

BAR_READ_S = 1.0  # the progress bar's loss is read back from the device at most this often


def lr_lambda(total_steps: int, warmup: int, min_ratio: float):
    """Linear warmup, then cosine decay to ``min_ratio`` of the base LR."""

    def fn(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        progress = min(max(progress, 0.0), 1.0)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


# --------------------------------------------------------------------------- the recipe


@dataclass
class StagePaths:
    data: Path  # data/prepared
    out: Path  # models/stageN
    metrics: Path  # metrics/stageN (DVCLive dir)
    parent: Path | None = None  # models/stage{N-1}
    resume: Path = Path(".cdsam/resume")  # scratch state, not a DVC output


class StageTrainer:
    """One stage: ``setup()``, ``train()``, ``save()``; ``run()`` does all three."""

    # Batches come from packed arrays (cdsam.data.packed); False keeps the per-sample
    # DataLoader path (tests and the benchmark compare the two).
    pack_batches: bool = True
    # train.compile's torch.compile backend (tests pass dynamo's "eager" or a failing one).
    compile_backend: Any = "inductor"
    # Under autocast, frozen linear/conv weights held in its dtype (`cdsam.training.frozen_weights`);
    # False casts them each step as autocast does by itself (the benchmark compares the two).
    frozen_in_amp_dtype: bool = True

    def __init__(self, params: Params, stage: int, paths: StagePaths,
                 show_progress: bool = True,
                 dist_info: distributed.DistInfo | None = None) -> None:
        self.params = params
        self.stage = stage
        self.pol = policy(stage)
        self.paths = paths
        self.dist = dist_info or distributed.env_info()
        self.show_progress = show_progress and self.dist.is_main
        self.device = resolve_device(params.device)
        self.optim_cfg: OptimConfig = params.optim_for(stage)
        self.epochs = params.stage(stage).epochs
        self.sam_mode = (params.stage4.sam_mode or "lora") if stage == 4 else "lora"
        self.select = params.stage(stage).select
        self.selected_epoch = 0
        self.history: list[dict[str, float]] = []
        self.step_losses: list[list[float]] = []  # per epoch, per step (the benchmark reads it)
        self.epoch_times: list[float] = []
        self.cache: FeatureCache | None = None
        self.packs: dict[str, PreparedSplit] = {}  # split -> its shards, when batches are packed
        self.start_block = 0
        self.base: Base | None = None

    # ---- setup
    def _load_model(self) -> CDSAM:
        if self.pol.parent is None:
            self.model_cfg = to_dict(self.params.model)
            model = build_model(self.params.model, load_weights=True, seed=self.params.seed)
            # What every stage's checkpoint is a delta over (the frozen parts are not copied).
            self.base = Base.of(model, self.params.seed)
            return model
        parent = self.paths.parent
        if parent is None:
            raise UserError(f"stage {self.stage} needs the stage {self.pol.parent} checkpoint")
        model, meta = load_checkpoint(parent)
        self.model_cfg = meta.model
        self.base = meta.base_state  # None for a full parent: this stage then saves in full
        if meta.stage != self.pol.parent:
            raise CheckpointError(f"{parent}: is a stage {meta.stage} checkpoint, stage "
                                  f"{self.stage} starts from stage {self.pol.parent}")
        if meta.model != to_dict(self.params.model):
            log.warning("params.yaml `model` differs from %s/meta.json; the checkpoint's "
                        "architecture is used (rerun the earlier stages to apply the change)",
                        parent)
        return model

    def _run_fingerprint(self) -> str:
        """What the stage's result depends on; a resume state from anything else is stale."""
        p = self.params
        parts: dict[str, Any] = {
            "version": cdsam.__version__, "code": code_fingerprint(),
            # prepare hashed every shard as it wrote it: nothing is read again here.
            "data_files": prepared_digest(self.paths.data),
            "stage": self.stage, "seed": p.seed,
            # As written in params (auto stays auto): the batch auto resolves to depends on the
            # device's free memory, and a resume reuses the state's own (saved_batch).
            "data": to_dict(p.data), "model": to_dict(p.model),
            "optim": to_dict(p.optim_for(self.stage)),
            "loss": to_dict(p.loss), "stage_cfg": to_dict(p.stage(self.stage)),
            "train": to_dict(p.train), "lora_sam": to_dict(p.lora.sam),
            "world_size": self.dist.world_size, "device": self.device.type,
        }
        if self.pol.dino == "lora":
            parts["lora_dino"] = to_dict(p.lora.dino)
        if self.paths.parent is not None:
            parts["parent"] = parent_ref(self.paths.parent)["sha256"]
        return fingerprint(parts)

    def setup(self) -> None:
        p = self.params
        if not self.dist.is_main:
            logging.getLogger("cdsam").setLevel(logging.WARNING)
        self.device = distributed.init(self.dist, self.device)
        configure_determinism(self.device)
        seed_everything(p.seed + self.stage)
        # The prepared shards, opened (memory-mapped or read per batch): no decode here.
        t0 = time.perf_counter()
        splits = {name: PreparedSplit.open(self.paths.data, name, p.data)
                  for name in ("train", "val")}
        self.train_set = ManifestDataset(
            self.paths.data, "train", p.data, augment=p.data.augment.enable, seed=p.seed,
            spatial=SpatialPolicy(point=p.train.point_prompts, box=p.train.box_prompts),
            prepared=splits["train"])
        self.val_set = ManifestDataset(self.paths.data, "val", p.data, prepared=splits["val"])
        if self.pack_batches:
            self.packs = splits
        log.info("opened %d images (%d samples, %.1f MB of prepared rows%s) in %.3f s",
                 sum(len(x.image_keys) for x in splits.values()),
                 sum(len(x) for x in splits.values()),
                 sum(x.nbytes for x in splits.values()) / 2**20,
                 ", read from disk per batch" if any(x.on_disk for x in splits.values())
                 else ", memory-mapped", time.perf_counter() - t0)
        # Named-model mismatches (crop vs patch, K vs depth, CLIP activation), before weights.
        check_model(p.model, p.data.crop, p.lora.dino if self.pol.dino == "lora" else None)
        model = self._load_model()
        if p.data.crop % model.patch_size:
            raise UserError(f"data.crop: {p.data.crop} is not divisible by the DINO patch size "
                            f"({model.patch_size})")
        dino_lora = p.lora.dino if self.pol.dino == "lora" else None
        apply_stage(model, self.stage, p.lora.sam, dino_lora, self.sam_mode)
        if p.loss.clip_align_weight == 0:
            # Only the CLIP alignment loss reaches token_proj; without it the head would be a
            # trainable parameter with no gradient (and DDP would stop on it).
            model.token_proj.requires_grad_(False)
        self.model = model.to(self.device)
        self.vocab = sorted(set(self.train_set.prompts) | set(self.val_set.prompts))
        self.counts = component_counts(self.model)
        teacher = None
        if p.loss.ssl_weight > 0 and any(x.requires_grad for x in model.dino.parameters()):
            # Frozen copy of the stage-start backbone: the SSL term keeps features near it.
            teacher = copy.deepcopy(self.model.dino).eval().requires_grad_(False)
        # One objective for train and val loss; CLIP text features once per run (frozen).
        self.objective = Objective.for_model(self.model, p.loss, self.vocab, teacher)
        use_amp, self.amp_dtype, needs_scaler = amp_settings(self.device)
        self.use_amp = use_amp
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=needs_scaler)
        self._setup_cache()
        self.frozen = self._hold_frozen_weights()
        self.net: torch.nn.Module = self.model  # DDP-wrapped below when distributed
        self.store = ResumeStore(self.paths.resume, self.stage, self._run_fingerprint())
        self._resolve_batch_size()
        groups = param_groups(self.model, self.optim_cfg)
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(groups, fused=fused) if fused else \
            torch.optim.AdamW(groups)
        self._build_loaders()
        self.set_epochs(self.epochs)
        if self.dist.enabled:
            # Only parameters with requires_grad are registered, so the frozen CLIP tower
            # and DINO prefix cost nothing. Every trainable parameter gets a gradient each
            # step (see curriculum: no LoRA on SAM's unused hypernetwork MLPs / IoU head), so
            # find_unused_parameters stays off.
            self.net = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.compiled = p.train.compile and compile_or_fall_back(
            self.model, self._step_probe, self.compile_backend)
        eff = self.optim_cfg.batch_size * self.optim_cfg.grad_accum_steps * self.dist.world_size
        log.info("stage%d on %s: %d train / %d val samples, %d prompts, %d epochs, effective "
                 "batch %d (batch %d x accumulation %d x world size %d), trainable %s of %s "
                 "params", self.stage, self.device, len(self.train_set), len(self.val_set),
                 len(self.vocab), self.epochs, eff, self.optim_cfg.batch_size,
                 self.optim_cfg.grad_accum_steps, self.dist.world_size,
                 f"{self.trainable_params:,}", f"{self.total_params:,}")
        if self.train_set.spatial is not None:
            log.info("spatial prompts next to the text: a click on %.0f %% of samples, a box on "
                     "%.0f %% (train.point_prompts / train.box_prompts)",
                     100 * p.train.point_prompts, 100 * p.train.box_prompts)

    def set_epochs(self, epochs: int) -> None:
        """The run's length and the LR schedule over it (the benchmark lengthens its runs
        after setup, once the batch and so the steps per epoch are known)."""
        self.epochs = epochs
        steps_per_epoch = math.ceil(len(self.train_loader) / self.optim_cfg.grad_accum_steps)
        self.total_steps = steps_per_epoch * epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(self.total_steps, self.optim_cfg.warmup_steps,
                                      self.optim_cfg.min_lr_ratio))

    def _build_loaders(self) -> None:
        p, d = self.params, self.dist
        # The same sampler for one process or many: a per-epoch seeded permutation, rank r
        # taking every world_size-th index, so a resumed epoch replays the same order.
        sampler = DistributedSampler(self.train_set, num_replicas=d.world_size, rank=d.rank,
                                     shuffle=True, seed=p.seed * 1000 + self.stage,
                                     drop_last=False)
        val_bs = max(self.optim_cfg.batch_size, 32)
        if self.packs:
            on_gpu = self.device.type == "cuda"
            self.train_loader = PackedLoader(
                self.packs["train"], self.optim_cfg.batch_size, self.device, sampler=sampler,
                spatial=self.train_set.spatial, seed=p.seed, prefetch=on_gpu,
                augment=p.data.augment)
            self.train_sampler = self.train_loader
            self.val_loader = PackedLoader(
                self.packs["val"], val_bs, self.device, prefetch=on_gpu,
                indices=range(d.rank, len(self.val_set), d.world_size))
            for loader in (self.train_loader, self.val_loader):
                loader.pixels = self._needs_pixels(loader.split)
            return
        # The per-sample path: one fetch per sample in this process (the benchmark's "before").
        kw = {"pin_memory": self.device.type == "cuda"}
        self.train_sampler = EpochSampler(sampler)
        self.train_loader = DataLoader(
            self.train_set, batch_size=self.optim_cfg.batch_size, sampler=self.train_sampler,
            collate_fn=collate, **kw)
        val = self.val_set if not d.enabled else \
            Subset(self.val_set, list(range(d.rank, len(self.val_set), d.world_size)))
        self.val_loader = DataLoader(val, batch_size=val_bs, shuffle=False, collate_fn=collate,
                                     **kw)

    def _needs_pixels(self, pack: PreparedSplit) -> bool:
        """Once the cache holds a split's DINO prefix, only the SSL teacher reads pixels."""
        return self.cache is None or self.objective.teacher is not None or \
            not self.cache.covers(pack.image_keys)

    def _resolve_batch_size(self) -> None:
        """``optim.batch_size: auto`` → a number for this stage and device (cdsam.training.batch_size);
        on CUDA measured on the split's own first batches, with the cache in place."""
        n = len(self.train_set)
        saved = self.store.saved_batch() if self.optim_cfg.batch_size == AUTO else None
        if saved is not None:
            # Measuring again could pick another batch (less free memory now) and change the
            # run; the state's own batch is what it resumes bit-exactly with.
            self.optim_cfg = scale_lrs(self.optim_cfg, saved)
            log.info("optim.batch_size auto -> %d, the batch of the resume state in %s (not "
                     "measured again; remove that folder to measure anew); lr %.3g, lora_lr %.3g",
                     saved, self.store.dir, self.optim_cfg.lr, self.optim_cfg.lora_lr)
            return

        def make_batch(size: int) -> dict[str, Any]:
            if not self.packs:
                raise UserError("optim.batch_size: auto is measured on the packed data path")
            pack = self.packs["train"]
            loader = PackedLoader(pack, size, self.device, indices=[i % n for i in range(size)],
                                  spatial=self.train_set.spatial, seed=self.params.seed,
                                  augment=self.params.data.augment)
            loader.pixels = self._needs_pixels(pack)
            return next(iter(loader))

        def probe() -> StepMemory:
            self._set_train_mode()
            return probe_step_memory(lambda b: self.compute_loss(b)[0], make_batch, self.model,
                                     self.device)

        self.optim_cfg = resolve_auto_batch(
            self.optim_cfg, self.device, math.ceil(n / self.dist.world_size), probe, self.model,
            agree=lambda b: distributed.all_reduce_min(b, self.device),
            world_size=self.dist.world_size)

    def _setup_cache(self) -> None:
        p = self.params
        plan = plan_cache(self.model, p.train.feature_cache, augment=p.data.augment.enable)
        if not plan.enabled:
            log.info("feature cache off: %s", plan.reason)
            return
        self.start_block = plan.end_block
        self.cache = FeatureCache(p.train.feature_cache_mb)
        t0 = time.perf_counter()
        self.model.dino.eval()
        compute = lambda x: self.model.dino_prefix(x, plan.end_block)  # noqa: E731
        with torch.no_grad(), torch.autocast(self.device.type, dtype=self.amp_dtype,
                                             enabled=self.use_amp):
            for ds in (self.train_set, self.val_set):
                if self.packs:
                    self.cache.fill_batches(self._image_chunks(self.packs[ds.split]), compute)
                    continue
                samples = (ds[i] for i in range(len(ds)))
                items = ((s["image_key"], s["image"].to(self.device)) for s in samples)
                self.cache.fill(items, compute)
        depth = self.model.depth
        log.info("feature cache: DINO blocks 0-%d of %d computed once for %d images (%.1f MB) "
                 "in %.1f s; each step runs %s", plan.end_block - 1, depth, len(self.cache),
                 self.cache.bytes / 2**20, time.perf_counter() - t0,
                 "only the heads and SAM decoder" if plan.end_block == depth
                 else f"DINO blocks {plan.end_block}-{depth - 1} onwards")

    def _hold_frozen_weights(self) -> FrozenHold:
        """Under autocast, the frozen weights of the parts a step runs in its dtype (the
        objective's teacher included; not the CLIP text tower, which runs once per prompt and
        in which open_clip picks its compute dtype from its weights')."""
        if not (self.use_amp and self.frozen_in_amp_dtype):
            return FrozenHold()
        parts = [m for name, m in self.model.named_children() if name != "clip_text"]
        if self.objective.teacher is not None:
            parts.append(self.objective.teacher)
        hold = hold_frozen(parts, self.amp_dtype)
        log.info("%d frozen weight tensors held in %s on %s (%.0f MB less than fp32)",
                 len(hold.held), str(self.amp_dtype).removeprefix("torch."), self.device,
                 hold.nbytes_saved / 2**20)
        return hold

    def _image_chunks(self, pack: PreparedSplit, chunk: int = 64):
        """(keys, normalised images on the device), ``chunk`` distinct images at a time."""
        for i in range(0, len(pack.image_keys), chunk):
            rows = range(i, min(i + chunk, len(pack.image_keys)))
            u8 = torch.from_numpy(pack.image_rows(rows)).to(self.device, non_blocking=True)
            yield pack.image_keys[i:i + chunk], normalize_batch(u8)

    @property
    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    @property
    def total_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self.model.named_parameters()
                if p.requires_grad}

    def _step_probe(self) -> None:
        """Forward + backward of the first training batch, changing nothing: gradients are
        dropped and the RNG streams restored (`cdsam.training.compiling` compiles on this call)."""
        batch = next(iter(self.train_loader))
        self._set_train_mode()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            self.compute_loss(batch)[0].backward()
        self.optimizer.zero_grad(set_to_none=True)

    # ---- one step
    def compute_loss(self, batch: dict[str, Any]
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images = batch["image"].to(self.device, non_blocking=True)
        target = batch["mask"].to(self.device, non_blocking=True)
        valid = batch["valid"].to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
            prefix = None
            if self.cache is not None:
                with torch.no_grad():
                    prefix = self.cache.lookup(
                        batch["image_key"], images,
                        lambda x: self.model.dino_prefix(x, self.start_block))
            out = self.net(images, batch["prompt"], prefix=prefix, start_block=self.start_block,
                           **batch_prompts(batch, self.device))
            loss, parts = self.objective(out, images, target, valid, batch["prompt"])
        # Parts stay on the device: reading them back would make the host wait every step.
        return loss, {k: v.detach() for k, v in parts.items()}

    def _set_train_mode(self) -> None:
        self.model.train()
        # Components with nothing to train stay in eval mode (no dropout/drop-path noise).
        for child in self.model.children():
            if not any(p.requires_grad for p in child.parameters()):
                child.eval()

    def train_step(self, batch: dict[str, Any], window: int = 1, boundary: bool = True
                   ) -> torch.Tensor:
        """Forward + backward of one batch (loss scaled by 1/``window``), then at an
        accumulation ``boundary`` the optimizer step. Returns the loss, not yet read back to
        the host (reading it waits for the device; the epoch loop reads it one step later)."""
        # Between accumulation boundaries DDP need not all-reduce the gradients.
        sync = contextlib.nullcontext() if boundary or not self.dist.enabled else \
            self.net.no_sync()
        with sync:
            with record_function(PHASES["forward"]):
                loss, _ = self.compute_loss(batch)
            with record_function(PHASES["backward"]):
                self.scaler.scale(loss / window).backward()
        if boundary:
            if self.optim_cfg.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(
                    [p for p in self.model.parameters() if p.requires_grad],
                    self.optim_cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
        return loss.detach()

    # ---- epochs
    def train_epoch(self, epoch: int) -> dict[str, float]:
        self._set_train_mode()
        self.train_sampler.set_epoch(epoch)
        accum = self.optim_cfg.grad_accum_steps
        bar = tqdm(self.train_loader, desc=f"stage{self.stage} epoch {epoch + 1}/{self.epochs}",
                   leave=False, disable=not self.show_progress)
        n_batches = len(self.train_loader)
        self.optimizer.zero_grad(set_to_none=True)
        # Per-step losses stay on the device: reading one back makes the host wait for the
        # device, which on a GPU empties its queue of work. The bar shows the previous step's
        # loss at most every BAR_READ_S; every loss is read (and checked) once, at the end.
        step_losses: list[torch.Tensor] = []
        sizes: list[int] = []
        last_read = time.monotonic()
        for step, batch in enumerate(bar):
            boundary = (step + 1) % accum == 0 or step + 1 == n_batches
            # The last window of an epoch may hold fewer than `accum` batches: average over
            # the batches it has, so its step is not scaled down.
            window = min(accum, n_batches - (step // accum) * accum)
            loss = self.train_step(batch, window, boundary)
            if self.show_progress and step_losses and \
                    time.monotonic() - last_read >= BAR_READ_S:
                last_read = time.monotonic()
                bar.set_postfix(loss=f"{float(step_losses[-1]):.4f}")
            step_losses.append(loss)
            sizes.append(batch["image"].shape[0])
        losses = torch.stack(step_losses).float().cpu().tolist() if step_losses else []
        self._check_finite(losses, epoch)
        self.step_losses.append(losses)
        total = 0.0
        for value, bs in zip(losses, sizes, strict=True):  # in order (sum() would compensate)
            total += value * bs
        total, n_img = distributed.all_reduce_sum([total, float(sum(sizes))], self.device)
        return {"loss": total / max(n_img, 1), "images": int(n_img)}

    def _check_finite(self, losses: list[float], epoch: int) -> None:
        bad = next((i for i, v in enumerate(losses) if not math.isfinite(v)), None)
        if bad is None:
            return
        last_finite = losses[bad - 1] if bad else None
        raise UserError(
            f"stage{self.stage}: non-finite loss ({losses[bad]}) at epoch {epoch + 1} step "
            f"{bad + 1}; last finite loss {last_finite}; lower optim.lr / optim.lora_lr or "
            f"check the data. No checkpoint was written")

    def _log_epoch(self, live, row: dict[str, float]) -> None:
        if live is None:
            return
        live.log_metric("train/loss", row["train_loss"])
        for key in ("loss", "miou", "dice", "sampled_class_iou", "fp_rate"):
            live.log_metric(f"val/{key}", row[key])
        live.log_metric("lr", row["lr"])
        live.next_step()

    def _resume(self, live) -> Progress:
        found = self.store.load()
        if found is None:
            return Progress(epoch=0, batch_size=self.optim_cfg.batch_size)
        progress, tensors, meta = found
        self.store.restore(tensors, meta, self.model, self.optimizer, self.scheduler,
                           self.scaler, base=self.base)
        self.best_state = {k[len("best/"):]: v for k, v in tensors.items()
                           if k.startswith("best/")} or None
        log.info("resuming stage%d from epoch %d/%d (state in %s)", self.stage, progress.epoch,
                 self.epochs, self.store.dir)
        self.history = list(progress.history)
        for row in self.history:  # DVC removed the old metrics files: write the curve again
            self._log_epoch(live, row)
        return progress

    def train(self, live=None, stop_after: int | None = None) -> dict[str, float]:
        """Run the remaining epochs. ``stop_after``: return after that many epochs (as a killed
        run would stop) — tests use it to exercise resume."""
        self.best_state: dict[str, torch.Tensor] | None = None
        progress = self._resume(live)
        for epoch in range(progress.epoch, self.epochs):
            if stop_after is not None and epoch >= stop_after:
                return {}
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()
            tr = self.train_epoch(epoch)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            elapsed = time.perf_counter() - t0
            self.epoch_times.append(elapsed)
            progress.train_time += elapsed
            progress.train_images += tr["images"]
            val = evaluate_model(self.model, self.val_loader, self.device, self.objective,
                                 cache=self.cache, start_block=self.start_block,
                                 reduce=self.dist.enabled)
            if val.miou > progress.best:
                progress.best, progress.best_epoch = val.miou, epoch + 1
                if self.select == "best":  # the weights the next stage will start from
                    self.best_state = self.trainable_state()
            row = {"train_loss": tr["loss"], **val.figures, "lr": self.scheduler.get_last_lr()[0]}
            self.history.append(row)
            progress.history = self.history
            progress.epoch = epoch + 1
            log.info("epoch %d/%d train_loss=%.4f val_loss=%.4f miou=%.4f dice=%.4f "
                     "sampled_class_iou=%.4f fp_rate=%.3f%s", epoch + 1, self.epochs, tr["loss"],
                     val.loss, val.miou, val.dice, val.sampled_class_iou, val.fp_rate,
                     " (best so far)" if progress.best_epoch == epoch + 1 else "")
            self._log_epoch(live, row)
            if self.dist.is_main:
                best = {f"best/{k}": v for k, v in (self.best_state or {}).items()}
                with self.frozen.full_precision():  # the saved deltas are over fp32 bases
                    self.store.save(progress, self.model, self.optimizer, self.scheduler,
                                    self.scaler, extra=best, base=self.base)
            distributed.barrier()
        self.selected_epoch = progress.best_epoch if self.select == "best" else self.epochs
        if self.best_state is not None and self.selected_epoch != self.epochs:
            own = dict(self.model.named_parameters())
            with torch.no_grad():
                for name, value in self.best_state.items():
                    own[name].copy_(value)
        log.info("stage%d keeps epoch %d of %d (%s.select: %s; val miou %.4f)", self.stage,
                 self.selected_epoch, self.epochs, f"stage{self.stage}", self.select,
                 self.history[self.selected_epoch - 1]["miou"])
        chosen = self.history[self.selected_epoch - 1]
        return {
            **{k: chosen[k]
               for k in ("loss", "miou", "dice", "sampled_class_iou", "fp_rate")},
            "best_miou": progress.best, "selected_epoch": self.selected_epoch,
            "epochs": self.epochs,
            "trainable_params": self.trainable_params, "total_params": self.total_params,
            "throughput_img_s": progress.train_images / max(progress.train_time, 1e-9),
            "peak_mem_mb": peak_memory_mb(self.device),
        }

    # ---- save
    def save(self) -> None:
        parent = parent_ref(self.paths.parent) if self.paths.parent else None
        extra = {
            "optim": to_dict(self.optim_cfg), "epochs": self.epochs, "sam_mode": self.sam_mode,
            "loss": to_dict(self.params.loss), "seed": self.params.seed,
            "data": to_dict(self.params.data), "world_size": self.dist.world_size,
            "select": self.select, "selected_epoch": self.selected_epoch,
        }
        meta = CheckpointMeta(stage=self.stage, model=self.model_cfg, prompts=self.vocab,
                              parent=parent, extra=extra)
        with self.frozen.full_precision():
            save_checkpoint(self.paths.out, self.model.cpu(), meta, self.base)
        self.model.to(self.device)

    def run(self) -> dict[str, float]:
        from dvclive import Live

        self.setup()
        if not self.dist.is_main:
            summary = self.train(None)
            distributed.barrier()  # rank 0 writes the outputs
            return summary
        with Live(str(self.paths.metrics), dvcyaml=False, save_dvc_exp=False,
                  report=None) as live:
            summary = self.train(live)
            self.save()
            for key in ("epochs", "selected_epoch", "trainable_params", "total_params",
                        "throughput_img_s", "peak_mem_mb", "best_miou"):
                live.summary[key] = summary[key]
            live.summary["world_size"] = self.dist.world_size
            live.summary["batch_size"] = self.optim_cfg.batch_size  # a number, auto resolved
            live.summary["feature_cache_images"] = len(self.cache) if self.cache else 0
            live.summary["text_encoder_calls"] = self.model.clip_text.calls
            counts = {k: v["trainable"] for k, v in self.counts.items()}
            live.summary["trainable_by_component"] = counts
        self.store.clear()  # outputs are written: the scratch state has done its job
        distributed.barrier()
        log.info("stage%d done: epoch %d kept, val miou=%.4f dice=%.4f, %.1f img/s, peak %.0f "
                 "MB -> %s", self.stage, summary["selected_epoch"], summary["miou"],
                 summary["dice"], summary["throughput_img_s"],
                 summary["peak_mem_mb"], self.paths.out)
        return summary
