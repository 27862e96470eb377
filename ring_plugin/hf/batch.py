"""A plain training loop (or the HF ``Trainer``) on the ring: shard a batch, reduce the gradients.

The batch follows transformers' context-parallel convention: ``shift_labels`` (the labels shifted by
one over the WHOLE sequence, before sharding) and ``num_items_in_batch`` (the count of labelled
tokens of the whole batch), so the model's loss on each rank is its token-loss sum divided by the
global count. The ranks' losses then add up to the global mean, and summing their gradients
(:func:`reduce_gradients`) gives exactly the gradient one process computes on the whole batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..comm.context import resolve_ring
from ..documents.ids import document_ids_from_position_ids
from ..sharding import cut_batch

IGNORE_INDEX = -100
# Sequence tensors of a transformers batch beyond the strategies' own (input_ids, labels, positions, documents).
EXTRA_SEQUENCE_KEYS = ("shift_labels", "attention_mask", "inputs_embeds")


def shard_batch(
    batch: Mapping[str, Any],
    group: dist.ProcessGroup | None = None,
    layout: str | None = None,
    data_parallel_group: dist.ProcessGroup | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> dict[str, Any]:
    """This rank's shard of a full-length ``batch`` (every rank of the ring holds the same one).

    ``input_ids`` (batch, length) and the other sequence tensors (``labels``, ``shift_labels``,
    ``attention_mask``, ``position_ids``, ``inputs_embeds``) are sharded in the ring's layout;
    ``position_ids`` are created from the global positions when absent; ``shift_labels`` are made from
    ``labels`` over the whole sequence when absent; ``num_items_in_batch`` counts the labelled tokens
    of the whole batch, summed over ``data_parallel_group`` when given (several rings reading
    different samples). Packed sequences (``position_ids`` restarting at 0 in each document) get their
    ``document_ids``, made from the global positions here, where the whole sequence is at hand; the
    label that crosses a document boundary is then ignored. ``num_items_in_batch``, when given (a
    count over several accumulated micro-batches, as the HF ``Trainer`` makes), replaces the count. The
    ring: ``group``/``layout``, else the active ring, else the default group.
    """
    ring = resolve_ring(group, None, layout)
    out = full_sequence_batch(batch)
    if out.get("shift_labels") is not None:
        if num_items_in_batch is None:
            num_items_in_batch = count_labels(out)
            if data_parallel_group is not None:
                dist.all_reduce(num_items_in_batch, group=data_parallel_group)
        out["num_items_in_batch"] = num_items_in_batch
    return cut_batch(out, ring.layout, ring.sequence_rank, ring.sequence_size, extra_keys=EXTRA_SEQUENCE_KEYS,
                     ulysses_size=ring.ulysses_size)


def full_sequence_batch(batch: Mapping[str, Any]) -> dict[str, Any]:
    """``batch`` with what must be made before sharding, over the whole sequence: ``position_ids``
    (global), ``document_ids`` (packed sequences) and ``shift_labels`` (no label across documents)."""
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise ValueError("batch must be a mapping with a full-length input_ids tensor (batch, length)")
    input_ids = batch["input_ids"]
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a (batch, length) tensor, got {getattr(input_ids, 'shape', input_ids)}")
    length = input_ids.shape[1]
    out = dict(batch)
    out.setdefault("position_ids", torch.arange(length, device=input_ids.device).expand_as(input_ids))
    positions = out["position_ids"]
    if "document_ids" not in out and bool((positions.diff(dim=-1) != 1).any()):
        out["document_ids"] = document_ids_from_position_ids(positions)
    if "shift_labels" not in out and out.get("labels") is not None:
        out["shift_labels"] = F.pad(out["labels"], (0, 1), value=IGNORE_INDEX)[:, 1:]
        if out.get("document_ids") is not None:  # no loss on the next document's first token
            docs = out["document_ids"]
            out["shift_labels"][:, :-1][docs[:, 1:] != docs[:, :-1]] = IGNORE_INDEX
    return out


def count_labels(batch: Mapping[str, Any]) -> torch.Tensor:
    """Labelled tokens of a full-sequence batch made by :func:`full_sequence_batch` (int64 scalar)."""
    return (batch["shift_labels"] != IGNORE_INDEX).sum()


def reduce_gradients(parameters: nn.Module | Iterable[torch.Tensor], group: dist.ProcessGroup | None = None) -> None:
    """Sum every gradient over ``group`` (default: every rank: the rings and their data-parallel
    copies), after ``backward`` of a loss normalised by the global ``num_items_in_batch``."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    params = parameters.parameters() if isinstance(parameters, nn.Module) else parameters
    works = [dist.all_reduce(p.grad, group=group, async_op=True) for p in params if p.grad is not None]
    for work in works:
        work.wait()
