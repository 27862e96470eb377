"""The ring engine: one autograd function that every ring variant runs on.

Dense forward: K/V (as two messages) travel round the ring with ``batch_isend_irecv``; the next
shard is in flight while the current one is computed. Each step's blocks (from the plan) are
computed by a logsumexp-returning kernel and merged into fp32 ``(out, lse)`` accumulators.

Dense backward: K/V travel round again; each step's dK/dV contribution is added to an accumulator
(fp32 by default, ``RingSpec.grad_dtype``) that travels with them and, after a full turn, arrives back
at its owner. Each block's backward is
fed the merged output and logsumexp, which makes it exact. No rank ever holds more than its own
shard plus the ones in flight, and no full score matrix exists anywhere.

Patterns (dilated, block-sparse) hand the engine :class:`~ring_plugin.patterns.blocks.IndexBlock` s
or :class:`~ring_plugin.patterns.blocks.ViewBlock` s instead of slices. A view block's rows form a
regular grid (segments x heads x strided rows), so the kernel reads strided views of the shard and
merges through views of the accumulators: nothing is copied. An index block names irregular head
and row subsets, gathered with one ``index_select``; either kind folds its groups into the kernel's
batch. Their outputs merge into the same accumulators, so the engine stays
exact for every pattern. A pattern does not turn the whole ring: its work with the rank's own shard
is local, and only the K/V rows another rank's blocks read travel, straight to that rank (the ranks
that share a segment form the sub-ring; a dilated pair sends ~1/r of each shard it spans, a pair
whose segments fit in a shard sends nothing). Rows are packed into a compact ``(B, 1, M, D)`` buffer
whose blocks index it directly; in backward the compact dK/dV come straight back to their owner and
are scattered (``index_add_``) into its dK/dV. Who sends what in which round is derived from the
config and global shapes only, so every rank posts matching messages in the same order.

Tensors inside the engine are ``(batch, heads, length, head_dim)``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..comm.ring import RingComm
from ..layout import rank_chunks
from ..ops.kernels import Kernel
from ..ops.merge import merge_into
from ..patterns.blocks import IndexBlock, Pattern, ViewBlock
from .plan import Block, plan_dense_step


@dataclass(frozen=True)
class RingSpec:
    """Everything about one ring call that is not a tensor."""

    comm: RingComm
    layout: str
    kernel: Kernel
    scale: float
    causal: bool
    # dtype of the dQ accumulator and of the dK/dV accumulators that travel home: fp32 keeps the
    # sums exact; the input's half precision halves their memory and traffic at one rounding a step.
    grad_dtype: torch.dtype = torch.float32
    pattern: Pattern | None = None  # when set, blocks come from the pattern, else dense
    heads: int = 0  # query and K/V head counts (needed by patterns only)
    kv_heads: int = 0

    def chunks(self, rank: int) -> tuple[int, ...]:
        return rank_chunks(self.layout, rank, self.comm.world_size)

    def step_blocks(self, step: int, n_local: int, rank: int | None = None) -> list[Block | IndexBlock | ViewBlock]:
        """Blocks of step ``step``, where ``rank`` (default: this one) holds the K/V of ``rank - step``."""
        world = self.comm.world_size
        rank = self.comm.rank if rank is None else rank
        q_chunks, kv_chunks = self.chunks(rank), self.chunks((rank - step) % world)
        chunk_len = n_local // len(q_chunks)
        if self.pattern is None:
            return plan_dense_step(q_chunks, kv_chunks, chunk_len, self.causal)
        return list(self.pattern.plan(
            q_chunks, kv_chunks, chunk_len, n_local * world, self.causal, self.heads, self.kv_heads
        ))

    def peer_rounds(self, n_local: int) -> list[PeerRound]:
        """A pattern's direct exchanges (see :func:`peer_rounds`), cached on the pattern."""
        assert self.pattern is not None
        key = (self.comm.rank, self.comm.world_size, self.layout, n_local, self.causal, self.heads, self.kv_heads)
        cache = _ROUNDS_CACHE.setdefault(self.pattern, {})
        if key not in cache:
            cache[key] = peer_rounds(self, n_local)
        return cache[key]


@dataclass(frozen=True)
class PeerRound:
    """One round of a pattern's direct exchanges: this rank sends to ``rank + shift`` and receives
    from ``rank - shift`` (either may be empty: ``send_rows``/``recv_rows`` of size 0)."""

    shift: int
    send_rows: torch.Tensor  # sorted flat rows (kv_head * L + row) of our K/V that rank + shift reads
    recv_rows: torch.Tensor  # sorted flat rows of rank - shift's K/V that our blocks read
    blocks: list[IndexBlock] = field(default_factory=list)  # our queries vs the compact received rows


_ROUNDS_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _indexed(blocks: list, n_local: int) -> list[IndexBlock]:
    """A step's pattern blocks as flat indices: K/V from another rank arrive packed, not as a shard."""
    return [b.index_block(n_local, n_local) if isinstance(b, ViewBlock) else b for b in blocks]


def _rows_read(blocks: list[IndexBlock]) -> torch.Tensor:
    if not blocks:
        return torch.empty(0, dtype=torch.int64)
    return torch.unique(torch.cat([b.kv_index.flatten() for b in blocks]))  # sorted


def peer_rounds(spec: RingSpec, n_local: int) -> list[PeerRound]:
    """The rounds of a pattern's exchanges for this rank, from config and global shapes only.

    Round ``t`` pairs each rank ``a`` with ``a - t`` (receive) and ``a + t`` (send). The rounds are the
    shifts in which any rank reads another's K/V; every rank runs all of them (posting nothing where
    it has nothing to send or receive), so messages between two ranks are posted in the same order
    on both sides. A sender packs exactly the rows the receiver's blocks read: the receiver's
    ``recv_rows`` and the sender's ``send_rows`` are the same computation.
    """
    world, rank = spec.comm.world_size, spec.comm.rank
    rounds = []
    for t in range(1, world):
        if not any(spec.step_blocks(t, n_local, a) for a in range(world)):
            continue
        mine = _indexed(spec.step_blocks(t, n_local), n_local)  # our queries, K/V of rank - t
        recv_rows = _rows_read(mine)
        blocks = [IndexBlock(b.q_index, torch.searchsorted(recv_rows, b.kv_index), b.causal) for b in mine]
        send_rows = _rows_read(_indexed(spec.step_blocks(t, n_local, (rank + t) % world), n_local))
        rounds.append(PeerRound(t, send_rows, recv_rows, blocks))
    return rounds


def _expand_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _reduce_heads(x: torch.Tensor, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """Sum the gradients of query heads that share a K/V head (in ``dtype``, e.g. fp32)."""
    if groups == 1:
        return x
    b, h, n, d = x.shape
    return x.view(b, h // groups, groups, n, d).sum(2, dtype=dtype)


def _rows(x: torch.Tensor, s: slice) -> torch.Tensor:
    return x if (s.start == 0 and s.stop == x.shape[2]) else x[:, :, s].contiguous()


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x`` (B, H, L, D) at flat ``index`` (G, h, m) -> contiguous (B*G, h, m, D)."""
    b, h, n, d = x.shape
    g, hh, m = index.shape
    return x.reshape(b, h * n, d).index_select(1, index.flatten()).view(b * g, hh, m, d)


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x`` (B, H, L) at flat ``index`` (G, h, m) -> (B*G, h, m)."""
    b, h, n = x.shape
    g, hh, m = index.shape
    return x.reshape(b, h * n).index_select(1, index.flatten()).view(b * g, hh, m)


def _flat(y: torch.Tensor, batch: int) -> torch.Tensor:
    """Undo the batch folding of :func:`_gather`: (B*G, h, m[, D]) -> (B, G*h*m[, D])."""
    return y.reshape(batch, -1, *y.shape[3:])


def _forward_block(spec: RingSpec, q, kv, block, groups, out_acc, lse_acc, first: bool = False) -> None:
    """Compute one block and merge it into the accumulators (``first``: they are still empty)."""
    if isinstance(block, ViewBlock):
        o, lse = spec.kernel.forward(
            block.q_view(q).flatten(0, 1), block.kv_view(kv[0]).flatten(0, 1), block.kv_view(kv[1]).flatten(0, 1),
            block.causal, spec.scale,
        )
        o_acc, l_acc = block.q_view(out_acc), block.q_view(lse_acc)
        o, lse = o.unflatten(0, o_acc.shape[:2]), lse.unflatten(0, o_acc.shape[:2])
        if first:  # a block's (head, row) sets are disjoint: nothing to merge with yet
            o_acc.copy_(o)
            l_acc.copy_(lse)
        else:
            merge_into(o_acc, l_acc, o, lse)
        return
    if isinstance(block, IndexBlock):
        block = block.on(q.device)
        b, h, n, d = q.shape
        o, lse = spec.kernel.forward(
            _gather(q, block.q_index), _gather(kv[0], block.kv_index), _gather(kv[1], block.kv_index),
            block.causal, spec.scale,
        )
        idx = block.q_index.flatten()
        out_view, lse_view = out_acc.view(b, h * n, d), lse_acc.view(b, h * n)
        if first:  # a block's (head, row) sets are disjoint: nothing to merge with yet
            out_view.index_copy_(1, idx, _flat(o, b).float())
            lse_view.index_copy_(1, idx, _flat(lse, b).float())
            return
        o_acc, l_acc = out_view.index_select(1, idx), lse_view.index_select(1, idx)
        merge_into(o_acc, l_acc, _flat(o, b), _flat(lse, b))
        out_view.index_copy_(1, idx, o_acc)
        lse_view.index_copy_(1, idx, l_acc)
        return
    kb = _expand_heads(_rows(kv[0], block.kv), groups)
    vb = _expand_heads(_rows(kv[1], block.kv), groups)
    o, lse = spec.kernel.forward(_rows(q, block.q), kb, vb, block.causal, spec.scale)
    if first and block.q == slice(0, q.shape[2]):
        out_acc.copy_(o)  # nothing to merge with yet
        lse_acc.copy_(lse)
        return
    merge_into(out_acc[:, :, block.q], lse_acc[:, :, block.q], o, lse)


def _backward_block(spec: RingSpec, dout, q, kv, out, lse, block, groups, dq_acc,
                    first: bool = False) -> Callable[[list], None]:
    """Run one block's backward; add its dQ now and return how to add its dK/dV to an accumulator
    (``first``: a view block covering every row, whose gradients initialise the empty accumulators).

    The dK/dV accumulator of this step only arrives after the compute, so the kernel's outputs are
    held (no step-sized buffer) and added in place once it is there.
    """
    if isinstance(block, ViewBlock):
        qv = block.q_view(q)
        dq, dk, dv = spec.kernel.backward(
            block.q_view(dout).flatten(0, 1), qv.flatten(0, 1), block.kv_view(kv[0]).flatten(0, 1),
            block.kv_view(kv[1]).flatten(0, 1), block.q_view(out).flatten(0, 1),
            block.q_view(lse).flatten(0, 1).contiguous(), block.causal, spec.scale,
        )
        dq_view = block.q_view(dq_acc)
        (dq_view.copy_ if first else dq_view.add_)(dq.unflatten(0, qv.shape[:2]))

        def add_viewed(acc: list) -> None:
            for a, g in zip(acc, (dk, dv)):  # a block's key rows are disjoint: a plain in-place add
                view = block.kv_view(a)
                (view.copy_ if first else view.add_)(g.unflatten(0, qv.shape[:2]))

        return add_viewed
    if isinstance(block, IndexBlock):
        block = block.on(q.device)
        b, h, n, d = q.shape
        qi, ki = block.q_index, block.kv_index
        dq, dk, dv = spec.kernel.backward(
            _gather(dout, qi), _gather(q, qi), _gather(kv[0], ki), _gather(kv[1], ki),
            _gather(out, qi), _gather_rows(lse, qi).contiguous(), block.causal, spec.scale,
        )
        dq_acc.view(b, h * n, d).index_add_(1, qi.flatten(), _flat(dq, b).to(dq_acc.dtype))

        def add_indexed(acc: list) -> None:
            hk, nk = acc[0].shape[1], acc[0].shape[2]
            # index_add_ sums duplicates, so K/V heads shared by several query heads (GQA) just work.
            for a, g in zip(acc, (dk, dv)):
                a.view(b, hk * nk, d).index_add_(1, ki.flatten(), _flat(g, b).to(a.dtype))

        return add_indexed
    kb = _expand_heads(_rows(kv[0], block.kv), groups)
    vb = _expand_heads(_rows(kv[1], block.kv), groups)
    dq, dk, dv = spec.kernel.backward(
        _rows(dout, block.q), _rows(q, block.q), kb, vb,
        _rows(out, block.q), _rows(lse, block.q), block.causal, spec.scale,
    )
    dq_acc[:, :, block.q] += dq  # mixed-dtype in-place add: no fp32 copy of dq

    def add_rows(acc: list) -> None:
        for a, g in zip(acc, (dk, dv)):
            a[:, :, block.kv] += _reduce_heads(g, groups, a.dtype)

    return add_rows


def _pack(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` (flat ``head * L + row``) of ``x`` (B, H, L, D) as a compact (B, 1, M, D)."""
    b, h, n, d = x.shape
    return x.reshape(b, h * n, d).index_select(1, rows.to(x.device)).unsqueeze(1)


def _compact_like(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return torch.empty((x.shape[0], 1, rows.numel(), x.shape[3]), dtype=x.dtype, device=x.device)


def _post_kv(comm: RingComm, rd: PeerRound, k: torch.Tensor, v: torch.Tensor):
    """Send our rows that rank + shift reads; receive the rows we read of rank - shift's K/V."""
    send = [_pack(k, rd.send_rows), _pack(v, rd.send_rows)] if rd.send_rows.numel() else None
    recv = [_compact_like(k, rd.recv_rows), _compact_like(v, rd.recv_rows)] if rd.recv_rows.numel() else None
    return comm.exchange_with(send, comm.rank + rd.shift, recv, comm.rank - rd.shift)


def _views_only(spec: RingSpec, n_local: int) -> bool:
    """Whether a pattern's work is all view blocks on our own shard (no gathers, no packing)."""
    if spec.pattern is None or spec.peer_rounds(n_local):
        return False
    return all(isinstance(b, ViewBlock) for b in spec.step_blocks(0, n_local))


def _first_covers(spec: RingSpec, n_local: int) -> bool:
    """Whether a view-only pattern's first block writes every accumulator row: then they start empty
    (no zero fill) and that block's outputs are copied in, not added."""
    if not _views_only(spec, n_local):
        return False
    first = spec.step_blocks(0, n_local)[0]
    return spec.heads == spec.kv_heads and first.covers(spec.heads, n_local)  # type: ignore[union-attr]


def _flat_forms(views_only: bool, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors as contiguous ``(B, H, L, D)`` where index blocks or packing need their flat
    ``(heads * L)`` rows (copied once per call, not once per block); views serve view blocks."""
    return tensors if views_only else tuple(t.contiguous() for t in tensors)


def _new(shape, dtype, device, fill: float | None, seq_major: bool) -> torch.Tensor:
    """A ``(B, H, L[, D])`` tensor filled with ``fill`` (None: uninitialised), stored ``(B, L, H[, D])``
    when ``seq_major``: view blocks then read outputs and gradients in the same layout as the
    module's q/k/v, which the kernels want."""
    if seq_major:
        shape = (shape[0], shape[2], shape[1], *shape[3:])
    t = torch.empty(shape, dtype=dtype, device=device) if fill is None else torch.full(shape, fill, dtype=dtype,
                                                                                     device=device)
    return t.transpose(1, 2) if seq_major else t


def _pick(block, views, flats):
    return views if isinstance(block, ViewBlock) else flats


class GradsHome:
    """The return trip of a pattern's exchanges in backward: each round sends the compact dK/dV of the
    rows we read back to their owner (rank - shift) and receives, from rank + shift, what it computed
    for the rows we sent it; those are added (``index_add_``) into ``dkv`` while the next round runs.

    ``dkv`` are ``(B, rows, ...)``: a contribution of M rows arrives as ``(B, M, ...)`` and lands on the
    rows of dim 1 that :meth:`post` names (flat ``head * L + row`` rows for the engine's
    ``(B, H * L, D)`` views; sequence rows for the gathered path's ``(B, L, H, D)``).
    """

    def __init__(self, comm: RingComm, dkv: list[torch.Tensor], wire_dtype: torch.dtype | None = None):
        # wire_dtype: what contributions travel in (default: dkv's). A kernel's own bf16 gradients
        # travel as bf16: widening them before the send adds bytes, not precision.
        self.comm, self.dkv, self.wire_dtype = comm, dkv, wire_dtype
        self._returning = None  # (exchange, rows): contributions to our rows, on their way home

    def post(self, shift: int, grads: list[torch.Tensor] | None, home: torch.Tensor | slice) -> None:
        """Send this round's compact ``grads`` (None: nothing read) to rank - shift and post the
        receive of the contributions rank + shift computed for our rows ``home`` of dim 1 (an index,
        or a ``slice(start, stop)`` where they are one run: then they are added in place, no scatter)."""
        comm = self.comm
        m = home.stop - home.start if isinstance(home, slice) else home.numel()
        recv = None
        if m:
            recv = [t.new_empty((t.shape[0], m, *t.shape[2:]), dtype=self.wire_dtype or t.dtype) for t in self.dkv]
        pending = comm.exchange_with(grads, comm.rank - shift, recv, comm.rank + shift)
        self._scatter()
        self._returning = (pending, home)

    def finish(self) -> list[torch.Tensor]:
        self._scatter()
        return self.dkv

    def _scatter(self) -> None:
        if self._returning is None:
            return
        pending, rows = self._returning
        self._returning = None
        got = pending.wait()
        if not got:
            return
        if isinstance(rows, slice):
            for acc, g in zip(self.dkv, got):
                acc[:, rows].add_(g)
            return
        idx = rows.to(self.dkv[0].device)
        for acc, g in zip(self.dkv, got):
            acc.index_add_(1, idx, g.to(acc.dtype))


class RingAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: RingSpec):  # type: ignore[override]
        comm = spec.comm
        groups = q.shape[1] // k.shape[1]
        n_local = q.shape[2]
        views_only, empty = _views_only(spec, n_local), _first_covers(spec, n_local)
        out_acc = _new(q.shape, torch.float32, q.device, None if empty else 0.0, views_only)
        lse_acc = _new(q.shape[:3], torch.float32, q.device, None if empty else float("-inf"), views_only)
        if spec.pattern is None:
            kv = [k, v]  # sent as two messages: no packed copy of the shard
            last = comm.world_size - 1
            for step in range(last + 1):
                pending = comm.exchange(kv) if step < last else None
                comm.start_compute()
                for i, block in enumerate(spec.step_blocks(step, n_local)):
                    _forward_block(spec, q, kv, block, groups, out_acc, lse_acc, first=step == 0 and i == 0)
                if pending is not None:
                    kv = pending.wait()
        else:
            rounds = spec.peer_rounds(n_local)
            qf, kf, vf = _flat_forms(views_only, q, k, v)
            pending = _post_kv(comm, rounds[0], kf, vf) if rounds else None
            comm.start_compute()
            for i, block in enumerate(spec.step_blocks(0, n_local)):  # our own shard: no message
                qb, kvb = _pick(block, (q, [k, v]), (qf, [kf, vf]))
                _forward_block(spec, qb, kvb, block, groups, out_acc, lse_acc, first=i == 0)
            for i, rd in enumerate(rounds):
                assert pending is not None
                kv = pending.wait()
                pending = _post_kv(comm, rounds[i + 1], kf, vf) if i + 1 < len(rounds) else None
                comm.start_compute()
                for block in rd.blocks:
                    _forward_block(spec, qf, kv, block, groups, out_acc, lse_acc)
                del kv
        out = out_acc.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse_acc)
        ctx.spec = spec
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        spec: RingSpec = ctx.spec
        seq_major = _views_only(spec, q.shape[2])
        # out and dout in one layout: the kernels' backward reads them side by side.
        dout = dout.to(q.dtype)
        dout = dout.transpose(1, 2).contiguous().transpose(1, 2) if seq_major else dout.contiguous()
        dq_acc = _new(q.shape, spec.grad_dtype, q.device, None if _first_covers(spec, q.shape[2]) else 0.0,
                      seq_major)
        if spec.pattern is None:
            dk, dv = _dense_backward(spec, dout, q, k, v, out, lse, dq_acc)
        else:
            dk, dv = _pattern_backward(spec, dout, q, k, v, out, lse, dq_acc)
        return dq_acc.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def _dense_backward(spec: RingSpec, dout, q, k, v, out, lse, dq_acc) -> list[torch.Tensor]:
    """K/V turn round the ring again; the dK/dV accumulator travels with them back to its owner."""
    comm, world = spec.comm, spec.comm.world_size
    groups = q.shape[1] // k.shape[1]
    n_local = q.shape[2]
    kv = [k, v]
    dkv: list[torch.Tensor] = []  # the travelling dK/dV accumulator of this step's K/V owner
    pending_dkv = None
    last = world - 1
    for step in range(last + 1):
        pending_kv = comm.exchange(kv) if step < last else None
        comm.start_compute()
        adds = [
            _backward_block(spec, dout, q, kv, out, lse, block, groups, dq_acc)
            for block in spec.step_blocks(step, n_local)
        ]
        # The accumulator for this step's K/V owner arrives from the previous rank, which
        # worked on the same K/V one step earlier; add ours and pass it on.
        if pending_dkv is not None:
            dkv = pending_dkv.wait()
        else:
            dkv = [torch.zeros(t.shape, dtype=spec.grad_dtype, device=t.device) for t in (k, v)]
        for add in adds:
            add(dkv)
        del adds
        if last > 0:
            pending_dkv = comm.exchange(dkv)  # on to the next rank; after the last step: home
        if pending_kv is not None:
            kv = pending_kv.wait()
    if pending_dkv is not None:
        dkv = pending_dkv.wait()  # after a full turn: our own dK/dV
    return dkv


def _pattern_backward(spec: RingSpec, dout, q, k, v, out, lse, dq_acc) -> list[torch.Tensor]:
    """The forward's rounds again; each round's compact dK/dV go straight back to their owner (rank -
    shift) while we receive, from rank + shift, what it computed for the rows we sent it."""
    comm = spec.comm
    groups = q.shape[1] // k.shape[1]
    n_local = q.shape[2]
    rounds = spec.peer_rounds(n_local)
    views_only, empty = _views_only(spec, n_local), _first_covers(spec, n_local)
    dkv = [_new(t.shape, spec.grad_dtype, t.device, None if empty else 0.0, views_only) for t in (k, v)]
    qf, kf, vf = _flat_forms(views_only, q, k, v)
    pending_kv = _post_kv(comm, rounds[0], kf, vf) if rounds else None
    comm.start_compute()
    for i, block in enumerate(spec.step_blocks(0, n_local)):
        qb, kvb = _pick(block, (q, [k, v]), (qf, [kf, vf]))
        _backward_block(spec, dout, qb, kvb, out, lse, block, groups, dq_acc, first=empty and i == 0)(dkv)
    # Contributions land on flat (B, H * L, D) rows; with rounds dkv are contiguous (B, H, L, D).
    home = GradsHome(comm, [t.view(t.shape[0], -1, t.shape[3]) for t in dkv] if rounds else [])
    for i, rd in enumerate(rounds):
        assert pending_kv is not None
        kv = pending_kv.wait()
        pending_kv = _post_kv(comm, rounds[i + 1], kf, vf) if i + 1 < len(rounds) else None
        comm.start_compute()
        acc = None
        if rd.recv_rows.numel():
            acc = [torch.zeros(t.shape, dtype=spec.grad_dtype, device=t.device) for t in kv]
            for block in rd.blocks:
                _backward_block(spec, dout, qf, kv, out, lse, block, groups, dq_acc)(acc)
        del kv
        home.post(rd.shift, acc, rd.send_rows)
    home.finish()
    return dkv


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: RingSpec) -> torch.Tensor:
    """Ring attention on ``(batch, heads, n_local, head_dim)`` shards (validated by the caller)."""
    return RingAttentionFunction.apply(q, k, v, spec)
