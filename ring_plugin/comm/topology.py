"""The process groups of a sequence-parallel world, built in one place and named by dimension.

World = data parallel (``dp``) x ring (``ring``): rings are adjacent ranks (``[s, s + ring_size)``),
so a ring stays inside a node where it can; the data-parallel group of a rank holds the ranks at the
same position of every ring. Each rank sees its groups as a :class:`SequenceMesh`, whose dimension
names are what the layers and strategies ask for (``mesh.group("ring")``); more dimensions (such as
a Ulysses group) are more names, not more plumbing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class SequenceMesh:
    """This rank's process group along each named dimension (None: a dimension of size 1)."""

    dims: tuple[tuple[str, dist.ProcessGroup | None], ...]

    @classmethod
    def of_ring(cls, ring: dist.ProcessGroup | None) -> SequenceMesh:
        """A mesh with only a ring (what a user-supplied group or ``ring_context`` describes)."""
        return cls((("ring", ring),))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.dims)

    def group(self, name: str) -> dist.ProcessGroup | None:
        for dim, group in self.dims:
            if dim == name:
                return group
        raise KeyError(f"the mesh has no dimension {name!r}; it has {self.names}")

    def size(self, name: str) -> int:
        group = self.group(name)
        return dist.get_world_size(group) if group is not None else 1

    def rank(self, name: str) -> int:
        group = self.group(name)
        return dist.get_rank(group) if group is not None else 0


def check_ring_size(ring_size: int | None, world_size: int) -> int:
    """The ring size to use (default: the whole world); a clear error when it cannot split the world."""
    if ring_size is None:
        return world_size
    if isinstance(ring_size, bool) or not isinstance(ring_size, int) or ring_size <= 0 or world_size % ring_size:
        raise ValueError(
            f"ring_size={ring_size!r} must be a positive divisor of the world size {world_size} "
            f"(world = data-parallel x ring); valid: "
            f"{[d for d in range(1, world_size + 1) if world_size % d == 0]}"
        )
    return ring_size


_MESHES: dict[tuple[object, int], SequenceMesh] = {}  # one entry per (default group, ring size)


def build_mesh(ring_size: int) -> SequenceMesh:
    """Create every ring and data-parallel group (collective: all ranks, same order) and return this
    rank's mesh. Cached per default group and ring size, so repeated calls reuse the communicators.

    Groups are always fresh, even one spanning the world: the ring's point-to-point traffic then has
    its own communicator and never interleaves with DDP's/DeepSpeed's collectives on the default one.
    """
    world = dist.get_world_size()
    ring_size = check_ring_size(ring_size, world)
    key = (dist.group.WORLD, ring_size)
    if key not in _MESHES:
        rank = dist.get_rank()
        ring = dp = None
        for start in range(0, world, ring_size):
            g = dist.new_group(list(range(start, start + ring_size)))
            if start <= rank < start + ring_size:
                ring = g
        for offset in range(ring_size):
            g = dist.new_group(list(range(offset, world, ring_size)))
            if rank % ring_size == offset:
                dp = g
        _MESHES[key] = SequenceMesh((("dp", dp), ("ring", ring)))
    return _MESHES[key]
