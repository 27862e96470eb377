"""Pattern attention (dilated, block-sparse, Hilbert) as peer-to-peer rounds of an exchange plan.

A rank first computes its queries against its own shard, while round 0's K/V rows are in flight;
then each round's received rows (compact ``(B, 1, M, D)`` buffers) are read by that round's index
blocks. All partial results merge by logsumexp into the same fp32 accumulators, so the result is
exact for every pattern. Backward runs the same rounds; each round's compact dK/dV go straight
back to their owner (:class:`.exchange.GradsHome`) while the next round computes.

Where all work is strided views of the own shard (:attr:`.exchange.ExchangePlan.views_only`), the
accumulators, output and gradients are stored sequence-major like the module's q/k/v.
"""

from __future__ import annotations

import torch

from ..patterns.blocks import ViewBlock
from .accumulators import in_layout, new_accumulator
from .block_ops import backward_block, forward_block
from .call import RingCall
from .exchange import ExchangePlan, GradsHome, post_rows
from .schedule import prefetched


def _flat_forms(plan: ExchangePlan, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Contiguous ``(B, H, L, D)`` copies where index blocks or packing read flat ``heads * L`` rows
    (copied once per call, not once per block); view-only plans read the tensors as they are."""
    return tensors if plan.views_only else tuple(t.contiguous() for t in tensors)


def _own_operands(block, views, flats):
    """View blocks read the strided originals, index blocks the flat copies."""
    return views if isinstance(block, ViewBlock) else flats


def _kv_arrivals(call: RingCall, plan: ExchangePlan, k: torch.Tensor, v: torch.Tensor):
    rounds = plan.rounds
    return prefetched(call.comm, len(rounds), lambda i, _prev: post_rows(call.comm, rounds[i], k, v))


class PeerRingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: RingCall,  # type: ignore[override]
                plan: ExchangePlan):
        seq_major, empty = plan.views_only, plan.first_covers
        out = new_accumulator(q.shape, torch.float32, q.device, None if empty else 0.0, seq_major)
        lse = new_accumulator(q.shape[:3], torch.float32, q.device, None if empty else float("-inf"), seq_major)
        qf, kf, vf = _flat_forms(plan, q, k, v)
        arrivals = _kv_arrivals(call, plan, kf, vf)
        for i, block in enumerate(plan.own_blocks):
            qb, kvb = _own_operands(block, (q, [k, v]), (qf, [kf, vf]))
            forward_block(block, call, qb, kvb, out, lse, first=i == 0)
        for rd, kv in zip(plan.rounds, arrivals):
            for block in rd.blocks:
                forward_block(block, call, qf, kv, out, lse)
            del kv
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.call, ctx.plan = call, plan
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        call: RingCall = ctx.call
        plan: ExchangePlan = ctx.plan
        seq_major, empty = plan.views_only, plan.first_covers
        dout = in_layout(dout.to(q.dtype), seq_major)
        dq = new_accumulator(q.shape, call.grad_dtype, q.device, None if empty else 0.0, seq_major)
        dkv = [new_accumulator(t.shape, call.grad_dtype, t.device, None if empty else 0.0, seq_major) for t in (k, v)]
        qf, kf, vf = _flat_forms(plan, q, k, v)
        arrivals = _kv_arrivals(call, plan, kf, vf)
        for i, block in enumerate(plan.own_blocks):
            qb, kvb = _own_operands(block, (q, [k, v]), (qf, [kf, vf]))
            backward_block(block, call, dout, qb, kvb, out, lse, dq, first=empty and i == 0)(dkv)
        # Contributions land on flat (B, H * L, D) rows; with rounds, dkv are contiguous (B, H, L, D).
        home = GradsHome(call.comm, [t.view(t.shape[0], -1, t.shape[3]) for t in dkv] if plan.rounds else [])
        for rd, kv in zip(plan.rounds, arrivals):
            acc = None
            if rd.recv_rows.numel():
                acc = [torch.zeros(t.shape, dtype=call.grad_dtype, device=t.device) for t in kv]
                for block in rd.blocks:
                    backward_block(block, call, dout, qf, kv, out, lse, dq)(acc)
            del kv
            home.post(rd.shift, acc, rd.send_rows)
        home.finish()
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None
