"""The curriculum's stage table, and the plan of one stage derived from it and params.

Every stage rule lives here: which stage a stage starts from, what DINO does in it, which
params sections it reads, and whether its SAM mode is configurable. ``tools/dvc_yaml.py``
writes each stage's ``params:`` list from :func:`stage_keys`, the trainer and ``cdsam summary``
read :class:`StagePlan`, `cdsam.training.curriculum` applies :class:`StageRule` to a model, so
a change to the table reaches all of them at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from cdsam.config.schema import (
    ClipLoraConfig,
    DinoLoraConfig,
    OptimConfig,
    Params,
    SamLoraConfig,
)
from cdsam.errors import UserError

DINO_MODES = ("frozen", "lora", "full")


@dataclass(frozen=True)
class StageRule:
    stage: int
    dino: str  # one of DINO_MODES
    parent: int | None  # the stage whose checkpoint this one starts from
    sam_mode_key: bool = False  # reads stageN.sam_mode (lora | frozen | full); else SAM is LoRA

    @property
    def partial_key(self) -> bool:
        """A full-DINO stage reads ``stageN.dino_trainable_blocks`` (all, or the last K)."""
        return self.dino == "full"

    @property
    def reads_dino_lora(self) -> bool:
        """The stage injects or trains DINO adapters, so ``lora.dino`` shapes its result."""
        return self.dino == "lora"

    @property
    def name(self) -> str:
        return f"stage{self.stage}"


STAGE_TABLE: dict[int, StageRule] = {
    1: StageRule(1, dino="frozen", parent=None),
    2: StageRule(2, dino="lora", parent=1),
    3: StageRule(3, dino="lora", parent=2),
    4: StageRule(4, dino="full", parent=3, sam_mode_key=True),
}

# Params every training stage reads, in dvc.yaml's order; lora.dino joins after lora.sam in
# the stages whose rule reads it, then lora.clip (any stage may set `clip: lora`), then the
# stage's own section.
SHARED_TRAIN_KEYS = ("seed", "device", "data", "model", "lora.sam", "optim", "loss", "train")

# Speed knobs change how fast a stage runs and how much memory it takes, never what it computes,
# so they are neither DVC params (changing one reruns no stage) nor part of a resume state's
# fingerprint (changing one keeps the state). Any stage may read them.
SPEED_KEYS = ("data.memory_mb", "train.feature_cache_mb", "train.compile",
              "train.activation_checkpointing", "prepare.workers")


def without_speed_keys(keys: list[str]) -> list[str]:
    """``keys`` as dvc.yaml lists them: a section holding a speed knob becomes its other
    fields, one by one."""
    out: list[str] = []
    for key in keys:
        inner = [k for k in SPEED_KEYS if k.startswith(key + ".")]
        if not inner:
            out.append(key)
            continue
        section = getattr(Params(), key)
        out += [f"{key}.{f.name}" for f in fields(section) if f"{key}.{f.name}" not in inner]
    return out


def drop_speed_values(section: str, values: dict) -> dict:
    """A section's values (`to_dict`) without its speed knobs: what a resume fingerprint or a
    checkpoint's metadata records, so neither depends on how fast the run went."""
    return {k: v for k, v in values.items() if f"{section}.{k}" not in SPEED_KEYS}


def stages() -> tuple[int, ...]:
    """The curriculum's stages, in order."""
    return tuple(sorted(STAGE_TABLE))


def stage_rule(stage: int) -> StageRule:
    if stage not in STAGE_TABLE:
        known = ", ".join(str(n) for n in stages())
        raise ValueError(f"unknown stage {stage} (known: {known})")
    return STAGE_TABLE[stage]


def check_stage_arg(stage: int, flag: str = "--stage") -> StageRule:
    """``stage`` from a command line, or one error line naming the flag and the known stages."""
    if stage not in STAGE_TABLE:
        known = ", ".join(str(n) for n in stages())
        raise UserError(f"{flag}: unknown stage {stage} (known: {known})")
    return STAGE_TABLE[stage]


def stage_keys(stage: int) -> list[str]:
    """The params keys stage ``stage`` reads: what dvc.yaml lists under its ``params:``."""
    rule = stage_rule(stage)
    keys = list(SHARED_TRAIN_KEYS[:5])
    if rule.reads_dino_lora:
        keys.append("lora.dino")
    keys.append("lora.clip")
    return without_speed_keys(keys + list(SHARED_TRAIN_KEYS[5:]) + [rule.name])


@dataclass(frozen=True)
class StagePlan:
    """What one stage does with one params file, derived once (:func:`plan_stage`)."""

    rule: StageRule
    optim: OptimConfig  # `optim` with the stage's overrides (batch_size may still be auto)
    epochs: int
    select: str  # best | last
    sam_mode: str  # lora | frozen | full
    lora_sam: SamLoraConfig
    lora_dino: DinoLoraConfig | None  # None where the rule does not read lora.dino
    # A full-DINO stage: None (every DINO weight trains) or K (the last K blocks + final norm)
    dino_trainable_blocks: int | None = None
    clip_mode: str = "frozen"  # the CLIP text tower: frozen | lora | full
    lora_clip: ClipLoraConfig = field(default_factory=ClipLoraConfig)
    max_text_drift: float | None = None  # best-epoch selection skips epochs beyond it

    @property
    def stage(self) -> int:
        return self.rule.stage

    @property
    def parent(self) -> int | None:
        return self.rule.parent

    @property
    def name(self) -> str:
        return self.rule.name


def plan_stage(params: Params, stage: int) -> StagePlan:
    """The plan of ``stage``, reading only the params sections :func:`stage_keys` lists."""
    rule = stage_rule(stage)
    cfg = params.stage(stage)
    sam_mode = (cfg.sam_mode or "lora") if rule.sam_mode_key else "lora"
    blocks = cfg.dino_trainable_blocks if rule.partial_key else None
    return StagePlan(rule=rule, optim=params.optim_for(stage), epochs=cfg.epochs,
                     select=cfg.select, sam_mode=sam_mode, lora_sam=params.lora.sam,
                     lora_dino=params.lora.dino if rule.reads_dino_lora else None,
                     dino_trainable_blocks=None if blocks in (None, "all") else int(blocks),
                     clip_mode=cfg.clip, lora_clip=params.lora.clip,
                     max_text_drift=cfg.max_text_drift)


def curriculum_to(params: Params, stage: int) -> list[StagePlan]:
    """The plans of every stage up to ``stage`` along the parent chain, first stage first
    (``cdsam summary`` replays them on one model, as the pipeline's stages do one by one)."""
    chain = [plan_stage(params, stage)]
    while chain[-1].parent is not None:
        chain.append(plan_stage(params, chain[-1].parent))
    return chain[::-1]
