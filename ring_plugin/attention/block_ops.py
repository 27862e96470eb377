"""Forward and backward of one block of work, one pair of functions per block kind.

- :class:`~.plan.Block`, :class:`~.plan.BandBlock`, :class:`~ring_plugin.documents.blocks.DocumentBlock`: contiguous
  query and key rows (the dense ring's units): :func:`forward_rows` / :func:`backward_rows` return the
  block's results (``(out, lse)``; dQ and :class:`RowGrads`) and the dense ring decides where they go;
- :class:`~ring_plugin.patterns.blocks.ViewBlock`: rows on a regular grid, read as strided views;
- :class:`~ring_plugin.patterns.blocks.IndexBlock`: irregular (head, row) sets, gathered by flat index.

Tensors are ``(batch, heads, length, head_dim)``. Pattern blocks (:func:`forward_block` /
:func:`backward_block`) write into the fp32 ``out``/``lse`` accumulators themselves, merging by
logsumexp (``first``: they are still empty, so it is copied in); their backward adds its dQ at once
and returns a closure that adds its dK/dV over their views or indices, because where those go is the
caller's choice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import singledispatch

import torch

from ..cache import BoundedCache
from ..documents.blocks import DocumentBlock
from ..ops.document_kernels import VarlenRuns, document_backward, document_forward
from ..ops.kernels import band_backward, band_forward, expand_kv_heads, reduce_kv_heads, takes_flash
from ..ops.merge import merge_into
from ..patterns.blocks import IndexBlock, ViewBlock
from .call import RingCall
from .plan import BandBlock, Block

AddGrads = Callable[[list[torch.Tensor]], None]


@singledispatch
def forward_block(block, call: RingCall, q, kv, out_acc, lse_acc, first: bool = False) -> None:
    raise TypeError(f"no forward for block kind {type(block).__name__}")


@singledispatch
def backward_block(block, call: RingCall, dout, q, kv, out, lse, dq_acc, first: bool = False) -> AddGrads:
    raise TypeError(f"no backward for block kind {type(block).__name__}")


# ------------------------------------------------------------------------------ contiguous rows
# Row blocks (dense, sliding window, packed documents) cover contiguous query and key rows; their
# results go to the caller, which sums them (:class:`.row_sums.RowSums`) or sends them home.
@singledispatch
def forward_rows(block, call: RingCall, q, kv) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of the block's query rows."""
    raise TypeError(f"no row forward for block kind {type(block).__name__}")


@singledispatch
def backward_rows(block, call: RingCall, dout, q, kv, out, lse) -> tuple[torch.Tensor, RowGrads]:
    """The dQ of the block's query rows and the dK/dV of its key rows."""
    raise TypeError(f"no row backward for block kind {type(block).__name__}")


def is_seq_major(x: torch.Tensor) -> bool:
    """``(B, H, L, D)`` stored ``(B, L, H, D)``: the layout flash's varlen kernels read as packed rows."""
    return x.dim() == 4 and not x.is_contiguous() and x.transpose(1, 2).is_contiguous()


def _rows(x: torch.Tensor, s: slice) -> torch.Tensor:
    if s.start == 0 and s.stop == x.shape[2]:
        return x
    # a seq-major slice is already what a varlen kernel reads (rows of (H, D)); others are compacted
    return x[:, :, s] if is_seq_major(x) else x[:, :, s].contiguous()


@dataclass(frozen=True)
class RowGrads:
    """One block's dK/dV for the key ``rows`` of its K/V shard (the dense ring sums them or sends
    them home as they are)."""

    rows: slice
    dk: torch.Tensor
    dv: torch.Tensor


@forward_rows.register
def _(block: Block, call: RingCall, q, kv):
    kb, vb = (expand_kv_heads(_rows(t, block.kv), call.heads) for t in kv)
    return call.kernel.forward(_rows(q, block.q), kb, vb, block.causal, call.scale)


@backward_rows.register
def _(block: Block, call: RingCall, dout, q, kv, out, lse):
    kb, vb = (expand_kv_heads(_rows(t, block.kv), call.heads) for t in kv)
    rows = block.q
    dq, dk, dv = call.kernel.backward(
        _rows(dout, rows), _rows(q, rows), kb, vb, _rows(out, rows), _rows(lse, rows), block.causal, call.scale
    )
    # summed over query heads in the accumulator's dtype (fp32 by default)
    return dq, RowGrads(block.kv, *(reduce_kv_heads(g, call.kv_heads, call.grad_dtype) for g in (dk, dv)))


# ---------------------------------------------------------------------------------- sliding window
@forward_rows.register
def _(block: BandBlock, call: RingCall, q, kv):
    return band_forward(_rows(q, block.q), _rows(kv[0], block.kv), _rows(kv[1], block.kv), block.left,
                        block.right, call.scale)


@backward_rows.register
def _(block: BandBlock, call: RingCall, dout, q, kv, out, lse):
    rows = block.q
    dq, dk, dv = band_backward(_rows(dout, rows), _rows(q, rows), _rows(kv[0], block.kv), _rows(kv[1], block.kv),
                               _rows(out, rows), _rows(lse, rows), block.left, block.right, call.scale)
    return dq, RowGrads(block.kv, dk, dv)


# ------------------------------------------------------------------------------ packed documents
def _runs(block: DocumentBlock, q: torch.Tensor) -> VarlenRuns | None:
    return block.runs(q.device) if takes_flash(q) else None


@forward_rows.register
def _(block: DocumentBlock, call: RingCall, q, kv):
    return document_forward(_rows(q, block.q), _rows(kv[0], block.kv), _rows(kv[1], block.kv),
                            block.q_docs, block.k_docs, block.causal, call.scale, _runs(block, q))


@backward_rows.register
def _(block: DocumentBlock, call: RingCall, dout, q, kv, out, lse):
    rows = block.q
    dq, dk, dv = document_backward(
        _rows(dout, rows), _rows(q, rows), _rows(kv[0], block.kv), _rows(kv[1], block.kv), _rows(out, rows),
        _rows(lse, rows), block.q_docs, block.k_docs, block.causal, call.scale, _runs(block, q),
    )
    return dq, RowGrads(block.kv, dk, dv)


# --------------------------------------------------------------------------------- strided views
@forward_block.register
def _(block: ViewBlock, call: RingCall, q, kv, out_acc, lse_acc, first: bool = False) -> None:
    o, lse = call.kernel.forward(
        block.q_view(q).flatten(0, 1), block.kv_view(kv[0]).flatten(0, 1), block.kv_view(kv[1]).flatten(0, 1),
        block.causal, call.scale,
    )
    o_acc, l_acc = block.q_view(out_acc), block.q_view(lse_acc)
    o, lse = o.unflatten(0, o_acc.shape[:2]), lse.unflatten(0, o_acc.shape[:2])
    if first:  # a block's (head, row) sets are disjoint: nothing to merge with yet
        o_acc.copy_(o)
        l_acc.copy_(lse)
    else:
        merge_into(o_acc, l_acc, o, lse)


@backward_block.register
def _(block: ViewBlock, call: RingCall, dout, q, kv, out, lse, dq_acc, first: bool = False) -> AddGrads:
    qv = block.q_view(q)
    dq, dk, dv = call.kernel.backward(
        block.q_view(dout).flatten(0, 1), qv.flatten(0, 1), block.kv_view(kv[0]).flatten(0, 1),
        block.kv_view(kv[1]).flatten(0, 1), block.q_view(out).flatten(0, 1),
        block.q_view(lse).flatten(0, 1).contiguous(), block.causal, call.scale,
    )
    dq_view = block.q_view(dq_acc)
    (dq_view.copy_ if first else dq_view.add_)(dq.unflatten(0, qv.shape[:2]))

    def add(acc: list[torch.Tensor]) -> None:
        for a, g in zip(acc, (dk, dv)):  # a block's key rows are disjoint: a plain in-place add
            view = block.kv_view(a)
            (view.copy_ if first else view.add_)(g.unflatten(0, qv.shape[:2]))

    return add


# ---------------------------------------------------------------------------------- flat indices
# Plans are built on the CPU; each block's indices are copied to an accelerator once, not per call.
_ON_DEVICE: BoundedCache[IndexBlock] = BoundedCache(4096)


def _on(block: IndexBlock, device: torch.device) -> IndexBlock:
    if block.q_index.device == device:
        return block
    return _ON_DEVICE.get(
        (block, str(device)),  # IndexBlocks hash by identity; the key keeps the block alive
        lambda: IndexBlock(block.q_index.to(device), block.kv_index.to(device), block.causal),
    )


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x`` (B, H, L[, D]) at flat ``index`` (G, h, m) -> contiguous (B*G, h, m[, D])."""
    b, h, n = x.shape[:3]
    g, hh, m = index.shape
    return x.reshape(b, h * n, *x.shape[3:]).index_select(1, index.flatten()).view(b * g, hh, m, *x.shape[3:])


def _flat(y: torch.Tensor, batch: int) -> torch.Tensor:
    """Undo the batch folding of :func:`_gather`: (B*G, h, m[, D]) -> (B, G*h*m[, D])."""
    return y.reshape(batch, -1, *y.shape[3:])


@forward_block.register
def _(block: IndexBlock, call: RingCall, q, kv, out_acc, lse_acc, first: bool = False) -> None:
    block = _on(block, q.device)
    b, h, n, d = q.shape
    o, lse = call.kernel.forward(
        _gather(q, block.q_index), _gather(kv[0], block.kv_index), _gather(kv[1], block.kv_index),
        block.causal, call.scale,
    )
    idx = block.q_index.flatten()
    out_view, lse_view = out_acc.view(b, h * n, d), lse_acc.view(b, h * n)
    if first:  # a block's (head, row) sets are disjoint: nothing to merge with yet
        out_view.index_copy_(1, idx, _flat(o, b).float())
        lse_view.index_copy_(1, idx, _flat(lse, b).float())
        return
    o_acc, l_acc = out_view.index_select(1, idx), lse_view.index_select(1, idx)
    merge_into(o_acc, l_acc, _flat(o, b), _flat(lse, b))
    out_view.index_copy_(1, idx, o_acc)
    lse_view.index_copy_(1, idx, l_acc)


@backward_block.register
def _(block: IndexBlock, call: RingCall, dout, q, kv, out, lse, dq_acc, first: bool = False) -> AddGrads:
    block = _on(block, q.device)
    b, h, n, d = q.shape
    qi, ki = block.q_index, block.kv_index
    dq, dk, dv = call.kernel.backward(
        _gather(dout, qi), _gather(q, qi), _gather(kv[0], ki), _gather(kv[1], ki),
        _gather(out, qi), _gather(lse, qi).contiguous(), block.causal, call.scale,
    )
    dq_acc.view(b, h * n, d).index_add_(1, qi.flatten(), _flat(dq, b).to(dq_acc.dtype))

    def add(acc: list[torch.Tensor]) -> None:
        hk, nk = acc[0].shape[1], acc[0].shape[2]
        # index_add_ sums duplicates, so K/V heads shared by several query heads (GQA) just work.
        for a, g in zip(acc, (dk, dv)):
            a.view(b, hk * nk, d).index_add_(1, ki.flatten(), _flat(g, b).to(a.dtype))

    return add
