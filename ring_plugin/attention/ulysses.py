"""2-D sequence parallelism: a Ulysses all-to-all around the ring engine (docs/design.md, section 4).

The sequence is sharded over U x R ranks exactly as for a ring of U x R (rank ``s = r U + u``). Each
Ulysses group of U adjacent ranks trades heads for sequence (:mod:`ring_plugin.comm.ulysses`): member
u then holds the group's rows for heads ``[u H/U, (u + 1) H/U)``. The union of a group's chunks is a
valid layout of a ring of R ranks (:func:`~ring_plugin.layout.merge_adjacent_ranks`), so the ring
engine runs across the groups unchanged, and the output goes back by the inverse all-to-all.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..comm.context import RingContext
from ..comm.ulysses import gather_heads, scatter_heads
from ..layout import ShardLayout, merged_order
from ..ops.kernels import expand_kv_heads


def ulysses_attend(attend: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   causal: bool, ring: RingContext, **masks: Any) -> torch.Tensor:
    """``attend`` (a layer's ``_attend``) on the ring of Ulysses groups, for ``(B, n_local, H, D)``
    shards of the U x R sequence-parallel layout; returns this rank's output shard."""
    group, ulysses = ring.ulysses_group, ring.ulysses_size
    documents = masks.get("documents")
    # The layout the shards were cut in: named, or (balanced) rebuilt from the ids of all U x R ranks.
    layout = documents.layout if documents is not None else ShardLayout.named(ring.layout, ring.sequence_size)
    order = merged_order(layout, ulysses, ring.rank)
    if documents is not None:
        masks["documents"] = documents.merge_adjacent_ranks(ulysses)
    # Each member needs whole K/V heads for its H/U query heads: with fewer K/V heads than that (or a
    # count U does not divide), repeat each one; autograd sums the repeats' gradients back.
    kv_heads = math.lcm(k.shape[2], ulysses)
    k, v = (expand_kv_heads(t.transpose(1, 2), kv_heads).transpose(1, 2) for t in (k, v))
    out = attend(*(scatter_heads(t, group, order) for t in (q, k, v)), causal, ring, **masks)
    return gather_heads(out, group, order)
