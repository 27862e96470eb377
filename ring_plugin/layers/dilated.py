"""Single-device LongNet layers for users without a ring: ``DilatedAttention`` and
``MultiheadDilatedAttention`` (the call shapes of ``dilated_attention_pytorch``).

They run the same engine and pattern as the ring variants with a ring of one, so they never
communicate, even when ``torch.distributed`` is initialised.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..attention.modules import StandardRingAttention
from ..comm.context import RingContext


class DilatedAttention(StandardRingAttention):
    """LongNet dilated attention on one device: ``attn(q, k, v, is_causal=False)`` with
    ``(batch, n, heads, head_dim)`` tensors (k/v may have fewer heads)."""

    variant = "dilated"

    def __init__(
        self,
        segment_lengths: list[int],
        dilation_rates: list[int],
        softmax_scale: float | None = None,
        attention_dropout: float = 0.0,
        **overrides: Any,
    ):
        super().__init__(
            segment_lengths, dilation_rates, dropout=attention_dropout, softmax_scale=softmax_scale, **overrides
        )

    def resolve_ring(self) -> RingContext:
        return RingContext.of(None, "contiguous")


class MultiheadDilatedAttention(nn.Module):
    """Projections around :class:`DilatedAttention`, as in LongNet (MAGNETO's sub-LayerNorm before
    the output projection when ``layer_norm=True``). ``forward(query, key, value, is_causal=False)``
    takes ``(batch, n, embed_dim)`` and returns ``(output, None)`` like ``nn.MultiheadAttention``."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dilation_rates: list[int],
        segment_lengths: list[int],
        dropout: float = 0.0,
        bias: bool = True,
        layer_norm: bool = True,
        layer_norm_eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be a multiple of num_heads={num_heads}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self.attention = DilatedAttention(segment_lengths, dilation_rates, attention_dropout=dropout)
        self.norm = nn.LayerNorm(embed_dim, eps=layer_norm_eps, **kw) if layer_norm else None
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, is_causal: bool = False
    ) -> tuple[torch.Tensor, None]:
        b, n, _ = query.shape
        h, d = self.num_heads, self.embed_dim // self.num_heads
        q = self.q_proj(query).view(b, n, h, d)
        k = self.k_proj(key).view(b, key.shape[1], h, d)
        v = self.v_proj(value).view(b, value.shape[1], h, d)
        x = self.attention(q, k, v, is_causal=is_causal).reshape(b, n, self.embed_dim)
        if self.norm is not None:
            x = self.norm(x)
        return self.out_proj(x), None
