"""Packed documents in the ring: every rank's document ids, and the blocks they leave to compute.

A call with ``document_ids`` all-gathers the (small) int64 ids of every rank's rows once, checks that
they form one non-decreasing global sequence (the same verdict on every rank, since all ranks judge
the same gathered ids), and hands the dense ring :class:`DocumentBlock` s: the dense plan's blocks
minus those whose query and key rows share no document, each carrying its rows' ids so the kernel
attends within documents only (:mod:`ring_plugin.ops.document_kernels`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..cache import BoundedCache
from ..documents import document_ids_error
from ..layout import ShardLayout, merge_adjacent_ranks
from ..ops.document_kernels import VarlenRuns, varlen_runs
from .plan import Block


@dataclass(frozen=True, eq=False)
class DocumentBlock:
    """A dense block restricted to documents: ``q_docs``/``k_docs`` are its rows' ids (B, L), CPU."""

    q: slice
    kv: slice
    causal: bool
    q_docs: torch.Tensor
    k_docs: torch.Tensor
    _runs: dict = field(default_factory=dict, repr=False)  # device -> VarlenRuns, built once per call

    def runs(self, device: torch.device) -> VarlenRuns:
        """The block's documents as varlen runs on ``device`` (forward and backward share them)."""
        key = str(device)
        if key not in self._runs:
            self._runs[key] = varlen_runs(self.q_docs, self.k_docs, device)
        return self._runs[key]


@dataclass(frozen=True)
class RingDocuments:
    """Document ids of every rank's rows, ``by_rank[r]`` rank r's (B, n_local) in local order (CPU),
    and the layout they were sharded in (for ``balanced``, rebuilt from the ids themselves).

    A call's forward, backward and the plans of its peers' steps, and every layer that sees the same
    ids (:func:`gather_documents` keeps them by content), ask for the same blocks: they are built once
    (``_plans``) and, with them, their varlen runs."""

    by_rank: torch.Tensor  # (world, B, n_local) int64
    layout: ShardLayout
    _plans: dict = field(default_factory=dict, repr=False, compare=False)  # blocks and merged rings, built once

    def use_error(self, q: torch.Tensor, layout: str, world_size: int) -> str | None:
        """What is wrong with using these (prepared) ids for ``q`` on a ring of ``world_size`` ranks in
        ``layout``, or None."""
        world, batch, n_local = self.by_rank.shape
        if (world, self.layout.name) != (world_size, layout):
            return (f"document_ids were prepared for a ring of {world} in layout {self.layout.name!r}; this layer's "
                    f"ring has {world_size} ranks in layout {layout!r}")
        if (batch, n_local) != tuple(q.shape[:2]):
            return (f"document_ids were prepared for (batch, n_local) = {(batch, n_local)}, q has "
                    f"{tuple(q.shape[:2])}")
        return None

    def merge_adjacent_ranks(self, group: int) -> RingDocuments:
        """The ids as the ring of :func:`~ring_plugin.layout.merge_adjacent_ranks` holds them (Ulysses
        groups of ``group`` ranks): each merged rank's rows in ascending global order (built once)."""
        key = ("merged", group)
        if key not in self._plans:
            self._plans[key] = self._merged(group)
        return self._plans[key]

    def _merged(self, group: int) -> RingDocuments:
        layout = merge_adjacent_ranks(self.layout, group)
        ids = _global_ids(self.by_rank, self.layout)
        n_local = ids.shape[1] // layout.world_size
        return RingDocuments(torch.stack([ids[:, layout.positions(n_local, r)] for r in range(layout.world_size)]),
                             layout)

    def blocks(self, dense: list[Block], q_rank: int, kv_rank: int) -> list[DocumentBlock]:
        """``dense`` restricted to documents: blocks where no sample shares a document are dropped,
        and the others cut to the run of query rows that have keys in them and the run of key rows
        that have queries (causal blocks are squares of the same positions and stay whole). A cut
        block costs less kernel work and sends fewer dK/dV rows home."""
        key = (q_rank, kv_rank, tuple((b.q.start, b.q.stop, b.kv.start, b.kv.stop, b.causal) for b in dense))
        if key not in self._plans:
            self._plans[key] = [c for b in dense if (c := self._restrict(b, q_rank, kv_rank)) is not None]
        return self._plans[key]

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


def layer_document_ids_error(ids: object, q: torch.Tensor, check_order: bool = True) -> str | None:
    """This rank's check of its ``document_ids`` shard: the library's check of document ids, and the
    shape of ``q``'s first two dims ``(batch, n_local)`` (``check_order=False``: not their order,
    which :func:`document_ids_decrease` then checks on the device)."""
    error = document_ids_error(ids, check_order=check_order)
    if error is None and tuple(ids.shape) != tuple(q.shape[:2]):  # type: ignore[union-attr]
        error = (f"document_ids must have shape (batch, n_local) = {tuple(q.shape[:2])} like q's first two dims, "
                 f"got {tuple(ids.shape)}")  # type: ignore[union-attr]
    return error


def document_ids_decrease(ids: torch.Tensor) -> torch.Tensor:
    """A 0-dim bool tensor on the ids' device: whether they decrease anywhere along a row (no host sync)."""
    if ids.shape[1] < 2:
        return torch.zeros((), dtype=torch.bool, device=ids.device)
    return (ids[:, 1:] < ids[:, :-1]).any()


def gather_documents(ids: torch.Tensor, group: dist.ProcessGroup | None, layout: str,
                     world_size: int) -> RingDocuments:
    """Every rank's ids (one all-gather), checked to be one non-decreasing global sequence.

    Raises the same ``ValueError`` on every rank (each judges the same gathered ids).
    """
    ids = ids.contiguous()
    if group is None or world_size == 1:
        by_rank = ids.cpu()[None]
    else:
        parts = [torch.empty_like(ids) for _ in range(world_size)]
        dist.all_gather(parts, ids, group=group)
        by_rank = torch.stack(parts).cpu()
    # Every layer of a step sees the same ids: the checked ids, their layout and the blocks planned
    # from them are kept by content, which every rank judges alike (the all-gather still runs each call).
    # The key summarises the ids (shape, sum); a kept entry is used only if its ids are these, which is an
    # exact test and cheaper than hashing them.
    key = (layout, tuple(by_rank.shape), int(by_rank.sum()))
    return _CHECKED.get(key, lambda: _checked(by_rank, layout, world_size),
                        valid=lambda docs: torch.equal(docs.by_rank, by_rank))


def _checked(by_rank: torch.Tensor, layout: str, world_size: int) -> RingDocuments:
    shards = _balanced_layout(by_rank) if layout == "balanced" else ShardLayout.named(layout, world_size)
    if bool((_global_ids(by_rank, shards).diff(dim=1) < 0).any()):
        raise ValueError(
            "document_ids of the ring's shards do not form one non-decreasing sequence in the "
            f"{layout!r} layout: each rank must pass its own shard of the same global document_ids"
        )
    return RingDocuments(by_rank, shards)


def _global_ids(by_rank: torch.Tensor, shards: ShardLayout) -> torch.Tensor:
    world, batch, n_local = by_rank.shape
    chunk = n_local // shards.chunks_per_rank
    pieces = by_rank.view(world, batch, shards.chunks_per_rank, chunk)
    out = torch.empty(batch, shards.num_chunks, chunk, dtype=by_rank.dtype)
    for r, owned in enumerate(shards.chunks):
        out[:, list(owned)] = pieces[r]
    return out.view(batch, -1)


_CHECKED: BoundedCache[RingDocuments] = BoundedCache(8)


def _balanced_layout(by_rank: torch.Tensor) -> ShardLayout:
    """The balanced layout the shards were cut in, rebuilt from the shards alone.

    For each chunk count the balancer could have chosen, cut every shard into its chunks and put the
    chunks in global order: ids never decrease, so ordering chunks by their (first, last) ids per
    sample is the global order, up to chunks that hold one document only, which are interchangeable
    as ids. The balancer, a pure function of those global ids, then names each chunk's position; the
    count whose layout reproduces every shard is the one used.
    """
    from ..balance import balanced_chunks, chunk_counts

    world, batch, n_local = by_rank.shape
    for c in chunk_counts(world * n_local, world):
        if n_local % c:
            continue
        chunk = n_local // c
        pieces = by_rank.view(world, batch, c, chunk).permute(0, 2, 1, 3).reshape(world * c, batch, chunk)
        key = torch.stack([pieces[:, :, 0], pieces[:, :, -1]], dim=2).reshape(world * c, -1).tolist()
        order = sorted(range(world * c), key=lambda i: key[i])
        global_ids = pieces[order].permute(1, 0, 2).reshape(batch, -1)
        if bool((global_ids.diff(dim=1) < 0).any()):
            continue  # not this chunk count: its chunks do not line up into one sequence
        shards = ShardLayout("balanced", balanced_chunks(global_ids, world))
        if shards.chunks_per_rank == c and torch.equal(_global_ids(by_rank, shards), global_ids):
            return shards
    raise ValueError(
        "document_ids of the ring's shards are not a layout='balanced' sharding of one global sequence: "
        "shard every tensor with shard_sequence(x, 1, 'balanced', rank, world_size, document_ids=global_ids)"
    )
