"""The dense ring: K/V travel round the ring while each rank attends its queries to them.

Forward: at step ``s`` a rank holds the K/V of ``rank - s``; the next shard is in flight while this
one is computed (:func:`.schedule.prefetched`), and each step's blocks merge into fp32 ``(out, lse)``.
Backward: K/V go round again; each block's backward is fed the merged output and logsumexp (which
makes it exact), and the dK/dV accumulator of each K/V owner travels with its shard, arriving home
after a full turn. No rank holds more than its shard plus the one in flight.
"""

from __future__ import annotations

import itertools

import torch

from .accumulators import new_accumulator
from .block_ops import backward_block, forward_block
from .call import RingCall
from .schedule import prefetched


def _kv_round_trip(call: RingCall, k: torch.Tensor, v: torch.Tensor):
    """Our own K/V, then the K/V of rank - 1, rank - 2, ... (each forwarded once it has arrived)."""
    comm = call.comm
    arrivals = prefetched(comm, comm.world_size - 1, lambda i, prev: comm.exchange(prev or [k, v]))
    return enumerate(itertools.chain([[k, v]], arrivals))


class DenseRingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: RingCall):  # type: ignore[override]
        n = q.shape[2]
        out = new_accumulator(q.shape, torch.float32, q.device, 0.0)
        lse = new_accumulator(q.shape[:3], torch.float32, q.device, float("-inf"))
        for step, kv in _kv_round_trip(call, k, v):
            for i, block in enumerate(call.dense_blocks(step, n)):
                forward_block(block, call, q, kv, out, lse, first=step == 0 and i == 0)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.call = call
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        call: RingCall = ctx.call
        comm, n = call.comm, q.shape[2]
        dout = dout.to(q.dtype).contiguous()
        dq = new_accumulator(q.shape, call.grad_dtype, q.device, 0.0)
        travelling = None  # the dK/dV accumulator of this step's K/V owner, arriving from rank - 1
        for step, kv in _kv_round_trip(call, k, v):
            adds = [backward_block(b, call, dout, q, kv, out, lse, dq) for b in call.dense_blocks(step, n)]
            if travelling is None:
                dkv = [torch.zeros(t.shape, dtype=call.grad_dtype, device=t.device) for t in (k, v)]
            else:
                dkv = travelling.wait()
            for add in adds:
                add(dkv)
            del adds
            if comm.world_size > 1:
                travelling = comm.exchange(dkv)  # on to rank + 1; after the last step: home
        if travelling is not None:
            dkv = travelling.wait()  # after a full turn: our own dK/dV
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None
