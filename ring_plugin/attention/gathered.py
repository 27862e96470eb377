"""Block-sparse attention as one masked call: fetch the K/V rows our queries read, then attend once.

The engine's pattern path computes block-sparse attention as many gathered blocks whose partial
outputs merge in fp32; on a GPU the gathers and merges cost more than the attention. Here the rows
of other ranks that this rank's queries read are fetched first (the engine's direct exchanges,
:meth:`~.engine.RingSpec.peer_rounds`), and ONE masked attention call runs over
``[own K/V ; fetched K/V]`` with autograd. That call sees every key of each query, so no
``(out, lse)`` merge is needed and the kernel's own backward is exact; the gradients of fetched rows
go back to their owners (:class:`GatherKV`).

The masked call is ``flex_attention`` with a ``BlockMask`` on CUDA (compiled once, lazily), and an
exact dense masked softmax elsewhere (flex has no CPU backward). Tensors are ``(batch, length,
heads, head_dim)`` like the module's; the kernels see ``(batch, heads, length, head_dim)`` views.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..layout import global_positions
from ..patterns.block_sparse import BlockSparsePattern
from .engine import GradsHome, RingSpec

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

_TILE = 128  # flex's sparse block size: the BlockMask describes 128 x 128 tiles
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # pattern -> {key: geometry / mask}
_FLEX: Callable[..., torch.Tensor] | None = None
_MAX_GEOMETRIES = 64
# BlockMasks are shared by every layer with the same pattern parameters (not cached per pattern
# object): one mask_mod object means one compiled flex kernel, where compiled flex guards on the
# mask_mod function (and stops compiling after a few recompiles). Few keys: one per geometry.
_FLEX_MASKS: dict[tuple, Any] = {}


def _key(spec: RingSpec, n_local: int, kv_heads: int, what: str) -> tuple:
    return (what, spec.comm.rank, spec.comm.world_size, spec.layout, n_local, spec.causal, kv_heads)


def _cached(spec: RingSpec, n_local: int, kv_heads: int, what: str, build: Callable[[], Any]) -> Any:
    key = _key(spec, n_local, kv_heads, what)
    cache = _CACHE.setdefault(spec.pattern, {})
    if key not in cache:
        cache[key] = build()
    return cache[key]


def _aligned(pos: torch.Tensor, size: int) -> bool:
    """Whether every ``size`` rows of ``pos`` are one aligned run of global positions."""
    runs = pos.view(-1, size)
    return bool((runs - runs[:, :1] == torch.arange(size)).all() and (runs[:, 0] % size == 0).all())


@dataclass(frozen=True)
class RowRound:
    """One round of the engine's direct exchanges (:class:`~.engine.PeerRound`) as sequence rows:
    block-sparse reads the same rows in every K/V head, so a round moves whole ``(H_kv, D)`` rows."""

    shift: int
    send_rows: torch.Tensor  # (S,) our local rows that rank + shift reads
    recv_rows: torch.Tensor  # (R,) local rows of rank - shift that we read


def _same_in_every_head(flat: torch.Tensor, kv_heads: int, n_local: int, shift: int) -> torch.Tensor:
    """Flat ``kv_head * L + row`` rows -> the (R,) rows, checking that every K/V head has the same."""
    per = flat.view(kv_heads, -1) if flat.numel() % kv_heads == 0 else None
    if per is None or not bool((per - torch.arange(kv_heads)[:, None] * n_local == per[:1]).all()):
        raise ValueError(
            f"the gathered path needs every K/V head to read the same rows (round shift={shift}, "
            f"{flat.numel()} rows over {kv_heads} heads); use backend='auto' on CPU or a kernel backend"
        )
    return per[0]


def row_rounds(spec: RingSpec, n_local: int, kv_heads: int) -> list[RowRound]:
    """This rank's exchanges as :class:`RowRound` s (cached on the pattern)."""

    def build() -> list[RowRound]:
        def rows(rd, flat):
            return _same_in_every_head(flat, kv_heads, n_local, rd.shift)

        return [RowRound(rd.shift, rows(rd, rd.send_rows), rows(rd, rd.recv_rows)) for rd in spec.peer_rounds(n_local)]

    return _cached(spec, n_local, kv_heads, "rounds", build)


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
    def forward(ctx, k: torch.Tensor, v: torch.Tensor, spec: RingSpec, rounds: list[RowRound]):  # type: ignore[override]
        comm = spec.comm
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

        pending = post(0)
        k_all[:, :n].copy_(k)  # while round 0 is in flight
        v_all[:, :n].copy_(v)
        for i in range(len(rounds)):
            following = post(i + 1) if i + 1 < len(rounds) else None
            got = pending.wait()
            pending = following  # type: ignore[assignment]
            comm.start_compute()
            for dst, src in zip(slots[i] or [], got or []):
                if src.data_ptr() != dst.data_ptr():
                    dst.copy_(src)
        ctx.spec, ctx.rounds, ctx.n_local = spec, rounds, n
        return k_all, v_all

    @staticmethod
    def backward(ctx, dk_all: torch.Tensor, dv_all: torch.Tensor):  # type: ignore[override]
        spec: RingSpec = ctx.spec
        rounds: list[RowRound] = ctx.rounds
        n, gd = ctx.n_local, spec.grad_dtype
        own = [g[:, :n] for g in (dk_all, dv_all)]
        rows, where = _cached(spec, n, dk_all.shape[2], "home rows", lambda: _home_rows(rounds))
        run = isinstance(rows, slice)
        # The rows other ranks read: their contributions are summed with ours in grad_dtype (fp32 by
        # default), then written back; every other row's gradient is the kernel's own. Contributions
        # travel in the kernel's dtype (they are its outputs) and widen on arrival.
        if run:
            acc = [g[:, rows].to(gd) for g in own]
        else:
            acc = [g.index_select(1, rows.to(g.device)).to(gd) for g in own] if rows.numel() else []
        home = GradsHome(spec.comm, acc, wire_dtype=dk_all.dtype)
        off = n
        for rd, at in zip(rounds, where):
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


def geometry(spec: RingSpec, n_local: int, kv_heads: int) -> Geometry:
    """This rank's :class:`Geometry` (cached on the pattern)."""

    def build() -> Geometry:
        pattern = spec.pattern
        assert isinstance(pattern, BlockSparsePattern)
        rank, world, bs = spec.comm.rank, spec.comm.world_size, pattern.block_size
        pos_q = global_positions(n_local, spec.layout, rank, world)
        parts = [pos_q]
        for rd in row_rounds(spec, n_local, kv_heads):
            owner = (rank - rd.shift) % world
            parts.append(global_positions(n_local, spec.layout, owner, world)[rd.recv_rows])
        pos_k = torch.cat(parts)
        # Own and fetched rows are whole pattern blocks (blocks never straddle chunks), so local row
        # r lies in local block r // bs and one block of keys is one block of the pattern.
        assert _aligned(pos_q, bs) and _aligned(pos_k, bs)
        mask = pattern.mask(n_local * world)
        blocks = mask[(pos_q[::bs] // bs)[:, None], (pos_k[::bs] // bs)[None, :]]
        return Geometry(pos_q, pos_k, blocks, bs, spec.causal)

    return _cached(spec, n_local, kv_heads, "geometry", build)


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
def gathered_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: RingSpec, use_flex: bool | None = None
) -> torch.Tensor:
    """Block-sparse attention of ``q`` (B, L, H, D) over our ``k``/``v`` (B, L, H_kv, D) plus the rows
    fetched from other ranks; returns (B, L, H, D). The kernels see ``(B, H, L, D)`` views.

    ``use_flex`` (default: CUDA inputs) picks flex_attention, else the exact dense masked path.
    """
    n_local, kv_heads = q.shape[1], k.shape[2]
    geo = geometry(spec, n_local, kv_heads)  # validates that every K/V head reads the same rows
    rounds = row_rounds(spec, n_local, kv_heads)
    k_all, v_all = GatherKV.apply(k, v, spec, rounds) if rounds else (k, v)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k_all, v_all))
    if use_flex is None:
        use_flex = q.is_cuda
    if use_flex:
        p = spec.pattern
        assert isinstance(p, BlockSparsePattern)
        key = (p.block_size, p.sparsity_ratio, p.pattern_type, *_key(spec, n_local, kv_heads, str(q.device)))
        if key not in _FLEX_MASKS:
            _FLEX_MASKS[key] = flex_block_mask(geo, q.device)
        out = _flex()(qt, kt, vt, block_mask=_FLEX_MASKS[key], scale=spec.scale, enable_gqa=kv_heads < q.shape[2])
    else:
        allowed = _cached(spec, n_local, kv_heads, f"dense:{q.device}", lambda: geo.allowed().to(q.device))
        out = dense_masked_attention(qt, kt, vt, allowed, spec.scale)
    return out.transpose(1, 2)
