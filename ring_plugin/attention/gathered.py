"""Block-sparse attention as one masked call: fetch the K/V rows our queries read, then attend once.

The engine's pattern path computes block-sparse attention as many gathered blocks whose partial
outputs merge in fp32; on a GPU the gathers and merges cost more than the attention. Here the rows
of other ranks that this rank's queries read are fetched first (the engine's direct exchanges,
:meth:`~.engine.RingSpec.peer_rounds`), and ONE masked attention call runs over
``[own K/V ; fetched K/V]`` with autograd. That call sees every key of each query, so no
``(out, lse)`` merge is needed and the kernel's own backward is exact; the gradients of fetched rows
go back to their owners (:class:`GatherKV`).

The masked call is ``flex_attention`` with a ``BlockMask`` on CUDA (compiled once, lazily), and an
exact dense masked softmax elsewhere (flex has no CPU backward). Tensors are ``(batch, heads,
length, head_dim)``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..layout import global_positions
from ..patterns.block_sparse import BlockSparsePattern
from .engine import GradsHome, PeerRound, RingSpec, _post_kv

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


def _rows_per_head(rd: PeerRound, kv_heads: int, n_local: int) -> torch.Tensor:
    """The local rows (R,) of rank - shift that we read: block-sparse reads the same rows in every
    K/V head, so the flat received rows are (kv_heads, R) and land as a (B, kv_heads, R, D) tensor."""
    rows = rd.recv_rows
    per = rows.view(kv_heads, -1) if rows.numel() % kv_heads == 0 else None
    if per is None or not bool((per - torch.arange(kv_heads)[:, None] * n_local == per[:1]).all()):
        raise ValueError(
            f"the gathered path needs every K/V head to read the same rows (round shift={rd.shift}, "
            f"{rows.numel()} rows over {kv_heads} heads); use backend='auto' on CPU or a kernel backend"
        )
    return per[0]


# --------------------------------------------------------------------------------------- fetching
class GatherKV(torch.autograd.Function):
    """``(k, v)`` of this rank -> ``[own ; fetched]`` K and V, ``(B, kv_heads, L + R, D)``.

    Forward runs every round's exchange (round i + 1 is posted before round i is waited on).
    Backward sends each round's dK/dV rows back to rank - shift and receives, from rank + shift, the
    contributions to the rows we sent; every rank runs every round in the same order, posting
    nothing where it has nothing to send or receive (as the engine's pattern backward does).
    """

    @staticmethod
    def forward(ctx, k: torch.Tensor, v: torch.Tensor, spec: RingSpec, rounds: list[PeerRound]):  # type: ignore[override]
        comm = spec.comm
        b, hk, n, d = k.shape
        ks, vs = [k], [v]
        pending = _post_kv(comm, rounds[0], k, v)
        for i in range(len(rounds)):
            following = _post_kv(comm, rounds[i + 1], k, v) if i + 1 < len(rounds) else None
            got = pending.wait()
            pending = following  # type: ignore[assignment]
            comm.start_compute()
            if got:  # (B, 1, kv_heads * R, D), head-major: a free view as (B, kv_heads, R, D)
                ks.append(got[0].view(b, hk, -1, d))
                vs.append(got[1].view(b, hk, -1, d))
        ctx.spec, ctx.rounds, ctx.n_local, ctx.dtype = spec, rounds, n, k.dtype
        return torch.cat(ks, 2), torch.cat(vs, 2)

    @staticmethod
    def backward(ctx, dk_all: torch.Tensor, dv_all: torch.Tensor):  # type: ignore[override]
        spec: RingSpec = ctx.spec
        comm, n, gd = spec.comm, ctx.n_local, spec.grad_dtype
        b, hk, _, d = dk_all.shape
        own = [g[:, :, :n] for g in (dk_all, dv_all)]
        if any(rd.send_rows.numel() for rd in ctx.rounds):
            # Our own rows' gradients, summed with what comes home in grad_dtype (fp32 by default).
            dkv = [g.to(gd, memory_format=torch.contiguous_format, copy=True) for g in own]
        else:
            dkv = own  # nothing comes home (e.g. the first rank under causal): no accumulator

        home = GradsHome(comm, dkv)
        off = n
        for rd in ctx.rounds:
            r = rd.recv_rows.numel() // hk
            send = None
            if r:
                send = [g[:, :, off : off + r].to(gd).reshape(b, 1, hk * r, d) for g in (dk_all, dv_all)]
                off += r
            home.post(rd, send)
        home.finish()
        return dkv[0].to(ctx.dtype), dkv[1].to(ctx.dtype), None, None


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
        for rd in spec.peer_rounds(n_local):
            owner = (rank - rd.shift) % world
            parts.append(global_positions(n_local, spec.layout, owner, world)[_rows_per_head(rd, kv_heads, n_local)])
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
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


# ---------------------------------------------------------------------------------------- the call
def gathered_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: RingSpec, use_flex: bool | None = None
) -> torch.Tensor:
    """Block-sparse attention of ``q`` (B, H, L, D; may be a strided view) over our ``k``/``v``
    (B, H_kv, L, D) plus the rows fetched from other ranks; returns (B, H, L, D).

    ``use_flex`` (default: CUDA inputs) picks flex_attention, else the exact dense masked path.
    """
    n_local, kv_heads = q.shape[2], k.shape[1]
    geo = geometry(spec, n_local, kv_heads)  # validates that every K/V head reads the same rows
    rounds = spec.peer_rounds(n_local)
    k, v = k.contiguous(), v.contiguous()  # rows are packed through a flat (heads * L) view
    k_all, v_all = GatherKV.apply(k, v, spec, rounds) if rounds else (k, v)
    if use_flex is None:
        use_flex = q.is_cuda
    if use_flex:
        p = spec.pattern
        assert isinstance(p, BlockSparsePattern)
        key = (p.block_size, p.sparsity_ratio, p.pattern_type, *_key(spec, n_local, kv_heads, str(q.device)))
        if key not in _FLEX_MASKS:
            _FLEX_MASKS[key] = flex_block_mask(geo, q.device)
        block_mask = _FLEX_MASKS[key]
        return _flex()(q, k_all, v_all, block_mask=block_mask, scale=spec.scale, enable_gqa=kv_heads < q.shape[1])
    allowed = _cached(spec, n_local, kv_heads, f"dense:{q.device}", lambda: geo.allowed().to(q.device))
    return dense_masked_attention(q, k_all, v_all, allowed, spec.scale)
