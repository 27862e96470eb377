"""LongNet dilated attention as a pattern (DESIGN §2).

Pair ``(w, r)``, head ``j``: offset ``o = j mod r``; the sequence is cut into segments of ``w``
(clipped to the sequence); inside a segment the positions ``o, o+r, ...`` attend densely to each
other (causal by position when asked). Pairs combine with weights ``exp(lse_i) / sum_j exp(lse_j)``,
which is one softmax over the union of the pairs' keys, a key counted once per pair selecting it:
so every (pair, offset, segment) is one more block merged into the same ``(out, lse)``.
"""

from __future__ import annotations

import torch

from .blocks import BlockBuilder, CachedPattern, IndexBlock, chunk_pairs


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


class DilatedPattern(CachedPattern):
    def __init__(self, segment_lengths: list[int], dilation_rates: list[int]):
        self.segment_lengths = list(segment_lengths)
        self.dilation_rates = list(dilation_rates)
        super().__init__()

    def error(self, n_global: int, chunk_len: int, heads: int) -> str | None:
        return dilated_error(self.segment_lengths, self.dilation_rates, n_global)

    def pairs(self, n: int) -> list[tuple[int, int]]:
        return [(min(w, n), r) for w, r in zip(self.segment_lengths, self.dilation_rates)]

    def _plan(self, q_chunks, kv_chunks, chunk_len, n, causal, heads, kv_heads) -> list[IndexBlock]:
        builder = BlockBuilder(heads, kv_heads, len(q_chunks) * chunk_len, len(kv_chunks) * chunk_len)
        for p, (w, r) in enumerate(self.pairs(n)):
            for lq, qs, lk, ks, same in chunk_pairs(q_chunks, kv_chunks, chunk_len, causal):
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
        return builder.blocks()

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
