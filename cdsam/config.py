"""Typed params: every section of ``params.yaml`` as a dataclass, validated as a whole.

Parsing collects every problem (unknown keys with the nearest valid name, wrong types, out of
range values, cross-field conflicts) and raises one :class:`ConfigError` listing them all, each
line naming the params key and the bad value. Nothing here touches weights or files other
than ``params.yaml``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import operator
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cdsam.errors import ConfigError, UserError

SAM1_TYPES = ("vit_b", "vit_l", "vit_h")
# SAM 2 / 2.1 checkpoints by their config names in Meta's sam2 package (configs/sam2*/).
SAM2_TYPES = tuple(f"{v}_hiera_{s}" for v in ("sam2", "sam2.1") for s in ("t", "s", "b+", "l"))
SAM_TYPES = SAM1_TYPES + SAM2_TYPES
SAM_MODES = ("lora", "frozen", "full")
SOURCES = ("synthetic", "folders", "voc", "coco")
NEGATIVES = ("none", "absent")
MASK_FORMATS = ("binary", "indexed", "per_class")
FITS = ("crop", "pad")
SELECT = ("best", "last")
STAGES = (1, 2, 3, 4)


@dataclass
class DinoConfig:
    name: str = "vit_small_patch16_224"  # any timm ViT or Eva (DINOv3); a tag (".dino") picks hub weights
    pretrained: bool = False  # fetch the named hub weights (needs network or HF cache)
    checkpoint: str | None = None  # a local weights file in timm's format; wins over the hub
    # Size overrides passed to timm.create_model; null (or absent) keeps the named model's own
    # value, except img_size: null builds the model for data.crop (timm resamples the
    # positional embeddings of the weights once, as they load). The embedded default's toy
    # sizes live in params.yaml only.
    img_size: int | None = None
    patch_size: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    drop_path_rate: float = 0.0


@dataclass
class ClipConfig:
    name: str = "cdsam-tiny-text"  # an open_clip model name; the default is our tiny tower
    pretrained: str | None = None  # an open_clip tag ("openai"), a weights file or a hub repo folder


@dataclass
class SamConfig:
    type: str = "vit_b"  # SAM 1 vit_b/l/h, or SAM 2 / 2.1 (sam2.1_hiera_b+, …; needs sam2)
    checkpoint: str | None = None  # an official SAM .pth (or .safetensors) file
    # Clicks and boxes also drawn as a map through SAM's mask-input encoder (trained in every
    # stage): what makes them matter when the decoder is not SAM's own (docs/default.md).
    prompt_map: bool = True
    click_radius: float = 2.0  # a click's disk in that map, in DINO tokens (patches)


@dataclass
class HeadsConfig:
    num_text_tokens: int = 4  # sparse prompt tokens made from one CLIP text feature


@dataclass
class ModelConfig:
    dino: DinoConfig = field(default_factory=DinoConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    sam: SamConfig = field(default_factory=SamConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)


@dataclass
class SamLoraConfig:
    enable: bool = True
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["attn", "mlp", "proj", "lin"])


@dataclass
class DinoLoraConfig(SamLoraConfig):
    last_k_blocks: int = 2  # adapters go on DINO blocks depth-K … depth-1
    targets: list[str] = field(default_factory=lambda: ["qkv", "proj", "fc1", "fc2"])


@dataclass
class LoraConfig:
    sam: SamLoraConfig = field(default_factory=SamLoraConfig)
    dino: DinoLoraConfig = field(default_factory=DinoLoraConfig)


AUTO = "auto"
LR_SCALINGS = ("linear", "sqrt", "none")


@dataclass
class OptimConfig:
    # An integer, or auto: the largest power of two that fits the device (cdsam.batch_size;
    # 16 on the CPU), the LRs below then scaled from batch 16 by `lr_scaling`.
    batch_size: int | str = 16
    lr: float = 1e-3  # base group: heads (and DINO in stage 4)
    lora_lr: float = 1e-3  # LoRA group, weight decay 0
    wd: float = 0.01
    grad_clip: float = 1.0  # max grad norm; 0 disables clipping
    grad_accum_steps: int = 1
    warmup_steps: int = 20  # linear warmup, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.05
    lr_scaling: str = "sqrt"  # batch_size auto: LRs scale by sqrt(chosen/16), chosen/16 (linear), or not
    auto_batch_max: int = 1024  # batch_size auto: the largest batch it may pick


OPTIM_KEYS = tuple(f.name for f in dataclasses.fields(OptimConfig))


@dataclass
class LossConfig:
    dice_weight: float = 1.0
    bce_weight: float = 1.0
    clip_align_weight: float = 0.1  # mask-pooled image tokens vs. prompt text features
    clip_temperature: float = 0.07
    ssl_weight: float = 0.0  # cosine distillation to the frozen stage-start DINO


@dataclass
class StageConfig:
    epochs: int = 1
    sam_mode: str | None = None  # stage 4 only: lora | frozen | full
    select: str = "best"  # keep the best-val-mIoU epoch, or the last one
    # Per-stage overrides of `optim`; null keeps the `optim` value.
    batch_size: int | str | None = None
    lr: float | None = None
    lora_lr: float | None = None
    wd: float | None = None
    grad_clip: float | None = None
    grad_accum_steps: int | None = None
    warmup_steps: int | None = None
    min_lr_ratio: float | None = None
    lr_scaling: str | None = None
    auto_batch_max: int | None = None


@dataclass
class AugmentConfig:
    """Seeded train-time augmentation, applied to image and mask together (never val/test)."""

    enable: bool = False
    hflip: float = 0.5  # probability of a horizontal flip
    scale: float = 0.3  # random resized crop keeps 1-scale … 1 of the area (0: off)
    rotate: float = 10.0  # degrees, ± (0: off); uncovered pixels are ignore in the mask
    colour: float = 0.2  # brightness / contrast / saturation jitter (0: off)


@dataclass
class DataConfig:
    fit: str = "pad"  # crop: Resize(resize) → CenterCrop(crop); pad: longer side → crop, pad
    resize: int = 64  # crop fit: shorter side before the centre crop
    crop: int = 64  # square input fed to DINO; a multiple of the patch size
    memory_mb: int = 4096  # a split's prepared rows memory-mapped up to this; beyond, read per batch
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class TrainConfig:
    """Shared by the training stages: spatial prompt training, then speed knobs (which do not
    change what is learned)."""

    # Probability per sample of a positive click inside the target (plus, half the time, a
    # negative click outside) / of a jittered box, next to the text (seeded; see
    # cdsam.data.spatial). 0 trains text prompts only.
    point_prompts: float = 0.25
    box_prompts: float = 0.25
    feature_cache: bool = True  # compute the frozen DINO prefix once per image
    feature_cache_mb: int = 4096  # memory budget; images beyond it are recomputed each step
    compile: bool = False  # torch.compile the model (CUDA mostly; needs a C++ compiler on CPU)


@dataclass
class SyntheticConfig:
    num_images: int = 600
    image_size: int = 64
    min_objects: int = 2
    max_objects: int = 4


@dataclass
class PrepareConfig:
    source: str = "synthetic"
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    on_bad_file: str = "error"  # error | skip
    # absent: prompts of classes not in an image become empty-mask samples (seeded)
    negatives: str = "absent"  # none | absent
    negatives_per_image: int = 1  # absent-class prompts drawn per image (0: all absent classes)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    # folders source (images also: coco)
    images: str | None = None
    masks: str | None = None
    mask_format: str = "binary"  # binary (one prompt) | indexed (0 bg, k = classes[k-1]) | per_class
    prompt: str | None = None
    # voc source
    root: str | None = None
    prompt_template: str = "a photo of a {}"
    classes: list[str] | None = None  # voc / coco / multi-class folders: the class names
    binary: bool = False
    # coco source: instances JSON; val/test from their own files, else from the fractions
    annotations: str | None = None
    val_annotations: str | None = None
    val_images: str | None = None  # default: prepare.images
    test_annotations: str | None = None
    test_images: str | None = None


@dataclass
class EvaluateConfig:
    batch_size: int = 64
    threshold: float = 0.5
    num_overlays: int = 4
    # Also score positives with text + one click and text + the tight box (miou_click,
    # miou_box): two more passes over the split.
    spatial_prompts: bool = True


@dataclass
class Params:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stage1: StageConfig = field(default_factory=lambda: StageConfig(epochs=3))
    stage2: StageConfig = field(default_factory=lambda: StageConfig(epochs=3))
    stage3: StageConfig = field(default_factory=lambda: StageConfig(epochs=4, lr=3e-4,
                                                                    lora_lr=3e-4))
    stage4: StageConfig = field(default_factory=lambda: StageConfig(epochs=4, lr=3e-4,
                                                                    sam_mode="lora"))
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def stage(self, n: int) -> StageConfig:
        return getattr(self, f"stage{n}")

    def optim_for(self, n: int) -> OptimConfig:
        """`optim` with the stage section's non-null overrides applied."""
        st = self.stage(n)
        over = {k: getattr(st, k) for k in OPTIM_KEYS if getattr(st, k) is not None}
        return dataclasses.replace(self.optim, **over)


# --------------------------------------------------------------------------- parsing


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = tuple(a for a in typing.get_args(tp) if a is not type(None))
        optional = len(args) < len(typing.get_args(tp))
        if len(args) == 1:
            return args[0], optional
        return functools.reduce(operator.or_, args), optional
    return tp, False


def _coerce(value: Any, tp: Any, key: str, errors: list[str], base: Any = None) -> Any:
    inner, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        errors.append(f"{key}: must not be null")
        return None
    if _is_dataclass_type(inner):
        return _parse_section(inner, value, key, errors, base)
    if typing.get_origin(inner) in (typing.Union, types.UnionType):
        # `int | str` (a number or a word such as auto): the first type that takes the value;
        # validation then checks the word.
        for option in typing.get_args(inner):
            trial: list[str] = []
            parsed = _coerce(value, option, key, trial)
            if not trial:
                return parsed
        names = " or ".join({int: "an integer", str: "a string", float: "a number"}.get(o, str(o))
                            for o in typing.get_args(inner))
        errors.append(f"{key}: expected {names}, got {value!r}")
        return None
    if inner is bool:
        if isinstance(value, bool):
            return value
        errors.append(f"{key}: expected true or false, got {value!r}")
        return None
    if inner is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        errors.append(f"{key}: expected an integer, got {value!r}")
        return None
    if inner is float:
        # YAML 1.1 reads `1e-3` (no dot) as a string; accept it as the number it means.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        errors.append(f"{key}: expected a number, got {value!r}")
        return None
    if inner is str:
        if isinstance(value, str):
            return value
        errors.append(f"{key}: expected a string, got {value!r}")
        return None
    if typing.get_origin(inner) is list:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        errors.append(f"{key}: expected a list of strings, got {value!r}")
        return None
    raise TypeError(f"unsupported config type {tp} for {key}")  # a bug, not user input


def _parse_section(cls: type, data: Any, prefix: str, errors: list[str], base: Any = None) -> Any:
    """``data`` over ``base`` (the section's default instance): keys left out keep the
    defaults of *this* section (stage3's LR, not StageConfig's)."""
    base = cls() if base is None else base
    if not isinstance(data, dict):
        errors.append(f"{prefix}: expected a mapping, got {data!r}")
        return base
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            hint = f" (did you mean {prefix + '.' if prefix else ''}{near[0]}?)" if near else ""
            valid = ", ".join(names)
            errors.append(f"{full}: unknown key{hint}; valid keys here: {valid}")
            continue
        parsed = _coerce(value, hints[key], full, errors, getattr(base, key))
        if parsed is not None or value is None:
            kwargs[key] = parsed
    return dataclasses.replace(base, **kwargs)


# --------------------------------------------------------------------------- validation


def _check(cond: bool, key: str, value: Any, what: str, errors: list[str]) -> None:
    if not cond:
        errors.append(f"{key}: {what}, got {value!r}")


def _validate_lora(cfg: SamLoraConfig | DinoLoraConfig, prefix: str, errors: list[str]) -> None:
    _check(cfg.rank >= 1, f"{prefix}.rank", cfg.rank, "must be >= 1", errors)
    _check(cfg.alpha > 0, f"{prefix}.alpha", cfg.alpha, "must be > 0", errors)
    _check(0 <= cfg.dropout < 1, f"{prefix}.dropout", cfg.dropout, "must be in [0, 1)", errors)
    _check(bool(cfg.targets), f"{prefix}.targets", cfg.targets, "must not be empty", errors)


def _validate_optim(cfg: OptimConfig | StageConfig, prefix: str, errors: list[str]) -> None:
    def val(name: str) -> Any:
        return getattr(cfg, name)

    for name in ("lr", "lora_lr", "wd", "grad_clip"):
        if val(name) is not None:
            _check(val(name) >= 0, f"{prefix}.{name}", val(name), "must be >= 0", errors)
    bs = val("batch_size")
    if isinstance(bs, str):
        _check(bs == AUTO, f"{prefix}.batch_size", bs, "must be an integer >= 1 or auto", errors)
    elif bs is not None:
        _check(bs >= 1, f"{prefix}.batch_size", bs, "must be >= 1 or auto", errors)
    for name in ("grad_accum_steps", "auto_batch_max"):
        if val(name) is not None:
            _check(val(name) >= 1, f"{prefix}.{name}", val(name), "must be >= 1", errors)
    if val("lr_scaling") is not None:
        _check(val("lr_scaling") in LR_SCALINGS, f"{prefix}.lr_scaling", val("lr_scaling"),
               f"must be one of {', '.join(LR_SCALINGS)}", errors)
    if val("warmup_steps") is not None:
        w = val("warmup_steps")
        _check(w >= 0, f"{prefix}.warmup_steps", w, "must be >= 0", errors)
    if val("min_lr_ratio") is not None:
        m = val("min_lr_ratio")
        _check(0 <= m <= 1, f"{prefix}.min_lr_ratio", m, "must be in [0, 1]", errors)


def validate(p: Params, errors: list[str]) -> None:
    """Range and cross-field checks; appends one line per problem."""
    d = p.model.dino
    for name in ("img_size", "patch_size", "embed_dim", "depth", "num_heads"):
        v = getattr(d, name)
        if v is not None:
            _check(v >= 1, f"model.dino.{name}", v, "must be >= 1", errors)
    _check(0 <= d.drop_path_rate < 1, "model.dino.drop_path_rate", d.drop_path_rate,
           "must be in [0, 1)", errors)
    _check(p.model.sam.type in SAM_TYPES, "model.sam.type", p.model.sam.type,
           f"must be one of {', '.join(SAM_TYPES)}", errors)
    _check(p.model.sam.click_radius > 0, "model.sam.click_radius", p.model.sam.click_radius,
           "must be > 0", errors)
    _check(p.model.heads.num_text_tokens >= 1, "model.heads.num_text_tokens",
           p.model.heads.num_text_tokens, "must be >= 1", errors)
    _validate_lora(p.lora.sam, "lora.sam", errors)
    _validate_lora(p.lora.dino, "lora.dino", errors)
    k = p.lora.dino.last_k_blocks
    _check(k >= 1, "lora.dino.last_k_blocks", k, "must be >= 1", errors)
    if d.depth is not None and k > d.depth:
        errors.append(f"lora.dino.last_k_blocks: {k} is larger than model.dino.depth ({d.depth})")
    _validate_optim(p.optim, "optim", errors)
    for loss_key in ("dice_weight", "bce_weight", "clip_align_weight", "ssl_weight"):
        v = getattr(p.loss, loss_key)
        _check(v >= 0, f"loss.{loss_key}", v, "must be >= 0", errors)
    _check(p.loss.clip_temperature > 0, "loss.clip_temperature", p.loss.clip_temperature,
           "must be > 0", errors)
    for n in STAGES:
        st = p.stage(n)
        _check(st.epochs >= 1, f"stage{n}.epochs", st.epochs, "must be >= 1", errors)
        _check(st.select in SELECT, f"stage{n}.select", st.select,
               f"must be one of {', '.join(SELECT)}", errors)
        _validate_optim(st, f"stage{n}", errors)
        if n == 4:
            mode = st.sam_mode or "lora"
            _check(mode in SAM_MODES, "stage4.sam_mode", st.sam_mode,
                   f"must be one of {', '.join(SAM_MODES)}", errors)
        elif st.sam_mode is not None:
            errors.append(f"stage{n}.sam_mode: only stage4 has a SAM mode, got {st.sam_mode!r}")
    dc = p.data
    _check(dc.fit in FITS, "data.fit", dc.fit, f"must be one of {', '.join(FITS)}", errors)
    _check(dc.crop >= 1, "data.crop", dc.crop, "must be >= 1", errors)
    if dc.fit == "crop":
        _check(dc.crop <= dc.resize, "data.crop", dc.crop,
               f"must be <= data.resize ({dc.resize})", errors)
    au = dc.augment
    _check(0 <= au.hflip <= 1, "data.augment.hflip", au.hflip, "must be in [0, 1]", errors)
    _check(0 <= au.scale < 1, "data.augment.scale", au.scale, "must be in [0, 1)", errors)
    _check(0 <= au.rotate <= 180, "data.augment.rotate", au.rotate, "must be in [0, 180]",
           errors)
    _check(0 <= au.colour < 1, "data.augment.colour", au.colour, "must be in [0, 1)", errors)
    if d.img_size is not None and d.img_size != dc.crop:
        errors.append(f"model.dino.img_size: {d.img_size} differs from data.crop ({dc.crop}); "
                      f"set it to null to build the DINO for data.crop")
    if d.patch_size is not None and d.patch_size >= 1 and dc.crop % d.patch_size:
        errors.append(f"data.crop: {dc.crop} is not divisible by model.dino.patch_size "
                      f"({d.patch_size})")
    _check(dc.memory_mb >= 0, "data.memory_mb", dc.memory_mb, "must be >= 0 (MB)",
           errors)
    for key in ("point_prompts", "box_prompts"):
        v = getattr(p.train, key)
        _check(0 <= v <= 1, f"train.{key}", v, "must be in [0, 1]", errors)
    _check(p.train.feature_cache_mb >= 0, "train.feature_cache_mb", p.train.feature_cache_mb,
           "must be >= 0", errors)
    _check(p.device == "auto" or p.device == "cpu" or p.device.startswith("cuda"), "device",
           p.device, "must be auto, cpu, cuda or cuda:N", errors)
    pr = p.prepare
    _check(pr.source in SOURCES, "prepare.source", pr.source,
           f"must be one of {', '.join(SOURCES)}", errors)
    _check(0 < pr.val_fraction < 1, "prepare.val_fraction", pr.val_fraction, "must be in (0, 1)",
           errors)
    _check(0 <= pr.test_fraction < 1 and pr.val_fraction + pr.test_fraction < 1,
           "prepare.test_fraction", pr.test_fraction,
           "must be in [0, 1) and leave room for train next to val_fraction", errors)
    _check(pr.on_bad_file in ("error", "skip"), "prepare.on_bad_file", pr.on_bad_file,
           "must be error or skip", errors)
    _check(pr.negatives in NEGATIVES, "prepare.negatives", pr.negatives,
           f"must be one of {', '.join(NEGATIVES)}", errors)
    _check(pr.negatives_per_image >= 0, "prepare.negatives_per_image", pr.negatives_per_image,
           "must be >= 0 (0: every absent class)", errors)
    _check(pr.mask_format in MASK_FORMATS, "prepare.mask_format", pr.mask_format,
           f"must be one of {', '.join(MASK_FORMATS)}", errors)
    if pr.classes is not None:
        _check(len(pr.classes) >= 1 and len(set(pr.classes)) == len(pr.classes),
               "prepare.classes", pr.classes, "must be a non-empty list of distinct names",
               errors)
    sy = pr.synthetic
    _check(sy.num_images >= 2, "prepare.synthetic.num_images", sy.num_images, "must be >= 2",
           errors)
    _check(sy.image_size >= 32, "prepare.synthetic.image_size", sy.image_size, "must be >= 32",
           errors)
    _check(2 <= sy.min_objects <= sy.max_objects <= 6, "prepare.synthetic.min_objects",
           (sy.min_objects, sy.max_objects), "need 2 <= min_objects <= max_objects <= 6", errors)
    if "{}" not in pr.prompt_template:
        errors.append(f"prepare.prompt_template: must contain '{{}}', got {pr.prompt_template!r}")
    ev = p.evaluate
    _check(ev.batch_size >= 1, "evaluate.batch_size", ev.batch_size, "must be >= 1", errors)
    _check(0 < ev.threshold < 1, "evaluate.threshold", ev.threshold, "must be in (0, 1)", errors)
    _check(ev.num_overlays >= 0, "evaluate.num_overlays", ev.num_overlays, "must be >= 0", errors)


def parse_params(data: dict[str, Any] | None) -> Params:
    """Build :class:`Params` from a params mapping; raise ConfigError listing every problem."""
    errors: list[str] = []
    params = _parse_section(Params, data or {}, "", errors)
    if not errors:
        validate(params, errors)
    if errors:
        raise ConfigError(errors)
    if params.model.dino.img_size is None:
        # The DINO input is data.crop; recorded in the checkpoint's model config.
        params.model.dino.img_size = params.data.crop
    return params


def read_params_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise UserError(f"{path}: params file not found") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({exc})".replace("\n", " ")) from None
    if data is not None and not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping at the top level")
    return data or {}


def load_params(path: str | Path = "params.yaml") -> Params:
    return parse_params(read_params_file(path))


def to_dict(obj: Any) -> Any:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj
