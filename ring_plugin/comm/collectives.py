"""Differentiable all-gather of a sharded sequence (used by the oracle variant only)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..layout import ShardLayout, gather_sequence, shard_sequence


class _AllGatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, layout: str | ShardLayout, group):  # type: ignore[override]
        ctx.dim, ctx.layout, ctx.group = dim, layout, group
        return gather_sequence(x, dim, layout, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous()
        # Every rank used the whole sequence: the gradient of a shard is the sum over ranks.
        dist.all_reduce(grad, group=ctx.group)
        world, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        return shard_sequence(grad, ctx.dim, ctx.layout, rank, world), None, None, None


def all_gather_sequence(
    x: torch.Tensor, dim: int, layout: str | ShardLayout, group: dist.ProcessGroup | None
) -> torch.Tensor:
    """The full sequence on every rank, with gradients flowing back to each rank's shard."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _AllGatherSequence.apply(x, dim, layout, group)
