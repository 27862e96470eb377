"""Which process group a ring attention layer uses at forward time.

A layer built with ``process_group=None`` asks :func:`resolve_ring` at every forward. The answer is,
in order: the ring context that is active (set by the Lightning strategy, or by the user with
:func:`ring_context`); the mesh of ``ulysses_size`` x ``ring_size`` adjacent ranks of the default
group (:func:`~.topology.build_mesh`); the default group when ``torch.distributed`` is initialised;
otherwise a single process (no communication).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch.distributed as dist

from ..layout import ShardLayout, check_layout, merge_adjacent_ranks
from .topology import SequenceMesh, agree_sizes, build_mesh


@dataclass(frozen=True)
class RingContext:
    """What a layer runs on: the sequence-parallel mesh (its ``ring`` dimension is the ring; None =
    a single process) and the shard layout of the sequence over the mesh's ``sequence`` group.

    ``group``/``world_size``/``rank`` are the ring's; ``sequence_*`` the U x R ranks sharing a sample
    (the ring itself when there is no Ulysses dimension, ``ulysses_size`` 1)."""

    mesh: SequenceMesh
    layout: str = "contiguous"

    @classmethod
    def of(cls, group: dist.ProcessGroup | None, layout: str = "contiguous") -> RingContext:
        return cls(SequenceMesh.of_ring(group), layout)

    # The mesh's dimensions, read through: the ring's group, size and rank, the Ulysses group's and the
    # sequence group's (U x R ranks sharing a sample).
    group = property(lambda self: self.mesh.group("ring"))
    world_size = property(lambda self: self.mesh.size("ring"))
    rank = property(lambda self: self.mesh.rank("ring"))
    ulysses_group = property(lambda self: self.mesh.group("ulysses"))
    ulysses_size = property(lambda self: self.mesh.size("ulysses"))
    sequence_group = property(lambda self: self.mesh.group("sequence"))
    sequence_size = property(lambda self: self.mesh.size("sequence"))
    sequence_rank = property(lambda self: self.mesh.rank("sequence"))

    def engine_layout(self) -> ShardLayout:
        """The layout the ring engine runs in: the named layout over the sequence-parallel ranks with
        each Ulysses group's chunks merged into one ring rank (no Ulysses: the ring's named layout)."""
        return merge_adjacent_ranks(ShardLayout.named(self.layout, self.sequence_size), self.ulysses_size)


_ACTIVE: list[RingContext] = []


@contextlib.contextmanager
def ring_context(group: dist.ProcessGroup | None, layout: str = "contiguous",
                 mesh: SequenceMesh | None = None) -> Iterator[RingContext]:
    """Make ``group``/``layout`` the ring of every layer built with ``process_group=None``; a ``mesh``
    (``build_mesh(ring_size, ulysses_size)``: Ulysses x ring) replaces ``group``."""
    ctx = set_ring_context(group, layout, mesh)
    try:
        yield ctx
    finally:
        _ACTIVE.remove(ctx)


def set_ring_context(
    group: dist.ProcessGroup | None, layout: str = "contiguous", mesh: SequenceMesh | None = None
) -> RingContext:
    """Activate a ring context until :func:`clear_ring_context` (what a strategy does at setup, with
    its whole ``mesh``; ``group`` is then the mesh's ring)."""
    check_layout(layout)
    ctx = RingContext(mesh if mesh is not None else SequenceMesh.of_ring(group), layout)
    _ACTIVE.append(ctx)
    return ctx


def clear_ring_context() -> None:
    _ACTIVE.clear()


def current_ring_context() -> RingContext | None:
    return _ACTIVE[-1] if _ACTIVE else None


def resolve_ring(
    process_group: dist.ProcessGroup | None, ring_size: int | None, layout: str | None,
    ulysses_size: int | None = None, timeout: float | None = None,
) -> RingContext:
    """The ring context a layer should use now (see the module docstring for the order)."""
    if process_group is not None:
        if ulysses_size not in (None, 1):
            raise ValueError(
                f"ulysses_size={ulysses_size} needs Ulysses and ring groups, which one process_group does not "
                "describe: leave process_group=None and use a strategy or ring_context(None, layout, "
                "mesh=build_mesh(ring_size, ulysses_size))"
            )
        return RingContext.of(process_group, layout or "contiguous")
    active = current_ring_context()
    if active is not None:
        if layout is not None and layout != active.layout:
            raise ValueError(
                f"layout={layout!r} on the layer disagrees with the active ring's layout "
                f"{active.layout!r}; the layout is a model-wide choice owned by the strategy"
            )
        if ring_size is not None and ring_size != active.world_size:
            raise ValueError(
                f"ring_size={ring_size} on the layer disagrees with the active ring of size {active.world_size}"
            )
        if ulysses_size is not None and ulysses_size != active.ulysses_size:
            raise ValueError(f"ulysses_size={ulysses_size} on the layer disagrees with the active mesh's "
                             f"ulysses_size {active.ulysses_size}")
        return active
    if dist.is_available() and dist.is_initialized():
        agree_sizes(ring_size, ulysses_size, timeout)  # at the first call with these sizes, on every rank
        ulysses = ulysses_size or 1
        if ulysses == 1 and ring_size in (None, dist.get_world_size()):
            # The default group itself: no group creation (a collective with no timeout) in a forward.
            return RingContext.of(dist.group.WORLD, layout or "contiguous")
        return RingContext(build_mesh(ring_size, ulysses), layout or "contiguous")
    for name, size in (("ring_size", ring_size), ("ulysses_size", ulysses_size)):
        if size not in (None, 1):
            raise ValueError(
                f"{name}={size} needs torch.distributed to be initialised (e.g. run under torchrun); "
                f"in a single process the {name.replace('_', ' ')} is 1"
            )
    return RingContext.of(None, layout or "contiguous")
