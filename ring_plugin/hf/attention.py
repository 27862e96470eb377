"""``attn_implementation="ring"``: every attention layer of a transformers model runs on the ring engine.

Each rank feeds its shard of the tokens with their GLOBAL ``position_ids`` and gets its shard's
output. Everything the ring cannot honour exactly is refused with a ``ValueError`` that every rank of
the ring raises together (one small all-gather per layer, before the first ring message), so a bad
input never leaves a peer waiting.

The mask-interface entry exists because transformers silently drops the attention mask of an
implementation that has none: it hands the layers ``None`` (nothing to mask: the ring's own causal
mask is exact) or a :class:`MaskRefusal` naming what it cannot apply. Nothing ever materialises an
n x n mask, and no shard ever reaches transformers' own sdpa/flash paths (zigzag positions look
"packed" to them).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..attention.modules import StandardRingAttention
from ..cache import BoundedCache
from ..comm.agreement import agree_or_raise
from ..comm.context import RingContext, resolve_ring
from ..shard_plan import SHARDS_KEY, SequenceShards
from .families import family_refusal
from .structure import structure_error

RING = "ring"


class MaskRefusal:
    """What the mask interface hands the layers when the ring cannot apply the mask exactly."""

    def __init__(self, reason: str):
        self.reason = reason

    def __repr__(self) -> str:
        return f"MaskRefusal({self.reason!r})"


def ring_mask(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> MaskRefusal | None:
    """transformers' mask-interface entry: a padding mask with masked tokens cannot be applied on the ring."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return MaskRefusal(
        "attention_mask masks some tokens (padding); padding masks are not supported by attn_implementation="
        "'ring': pad at the end of the sequence, drop the attention_mask and set the padded labels to -100 "
        "(causal attention never lets a real token see later padding, so this is exact)")


_ENGINES: BoundedCache[StandardRingAttention] = BoundedCache(8)  # stateless engine layers, one per softmax scale


def ring_engine(scaling: float) -> StandardRingAttention:
    """The ring layer that runs every transformers attention call of this softmax scale (one per scale)."""
    return _ENGINES.get(scaling, lambda: StandardRingAttention(softmax_scale=scaling))


def ring_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-interface entry: ``query`` (batch, heads, n_local, head_dim), ``key`` and
    ``value`` (batch, kv_heads, n_local, head_dim); returns (batch, n_local, heads, head_dim) and no weights.

    Packed documents come as the batch's shard plan (``sequence_shards=``, which ``shard_batch`` puts in
    the batch): the checks that read the data then run in the step's first layer only, and no layer
    gathers ids. Raw ``document_ids`` (this rank's shard) take the engine's slow path in every layer."""
    ring = resolve_ring(None, None, None)
    plan = kwargs.get(SHARDS_KEY)
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    try:
        error = _layer_refusal(module, query, key, attention_mask, dropout, kwargs, bool(causal))
        if error is None and not (plan is not None and plan.agreed("hf")):
            error = _data_refusal(query, kwargs, ring, plan)
    except Exception as err:  # noqa: BLE001 - any failure of the checks is reported to every rank, not raised alone
        error = f"checking the inputs of the ring attention failed: {type(err).__name__}: {err}"
    if plan is not None and plan.agreed("hf"):
        # The ranks agreed on this step's data in its first layer; a layer's own refusal (its config)
        # is the same on every rank of one model, so each rank raises it without a message.
        if error:
            raise ValueError(error)
    else:
        agree_or_raise(error, (), ring.sequence_group, query.device)
        if plan is not None:
            plan.mark_agreed("hf")
    engine = ring_engine(float(scaling) if scaling is not None else query.shape[-1] ** -0.5)
    masks = {}
    if plan is not None:
        masks["document_ids"] = plan
    elif kwargs.get("document_ids") is not None:  # packed documents, slow path
        masks["document_ids"] = kwargs["document_ids"]
    if kwargs.get("sliding_window") is not None:  # Mistral / Qwen2 / Gemma3 local layers (causal: see _layer_refusal)
        masks["sliding_window"] = int(kwargs["sliding_window"])
    out = engine(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), is_causal=bool(causal), **masks)
    return out, None


def _data_refusal(query: torch.Tensor, kwargs: dict[str, Any], ring: RingContext,
                  plan: SequenceShards | None) -> str | None:
    """What the step's data asks for that the ring cannot do exactly (positions that do not fit the
    layout or the documents, a plan of another batch or ring), or None."""
    documents = kwargs.get("document_ids")
    if plan is not None:
        error = plan.ids_error(documents) or plan.use_error(
            query.shape[0], query.shape[-2], ring.layout, ring.sequence_rank, ring.sequence_size, ring.ulysses_size)
        if error:
            return error
        documents = None if plan.local_ids is None else plan.local_ids.to(query.device)
    return structure_error(kwargs.get("position_ids"), documents, query.shape[-2], ring)


def _layer_refusal(module: nn.Module, query: torch.Tensor, key: torch.Tensor, attention_mask: Any, dropout: float,
                   kwargs: dict[str, Any], causal: bool) -> str | None:
    """What this layer's call asks for that the ring cannot do exactly (its config and call), or None."""
    family = family_refusal(module)
    if family is not None:
        return family
    if key.shape[-2] != query.shape[-2]:
        return (f"keys ({key.shape[-2]}) and queries ({query.shape[-2]}) differ in length: a KV cache with past "
                "tokens (generation) or cross-attention is not supported by attn_implementation='ring'; switch "
                "the model to 'sdpa' (model.set_attn_implementation('sdpa')) to generate")
    if kwargs.get("use_cache") and module.training and torch.is_grad_enabled():
        return "use_cache=True in training: pass use_cache=False (or set model.config.use_cache = False)"
    if dropout and dropout > 0:
        return (f"attention dropout={dropout} in training is not supported by the ring (it would not be exact); "
                "set config.attention_dropout = 0.0 or call .eval()")
    if kwargs.get("softcap") is not None:
        return f"attention logit softcapping (softcap={kwargs['softcap']}) is not supported by the ring"
    if kwargs.get("s_aux") is not None or getattr(module, "sinks", None) is not None:
        return "attention sinks (s_aux) are not supported by the ring"
    if isinstance(attention_mask, MaskRefusal):
        return attention_mask.reason
    if attention_mask is not None:
        return (f"a prepared attention mask ({type(attention_mask).__name__}) cannot be applied on the ring "
                "(no rank holds the full mask); pass no attention_mask: the ring applies the causal mask itself")
    if any(kwargs.get(k) is not None for k in ("cu_seq_lens_q", "cu_seq_lens_k", "seq_idx")):
        return ("packed sequences are given to attn_implementation='ring' as document_ids (the ring's shard of "
                "the global document numbers; ring_plugin.hf.shard_batch makes them), not cu_seq_lens / seq_idx")
    if kwargs.get("sliding_window") is not None and not causal:
        return (f"a sliding window ({kwargs['sliding_window']}) with bidirectional attention (is_causal=False, e.g. "
                "Gemma3's use_bidirectional_attention=True) is not supported by the ring, which windows causal "
                "attention only; use causal attention or attn_implementation='sdpa'")
    packed = kwargs.get("document_ids") is not None or kwargs.get(SHARDS_KEY) is not None
    if packed and kwargs.get("sliding_window") is not None:
        return "a sliding window together with packed documents (document_ids) is not supported yet"
    return None
