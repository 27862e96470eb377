"""One number agreed by every rank (a tiny all-reduce; the value itself when not distributed)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_reduce_scalar(value: float, op: dist.ReduceOp, device: torch.device) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return float(t.item())


def all_ranks(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` holds on every rank."""
    return all_reduce_scalar(float(flag), dist.ReduceOp.MIN, device) > 0
