"""Process groups of a sequence-parallel world: data-parallel x ring, rings of adjacent ranks."""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class RingGroups:
    """This rank's ring (ranks holding shards of the same samples) and data-parallel group (ranks
    holding the same shard position of different samples)."""

    ring: dist.ProcessGroup | None
    data_parallel: dist.ProcessGroup | None
    ring_size: int
    ring_rank: int
    dp_size: int
    dp_rank: int


def check_ring_size(ring_size: int | None, world_size: int) -> int:
    """The ring size to use (default: the whole world); a clear error when it cannot split the world."""
    if ring_size is None:
        return world_size
    if ring_size <= 0 or world_size % ring_size:
        raise ValueError(
            f"ring_size={ring_size} must be a positive divisor of the world size {world_size} "
            f"(world = data-parallel x ring); valid: "
            f"{[d for d in range(1, world_size + 1) if world_size % d == 0]}"
        )
    return ring_size


_CACHE: dict[tuple[object, int], RingGroups] = {}


def build_ring_groups(ring_size: int) -> RingGroups:
    """Create every ring and data-parallel group (collective: all ranks, same order) and return this rank's.

    Cached per default group and ring size, so repeated ``Trainer.fit`` calls reuse the communicators.
    """
    key = (dist.group.WORLD, ring_size)
    if key not in _CACHE:
        _CACHE[key] = _new_ring_groups(ring_size)
    return _CACHE[key]


def _new_ring_groups(ring_size: int) -> RingGroups:
    world, rank = dist.get_world_size(), dist.get_rank()
    dp_size = world // ring_size
    # Always fresh groups, even when one spans the world: the ring's point-to-point traffic then has
    # its own communicator and never interleaves with DDP's/DeepSpeed's collectives on the default one.
    ring = dp = None
    for start in range(0, world, ring_size):
        g = dist.new_group(list(range(start, start + ring_size)))
        if start <= rank < start + ring_size:
            ring = g
    for offset in range(ring_size):
        g = dist.new_group(list(range(offset, world, ring_size)))
        if rank % ring_size == offset:
            dp = g
    return RingGroups(ring, dp, ring_size, rank % ring_size, dp_size, rank // ring_size)
