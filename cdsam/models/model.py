"""CDSAM: DINO tokens + CLIP text → SAM decoder masks, assembled from injected parts."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cdsam.config.schema import ModelConfig
from cdsam.models.clip_text import ClipTextEncoder, build_clip_text
from cdsam.models.dino import (
    build_dino,
    dino_blocks,
    dino_depth,
    dino_embed,
    dino_finish,
    dino_grid,
    dino_patch_size,
    dino_width,
)
from cdsam.models.heads import TextToPrompt, TokenProjection, TokenToMaskEmbedding
from cdsam.models.instance_heads import CentreHead, PresenceHead
from cdsam.models.prompt_map import draw_prompt_map, map_size
from cdsam.models.sam import SamDecoder, build_sam_decoder

# Top-level children by component, as `cdsam summary` and the curriculum name them (the
# instance heads only where the model has them: `instance_heads`).
HEAD_MODULES = ("token_proj", "token_to_mask", "text_to_prompt", "presence_head",
                "centre_head")


def head_modules(model: nn.Module) -> list[str]:
    """The names in `HEAD_MODULES` this model has."""
    return [n for n in HEAD_MODULES if getattr(model, n, None) is not None]


@dataclass
class CDSAMOutput:
    masks: torch.Tensor  # Bx1xHxW logits at the input image size
    low_res_masks: torch.Tensor  # Bx1x4hx4w logits from the SAM decoder
    iou: torch.Tensor  # Bx1 predicted mask IoU
    tokens: torch.Tensor  # BxNxC DINO patch tokens (IxNxC, one per image, with image_of)
    grid: tuple[int, int]
    image_of: torch.Tensor | None = None  # B int64: each mask's row of ``tokens`` (image-major)
    presence: torch.Tensor | None = None  # B logits: the prompt's object is in the image
    centres: torch.Tensor | None = None  # Bx1x4hx4w centre-heatmap logits

    def sample_rows(self, per_image: torch.Tensor) -> torch.Tensor:
        """A tensor with one row per ``tokens`` row → one row per mask."""
        return per_image if self.image_of is None else per_image[self.image_of]


class CDSAM(nn.Module):
    """Text-promptable segmentation.

    ``forward(images Bx3xHxW, prompts [B strings])`` → :class:`CDSAMOutput`. Optional point and
    box prompts (in input pixel coordinates) join the text tokens, and with
    ``model.sam.prompt_map`` also enter as a drawn map (`cdsam.models.prompt_map`).
    """

    def __init__(self, dino: nn.Module, clip_text: ClipTextEncoder, token_proj: TokenProjection,
                 token_to_mask: TokenToMaskEmbedding, text_to_prompt: TextToPrompt,
                 sam: SamDecoder, presence_head: PresenceHead | None = None,
                 centre_head: CentreHead | None = None) -> None:
        super().__init__()
        self.dino = dino
        self.clip_text = clip_text
        self.token_proj = token_proj
        self.token_to_mask = token_to_mask
        self.text_to_prompt = text_to_prompt
        self.sam = sam
        self.presence_head = presence_head
        self.centre_head = centre_head

    @property
    def has_instance_heads(self) -> bool:
        """Built with ``model.heads.instances`` (checkpoints from before it are not)."""
        return self.presence_head is not None and self.centre_head is not None

    @property
    def patch_size(self) -> int:
        return dino_patch_size(self.dino)

    @property
    def depth(self) -> int:
        return dino_depth(self.dino)

    def dino_prefix(self, images: torch.Tensor, end_block: int) -> torch.Tensor:
        """Tokens after DINO blocks ``0 … end_block-1`` (prefix tokens kept): BxTxC."""
        return self._prefix(images, end_block)

    def _prefix(self, images: torch.Tensor, end_block: int) -> torch.Tensor:
        # forward comes here directly: under FSDP `dino_prefix` is a forward method of its
        # own (the feature cache calls it outside forward), not to be entered from forward.
        return dino_blocks(self.dino, dino_embed(self.dino, images), 0, end_block,
                           dino_grid(self.dino, images))

    def dino_tail(self, x: torch.Tensor, start_block: int, grid: tuple[int, int]) -> torch.Tensor:
        """Finish DINO from block ``start_block``: BxTxC → BxNxC patch tokens (token ``grid``
        (h, w): the rotary table of a DINOv3 is rebuilt from it)."""
        return dino_finish(self.dino, dino_blocks(self.dino, x, start_block, self.depth, grid))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.dino_tail(self._prefix(images, 0), 0, dino_grid(self.dino, images))

    def decode(self, tokens: torch.Tensor, grid: tuple[int, int], text: torch.Tensor,
               image_size: tuple[int, int],
               points: tuple[torch.Tensor, torch.Tensor] | None = None,
               boxes: torch.Tensor | None = None,
               box_valid: torch.Tensor | None = None,
               rows: np.ndarray | None = None,
               image_of: torch.Tensor | None = None) -> CDSAMOutput:
        """Patch tokens BxNxC + text features BxD (+ optional point/box prompts) → masks.

        ``image_of``: S int64, ``tokens`` then hold one row per image and the S prompts each
        decode against their image's row (the mask embedding is computed once per image; the
        output keeps the tokens per image, with ``image_of``).

        Rows whose point and box slots are all empty are decoded from the text tokens alone,
        exactly as in a batch without spatial prompts: a text-only sample gets the same mask
        whatever its batch-mates carry (training mixes both, see `cdsam.data.spatial`).
        ``rows``: those rows as a B bool array on the host, when the caller knows them (a
        training batch does, `cdsam.data.spatial.batch_prompts`): splitting the batch then
        never waits for the device. Without it they are read back from the slots (a wait).
        """
        embeddings = self.token_to_mask(tokens, grid)
        if image_of is not None:
            embeddings = embeddings[image_of]
        prompt_tokens = self.text_to_prompt(text)
        if rows is None and (points is not None or boxes is not None):
            rows = spatial_rows(points, boxes, box_valid, embeddings.shape[0],
                                torch.device("cpu")).numpy()
        active = rows if rows is not None and rows.any() else None
        dense = self._dense_prompts(embeddings, image_size, active, points, boxes, box_valid)
        if active is None:
            low, iou = self.sam(embeddings, prompt_tokens, dense)
        else:
            low, iou = self._decode_mixed(embeddings, prompt_tokens, dense, image_size, active,
                                          points, boxes, box_valid)
        masks = F.interpolate(low, size=image_size, mode="bilinear", align_corners=False)
        presence = centres = None
        if self.has_instance_heads:
            # The mask it would return, as weights on the cells (no gradient: the presence
            # term must not reshape the masks), and the tokens in CLIP space.
            weights = F.adaptive_avg_pool2d(torch.sigmoid(low.detach().float()),
                                            embeddings.shape[-2:])
            clip_tokens = self.token_proj(tokens)
            if image_of is not None:
                clip_tokens = clip_tokens[image_of]
            presence = self.presence_head(embeddings, text, weights, clip_tokens)
            # Text alone: where the objects are does not depend on a click or box.
            centres = self.centre_head(embeddings, text)
        return CDSAMOutput(masks=masks, low_res_masks=low, iou=iou, tokens=tokens, grid=grid,
                           image_of=image_of, presence=presence, centres=centres)

    def _dense_prompts(self, embeddings: torch.Tensor, image_size: tuple[int, int],
                       active: np.ndarray | None,
                       points: tuple[torch.Tensor, torch.Tensor] | None,
                       boxes: torch.Tensor | None, box_valid: torch.Tensor | None,
                       ) -> torch.Tensor | None:
        """Per-row dense embeddings: the encoded click/box map on ``active`` rows, SAM's "no
        mask" embedding (the exact values a text-only batch adds) on the rest; None when no
        row needs the map.

        While the mask-input encoder trains, every training batch runs it, even one without a
        click or box (its rows then all select "no mask"; one empty map is encoded, not one per
        row): under DDP each trainable parameter must be in every step's graph.
        """
        enc = self.sam.prompt_encoder.mask_downscaling
        training_encoder = self.training and any(p.requires_grad for p in enc.parameters())
        if not self.sam.prompt_map or (active is None and not training_encoder):
            return None
        b, _, h, w = embeddings.shape
        if active is None:
            points = boxes = box_valid = None
        drawn = draw_prompt_map(map_size((h, w)), image_size, points, boxes, box_valid,
                                b if active is not None else 1, embeddings.device,
                                click_radius=self.sam.click_radius)
        on = torch.zeros(b, dtype=torch.bool) if active is None else torch.from_numpy(active)
        encoded = self.sam.encode_map(drawn.to(embeddings.dtype))
        on = on.to(embeddings.device, non_blocking=True).view(-1, 1, 1, 1)
        return torch.where(on, encoded, self.sam.no_mask())

    def _decode_mixed(self, embeddings: torch.Tensor, prompt_tokens: torch.Tensor,
                      dense: torch.Tensor | None, image_size: tuple[int, int],
                      active: np.ndarray,
                      points: tuple[torch.Tensor, torch.Tensor] | None,
                      boxes: torch.Tensor | None, box_valid: torch.Tensor | None,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Text + spatial tokens for the ``active`` rows (a host bool array: the split is
        planned on the host, the indices follow to the device without a wait), text alone for
        the rest."""
        def rows(x: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
            return None if x is None else x[idx]

        dev = embeddings.device
        on_rows = np.flatnonzero(active)
        n_on = len(on_rows)
        on = torch.from_numpy(on_rows).to(dev, non_blocking=True)
        pts = None if points is None else (points[0][on], points[1][on])
        extra = self.sam.encode_prompts(n_on, image_size, pts, rows(boxes, on),
                                        rows(box_valid, on))
        low_on, iou_on = self.sam(embeddings[on], torch.cat(
            [prompt_tokens[on], extra.to(prompt_tokens.dtype)], dim=1), rows(dense, on))
        if n_on == len(active):
            return low_on, iou_on
        off = torch.from_numpy(np.flatnonzero(~active)).to(dev, non_blocking=True)
        low_off, iou_off = self.sam(embeddings[off], prompt_tokens[off], rows(dense, off))
        low = low_on.new_empty((len(active), *low_on.shape[1:]))
        iou = iou_on.new_empty((len(active), *iou_on.shape[1:]))
        low[on], low[off] = low_on, low_off.to(low.dtype)
        iou[on], iou[off] = iou_on, iou_off.to(iou.dtype)
        return low, iou

    def forward(self, images: torch.Tensor, prompts: list[str],
                points: tuple[torch.Tensor, torch.Tensor] | None = None,
                boxes: torch.Tensor | None = None, prefix: torch.Tensor | None = None,
                start_block: int = 0, box_valid: torch.Tensor | None = None,
                rows: np.ndarray | None = None, text: torch.Tensor | None = None,
                image_of: torch.Tensor | None = None) -> CDSAMOutput:
        """``prefix``: DINO tokens after blocks ``0 … start_block-1`` for these images (the
        feature cache's output); DINO then runs only from ``start_block``. ``points``: (BxNx2
        pixel xy, BxN labels 1/0/-1), ``boxes``: Bx4 xyxy in input pixels, ``box_valid``: B
        bool (default: every row has its box); ``rows``: see `decode`. ``text``: the prompts'
        BxD text features when the caller has them (a step tuning the text tower encodes its
        vocabulary once, `cdsam.models.forward`); else the text tower encodes ``prompts``.
        ``image_of``: S int64 on the device, one per prompt: an image-major batch, DINO runs
        once per image and prompt s decodes against image ``image_of[s]`` (the prompt and
        spatial arguments are then per prompt, ``images`` / ``prefix`` per image)."""
        rows_expected = images.shape[0] if image_of is None else image_of.shape[0]
        if len(prompts) != rows_expected:
            raise ValueError(f"{rows_expected} {'images' if image_of is None else 'samples'} "
                             f"but {len(prompts)} prompts")
        grid = dino_grid(self.dino, images)
        if prefix is None:
            tokens = self.encode_image(images)
        else:
            tokens = self.dino_tail(prefix, start_block, grid)
        if text is None:
            text = self.clip_text(prompts)
        return self.decode(tokens, grid, text.to(tokens.dtype), tuple(images.shape[-2:]), points,
                           boxes, box_valid, rows, image_of)


def spatial_rows(points: tuple[torch.Tensor, torch.Tensor] | None, boxes: torch.Tensor | None,
                 box_valid: torch.Tensor | None, batch: int, device: torch.device,
                 ) -> torch.Tensor:
    """B bool on ``device``: rows with at least one point or box."""
    active = torch.zeros(batch, dtype=torch.bool, device=device)
    if points is not None:
        active |= (points[1] >= 0).any(dim=1).to(device)
    if boxes is not None:
        active |= box_valid.to(device) if box_valid is not None else True
    return active


def build_model(cfg: ModelConfig, load_weights: bool = True, seed: int | None = None,
                meta: bool = False) -> CDSAM:
    """Build every part from ``model`` params; ``seed`` makes random init reproducible.

    ``load_weights=False`` skips hub/local weights (a cdsam checkpoint supplies them).
    ``meta=True`` builds the structure on the meta device, allocating nothing (memory
    planning); it loads no weights.
    """
    if meta:
        with torch.device("meta"):
            return build_model(cfg, load_weights=False, seed=seed)
    if seed is not None:
        torch.manual_seed(seed)
    dino = build_dino(cfg.dino, load_weights)
    clip_text = build_clip_text(cfg.clip, load_weights)
    width = dino_width(dino)
    img = dino.patch_embed.img_size
    grid = (img[0] // dino_patch_size(dino), img[1] // dino_patch_size(dino))
    sam = build_sam_decoder(cfg.sam, grid, tuple(img), load_weights)
    token_proj = TokenProjection(width, clip_text.width)
    token_to_mask = TokenToMaskEmbedding(width)
    text_to_prompt = TextToPrompt(clip_text.width, cfg.heads.num_text_tokens)
    # Built last: every other part draws the same random init with or without them.
    instances = cfg.heads.instances
    return CDSAM(
        dino=dino,
        clip_text=clip_text,
        token_proj=token_proj,
        token_to_mask=token_to_mask,
        text_to_prompt=text_to_prompt,
        sam=sam,
        presence_head=PresenceHead(clip_text.width) if instances else None,
        centre_head=CentreHead(clip_text.width) if instances else None,
    )
