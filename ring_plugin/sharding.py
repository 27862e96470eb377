"""Sharding of a batch's sequence tensors along the sequence dimension (dim 1) in the ring's layout.

One function for the strategies (Lightning) and for plain loops over Hugging Face models.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from .layout import resolve_layout, shard_sequence

SEQUENCE_KEYS = ("input_ids", "labels", "position_ids", "document_ids")


def shard_batch(
    batch: Any, layout: str, ring_rank: int, ring_size: int, extra_keys: Iterable[str] = ()
) -> Any:
    """This rank's shard of ``batch`` (a mapping with a full-length ``input_ids``, shape (batch, length)).

    ``position_ids`` are created from the global positions when absent, so the model sees where its
    rows sit in the full sequence. Other values pass through untouched. A non-mapping batch, or one
    without ``input_ids``, is returned as is. ``layout='balanced'`` (packed documents) is computed
    from the batch's global ``document_ids``.
    """
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        return batch
    input_ids = batch["input_ids"]
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
    length = input_ids.shape[1]
    if layout == "balanced" and "document_ids" not in batch:
        raise ValueError("layout='balanced' balances packed documents: the batch needs 'document_ids' (batch, length)")
    shards = resolve_layout(layout, ring_size, batch.get("document_ids"))
    if length % shards.num_chunks:
        raise ValueError(
            f"sequence length {length} cannot be sharded: it must be a multiple of {shards.num_chunks} "
            f"(ring size {ring_size} x {shards.chunks_per_rank} chunk(s) per rank for layout={layout!r}); "
            "pad or crop the sequences to a multiple of it"
        )
    out = dict(batch)
    if "position_ids" not in out:
        out["position_ids"] = torch.arange(length, device=input_ids.device).expand_as(input_ids)
    for key in (*SEQUENCE_KEYS, *extra_keys):
        value = out.get(key)
        if value is None:
            continue
        if not isinstance(value, torch.Tensor) or value.dim() < 2 or value.shape[:2] != input_ids.shape:
            raise ValueError(
                f"batch[{key!r}] must be a tensor (batch, length, ...) shaped like input_ids "
                f"{tuple(input_ids.shape)} to be sharded along the sequence; "
                f"got {tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}"
            )
        out[key] = shard_sequence(value, 1, shards, ring_rank, ring_size).contiguous()
    return out
