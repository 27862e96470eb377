"""Index blocks: the unit of work a pattern hands to the ring engine.

An :class:`IndexBlock` names, for ``G`` groups (segments, offsets, query blocks) folded into the
kernel's batch dimension, ``h`` heads and ``m`` rows each, which query rows attend to which key rows.
Indices are flat: ``head * L + row`` into a ``(heads, L)`` shard, so one ``index_select`` gathers a
strided head subset and a strided row subset at once, and grouped-query K/V need no head expansion
(the key index simply points at the shared K/V head).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Protocol

import torch


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
    ) -> list[IndexBlock]: ...

    def counts(self, n: int, heads: int, device: torch.device | None = None) -> torch.Tensor: ...

    def error(self, n_global: int, chunk_len: int, heads: int) -> str | None: ...


class CachedPattern:
    """A pattern whose plans are pure functions of their arguments, so each is built once."""

    def __init__(self) -> None:
        self._cache: dict[tuple, list[IndexBlock]] = {}

    def plan(self, q_chunks, kv_chunks, chunk_len, n_global, causal, heads, kv_heads) -> list[IndexBlock]:
        key = (q_chunks, kv_chunks, chunk_len, n_global, causal, heads, kv_heads)
        if key not in self._cache:
            self._cache[key] = self._plan(*key)
        return self._cache[key]

    def _plan(self, q_chunks, kv_chunks, chunk_len, n, causal, heads, kv_heads) -> list[IndexBlock]:
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
