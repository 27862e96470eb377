"""Packed documents in the ring: every rank's document ids, and the blocks they leave to compute.

A call with ``document_ids`` all-gathers the (small) int64 ids of every rank's rows once, checks that
they form one non-decreasing global sequence (the same verdict on every rank, since all ranks judge
the same gathered ids), and hands the dense ring :class:`DocumentBlock` s: the dense plan's blocks
minus those whose query and key rows share no document, each carrying its rows' ids so the kernel
attends within documents only (:mod:`ring_plugin.ops.document_kernels`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..layout import ShardLayout
from .plan import Block


@dataclass(frozen=True, eq=False)
class DocumentBlock:
    """A dense block restricted to documents: ``q_docs``/``k_docs`` are its rows' ids (B, L), CPU."""

    q: slice
    kv: slice
    causal: bool
    q_docs: torch.Tensor
    k_docs: torch.Tensor


@dataclass(frozen=True)
class RingDocuments:
    """Document ids of every rank's rows: ``by_rank[r]`` is rank r's (B, n_local), in local order (CPU)."""

    by_rank: torch.Tensor  # (world, B, n_local) int64

    def blocks(self, dense: list[Block], q_rank: int, kv_rank: int) -> list[DocumentBlock]:
        """``dense`` restricted to documents; blocks where no sample shares a document are dropped."""
        out = []
        for b in dense:
            qd, kd = self.by_rank[q_rank][:, b.q], self.by_rank[kv_rank][:, b.kv]
            # ids ascend along rows, so two blocks share a document iff their id ranges overlap
            if bool(((qd[:, -1] >= kd[:, 0]) & (kd[:, -1] >= qd[:, 0])).any()):
                out.append(DocumentBlock(b.q, b.kv, b.causal, qd, kd))
        return out


def document_ids_error(ids: object, q: torch.Tensor) -> str | None:
    """This rank's check of its ``document_ids`` shard against ``q`` (B, n_local, H, D)."""
    if not isinstance(ids, torch.Tensor):
        return f"document_ids must be a torch.Tensor, got {type(ids).__name__}"
    if ids.dtype != torch.int64:
        return f"document_ids must be int64, got {ids.dtype}"
    if tuple(ids.shape) != tuple(q.shape[:2]):
        return (f"document_ids must have shape (batch, n_local) = {tuple(q.shape[:2])} like q's first two dims, "
                f"got {tuple(ids.shape)}")
    if ids.shape[1] > 1 and bool((ids[:, 1:] < ids[:, :-1]).any()):
        return "document_ids must be non-decreasing along the sequence (packed documents, one run each)"
    return None


def gather_documents(ids: torch.Tensor, group: dist.ProcessGroup | None, layout: ShardLayout) -> RingDocuments:
    """Every rank's ids (one all-gather), checked to be one non-decreasing global sequence.

    Raises the same ``ValueError`` on every rank (each judges the same gathered ids).
    """
    ids = ids.contiguous()
    if group is None or layout.world_size == 1:
        by_rank = ids.cpu()[None]
    else:
        parts = [torch.empty_like(ids) for _ in range(layout.world_size)]
        dist.all_gather(parts, ids, group=group)
        by_rank = torch.stack(parts).cpu()
    world, batch, n_local = by_rank.shape
    per = layout.chunks_per_rank
    chunk = n_local // per
    global_ids = torch.empty(batch, world * n_local, dtype=torch.int64)
    for r in range(world):
        for i, c in enumerate(layout.chunks[r]):
            global_ids[:, c * chunk : (c + 1) * chunk] = by_rank[r][:, i * chunk : (i + 1) * chunk]
    if bool((global_ids[:, 1:] < global_ids[:, :-1]).any()):
        raise ValueError(
            "document_ids of the ring's shards do not form one non-decreasing sequence in the "
            f"{layout.name!r} layout: each rank must pass its own shard of the same global document_ids"
        )
    return RingDocuments(by_rank)
