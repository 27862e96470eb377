"""The balanced layout of packed documents: equal chunks given to ranks so that every rank does the same work.

The work of a position is the number of keys the document mask lets it see (``ids.mask_work``), summed over
the batch. ``balanced_chunks(document_ids, world_size)`` cuts the sequence into ``world_size * c`` equal
chunks and gives each rank exactly ``c`` of them, balancing the per-rank work. It is a pure function of the
global ``document_ids`` and the ring size, so a rank that cuts a batch computes the same layout as its peers
from the same global ids. Choice of ``c``: the candidates are 1, 2, 4, ... such that ``world_size * c``
divides ``n`` and a chunk keeps at least ``min_chunk`` tokens (``c = 1`` is always a candidate); the first
whose assignment reaches ``max / mean <= target`` (``CHUNKS_TARGET``) wins, else the one with the lowest
imbalance (smallest ``c`` among equals). Assignment for one ``c``: longest-processing-time greedy under the
cardinality constraint (heaviest chunk first, to the least-loaded rank that still has room; ties to the
lower rank), then pairwise swaps between the most-loaded rank and any other while a swap lowers the larger
of the two loads (each swap lowers the sum of squared loads, so it terminates). Exact integers and index
tie-breaks: deterministic.

The measures of other layouts (per ring step, torch's head-tail split) are benchmark tools
(``benchmarks/packed_layouts.py``).
"""

from __future__ import annotations

import numpy as np
import torch

from .ids import mask_work

# Equal chunks are added until the ranks' work is within 1 %: at ring size 2 the busiest rank's share is
# the layer's time, and more chunks cost little since the ring cuts each block to the documents its rows share.
CHUNKS_TARGET = 1.01
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


