"""Merging partial attention results by their logsumexp (the online-softmax rule), in fp32."""

from __future__ import annotations

import torch


def merge_into(out_acc: torch.Tensor, lse_acc: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """In place: ``(out_acc, lse_acc) <- merge((out_acc, lse_acc), (out, lse))``.

    ``out_acc`` is fp32 ``(..., L, D)``, ``lse_acc`` fp32 ``(..., L)``. Rows where both sides are
    empty (lse = -inf) stay 0 with lse -inf, never NaN, provided an empty side's ``out`` is finite.
    """
    new, w_old, w_new = merge_weights(lse_acc, lse)
    # one fused multiply-add, reading ``out`` in its own dtype (no fp32 copy of it)
    out_acc.mul_(w_old).addcmul_(out, w_new)
    lse_acc.copy_(new)


def merge_weights(lse_acc: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The merged lse and the weights of the old and new outputs (``(..., L, 1)``), in fp32."""
    lse = lse.float()
    new = torch.logaddexp(lse_acc, lse)
    safe = torch.where(torch.isinf(new), torch.zeros_like(new), new)
    return new, torch.exp(lse_acc - safe).unsqueeze(-1), torch.exp(lse - safe).unsqueeze(-1)


class StableRingAccumulator:
    """Attention over several key blocks, merged one block at a time: the engine's fp32 ``(out, lse)``
    merge (:func:`merge_weights`), usable on its own.

    ``output_shape`` is the output's ``(..., L, D)``; ``update(out, lse)`` takes one block's partial
    attention ``out`` (any float dtype) and its logsumexp ``lse`` (``(..., L)``); ``get_output()`` is
    attention over every block seen, in ``dtype``. The accumulators ``output`` and ``lse`` are fp32
    whatever ``dtype`` is (fp64 blocks keep ``output`` fp64): that keeps the merge exact in half
    precision. Rows no block covers stay 0 (lse -inf), never NaN. Each update makes new accumulators
    (nothing is written in place), so autograd flows through the merge to the blocks::

        acc = StableRingAccumulator(q.shape, device=q.device, dtype=q.dtype)
        for k_blk, v_blk in blocks:
            acc.update(*kernel.forward(q, k_blk, v_blk, False, scale))
        out = acc.get_output()
    """

    def __init__(self, output_shape: tuple[int, ...] | torch.Size, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32):
        shape = tuple(output_shape)
        if len(shape) < 2 or any(not isinstance(s, int) or s < 0 for s in shape):
            raise ValueError(f"output_shape={output_shape!r} must be (..., L, D) non-negative sizes")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype={dtype} must be a floating point dtype (the dtype of get_output())")
        self.dtype = dtype
        self.output = torch.zeros(shape, dtype=torch.float32, device=device)
        self.lse = torch.full(shape[:-1], float("-inf"), dtype=torch.float32, device=device)

    def update(self, new_output: torch.Tensor, new_lse: torch.Tensor) -> None:
        """Merge one block's ``(out, lse)`` into the running result."""
        if tuple(new_output.shape) != tuple(self.output.shape) or tuple(new_lse.shape) != tuple(self.lse.shape):
            raise ValueError(
                f"update(new_output {tuple(new_output.shape)}, new_lse {tuple(new_lse.shape)}) must match the "
                f"accumulator's output {tuple(self.output.shape)} and lse {tuple(self.lse.shape)}"
            )
        self.lse, w_old, w_new = merge_weights(self.lse, new_lse)
        self.output = self.output * w_old + new_output * w_new

    def get_output(self) -> torch.Tensor:
        """Attention over every block merged so far, in ``dtype``."""
        return self.output.to(self.dtype)
