"""Packed documents: ``document_ids`` from HF-style ``position_ids``, their validation, and their work.

A packed sequence holds several documents back to back. ``document_ids`` numbers them: an int64 tensor
(batch, n), non-decreasing along the sequence, so a document is a run of equal ids. A token may attend
to a key only in its own document (and, if causal, not after itself).

``mask_work`` counts, per query row, the keys that mask allows: the attention FLOPs the mask needs, up to
a constant factor. The balanced layout is built on it.

``packed_document_lengths`` draws the seeded long-tailed document lengths of the ``data=packed`` task.
"""

from __future__ import annotations

import math

import torch


def _document_starts(document_ids: torch.Tensor) -> torch.Tensor:
    """True where a document starts (the first token of a row, and every change of id)."""
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[..., 1:] = document_ids[..., 1:] != document_ids[..., :-1]
    return starts


def document_ids_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Document numbers (int64, same shape, 0 at the start of each row) of HF-style packed ``position_ids``.

    ``position_ids`` restart at 0 for each document; a new document starts wherever a position does not
    continue the previous one (``pos != prev + 1``), so a row starting mid-document at any position works.
    """
    if position_ids.dim() not in (1, 2):
        raise ValueError(f"position_ids must be (n,) or (batch, n), got shape {tuple(position_ids.shape)}")
    if position_ids.dtype.is_floating_point or position_ids.dtype == torch.bool:
        raise ValueError(f"position_ids must hold integers, got dtype {position_ids.dtype}")
    pos = position_ids.long()
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[..., 1:] = pos[..., 1:] != pos[..., :-1] + 1
    return starts.long().cumsum(-1) - 1


def document_ids_error(ids: torch.Tensor, n_expected: int | None = None, check_order: bool = True) -> str | None:
    """What is wrong with ``ids`` as ``document_ids`` of shape (batch, ``n_expected``), or None if nothing.
    ``check_order=False``: type and shape only (no look at the values, so no host sync on a GPU)."""
    if not isinstance(ids, torch.Tensor):
        return f"document_ids must be a tensor, got {type(ids).__name__}"
    if ids.dtype != torch.int64:
        return f"document_ids must be int64, got {ids.dtype}"
    if ids.dim() != 2:
        return f"document_ids must be 2-D (batch, n), got shape {tuple(ids.shape)}"
    if n_expected is not None and ids.shape[1] != n_expected:
        return f"document_ids has {ids.shape[1]} positions per row, expected {n_expected} (shape {tuple(ids.shape)})"
    if check_order and ids.shape[1] > 1:
        drops = (ids[:, 1:] < ids[:, :-1]).nonzero()
        if len(drops):
            row, col = drops[0].tolist()
            return (f"document_ids must be non-decreasing along the sequence; row {row} drops from "
                    f"{ids[row, col].item()} to {ids[row, col + 1].item()} at position {col + 1}")
    return None


def mask_work(document_ids: torch.Tensor, causal: bool) -> torch.Tensor:
    """Keys each query row may attend to under the document mask: int64, same shape as ``document_ids``.

    Causal: the row's position within its document + 1. Bidirectional: its document's length. Works on
    (n,) and (batch, n); ``document_ids`` must be non-decreasing along the sequence.
    """
    if document_ids.dim() not in (1, 2):
        raise ValueError(f"document_ids must be (n,) or (batch, n), got shape {tuple(document_ids.shape)}")
    if document_ids.shape[-1] > 1 and bool((document_ids[..., 1:] < document_ids[..., :-1]).any()):
        raise ValueError("document_ids must be non-decreasing along the sequence")
    ids = document_ids.reshape(-1, document_ids.shape[-1])
    n = ids.shape[1]
    starts = _document_starts(ids)
    index = torch.arange(n, device=ids.device).expand_as(ids)
    if causal:
        # The start of each row's document is the latest start at or before it.
        first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
        work = index - first + 1
    else:
        # Number documents across the whole batch, count their tokens, read each row's count back.
        segment = starts.reshape(-1).long().cumsum(0) - 1
        work = torch.bincount(segment).gather(0, segment).view_as(ids)
    return work.reshape(document_ids.shape)


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
