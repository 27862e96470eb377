"""The balanced layout for packed documents, and the per-rank attention work of every layout.

``balanced_chunks(document_ids, world_size)`` cuts the sequence into ``world_size * c`` equal chunks and
gives each rank exactly ``c`` of them, so that the attention work of the document mask
(``documents.mask_work``, summed over the chunk's rows and the batch) is as even as possible. It is a pure
function of the global ``document_ids`` and the ring size, so every rank of a ring rebuilds the same
permutation from the all-gathered ids.

Choice of ``c``: the candidates are 1, 2, 4, ... such that ``world_size * c`` divides ``n`` and a chunk
keeps at least ``min_chunk`` tokens (``c = 1`` is always a candidate). The first candidate whose assignment
reaches ``max / mean <= target`` wins; if none does, the one with the lowest imbalance (smallest ``c`` among
equals). Few chunks per rank keep the shards made of few contiguous runs; more only where the documents
need it.

Assignment for one ``c``: longest-processing-time greedy under the cardinality constraint (heaviest chunk
first, to the least-loaded rank that still has room; ties to the lower rank), then pairwise swaps between
the most-loaded rank and any other while a swap lowers the larger of the two loads (each swap lowers the
sum of squared loads, so it terminates). Everything is in exact integers with index tie-breaks: the result
is deterministic across machines.

For comparison: ``layout_chunks`` gives the ``contiguous`` and ``zigzag`` layouts in the same form, and
``head_tail_rank_work`` the work of torch's per-document head-tail balancing (``context_parallel`` with
document masks): every document cut into ``2 * world_size`` pieces, rank ``r`` taking pieces ``r`` and
``2 * world_size - 1 - r`` of every document. torch needs every length to be a multiple of
``2 * world_size`` (it pads); here a length ``L`` is cut as ``torch.tensor_split`` does, the first
``L % (2 * world_size)`` pieces one token longer, which is the most even split possible without padding.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .documents import mask_work
from .layout import rank_chunks

TARGET_IMBALANCE = 1.05
MIN_CHUNK = 64

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
    target: float = TARGET_IMBALANCE, min_chunk: int = MIN_CHUNK,
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
    candidates = [1]
    c = 2
    while n % (world_size * c) == 0 and n // (world_size * c) >= min_chunk:
        candidates.append(c)
        c *= 2
    token_work = _token_work(ids, causal)
    best: tuple[float, list[list[int]]] | None = None
    for c in candidates:
        work = _chunk_work(token_work, world_size * c)
        ranks = _assign(work, world_size)
        score = _imbalance_of(np.array([work[r].sum() for r in ranks]))
        if best is None or score < best[0]:
            best = (score, ranks)
        if score <= target:
            break
    assert best is not None
    return tuple(tuple(r) for r in best[1])


def layout_chunks(layout: str, world_size: int) -> Chunks:
    """The ``contiguous`` or ``zigzag`` layout as chunk indices per rank (the form ``balanced_chunks`` returns)."""
    _check_world_size(world_size)
    return tuple(rank_chunks(layout, r, world_size) for r in range(world_size))


def rank_work(document_ids: torch.Tensor, chunks: Chunks, causal: bool = True) -> torch.Tensor:
    """Attention work (int64, summed over the batch) of each rank holding ``chunks[rank]`` of equal chunks."""
    flat = sorted(i for r in chunks for i in r)
    if flat != list(range(len(flat))):
        raise ValueError(f"chunks={chunks} must hold every chunk index 0..{len(flat) - 1} exactly once")
    work = _chunk_work(_token_work(document_ids, causal), len(flat))
    return torch.tensor([int(work[list(r)].sum()) for r in chunks], dtype=torch.int64)


def head_tail_rank_work(document_ids: torch.Tensor, world_size: int, causal: bool = True) -> torch.Tensor:
    """Per-rank work of torch's per-document head-tail balancing (see the module docstring for remainders)."""
    _check_world_size(world_size)
    ids = _batched(document_ids)
    pieces = 2 * world_size
    work = mask_work(ids, causal).reshape(-1)
    # Position in document and document length of every token, batch rows flattened.
    pos = mask_work(ids, True).reshape(-1) - 1
    length = mask_work(ids, False).reshape(-1)
    q, rem = length // pieces, length % pieces
    head = rem * (q + 1)  # tokens in the first ``rem`` pieces, one token longer
    piece = torch.where(pos < head, pos // (q + 1), rem + (pos - head) // q.clamp(min=1))
    rank = torch.where(piece < world_size, piece, pieces - 1 - piece)
    return torch.zeros(world_size, dtype=torch.int64).index_add_(0, rank, work)


def imbalance(work: torch.Tensor) -> float:
    """Max / mean of per-rank work: 1.0 is perfect balance, ``world_size`` all work on one rank."""
    if work.numel() == 0 or int(work.sum()) <= 0:
        raise ValueError(f"work={work.tolist()} must be per-rank counts with a positive total")
    return _imbalance_of(work.double().cpu().numpy())


def layout_imbalance(document_ids: torch.Tensor, layout: str, world_size: int, causal: bool = True) -> float:
    """Max / mean per-rank work of ``layout`` in ``contiguous``, ``zigzag``, ``balanced``, ``head_tail``."""
    if layout == "head_tail":
        return imbalance(head_tail_rank_work(document_ids, world_size, causal))
    if layout == "balanced":
        chunks = balanced_chunks(document_ids, world_size, causal)
    else:
        chunks = layout_chunks(layout, world_size)
    return imbalance(rank_work(document_ids, chunks, causal))


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
