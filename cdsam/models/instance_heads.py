"""The heads that turn one text prompt into objects: is it in the image, and where are the
centres of its objects.

Both read SAM's image embedding (DINO tokens after `TokenToMaskEmbedding`, one per prompt
row) and the prompt's CLIP text feature, so they train with everything else in every stage and
cost a fraction of one decoder pass.

- :class:`PresenceHead`: the probability that the prompt's object is in the image. The text
  attends over the embedding cells (one query, softmax pooling); the decoder's own mask (its
  probabilities, no gradient) pools the cells it would return and their CLIP-space tokens
  (`TokenProjection`, which the alignment loss trains against the prompts); an MLP reads the
  attended cell, the masked region, the text, the best cell's match, the masked region's
  cosine to the text and the mask's area. An image-level decision, as SAM 3's presence token
  makes one, that can check what the mask would return against what was asked.
- :class:`CentreHead`: a heatmap at the decoder's mask resolution (4x the token grid) that
  peaks at the centre of each object of the prompt (`cdsam.data.centres.centre_heatmap`); its
  peaks become point prompts (`cdsam.inference.instances`). The text modulates the embedding
  (FiLM), and two transposed convolutions upsample it as SAM's own mask upscaling does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cdsam.models.heads import SAM_DIM


class PresenceHead(nn.Module):
    """Bx256xhxw embeddings + BxD text features + Bx1xhxw mask weights (the decoder's mask
    probabilities averaged to the cells) + BxhwxD CLIP-space tokens → B logits (present)."""

    def __init__(self, clip_dim: int, dim: int = SAM_DIM, hidden: int = 256) -> None:
        super().__init__()
        self.query = nn.Linear(clip_dim, dim)
        self.key = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(3 * dim + 3, hidden), nn.GELU(),
                                 nn.Linear(hidden, 1))

    def forward(self, embeddings: torch.Tensor, text: torch.Tensor, weights: torch.Tensor,
                clip_tokens: torch.Tensor) -> torch.Tensor:
        cells = embeddings.flatten(2).transpose(1, 2)  # B x hw x 256
        q = self.query(text)
        match = (self.key(cells) @ q.unsqueeze(-1)).squeeze(-1) / math.sqrt(q.shape[-1])
        pooled = (match.softmax(dim=1).unsqueeze(-1) * cells).sum(dim=1)
        best = match.amax(dim=1, keepdim=True)
        w = weights.flatten(1).to(cells.dtype)  # B x hw
        mass = w.sum(dim=1, keepdim=True).clamp(min=1e-3)
        region = (w.unsqueeze(-1) * cells).sum(dim=1) / mass
        seen = (w.unsqueeze(-1) * clip_tokens.to(cells.dtype)).sum(dim=1) / mass
        sim = F.cosine_similarity(seen, text.to(seen.dtype), dim=-1).unsqueeze(-1)
        area = w.mean(dim=1, keepdim=True)
        return self.mlp(torch.cat([pooled, region, q, best, sim, area], dim=-1)).squeeze(-1)


class CentreHead(nn.Module):
    """Bx256xhxw embeddings + BxD text features → Bx1x4hx4w centre-heatmap logits."""

    def __init__(self, clip_dim: int, dim: int = SAM_DIM, width: int = 64) -> None:
        super().__init__()
        self.film = nn.Linear(clip_dim, 2 * dim)
        self.body = nn.Sequential(
            nn.Conv2d(dim, width, 3, padding=1), nn.GELU(),
            nn.ConvTranspose2d(width, width // 2, 2, stride=2), nn.GELU(),
            nn.ConvTranspose2d(width // 2, width // 4, 2, stride=2), nn.GELU(),
            nn.Conv2d(width // 4, 1, 3, padding=1))
        # Start from "no centre anywhere" (sigmoid ~0.01): the targets are mostly zero.
        nn.init.constant_(self.body[-1].bias, -4.6)

    def forward(self, embeddings: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.film(text).chunk(2, dim=-1)
        x = embeddings * (1 + gamma[..., None, None]) + beta[..., None, None]
        return self.body(x)
