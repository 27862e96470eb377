"""Merging partial attention results by their logsumexp (the online-softmax rule), in fp32."""

from __future__ import annotations

import torch


def merge_into(out_acc: torch.Tensor, lse_acc: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """In place: ``(out_acc, lse_acc) <- merge((out_acc, lse_acc), (out, lse))``.

    ``out_acc`` is fp32 ``(..., L, D)``, ``lse_acc`` fp32 ``(..., L)``. Rows where both sides are
    empty (lse = -inf) stay 0 with lse -inf, never NaN, provided an empty side's ``out`` is finite.
    """
    lse = lse.float()
    new = torch.logaddexp(lse_acc, lse)
    safe = torch.where(torch.isinf(new), torch.zeros_like(new), new)
    w_old = torch.exp(lse_acc - safe).unsqueeze(-1)
    w_new = torch.exp(lse - safe).unsqueeze(-1)
    # one fused multiply-add, reading ``out`` in its own dtype (no fp32 copy of it)
    out_acc.mul_(w_old).addcmul_(out, w_new)
    lse_acc.copy_(new)
