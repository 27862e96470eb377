"""Which attention structure a layer's inputs ask for, and whether the ring can run it exactly.

Kept in one function so packed documents (``document_ids``) and sliding windows can be wired into the
engine here: today the ring runs one causal document per row whose tokens carry their global positions.
"""

from __future__ import annotations

import torch

from ..comm.context import RingContext
from ..layout import chunks_per_rank, global_positions


def structure_error(
    position_ids: torch.Tensor | None, sliding_window: int | None, n_local: int, ring: RingContext
) -> str | None:
    """None when every row is one causal document whose ``position_ids`` are the global positions of
    this rank's shard and no sliding window is shorter than the sequence; otherwise what is wrong."""
    if position_ids is None:
        return ("the attention layer got no position_ids; pass position_ids= the GLOBAL positions of this "
                "rank's tokens (ring_plugin.hf.shard_batch creates them)")
    if position_ids.dim() != 2 or position_ids.shape[-1] != n_local:
        return f"position_ids must be (batch, n_local={n_local}), got shape {tuple(position_ids.shape)}"
    expected = global_positions(n_local, ring.layout, ring.rank, ring.world_size, device=position_ids.device)
    if not bool((position_ids == expected).all()):
        if _restarts_within_chunk(position_ids, chunks_per_rank(ring.layout)):
            return ("position_ids restart inside the sequence (packed documents); packed sequences are not "
                    "supported by attn_implementation='ring' yet: give each document its own row, or pad")
        return (f"position_ids on ring rank {ring.rank} of {ring.world_size} ({ring.layout} layout) are not the "
                f"global positions of its shard (expected {_preview(expected)}, got {_preview(position_ids[0])}). "
                "transformers' default arange(n_local) is wrong on every rank but the first: pass the global "
                "positions (ring_plugin.hf.shard_batch creates them)")
    n_global = n_local * ring.world_size
    if sliding_window is not None and sliding_window < n_global:
        return (f"sliding_window={sliding_window} is shorter than the sequence ({n_global} tokens); sliding "
                "windows are not supported by attn_implementation='ring' yet: use sequences of at most "
                f"{sliding_window} tokens or a model without a sliding window")
    return None


def _restarts_within_chunk(position_ids: torch.Tensor, chunks: int) -> bool:
    """Whether positions fail to step by one inside one of the shard's contiguous chunks."""
    rows = position_ids.reshape(position_ids.shape[0], chunks, -1)
    return bool((rows.diff(dim=-1) != 1).any())


def _preview(row: torch.Tensor, n: int = 4) -> str:
    values = row.tolist()
    return str(values) if len(values) <= 2 * n else f"[{', '.join(map(str, values[:n]))}, ..., {values[-1]}]"
