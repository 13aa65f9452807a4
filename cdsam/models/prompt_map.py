"""Clicks and boxes drawn as a dense map for SAM's mask-input encoder.

A click reaches SAM's decoder as one sparse token: a Fourier encoding of its position plus a
label embedding. The decoder finds "the pixels at the click" only through attention that lines
that encoding up with the image's positional encoding. SAM's trained decoder does this; a
decoder that has to learn it (the embedded default's, and three epochs of a whole transformer
did not: docs/default.md) ignores the click. Drawn as a map and passed through SAM's own
mask-input encoder (``prompt_encoder.mask_downscaling``: the path SAM uses for a previous
mask), a click or a box marks its own pixels in the image embedding, so the decoder only has
to read them. The sparse tokens stay too: with real SAM weights they are SAM's click path.

The map has SAM's mask-input resolution, 4× the embedding grid in each direction, and reads
like a coarse mask in logits: ``+MAP_LOGIT`` inside the box and on foreground clicks,
``-MAP_LOGIT`` on background clicks (drawn last: a "not here" click inside the box wins),
0 (no opinion) elsewhere.

A click is a disk of ``model.sam.click_radius`` embedding cells (DINO tokens; default 2). The
encoder's two stride-2 convolutions give each cell one 4 × 4 block of the map, so the radius
is counted in cells: on the default (stage 1 alone, test mIoU text → text + click) a radius of
0.75 cells lifted 0.43 → 0.47, 1.25 cells 0.42 → 0.58, 2 cells 0.41 → 0.62; with the smaller
disks the click shrank the mask of an object the text alone already picked
(docs/spatial-prompts.md).
"""

from __future__ import annotations

import torch

MAP_LOGIT = 1.0
CELL = 4  # map pixels per embedding cell in each direction


def map_size(grid: tuple[int, int]) -> tuple[int, int]:
    """The map SAM's mask-input encoder turns into an embedding of ``grid``."""
    return CELL * grid[0], CELL * grid[1]


def draw_prompt_map(size: tuple[int, int], image_size: tuple[int, int],
                    points: tuple[torch.Tensor, torch.Tensor] | None,
                    boxes: torch.Tensor | None, box_valid: torch.Tensor | None,
                    batch: int, device: torch.device, click_radius: float = 2.0,
                    ) -> torch.Tensor:
    """Bx1xHmxWm float32 map of each row's clicks (BxNx2 pixel xy, BxN labels 1 / 0 / -1
    empty; disks of ``click_radius`` embedding cells) and box (Bx4 xyxy, inclusive pixel
    indices; ``box_valid`` B bool, default all), in input pixels of an ``image_size`` (H, W)
    image."""
    hm, wm = size
    sy, sx = hm / image_size[0], wm / image_size[1]
    out = torch.zeros(batch, hm, wm, device=device)
    # Map pixel j covers input pixels [j / s, (j + 1) / s); its centre is (j + 0.5) / s.
    ys = torch.arange(hm, device=device, dtype=torch.float32)
    xs = torch.arange(wm, device=device, dtype=torch.float32)
    if boxes is not None:
        b = boxes.to(device, torch.float32)
        # Every map pixel the box touches (a box smaller than one map pixel still marks one).
        in_y = (ys + 1 > b[:, 1:2] * sy) & (ys < (b[:, 3:4] + 1) * sy)  # B x Hm
        in_x = (xs + 1 > b[:, 0:1] * sx) & (xs < (b[:, 2:3] + 1) * sx)  # B x Wm
        inside = in_y[:, :, None] & in_x[:, None, :]
        if box_valid is not None:
            inside &= box_valid.to(device).view(-1, 1, 1)
        out[inside] = MAP_LOGIT
    if points is not None:
        coords = points[0].to(device, torch.float32)
        labels = points[1].to(device)
        cy = (coords[..., 1] + 0.5) * sy  # B x N, map units
        cx = (coords[..., 0] + 0.5) * sx
        d2 = ((ys + 0.5)[None, None, :, None] - cy[..., None, None]) ** 2 + \
            ((xs + 0.5)[None, None, None, :] - cx[..., None, None]) ** 2  # B x N x Hm x Wm
        disk = d2 <= (click_radius * CELL) ** 2
        out[(disk & (labels == 1)[..., None, None]).any(dim=1)] = MAP_LOGIT
        out[(disk & (labels == 0)[..., None, None]).any(dim=1)] = -MAP_LOGIT
    return out.unsqueeze(1)
