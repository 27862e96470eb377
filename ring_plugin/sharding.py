"""Cutting a batch along the sequence (dim 1) over the sequence-parallel group, with its shard plan.

One function for the strategies (Lightning) and for plain loops over Hugging Face models
(``ring_plugin.hf.shard_batch`` prepares transformers' extra keys, then cuts here).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from .layout import shard_sequence
from .shard_plan import SHARDS_KEY, SequenceShards, plan_shards

SEQUENCE_KEYS = ("input_ids", "labels", "position_ids", "document_ids")


def cut_batch(
    batch: Any, layout: str, sequence_rank: int, sequence_size: int, extra_keys: Iterable[str] = (),
    ulysses_size: int = 1,
) -> Any:
    """This rank's shard of ``batch`` (a mapping with a full-length ``input_ids``, shape (batch, length))
    over the ``sequence_size`` ranks sharing a sample (Ulysses x ring), this one at ``sequence_rank``.

    ``position_ids`` are created from the global positions when absent, so the model sees where its
    rows sit in the full sequence. Other values pass through untouched. A non-mapping batch, or one
    without ``input_ids``, is returned as is. Packed data (a batch with global ``document_ids``) also
    gets its shard plan under ``"sequence_shards"`` (:class:`~ring_plugin.shard_plan.SequenceShards`),
    made here once: ``layout='balanced'`` is computed from those ids.
    """
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        return batch
    input_ids = batch["input_ids"]
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
    length = input_ids.shape[1]
    plan = plan_shards(layout, sequence_rank, sequence_size, batch.get("document_ids"), ulysses_size)
    shards = plan.layout
    if length % shards.num_chunks:
        raise ValueError(
            f"sequence length {length} cannot be sharded: it must be a multiple of {shards.num_chunks} "
            f"(sequence-parallel size {sequence_size} x {shards.chunks_per_rank} chunk(s) per rank for "
            f"layout={layout!r}); pad or crop the sequences to a multiple of it"
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
        out[key] = shard_sequence(value, 1, shards, sequence_rank, sequence_size).contiguous()
    if plan.documents is not None:
        out[SHARDS_KEY] = plan
    return out


def batch_documents(batch: Mapping[str, Any]) -> SequenceShards | torch.Tensor | None:
    """What a model forward passes as ``document_ids=`` for a cut ``batch``: its shard plan, checked
    against the batch's own ids (a plan of another batch is refused), else its raw ids, else None."""
    plan = batch.get(SHARDS_KEY)
    if plan is None:
        return batch.get("document_ids")
    error = plan.ids_error(batch.get("document_ids"))
    if error:
        raise ValueError(error)
    return plan


# The strategies' name for the cut (``ring_plugin.lightning.shard_batch``), kept for existing callers.
shard_batch = cut_batch
