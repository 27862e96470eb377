"""``RingGPT``: a small decoder-only transformer that runs on sequence shards.

``forward(input_ids, position_ids)`` takes this rank's shard of the tokens and their GLOBAL positions
(the strategy creates both) and returns this rank's logits. Rotary embeddings read the global
positions, so the shards together compute exactly what one process computes on the full sequence.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.rotary import RotaryEmbedding
from ..layers.transformer import TransformerBlock, make_norm
from ..shard_plan import SequenceShards


@dataclass
class GPTConfig:
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None
    n_embd: int = 768
    max_seq_len: int = 131072
    attention: str = "standard"
    attention_kwargs: dict[str, Any] = field(default_factory=dict)
    activation_checkpointing: bool = False
    # With checkpointing: False keeps each attention's output (and logsumexp) so backward never
    # recomputes attention (faster at long context, more memory); True recomputes whole blocks.
    recompute_attention: bool = True
    # With checkpointing: how many blocks, the first ones, are checkpointed (None: all). The last blocks
    # keep everything: backward reaches them first and frees their activations before any block recomputes.
    checkpoint_layers: int | None = None
    # Long context (millions of tokens): checkpointed blocks keep their input in host memory (full
    # checkpointing only), and the MLP runs over tiles of this many tokens (None: whole).
    offload_checkpoints: bool = False
    mlp_tile_tokens: int | None = None
    tie_weights: bool = True
    mlp_hidden: int | None = None
    norm: str = "rmsnorm"
    bias: bool = False
    rope_base: float = 10000.0
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layer", "n_head", "n_embd", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ValueError(f"n_embd={self.n_embd} / n_head={self.n_head} must give an even head size")
        if self.n_kv_head is not None and (self.n_kv_head <= 0 or self.n_head % self.n_kv_head):
            raise ValueError(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        _check_optional_int("checkpoint_layers", self.checkpoint_layers, 0, self.n_layer,
                            f"None (all blocks) or an integer from 0 to n_layer={self.n_layer}")
        _check_optional_int("mlp_tile_tokens", self.mlp_tile_tokens, 1, None, "None or a positive integer")
        if self.offload_checkpoints and not (self.activation_checkpointing and self.recompute_attention):
            raise ValueError("offload_checkpoints=True needs activation_checkpointing=True and "
                             "recompute_attention=True (it moves the input each checkpointed block keeps to the host)")
        self.attention_kwargs = dict(self.attention_kwargs or {})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GPTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise TypeError(f"unknown GPTConfig field(s) {sorted(unknown)}; valid: {sorted(known)}")
        return cls(**values)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def checkpointed_layers(self) -> int:
        """Blocks that recompute in backward: the first ``checkpoint_layers`` (all when None), none without
        ``activation_checkpointing``."""
        if not self.activation_checkpointing:
            return 0
        return self.n_layer if self.checkpoint_layers is None else self.checkpoint_layers

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head


class RingGPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = c = config
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.rotary = RotaryEmbedding(c.head_dim, c.rope_base)
        self.blocks = nn.ModuleList(
            TransformerBlock(c.n_embd, c.n_head, c.n_kv_head, attention=c.attention,
                             attention_kwargs=c.attention_kwargs, mlp_hidden=c.mlp_hidden, norm=c.norm,
                             bias=c.bias, checkpointing=i < c.checkpointed_layers,
                             recompute_attention=c.recompute_attention,
                             offload_checkpoint=c.offload_checkpoints and i < c.checkpointed_layers,
                             mlp_tile_tokens=c.mlp_tile_tokens)
            for i in range(c.n_layer)
        )
        self.norm_f = make_norm(c.norm, c.n_embd)
        self.lm_head = None if c.tie_weights else nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections that write into the residual stream.
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.proj.weight")):
                nn.init.normal_(p, std=c.init_std / math.sqrt(2 * c.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                      document_ids: torch.Tensor | SequenceShards | None = None) -> torch.Tensor:
        """The final-norm hidden states (batch, n_local, n_embd) that the head turns into logits.

        Packed sequences: ``position_ids`` restart at 0 in each document (rotary per document) and
        ``document_ids`` keep attention inside each document: the batch's shard plan (made where the
        batch was cut), or this rank's shard of the ids, from which one plan is built for every block."""
        if position_ids.numel() and int(position_ids.max()) >= self.config.max_seq_len:
            raise ValueError(f"position id {int(position_ids.max())} exceeds max_seq_len={self.config.max_seq_len}")
        x = self.wte(input_ids)
        cos, sin = self.rotary(position_ids)
        if isinstance(document_ids, torch.Tensor) and len(self.blocks):
            # one plan for every block (and every recompute), not one per layer
            document_ids = self.blocks[0].attn.attn.prepare_documents(document_ids)
        for block in self.blocks:
            x = block(x, cos, sin, document_ids)
        return self.norm_f(x)

    @property
    def head_weight(self) -> torch.Tensor:
        # Read through the module at use time: ZeRO-3 gathers a partitioned weight on access in forward.
        return self.wte.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                document_ids: torch.Tensor | SequenceShards | None = None) -> torch.Tensor:
        return F.linear(self.hidden_states(input_ids, position_ids, document_ids), self.head_weight)

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Parameter count (the tied head counted once); ZeRO-3 partitioned tensors count in full."""
        n = sum(_numel(p) for p in self.parameters())
        return n - _numel(self.wte.weight) if non_embedding else n

    def keys_per_query(self, seq_len: int) -> float:
        """Average number of keys one query attends to (before the causal halving): the attention
        layer's pattern says (dense: every key)."""
        pattern = self.blocks[0].attn.attn.pattern
        return float(seq_len) if pattern is None else pattern.keys_per_query(seq_len)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), for MFU.

        Matmuls: 2 FLOPs per weight per token (embedding lookup excluded, tied head included).
        Attention: QK^T and PV cost 4 * keys * head_dim per head per query; causal halves the keys.
        """
        c = self.config
        hd = c.head_dim
        per_layer = c.n_embd * (c.n_head + 2 * c.kv_heads) * hd + c.n_embd * c.n_embd
        per_layer += 2 * c.n_embd * (c.mlp_hidden or 4 * c.n_embd)
        matmul_weights = c.n_layer * per_layer + c.n_embd * c.vocab_size
        attention = c.n_layer * c.n_head * 4 * hd * self.keys_per_query(seq_len) * 0.5
        return 3.0 * (2.0 * matmul_weights + attention)


def _check_optional_int(name: str, value: object, low: int, high: int | None, expected: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        raise ValueError(f"{name}={value!r} must be {expected}")


def _numel(p: torch.Tensor) -> int:
    # ZeRO-3 leaves an empty tensor on each rank and keeps the full size in ds_numel.
    return int(getattr(p, "ds_numel", p.numel()))
