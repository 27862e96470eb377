"""The row-exchange plan of a pattern: which K/V rows each rank sends to which, and their return trip.

A pattern does not turn the whole ring. Its work with a rank's own shard is local; only the K/V rows
that another rank's blocks read travel, straight to that rank, in rounds: in round ``t`` every rank
``a`` sends to ``a + t`` and receives from ``a - t`` (the rounds are the shifts in which any rank reads
another's K/V, and every rank runs all of them, posting nothing where it has nothing to move, so the
messages between two ranks are posted in the same order on both sides). Everything here is derived
from the pattern, the layout and the shapes alone, identically on every rank.

Rows are flat ``kv_head * L + row`` indices: a dilated head reads only its own offset's rows, so a
round moves exactly the (head, row) pairs read. :meth:`ExchangePlan.sequence_rounds` gives the same
rounds as sequence rows for consumers that move whole ``(H_kv, D)`` rows (block-sparse patterns read
the same rows in every head). The plan is built by the layer and consumed by both the engine's
peer rounds (:mod:`.peer_ring`) and the gathered block-sparse path (:mod:`.gathered`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..comm.ring import PendingExchange, RingComm
from ..patterns.blocks import IndexBlock, Pattern, ViewBlock
from .call import RingCall

PatternBlock = IndexBlock | ViewBlock


@dataclass(frozen=True)
class PeerRound:
    """One round: send our ``send_rows`` to ``rank + shift``; receive ``recv_rows`` of ``rank - shift``
    (either may be empty), which ``blocks`` read from the compact received buffer."""

    shift: int
    send_rows: torch.Tensor  # sorted flat rows of our K/V that rank + shift reads
    recv_rows: torch.Tensor  # sorted flat rows of rank - shift's K/V that our blocks read
    blocks: tuple[IndexBlock, ...]


@dataclass(frozen=True)
class RowRound:
    """A :class:`PeerRound` as sequence rows (whole ``(H_kv, D)`` rows move)."""

    shift: int
    send_rows: torch.Tensor  # (S,) our local rows that rank + shift reads
    recv_rows: torch.Tensor  # (R,) local rows of rank - shift that we read


@dataclass(frozen=True)
class ExchangePlan:
    own_blocks: tuple[PatternBlock, ...]  # our queries against our own shard
    rounds: tuple[PeerRound, ...]
    n_local: int
    heads: int
    kv_heads: int

    @property
    def views_only(self) -> bool:
        """All work is strided views of our own shard: no gathers, no packing, no messages."""
        return not self.rounds and all(isinstance(b, ViewBlock) for b in self.own_blocks)

    @property
    def first_covers(self) -> bool:
        """The first block writes every accumulator row: accumulators start empty (no zero fill)
        and that block's outputs are copied in, not added."""
        if not self.views_only or not self.own_blocks or self.heads != self.kv_heads:
            return False
        first = self.own_blocks[0]
        return isinstance(first, ViewBlock) and first.covers(self.heads, self.n_local)

    def sequence_rounds(self) -> list[RowRound]:
        """The rounds as sequence rows; a clear error where K/V heads read different rows."""
        return [RowRound(rd.shift, self._same_in_every_head(rd.send_rows, rd.shift),
                         self._same_in_every_head(rd.recv_rows, rd.shift)) for rd in self.rounds]

    def _same_in_every_head(self, flat: torch.Tensor, shift: int) -> torch.Tensor:
        hk, n = self.kv_heads, self.n_local
        per = flat.view(hk, -1) if flat.numel() % hk == 0 else None
        if per is None or not bool((per - torch.arange(hk)[:, None] * n == per[:1]).all()):
            raise ValueError(
                f"moving whole rows needs every K/V head to read the same rows (round shift={shift}, "
                f"{flat.numel()} rows over {hk} heads); use a kernel backend ('auto' on CPU) instead"
            )
        return per[0]


def _indexed(blocks: list[PatternBlock], n_local: int) -> list[IndexBlock]:
    """Blocks as flat indices: K/V from another rank arrive packed, not as a shard."""
    return [b.index_block(n_local, n_local) if isinstance(b, ViewBlock) else b for b in blocks]


def _rows_read(blocks: list[IndexBlock]) -> torch.Tensor:
    if not blocks:
        return torch.empty(0, dtype=torch.int64)
    return torch.unique(torch.cat([b.kv_index.flatten() for b in blocks]))  # sorted


def build_exchange_plan(pattern: Pattern, call: RingCall, n_local: int) -> ExchangePlan:
    """This rank's plan (see the module docstring)."""
    world, rank = call.comm.world_size, call.comm.rank
    chunk_len = n_local // call.layout.chunks_per_rank

    def blocks(q_rank: int, kv_rank: int) -> list[PatternBlock]:
        return list(pattern.plan(call.chunks(q_rank), call.chunks(kv_rank), chunk_len, n_local * world,
                                 call.causal, call.heads, call.kv_heads))

    rounds = []
    for t in range(1, world):
        if not any(blocks(a, (a - t) % world) for a in range(world)):
            continue
        mine = _indexed(blocks(rank, (rank - t) % world), n_local)
        recv_rows = _rows_read(mine)
        read = tuple(IndexBlock(b.q_index, torch.searchsorted(recv_rows, b.kv_index), b.causal) for b in mine)
        send_rows = _rows_read(_indexed(blocks((rank + t) % world, rank), n_local))
        rounds.append(PeerRound(t, send_rows, recv_rows, read))
    return ExchangePlan(tuple(blocks(rank, rank)), tuple(rounds), n_local, call.heads, call.kv_heads)


def post_rows(comm: RingComm, rd: PeerRound, k: torch.Tensor, v: torch.Tensor) -> PendingExchange:
    """Send our rows that rank + shift reads as compact ``(B, 1, M, D)``; receive the rows we read."""
    send = [_pack(t, rd.send_rows) for t in (k, v)] if rd.send_rows.numel() else None
    recv = [_compact_like(t, rd.recv_rows.numel()) for t in (k, v)] if rd.recv_rows.numel() else None
    return comm.exchange_with(send, comm.rank + rd.shift, recv, comm.rank - rd.shift)


def _pack(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Flat rows ``rows`` of ``x`` (B, H, L, D) as a compact (B, 1, M, D)."""
    b, h, n, d = x.shape
    return x.reshape(b, h * n, d).index_select(1, rows.to(x.device)).unsqueeze(1)


def _compact_like(x: torch.Tensor, m: int) -> torch.Tensor:
    return torch.empty((x.shape[0], 1, m, x.shape[3]), dtype=x.dtype, device=x.device)


class GradsHome:
    """The return trip in backward: each round sends the compact dK/dV of the rows we read back to
    their owner (rank - shift) and receives, from rank + shift, what it computed for the rows we
    sent it; those are added into ``dkv`` while the next round runs.

    ``dkv`` are ``(B, rows, ...)``: a contribution of M rows arrives as ``(B, M, ...)`` and lands on the
    rows of dim 1 that :meth:`post` names (flat ``head * L + row`` rows of ``(B, H * L, D)`` views for
    the peer rounds; sequence rows of ``(B, L, H, D)`` for the gathered path).
    """

    def __init__(self, comm: RingComm, dkv: list[torch.Tensor], wire_dtype: torch.dtype | None = None,
                 add_rows: Callable[[slice, list[torch.Tensor]], None] | None = None):
        # wire_dtype: what contributions travel in (default: dkv's). A kernel's own bf16 gradients
        # travel as bf16: widening them before the send adds bytes, not precision.
        # add_rows(rows, got): where contributions for a run of rows go (default: added into dkv);
        # dkv then only shapes the receive buffers.
        self.comm, self.dkv, self.wire_dtype, self.add_rows = comm, dkv, wire_dtype, add_rows
        self._returning: tuple[PendingExchange, list[torch.Tensor | slice]] | None = None

    def post(self, shift: int, grads: list[torch.Tensor] | None, home: torch.Tensor | slice | list[slice],
             dtype: torch.dtype | list[torch.dtype] | None = None) -> None:
        """Send this round's compact ``grads`` (None: nothing read) to rank - shift and receive the
        contributions for our rows ``home`` (an index, a ``slice`` where they are one run, or a list of
        runs, one contribution each: then they are added in place, no scatter), in ``dtype`` (one per
        run of a list; default: the wire dtype)."""
        comm = self.comm
        runs = home if isinstance(home, list) else [home]
        dtypes = dtype if isinstance(dtype, list) else [dtype] * len(runs)
        recv, landing = [], []
        for rows, dt in zip(runs, dtypes):
            m = rows.stop - rows.start if isinstance(rows, slice) else rows.numel()
            if m:
                recv += [t.new_empty((t.shape[0], m, *t.shape[2:]), dtype=dt or self.wire_dtype or t.dtype)
                         for t in self.dkv]
                landing.append(rows)
        pending = comm.exchange_with(grads, comm.rank - shift, recv or None, comm.rank + shift)
        self._land()
        self._returning = (pending, landing)

    def finish(self) -> list[torch.Tensor]:
        self._land()
        return self.dkv

    def _land(self) -> None:
        if self._returning is None:
            return
        pending, runs = self._returning
        self._returning = None
        got = pending.wait()
        per = len(self.dkv)
        for i, rows in enumerate(runs):
            self._add(rows, got[i * per:(i + 1) * per])

    def _add(self, rows: torch.Tensor | slice, got: list[torch.Tensor]) -> None:
        if isinstance(rows, slice):
            if self.add_rows is not None:
                self.add_rows(rows, got)
                return
            for acc, g in zip(self.dkv, got):
                acc[:, rows].add_(g)
            return
        idx = rows.to(self.dkv[0].device)
        for acc, g in zip(self.dkv, got):
            acc.index_add_(1, idx, g.to(acc.dtype))
