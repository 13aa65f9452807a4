"""Every section of ``params.yaml`` as a dataclass, with its defaults and allowed values.

`cdsam.config.parse` reads a file into these, `cdsam.config.validate` checks ranges and
cross-field rules, `cdsam.config.stages` derives what one curriculum stage reads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

SAM1_TYPES = ("vit_b", "vit_l", "vit_h")
# SAM 2 / 2.1 checkpoints by their config names in Meta's sam2 package (configs/sam2*/).
SAM2_TYPES = tuple(f"{v}_hiera_{s}" for v in ("sam2", "sam2.1") for s in ("t", "s", "b+", "l"))
SAM_TYPES = SAM1_TYPES + SAM2_TYPES
SAM_MODES = ("lora", "frozen", "full")
CLIP_MODES = ("frozen", "lora", "full")
SOURCES = ("synthetic", "folders", "voc", "coco", "labelme", "cvat", "yolo")
NEGATIVES = ("none", "absent")
MASK_FORMATS = ("binary", "indexed", "per_class", "instances")
FITS = ("crop", "pad")
BATCH_BY = ("sample", "image")  # data.batch_by
INSTANCES_FROM = ("objects", "components")  # prepare.instances_from
DECODE_MODES = ("prompts", "watershed")  # evaluate.instances.decode
SELECT = ("best", "last")


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
    # A presence head (is the prompt's object in the image) and a centre head (a heatmap
    # peaking at each object's centre, whose peaks become point prompts: one mask per object).
    # Checkpoints written before these heads load without them.
    instances: bool = True


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
class ClipLoraConfig:
    """Adapters on the CLIP text transformer (a stage with ``clip: lora``): weight-space LoRA
    (`cdsam.models.lora.LoRAWeight`) on the attention in-/out-projections and MLP linears
    whose module path holds a target substring. No dropout: the adapter never sees the input."""

    rank: int = 8
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: ["attn", "mlp"])


@dataclass
class LoraConfig:
    sam: SamLoraConfig = field(default_factory=SamLoraConfig)
    dino: DinoLoraConfig = field(default_factory=DinoLoraConfig)
    clip: ClipLoraConfig = field(default_factory=ClipLoraConfig)


AUTO = "auto"
LR_SCALINGS = ("linear", "sqrt", "none")


@dataclass
class OptimConfig:
    # Images a batch under data.batch_by: image (each with its prompts: ~16 samples on the
    # default's 4.1 an image), rows under sample. An integer, or auto: the largest power of two
    # that fits the device (cdsam.training.batch_size; ~16 samples on the CPU), the LRs below
    # then scaled from an effective batch (samples x accumulation x world size) of 16 by
    # `lr_scaling`.
    batch_size: int | str = 4
    lr: float = 1e-3  # base group: heads (and DINO in stage 4)
    lora_lr: float = 1e-3  # LoRA group, weight decay 0
    clip_lr: float = 1e-4  # CLIP text group (a stage with clip: lora | full), weight decay 0
    wd: float = 0.01
    grad_clip: float = 1.0  # max grad norm; 0 disables clipping
    grad_accum_steps: int = 1
    warmup_steps: int = 20  # linear warmup, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.05
    lr_scaling: str = "sqrt"  # batch_size auto: LRs scale by sqrt(effective/16), effective/16 (linear), or not
    auto_batch_max: int = 1024  # batch_size auto: the largest batch it may pick


OPTIM_KEYS = tuple(f.name for f in dataclasses.fields(OptimConfig))


@dataclass
class LossConfig:
    dice_weight: float = 1.0
    bce_weight: float = 1.0
    clip_align_weight: float = 0.1  # mask-pooled image tokens vs. prompt text features
    clip_temperature: float = 0.07
    ssl_weight: float = 0.0  # cosine distillation to the frozen stage-start DINO
    # model.heads.instances: BCE of the presence head (is the prompt's object in the image,
    # positives vs. prepare's negatives), BCE of the centre heatmap against one built from
    # the objects (data with objects only), and MSE of SAM's IoU prediction against the
    # IoU its mask reaches (the instance score uses it).
    presence_weight: float = 1.0
    centre_weight: float = 1.0
    iou_weight: float = 1.0


@dataclass
class StageConfig:
    epochs: int = 1
    sam_mode: str | None = None  # stage 4 only: lora | frozen | full
    # stage 4 only: all (every DINO weight trains) or K (the last K blocks and the final norm
    # train; the blocks before stay as stage 3 left them and go through the feature cache)
    dino_trainable_blocks: int | str | None = None
    select: str = "best"  # keep the best-val-mIoU epoch, or the last one
    clip: str = "frozen"  # the CLIP text tower: frozen | lora (lora.clip) | full (optim.clip_lr)
    # Best-epoch selection skips epochs whose val/text_drift_general exceeds this (null: none).
    max_text_drift: float | None = None
    # Per-stage overrides of `optim`; null keeps the `optim` value.
    batch_size: int | str | None = None
    lr: float | None = None
    lora_lr: float | None = None
    clip_lr: float | None = None
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
    # sample: a batch is optim.batch_size (image, prompt) rows, each encoding its image;
    # image: optim.batch_size images, each with its prompts, DINO once per image
    # (cdsam.data.packed). Validation and evaluation follow it.
    batch_by: str = "image"
    # image batches: at most this many prompts of an image a step, a seeded subset drawn per
    # (seed, epoch, image) when it has more; null: every prompt.
    prompts_per_image: int | None = None


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
    # Recompute each DINO block that trains in the backward pass instead of keeping its
    # activations (non-reentrant torch.utils.checkpoint): ~11x less activation memory a block
    # under AMP for ~1/3 more compute; gradients are bit-equal.
    activation_checkpointing: bool = False


@dataclass
class SyntheticConfig:
    num_images: int = 600
    image_size: int = 64
    min_objects: int = 2  # classes (distinct colour + shape) a scene holds
    max_objects: int = 4
    max_per_class: int = 3  # objects of each class: 1 … this many, so counting means something


@dataclass
class PrepareConfig:
    source: str = "synthetic"
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    on_bad_file: str = "error"  # error | skip
    # Processes that decode and fit images (null or 0: the cores available). A speed knob: the
    # output is byte-identical for any number.
    workers: int | None = None
    # Images per shard file (null: ~1.5 GB of image and label rows at data.crop); a split's
    # images fill shards in stem order, so added images append shards instead of rewriting.
    shard_images: int | None = None
    # absent: prompts of classes not in an image become empty-mask samples (seeded)
    negatives: str = "absent"  # none | absent
    negatives_per_image: int = 1  # absent-class prompts drawn per image (0: all absent classes)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    # folders source (images also: coco)
    images: str | None = None
    masks: str | None = None
    # binary (one prompt) | indexed (0 bg, k = classes[k-1]) | per_class | instances (object ids)
    mask_format: str = "binary"
    instance_classes: str | None = None  # instances: CSV image,instance,class
    # The objects each positive sample is made of: as the source marks them (COCO, labelme,
    # CVAT, YOLO, instance-id masks), or each connected piece of a class mask (sources with
    # semantic masks only; cdsam.data.sources.objects).
    instances_from: str = "objects"  # objects | components
    prompt: str | None = None
    # voc source
    root: str | None = None
    prompt_template: str = "a photo of a {}"
    # Several templates (prompt ensembling, cdsam.data.templates): the prompts are the class
    # names in the first; training draws one per (sample, epoch), evaluation averages them all.
    prompt_templates: list[str] | None = None
    classes: list[str] | None = None  # voc / coco / multi-class folders: the class names
    binary: bool = False
    # coco: instances JSON; cvat: annotations.xml (CVAT for images 1.1); yolo: data.yaml.
    # coco's val/test come from their own files, else from the fractions.
    annotations: str | None = None
    val_annotations: str | None = None
    val_images: str | None = None  # default: prepare.images
    test_annotations: str | None = None
    test_images: str | None = None


@dataclass
class InstanceConfig:
    """Instance decoding (cdsam.inference.instances): centre-heatmap seeds on the semantic mask
    → one point prompt each through SAM's decoder → mask NMS, or a watershed of the mask."""

    decode: str = "prompts"  # prompts | watershed
    seed_threshold: float = 0.2  # a heatmap peak below this is no seed
    # A peak is a seed when it stands this far above the saddle to any higher peak (h-maxima):
    # two peaks of one object rarely dip this deep between them, two objects do.
    seed_prominence: float = 0.1
    max_seeds: int = 500  # strongest seeds decoded per (image, prompt); DSB images hold up to 272
    nms_iou: float = 0.5  # prompts: a mask overlapping a better-scored one more than this is dropped
    min_area: int = 4  # pixels at the input size; smaller masks (and components) are dropped
    # An instance is returned (counted, matched for pmF1) when its prompt passes the presence
    # threshold and its quality reaches this; null: the value the checkpoint chose on val for
    # the decode path (best cgF1; 0.25 where it chose none).
    min_quality: float | None = None


@dataclass
class EvaluateConfig:
    batch_size: int = 64
    threshold: float = 0.5
    num_overlays: int = 4
    # Also score positives with text + one click and text + the tight box (miou_click,
    # miou_box): two more passes over the split.
    spatial_prompts: bool = True
    # text_drift_general's phrases; null: the shipped list of common object words in "a photo
    # of a {}" (cdsam.evaluation.text_drift), which the training stages' val/ figure uses too.
    drift_prompts: list[str] | None = None
    instances: InstanceConfig = field(default_factory=InstanceConfig)


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
    stage4: StageConfig = field(default_factory=lambda: StageConfig(
        epochs=4, lr=3e-4, sam_mode="lora", dino_trainable_blocks="all"))
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def stage(self, n: int) -> StageConfig:
        return getattr(self, f"stage{n}")

    def optim_for(self, n: int) -> OptimConfig:
        """`optim` with the stage section's non-null overrides applied."""
        st = self.stage(n)
        over = {k: getattr(st, k) for k in OPTIM_KEYS if getattr(st, k) is not None}
        return dataclasses.replace(self.optim, **over)
