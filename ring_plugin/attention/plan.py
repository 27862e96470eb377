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


@dataclass(frozen=True)
class BandBlock:
    """Contiguous query and key rows of equal length where local query ``i`` sees local keys
    ``i - left .. i + right`` (``left, right >= 0``: a sliding window seen from this block's chunks)."""

    q: slice
    kv: slice
    left: int
    right: int


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


def plan_window_step(
    q_chunks: tuple[int, ...], kv_chunks: tuple[int, ...], chunk_len: int, window: int
) -> list[Block | BandBlock]:
    """Blocks of causal attention restricted to a sliding window: query at position p sees keys at
    ``p - window < position <= p``. Per chunk pair at distance ``delta`` (query chunk start minus key
    chunk start): no block when even the nearest pair is ``window`` apart, a plain block when even the
    farthest pair is within it, else a band (local query i sees local keys ``i + delta - window + 1 ..
    i + delta``), cut to a square whose band starts at or left of the diagonal (what flash takes)."""
    blocks: list[Block | BandBlock] = []
    for qi, qc in enumerate(q_chunks):
        rows = slice(qi * chunk_len, (qi + 1) * chunk_len)
        for ki, kc in enumerate(kv_chunks):
            delta = (qc - kc) * chunk_len
            if delta < 0 or delta - (chunk_len - 1) >= window:
                continue
            keys = slice(ki * chunk_len, (ki + 1) * chunk_len)
            if delta > 0 and delta + chunk_len - 1 < window:
                blocks.append(Block(rows, keys, False))
            elif delta == 0 and chunk_len <= window:
                blocks.append(Block(rows, keys, True))
            elif delta < window:
                blocks.append(BandBlock(rows, keys, window - 1 - delta, delta))
            else:
                # Keys i + a .. i + delta with a = delta - window + 1 > 0: the last a queries see none
                # here, and the rest form a band starting on the diagonal of a shifted square.
                a = delta - window + 1
                blocks.append(BandBlock(slice(rows.start, rows.stop - a), slice(keys.start + a, keys.stop),
                                        0, window - 1))
    return blocks
