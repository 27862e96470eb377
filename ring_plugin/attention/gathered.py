"""Block-sparse attention as one masked call: fetch the K/V rows our queries read, then attend once.

The engine's pattern path computes block-sparse attention as many gathered blocks whose partial
outputs merge in fp32; on a GPU the gathers and merges cost more than the attention. Here the rows
of other ranks that this rank's queries read are fetched first (the rounds of the layer's
:class:`~.exchange.ExchangePlan`, as whole sequence rows), and ONE masked attention call runs over
``[own K/V ; fetched K/V]`` with autograd. That call sees every key of each query, so no
``(out, lse)`` merge is needed and the kernel's own backward is exact; the gradients of fetched rows
go back to their owners (:class:`GatherKV`).

The masked call is ``flex_attention`` with a ``BlockMask`` on CUDA (compiled once, lazily), and an
exact dense masked softmax elsewhere (flex has no CPU backward). Tensors are ``(batch, length,
heads, head_dim)`` like the module's; the kernels see ``(batch, heads, length, head_dim)`` views.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from ..cache import BoundedCache
from .call import RingCall
from .exchange import ExchangePlan, GradsHome, RowRound
from .schedule import prefetched

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

_TILE = 128  # flex's sparse block size: the BlockMask describes 128 x 128 tiles
_FLEX: Callable[..., torch.Tensor] | None = None
_MAX_GEOMETRIES = 64
# BlockMasks are shared by every layer with the same pattern and geometry (not owned by one layer):
# one mask_mod object means one compiled flex kernel, where compiled flex guards on the mask_mod
# function (and stops compiling after a few recompiles). Few keys: one per geometry.
_FLEX_MASKS: BoundedCache[Any] = BoundedCache(_MAX_GEOMETRIES)


class BlockMaskPattern(Protocol):
    """What the gathered path needs of a pattern: a block mask over (query block, key block) pairs."""

    block_size: int

    def mask(self, n: int) -> torch.Tensor: ...


def _aligned(pos: torch.Tensor, size: int) -> bool:
    """Whether every ``size`` rows of ``pos`` are one aligned run of global positions."""
    runs = pos.view(-1, size)
    return bool((runs - runs[:, :1] == torch.arange(size)).all() and (runs[:, 0] % size == 0).all())


def _as_run(idx: torch.Tensor) -> torch.Tensor | slice:
    """``idx`` as ``slice(a, b)`` where it is exactly ``a, a + 1, ..., b - 1`` (a view, not a scatter)."""
    if idx.numel() and bool((idx == torch.arange(int(idx[0]), int(idx[0]) + idx.numel())).all()):
        return slice(int(idx[0]), int(idx[0]) + idx.numel())
    return idx


def _home_rows(rounds: list[RowRound]) -> tuple[torch.Tensor | slice, list[torch.Tensor | slice]]:
    """The rows other ranks read of ours (sorted) and, per round, where its sent rows sit among them;
    each as a slice where it is one run (a local window's rows usually are)."""
    rows = torch.unique(torch.cat([rd.send_rows for rd in rounds])) if rounds else torch.empty(0, dtype=torch.long)
    return _as_run(rows), [_as_run(torch.searchsorted(rows, rd.send_rows)) for rd in rounds]


def _landing(buf: torch.Tensor) -> torch.Tensor:
    """Where a message for ``buf`` (a slice of ``[own ; fetched]``) is received: itself where
    contiguous (batch 1), else a temporary that is copied in after the wait."""
    return buf if buf.is_contiguous() else torch.empty_like(buf, memory_format=torch.contiguous_format)


@dataclass(frozen=True)
class GatheredPlan:
    """Everything the gathered path needs for one rank and geometry, built once by the layer."""

    rounds: list[RowRound]
    home: torch.Tensor | slice  # rows of ours that other ranks read
    home_of_round: list[torch.Tensor | slice]  # per round, where its sent rows sit among ``home``
    geometry: Geometry
    mask_key: tuple  # identifies the geometry for the shared flex BlockMask cache


def build_gathered_plan(pattern: BlockMaskPattern, pattern_key: tuple, call: RingCall,
                        exchange: ExchangePlan) -> GatheredPlan:
    rounds = exchange.sequence_rounds()  # validates that every K/V head reads the same rows
    rank, world, n_local = call.comm.rank, call.comm.world_size, exchange.n_local
    bs = pattern.block_size
    pos_q = call.layout.positions(n_local, rank)
    parts = [pos_q] + [call.layout.positions(n_local, (rank - rd.shift) % world)[rd.recv_rows] for rd in rounds]
    pos_k = torch.cat(parts)
    # Own and fetched rows are whole pattern blocks (blocks never straddle chunks), so local row
    # r lies in local block r // bs and one block of keys is one block of the pattern.
    assert _aligned(pos_q, bs) and _aligned(pos_k, bs)
    mask = pattern.mask(n_local * world)
    blocks = mask[(pos_q[::bs] // bs)[:, None], (pos_k[::bs] // bs)[None, :]]
    geometry = Geometry(pos_q, pos_k, blocks, bs, call.causal)
    home, where = _home_rows(rounds)
    key = (pattern_key, call.layout.chunks, rank, n_local, call.causal, exchange.kv_heads)
    return GatheredPlan(rounds, home, where, geometry, key)


# --------------------------------------------------------------------------------------- fetching
class GatherKV(torch.autograd.Function):
    """``(k, v)`` of this rank, ``(B, L, H_kv, D)`` -> ``[own ; fetched]`` K and V, ``(B, L + R, H_kv, D)``.

    Sequence-major like the module's tensors: our rows are copied in once, fetched rows are received
    in place, and the gradient of our rows is a slice of the kernel's dK/dV (no transposing copies).
    Forward runs every round's exchange (round i + 1 is posted before round i is waited on).
    Backward sends each round's dK/dV rows back to rank - shift and adds, in ``grad_dtype``, what
    rank + shift computed for the rows we sent it; only those rows are accumulated and rounded again.
    Every rank runs every round in the same order, posting nothing where it has nothing to move.
    """

    @staticmethod
    def forward(ctx, k: torch.Tensor, v: torch.Tensor, call: RingCall, plan: GatheredPlan):  # type: ignore[override]
        comm, rounds = call.comm, plan.rounds
        b, n, hk, d = k.shape
        total = n + sum(rd.recv_rows.numel() for rd in rounds)
        k_all, v_all = (t.new_empty((b, total, hk, d)) for t in (k, v))
        slots, off = [], n
        for rd in rounds:
            r = rd.recv_rows.numel()
            slots.append([t[:, off : off + r] for t in (k_all, v_all)] if r else None)
            off += r

        def post(i: int):
            rd, slot = rounds[i], slots[i]
            send = [t.index_select(1, rd.send_rows.to(t.device)) for t in (k, v)] if rd.send_rows.numel() else None
            recv = [_landing(t) for t in slot] if slot else None
            return comm.exchange_with(send, comm.rank + rd.shift, recv, comm.rank - rd.shift)

        arrivals = prefetched(comm, len(rounds), lambda i, _prev: post(i))
        k_all[:, :n].copy_(k)  # while round 0 is in flight
        v_all[:, :n].copy_(v)
        for slot, got in zip(slots, arrivals):
            for dst, src in zip(slot or [], got or []):
                if src.data_ptr() != dst.data_ptr():
                    dst.copy_(src)
        ctx.call, ctx.plan, ctx.n_local = call, plan, n
        return k_all, v_all

    @staticmethod
    def backward(ctx, dk_all: torch.Tensor, dv_all: torch.Tensor):  # type: ignore[override]
        call: RingCall = ctx.call
        plan: GatheredPlan = ctx.plan
        n, gd = ctx.n_local, call.grad_dtype
        own = [g[:, :n] for g in (dk_all, dv_all)]
        rows, where = plan.home, plan.home_of_round
        run = isinstance(rows, slice)
        # The rows other ranks read: their contributions are summed with ours in grad_dtype (fp32 by
        # default), then written back; every other row's gradient is the kernel's own. Contributions
        # travel in the kernel's dtype (they are its outputs) and widen on arrival.
        if run:
            acc = [g[:, rows].to(gd) for g in own]
        else:
            acc = [g.index_select(1, rows.to(g.device)).to(gd) for g in own] if rows.numel() else []
        home = GradsHome(call.comm, acc, wire_dtype=dk_all.dtype)
        off = n
        for rd, at in zip(plan.rounds, where):
            r = rd.recv_rows.numel()
            fetched = [g[:, off : off + r] for g in (dk_all, dv_all)]
            send = [g.contiguous() for g in fetched] if r else None
            off += r
            home.post(rd.shift, send, at)
        home.finish()
        # dK/dV come from the kernel's backward for [own ; fetched], whose only use is that kernel.
        for g, a in zip(own, acc):
            if run:
                g[:, rows].copy_(a)
            else:
                g.index_copy_(1, rows.to(g.device), a.to(g.dtype))
        return own[0], own[1], None, None


# --------------------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class Geometry:
    """Where our queries and ``[own ; fetched]`` keys sit, and which of their blocks the pattern allows."""

    pos_q: torch.Tensor  # (Lq,) global positions of our query rows
    pos_k: torch.Tensor  # (Lk,) global positions of own then fetched key rows
    blocks: torch.Tensor  # (Lq // bs, Lk // bs) bool: the pattern mask between local row blocks
    block_size: int
    causal: bool

    def allowed(self) -> torch.Tensor:
        """(Lq, Lk) bool: the allowed (query, key) pairs."""
        bs = self.block_size
        keep = self.blocks.repeat_interleave(bs, 0).repeat_interleave(bs, 1)
        if self.causal:
            keep &= self.pos_k[None, :] <= self.pos_q[:, None]
        return keep


# ----------------------------------------------------------------------------------------- kernels
def dense_masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float
) -> torch.Tensor:
    """Exact masked attention with plain autograd: scores in fp32 (fp64 for fp64 inputs); rows with
    no allowed key output 0 with zero gradients (never NaN). ``k``/``v`` may have fewer heads (GQA)."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    groups = q.shape[1] // k.shape[1]
    kc, vc = (t.to(compute).repeat_interleave(groups, 1) if groups > 1 else t.to(compute) for t in (k, v))
    s = torch.matmul(q.to(compute), kc.transpose(-1, -2)) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    has_key = allowed.any(-1, keepdim=True)
    # Rows without keys get finite scores (so softmax has no NaN) and are zeroed after it.
    p = torch.softmax(torch.where(has_key, s, 0.0), dim=-1) * has_key
    return torch.matmul(p, vc).to(q.dtype)


def _mask_mod(geo: Geometry, device: torch.device) -> Callable:
    """flex ``mask_mod`` of the exact mask, reading the (device) block mask and positions."""
    bs = geo.block_size
    blocks, pos_q, pos_k = (t.to(device) for t in (geo.blocks, geo.pos_q, geo.pos_k))
    if not geo.causal:
        def mask_mod(b, h, q_idx, kv_idx):
            return blocks[q_idx // bs, kv_idx // bs]
        return mask_mod

    def causal_mask_mod(b, h, q_idx, kv_idx):
        return blocks[q_idx // bs, kv_idx // bs] & (pos_k[kv_idx] <= pos_q[q_idx])

    return causal_mask_mod


def _ordered(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Qt, Kt) bool tiles -> (1, 1, Qt) counts and (1, 1, Qt, Kt) indices (selected tiles first)."""
    num = dense.sum(-1, dtype=torch.int32)
    idx = torch.argsort(dense.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return num[None, None].contiguous(), idx[None, None].contiguous()


def flex_block_mask(geo: Geometry, device: torch.device) -> BlockMask:
    """The ``BlockMask`` of ``geo`` on ``device``: built from 128 x 128 tiles when ``block_size`` is a
    multiple of 128 (each tile then lies in one pattern block), else with ``create_block_mask``."""
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask

    lq, lk = geo.pos_q.numel(), geo.pos_k.numel()
    mask_mod = _mask_mod(geo, device)
    # Tiles straight from the pattern need every 128 rows of [own ; fetched] in one pattern block:
    # block_size a multiple of 128, and so every round's received rows too.
    if geo.block_size % _TILE or lk % _TILE or not (_aligned(geo.pos_q, _TILE) and _aligned(geo.pos_k, _TILE)):
        return create_block_mask(mask_mod, None, None, lq, lk, device=device, BLOCK_SIZE=_TILE)
    per = geo.block_size // _TILE
    tiles = geo.blocks.repeat_interleave(per, 0).repeat_interleave(per, 1)
    if geo.causal:
        # Tiles are aligned 128-position ranges: a key tile is wholly before, equal to or after a
        # query tile. Before: no mask needed ("full"); equal: the diagonal, mask_mod applies.
        tq, tk = geo.pos_q[::_TILE], geo.pos_k[::_TILE]
        full, partial = tiles & (tk[None, :] < tq[:, None]), tiles & (tk[None, :] == tq[:, None])
    else:
        full, partial = tiles, torch.zeros_like(tiles)
    (num, idx), (full_num, full_idx) = _ordered(partial), _ordered(full)
    return BlockMask.from_kv_blocks(
        num.to(device), idx.to(device), full_num.to(device), full_idx.to(device),
        BLOCK_SIZE=_TILE, mask_mod=mask_mod, seq_lengths=(lq, lk),
    )


def _flex() -> Callable[..., torch.Tensor]:
    global _FLEX
    if _FLEX is None:  # compiled on first use: importing the package must not touch the compiler
        # Each block-mask geometry (pattern, shard, rank) is one compiled specialisation. Dynamo's
        # default of 8 per function would silently fall back to eager flex (which materialises the
        # scores) in a model with many geometries, so allow more.
        import torch._dynamo.config as dynamo_config
        from torch.nn.attention.flex_attention import flex_attention

        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, _MAX_GEOMETRIES)
        compiled = torch.compile(flex_attention, dynamic=False)
        # Our output and its gradient are (B, L, H, D) rows seen as (B, H, L, D). AOTAutograd (before
        # torch 2.13) traces the backward for contiguous (B, H, L, D) gradients and copies every
        # incoming one into that layout; told to expect the output's own strides, it copies nothing.
        # The option is read while the graph is traced, i.e. inside the call, and set only there.
        import torch._functorch.config as functorch_config

        same_strides = {"guess_tangent_strides_as_outputs": True}
        if not hasattr(functorch_config, "guess_tangent_strides_as_outputs"):
            same_strides = {}

        def flex(*args: Any, **kwargs: Any) -> torch.Tensor:
            with functorch_config.patch(**same_strides):
                return compiled(*args, **kwargs)

        _FLEX = flex
    return _FLEX


# ---------------------------------------------------------------------------------------- the call
_ALLOWED: BoundedCache[torch.Tensor] = BoundedCache(16)  # the exact path's (Lq, Lk) masks, per device


def gathered_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: RingCall, plan: GatheredPlan,
    use_flex: bool | None = None,
) -> torch.Tensor:
    """Block-sparse attention of ``q`` (B, L, H, D) over our ``k``/``v`` (B, L, H_kv, D) plus the rows
    fetched from other ranks; returns (B, L, H, D). The kernels see ``(B, H, L, D)`` views.

    ``use_flex`` (default: CUDA inputs) picks flex_attention, else the exact dense masked path.
    """
    kv_heads = k.shape[2]
    k_all, v_all = GatherKV.apply(k, v, call, plan) if plan.rounds else (k, v)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k_all, v_all))
    if use_flex is None:
        use_flex = q.is_cuda
    key = (*plan.mask_key, str(q.device))
    if use_flex:
        block_mask = _FLEX_MASKS.get(key, lambda: flex_block_mask(plan.geometry, q.device))
        out = _flex()(qt, kt, vt, block_mask=block_mask, scale=call.scale, enable_gqa=kv_heads < q.shape[2])
    else:
        allowed = _ALLOWED.get(key, lambda: plan.geometry.allowed().to(q.device))
        out = dense_masked_attention(qt, kt, vt, allowed, call.scale)
    return out.transpose(1, 2)
