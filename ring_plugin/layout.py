"""Sequence shard layouts: which global positions each rank of a ring holds.

``contiguous``: rank r holds chunk r of k equal chunks.
``zigzag``: the sequence is cut into 2k chunks; rank r holds chunks r and 2k-1-r, which balances the
work of causal attention across ranks.

Every layout is described by the list of global chunk indices a rank holds (ascending, so local
order equals global order) and the chunk length; everything else is derived from that.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

LAYOUTS = ("contiguous", "zigzag")


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not a known shard layout; valid: {', '.join(LAYOUTS)}")


def chunks_per_rank(layout: str) -> int:
    check_layout(layout)
    return 1 if layout == "contiguous" else 2


def sequence_divisor(layout: str, world_size: int) -> int:
    """The number the global sequence length must be a multiple of."""
    return chunks_per_rank(layout) * world_size


def rank_chunks(layout: str, rank: int, world_size: int) -> tuple[int, ...]:
    """Global chunk indices held by ``rank``, ascending."""
    check_layout(layout)
    if layout == "contiguous":
        return (rank,)
    return (rank, 2 * world_size - 1 - rank)


def global_positions(
    n_local: int, layout: str, rank: int, world_size: int, device: torch.device | None = None
) -> torch.Tensor:
    """Global positions (int64) of the ``n_local`` rows a rank holds, in local order."""
    chunks = rank_chunks(layout, rank, world_size)
    if n_local % len(chunks):
        raise ValueError(
            f"local sequence length {n_local} is not a multiple of {len(chunks)} ({layout} layout)"
        )
    c = n_local // len(chunks)
    return torch.cat([torch.arange(i * c, (i + 1) * c, device=device) for i in chunks])


@dataclass(frozen=True)
class ShardLayout:
    """Which global chunks every rank of a ring holds: ``chunks[r]`` ascending, all of equal length.

    The engine and the planners read only this, so a layout is data, not a name: the named layouts
    build it from the ring size alone.
    """

    name: str
    chunks: tuple[tuple[int, ...], ...]

    @classmethod
    def named(cls, layout: str, world_size: int) -> ShardLayout:
        return cls(layout, tuple(rank_chunks(layout, r, world_size) for r in range(world_size)))

    @property
    def world_size(self) -> int:
        return len(self.chunks)

    @property
    def chunks_per_rank(self) -> int:
        return len(self.chunks[0])

    def positions(self, n_local: int, rank: int, device: torch.device | None = None) -> torch.Tensor:
        """Global positions (int64) of the ``n_local`` rows ``rank`` holds, in local order."""
        c = n_local // self.chunks_per_rank
        return torch.cat([torch.arange(i * c, (i + 1) * c, device=device) for i in self.chunks[rank]])


def shard_sequence(x: torch.Tensor, dim: int, layout: str, rank: int, world_size: int) -> torch.Tensor:
    """The shard of the full-sequence tensor ``x`` (along ``dim``) that ``rank`` holds."""
    n = x.shape[dim]
    div = sequence_divisor(layout, world_size)
    if n % div:
        raise ValueError(
            f"sequence length {n} (dim {dim}) must be a multiple of {div} for layout={layout!r} "
            f"with ring size {world_size}"
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must lie in [0, {world_size})")
    pieces = x.chunk(div, dim=dim)
    return torch.cat([pieces[i] for i in rank_chunks(layout, rank, world_size)], dim=dim)


def unshard_sequence(shards: list[torch.Tensor], dim: int, layout: str) -> torch.Tensor:
    """Reassemble the full sequence from every rank's shard (index = rank)."""
    world_size = len(shards)
    per = chunks_per_rank(layout)
    pieces: list[torch.Tensor | None] = [None] * (per * world_size)
    for rank, shard in enumerate(shards):
        for idx, piece in zip(rank_chunks(layout, rank, world_size), shard.chunk(per, dim=dim)):
            pieces[idx] = piece
    return torch.cat(pieces, dim=dim)  # type: ignore[arg-type]


def gather_sequence(
    x_local: torch.Tensor, dim: int, layout: str, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """All-gather every rank's shard and return the full sequence on every rank (no autograd)."""
    if not (dist.is_available() and dist.is_initialized()):
        return unshard_sequence([x_local], dim, layout)
    world_size = dist.get_world_size(group)
    bufs = [torch.empty_like(x_local) for _ in range(world_size)]
    dist.all_gather(bufs, x_local.contiguous(), group=group)
    return unshard_sequence(bufs, dim, layout)
