"""The trainable heads that join DINO, CLIP text and the SAM decoder."""

from __future__ import annotations

import torch
from torch import nn

SAM_DIM = 256  # SAM's prompt/decoder width, fixed by every official checkpoint


class TokenProjection(nn.Module):
    """Image tokens BxNxC → CLIP text space BxNxD (for the alignment loss)."""

    def __init__(self, in_dim: int, clip_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.proj = nn.Linear(in_dim, clip_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(tokens))


class TokenToMaskEmbedding(nn.Module):
    """Image tokens BxNxC → SAM image embedding Bx256xhxw."""

    def __init__(self, in_dim: int, out_dim: int = SAM_DIM) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.proj = nn.Linear(in_dim, out_dim)
        self.out_norm = nn.LayerNorm(out_dim)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b, n, _ = tokens.shape
        h, w = grid
        if n != h * w:
            raise ValueError(f"{n} tokens do not fill a {h}x{w} grid")
        x = self.out_norm(self.proj(self.norm(tokens)))
        return x.transpose(1, 2).reshape(b, -1, h, w)


class TextToPrompt(nn.Module):
    """CLIP text features BxD → k sparse SAM prompt tokens Bxkx256.

    This is what makes the mask depend on the text: SAM's two-way transformer attends between
    these tokens and the image embedding exactly as it does for point or box prompts.
    """

    def __init__(self, clip_dim: int, num_tokens: int, out_dim: int = SAM_DIM,
                 hidden: int = SAM_DIM) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.out_dim = out_dim
        self.mlp = nn.Sequential(
            nn.Linear(clip_dim, hidden), nn.GELU(), nn.Linear(hidden, num_tokens * out_dim)
        )

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.mlp(text).view(text.shape[0], self.num_tokens, self.out_dim)
