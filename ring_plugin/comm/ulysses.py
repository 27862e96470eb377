"""The Ulysses all-to-all: heads for sequence within a group of U ranks, with autograd.

Member ``u`` of a group holds its shard's rows for every head, ``(B, n, H, D)``; after
:func:`scatter_heads` it holds the rows of all U members for heads ``[u H/U, (u + 1) H/U)``,
``(B, U n, H/U, D)``. Each member's shard is a list of equal chunks, and ``order`` lays the gathered
chunks out: position p holds chunk ``order[p]`` of the members' chunks laid end to end (member order,
each member's chunks in its local order), which puts them in ascending global order
(:func:`ring_plugin.layout.merged_order`). :func:`gather_heads` is the exact inverse. Both move every
element to exactly one place, so the backward of each is the other.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _all_to_all(send: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """``send[j]`` goes to member j; the result's ``[j]`` came from member j."""
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv


def _heads_to_sequence(x: torch.Tensor, group: dist.ProcessGroup | None, order: tuple[int, ...]) -> torch.Tensor:
    b, n, h, d = x.shape
    u = dist.get_world_size(group)
    per_member = len(order) // u
    send = x.view(b, n, u, h // u, d).permute(2, 0, 1, 3, 4).contiguous()  # [j]: the heads member j gets
    recv = _all_to_all(send, group).view(u, b, per_member, n // per_member, h // u, d)
    return torch.stack([recv[i // per_member, :, i % per_member] for i in order], dim=1).view(b, u * n, h // u, d)


def _sequence_to_heads(y: torch.Tensor, group: dist.ProcessGroup | None, order: tuple[int, ...]) -> torch.Tensor:
    b, length, hu, d = y.shape
    u = dist.get_world_size(group)
    per_member = len(order) // u
    chunk = length // len(order)
    place = {piece: p for p, piece in enumerate(order)}
    pieces = y.view(b, len(order), chunk, hu, d)
    send = torch.stack([pieces[:, place[i]] for i in range(len(order))])  # member-major: [j] = member j's rows
    recv = _all_to_all(send, group).view(u, per_member, b, chunk, hu, d)  # [j]: my rows, member j's heads
    return recv.permute(2, 1, 3, 0, 4, 5).reshape(b, length // u, u * hu, d)


class _UlyssesAllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup | None, order: tuple[int, ...],  # type: ignore[override]
                to_sequence: bool) -> torch.Tensor:
        ctx.group, ctx.order, ctx.to_sequence = group, order, to_sequence
        return (_heads_to_sequence if to_sequence else _sequence_to_heads)(x, group, order)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        back = _sequence_to_heads if ctx.to_sequence else _heads_to_sequence
        return back(grad, ctx.group, ctx.order), None, None, None


def scatter_heads(x: torch.Tensor, group: dist.ProcessGroup | None, order: tuple[int, ...]) -> torch.Tensor:
    """``(B, n, H, D)`` shard of every head -> ``(B, U n, H/U, D)``: the group's rows, this member's heads."""
    return _UlyssesAllToAll.apply(x, group, order, True)


def gather_heads(y: torch.Tensor, group: dist.ProcessGroup | None, order: tuple[int, ...]) -> torch.Tensor:
    """The inverse of :func:`scatter_heads`: ``(B, U n, H/U, D)`` -> ``(B, n, H, D)``."""
    return _UlyssesAllToAll.apply(y, group, order, False)
