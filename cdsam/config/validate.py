"""Range and cross-field checks over parsed params: one line per problem, each naming its key."""

from __future__ import annotations

from typing import Any

from cdsam.config.schema import (
    AUTO,
    BATCH_BY,
    CLIP_MODES,
    DECODE_MODES,
    FITS,
    INSTANCES_FROM,
    LR_SCALINGS,
    MASK_FORMATS,
    NEGATIVES,
    SAM_MODES,
    SAM_TYPES,
    SELECT,
    SOURCES,
    DinoLoraConfig,
    OptimConfig,
    Params,
    SamLoraConfig,
    StageConfig,
)
from cdsam.config.stages import stage_rule, stages


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

    for name in ("lr", "lora_lr", "clip_lr", "wd", "grad_clip"):
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


def _validate_trainable_blocks(value: Any, n: int, depth: int | None,
                               errors: list[str]) -> None:
    key = f"stage{n}.dino_trainable_blocks"
    if not stage_rule(n).partial_key:
        if value is not None:
            owners = ", ".join(f"stage{m}" for m in stages() if stage_rule(m).partial_key)
            errors.append(f"{key}: only {owners} trains DINO in full, got {value!r}")
        return
    if value in (None, "all"):
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        errors.append(f"{key}: must be all or a number of blocks >= 1, got {value!r}")
    elif depth is not None and value > depth:
        errors.append(f"{key}: {value} is larger than model.dino.depth ({depth})")


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
    lc = p.lora.clip
    _check(lc.rank >= 1, "lora.clip.rank", lc.rank, "must be >= 1", errors)
    _check(lc.alpha > 0, "lora.clip.alpha", lc.alpha, "must be > 0", errors)
    _check(bool(lc.targets), "lora.clip.targets", lc.targets, "must not be empty", errors)
    k = p.lora.dino.last_k_blocks
    _check(k >= 1, "lora.dino.last_k_blocks", k, "must be >= 1", errors)
    if d.depth is not None and k > d.depth:
        errors.append(f"lora.dino.last_k_blocks: {k} is larger than model.dino.depth ({d.depth})")
    _validate_optim(p.optim, "optim", errors)
    for loss_key in ("dice_weight", "bce_weight", "clip_align_weight", "ssl_weight",
                     "presence_weight", "centre_weight", "iou_weight"):
        v = getattr(p.loss, loss_key)
        _check(v >= 0, f"loss.{loss_key}", v, "must be >= 0", errors)
    _check(p.loss.clip_temperature > 0, "loss.clip_temperature", p.loss.clip_temperature,
           "must be > 0", errors)
    for n in stages():
        st = p.stage(n)
        _check(st.epochs >= 1, f"stage{n}.epochs", st.epochs, "must be >= 1", errors)
        _check(st.select in SELECT, f"stage{n}.select", st.select,
               f"must be one of {', '.join(SELECT)}", errors)
        _validate_optim(st, f"stage{n}", errors)
        _check(st.clip in CLIP_MODES, f"stage{n}.clip", st.clip,
               f"must be one of {', '.join(CLIP_MODES)}", errors)
        if st.max_text_drift is not None:
            _check(0 <= st.max_text_drift <= 2, f"stage{n}.max_text_drift", st.max_text_drift,
                   "must be in [0, 2] (1 - cosine) or null", errors)
            _check(st.select == "best", f"stage{n}.max_text_drift", st.max_text_drift,
                   f"bounds best-epoch selection; stage{n}.select is {st.select!r}", errors)
        if stage_rule(n).sam_mode_key:
            mode = st.sam_mode or "lora"
            _check(mode in SAM_MODES, f"stage{n}.sam_mode", st.sam_mode,
                   f"must be one of {', '.join(SAM_MODES)}", errors)
        elif st.sam_mode is not None:
            owners = ", ".join(f"stage{m}" for m in stages() if stage_rule(m).sam_mode_key)
            errors.append(f"stage{n}.sam_mode: only {owners} has a SAM mode, got "
                          f"{st.sam_mode!r}")
        _validate_trainable_blocks(st.dino_trainable_blocks, n, d.depth, errors)
    dc = p.data
    _check(dc.fit in FITS, "data.fit", dc.fit, f"must be one of {', '.join(FITS)}", errors)
    _check(dc.crop >= 1, "data.crop", dc.crop, "must be >= 1", errors)
    _check(dc.batch_by in BATCH_BY, "data.batch_by", dc.batch_by,
           f"must be one of {', '.join(BATCH_BY)}", errors)
    if dc.prompts_per_image is not None:
        _check(dc.prompts_per_image >= 1, "data.prompts_per_image", dc.prompts_per_image,
               "must be >= 1 or null (every prompt)", errors)
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
    _check(pr.workers is None or pr.workers >= 0, "prepare.workers", pr.workers,
           "must be >= 0 or null (null or 0: the cores available)", errors)
    _check(pr.shard_images is None or pr.shard_images >= 1, "prepare.shard_images",
           pr.shard_images, "must be >= 1 or null (null: ~1.5 GB shards)", errors)
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
    _check(pr.instances_from in INSTANCES_FROM, "prepare.instances_from", pr.instances_from,
           f"must be one of {', '.join(INSTANCES_FROM)}", errors)
    sy = pr.synthetic
    _check(1 <= sy.max_per_class <= 4, "prepare.synthetic.max_per_class", sy.max_per_class,
           "must be in [1, 4]", errors)
    _check(sy.num_images >= 2, "prepare.synthetic.num_images", sy.num_images, "must be >= 2",
           errors)
    _check(sy.image_size >= 32, "prepare.synthetic.image_size", sy.image_size, "must be >= 32",
           errors)
    _check(2 <= sy.min_objects <= sy.max_objects <= 6, "prepare.synthetic.min_objects",
           (sy.min_objects, sy.max_objects), "need 2 <= min_objects <= max_objects <= 6", errors)
    if "{}" not in pr.prompt_template:
        errors.append(f"prepare.prompt_template: must contain '{{}}', got {pr.prompt_template!r}")
    if pr.prompt_templates is not None:
        bad = [t for t in pr.prompt_templates if not isinstance(t, str) or t.count("{}") != 1]
        if not pr.prompt_templates or bad:
            errors.append(f"prepare.prompt_templates: must be a non-empty list of templates with "
                          f"one '{{}}' each, or null, got {(bad or pr.prompt_templates)!r}")
        elif len(set(pr.prompt_templates)) != len(pr.prompt_templates):
            errors.append(f"prepare.prompt_templates: must be distinct, got "
                          f"{pr.prompt_templates!r}")
    ev = p.evaluate
    _check(ev.batch_size >= 1, "evaluate.batch_size", ev.batch_size, "must be >= 1", errors)
    _check(0 < ev.threshold < 1, "evaluate.threshold", ev.threshold, "must be in (0, 1)", errors)
    _check(ev.num_overlays >= 0, "evaluate.num_overlays", ev.num_overlays, "must be >= 0", errors)
    ic = ev.instances
    _check(ic.decode in DECODE_MODES, "evaluate.instances.decode", ic.decode,
           f"must be one of {', '.join(DECODE_MODES)}", errors)
    _check(0 < ic.seed_prominence < 1, "evaluate.instances.seed_prominence", ic.seed_prominence,
           "must be in (0, 1)", errors)
    _check(0 <= ic.seed_threshold < 1, "evaluate.instances.seed_threshold", ic.seed_threshold,
           "must be in [0, 1)", errors)
    if ic.min_quality is not None:
        _check(0 <= ic.min_quality < 1, "evaluate.instances.min_quality", ic.min_quality,
               "must be in [0, 1) or null (the checkpoint's)", errors)
    _check(0 < ic.nms_iou <= 1, "evaluate.instances.nms_iou", ic.nms_iou, "must be in (0, 1]",
           errors)
    for key in ("max_seeds", "min_area"):
        v = getattr(ic, key)
        _check(v >= 1, f"evaluate.instances.{key}", v, "must be >= 1", errors)
    if ev.drift_prompts is not None:
        _check(len(ev.drift_prompts) >= 1 and all(isinstance(t, str) and t.strip()
                                                  for t in ev.drift_prompts),
               "evaluate.drift_prompts", ev.drift_prompts,
               "must be a non-empty list of phrases, or null", errors)
