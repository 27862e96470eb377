"""LongNet dilated attention as a pattern (docs/design.md).

Pair ``(w, r)``, head ``j``: offset ``o = j mod r``; the sequence is cut into segments of ``w``
(clipped to the sequence); inside a segment the positions ``o, o+r, ...`` attend densely to each
other (causal by position when asked). Pairs combine with weights ``exp(lse_i) / sum_j exp(lse_j)``,
which is one softmax over the union of the pairs' keys, a key counted once per pair selecting it:
so every (pair, offset, segment) is one more block merged into the same ``(out, lse)``.

Where the rows form a regular grid (``r`` divides the segment and the chunk, one head per K/V head)
the blocks are :class:`ViewBlock` s, read as strided views with no gather: segments fold into the
kernel's batch, and the offsets go either one call per offset (heads ``o, o+r, ...``) or one call
per run of ``r`` consecutive heads (head ``c*r + a`` at offset ``a``), whichever makes fewer calls.
"""

from __future__ import annotations

import torch

from .blocks import BlockBuilder, CachedPattern, IndexBlock, ViewBlock, chunk_pairs


def dilated_error(segment_lengths: list[int], dilation_rates: list[int], n_global: int) -> str | None:
    """Why ``n_global`` does not fit the pairs (or None)."""
    bad = [w for w in segment_lengths if w < n_global and n_global % w]
    if bad:
        return (
            f"sequence length {n_global} must be a multiple of every segment length shorter than it; "
            f"segment_lengths={segment_lengths} has {bad} (dilation_rates={dilation_rates})"
        )
    return None


def _kept(start: int, stop: int, base: int, offset: int, rate: int) -> torch.Tensor:
    """Positions p in [start, stop) with (p - base) % rate == offset."""
    first = base + offset
    if first < start:
        first += -(-(start - first) // rate) * rate
    return torch.arange(first, stop, rate, dtype=torch.int64) if first < stop else torch.empty(0, dtype=torch.int64)


def _grid_blocks(w: int, r: int, lq: int, qs: int, lk: int, ks: int, chunk_len: int, heads: int,
                 kv_heads: int, causal: bool) -> list[ViewBlock] | None:
    """The (pair, chunk pair) as strided views, or None where its rows are not a regular grid."""
    if heads != kv_heads or w % r or chunk_len % r:
        return None
    if w <= chunk_len:
        # Whole segments inside the chunks: only a chunk with itself meets them, segments fold.
        if chunk_len % w:
            return None
        if qs != ks:
            return []
        groups, rows = chunk_len // w, w // r
    else:
        # Chunks inside segments: pairs exist only within one segment.
        if w % chunk_len:
            return None  # a chunk straddles two segments
        if qs // w != ks // w:
            return []
        groups, rows = 1, chunk_len // r
    per_offset = min(r, heads)  # calls with heads o, o+r, ... at offset o
    per_run = -(-heads // r)  # calls with r consecutive heads, head c*r + a at offset a
    blocks = []
    if per_offset <= per_run:
        for o in range(per_offset):
            blocks.append(ViewBlock(groups, w, len(range(o, heads, r)), o, (r, 0), lq + o, rows,
                                    lk + o, rows, r, causal))
    else:
        for c in range(per_run):
            first = c * r
            blocks.append(ViewBlock(groups, w, min(r, heads - first), first, (1, 1), lq, rows, lk, rows, r,
                                    causal))
    return blocks


class DilatedPattern(CachedPattern):
    def __init__(self, segment_lengths: list[int], dilation_rates: list[int]):
        self.segment_lengths = list(segment_lengths)
        self.dilation_rates = list(dilation_rates)
        super().__init__()

    def error(self, n_global: int, chunk_len: int, heads: int) -> str | None:
        return dilated_error(self.segment_lengths, self.dilation_rates, n_global)

    def keys_per_query(self, n: int) -> float:
        """Average keys one query attends to before causal masking: per pair (w, r) a head keeps
        1/r of the queries, each seeing w/r keys."""
        return sum(w / r**2 for w, r in self.pairs(n))

    def pairs(self, n: int) -> list[tuple[int, int]]:
        return [(min(w, n), r) for w, r in zip(self.segment_lengths, self.dilation_rates)]

    def _plan(self, q_chunks, kv_chunks, chunk_len, n, causal, heads, kv_heads) -> list[IndexBlock | ViewBlock]:
        builder = BlockBuilder(heads, kv_heads, len(q_chunks) * chunk_len, len(kv_chunks) * chunk_len)
        views: list[IndexBlock | ViewBlock] = []
        for p, (w, r) in enumerate(self.pairs(n)):
            for lq, qs, lk, ks, same in chunk_pairs(q_chunks, kv_chunks, chunk_len, causal):
                grid = _grid_blocks(w, r, lq, qs, lk, ks, chunk_len, heads, kv_heads, causal and same)
                if grid is not None:
                    views += grid
                    continue
                # Segments meeting both chunks; only those hold pairs of this step.
                first = max(qs, ks) // w
                last = (min(qs, ks) + chunk_len - 1) // w
                for s in range(first, last + 1):
                    base = s * w
                    q_lo, q_hi = max(qs, base), min(qs + chunk_len, base + w)
                    k_lo, k_hi = max(ks, base), min(ks + chunk_len, base + w)
                    for o in range(min(r, heads)):
                        q_rows = _kept(q_lo, q_hi, base, o, r) - qs + lq
                        kv_rows = _kept(k_lo, k_hi, base, o, r) - ks + lk
                        # Same chunk: query and key positions are one set, so a square causal block.
                        builder.add((p, lk), tuple(range(o, heads, r)), q_rows, kv_rows, causal and same)
        return views + builder.blocks()

    def counts(self, n: int, heads: int, device: torch.device | None = None) -> torch.Tensor:
        """(heads, n, n) int: how many pairs let query i of head h see key j (oracle's weights)."""
        pos = torch.arange(n, device=device)
        c = torch.zeros(heads, n, n, dtype=torch.int32, device=device)
        for w, r in self.pairs(n):
            same_seg = (pos // w)[:, None] == (pos // w)[None, :]
            off = (pos % w) % r
            for h in range(heads):
                sel = off == h % r
                c[h] += (same_seg & sel[:, None] & sel[None, :]).int()
        return c
