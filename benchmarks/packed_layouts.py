"""Measures of packed-document layouts, for benchmarks and tests: the work of every layout per rank and per
ring step, torch's per-document head-tail split, a per-step balancer, and document ids from lengths.

Two measures of balance, both on the document-mask work (``mask_work``, summed over the batch):

* per rank: ``max / mean`` of each rank's total work (``imbalance``);
* per ring step: in step ``s`` rank ``r`` works on the K/V of rank ``r - s``; ranks that exchange in
  lock-step pay ``sum_s max_r M[r, r - s]``, where ``M[a, b]`` is the work of rank ``a``'s queries on rank
  ``b``'s keys (``ring_step_work``). ``ring_step_imbalance`` is that time over the ideal
  ``total / world_size``; it is never below the per-rank figure, and it is the one the ring's speed follows.

``balanced_positions(document_ids, world_size)`` balances the steps too. Per sample, documents of at least
``threshold`` tokens are split like torch's head-tail (below): ``2 * world_size`` pieces of ``L // (2 *
world_size)`` tokens, rank ``r`` taking pieces ``r`` and ``2 * world_size - 1 - r``. The other documents,
and the few tokens each split leaves over, stay whole: heaviest first, each to the least-loaded rank with
room for it; what fits nowhere (the lightest, last) fills the remaining room in sequence order.
``threshold`` starts at a shard and halves until ``ring_step_imbalance <= target``. Each rank's positions
are ascending, so local order is global order.

``head_tail_owners``: torch's per-document head-tail balancing (``context_parallel`` with document masks):
every document cut into ``2 * world_size`` pieces, rank ``r`` taking pieces ``r`` and ``2 * world_size - 1
- r``. A length ``L`` is cut as ``torch.tensor_split`` does, the first ``L % (2 * world_size)`` pieces one
token longer.
"""

from __future__ import annotations

import numpy as np
import torch

from ring_plugin.documents.balance import Chunks, _batched, _check_world_size, _imbalance_of, balanced_chunks
from ring_plugin.documents.ids import mask_work
from ring_plugin.layout import rank_chunks

TARGET_IMBALANCE = 1.05
_RANKS_AT_ONCE = 64  # ring_step_work: (runs, ranks) tables for this many ranks at a time


def balanced_positions(document_ids: torch.Tensor, world_size: int, causal: bool = True, *,
                       target: float = TARGET_IMBALANCE) -> torch.Tensor:
    """Global positions each rank holds (int64, ascending), balanced per ring step; see the module docstring.

    Returns (world_size, n // world_size) for ``document_ids`` of shape (n,), and (batch, world_size,
    n // world_size) for (batch, n): every sample gets its own permutation (gather rows with it).
    """
    _check_world_size(world_size)
    ids = _batched(document_ids)
    n = ids.shape[1]
    if n == 0 or n % world_size:
        raise ValueError(f"document_ids has n={n} positions: it must be a positive multiple of world_size={world_size}")
    out = torch.stack([_row_positions(row.cpu(), world_size, causal, target) for row in ids])
    return out[0] if document_ids.dim() == 1 else out


def _row_positions(ids: torch.Tensor, world_size: int, causal: bool, target: float) -> torch.Tensor:
    n = len(ids)
    lengths = torch.unique_consecutive(ids, return_counts=True)[1].tolist()
    work = np.concatenate([[0], mask_work(ids, causal).cumsum(0).numpy()])  # running work: item weights
    best: tuple[float, torch.Tensor] | None = None
    threshold = n // world_size
    while True:
        owners = _deal(lengths, work, world_size, threshold)
        score = ring_step_imbalance(ring_step_work(ids, owners, world_size, causal))
        if best is None or score < best[0]:
            best = (score, owners)
        if score <= target or threshold < 4 * world_size:
            break
        threshold //= 2
    return torch.argsort(best[1], stable=True).view(world_size, n // world_size)


def _deal(lengths: list[int], work: np.ndarray, world_size: int, threshold: int) -> torch.Tensor:
    """Owner rank of every token: documents of ``threshold`` tokens or more split head-tail, the rest whole."""
    n = len(work) - 1
    pieces = 2 * world_size
    zigzag = np.concatenate([np.arange(world_size), np.arange(world_size)[::-1]])
    owners = np.empty(n, dtype=np.int64)
    items: list[tuple[int, int, int]] = []  # (work, start, stop) placed whole where they fit
    start = split = 0
    for length in lengths:
        q = length // pieces if length >= threshold else 0
        # Rank r takes pieces r and 2k-1-r of q tokens each; what is left over is placed like a document.
        owners[start : start + pieces * q] = np.repeat(zigzag, q)
        split += 2 * q
        rest = start + pieces * q
        if rest < start + length:
            items.append((int(work[start + length] - work[rest]), rest, start + length))
        start += length
    capacity = np.full(world_size, n // world_size - split, dtype=np.int64)
    load = np.zeros(world_size, dtype=np.int64)
    overflow = []
    for weight, lo, hi in sorted(items, key=lambda item: (-item[0], item[1])):
        fits = np.flatnonzero(capacity >= hi - lo)
        if not len(fits):
            overflow.append((lo, hi))
            continue
        r = int(fits[np.argmin(load[fits])])  # least loaded, lowest rank among equals
        owners[lo:hi] = r
        capacity[r] -= hi - lo
        load[r] += weight
    # What fits nowhere whole (the lightest, placed last) fills the gaps left, in sequence order.
    for lo, hi in sorted(overflow):
        while lo < hi:
            r = int(np.argmax(capacity))
            take = min(int(capacity[r]), hi - lo)
            owners[lo : lo + take] = r
            capacity[r] -= take
            lo += take
    return torch.from_numpy(owners)


def layout_chunks(layout: str, world_size: int) -> Chunks:
    """The ``contiguous`` or ``zigzag`` layout as chunk indices per rank (the form ``balanced_chunks`` returns)."""
    _check_world_size(world_size)
    return tuple(rank_chunks(layout, r, world_size) for r in range(world_size))


def chunk_owners(chunks: Chunks, n: int) -> torch.Tensor:
    """Rank (int64, shape (n,)) holding each position when rank r holds the equal chunks ``chunks[r]``."""
    flat = sorted(i for r in chunks for i in r)
    if flat != list(range(len(flat))):
        raise ValueError(f"chunks={chunks} must hold every chunk index 0..{len(flat) - 1} exactly once")
    if n % len(flat):
        raise ValueError(f"n={n} positions cannot be cut into {len(flat)} equal chunks")
    owner_of_chunk = torch.empty(len(flat), dtype=torch.int64)
    for r, held in enumerate(chunks):
        owner_of_chunk[list(held)] = r
    return owner_of_chunk.repeat_interleave(n // len(flat))


def head_tail_owners(document_ids: torch.Tensor, world_size: int) -> torch.Tensor:
    """Rank (int64, shape (batch, n)) holding each token under torch's per-document head-tail split."""
    _check_world_size(world_size)
    ids = _batched(document_ids)
    pieces = 2 * world_size
    pos = mask_work(ids, True) - 1  # position within the document
    length = mask_work(ids, False)
    q, rem = length // pieces, length % pieces
    head = rem * (q + 1)  # tokens in the first ``rem`` pieces, one token longer
    piece = torch.where(pos < head, pos // (q + 1), rem + (pos - head) // q.clamp(min=1))
    return torch.where(piece < world_size, piece, pieces - 1 - piece)


def positions_owners(positions: torch.Tensor) -> torch.Tensor:
    """Rank holding each position, from ``balanced_positions``' (…, world_size, n_local) positions: (…, n)."""
    world_size, n_local = positions.shape[-2:]
    flat = positions.reshape(-1, world_size * n_local)
    ranks = torch.arange(world_size).repeat_interleave(n_local).expand_as(flat)
    owners = torch.empty_like(flat).scatter_(1, flat, ranks)
    return owners.reshape(*positions.shape[:-2], world_size * n_local)


def rank_work(document_ids: torch.Tensor, chunks: Chunks, causal: bool = True) -> torch.Tensor:
    """Attention work (int64, summed over the batch) of each rank holding ``chunks[rank]`` of equal chunks."""
    return owner_rank_work(document_ids, chunk_owners(chunks, _batched(document_ids).shape[1]), len(chunks), causal)


def owner_rank_work(document_ids: torch.Tensor, owners: torch.Tensor, world_size: int,
                    causal: bool = True) -> torch.Tensor:
    """Attention work (int64, summed over the batch) of each rank, ``owners`` naming the rank of every token
    ((n,) for every row, or one row per sample)."""
    ids = _batched(document_ids).cpu()
    owners = owners.cpu().expand_as(ids).reshape(-1)
    return torch.zeros(world_size, dtype=torch.int64).index_add_(0, owners, mask_work(ids, causal).reshape(-1))


def head_tail_rank_work(document_ids: torch.Tensor, world_size: int, causal: bool = True) -> torch.Tensor:
    """Per-rank work of torch's per-document head-tail balancing (see the module docstring for remainders)."""
    return owner_rank_work(document_ids, head_tail_owners(document_ids, world_size), world_size, causal)


def ring_step_work(document_ids: torch.Tensor, owners: torch.Tensor, world_size: int,
                   causal: bool = True) -> torch.Tensor:
    """``M[a, b]``: work of the queries on rank ``a`` with the keys on rank ``b`` (int64, summed over the batch).

    In ring step ``s`` rank ``r`` holds the K/V of rank ``r - s``, so step ``s`` costs ``max_r M[r, r - s]``
    when the ranks exchange in lock-step.
    """
    ids = _batched(document_ids).cpu()
    mask_work(ids, causal)  # validates the ids
    owners = owners.cpu().expand_as(ids)
    out = torch.zeros(world_size, world_size, dtype=torch.int64)
    for row, own in zip(ids, owners):
        # Runs of one document on one rank: all work is between runs of one document.
        new_run = torch.ones_like(row, dtype=torch.bool)
        new_run[1:] = (row[1:] != row[:-1]) | (own[1:] != own[:-1])
        starts = new_run.nonzero().flatten()
        length = torch.diff(starts, append=torch.tensor([len(row)]))
        doc, rank = row[starts], own[starts]
        doc_start = torch.ones_like(doc, dtype=torch.bool)
        doc_start[1:] = doc[1:] != doc[:-1]
        first_run = torch.where(doc_start, torch.arange(len(doc)), 0).cummax(0).values
        for lo in range(0, world_size, _RANKS_AT_ONCE):
            ranks = torch.arange(lo, min(lo + _RANKS_AT_ONCE, world_size))
            on_rank = (rank[:, None] == ranks[None, :]).long() * length[:, None]  # (runs, ranks)
            before = on_rank.cumsum(0) - on_rank  # tokens on each rank in earlier runs...
            before -= before[first_run]  # ...of the same document
            if causal:
                keys = before
            else:
                last_run = torch.cat([doc_start[1:], torch.tensor([True])]).nonzero().flatten()
                doc_total = (before + on_rank)[last_run]  # tokens of each document on each rank
                keys = doc_total[torch.cumsum(doc_start.long(), 0) - 1] - on_rank  # own run counted below
            out[:, lo : lo + len(ranks)] += torch.zeros(world_size, len(ranks), dtype=torch.int64).index_add_(
                0, rank, keys * length[:, None])
        within = length * (length + 1) // 2 if causal else length * length  # a run with itself
        out += torch.zeros(world_size, world_size, dtype=torch.int64).index_put_(
            (rank, rank), within, accumulate=True)
    return out


def ring_step_imbalance(step_work: torch.Tensor) -> float:
    """Lock-step ring time over the ideal: ``sum_s max_r M[r, r - s]`` / (total / world_size).

    At least the per-rank imbalance; it is what a ring whose ranks wait for each other every step pays.
    """
    world_size = step_work.shape[0]
    r = torch.arange(world_size)
    steps = torch.stack([step_work[r, (r - s) % world_size] for s in range(world_size)])
    total = int(step_work.sum())
    if total <= 0:
        raise ValueError("step_work must hold a positive total")
    return float(steps.max(1).values.sum().double() * world_size / total)


def imbalance(work: torch.Tensor) -> float:
    """Max / mean of per-rank work: 1.0 is perfect balance, ``world_size`` all work on one rank."""
    if work.numel() == 0 or int(work.sum()) <= 0:
        raise ValueError(f"work={work.tolist()} must be per-rank counts with a positive total")
    return _imbalance_of(work.double().cpu().numpy())


LAYOUT_NAMES = ("contiguous", "zigzag", "balanced", "balanced_positions", "head_tail")


def layout_owners(document_ids: torch.Tensor, layout: str, world_size: int, causal: bool = True) -> torch.Tensor:
    """Rank holding each token, (batch, n), for ``layout`` in ``LAYOUT_NAMES``."""
    ids = _batched(document_ids)
    if layout == "head_tail":
        return head_tail_owners(ids, world_size)
    if layout == "balanced_positions":
        return positions_owners(balanced_positions(ids, world_size, causal))
    if layout == "balanced":
        chunks = balanced_chunks(ids, world_size, causal)
    elif layout in ("contiguous", "zigzag"):
        chunks = layout_chunks(layout, world_size)
    else:
        raise ValueError(f"layout={layout!r} is not measured here; valid: {', '.join(LAYOUT_NAMES)}")
    return chunk_owners(chunks, ids.shape[1]).expand_as(ids)


def layout_imbalance(document_ids: torch.Tensor, layout: str, world_size: int, causal: bool = True,
                     per: str = "rank") -> float:
    """Imbalance of ``layout``: ``per="rank"`` max / mean per-rank work, ``per="step"`` ``ring_step_imbalance``."""
    owners = layout_owners(document_ids, layout, world_size, causal)
    if per == "rank":
        return imbalance(owner_rank_work(document_ids, owners, world_size, causal))
    if per == "step":
        return ring_step_imbalance(ring_step_work(document_ids, owners, world_size, causal))
    raise ValueError(f"per={per!r} must be 'rank' or 'step'")


def document_ids_from_lengths(lengths: list[int] | tuple[int, ...]) -> torch.Tensor:
    """``document_ids`` (int64, shape (sum(lengths),)) of documents of the given lengths, back to back."""
    if not lengths or any(length <= 0 for length in lengths):
        raise ValueError(f"lengths={list(lengths)[:8]}... must be a non-empty list of positive integers")
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(list(lengths)))
