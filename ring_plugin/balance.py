"""Balanced layouts for packed documents, and the attention work of every layout per rank and per ring step.

Two measures of balance, both on the document-mask work (``documents.mask_work``, summed over the batch):

* per rank: ``max / mean`` of each rank's total work (``imbalance``);
* per ring step: in step ``s`` rank ``r`` works on the K/V of rank ``r - s``; ranks that exchange in
  lock-step (the ring engine waits for its neighbours every step) pay ``sum_s max_r M[r, r - s]``, where
  ``M[a, b]`` is the work of rank ``a``'s queries on rank ``b``'s keys (``ring_step_work``).
  ``ring_step_imbalance`` is that time over the ideal ``total / world_size``; it is never below the
  per-rank figure, and it is the one the ring's speed follows.

``balanced_chunks(document_ids, world_size)`` cuts the sequence into ``world_size * c`` equal chunks and
gives each rank exactly ``c`` of them, balancing the per-rank work. It is a pure function of the global
``document_ids`` and the ring size, so every rank of a ring rebuilds the same permutation from the
all-gathered ids. Choice of ``c``: the candidates are 1, 2, 4, ... such that ``world_size * c`` divides
``n`` and a chunk keeps at least ``min_chunk`` tokens (``c = 1`` is always a candidate); the first whose
assignment reaches ``max / mean <= target`` (``CHUNKS_TARGET``, 1.01) wins, else the one with the lowest
imbalance (smallest ``c`` among equals). Assignment for one ``c``: longest-processing-time greedy under the
cardinality constraint (heaviest chunk first, to the least-loaded rank that still has room; ties to the
lower rank), then pairwise swaps between the most-loaded rank and any other while a swap lowers the larger
of the two loads (each swap lowers the sum of squared loads, so it terminates). Exact integers and index
tie-breaks: deterministic.

Equal chunks balance the ranks' totals but not the ring steps: documents stay local, so step 0 carries most
of the work, unevenly (``ring_step_imbalance`` 1.3 to 2.5 on the generator's 128K batches).
``balanced_positions(document_ids, world_size)`` balances the steps too. Per sample, documents of at least
``threshold`` tokens are split like torch's head-tail (below): ``2 * world_size`` pieces of ``L // (2 *
world_size)`` tokens, rank ``r`` taking pieces ``r`` and ``2 * world_size - 1 - r``; their work is then
the same for every (query rank, key rank) pair. The other documents, and the few tokens each split leaves
over, stay whole: heaviest first, each to the least-loaded rank with room for it; what fits nowhere (the
lightest, last) fills the remaining room in sequence order. ``threshold`` starts at a shard (a longer
document cannot stay whole) and halves until ``ring_step_imbalance <= target`` (the best one found if
none does). Each rank's positions are ascending, so local order is global order and ids stay
non-decreasing.

For comparison: ``layout_chunks`` gives the ``contiguous`` and ``zigzag`` layouts as chunks, and
``head_tail_owners`` torch's per-document head-tail balancing (``context_parallel`` with document masks):
every document cut into ``2 * world_size`` pieces, rank ``r`` taking pieces ``r`` and ``2 * world_size - 1
- r`` of every document. torch needs every length to be a multiple of ``2 * world_size`` (it pads); here a
length ``L`` is cut as ``torch.tensor_split`` does, the first ``L % (2 * world_size)`` pieces one token
longer, which is the most even split possible without padding.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .documents import mask_work
from .layout import rank_chunks

TARGET_IMBALANCE = 1.05
# Equal chunks stop being added once the ranks' work is within 1 %, not just within the 1.05 goal: at ring
# size 2 the busiest rank's share is the layer's time (a 4 % imbalance cost 4 % of the rate on the GPU),
# and more chunks cost little since the ring cuts each block to the documents its rows share.
CHUNKS_TARGET = 1.01
MIN_CHUNK = 64
_RANKS_AT_ONCE = 64  # ring_step_work: (runs, ranks) tables for this many ranks at a time

Chunks = tuple[tuple[int, ...], ...]


def _batched(document_ids: torch.Tensor) -> torch.Tensor:
    if not isinstance(document_ids, torch.Tensor) or document_ids.dim() not in (1, 2):
        shape = tuple(document_ids.shape) if isinstance(document_ids, torch.Tensor) else type(document_ids).__name__
        raise ValueError(f"document_ids must be a tensor (n,) or (batch, n), got {shape}")
    return document_ids.reshape(-1, document_ids.shape[-1])


def _check_world_size(world_size: int) -> None:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size <= 0:
        raise ValueError(f"world_size={world_size!r} must be a positive integer")


def _token_work(document_ids: torch.Tensor, causal: bool) -> np.ndarray:
    """Work of every position, summed over the batch (int64)."""
    return mask_work(_batched(document_ids), causal).sum(0).cpu().numpy().astype(np.int64)


def _chunk_work(token_work: np.ndarray, num_chunks: int) -> np.ndarray:
    """Work of each of ``num_chunks`` equal chunks."""
    n = len(token_work)
    if n % num_chunks:
        raise ValueError(f"document_ids has n={n} positions, not a multiple of {num_chunks} chunks")
    return token_work.reshape(num_chunks, n // num_chunks).sum(1)


def _assign(work: np.ndarray, world_size: int) -> list[list[int]]:
    """Chunks of each rank (``len(work) / world_size`` per rank) minimising the largest rank load."""
    per_rank = len(work) // world_size
    ranks: list[list[int]] = [[] for _ in range(world_size)]
    loads = np.zeros(world_size, dtype=np.int64)
    for chunk in sorted(range(len(work)), key=lambda i: (-int(work[i]), i)):
        open_ranks = [r for r in range(world_size) if len(ranks[r]) < per_rank]
        r = min(open_ranks, key=lambda r: (int(loads[r]), r))
        ranks[r].append(chunk)
        loads[r] += work[chunk]
    owner = np.empty(len(work), dtype=np.int64)
    for r, chunks in enumerate(ranks):
        owner[chunks] = r
    while True:
        top = int(np.argmax(loads))
        mine = np.array(ranks[top], dtype=np.int64)
        others = np.flatnonzero(owner != top)
        if not len(others):
            break
        delta = work[mine][:, None] - work[others][None, :]  # load moved from ``top`` to the other rank
        other_load = loads[owner[others]][None, :]
        new_max = np.maximum(loads[top] - delta, other_load + delta)
        new_max[delta <= 0] = np.iinfo(np.int64).max
        best = np.unravel_index(int(np.argmin(new_max)), new_max.shape)  # first minimum: deterministic
        if new_max[best] >= loads[top]:
            break
        a, b = int(mine[best[0]]), int(others[best[1]])
        other = int(owner[b])
        ranks[top][ranks[top].index(a)] = b
        ranks[other][ranks[other].index(b)] = a
        owner[a], owner[b] = other, top
        moved = int(work[a] - work[b])
        loads[top] -= moved
        loads[other] += moved
    return [sorted(chunks) for chunks in ranks]


def _imbalance_of(loads: np.ndarray | torch.Tensor) -> float:
    loads = np.asarray(loads, dtype=np.float64)
    return float(loads.max() / loads.mean())


def balanced_chunks(
    document_ids: torch.Tensor, world_size: int, causal: bool = True, *,
    target: float = CHUNKS_TARGET, min_chunk: int = MIN_CHUNK,
) -> Chunks:
    """Global chunk indices (ascending) of every rank in the balanced layout; see the module docstring.

    ``document_ids``: the global ids, (n,) or (batch, n); with a batch, the summed work is balanced so every
    sample uses the same permutation. ``n`` must be a multiple of ``world_size``.
    """
    _check_world_size(world_size)
    ids = _batched(document_ids)
    n = ids.shape[1]
    if n == 0 or n % world_size:
        raise ValueError(f"document_ids has n={n} positions: it must be a positive multiple of world_size={world_size}")
    token_work = _token_work(ids, causal)
    best: tuple[float, list[list[int]]] | None = None
    for c in chunk_counts(n, world_size, min_chunk):
        work = _chunk_work(token_work, world_size * c)
        ranks = _assign(work, world_size)
        score = _imbalance_of(np.array([work[r].sum() for r in ranks]))
        if best is None or score < best[0]:
            best = (score, ranks)
        if score <= target:
            break
    assert best is not None
    return tuple(tuple(r) for r in best[1])


def chunk_counts(n: int, world_size: int, min_chunk: int = MIN_CHUNK) -> list[int]:
    """The chunks-per-rank candidates of the balanced layout for ``n`` positions, in the order tried:
    1, 2, 4, ... while ``world_size * c`` divides ``n`` and a chunk keeps ``min_chunk`` tokens."""
    candidates = [1]
    c = 2
    while n % (world_size * c) == 0 and n // (world_size * c) >= min_chunk:
        candidates.append(c)
        c *= 2
    return candidates


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


def packed_document_lengths(n_tokens: int, seed: int, mean: float = 8192.0, sigma: float = 1.0) -> list[int]:
    """Seeded long-tailed document lengths (log-normal, mean ``mean``) that sum to exactly ``n_tokens``.

    Lengths are drawn until they cover ``n_tokens``; the last one is cut to fit. With the defaults (mean 8K,
    sigma 1), about one document in eight is longer than 16K tokens, a shard at ring 8 of a 128K sequence.
    """
    if n_tokens <= 0:
        raise ValueError(f"n_tokens={n_tokens} must be positive")
    if mean < 1 or sigma < 0:
        raise ValueError(f"mean={mean} must be >= 1 and sigma={sigma} >= 0")
    gen = torch.Generator().manual_seed(seed)
    mu = math.log(mean) - sigma * sigma / 2  # log-normal mean is exp(mu + sigma^2 / 2)
    lengths: list[int] = []
    total = 0
    while total < n_tokens:
        draws = torch.full((64,), float(mean), dtype=torch.float64)
        if sigma:  # sigma 0: every document has the mean length
            draws.log_normal_(mu, sigma, generator=gen)
        for x in draws.tolist():
            length = min(max(1, round(x)), n_tokens - total)
            lengths.append(length)
            total += length
            if total == n_tokens:
                break
    return lengths


def document_ids_from_lengths(lengths: list[int] | tuple[int, ...]) -> torch.Tensor:
    """``document_ids`` (int64, shape (sum(lengths),)) of documents of the given lengths, back to back."""
    if not lengths or any(length <= 0 for length in lengths):
        raise ValueError(f"lengths={list(lengths)[:8]}... must be a non-empty list of positive integers")
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(list(lengths)))
