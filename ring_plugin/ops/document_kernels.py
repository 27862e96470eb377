"""Attention between a query block and a key block of packed documents, returning a logsumexp.

Inside a ring block, query rows and key rows are each in ascending global position and document ids
are non-decreasing along the sequence, so each document is one contiguous run of query rows and one
contiguous run of key rows. The mask is therefore block-diagonal over documents: on CUDA half
precision it is one varlen flash call whose "sequences" are the (sample, document) runs (no mask
tensor, no work outside the documents); elsewhere it is the exact math kernel with a boolean mask.
Causal blocks are square (the same positions on both sides), so each document's run is a causal
square, where top-left and bottom-right alignment agree.

Tensors are ``(B, H, L, D)``; ``q_docs``/``k_docs`` are ``(B, Lq)``/``(B, Lk)`` int64 on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernels import masked_backward, masked_forward, takes_flash

aten = torch.ops.aten


def _allowed(q_docs: torch.Tensor, k_docs: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(B, 1, Lq, Lk) bool: same document (causality is applied by the kernel)."""
    return (q_docs[:, :, None] == k_docs[:, None, :]).unsqueeze(1).to(device)


@dataclass(frozen=True)
class VarlenRuns:
    """The (sample, document) runs of a block as flash varlen sequences."""

    cu_q: torch.Tensor  # (S + 1,) int32 offsets into the packed (B * Lq) query rows
    cu_k: torch.Tensor  # (S + 1,) int32 offsets into the packed (B * Lk) key rows
    max_q: int
    max_k: int


def varlen_runs(q_docs: torch.Tensor, k_docs: torch.Tensor, device: torch.device) -> VarlenRuns:
    """Every document of every sample, in order, with its query and key run lengths (either may be 0:
    a document with no keys here gives its rows no keys; one with no queries reads nothing)."""
    lq, lk = [0], [0]
    for qd, kd in zip(q_docs, k_docs):
        # ids ascend: each side's distinct documents are its runs, a few values to merge and sort
        docs = torch.unique(torch.cat([qd.unique_consecutive(), kd.unique_consecutive()]))
        nq = torch.searchsorted(qd, docs, right=True) - torch.searchsorted(qd, docs)
        nk = torch.searchsorted(kd, docs, right=True) - torch.searchsorted(kd, docs)
        lq += nq.tolist()
        lk += nk.tolist()
    cu = torch.stack([torch.tensor(lq, dtype=torch.int64), torch.tensor(lk, dtype=torch.int64)]).cumsum(1)
    if device.type == "cuda":
        # From pinned memory, asynchronously: a pageable copy would wait for every queued kernel, so
        # the host could never run ahead of the GPU (one stall per block).
        cu = cu.to(torch.int32).pin_memory().to(device, non_blocking=True)
    return VarlenRuns(cu[0], cu[1], max(lq), max(lk))


def _packed(x: torch.Tensor) -> torch.Tensor:
    """(B, H, L, D) -> (B * L, H, D) rows (a view where the rows are already sequence-major)."""
    return x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3])


def _unpacked(x: torch.Tensor, batch: int) -> torch.Tensor:
    """(B * L, H, D) -> (B, H, L, D)."""
    return x.view(batch, -1, x.shape[1], x.shape[2]).transpose(1, 2)


def document_forward(q, k, v, q_docs, k_docs, causal: bool, scale: float, runs: VarlenRuns | None = None):
    """``(out, lse)`` of the block under the document mask; rows without a key give 0 and -inf.
    ``runs``: the block's :func:`varlen_runs` on ``q``'s device, where the caller has them."""
    if not takes_flash(q):
        return masked_forward(q, k, v, causal, scale, _allowed(q_docs, k_docs, q.device))
    runs = runs or varlen_runs(q_docs, k_docs, q.device)
    out, lse, *_ = aten._flash_attention_forward(
        _packed(q), _packed(k), _packed(v), runs.cu_q, runs.cu_k, runs.max_q, runs.max_k, 0.0, causal, False,
        scale=scale,
    )
    # Flash marks rows whose run has no keys with lse = +inf; the merge wants -inf (their output is 0).
    lse = torch.where(lse == float("inf"), float("-inf"), lse)
    b = q.shape[0]
    return _unpacked(out, b), lse.view(q.shape[1], b, -1).transpose(0, 1)


def document_backward(dout, q, k, v, out, lse, q_docs, k_docs, causal: bool, scale: float,
                      runs: VarlenRuns | None = None):
    """``(dq, dk, dv)`` of the block, fed the merged ``out``/``lse`` of the whole ring."""
    if not takes_flash(q):
        return masked_backward(dout, q, k, v, out, lse, causal, scale, _allowed(q_docs, k_docs, q.device))
    runs = runs or varlen_runs(q_docs, k_docs, q.device)
    b = q.shape[0]
    rng = torch.zeros(2, dtype=torch.int64, device=q.device)  # no dropout: the RNG state is unused
    packed_lse = lse.transpose(0, 1).reshape(q.shape[1], -1).contiguous()
    dq, dk, dv = aten._flash_attention_backward(
        _packed(dout).contiguous(), _packed(q), _packed(k), _packed(v), _packed(out).contiguous(), packed_lse,
        runs.cu_q, runs.cu_k, runs.max_q, runs.max_k, 0.0, causal, rng, torch.empty(0, device=q.device),
        scale=scale,
    )
    return _unpacked(dq, b), _unpacked(dk, b), _unpacked(dv, b)
