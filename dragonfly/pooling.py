"""Token reduction per sub-image: mean pooling (Dragonfly) and a Perceiver Resampler (ablation).

Mean pooling averages each ``stride x stride`` window of a sub-image's square token grid
(24x24 for ViT-L/14 at 336 px): strides 1, 2, 3, 4, 6, 8 give 576, 144, 64, 36, 16, 9 tokens.

The Perceiver Resampler follows IDEFICS (Flamingo's resampler): learned latents attend to
``concat(tokens, latents)``, then a feed-forward layer, ``depth`` times, and a final LayerNorm. The
paper's ablation uses depth 3 and 36 latents per sub-image, matching mean pooling's token count.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dragonfly.config import ConfigError, config_from_dict


def mean_pool(tokens: torch.Tensor, stride: int) -> torch.Tensor:
    """tokens (N, G*G, C), row-major over a G x G grid -> (N, (G/stride)^2, C), row-major."""
    n, length, channels = tokens.shape
    side = math.isqrt(length)
    if side * side != length or side % stride:
        raise ValueError(f"mean_pool: {length} tokens are not a square grid divisible by stride {stride}")
    if stride == 1:
        return tokens
    grid = tokens.transpose(1, 2).reshape(n, channels, side, side)  # (N, C, G, G)
    pooled = F.avg_pool2d(grid, kernel_size=stride, stride=stride)  # (N, C, G/s, G/s)
    return pooled.flatten(2).transpose(1, 2)  # (N, (G/s)^2, C)


@dataclass(frozen=True)
class PerceiverConfig:
    """Resampler shape (IDEFICS' defaults for a 1024-wide ViT). Latents per sub-image are not set
    here: they equal the level's token count in ``TokenConfig``, so the token layout is the same
    whichever reducer runs."""

    depth: int = 3
    heads: int = 16
    head_dim: int = 96
    ff_mult: int = 4

    def __post_init__(self):
        if min(self.depth, self.heads, self.head_dim, self.ff_mult) <= 0:
            raise ConfigError(f"perceiver: depth, heads, head_dim and ff_mult must be positive, got {self}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PerceiverConfig:
        return config_from_dict(cls, data)


class PerceiverBlock(nn.Module):
    """Latents cross-attend to [tokens; latents], then a feed-forward layer (both residual)."""

    def __init__(self, dim: int, config: PerceiverConfig):
        super().__init__()
        self.heads, self.head_dim = config.heads, config.head_dim
        inner = config.heads * config.head_dim
        self.norm_tokens = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.ff = nn.Sequential(  # IDEFICS' MLP: LayerNorm, ReLU, no biases
            nn.LayerNorm(dim),
            nn.Linear(dim, config.ff_mult * dim, bias=False),
            nn.ReLU(),
            nn.Linear(config.ff_mult * dim, dim, bias=False),
        )

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape  # (N, L, H*Dh) -> (N, H, L, Dh)
        return x.view(n, length, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, tokens: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        # tokens (N, L, C), latents (N, M, C) -> latents (N, M, C)
        x = self.norm_tokens(tokens)
        lat = self.norm_latents(latents)
        q = self._split_heads(self.to_q(lat))  # (N, H, M, Dh)
        k, v = self.to_kv(torch.cat([x, lat], dim=1)).chunk(2, dim=-1)  # (N, L+M, H*Dh) each
        attn = F.scaled_dot_product_attention(q, self._split_heads(k), self._split_heads(v))  # (N, H, M, Dh)
        latents = latents + self.to_out(attn.transpose(1, 2).flatten(2))
        return latents + self.ff(latents)


class PerceiverResampler(nn.Module):
    """(N, L, C) tokens of one sub-image each -> (N, n_latents, C)."""

    def __init__(self, dim: int, n_latents: int, config: PerceiverConfig):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(n_latents, dim) * dim**-0.5)
        self.blocks = nn.ModuleList(PerceiverBlock(dim, config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        latents = self.latents.unsqueeze(0).expand(tokens.shape[0], -1, -1)  # (N, M, C)
        for block in self.blocks:
            latents = block(tokens, latents)
        return self.norm(latents)


__all__ = ["mean_pool", "PerceiverConfig", "PerceiverBlock", "PerceiverResampler"]
