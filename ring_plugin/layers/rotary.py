"""Rotary position embeddings computed from GLOBAL position ids, so a shard rotates exactly as the same
rows would in the full sequence."""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        # Not a buffer: it is a constant of (head_dim, base), recomputed on load, never sharded by ZeRO.
        self._inv_freq = inv_freq.float()

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` shaped ``(batch or 1, n_local, 1, head_dim // 2)`` in fp32."""
        if position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0)
        inv_freq = self._inv_freq.to(position_ids.device)
        angles = position_ids.to(torch.float32).unsqueeze(-1) * inv_freq
        return angles.cos().unsqueeze(2), angles.sin().unsqueeze(2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (batch, n, heads, head_dim) by the angles in ``cos``/``sin`` (half-split convention)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
