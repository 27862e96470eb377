"""Packed documents in the ring: every rank's document ids, and the blocks they leave to compute.

:class:`RingDocuments` holds the ids of every rank's rows (made once per step by the shard plan,
:mod:`ring_plugin.shard_plan`) and hands the dense ring :class:`DocumentBlock` s: the dense plan's
blocks minus those whose query and key rows share no document, each carrying its rows' ids so the
kernel attends within documents only (:mod:`ring_plugin.ops.document_kernels`).
"""

from __future__ import annotations

import torch

from ..attention.plan import Block
from ..layout import ShardLayout, merge_adjacent_ranks
from ..ops.document_kernels import VarlenRuns, varlen_runs


class DocumentBlock:
    """A dense block restricted to documents: ``q_docs``/``k_docs`` are its rows' ids (B, L), CPU."""

    __slots__ = ("q", "kv", "causal", "q_docs", "k_docs", "_runs")

    def __init__(self, q: slice, kv: slice, causal: bool, q_docs: torch.Tensor, k_docs: torch.Tensor):
        self.q, self.kv, self.causal, self.q_docs, self.k_docs = q, kv, causal, q_docs, k_docs
        self._runs: tuple[str, VarlenRuns] | None = None

    def runs(self, device: torch.device) -> VarlenRuns:
        """The block's documents as varlen runs on ``device``, built once: a step's layers, forward and
        backward run on one device and share them."""
        if self._runs is None or self._runs[0] != str(device):
            self._runs = (str(device), varlen_runs(self.q_docs, self.k_docs, device))
        return self._runs[1]


class RingDocuments:
    """Document ids of every rank's rows, ``by_rank[r]`` rank r's (B, n_local) in local order (CPU),
    and the layout they were sharded in.

    Every layer of a step, forward and backward, and the plans of the peers' steps ask for the same
    blocks: each (query rank, key rank, dense blocks) is restricted once and kept here, for the life
    of this object (one step: at most one entry per pair of ranks and causality)."""

    def __init__(self, by_rank: torch.Tensor, layout: ShardLayout):
        self.by_rank = by_rank  # (world, B, n_local) int64
        self.layout = layout
        self._blocks: dict[tuple, list[DocumentBlock]] = {}
        self._merged: RingDocuments | None = None

    def merge_adjacent_ranks(self, group: int) -> RingDocuments:
        """The ids as the ring of :func:`~ring_plugin.layout.merge_adjacent_ranks` holds them (Ulysses
        groups of ``group`` ranks): each merged rank's rows in ascending global order (built once)."""
        if group == 1:
            return self
        if self._merged is None or self._merged.layout.world_size != self.layout.world_size // group:
            layout = merge_adjacent_ranks(self.layout, group)
            ids = global_ids(self.by_rank, self.layout)
            n_local = ids.shape[1] // layout.world_size
            self._merged = RingDocuments(
                torch.stack([ids[:, layout.positions(n_local, r)] for r in range(layout.world_size)]), layout)
        return self._merged

    def blocks(self, dense: list[Block], q_rank: int, kv_rank: int) -> list[DocumentBlock]:
        """``dense`` restricted to documents: blocks where no sample shares a document are dropped,
        and the others cut to the run of query rows that have keys in them and the run of key rows
        that have queries (causal blocks are squares of the same positions and stay whole). A cut
        block costs less kernel work and sends fewer dK/dV rows home."""
        key = (q_rank, kv_rank, tuple((b.q.start, b.q.stop, b.kv.start, b.kv.stop, b.causal) for b in dense))
        if key not in self._blocks:
            self._blocks[key] = [c for b in dense if (c := self._restrict(b, q_rank, kv_rank)) is not None]
        return self._blocks[key]

    def _restrict(self, b: Block, q_rank: int, kv_rank: int) -> DocumentBlock | None:
        q_ids, kv_ids = self.by_rank[q_rank], self.by_rank[kv_rank]
        q_cut, kv_cut = _shared_hull(q_ids[:, b.q], kv_ids[:, b.kv])
        if q_cut is None:
            return None
        q_rows, kv_rows = b.q, b.kv
        if not b.causal:
            q_rows = slice(b.q.start + q_cut[0], b.q.start + q_cut[1])
            kv_rows = slice(b.kv.start + kv_cut[0], b.kv.start + kv_cut[1])
        return DocumentBlock(q_rows, kv_rows, b.causal, q_ids[:, q_rows], kv_ids[:, kv_rows])


def _shared_hull(qd: torch.Tensor, kd: torch.Tensor) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """The smallest runs of query and key rows (over every sample) holding each row whose document
    both sides have, or ``(None, None)`` when no sample shares a document. Ids ascend along rows,
    so this looks only at each side's few distinct documents, not at every pair of rows."""
    q_cut = kv_cut = None
    for a, b in zip(qd, kd):
        docs_a, docs_b = a.unique_consecutive(), b.unique_consecutive()
        shared = docs_a[torch.isin(docs_a, docs_b)]
        if not shared.numel():
            continue
        ends = shared[[0, -1]]
        q_run = (int(torch.searchsorted(a, ends[0])), int(torch.searchsorted(a, ends[1], right=True)))
        kv_run = (int(torch.searchsorted(b, ends[0])), int(torch.searchsorted(b, ends[1], right=True)))
        q_cut = q_run if q_cut is None else (min(q_cut[0], q_run[0]), max(q_cut[1], q_run[1]))
        kv_cut = kv_run if kv_cut is None else (min(kv_cut[0], kv_run[0]), max(kv_cut[1], kv_run[1]))
    return q_cut, kv_cut


def global_ids(by_rank: torch.Tensor, shards: ShardLayout) -> torch.Tensor:
    """The global (B, n) ids from every rank's shard in ``shards``."""
    world, batch, n_local = by_rank.shape
    chunk = n_local // shards.chunks_per_rank
    pieces = by_rank.view(world, batch, shards.chunks_per_rank, chunk)
    out = torch.empty(batch, shards.num_chunks, chunk, dtype=by_rank.dtype)
    for r, owned in enumerate(shards.chunks):
        out[:, list(owned)] = pieces[r]
    return out.view(batch, -1)
