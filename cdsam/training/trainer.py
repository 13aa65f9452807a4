"""The training recipe for one curriculum stage: setup → epochs → save.

Stage N starts from its parent's checkpoint; the stage's plan (`cdsam.config.stages`) says
what it reads and trains. CUDA gets AMP (bf16 where supported, fp16 + GradScaler otherwise),
TF32, pinned memory, fused AdamW, frozen linear/conv weights held in the autocast dtype
(`cdsam.training.frozen_weights`) and optionally ``torch.compile`` (or one line saying why not,
then eager); the CPU runs the same code in fp32, bit-reproducibly for a given seed and thread
count. Under torchrun the trainable model is wrapped in DDP (see `cdsam.distributed`), or with
``CDSAM_PARALLEL=fsdp`` sharded by FSDP2 (`cdsam.training.sharding`). Frozen
work is done once: CLIP text features per prompt (per step while ``stageN.clip`` tunes the
tower, whose drift from its base every epoch logs: `cdsam.evaluation.text_drift`), the frozen
DINO prefix per image (`cdsam.training.feature_cache`). After every epoch the full state goes to a resume folder
(`cdsam.training.resume`), so a killed run continues where it stopped.

Each setup step is a helper of the module that owns it and returns what it builds; ``setup``
assigns them in a fixed order (the RNG streams depend on it). Variations (packed batches or
not, the compile backend, holding frozen weights, a forced precision) and epoch hooks come in
through :class:`TrainerOptions`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import record_function
from tqdm import tqdm

import cdsam
from cdsam import distributed
from cdsam.config.parse import to_dict
from cdsam.config.schema import AUTO, DECODE_MODES, InstanceConfig, OptimConfig, Params
from cdsam.config.stages import StagePlan, drop_speed_values, plan_stage
from cdsam.data.packed import PackedLoader
from cdsam.data.prepared import PreparedSplit, prepared_digest
from cdsam.errors import UserError
from cdsam.evaluation.instance_score import choose_thresholds
from cdsam.evaluation.scoring import EvalResult, evaluate_model
from cdsam.evaluation.text_drift import (
    TextDrift,
    general_prompts,
    rebuild_base_tower,
    tower_is_base,
)
from cdsam.models.checkpoint import CheckpointMeta, parent_ref, save_checkpoint
from cdsam.models.dino import set_activation_checkpointing
from cdsam.models.forward import forward_batch
from cdsam.models.objective import Objective
from cdsam.models.preflight import check_model
from cdsam.runtime import (
    Precision,
    configure_determinism,
    peak_memory_mb,
    precision_for,
    resolve_device,
    seed_everything,
)
from cdsam.training import sharding
from cdsam.training.batch_size import (
    REFERENCE_BATCH,
    StepMemory,
    probe_step_memory,
    resolve_auto_batch,
    scale_lrs,
)
from cdsam.training.compiling import compile_or_fall_back, is_compiled
from cdsam.training.curriculum import apply_plan, component_counts
from cdsam.training.feature_cache import build_feature_cache
from cdsam.training.frozen_weights import hold_for_stage
from cdsam.training.loaders import build_loaders, open_stage_data
from cdsam.training.optim import build_optimizer, build_scheduler, optimizer_steps
from cdsam.training.profiling import PHASES
from cdsam.training.resume import Progress, ResumeStore, code_fingerprint, fingerprint
from cdsam.training.stage_model import load_stage_model

log = logging.getLogger("cdsam.train")

# Image-major batches (which count images) of fewer samples than this get a warning.
FEW_SAMPLES = 8
BAR_READ_S = 1.0  # the progress bar's loss is read back from the device at most this often


@dataclass
class StagePaths:
    data: Path  # data/prepared
    out: Path  # models/stageN
    metrics: Path  # metrics/stageN (DVCLive dir)
    parent: Path | None = None  # the parent stage's checkpoint folder
    resume: Path = Path(".cdsam/resume")  # scratch state, not a DVC output


@dataclass(frozen=True)
class EpochHooks:
    """Called in each epoch with the trainer: ``before_epoch(trainer, epoch)`` and
    ``after_train(trainer, epoch, train_row)`` just around its training steps, then
    ``after_validation(trainer, epoch, result)`` before the epoch is judged best or not (a hook
    may read or adjust the result)."""

    before_epoch: Callable[[StageTrainer, int], None] | None = None
    after_train: Callable[[StageTrainer, int, dict[str, float]], None] | None = None
    after_validation: Callable[[StageTrainer, int, EvalResult], None] | None = None


@dataclass(frozen=True)
class TrainerOptions:
    """How a stage runs, beyond params: what the benchmark and tests vary."""

    show_progress: bool = True
    # Batches from packed arrays (cdsam.data.packed); False: the per-sample DataLoader path.
    pack_batches: bool = True
    # train.compile's torch.compile backend (tests pass dynamo's "eager" or a failing one).
    compile_backend: Any = "inductor"
    # Under autocast, frozen linear/conv weights held in its dtype; False casts them each step
    # as autocast does by itself (the benchmark compares the two).
    hold_frozen: bool = True
    # None: decided from the device (`cdsam.runtime.precision_for`); tests force CPU bf16.
    precision: Precision | None = None
    # optim.batch_size: auto -> an OptimConfig with a number (`cdsam.training.batch_size`).
    resolve_batch: Callable[..., OptimConfig] = resolve_auto_batch
    hooks: EpochHooks = field(default_factory=EpochHooks)


class StageTrainer:
    """One stage: ``setup()``, ``train()``, ``save()``; ``run()`` does all three."""

    def __init__(self, params: Params, stage: int, paths: StagePaths,
                 options: TrainerOptions | None = None,
                 dist_info: distributed.DistInfo | None = None) -> None:
        self.params = params
        self.plan: StagePlan = plan_stage(params, stage)
        self.stage = stage
        self.paths = paths
        self.options = options or TrainerOptions()
        self.dist = dist_info or distributed.env_info()
        self.show_progress = self.options.show_progress and self.dist.is_main
        self.device = resolve_device(params.device)
        self.optim_cfg: OptimConfig = self.plan.optim  # auto resolves to a number in setup
        self.epochs = self.plan.epochs
        self.sam_mode = self.plan.sam_mode
        self.select = self.plan.select
        self.selected_epoch = 0
        self.instance_min_quality: dict[str, float] | None = None  # per decode path, on val
        self.history: list[dict[str, float]] = []
        self.step_losses: list[list[float]] = []  # per epoch, per step (the benchmark reads it)
        self.epoch_times: list[float] = []
        self.cache = None
        self.packs: dict[str, PreparedSplit] = {}  # split -> its shards, when batches are packed

    @property
    def start_block(self) -> int:
        """The first DINO block a step runs (the cache holds the ones before it)."""
        return 0 if self.cache is None else self.cache.end_block

    # ---- setup
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
            "data": drop_speed_values("data", to_dict(p.data)), "model": to_dict(p.model),
            "optim": to_dict(self.plan.optim),
            "loss": to_dict(p.loss), "stage_cfg": to_dict(p.stage(self.stage)),
            "train": drop_speed_values("train", to_dict(p.train)),
            "lora_sam": to_dict(self.plan.lora_sam), "lora_clip": to_dict(self.plan.lora_clip),
            "world_size": self.dist.world_size, "device": self.device.type,
        }
        if self.dist.sharded:
            parts["parallel"] = "fsdp"  # its resume state is keyed by name (not DDP's)
        if self.plan.lora_dino is not None:
            parts["lora_dino"] = to_dict(self.plan.lora_dino)
        if self.paths.parent is not None:
            parts["parent"] = parent_ref(self.paths.parent)["sha256"]
        return fingerprint(parts)

    def setup(self) -> None:
        p, opts = self.params, self.options
        if not self.dist.is_main:
            logging.getLogger("cdsam").setLevel(logging.WARNING)
        self.device = distributed.init(self.dist, self.device)
        configure_determinism(self.device)
        seed_everything(p.seed + self.stage)
        data = open_stage_data(self.paths.data, p)
        self.train_set, self.val_set = data.train_set, data.val_set
        if opts.pack_batches:
            self.packs = data.splits
        # Named-model mismatches (crop vs patch, K vs depth, CLIP activation), before weights.
        check_model(p.model, p.data.crop, self.plan.lora_dino)
        start = load_stage_model(p, self.plan, self.paths.parent)
        model, self.model_cfg, self.base = start.model, start.config, start.base
        if p.data.crop % model.patch_size:
            raise UserError(f"data.crop: {p.data.crop} is not divisible by the DINO patch size "
                            f"({model.patch_size})")
        if self.plan.clip_mode != "frozen" and self.dist.sharded:
            raise UserError(f"stage{self.stage}.clip: {self.plan.clip_mode} is not supported "
                            f"under CDSAM_PARALLEL=fsdp (the text tower is replicated, not "
                            f"sharded, and its gradients would not be averaged); use DDP")
        apply_plan(model, self.plan)
        set_activation_checkpointing(model.dino, p.train.activation_checkpointing)
        if p.loss.clip_align_weight == 0 and not model.has_instance_heads:
            # Only the CLIP alignment loss (and the presence head, which reads its tokens)
            # reaches token_proj; without either the head would be a trainable parameter with
            # no gradient (and DDP would stop on it).
            model.token_proj.requires_grad_(False)
        self.precision = opts.precision or precision_for(self.device)
        teacher = None
        if p.loss.ssl_weight > 0 and any(x.requires_grad for x in model.dino.parameters()):
            # Frozen copy of the stage-start backbone: the SSL term keeps features near it.
            # Copied before sharding (a copy of shards would be no backbone).
            teacher = copy.deepcopy(model.dino).eval().requires_grad_(False).to(self.device)
        if self.dist.sharded:
            model.clip_text.to(self.device)  # not sharded: fully_shard leaves it where it is
            self.model = sharding.shard_model(model, self.device, self.precision,
                                              self.dist.world_size)
        else:
            self.model = model.to(self.device)
        self.vocab = data.vocab
        self.counts = component_counts(self.model)
        # One objective for train and val loss; the vocabulary's text features once per run
        # (again after each epoch when the tower trains).
        self.objective = Objective.for_model(self.model, p.loss, self.vocab, teacher,
                                             data.ensembles)
        # How often training showed each prompt template (prompt ensembling), per template.
        self.template_draws = [0] * data.templates
        self.drift, self.fixed_drift = self._text_drift()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.needs_scaler)
        self.cache = build_feature_cache(self.model, p, data, self.precision, bool(self.packs))
        if self.dist.sharded and self.cache is not None and self.cache.full:
            # Which images miss would differ between ranks, and a miss runs sharded blocks
            # (collectives) on one rank only: all ranks run the whole DINO instead.
            log.warning("feature cache off under CDSAM_PARALLEL=fsdp: not every image fits "
                        "train.feature_cache_mb (%.0f MB); raise it to cache the frozen prefix",
                        p.train.feature_cache_mb)
            self.cache = None
        # Sharded, the gathered weights are already in the autocast dtype (mixed precision).
        self.frozen = hold_for_stage(self.model, teacher, self.precision,
                                     opts.hold_frozen and not self.dist.sharded)
        self.net: torch.nn.Module = self.model  # DDP-wrapped below when distributed
        self.store = ResumeStore(self.paths.resume, self.stage, self._run_fingerprint())
        if self.dist.enabled:
            self._agree_on_resume()
        self.optim_cfg = self._batch_size()
        self.optimizer = build_optimizer(self.model, self.optim_cfg, self.device)
        loaders = build_loaders(data, p, self.stage, self.optim_cfg.batch_size, self.device,
                                self.dist, bool(self.packs), self._needs_pixels)
        self.train_loader, self.train_sampler, self.val_loader = \
            loaders.train, loaders.sampler, loaders.val
        self.set_epochs(self.epochs)
        # Probed on the bare model: a failure inside DDP's forward/backward would leave its
        # reducer waiting for gradients that never came.
        if p.train.compile and self.dist.sharded:
            log.warning("train.compile: not supported under CDSAM_PARALLEL=fsdp yet; eager")
        elif p.train.compile:
            compile_or_fall_back(self.model, self._step_probe, opts.compile_backend)
        if self.dist.enabled and not self.dist.sharded:
            # Only parameters with requires_grad are registered, so the frozen CLIP tower
            # and DINO prefix cost nothing. Every trainable parameter gets a gradient each
            # step (see curriculum: no LoRA on SAM's unused hypernetwork MLPs / IoU head), so
            # find_unused_parameters stays off.
            self.net = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        eff = self.optim_cfg.batch_size * self.optim_cfg.grad_accum_steps * self.dist.world_size
        log.info("stage%d on %s: %d train / %d val samples, %d prompts, %d epochs, effective "
                 "batch %d (batch %d x accumulation %d x world size %d%s), trainable %s of %s "
                 "params", self.stage, self.device, len(self.train_set), len(self.val_set),
                 len(self.vocab), self.epochs, eff, self.optim_cfg.batch_size,
                 self.optim_cfg.grad_accum_steps, self.dist.world_size,
                 f", {self.dist.parallel}" if self.dist.enabled else "",
                 f"{self.trainable_params:,}", f"{self.total_params:,}")
        if self.params.data.batch_by == "image":
            cap = self.params.data.prompts_per_image
            n_images = len(self.packs["train"].image_keys)
            per_rank = len(self.train_loader.sampler)  # images (the loader counts batches)
            per_image = self.prompts_per_image
            log.info("image-major batches (data.batch_by: image): %d images a batch, each with "
                     "%s of its prompts (%.1f an image on average: ~%.0f samples a step), DINO "
                     "once per image; an epoch trains each of the %d images once%s",
                     self.optim_cfg.batch_size, "all" if cap is None else f"at most {cap}",
                     per_image, self.optim_cfg.batch_size * per_image, n_images,
                     "" if self.dist.world_size == 1 else
                     f", {per_rank} on each of {self.dist.world_size} ranks"
                     + (f" ({per_rank * self.dist.world_size - n_images} repeated to even "
                        f"them)" if per_rank * self.dist.world_size > n_images else ""))
            if self.optim_cfg.batch_size * per_image < FEW_SAMPLES:
                log.warning("optim.batch_size: %d images of %.1f prompts is ~%.0f samples a "
                            "step; under data.batch_by: image the batch counts images: raise "
                            "it to about %d", self.optim_cfg.batch_size, per_image,
                            self.optim_cfg.batch_size * per_image,
                            math.ceil(REFERENCE_BATCH / per_image))
        if self.train_set.spatial is not None:
            log.info("spatial prompts next to the text: a click on %.0f %% of samples, a box on "
                     "%.0f %% (train.point_prompts / train.box_prompts)",
                     100 * p.train.point_prompts, 100 * p.train.box_prompts)
        if self.model.has_instance_heads:
            self._log_instances()

    def _log_instances(self) -> None:
        """One line on what the instance heads train on."""
        objects = self.packs["train"].objects if self.packs else None
        if objects is None:
            log.info("instance heads: the prepared data has no objects (instances.csv), so the "
                     "centre term is off and clicks train on the class mask; presence and IoU "
                     "train (prepare.instances_from: components makes objects of mask pieces)")
            return
        counts = [len(o) for o in objects if len(o)]
        log.info("instance heads: %d objects, %.1f a positive prompt (up to %d); a click "
                 "trains on the object under it, the centre heatmap on all of them",
                 sum(counts), sum(counts) / max(len(counts), 1), max(counts, default=0))

    @property
    def tunes_text(self) -> bool:
        return self.plan.clip_mode != "frozen"

    def _text_drift(self) -> tuple[TextDrift, dict[str, float] | None]:
        """The text tower's drift from its base (`cdsam.evaluation.text_drift`), and its value
        when this stage does not move the tower (measured once, here)."""
        tower = self.model.clip_text
        general = general_prompts()
        if tower_is_base(tower, self.base):
            # The base itself: it drifts 0 while frozen; tuned, its features now are the base's.
            drift = TextDrift.against(tower if self.tunes_text else None, self.vocab, general)
        elif self.base is None:
            log.warning("stage%d: the parent checkpoint is saved in full, so its base text "
                        "tower is unknown: val/text_drift is measured from this stage's start",
                        self.stage)
            drift = TextDrift.against(tower, self.vocab, general)
        else:  # an earlier stage tuned it: against the tower as built
            drift = TextDrift.against(rebuild_base_tower(self.model_cfg, self.base.seed),
                                      self.vocab, general)
        return drift, None if self.tunes_text else drift.measure(tower)

    def _drift_note(self, drift: dict[str, float], within: bool) -> str:
        """The epoch log line's text drift, where there is any to say."""
        if not self.tunes_text and not drift["text_drift"]:
            return ""
        beyond = "" if within else f", beyond stage{self.stage}.max_text_drift"
        return (f" text_drift={drift['text_drift']:.4f} (general "
                f"{drift['text_drift_general']:.4f}{beyond})")

    def _agree_on_resume(self) -> None:
        """Every rank resumes from the same epoch or none does. Only rank 0 writes the state,
        so ranks on another node see it only through a shared filesystem; a rank that started
        at another epoch would call collectives the others skip."""
        mine = self.store.saved_epoch()
        mine = -1 if mine is None else mine
        low = distributed.all_reduce_min(mine, self.device)
        high = -distributed.all_reduce_min(-mine, self.device)
        if low != high:
            if self.dist.is_main:
                log.warning("stage%d starts over: the ranks see different resume states in %s "
                            "(epochs %d to %d, -1: none); on several nodes set CDSAM_RESUME_DIR "
                            "to a folder they share", self.stage, self.store.dir,
                            low, high)
            self.store.ignore()

    def set_epochs(self, epochs: int) -> None:
        """The run's length and the LR schedule over it (the benchmark lengthens its runs
        after setup, once the batch and so the steps per epoch are known)."""
        self.epochs = epochs
        self.total_steps = optimizer_steps(len(self.train_loader), self.optim_cfg, epochs)
        self.scheduler = build_scheduler(self.optimizer, self.optim_cfg, self.total_steps)

    def _needs_pixels(self, pack: PreparedSplit) -> bool:
        """Once the cache holds a split's DINO prefix, only the SSL teacher reads pixels."""
        return self.cache is None or self.objective.teacher is not None or \
            not self.cache.covers(pack.cache_keys)

    def _batch_size(self) -> OptimConfig:
        """The stage's optimizer config with ``batch_size: auto`` resolved to a number for this
        stage and device (`cdsam.training.batch_size`): the resume state's own when there is
        one, else on CUDA measured on the split's own first batches, with the cache in place."""
        if self.optim_cfg.batch_size != AUTO:
            return self.optim_cfg
        by_image = self.params.data.batch_by == "image" and bool(self.packs)
        n = len(self.packs["train"].image_keys) if by_image else len(self.train_set)
        per_unit = self.prompts_per_image if by_image else 1.0
        saved = self.store.saved_batch()
        if saved is not None:
            # Measuring again could pick another batch (less free memory now) and change the
            # run; the state's own batch is what it resumes bit-exactly with.
            optim = scale_lrs(self.optim_cfg, saved, self.dist.world_size, per_unit)
            log.info("optim.batch_size auto -> %d, the batch of the resume state in %s (not "
                     "measured again; remove that folder to measure anew); lr %.3g, lora_lr %.3g",
                     saved, self.store.dir, optim.lr, optim.lora_lr)
            return optim

        def make_batch(size: int) -> dict[str, Any]:
            if not self.packs:
                raise UserError("optim.batch_size: auto is measured on the packed data path")
            pack = self.packs["train"]
            # Image-major: ``size`` images with their prompts (as many as a step draws).
            loader = PackedLoader(pack, size, self.device, indices=[i % n for i in range(size)],
                                  spatial=self.train_set.spatial, seed=self.params.seed,
                                  augment=self.params.data.augment, by_image=by_image,
                                  prompts_per_image=self.params.data.prompts_per_image)
            loader.pixels = self._needs_pixels(pack)
            return next(iter(loader))

        def probe() -> StepMemory:
            self.train_mode()
            return probe_step_memory(lambda b: self.compute_loss(b)[0], make_batch, self.model,
                                     self.device)

        return self.options.resolve_batch(
            self.optim_cfg, self.device, math.ceil(n / self.dist.world_size), probe, self.model,
            agree=lambda b: distributed.all_reduce_min(b, self.device),
            world_size=self.dist.world_size, per_unit=per_unit)

    @property
    def prompts_per_image(self) -> float:
        """The samples an image-major batch's image brings on average (its prompts, at most
        ``data.prompts_per_image``)."""
        split = self.packs["train"]
        cap = self.params.data.prompts_per_image
        counts = np.bincount(split.image_row, minlength=len(split.image_keys))
        return float(np.minimum(counts, cap if cap is not None else counts.max()).mean())

    @property
    def compiled(self) -> bool:
        """The parts are compiled now (``train.compile`` may have fallen back, at setup or
        later)."""
        return is_compiled(self.model)

    @property
    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    @property
    def total_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trainable weights in full, on the host; sharded: on rank 0 alone (``{}`` on the
        others), and every rank must call it."""
        if self.dist.sharded:
            return sharding.full_state(self.model, trainable_only=True)
        return {n: p.detach().cpu().clone() for n, p in self.model.named_parameters()
                if p.requires_grad}

    def _step_probe(self) -> None:
        """Forward + backward of the first training batch, changing nothing: gradients are
        dropped and the RNG streams restored (`cdsam.training.compiling` compiles on it)."""
        batch = next(iter(self.train_loader))
        self.train_mode()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            self.compute_loss(batch)[0].backward()
        self.optimizer.zero_grad(set_to_none=True)

    # ---- one step
    def compute_loss(self, batch: dict[str, Any]
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        step = forward_batch(self.net, self.model, batch, self.objective, self.precision,
                             self.cache)
        return step.loss, step.parts

    def train_mode(self) -> None:
        """Train mode, but components with nothing to train stay in eval mode (no dropout or
        drop-path noise in frozen parts)."""
        self.model.train()
        for child in self.model.children():
            if not any(p.requires_grad for p in child.parameters()):
                child.eval()

    def train_step(self, batch: dict[str, Any], window: int = 1, boundary: bool = True
                   ) -> torch.Tensor:
        """Forward + backward of one batch (loss scaled by 1/``window``), then at an
        accumulation ``boundary`` the optimizer step. Returns the loss, not yet read back to
        the host (reading it waits for the device; the epoch loop reads it one step later)."""
        # Between accumulation boundaries DDP / FSDP need not reduce the gradients.
        sync = contextlib.nullcontext()
        if self.dist.sharded and self.optim_cfg.grad_accum_steps > 1:  # else always synced
            self.model.set_requires_gradient_sync(boundary)
        elif self.dist.enabled and not boundary:
            sync = self.net.no_sync()
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
        self.train_mode()
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
            sizes.append(len(batch["prompt"]))  # samples (an image-major batch has more)
            for k in batch.get("template", ()):
                self.template_draws[k] += 1
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
        for key in ("loss", "miou", "dice", "sampled_class_iou", "fp_rate", "text_drift",
                    "text_drift_general", "presence_auroc", "il_mcc"):
            if key in row:
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
            hooks = self.options.hooks
            if hooks.before_epoch is not None:
                hooks.before_epoch(self, epoch)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()
            tr = self.train_epoch(epoch)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            elapsed = time.perf_counter() - t0
            if hooks.after_train is not None:
                hooks.after_train(self, epoch, tr)
            self.epoch_times.append(elapsed)
            progress.train_time += elapsed
            progress.train_images += tr["images"]
            if self.tunes_text:  # the tower moved: its cached features are stale
                self.objective.refresh(self.model)
            drift = self.fixed_drift if self.fixed_drift is not None else \
                self.drift.measure(self.model.clip_text)
            # Sharded, every rank scores the whole val split (see loaders): no reduction.
            val = evaluate_model(self.model, self.val_loader, self.objective, self.precision,
                                 cache=self.cache,
                                 reduce=self.dist.enabled and not self.dist.sharded)
            if hooks.after_validation is not None:
                hooks.after_validation(self, epoch, val)
            bound = self.plan.max_text_drift
            within = bound is None or drift["text_drift_general"] <= bound
            improved = val.miou > progress.best and within
            if self.dist.sharded:
                # Gathering the best weights is collective: every rank must agree to.
                improved = bool(distributed.all_reduce_min(int(improved), self.device))
            if improved:
                progress.best, progress.best_epoch = val.miou, epoch + 1
                if self.select == "best":  # the weights the next stage will start from
                    self.best_state = self.trainable_state()
            row = {"train_loss": tr["loss"], **val.figures, **drift,
                   "lr": self.scheduler.get_last_lr()[0]}
            self.history.append(row)
            progress.history = self.history
            progress.epoch = epoch + 1
            pf = val.presence_figures
            presence = "".join(f" {k}={pf[k]:.3f}" for k in ("presence_auroc", "il_mcc")
                               if k in pf)
            log.info("epoch %d/%d train_loss=%.4f val_loss=%.4f miou=%.4f dice=%.4f "
                     "sampled_class_iou=%.4f fp_rate=%.3f%s%s%s", epoch + 1, self.epochs,
                     tr["loss"], val.loss, val.miou, val.dice, val.sampled_class_iou, val.fp_rate,
                     presence, self._drift_note(drift, within),
                     " (best so far)" if progress.best_epoch == epoch + 1 else "")
            self._log_epoch(live, row)
            full = None
            if self.dist.sharded:  # gathered on rank 0, by every rank
                full = (sharding.full_state(self.model),
                        sharding.full_optimizer_state(self.model, self.optimizer))
            if self.dist.is_main:
                best = {f"best/{k}": v for k, v in (self.best_state or {}).items()}
                with self.frozen.full_precision():  # the saved deltas are over fp32 bases
                    self.store.save(progress, self.model, self.optimizer, self.scheduler,
                                    self.scaler, extra=best, base=self.base, full=full)
            distributed.barrier()
        if self.select == "best" and progress.best_epoch == 0:
            least = min(row["text_drift_general"] for row in self.history)
            raise UserError(f"stage{self.stage}.max_text_drift: every epoch drifted beyond "
                            f"{self.plan.max_text_drift} (the least: {least:.4f}); raise it or "
                            f"lower optim.clip_lr. No checkpoint was written")
        self.selected_epoch = progress.best_epoch if self.select == "best" else self.epochs
        if self.best_state is not None and self.selected_epoch != self.epochs:
            if self.dist.sharded:
                # Held by rank 0 (gathered there), or by every rank (read from the resume
                # state): rank 0's copy is broadcast either way.
                sharding.load_state(self.model, self.best_state, from_rank0=True)
            else:
                own = dict(self.model.named_parameters())
                with torch.no_grad():
                    for name, value in self.best_state.items():
                        own[name].copy_(value)
        log.info("stage%d keeps epoch %d of %d (%s.select: %s; val miou %.4f)", self.stage,
                 self.selected_epoch, self.epochs, f"stage{self.stage}", self.select,
                 self.history[self.selected_epoch - 1]["miou"])
        chosen = self.history[self.selected_epoch - 1]
        self._choose_instance_quality(chosen)
        return {
            **{k: chosen[k]
               for k in ("loss", "miou", "dice", "sampled_class_iou", "fp_rate", "text_drift",
                         "text_drift_general")},
            "best_miou": progress.best, "selected_epoch": self.selected_epoch,
            "epochs": self.epochs,
            "trainable_params": self.trainable_params, "total_params": self.total_params,
            "throughput_img_s": progress.train_images / max(progress.train_time, 1e-9),
            "peak_mem_mb": peak_memory_mb(self.device),
        }

    def _choose_instance_quality(self, chosen: dict[str, float]) -> None:
        """The kept model's ``min_quality`` for each decode path (best val cgF1 at the kept
        epoch's presence threshold), decoded with `InstanceConfig`'s defaults and a semantic
        threshold of 0.5: the training stages do not read ``evaluate``."""
        self.instance_min_quality = None
        val = self.packs.get("val") if self.packs else None
        if not self.model.has_instance_heads or val is None or val.objects is None or \
                "presence_threshold" not in chosen:
            return
        self.instance_min_quality, said = {}, []
        for decode in DECODE_MODES:
            quality, cgf1 = choose_thresholds(
                self.model, self.val_loader, val, self.objective, self.precision,
                InstanceConfig(decode=decode), 0.5, max(self.optim_cfg.batch_size, 32),
                chosen["presence_threshold"], self.cache)
            self.instance_min_quality[decode] = quality
            said.append(f"{decode} {quality:.2f} ({cgf1:.3f})")
        log.info("stage%d instances on val: presence threshold %.3f; min_quality (cgF1, or pmF1 "
                 "without negatives) %s", self.stage, chosen["presence_threshold"],
                 ", ".join(said))

    # ---- save
    def save(self, state: dict[str, torch.Tensor] | None = None) -> None:
        """Rank 0 writes the checkpoint; ``state``: the full state dict of a sharded model
        (`gather_for_save`)."""
        parent = parent_ref(self.paths.parent) if self.paths.parent else None
        extra = {
            **({"prompt_ensembles": self.objective.ensembles.to_dict()}
               if self.objective.ensembles else {}),
            "optim": to_dict(self.optim_cfg), "epochs": self.epochs, "sam_mode": self.sam_mode,
            "loss": to_dict(self.params.loss), "seed": self.params.seed,
            "data": drop_speed_values("data", to_dict(self.params.data)),
            "world_size": self.dist.world_size,
            "select": self.select, "selected_epoch": self.selected_epoch,
        }
        chosen = self.history[self.selected_epoch - 1] if self.history else {}
        if "presence_threshold" in chosen:
            # Chosen on val at the kept epoch: what prediction gates by.
            extra["presence_threshold"] = chosen["presence_threshold"]
        if self.instance_min_quality is not None:
            extra["instance_min_quality"] = self.instance_min_quality
        meta = CheckpointMeta(stage=self.stage, model=self.model_cfg, prompts=self.vocab,
                              parent=parent, extra=extra)
        if state is not None:
            save_checkpoint(self.paths.out, self.model, meta, self.base, state=state)
            return
        with self.frozen.full_precision():
            save_checkpoint(self.paths.out, self.model.cpu(), meta, self.base)
        self.model.to(self.device)

    def gather_for_save(self) -> dict[str, torch.Tensor] | None:
        """Sharded: the full state dict on rank 0 (every rank calls this); else None."""
        return sharding.full_state(self.model) if self.dist.sharded else None

    def run(self) -> dict[str, float]:
        from dvclive import Live

        self.setup()
        if not self.dist.is_main:
            summary = self.train(None)
            self.gather_for_save()
            distributed.barrier()  # rank 0 writes the outputs
            return summary
        with Live(str(self.paths.metrics), dvcyaml=False, save_dvc_exp=False,
                  report=None) as live:
            summary = self.train(live)
            self.save(self.gather_for_save())
            for key in ("epochs", "selected_epoch", "trainable_params", "total_params",
                        "throughput_img_s", "peak_mem_mb", "best_miou"):
                live.summary[key] = summary[key]
            live.summary["world_size"] = self.dist.world_size
            live.summary["batch_size"] = self.optim_cfg.batch_size  # a number, auto resolved
            live.summary["feature_cache_images"] = len(self.cache) if self.cache else 0
            live.summary["text_encoder_calls"] = self.model.clip_text.calls
            if self.objective.ensembles is not None:
                live.summary["template_draws"] = self.template_draws
            counts = {k: v["trainable"] for k, v in self.counts.items()}
            live.summary["trainable_by_component"] = counts
        self.store.clear()  # outputs are written: the scratch state has done its job
        distributed.barrier()
        log.info("stage%d done: epoch %d kept, val miou=%.4f dice=%.4f, %.1f img/s, peak %.0f "
                 "MB -> %s", self.stage, summary["selected_epoch"], summary["miou"],
                 summary["dice"], summary["throughput_img_s"],
                 summary["peak_mem_mb"], self.paths.out)
        return summary
