"""The dense ring: K/V travel round the ring while each rank attends its queries to them.

Forward: at step ``s`` a rank holds the K/V of ``rank - s``; the next shard is in flight while this
one is computed (:func:`.schedule.prefetched`). Backward: K/V go round again; each block's backward is
fed the merged output and logsumexp (which makes it exact). The dK/dV a rank computes at step ``s``
belong to rank ``s`` back: they go straight home (:class:`.exchange.GradsHome`) block by block, as the
kernel returned them: the key rows each block touched and no more. Compared with one accumulator
travelling the whole ring, that is one message fewer per turn, in half precision where the kernel's
gradients are half precision, and no fp32 accumulator in flight. No rank holds more than its shard
plus the one in flight.

Every block's results (output and logsumexp, dQ, dK/dV and the messages home) are summed by
:class:`.row_sums.RowSums`, which knows from the call's plan how many results each row gets: bit for
bit an fp32 accumulator's sums, but a row with one result takes it as it is, and a row with two keeps
the first (half-precision) one in the final tensor; only rows with more sum in fp32 buffers.

q/k/v, the output and the gradients are sequence-major (``(B, L, H, D)`` memory, as the module receives
them, read as ``(B, H, L, D)`` views): the layout flash's varlen kernels read and write, which dense
kernels take as strided views, so no block transposes its operands into a copy.
"""

from __future__ import annotations

import itertools

import torch

from .accumulators import in_layout
from .block_ops import RowGrads, backward_rows, forward_rows, is_seq_major
from .call import RingCall
from .exchange import GradsHome
from .plan import Block
from .row_sums import RowPlan, RowSums
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


def home_grad_dtype(call: RingCall, block, dtype: torch.dtype) -> torch.dtype:
    """The dtype of a block's dK/dV, which it travels home in as it is (widening would add bytes, not
    precision): the kernel's for dense blocks, ``call.grad_dtype`` where grouped-query heads were summed
    into it; document and window blocks return the input's dtype."""
    if type(block) is not Block:
        return dtype
    return call.grad_dtype if call.heads != call.kv_heads else call.kernel.grad_dtype(dtype)


def _message(grads: list[RowGrads]) -> list[torch.Tensor]:
    """A step's dK/dV, block by block, as ``(B, rows, H_kv, D)``: the kernels' own tensors."""
    return [t.transpose(1, 2) for g in grads for t in (g.dk, g.dv)]


def _plan(call: RingCall, n: int) -> list:
    """Every ring step's blocks for this rank, in the order they run."""
    return [call.dense_blocks(step, n) for step in range(call.comm.world_size)]


def _senders(call: RingCall, n: int) -> list:
    """For steps 1, 2, ...: the blocks of the rank whose dK/dV for our K/V come home at that step (rank +
    step), as it plans them."""
    return [call.dense_blocks(step, n, rank=call.comm.rank + step) for step in range(1, call.comm.world_size)]


def _kv_touches(own: list, senders: list) -> list[slice]:
    """The dK/dV contributions to our key rows, in arrival order: our own step's blocks, then each
    sender's blocks, whose dK/dV come home block by block."""
    return [b.kv for b in own] + [b.kv for blocks in senders for b in blocks]


class DenseRingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: RingCall):  # type: ignore[override]
        n, seq_major = q.shape[2], is_seq_major(k)
        plan = _plan(call, n)
        rows = RowPlan.of([b.q for blocks in plan for b in blocks], n)
        out = RowSums(rows, q.shape, q.dtype, q.device, seq_major)
        for step, kv in _kv_round_trip(call, k, v):
            for block in plan[step]:
                out.merge(block.q, *forward_rows(block, call, q, kv))
        result = out.result()
        ctx.save_for_backward(q, k, v, result, out.lse)
        ctx.call, ctx.plan, ctx.q_rows = call, plan, rows
        return result

    @staticmethod
    def backward(ctx, dout: torch.Tensor):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        call: RingCall = ctx.call
        comm, n, seq_major, plan = call.comm, q.shape[2], is_seq_major(k), ctx.plan
        dout = in_layout(dout.to(q.dtype), seq_major)
        dq = RowSums(ctx.q_rows, q.shape, q.dtype, q.device, seq_major, call.grad_dtype)
        senders = _senders(call, n)
        kv_rows = RowPlan.of(_kv_touches(plan[0], senders), k.shape[2])
        dkv = [RowSums(kv_rows, t.shape, t.dtype, t.device, seq_major, call.grad_dtype) for t in (k, v)]

        def add_home(rows: slice, got: list[torch.Tensor]) -> None:  # (B, rows, H_kv, D) from a peer
            for sums, g in zip(dkv, got):
                sums.add(rows, g.transpose(1, 2))

        home = GradsHome(comm, [t.transpose(1, 2) for t in (k, v)], add_rows=add_home)
        for step, kv in _kv_round_trip(call, k, v):
            blocks = plan[step]
            grads = []
            for b in blocks:
                block_dq, block_grads = backward_rows(b, call, dout, q, kv, out, lse)
                dq.add(b.q, block_dq)
                grads.append(block_grads)
            del kv
            if step == 0:
                for g in grads:
                    for sums, t in zip(dkv, (g.dk, g.dv)):
                        sums.add(g.rows, t)
                continue
            # Ours go to the K/V's owner (rank - step); rank + step's, for our K/V, come here. Both
            # sides plan the other's blocks, so they agree on each message's rows and dtype.
            sender = senders[step - 1]
            message = _message(grads) if grads else None
            del grads
            home.post(step, message, [b.kv for b in sender], [home_grad_dtype(call, b, q.dtype) for b in sender])
        home.finish()
        return dq.result(), dkv[0].result(), dkv[1].result(), None
