"""``RingMultiheadAttention``: a drop-in for ``torch.nn.MultiheadAttention(batch_first=True)`` whose
attention runs on the ring.

Parameters are named and packed like ``nn.MultiheadAttention`` (``in_proj_weight`` / ``q_proj_weight``
..., ``in_proj_bias``, ``out_proj``), so its ``state_dict`` loads as is. Inputs are this rank's
sequence shards; the key/value shards must cover the same positions as the query shard.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..attention.factory import create_ring_attention
from ..config import RingAttentionConfig
from ..shard_plan import SequenceShards


class RingMultiheadAttention(nn.Module):
    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        attention: str = "standard",
        *,
        bias: bool = True,
        batch_first: bool = True,
        kdim: int | None = None,
        vdim: int | None = None,
        num_kv_heads: int | None = None,
        process_group: Any = None,
        config: RingAttentionConfig | None = None,
        **config_overrides: Any,
    ):
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be a positive multiple of num_heads={num_heads}")
        kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if kv_heads <= 0 or num_heads % kv_heads:
            raise ValueError(f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads}")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, kv_heads
        self.head_dim = embed_dim // num_heads
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        self.batch_first = batch_first
        kv_dim = kv_heads * self.head_dim
        # Same packing rule as nn.MultiheadAttention: one in_proj_weight when every input is embed_dim wide.
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(embed_dim + 2 * kv_dim, embed_dim))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim))
            self.k_proj_weight = nn.Parameter(torch.empty(kv_dim, self.kdim))
            self.v_proj_weight = nn.Parameter(torch.empty(kv_dim, self.vdim))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.zeros(embed_dim + 2 * kv_dim))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.attention = create_ring_attention(attention, config=config, process_group=process_group,
                                               **config_overrides)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for w in (self.in_proj_weight, self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
            if w is not None:
                nn.init.xavier_uniform_(w)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    def _project(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
        e, kv = self.embed_dim, self.num_kv_heads * self.head_dim
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else (b[:e], b[e:e + kv], b[e + kv:])
        if self._qkv_same_embed_dim:
            wq, wk, wv = self.in_proj_weight[:e], self.in_proj_weight[e:e + kv], self.in_proj_weight[e + kv:]
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        document_ids: torch.Tensor | SequenceShards | None = None,
    ) -> tuple[torch.Tensor, None]:
        """``document_ids``: the batch's shard plan (or this rank's ids: the slow path), as for the layers."""
        if need_weights:
            raise ValueError(
                "need_weights=True is not supported: ring attention never materialises the attention "
                "matrix (it is spread over the ring); call with need_weights=False"
            )
        if attn_mask is not None or key_padding_mask is not None:
            raise ValueError(
                "attn_mask and key_padding_mask are not supported in the ring (no rank holds the full "
                "mask); use is_causal=True for causal attention, a pattern variant (dilated, block_sparse) "
                "for structured sparsity, and ignore_index labels for padding"
            )
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if query.dim() != 3 or key.shape[:2] != query.shape[:2] or value.shape[:2] != query.shape[:2]:
            raise ValueError(
                f"query {tuple(query.shape)}, key {tuple(key.shape)} and value {tuple(value.shape)} must be "
                "3-D local shards of the same positions (batch, n_local, dim) with batch_first=True"
            )
        bsz, n = query.shape[:2]
        q, k, v = self._project(query, key, value)
        q = q.view(bsz, n, self.num_heads, self.head_dim)
        k = k.view(bsz, n, self.num_kv_heads, self.head_dim)
        v = v.view(bsz, n, self.num_kv_heads, self.head_dim)
        attended = self.attention(q, k, v, is_causal=is_causal, document_ids=document_ids)
        out = self.out_proj(attended.reshape(bsz, n, self.embed_dim))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, None

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, scale=1/sqrt({self.head_dim})={1 / math.sqrt(self.head_dim):.4g}")
