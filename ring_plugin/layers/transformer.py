"""A pre-norm transformer block whose attention runs on the ring."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..attention.factory import create_ring_attention
from ..shard_plan import SequenceShards
from .recompute import offloaded_checkpoint, tiled_over_sequence
from .rotary import apply_rotary


def make_norm(kind: str, dim: int, eps: float = 1e-5) -> nn.Module:
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps)
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    raise ValueError(f"norm={kind!r} is not known; valid: 'rmsnorm', 'layernorm'")


class RotarySelfAttention(nn.Module):
    """Fused QKV projection (grouped-query when ``n_kv_head < n_head``), rotary q/k, ring attention."""

    def __init__(self, n_embd: int, n_head: int, n_kv_head: int | None, attention: str,
                 attention_kwargs: dict[str, Any] | None = None, bias: bool = False):
        super().__init__()
        kv = n_head if n_kv_head is None else n_kv_head
        if n_embd % n_head or n_head % kv:
            raise ValueError(f"n_embd={n_embd}, n_head={n_head}, n_kv_head={n_kv_head}: n_head must divide "
                             "n_embd and n_kv_head must divide n_head")
        self.n_head, self.n_kv_head, self.head_dim = n_head, kv, n_embd // n_head
        self.qkv = nn.Linear(n_embd, (n_head + 2 * kv) * self.head_dim, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.attn = create_ring_attention(attention, **(attention_kwargs or {}))

    def heads(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Rotated q (batch, n, heads, head_dim) and k, v (batch, n, kv_heads, head_dim)."""
        b, n, _ = x.shape
        q, k, v = self.qkv(x).split([self.n_head * self.head_dim, *(2 * [self.n_kv_head * self.head_dim])], -1)
        q = apply_rotary(q.view(b, n, self.n_head, self.head_dim), cos, sin)
        k = apply_rotary(k.view(b, n, self.n_kv_head, self.head_dim), cos, sin)
        return q, k, v.view(b, n, self.n_kv_head, self.head_dim)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               document_ids: torch.Tensor | SequenceShards | None = None) -> torch.Tensor:
        """Causal (document-masked) attention of rotated heads; (batch, n, heads * head_dim)."""
        out = self.attn(q, k, v, is_causal=True, **({} if document_ids is None else {"document_ids": document_ids}))
        return out.flatten(2)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                document_ids: torch.Tensor | SequenceShards | None = None) -> torch.Tensor:
        return self.proj(self.attend(*self.heads(x, cos, sin), document_ids))


class MLP(nn.Module):
    """``proj(gelu(fc(x)))``. ``tile_tokens``: run it over tiles of that many tokens, each recomputed in
    backward, so the (tokens, hidden) activation never exists whole (4x the model width: at 512K tokens
    per GPU, 17 GB per tensor for the 3B model)."""

    def __init__(self, n_embd: int, hidden: int, bias: bool = False, tile_tokens: int | None = None):
        super().__init__()
        self.fc = nn.Linear(n_embd, hidden, bias=bias)
        self.proj = nn.Linear(hidden, n_embd, bias=bias)
        self.tile_tokens = tile_tokens

    def untiled(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP on ``x`` at once (what each tile runs)."""
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tiled_over_sequence(self.untiled, x, self.tile_tokens)


class TransformerBlock(nn.Module):
    """``x + attn(norm(x))`` then ``x + mlp(norm(x))``; causal, rotary from global positions.

    ``checkpointing=True`` recomputes the block in backward (the ring forward runs again: every rank
    of the ring recomputes the same blocks in the same order, so the ring stays in step).
    ``recompute_attention=False`` (with checkpointing) recomputes everything but attention: the
    attention's inputs, output and logsumexp stay saved, so backward runs no ring forward at all. At
    long context attention is most of the forward's FLOPs, so this trades memory (q, k, v and the
    output per layer) for about a quarter of the step.
    ``offload_checkpoint=True`` (full checkpointing only) keeps the block's input in host memory until
    backward needs it: the only tensor a checkpointed block keeps is then on the CPU (pinned, copied
    asynchronously), which is what lets millions of tokens fit (4.3 GB per block at 512K tokens per GPU
    for the 3B model). ``mlp_tile_tokens``: see :class:`MLP`.
    """

    def __init__(self, n_embd: int, n_head: int, n_kv_head: int | None = None, *, attention: str = "standard",
                 attention_kwargs: dict[str, Any] | None = None, mlp_hidden: int | None = None,
                 norm: str = "rmsnorm", bias: bool = False, checkpointing: bool = False,
                 recompute_attention: bool = True, offload_checkpoint: bool = False,
                 mlp_tile_tokens: int | None = None):
        super().__init__()
        self.norm1 = make_norm(norm, n_embd)
        self.attn = RotarySelfAttention(n_embd, n_head, n_kv_head, attention, attention_kwargs, bias)
        self.norm2 = make_norm(norm, n_embd)
        self.mlp = MLP(n_embd, mlp_hidden or 4 * n_embd, bias, tile_tokens=mlp_tile_tokens)
        if offload_checkpoint and not (checkpointing and recompute_attention):
            raise ValueError("offload_checkpoint needs full checkpointing "
                             "(checkpointing=True, recompute_attention=True)")
        self.checkpointing = checkpointing
        self.recompute_attention = recompute_attention
        self.offload_checkpoint = offload_checkpoint

    def _body(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              document_ids: torch.Tensor | SequenceShards | None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, document_ids)
        return x + self.mlp(self.norm2(x))

    def _heads(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.attn.heads(self.norm1(x), cos, sin)

    def _after_attention(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        x = x + self.attn.proj(attended)
        return x + self.mlp(self.norm2(x))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                document_ids: torch.Tensor | SequenceShards | None = None) -> torch.Tensor:
        """``document_ids``: this rank's shard of packed documents' ids (attention stays inside each)."""
        if not (self.checkpointing and self.training and torch.is_grad_enabled()):
            return self._body(x, cos, sin, document_ids)
        if self.offload_checkpoint:
            return offloaded_checkpoint(self._body, x, cos, sin, document_ids)
        if self.recompute_attention:
            return checkpoint(self._body, x, cos, sin, document_ids, use_reentrant=False)
        q, k, v = checkpoint(self._heads, x, cos, sin, use_reentrant=False)
        attended = self.attn.attend(q, k, v, document_ids)
        return checkpoint(self._after_attention, x, attended, use_reentrant=False)
