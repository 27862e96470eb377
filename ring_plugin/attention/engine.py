"""The ring engine: one autograd function that every ring variant runs on.

Forward: K/V (packed into one buffer) travel round the ring with ``batch_isend_irecv``; the next
shard is in flight while the current one is computed. Each step's blocks (from the plan) are
computed by a logsumexp-returning kernel and merged into fp32 ``(out, lse)`` accumulators.

Backward: K/V travel round again; each step's dK/dV contribution is added to an fp32 accumulator
that travels with them and, after a full turn, arrives back at its owner. Each block's backward is
fed the merged output and logsumexp, which makes it exact. No rank ever holds more than its own
shard plus the ones in flight, and no full score matrix exists anywhere.

Tensors inside the engine are ``(batch, heads, length, head_dim)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..comm.ring import RingComm
from ..layout import rank_chunks
from ..ops.kernels import Kernel
from ..ops.merge import merge_into
from .plan import Block, plan_dense_step

StepPlanner = Callable[[tuple[int, ...], tuple[int, ...], int, bool], list[Block]]


@dataclass(frozen=True)
class RingSpec:
    """Everything about one ring call that is not a tensor."""

    comm: RingComm
    layout: str
    kernel: Kernel
    scale: float
    causal: bool
    planner: StepPlanner = plan_dense_step

    def chunks(self, rank: int) -> tuple[int, ...]:
        return rank_chunks(self.layout, rank, self.comm.world_size)

    def step_blocks(self, step: int, n_local: int) -> list[Block]:
        """Blocks of step ``step``, where this rank holds the K/V of rank ``rank - step``."""
        world, rank = self.comm.world_size, self.comm.rank
        q_chunks, kv_chunks = self.chunks(rank), self.chunks((rank - step) % world)
        return self.planner(q_chunks, kv_chunks, n_local // len(q_chunks), self.causal)


def _expand_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _reduce_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return x
    b, h, n, d = x.shape
    return x.view(b, h // groups, groups, n, d).sum(2)


def _rows(x: torch.Tensor, s: slice) -> torch.Tensor:
    return x if (s.start == 0 and s.stop == x.shape[2]) else x[:, :, s].contiguous()


class RingAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: RingSpec):  # type: ignore[override]
        comm, world = spec.comm, spec.comm.world_size
        groups = q.shape[1] // k.shape[1]
        n_local = q.shape[2]
        out_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse_acc = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])
        for step in range(world):
            pending = comm.exchange([kv]) if step + 1 < world else None
            comm.start_compute()
            for block in spec.step_blocks(step, n_local):
                kb = _expand_heads(_rows(kv[0], block.kv), groups)
                vb = _expand_heads(_rows(kv[1], block.kv), groups)
                o, lse = spec.kernel.forward(_rows(q, block.q), kb, vb, block.causal, spec.scale)
                merge_into(out_acc[:, :, block.q], lse_acc[:, :, block.q], o, lse)
            if pending is not None:
                (kv,) = pending.wait()
        out = out_acc.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse_acc)
        ctx.spec = spec
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        spec: RingSpec = ctx.spec
        comm, world = spec.comm, spec.comm.world_size
        groups = q.shape[1] // k.shape[1]
        n_local = q.shape[2]
        dout = dout.to(q.dtype).contiguous()
        dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])
        dkv_travelling: torch.Tensor | None = None
        pending_dkv = None
        for step in range(world):
            pending_kv = comm.exchange([kv]) if step + 1 < world else None
            comm.start_compute()
            dkv_step = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
            for block in spec.step_blocks(step, n_local):
                kb = _expand_heads(_rows(kv[0], block.kv), groups)
                vb = _expand_heads(_rows(kv[1], block.kv), groups)
                dq, dk, dv = spec.kernel.backward(
                    _rows(dout, block.q), _rows(q, block.q), kb, vb,
                    _rows(out, block.q), _rows(lse, block.q), block.causal, spec.scale,
                )
                dq_acc[:, :, block.q] += dq
                dkv_step[0][:, :, block.kv] += _reduce_heads(dk.float(), groups)
                dkv_step[1][:, :, block.kv] += _reduce_heads(dv.float(), groups)
            # The accumulator for this step's K/V owner arrives from the previous rank, which
            # worked on the same K/V one step earlier; add ours and pass it on.
            if pending_dkv is not None:
                (dkv_travelling,) = pending_dkv.wait()
                dkv_travelling += dkv_step
            else:
                dkv_travelling = dkv_step
            if world > 1:
                pending_dkv = comm.exchange([dkv_travelling])
            if pending_kv is not None:
                (kv,) = pending_kv.wait()
        if pending_dkv is not None:
            (dkv_travelling,) = pending_dkv.wait()  # after a full turn: our own dK/dV
        assert dkv_travelling is not None
        dk = dkv_travelling[0].to(k.dtype)
        dv = dkv_travelling[1].to(v.dtype)
        return dq_acc.to(q.dtype), dk, dv, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: RingSpec) -> torch.Tensor:
    """Ring attention on ``(batch, heads, n_local, head_dim)`` shards (validated by the caller)."""
    return RingAttentionFunction.apply(q, k, v, spec)
