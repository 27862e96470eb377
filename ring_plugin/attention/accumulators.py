"""Accumulator tensors of the ring algorithms (fp32 ``out``/``lse``, dQ and dK/dV sums)."""

from __future__ import annotations

import torch


def new_accumulator(shape, dtype: torch.dtype, device: torch.device, fill: float | None,
                    seq_major: bool = False) -> torch.Tensor:
    """A ``(B, H, L[, D])`` tensor filled with ``fill`` (None: uninitialised).

    ``seq_major`` stores it ``(B, L, H[, D])`` (and returns the transposed view): strided view blocks
    then read outputs and gradients in the same layout as the module's q/k/v, which the kernels want.
    """
    if seq_major:
        shape = (shape[0], shape[2], shape[1], *shape[3:])
    if fill is None:
        t = torch.empty(shape, dtype=dtype, device=device)
    else:
        t = torch.full(shape, fill, dtype=dtype, device=device)
    return t.transpose(1, 2) if seq_major else t


def in_layout(x: torch.Tensor, seq_major: bool) -> torch.Tensor:
    """``x`` (B, H, L, D) stored like an accumulator of :func:`new_accumulator` (copied only where it is
    not already): the kernels' backward reads ``dout`` beside the saved ``out``."""
    return x.transpose(1, 2).contiguous().transpose(1, 2) if seq_major else x.contiguous()
