"""Index blocks: the unit of work a pattern hands to the ring engine.

An :class:`IndexBlock` names, for ``G`` groups (segments, offsets, query blocks) folded into the
kernel's batch dimension, ``h`` heads and ``m`` rows each, which query rows attend to which key rows.
Indices are flat: ``head * L + row`` into a ``(heads, L)`` shard, so one ``index_select`` gathers a
strided head subset and a strided row subset at once, and grouped-query K/V need no head expansion
(the key index simply points at the shared K/V head).

A :class:`ViewBlock` is the same idea for rows that form a regular grid (segments at a fixed stride,
rows at a fixed step, heads at a fixed step): the kernel reads strided *views* of the shard and its
outputs are merged through views of the accumulators, so nothing is gathered or scattered.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Protocol

import torch

from ..cache import BoundedCache


@dataclass(frozen=True, eq=False)
class IndexBlock:
    q_index: torch.Tensor  # (G, h, m_q) flat indices into the query shard's (heads * L_q)
    kv_index: torch.Tensor  # (G, h, m_k) flat indices into the K/V shard's (kv_heads * L_k)
    causal: bool  # square block whose query and key positions are the same set (causal by position)

    @property
    def groups(self) -> int:
        return self.q_index.shape[0]

    def on(self, device: torch.device) -> IndexBlock:
        """This block with its indices on ``device``: plans are built (and cached) on the CPU, and
        each block is copied to an accelerator once, not at every call."""
        if self.q_index.device == device:
            return self
        copies = self.__dict__.setdefault("_copies", {})  # frozen: no setattr, but __dict__ is ours
        if device not in copies:
            copies[device] = IndexBlock(self.q_index.to(device), self.kv_index.to(device), self.causal)
        return copies[device]


@dataclass(frozen=True)
class ViewBlock:
    """``groups`` x ``heads`` x rows blocks on a regular grid of a ``(heads, L)`` shard.

    Element ``(g, a, i)`` of the query side is head ``head_start + a * head_step[0]``, row
    ``q_start + g * group_stride + a * head_step[1] + i * row_step``; the key side is the same with
    ``kv_start``/``kv_rows``. ``head_step = (1, 1)`` walks heads and rows together, which is how
    dilated offsets ``j mod r`` of consecutive heads become one kernel call. Query and key heads
    are the same (no grouped-query sharing). Groups fold into the kernel's batch; ``causal`` marks
    square blocks whose query and key rows are the same positions.
    """

    groups: int
    group_stride: int
    heads: int
    head_start: int
    head_step: tuple[int, int]
    q_start: int
    q_rows: int
    kv_start: int
    kv_rows: int
    row_step: int
    causal: bool

    def view(self, x: torch.Tensor, start: int, rows: int) -> torch.Tensor:
        """The ``(B, groups, heads, rows[, D])`` view of ``x`` (``(B, H, L[, D])``, any strides)."""
        sb, sh, sl = x.stride()[:3]
        tail = tuple(x.shape[3:])
        dh, dr = self.head_step
        return x.as_strided(
            (x.shape[0], self.groups, self.heads, rows, *tail),
            (sb, self.group_stride * sl, dh * sh + dr * sl, self.row_step * sl, *x.stride()[3:]),
            x.storage_offset() + self.head_start * sh + start * sl,
        )

    def q_view(self, x: torch.Tensor) -> torch.Tensor:
        return self.view(x, self.q_start, self.q_rows)

    def kv_view(self, x: torch.Tensor) -> torch.Tensor:
        return self.view(x, self.kv_start, self.kv_rows)

    def covers(self, heads: int, length: int) -> bool:
        """Whether the block's query rows, and its key rows, are every (head, row) of a ``(heads,
        length)`` shard exactly once (e.g. a rate-1 dilated pair): its outputs can initialise the
        accumulators instead of being added to zeros."""
        return (self.heads == heads and self.head_start == 0 and self.head_step == (1, 0) and self.row_step == 1
                and self.q_start == self.kv_start == 0 and self.q_rows == self.kv_rows == self.group_stride
                and self.groups * self.group_stride == length)

    def index_block(self, len_q: int, len_kv: int) -> IndexBlock:
        """The same block as flat indices (for K/V that arrive packed from another rank)."""
        g = torch.arange(self.groups)[:, None, None] * self.group_stride
        a = torch.arange(self.heads)[None, :, None]
        heads = self.head_start + a * self.head_step[0]

        def flat(start: int, rows: int, length: int) -> torch.Tensor:
            row = start + g + a * self.head_step[1] + torch.arange(rows)[None, None, :] * self.row_step
            return heads * length + row

        return IndexBlock(flat(self.q_start, self.q_rows, len_q), flat(self.kv_start, self.kv_rows, len_kv),
                          self.causal)


class Pattern(Protocol):
    """What the engine and the oracle need from a pattern."""

    def plan(
        self,
        q_chunks: tuple[int, ...],
        kv_chunks: tuple[int, ...],
        chunk_len: int,
        n_global: int,
        causal: bool,
        heads: int,
        kv_heads: int,
    ) -> list[IndexBlock | ViewBlock]: ...

    def counts(self, n: int, heads: int, device: torch.device | None = None) -> torch.Tensor: ...

    def keys_per_query(self, n: int) -> float: ...

    def error(self, n_global: int, chunk_len: int, heads: int) -> str | None: ...


class CachedPattern:
    """A pattern whose plans are pure functions of their arguments, so each is built once (bounded)."""

    def __init__(self) -> None:
        self._cache: BoundedCache[list[IndexBlock | ViewBlock]] = BoundedCache(256)

    def plan(self, q_chunks, kv_chunks, chunk_len, n_global, causal, heads, kv_heads) -> list[IndexBlock | ViewBlock]:
        key = (q_chunks, kv_chunks, chunk_len, n_global, causal, heads, kv_heads)
        return self._cache.get(key, lambda: self._plan(*key))

    def _plan(self, q_chunks, kv_chunks, chunk_len, n, causal, heads, kv_heads) -> list[IndexBlock | ViewBlock]:
        raise NotImplementedError


Unit = tuple[tuple[int, ...], torch.Tensor, torch.Tensor]  # (query heads, query rows, key rows)


class BlockBuilder:
    """Collects units and folds those with the same key and shape into one block (one kernel call).

    Units under one key must cover disjoint (head, query row) sets: a block's outputs are merged
    with ``index_copy_``, which would drop duplicates.
    """

    def __init__(self, heads: int, kv_heads: int, len_q: int, len_kv: int):
        self.groups = heads // kv_heads
        self.len_q, self.len_kv = len_q, len_kv
        self._units: dict[Hashable, list[Unit]] = defaultdict(list)

    def add(self, key: Hashable, heads: tuple[int, ...], q_rows: torch.Tensor, kv_rows: torch.Tensor,
            causal: bool) -> None:
        if q_rows.numel() == 0 or kv_rows.numel() == 0:
            return
        self._units[(key, causal, len(heads), q_rows.numel(), kv_rows.numel())].append((heads, q_rows, kv_rows))

    def blocks(self) -> list[IndexBlock]:
        out: list[IndexBlock] = []
        for (_, causal, *_shape), units in self._units.items():
            q_idx, kv_idx = [], []
            for heads, q_rows, kv_rows in units:
                h = torch.tensor(heads, dtype=torch.int64)
                q_idx.append(h[:, None] * self.len_q + q_rows[None, :])
                kv_idx.append((h // self.groups)[:, None] * self.len_kv + kv_rows[None, :])
            out.append(IndexBlock(torch.stack(q_idx), torch.stack(kv_idx), causal))
        return out


def chunk_pairs(q_chunks: tuple[int, ...], kv_chunks: tuple[int, ...], chunk_len: int, causal: bool):
    """(local q offset, global q start, local kv offset, global kv start, same chunk) of every chunk pair
    that is not fully masked by causality."""
    for qi, qc in enumerate(q_chunks):
        for ki, kc in enumerate(kv_chunks):
            if causal and kc > qc:
                continue
            yield qi * chunk_len, qc * chunk_len, ki * chunk_len, kc * chunk_len, qc == kc
