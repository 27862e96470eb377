"""The dense ring: K/V travel round the ring while each rank attends its queries to them.

Forward: at step ``s`` a rank holds the K/V of ``rank - s``; the next shard is in flight while this
one is computed (:func:`.schedule.prefetched`), and each step's blocks merge into fp32 ``(out, lse)``.
Backward: K/V go round again; each block's backward is fed the merged output and logsumexp (which
makes it exact). The dK/dV a rank computes at step ``s`` belong to rank ``s`` back: they go straight
home (:class:`.exchange.GradsHome`) as the kernel returned them, the key rows its blocks touched and
no more, and are summed there into the owner's fp32 accumulator. Compared with one accumulator
travelling the whole ring, that is one message fewer per turn, in half precision where the kernel's
gradients are half precision, and no fp32 accumulator in flight. No rank holds more than its shard
plus the one in flight.

Packed documents keep q/k/v/out and the accumulators sequence-major (``(B, L, H, D)`` memory), the
layout flash's varlen kernels read and write, so no block transposes its operands.
"""

from __future__ import annotations

import itertools

import torch

from .accumulators import in_layout, new_accumulator
from .block_ops import RowGrads, backward_block, forward_block, is_seq_major
from .call import RingCall
from .exchange import GradsHome
from .plan import Block
from .schedule import prefetched


def _kv_round_trip(call: RingCall, k: torch.Tensor, v: torch.Tensor):
    """Our own K/V, then the K/V of rank - 1, rank - 2, ... (each forwarded once it has arrived).

    Sequence-major K/V travel as their ``(B, L, H, D)`` memory, so neither side copies them."""
    comm = call.comm
    seq_major = is_seq_major(k)
    wire = [t.transpose(1, 2) for t in (k, v)] if seq_major else [k, v]
    arrivals = prefetched(comm, comm.world_size - 1, lambda i, prev: comm.exchange(prev or wire))
    if seq_major:
        arrivals = ([t.transpose(1, 2) for t in got] for got in arrivals)
    return enumerate(itertools.chain([[k, v]], arrivals))


def _span(blocks) -> slice:
    """The key rows a step's blocks touch, as one run (empty when there are none)."""
    if not blocks:
        return slice(0, 0)
    return slice(min(b.kv.start for b in blocks), max(b.kv.stop for b in blocks))


def _wire_dtype(call: RingCall, blocks, dtype: torch.dtype) -> torch.dtype:
    """What a step's dK/dV travel home in: the dtype the kernels return them in where every key row
    gets at most one block's gradient, sent as returned (widening would add bytes, not precision);
    ``call.grad_dtype`` where blocks overlap or grouped-query heads were summed into it."""
    spans = sorted((b.kv.start, b.kv.stop) for b in blocks)
    overlap = any(a[1] > b[0] for a, b in zip(spans, spans[1:]))
    # Block runs call.kernel (its gradient dtype); document and window blocks return the input's dtype.
    dense = any(type(b) is Block for b in blocks)
    if overlap or (dense and call.heads != call.kv_heads):
        return call.grad_dtype
    return call.kernel.grad_dtype(dtype) if dense else dtype


def _message(grads: list[RowGrads], span: slice, dtype: torch.dtype) -> list[torch.Tensor]:
    """A step's dK/dV over the key rows ``span`` as ``(B, rows, H_kv, D)`` in ``dtype``: the kernel's
    own tensors when one block covers the span, else their sum in a buffer."""
    if len(grads) == 1 and grads[0].rows == span and grads[0].dk.dtype == dtype:
        return [grads[0].dk.transpose(1, 2), grads[0].dv.transpose(1, 2)]
    first = grads[0].dk
    b, h, _, d = first.shape
    buf = [torch.zeros((b, h, span.stop - span.start, d), dtype=dtype, device=first.device) for _ in range(2)]
    for g in grads:
        assert g.dk.itemsize <= buf[0].itemsize, f"a {g.dk.dtype} gradient must not travel rounded to {dtype}"
        RowGrads(slice(g.rows.start - span.start, g.rows.stop - span.start), g.dk, g.dv)(buf)
    return [t.transpose(1, 2) for t in buf]


class _Untouched:
    """Which rows of an accumulator no block has written yet. A block whose rows are all untouched
    copies its result in instead of merging or adding it: the rows still hold the accumulator's
    initial (0, -inf), so the copy is the same result for less memory traffic."""

    def __init__(self) -> None:
        self._runs: list[tuple[int, int]] = []

    def claim(self, rows: slice) -> bool:
        fresh = all(rows.stop <= a or rows.start >= b for a, b in self._runs)
        self._runs.append((rows.start, rows.stop))
        return fresh


class DenseRingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: RingCall):  # type: ignore[override]
        n, seq_major = q.shape[2], is_seq_major(k)
        out = new_accumulator(q.shape, torch.float32, q.device, 0.0, seq_major)
        lse = new_accumulator(q.shape[:3], torch.float32, q.device, float("-inf"))
        rows = _Untouched()
        for step, kv in _kv_round_trip(call, k, v):
            for block in call.dense_blocks(step, n):
                forward_block(block, call, q, kv, out, lse, first=rows.claim(block.q))
        out = out.to(q.dtype)  # keeps the accumulator's layout
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.call = call
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        call: RingCall = ctx.call
        comm, n, seq_major = call.comm, q.shape[2], is_seq_major(k)
        dout = in_layout(dout.to(q.dtype), seq_major)
        dq = new_accumulator(q.shape, call.grad_dtype, q.device, 0.0, seq_major)
        dkv = [new_accumulator(t.shape, call.grad_dtype, t.device, 0.0, seq_major) for t in (k, v)]
        home = GradsHome(comm, [t.transpose(1, 2) for t in dkv])  # (B, L, H_kv, D) rows
        q_rows, own_kv_rows = _Untouched(), _Untouched()
        for step, kv in _kv_round_trip(call, k, v):
            blocks = call.dense_blocks(step, n)
            grads = [backward_block(b, call, dout, q, kv, out, lse, dq, first=q_rows.claim(b.q)) for b in blocks]
            del kv
            if step == 0:
                for g in grads:
                    g(dkv, first=own_kv_rows.claim(g.rows))
                continue
            # Ours go to the K/V's owner (rank - step); rank + step's, for our K/V, come here. Both
            # sides plan the other's blocks, so they agree on each message's rows and dtype.
            span, sender = _span(blocks), call.dense_blocks(step, n, rank=comm.rank + step)
            message = _message(grads, span, _wire_dtype(call, blocks, q.dtype)) if grads else None
            del grads
            home.post(step, message, _span(sender), _wire_dtype(call, sender, q.dtype))
        home.finish()
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None
