"""What each stage needs of a GPU's memory, known before anything runs (``cdsam plan``).

The model is built on the meta device (structure only, nothing allocated) and the curriculum is
replayed on it as ``cdsam summary`` does, so the parameter counts are exact. Bytes per rank:

- trainable parameters: fp32 weights, fp32 gradients and AdamW's two fp32 moments
  (`cdsam.training.batch_size.adamw_state_bytes`, the accounting ``optim.batch_size: auto``
  uses); under DDP one more copy of every gradient in its buckets (`ddp_bucket_bytes`);
- frozen parameters: as the trainer holds them (`cdsam.training.frozen_weights`'s own rule):
  under AMP the frozen linears and convolutions of the parts a step runs in bf16, the CLIP text
  tower, norms and embeddings in fp32; the SSL teacher (``loss.ssl_weight`` > 0) is a frozen
  copy of DINO held by the same rule;
- the feature cache: the frozen DINO prefix of every training image, at most
  ``train.feature_cache_mb`` (it lives on the training device);
- activations per image: the forward pass runs on fake tensors (`FakeTensorMode`: shapes,
  dtypes and the real kernels' choices, no data) under the run's autocast, with the frozen
  weights held as above, and every tensor autograd saves for the backward pass is counted once
  (parameters left out), at two batch sizes: per image is the slope, and what does not grow
  with the batch (autocast's bf16 copies of the weights that train) is a fixed term. With
  ``train.activation_checkpointing`` a trained block keeps only its input, and one block's
  activations come back while it is recomputed. Image-major batches (``data.batch_by:
  image``) count images and samples apart: a third probe decodes more prompts against the
  same images, which gives the decoder's bytes per sample; DINO's are the rest, per image, so
  one image of the batch costs DINO once and the decoder P times (P prompts an image).

FSDP2 figures follow what ``CDSAM_PARALLEL=fsdp`` builds (`cdsam.training.sharding`): every
DINO block, the SAM decoder, the token projection and the root sharded over the GPUs, so a rank
holds 1/N of every parameter (fp32, frozen ones too), gradient and moment, plus the two largest
blocks gathered in the compute dtype (the one running and the one prefetched); the CLIP text
tower and an SSL teacher stay whole (fp32) on every rank.
A stage fits when its batch (or 1 for ``auto``) fits `AUTO_MEMORY_SHARE` of the GPU's memory.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cdsam.config.schema import AUTO, Params
from cdsam.config.stages import StagePlan, curriculum_to, stages
from cdsam.data.prepared import read_index
from cdsam.errors import UserError
from cdsam.models.dino import dino_width, set_activation_checkpointing
from cdsam.models.model import CDSAM, build_model
from cdsam.training.batch_size import AUTO_MEMORY_SHARE, adamw_state_bytes, ddp_bucket_bytes
from cdsam.training.curriculum import apply_plan
from cdsam.training.feature_cache import frozen_prefix_end
from cdsam.training.frozen_weights import held_parameters, held_parts

MODES = ("ddp", "fsdp")
PROBE_IMAGES = (2, 4)  # the fake forward's batches: activations are the slope between them
AMP_DTYPE = torch.bfloat16


@dataclass
class StageMemory:
    """One stage's memory, in bytes: what a rank holds whatever the batch, and per image."""

    stage: int
    trainable_params: int
    frozen_params: int
    weights: int  # trainable fp32 + frozen as held
    gradients: int
    optimizer: int
    ddp_buckets: int  # per rank under DDP with more than one GPU
    frozen_weights: int  # the frozen part of `weights`
    fsdp_sharded_frozen: int  # frozen bytes FSDP shards (fp32: no held copies there)
    fsdp_replicated: int  # bytes whole on every FSDP rank: the CLIP text tower, a teacher
    feature_cache: int
    largest_block: int  # one DINO block's parameters in the compute dtype (FSDP gathers)
    # Per (image, prompt) row: plain, checkpointed (DINO's part + the decoder's).
    activations: dict[str, int] = field(default_factory=dict)
    decoder_per_sample: int = 0  # the part of a row's that the decoder saves, per prompt
    # data.batch_by: image: the prompts a batch image brings (None: sample-major batches).
    prompts_per_image: float | None = None
    # Saved for the backward pass whatever the batch (autocast's copies of trained weights).
    saved_fixed: dict[str, int] = field(default_factory=dict)
    checkpointing: bool = False
    batch: int | str = 1
    start_block: int = 0  # the first DINO block a step runs (the cache holds the ones before)

    def activations_per_image(self, checkpointing: bool | None = None) -> int:
        """Bytes per unit of ``optim.batch_size``: a row, or an image-major batch's image (its
        DINO pass once, its prompts' decodes P times)."""
        on = self.checkpointing if checkpointing is None else checkpointing
        row = self.activations["checkpointed" if on else "plain"]
        if self.prompts_per_image is None:
            return row
        dino = max(0, row - self.decoder_per_sample)
        return dino + math.ceil(self.prompts_per_image * self.decoder_per_sample)

    def fixed(self, mode: str, gpus: int, checkpointing: bool | None = None) -> int:
        """Bytes a rank holds before any activation that grows with the batch."""
        trainable = self.weights - self.frozen_weights + self.gradients + self.optimizer
        if mode == "ddp":
            buckets = self.ddp_buckets if gpus > 1 else 0
            on = self.checkpointing if checkpointing is None else checkpointing
            saved = self.saved_fixed.get("checkpointed" if on else "plain", 0)
            return trainable + buckets + self.frozen_weights + self.feature_cache + saved
        # FSDP gathers the weights in the compute dtype: autocast makes no copies of them.
        shards = math.ceil((trainable + self.fsdp_sharded_frozen) / gpus)
        return shards + self.fsdp_replicated + 2 * self.largest_block + self.feature_cache

    def per_rank(self, mode: str, gpus: int, batch: int,
                 checkpointing: bool | None = None) -> int:
        return self.fixed(mode, gpus, checkpointing) + \
            batch * self.activations_per_image(checkpointing)

    def max_batch(self, mode: str, gpus: int, memory: int,
                  checkpointing: bool | None = None) -> int:
        """The largest batch a rank holds within the usable share of ``memory`` (0: none)."""
        room = AUTO_MEMORY_SHARE * memory - self.fixed(mode, gpus, checkpointing)
        return max(0, int(room // max(self.activations_per_image(checkpointing), 1)))

    @property
    def planned_batch(self) -> int:
        return 1 if self.batch == AUTO else int(self.batch)


def _held_bytes(n: int, amp: bool) -> int:
    return n * (2 if amp else 4)


def _bytes_as_held(params: list[torch.nn.Parameter], modules: list[torch.nn.Module],
                   amp: bool, frozen: Callable[[torch.nn.Parameter], bool] | None = None) -> int:
    """Device bytes of ``params`` as the trainer holds them: under AMP the ones
    `hold_for_stage`'s rule (`held_parameters` of ``modules``) casts in bf16, the rest (the
    CLIP text tower, norms, embeddings) fp32."""
    rule = {} if frozen is None else {"frozen": frozen}
    held = {id(p) for p in held_parameters(modules, AMP_DTYPE, **rule)} if amp else set()
    return sum(p.numel() * (2 if id(p) in held else 4) for p in params)


def _saved_activations(model: CDSAM, start: int, amp: bool, crop: int
                       ) -> tuple[dict[str, int], dict[str, int], int]:
    """Bytes autograd saves for the backward pass through ``model`` (turned into fake tensors
    in place), without and with activation checkpointing: (per image, whatever the batch,
    the decoder's per prompt decoded against an image already encoded).

    Per image is the slope between two batch sizes; what does not grow with the batch (under
    AMP, autocast's bf16 copies of the weights that train, saved once per use) is the
    intercept. The frozen weights are first held in bf16 as the trainer holds them, so their
    casts are not counted."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    per_image: dict[str, int] = {}
    fixed: dict[str, int] = {}
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = model.to_empty(device="cpu")
        if amp:
            for p in held_parameters(held_parts(fake, None), AMP_DTYPE):
                p.data = p.data.to(AMP_DTYPE)
        params = {p.untyped_storage()._cdata for p in fake.parameters()}

        def saved_by(n: int, prompts_each: int) -> int:
            images = torch.empty(n, 3, crop, crop)
            prompts = [f"prompt {i}" for i in range(n * prompts_each)]
            image_of = None if prompts_each == 1 else \
                torch.arange(n).repeat_interleave(prompts_each)
            seen: dict[int, int] = {}

            def pack(t: torch.Tensor) -> torch.Tensor:
                storage = t.untyped_storage()
                if storage._cdata not in params:
                    seen[storage._cdata] = storage.nbytes()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                    torch.autocast("cpu", AMP_DTYPE, enabled=amp):
                prefix = None
                if start:
                    with torch.no_grad():
                        prefix = fake.dino_prefix(images, start)
                result = fake(images, prompts, prefix=prefix, start_block=start,
                              image_of=image_of)
                del result
            return sum(seen.values())

        for name, on in (("plain", False), ("checkpointed", True)):
            set_activation_checkpointing(fake.dino, on)
            (a, na), (b, nb) = ((saved_by(n, 1), n) for n in PROBE_IMAGES)
            per_image[name] = max(0, (b - a) // (nb - na))
            fixed[name] = max(0, a - na * per_image[name])
        # The same images, twice the prompts each: what one more prompt of an image costs.
        n = PROBE_IMAGES[0]
        per_sample = max(0, (saved_by(n, 2) - saved_by(n, 1)) // n)
    return per_image, fixed, per_sample


def _stage_model(params: Params, chain: list[StagePlan]) -> CDSAM:
    model = build_model(params.model, seed=params.seed, meta=True)
    for plan in chain:
        apply_plan(model, plan)
    if params.loss.clip_align_weight == 0 and not model.has_instance_heads:
        model.token_proj.requires_grad_(False)
    return model


def plan_memory(params: Params, stage: int, amp: bool = True,
                prompts_per_image: float | None = None) -> StageMemory:
    """Stage ``stage``'s memory as params say (``amp``: CUDA's bf16 autocast; else fp32).
    ``prompts_per_image``: under ``data.batch_by: image``, the prompts a batch image brings
    (`prompts_per_image` finds them)."""
    chain = curriculum_to(params, stage)
    model = _stage_model(params, chain)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    dino_trains = any(p.requires_grad for p in model.dino.parameters())
    teacher = sum(p.numel() for p in model.dino.parameters()) \
        if params.loss.ssl_weight > 0 and dino_trains else 0
    frozen_bytes = _bytes_as_held([p for p in model.parameters() if not p.requires_grad],
                                  held_parts(model, None), amp)
    if teacher:  # a frozen copy of DINO, held by the same rule
        frozen_bytes += _bytes_as_held(list(model.dino.parameters()), [model.dino], amp,
                                       frozen=lambda p: True)
    clip = sum(p.numel() for p in model.clip_text.parameters())

    cache_on = params.train.feature_cache and not params.data.augment.enable
    start = frozen_prefix_end(model) if cache_on else 0
    cache = 0
    if start:
        tokens = (params.data.crop // model.patch_size) ** 2 + model.dino.num_prefix_tokens
        images = _train_images(params)
        per_image = tokens * dino_width(model.dino) * (2 if amp else 4)
        cache = min(params.train.feature_cache_mb * 2**20, per_image * images)
    block = max(sum(p.numel() for p in b.parameters()) for b in model.dino.blocks)
    ddp_buckets, adam = ddp_bucket_bytes(model, 2), adamw_state_bytes(model)
    activations, saved_fixed, per_sample = _saved_activations(model, start, amp,
                                                              params.data.crop)
    ran = model.depth - start
    if dino_trains and ran:
        # While a checkpointed block is recomputed its activations are held again.
        activations["checkpointed"] += max(
            0, (activations["plain"] - activations["checkpointed"]) // ran)
    else:
        activations["checkpointed"] = activations["plain"]
        saved_fixed["checkpointed"] = saved_fixed["plain"]

    return StageMemory(
        stage=stage, trainable_params=trainable, frozen_params=frozen + teacher,
        weights=4 * trainable + frozen_bytes, gradients=4 * trainable,
        optimizer=adam, ddp_buckets=ddp_buckets,
        frozen_weights=frozen_bytes, fsdp_sharded_frozen=4 * (frozen - clip),
        fsdp_replicated=4 * (clip + teacher), feature_cache=cache,
        largest_block=_held_bytes(block, amp), activations=activations,
        saved_fixed=saved_fixed, decoder_per_sample=per_sample,
        prompts_per_image=prompts_per_image if params.data.batch_by == "image" else None,
        checkpointing=params.train.activation_checkpointing,
        batch=chain[-1].optim.batch_size, start_block=start)


def prompts_per_image(params: Params, given: float | None, prepared: Path | None
                      ) -> tuple[float | None, str]:
    """(the prompts an image-major batch's image brings, where that number comes from):
    ``given`` (``--prompts-per-image``), else the mean over the prepared train split (capped by
    ``data.prompts_per_image``), else that cap, else 1 (a lower bound, said so); None for
    sample-major batches."""
    if params.data.batch_by != "image":
        return None, ""
    if given is not None:
        if given < 1:
            raise UserError(f"--prompts-per-image: must be >= 1, got {given}")
        return given, "--prompts-per-image"
    cap = params.data.prompts_per_image
    if prepared is not None and (prepared / "index.json").is_file():
        train = read_index(prepared)["splits"].get("train", {})
        if train.get("images"):
            mean = train["samples"] / train["images"]
            return (min(mean, cap) if cap is not None else mean), f"the mean of {prepared}"
    if cap is not None:
        return float(cap), "data.prompts_per_image"
    return 1.0, "assumed: no prepared data; a lower bound, --prompts-per-image sets it"


def _train_images(params: Params) -> int:
    """Training images the cache may hold: the synthetic source's count, else unknown (the
    budget then bounds it)."""
    pc = params.prepare
    if pc.source == "synthetic":
        return math.ceil(pc.synthetic.num_images * (1 - pc.val_fraction - pc.test_fraction))
    return 10**9


def _advice(mem: StageMemory, params: Params, gpus: int, memory: int) -> str:
    """One line: fits, or what would make it fit."""
    batch = mem.planned_batch
    if mem.max_batch("ddp", gpus, memory) >= batch:
        return f"fits under DDP (up to batch {mem.max_batch('ddp', gpus, memory)} a GPU)"
    ideas = []
    if not mem.checkpointing and mem.max_batch("ddp", gpus, memory, True) >= batch:
        ideas.append("train.activation_checkpointing: true")
    if mem.stage == max(stages()) and params.stage(mem.stage).dino_trainable_blocks in (
            None, "all"):
        part = _partial(params, mem.stage)
        if part is not None and part[1].max_batch("ddp", gpus, memory, True) >= batch:
            ideas.append(f"stage{mem.stage}.dino_trainable_blocks: {part[0]} "
                         f"(with checkpointing)")
    if mem.max_batch("fsdp", gpus, memory) >= batch and gpus > 1:
        ideas.append(f"CDSAM_PARALLEL=fsdp over the {gpus} GPUs")
    elif mem.max_batch("fsdp", gpus, memory, True) >= batch and gpus > 1:
        ideas.append(f"CDSAM_PARALLEL=fsdp over the {gpus} GPUs (with checkpointing)")
    fit = mem.max_batch("ddp", gpus, memory, True)
    if fit >= 1:
        ideas.append(f"batch {fit} with checkpointing (optim.grad_accum_steps keeps the "
                     f"effective batch)")
    if not ideas:
        return "does not fit: nothing cdsam offers makes it fit on these GPUs"
    return "does not fit under DDP; would fit with " + ", or ".join(ideas)


def _partial(params: Params, stage: int) -> tuple[int, StageMemory] | None:
    depth = _stage_model(params, curriculum_to(params, stage)).depth
    k = max(1, depth // 4)
    if k >= depth:
        return None
    over = dataclasses.replace(params.stage(stage), dino_trainable_blocks=k)
    return k, plan_memory(dataclasses.replace(params, **{f"stage{stage}": over}), stage)


def plan_report(params: Params, gpu_memory: int, gpus: int, amp: bool = True,
                prompts_per_image: float | None = None, prompts_from: str = ""
                ) -> dict[str, Any]:
    """``cdsam plan --json``: every stage's parts, per-rank bytes, largest batch, fit, advice.
    Under ``data.batch_by: image`` a batch counts images, each bringing ``prompts_per_image``
    prompts."""
    out: dict[str, Any] = {"gpu_memory": gpu_memory, "gpus": gpus, "amp": amp,
                           "usable_share": AUTO_MEMORY_SHARE, "batch_by": params.data.batch_by,
                           "prompts_per_image": prompts_per_image,
                           "prompts_from": prompts_from, "stages": {}}
    for stage in stages():
        mem = plan_memory(params, stage, amp, prompts_per_image)
        batch = mem.planned_batch
        out["stages"][f"stage{stage}"] = {
            "batch": mem.batch, "activation_checkpointing": mem.checkpointing,
            "trainable_params": mem.trainable_params, "frozen_params": mem.frozen_params,
            "bytes": {"weights": mem.weights, "gradients": mem.gradients,
                      "optimizer": mem.optimizer, "ddp_buckets": mem.ddp_buckets,
                      "frozen_weights": mem.frozen_weights, "feature_cache": mem.feature_cache,
                      "saved_whatever_batch": mem.saved_fixed[
                          "checkpointed" if mem.checkpointing else "plain"]},
            "activations_per_image": mem.activations,
            "decoder_per_sample": mem.decoder_per_sample,
            "activations_per_batch_unit": {
                "plain": mem.activations_per_image(False),
                "checkpointed": mem.activations_per_image(True)},
            "bytes_per_rank": {m: mem.per_rank(m, gpus, batch) for m in MODES},
            "max_batch": {m: mem.max_batch(m, gpus, gpu_memory) for m in MODES},
            "fits": {m: mem.max_batch(m, gpus, gpu_memory) >= batch for m in MODES},
            "advice": _advice(mem, params, gpus, gpu_memory),
        }
    return out


def plan_table(report: dict[str, Any]) -> str:
    """The report as the lines ``cdsam plan`` prints."""
    gib = 2**30
    unit = "" if report.get("prompts_per_image") is None else \
        (f", image-major batches: a batch counts images, {report['prompts_per_image']:.1f} "
         f"prompts each ({report.get('prompts_from') or 'given'}; act/img: DINO once + the "
         f"decoder per prompt)")
    lines = [f"{report['gpus']} GPU(s) of {report['gpu_memory'] / gib:.0f} GiB, "
             f"{report['usable_share']:.0%} usable, {'bf16 AMP' if report['amp'] else 'fp32'}"
             + unit,
             f"{'stage':<7}{'trainable':>13}{'fixed DDP':>11}{'act/img':>9}{'ckpt/img':>9}"
             f"{'DDP/rank':>10}{'FSDP/rank':>10}{'max b DDP':>10}{'FSDP':>6}"]
    for name, s in report["stages"].items():
        b = s["bytes"]
        fixed = sum(b[k] for k in ("weights", "gradients", "optimizer", "feature_cache",
                                   "saved_whatever_batch")) + (
            b["ddp_buckets"] if report["gpus"] > 1 else 0)
        act = s["activations_per_batch_unit"]
        lines.append(f"{name:<7}{s['trainable_params']:>13,}{fixed / gib:>10.2f}G"
                     f"{act['plain'] / gib:>8.3f}G{act['checkpointed'] / gib:>8.3f}G"
                     f"{s['bytes_per_rank']['ddp'] / gib:>9.2f}G"
                     f"{s['bytes_per_rank']['fsdp'] / gib:>9.2f}G"
                     f"{s['max_batch']['ddp']:>10}{s['max_batch']['fsdp']:>6}")
    lines.append("")
    lines += [f"{name}: {s['advice']}" for name, s in report["stages"].items()]
    return "\n".join(lines)


def parse_bytes(text: str) -> int:
    """``80GB``, ``80GiB``, ``141G``, ``512MB`` → bytes (GB read as GiB, as GPUs are sold)."""
    units = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    t = text.strip().lower().replace("ib", "").rstrip("b")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units and t[-1].isalpha() else (t, "")
    try:
        value = float(num)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (e.g. 80GB)") from None
    if value <= 0:
        raise ValueError(f"not a size: {text!r} (must be > 0)")
    return int(value * units[unit])
