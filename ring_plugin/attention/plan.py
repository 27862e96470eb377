"""Which (query rows, key rows) blocks of one ring step need computing, from global chunk indices.

A rank's shard is a list of equal chunks with known global indices (see :mod:`ring_plugin.layout`).
For a query shard and a key/value shard the plan is a short list of :class:`Block` s: each a
contiguous slice of local query rows, a contiguous slice of local key rows, and whether the block
is causal (only ever on a square diagonal block). Fully masked pairs produce no block, so a ring
step whose blocks are all masked is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Block:
    q: slice
    kv: slice
    causal: bool


def plan_dense_step(
    q_chunks: tuple[int, ...], kv_chunks: tuple[int, ...], chunk_len: int, causal: bool
) -> list[Block]:
    """Blocks of dense (optionally causal) attention between two shards."""
    nq, nk = len(q_chunks) * chunk_len, len(kv_chunks) * chunk_len
    if not causal:
        return [Block(slice(0, nq), slice(0, nk), False)]
    if q_chunks == kv_chunks:
        # Chunks are ascending, so local order equals global order: one causal block is exact.
        return [Block(slice(0, nq), slice(0, nk), True)]
    blocks: list[Block] = []
    for qi, q_chunk in enumerate(q_chunks):
        rows = slice(qi * chunk_len, (qi + 1) * chunk_len)
        before = sum(1 for c in kv_chunks if c < q_chunk)  # kv chunks ascending: a prefix
        if before:
            blocks.append(Block(rows, slice(0, before * chunk_len), False))
        if q_chunk in kv_chunks:
            j = kv_chunks.index(q_chunk)
            blocks.append(Block(rows, slice(j * chunk_len, (j + 1) * chunk_len), True))
    return _coalesce(blocks)


def _coalesce(blocks: list[Block]) -> list[Block]:
    """Merge blocks with the same key slice over adjacent query rows into one kernel call."""
    merged: list[Block] = []
    for b in blocks:
        last = merged[-1] if merged else None
        if last and not b.causal and not last.causal and last.kv == b.kv and last.q.stop == b.q.start:
            merged[-1] = Block(slice(last.q.start, b.q.stop), b.kv, False)
        else:
            merged.append(b)
    return merged
