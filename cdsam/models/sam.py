"""SAM's prompt encoder and mask decoder (segment-anything, or SAM 2's from Meta's sam2
package), batched over images.

``MaskDecoder.predict_masks`` assumes one image and N prompt sets: it repeats the image
embedding N times. With B images and B prompt sets that either fails or silently pairs every
image with every prompt. :meth:`SamDecoder.forward` runs the same modules in the same order
but keeps image i with prompt set i.

SAM 2's decoder is SAM's plus an object-score token (an output token that attends like the
others; its score head is unused here) and two high-resolution skips that add the Hiera
encoder's stride-4 and stride-8 features during upscaling. cdsam builds it with the skips off:
DINO gives one scale (stride 14/16), so there are no finer features to feed them, and upsampling
DINO's own tokens into them would add a trained path, not information. Their two convs
(``conv_s0``, ``conv_s1``) are left out of the loaded checkpoint, and said so.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
from torch import nn

from cdsam.config.schema import SAM2_TYPES, SamConfig
from cdsam.errors import CheckpointError, UserError
from cdsam.io import check_weights_name
from cdsam.models.heads import SAM_DIM

log = logging.getLogger("cdsam.sam")

# The decoder half of SAM is the same for all three official checkpoints (segment-anything's
# build_sam.py passes identical decoder settings for vit_b, vit_l and vit_h); the type still
# names which checkpoint a config expects.
_DECODER_LAYOUT = {
    "prompt_embed_dim": SAM_DIM,
    "mask_in_chans": 16,
    "transformer_depth": 2,
    "mlp_dim": 2048,
    "num_heads": 8,
    "num_multimask_outputs": 3,
    "iou_head_depth": 3,
    "iou_head_hidden_dim": 256,
}
SAM_DECODER_LAYOUTS = {"vit_b": _DECODER_LAYOUT, "vit_l": _DECODER_LAYOUT, "vit_h": _DECODER_LAYOUT,
                       **{t: _DECODER_LAYOUT for t in SAM2_TYPES}}
# Every SAM 2 / 2.1 config in sam2 1.1 sets these decoder options the same way.
_SAM2_DECODER_OPTIONS = {"iou_prediction_use_sigmoid": True, "pred_obj_scores": True,
                         "pred_obj_scores_mlp": True, "use_multimask_token_for_obj_ptr": True}
# Official SAM 2 checkpoints ({"model": state_dict}) name the two parts cdsam reads so.
_SAM2_PREFIXES = {"sam_prompt_encoder.": "prompt_encoder.", "sam_mask_decoder.": "mask_decoder."}
SAM2_INSTALL = "SAM2_BUILD_CUDA=0 pip install --no-build-isolation 'sam2>=1.1'"


def embed_points(pe: nn.Module, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """SAM's point embedding (``PromptEncoder._embed_points`` without padding), the same values
    for SAM 1 and SAM 2: positional encoding of the pixel centre, then "not a point" for label
    -1 and the foreground / background embedding added for 1 / 0. Written with ``torch.where``
    as SAM 2 does, because SAM 1's boolean-mask indexing reads the mask back to the host: a
    device sync inside every training step with clicks."""
    e = pe.pe_layer.forward_with_coords(coords + 0.5, pe.input_image_size)
    lab = labels.unsqueeze(-1)
    e = torch.where(lab == -1, torch.zeros_like(e) + pe.not_a_point_embed.weight, e)
    e = torch.where(lab == 0, e + pe.point_embeddings[0].weight, e)
    return torch.where(lab == 1, e + pe.point_embeddings[1].weight, e)


class SamDecoder(nn.Module):
    """Image embeddings + sparse prompt tokens (+ a dense prompt embedding) → low-resolution
    mask logits.

    ``prompt_map``: clicks and boxes also enter as a drawn map through SAM's mask-input
    encoder, a click as a disk of ``click_radius`` embedding cells (`cdsam.models.prompt_map`;
    ``model.sam.prompt_map``, ``model.sam.click_radius``).
    """

    def __init__(self, prompt_encoder: PromptEncoder, mask_decoder: MaskDecoder,
                 prompt_map: bool = True, click_radius: float = 2.0) -> None:
        super().__init__()
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.prompt_map = prompt_map
        self.click_radius = click_radius  # in embedding cells (DINO tokens)

    def encode_prompts(self, batch: int, image_size: tuple[int, int],
                       points: tuple[torch.Tensor, torch.Tensor] | None = None,
                       boxes: torch.Tensor | None = None,
                       box_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Point (BxNx2 pixel xy, BxN labels: 1 fg, 0 bg, -1 empty slot) and box (Bx4 xyxy)
        prompts → Bx(N+2)x256 tokens, SAM's own embeddings.

        ``box_valid`` (B bool): rows without a box get SAM's "not a point" token in both corner
        slots, so a batch mixing boxed and unboxed samples keeps one token layout (the layout
        cdsam trains with: `cdsam.data.spatial`). Unlike ``PromptEncoder.forward`` no padding
        point is appended: the caller decides the slots.
        """
        pe = self.prompt_encoder
        if points is None and boxes is None:
            return pe.no_mask_embed.weight.new_zeros(batch, 0, SAM_DIM)
        pe.input_image_size = tuple(image_size)  # coordinates are normalised by this size
        parts = []
        if points is not None:
            coords, labels = points
            parts.append(embed_points(pe, coords.float(), labels))
        if boxes is not None:
            corners = pe._embed_boxes(boxes.float())
            if box_valid is not None:
                empty = pe.not_a_point_embed.weight.to(corners.dtype)
                corners = torch.where(box_valid.view(-1, 1, 1), corners, empty)
            parts.append(corners)
        return torch.cat(parts, dim=1)

    def no_mask(self) -> torch.Tensor:
        """1x256x1x1: SAM's dense embedding for "no mask input"."""
        return self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)

    def encode_map(self, prompt_map: torch.Tensor) -> torch.Tensor:
        """Bx1x4hx4w drawn map → Bx256xhxw dense embedding (SAM's mask-input encoder)."""
        return self.prompt_encoder.mask_downscaling(prompt_map)

    def forward(self, image_embeddings: torch.Tensor, prompt_tokens: torch.Tensor,
                dense: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Bx256xhxw embeddings, BxKx256 prompt tokens, Bx256xhxw dense embeddings (default:
        SAM's "no mask" embedding) → (Bx1x4hx4w logits, Bx1 IoU)."""
        md = self.mask_decoder
        b, c, h, w = image_embeddings.shape
        if prompt_tokens.shape[0] != b:
            raise ValueError(f"{b} images but {prompt_tokens.shape[0]} prompt sets")
        pos = self.prompt_encoder.pe_layer((h, w)).unsqueeze(0).expand(b, -1, -1, -1)
        if dense is None:
            dense = self.no_mask()
        # SAM 2 puts its object-score token first; its IoU and mask tokens follow.
        first = [md.obj_score_token.weight] if getattr(md, "pred_obj_scores", False) else []
        s = len(first)
        out_tokens = torch.cat([*first, md.iou_token.weight, md.mask_tokens.weight], dim=0)
        tokens = torch.cat([out_tokens.unsqueeze(0).expand(b, -1, -1), prompt_tokens], dim=1)
        src = image_embeddings + dense
        hs, src = md.transformer(src, pos, tokens)
        iou_token_out = hs[:, s, :]
        mask_tokens_out = hs[:, s + 1:s + 1 + md.num_mask_tokens, :]
        upscaled = md.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        # Single-mask output (token 0), as SAM does with multimask_output=False.
        hyper = md.output_hypernetworks_mlps[0](mask_tokens_out[:, 0, :])
        bu, cu, hu, wu = upscaled.shape
        masks = (hyper.unsqueeze(1) @ upscaled.reshape(bu, cu, hu * wu)).reshape(bu, 1, hu, wu)
        iou = md.iou_prediction_head(iou_token_out)[:, :1]
        return masks, iou


def build_sam_decoder(cfg: SamConfig, grid: tuple[int, int], image_size: tuple[int, int],
                      load_weights: bool = True) -> SamDecoder:
    """SAM (or SAM 2) prompt encoder + mask decoder; loads ``model.sam.checkpoint`` when
    given."""
    if cfg.type not in SAM_DECODER_LAYOUTS:
        raise UserError(f"model.sam.type: unknown SAM type {cfg.type!r}")
    lay = SAM_DECODER_LAYOUTS[cfg.type]
    dim = lay["prompt_embed_dim"]
    encoder_cls, decoder_cls, transformer_cls, options = PromptEncoder, MaskDecoder, \
        TwoWayTransformer, {}
    if cfg.type in SAM2_TYPES:
        encoder_cls, decoder_cls, transformer_cls = _sam2_classes(cfg.type)
        options = {**_SAM2_DECODER_OPTIONS, "use_high_res_features": False}  # module doc
    prompt_encoder = encoder_cls(embed_dim=dim, image_embedding_size=tuple(grid),
                                 input_image_size=tuple(image_size),
                                 mask_in_chans=lay["mask_in_chans"])
    mask_decoder = decoder_cls(
        num_multimask_outputs=lay["num_multimask_outputs"],
        transformer=transformer_cls(depth=lay["transformer_depth"], embedding_dim=dim,
                                    mlp_dim=lay["mlp_dim"], num_heads=lay["num_heads"]),
        transformer_dim=dim,
        iou_head_depth=lay["iou_head_depth"],
        iou_head_hidden_dim=lay["iou_head_hidden_dim"],
        **options,
    )
    decoder = SamDecoder(prompt_encoder, mask_decoder, prompt_map=cfg.prompt_map,
                         click_radius=cfg.click_radius)
    if load_weights and cfg.checkpoint:
        load_sam_checkpoint(decoder, cfg.checkpoint)
    return decoder


def _sam2_classes(sam_type: str) -> tuple[type, type, type]:
    """SAM 2's prompt encoder, mask decoder and two-way transformer from Meta's sam2."""
    try:
        from sam2.modeling.sam.mask_decoder import MaskDecoder as Sam2MaskDecoder
        from sam2.modeling.sam.prompt_encoder import PromptEncoder as Sam2PromptEncoder
        from sam2.modeling.sam.transformer import TwoWayTransformer as Sam2TwoWayTransformer
    except ImportError:
        raise UserError(f"model.sam.type: {sam_type!r} needs Meta's sam2 package (a source "
                        f"release; without its CUDA extension: {SAM2_INSTALL})") from None
    return Sam2PromptEncoder, Sam2MaskDecoder, Sam2TwoWayTransformer


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a torch file, never unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    check_weights_name(path, "model.sam.checkpoint")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any parse failure is the file's fault
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: cannot read weights ({first})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def load_sam_checkpoint(decoder: SamDecoder, path: str | Path) -> None:
    """Load the prompt encoder and mask decoder from an official SAM checkpoint (keys
    ``prompt_encoder.*``, ``mask_decoder.*``) or SAM 2 one (``sam_prompt_encoder.*``,
    ``sam_mask_decoder.*`` inside ``{"model": …}``); every other tensor is ignored."""
    state = read_weights(path)
    sam2 = any(k.startswith(tuple(_SAM2_PREFIXES)) for k in state)
    # The file's prefix → ours, for the two parts cdsam reads; everything else is ignored.
    prefixes = _SAM2_PREFIXES if sam2 else {p: p for p in _SAM2_PREFIXES.values()}
    ours = decoder.state_dict()
    picked = {mine + k[len(theirs):]: v for k, v in state.items()
              for theirs, mine in prefixes.items() if k.startswith(theirs)}
    missing = [k for k in ours if k not in picked]
    bad = [f"{k} {tuple(picked[k].shape)} vs {tuple(v.shape)}" for k, v in ours.items()
           if k in picked and picked[k].shape != v.shape]
    if missing or bad:
        kind = "SAM 2" if getattr(decoder.mask_decoder, "pred_obj_scores", False) else "SAM"
        detail = f"missing {missing[:5]}" if missing else f"shape mismatch {bad[:3]}"
        raise CheckpointError(f"{path}: not a {kind} checkpoint for this decoder ({detail})")
    decoder.load_state_dict({k: picked[k] for k in ours}, strict=True)
    skips = [k for k in picked if k not in ours]
    log.info("%s: read the prompt encoder and mask decoder (%d tensors); ignored %d others "
             "(the image encoder%s)%s", path, len(ours), len(state) - len(ours),
             ", memory and object-pointer modules" if sam2 else "",
             f", among them SAM 2's high-resolution skip convs ({len(skips)} tensors: DINO "
             f"gives one scale)" if skips else "")
