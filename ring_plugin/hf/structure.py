"""Which attention structure a layer's inputs ask for, and whether the ring can run it exactly.

One causal document per row whose tokens carry their GLOBAL positions; or packed documents, given as
``document_ids`` (this rank's shard of the global, non-decreasing document numbers) with positions
that restart at 0 in each document. Sliding windows are run by the engine (``sliding_window=``).
"""

from __future__ import annotations

import torch

from ..comm.context import RingContext
from ..layout import chunks_per_rank, global_positions


def structure_error(
    position_ids: torch.Tensor | None, document_ids: torch.Tensor | None, n_local: int, ring: RingContext
) -> str | None:
    """None when the positions fit the structure (see the module docstring); otherwise what is wrong."""
    if position_ids is None:
        return ("the attention layer got no position_ids; pass position_ids= the GLOBAL positions of this "
                "rank's tokens (ring_plugin.hf.shard_batch creates them)")
    if position_ids.dim() != 2 or position_ids.shape[-1] != n_local:
        return f"position_ids must be (batch, n_local={n_local}), got shape {tuple(position_ids.shape)}"
    if document_ids is not None:
        # Balanced shards join chunks from anywhere in the sequence: the engine checks the ids there.
        return None if ring.layout == "balanced" else _packed_error(position_ids, document_ids,
                                                                     chunks_per_rank(ring.layout))
    if ring.layout == "balanced":
        return "layout='balanced' is the layout of packed documents: pass document_ids (shard_batch makes them)"
    chunks = chunks_per_rank(ring.layout)
    expected = global_positions(n_local, ring.layout, ring.sequence_rank, ring.sequence_size,
                                device=position_ids.device)
    if not bool((position_ids == expected).all()):
        if _restarts_within_chunk(position_ids, chunks):
            return ("position_ids restart inside the sequence (packed documents): pass document_ids= as well "
                    "(ring_plugin.hf.shard_batch makes them from the global position_ids)")
        where = (f"position_ids on sequence-parallel rank {ring.sequence_rank} of {ring.sequence_size} "
                 f"({ring.layout} layout)")
        shown = f"expected {_preview(expected)}, got {_preview(position_ids[0])}"
        if bool((position_ids == torch.arange(n_local, device=position_ids.device)).all()):
            return (f"{where} are not the global positions of its shard ({shown}). transformers' default "
                    "arange(n_local) is wrong on every rank but the first: pass the global positions "
                    "(ring_plugin.hf.shard_batch creates them)")
        offset = position_ids - expected
        if bool((offset == offset.flatten()[0]).all()):
            return (f"{where} are not the global positions of its shard but those shifted by "
                    f"{int(offset.flatten()[0])} ({shown}): the ring runs one document per row starting at position "
                    "0; pass positions from 0 (or document_ids with positions restarting at 0 for packed documents)")
        return (f"{where} are not the global positions of its shard ({shown}): pass the global positions "
                "(ring_plugin.hf.shard_batch creates them)")
    return None


def _packed_error(position_ids: torch.Tensor, document_ids: torch.Tensor, chunks: int) -> str | None:
    """Inside each contiguous chunk of the shard, a position restarts at 0 exactly where a document starts
    and steps by one elsewhere (the document ids themselves are checked by the engine, on every rank)."""
    if not isinstance(document_ids, torch.Tensor) or document_ids.shape != position_ids.shape:
        return (f"document_ids must be a tensor shaped like position_ids {tuple(position_ids.shape)}, got "
                f"{getattr(document_ids, 'shape', type(document_ids).__name__)}")
    pos = position_ids.reshape(position_ids.shape[0], chunks, -1)
    docs = document_ids.reshape(document_ids.shape[0], chunks, -1)
    starts = docs.diff(dim=-1) != 0
    steps = pos.diff(dim=-1)
    if bool((starts & (pos[..., 1:] != 0)).any()) or bool((~starts & (steps != 1)).any()):
        return ("position_ids of packed documents must restart at 0 where document_ids change and count up "
                "by one inside each document")
    return None


def _restarts_within_chunk(position_ids: torch.Tensor, chunks: int) -> bool:
    """Whether positions fail to step by one inside one of the shard's contiguous chunks."""
    rows = position_ids.reshape(position_ids.shape[0], chunks, -1)
    return bool((rows.diff(dim=-1) != 1).any())


def _preview(row: torch.Tensor, n: int = 4) -> str:
    values = row.tolist()
    return str(values) if len(values) <= 2 * n else f"[{', '.join(map(str, values[:n]))}, ..., {values[-1]}]"
