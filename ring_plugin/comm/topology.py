"""The process groups of a sequence-parallel world, built in one place and named by dimension.

World = data parallel (``dp``) x Ulysses (``ulysses``) x ring (``ring``). The ``sequence`` group is
the U x R ranks that share one sample, adjacent ranks ``[b * U * R, (b + 1) * U * R)``; inside it,
sequence-parallel rank ``s = r * U + u``: Ulysses groups are adjacent ranks (their all-to-all stays
inside a node), rings run across the Ulysses groups (rank ``u`` of every group). With U = 1 the ring
is the sequence group (rings of adjacent ranks, as before Ulysses existed). The data-parallel group
of a rank holds the ranks at the same sequence position of every sample. Each rank sees its groups as
a :class:`SequenceMesh`, whose dimension names are what the layers and strategies ask for
(``mesh.group("ring")``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..cache import BoundedCache
from .agreement import gather_rows


@dataclass(frozen=True)
class SequenceMesh:
    """This rank's process group along each named dimension (None: a dimension of size 1)."""

    dims: tuple[tuple[str, dist.ProcessGroup | None], ...]

    @classmethod
    def of_ring(cls, ring: dist.ProcessGroup | None) -> SequenceMesh:
        """A mesh with only a ring (what a user-supplied group or ``ring_context`` describes): no
        Ulysses dimension, the ring is the whole sequence group."""
        return cls((("ulysses", None), ("ring", ring), ("sequence", ring)))

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


def check_ulysses_size(ulysses_size: int) -> int:
    if isinstance(ulysses_size, bool) or not isinstance(ulysses_size, int) or ulysses_size < 1:
        raise ValueError(f"ulysses_size={ulysses_size!r} must be a positive integer (1: no Ulysses all-to-all)")
    return ulysses_size


def check_sequence_sizes(ring_size: int | None, ulysses_size: int, world_size: int) -> tuple[int, int]:
    """``(ring_size, ulysses_size)`` to use (default ring: the rest of the world after the Ulysses
    groups); a clear error when ulysses x ring cannot split the world."""
    ulysses_size = check_ulysses_size(ulysses_size)
    if ulysses_size == 1:
        return check_ring_size(ring_size, world_size), 1
    if world_size % ulysses_size:
        raise ValueError(f"ulysses_size={ulysses_size} must divide the world size {world_size} "
                         "(world = data-parallel x ulysses x ring)")
    rest = world_size // ulysses_size
    if ring_size is None:
        return rest, ulysses_size
    if isinstance(ring_size, bool) or not isinstance(ring_size, int) or ring_size <= 0 or rest % ring_size:
        raise ValueError(
            f"ring_size={ring_size!r} x ulysses_size={ulysses_size} must divide the world size {world_size} "
            f"(world = data-parallel x ulysses x ring); valid ring sizes: "
            f"{[d for d in range(1, rest + 1) if rest % d == 0]}"
        )
    return ring_size, ulysses_size


# Meshes per (default group, ring size, Ulysses size): every rank asks for the same ones in the same
# order, so every rank keeps and evicts the same entries and a rebuilt mesh is built by all of them.
_MESHES: BoundedCache[SequenceMesh] = BoundedCache(8)
_AGREED: BoundedCache[bool] = BoundedCache(8)  # sizes the ranks already agreed on, per default group


def agree_sizes(ring_size: int | None, ulysses_size: int | None, timeout: float | None = None) -> None:
    """Refuse, on every rank at once, sizes that the ranks of the default group disagree on (one
    all-gather the first time each pair is asked for): a layer built with another ``ulysses_size`` or
    ``ring_size`` on one rank would otherwise create other groups than its peers and wait for them.
    ``timeout``: seconds to wait for the peers (the layer's ``comm_timeout``)."""
    if dist.get_world_size() > 1:
        _AGREED.get((dist.group.WORLD, ring_size, ulysses_size), lambda: _agree(ring_size, ulysses_size, timeout))


def _agree(ring_size: int | None, ulysses_size: int | None, timeout: float | None) -> bool:
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    mine = torch.tensor([ring_size or 0, ulysses_size or 0], dtype=torch.int64, device=device)
    rows = gather_rows(mine, None, timeout, f"size check, world of {dist.get_world_size()}")
    if any(row != rows[0] for row in rows):
        sizes = {r: {"ring_size": row[0] or None, "ulysses_size": row[1] or None} for r, row in enumerate(rows)}
        raise ValueError(f"ranks build their layers with different sizes (None: the default): {sizes}; every "
                         "rank must pass the same ring_size and ulysses_size")
    return True


def build_mesh(ring_size: int | None, ulysses_size: int = 1) -> SequenceMesh:
    """Create every group of the world (collective: all ranks, same order) and return this rank's
    mesh (see the module docstring for the numbering). Kept per default group and sizes, so
    repeated calls reuse the communicators.

    Groups are always fresh, even one spanning the world: the ring's point-to-point traffic then has
    its own communicator and never interleaves with DDP's/DeepSpeed's collectives on the default one.
    """
    world = dist.get_world_size()
    ring_size, ulysses_size = check_sequence_sizes(ring_size, ulysses_size, world)
    return _MESHES.get((dist.group.WORLD, ring_size, ulysses_size), lambda: _new_mesh(ring_size, ulysses_size))


def _new_mesh(ring_size: int, ulysses_size: int) -> SequenceMesh:
    """Every group of the mesh, created by all ranks in one order."""
    world = dist.get_world_size()
    rank = dist.get_rank()
    seq = ring_size * ulysses_size

    def new_groups(rank_lists: list[list[int]]) -> dist.ProcessGroup | None:
        """Create every group (all ranks take part in each creation); return this rank's."""
        mine = None
        for ranks in rank_lists:
            g = dist.new_group(ranks)
            if rank in ranks:
                mine = g
        return mine

    starts = range(0, world, seq)
    if ulysses_size == 1:
        ring = sequence = new_groups([list(range(b, b + seq)) for b in starts])
        ulysses = None
    else:
        sequence = new_groups([list(range(b, b + seq)) for b in starts])
        ulysses = new_groups([list(range(b + g, b + g + ulysses_size)) for b in starts
                              for g in range(0, seq, ulysses_size)])
        ring = new_groups([list(range(b + u, b + seq, ulysses_size)) for b in starts
                           for u in range(ulysses_size)])
    dp = new_groups([list(range(s, world, seq)) for s in range(seq)])
    return SequenceMesh((("dp", dp), ("ulysses", ulysses), ("ring", ring), ("sequence", sequence)))
