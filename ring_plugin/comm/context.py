"""Which process group a ring attention layer uses at forward time.

A layer built with ``process_group=None`` asks :func:`resolve_ring` at every forward. The answer is,
in order: the ring context that is active (set by the Lightning strategy, or by the user with
:func:`ring_context`); a ring of ``ring_size`` adjacent ranks of the default group; the default group
when ``torch.distributed`` is initialised; otherwise a single process (no communication).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch.distributed as dist

from ..layout import check_layout


@dataclass(frozen=True)
class RingContext:
    """The ring a layer runs on: its process group (None = single process) and shard layout."""

    group: dist.ProcessGroup | None
    layout: str = "contiguous"

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group) if self.group is not None else 1

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group) if self.group is not None else 0


_ACTIVE: list[RingContext] = []
_SUBGROUPS: dict[int, dist.ProcessGroup] = {}


@contextlib.contextmanager
def ring_context(group: dist.ProcessGroup | None, layout: str = "contiguous") -> Iterator[RingContext]:
    """Make ``group``/``layout`` the ring of every layer built with ``process_group=None``."""
    ctx = set_ring_context(group, layout)
    try:
        yield ctx
    finally:
        _ACTIVE.remove(ctx)


def set_ring_context(group: dist.ProcessGroup | None, layout: str = "contiguous") -> RingContext:
    """Activate a ring context until :func:`clear_ring_context` (what a strategy does at setup)."""
    check_layout(layout)
    ctx = RingContext(group, layout)
    _ACTIVE.append(ctx)
    return ctx


def clear_ring_context() -> None:
    _ACTIVE.clear()


def current_ring_context() -> RingContext | None:
    return _ACTIVE[-1] if _ACTIVE else None


def adjacent_ring_group(ring_size: int) -> dist.ProcessGroup:
    """The group of ``ring_size`` adjacent ranks that holds this rank (created once, on every rank)."""
    world = dist.get_world_size()
    if ring_size <= 0 or world % ring_size:
        raise ValueError(f"ring_size={ring_size} must be a positive divisor of the world size {world}")
    if ring_size == world:
        return dist.group.WORLD
    if ring_size not in _SUBGROUPS:
        # new_group is collective: every rank creates every ring, in the same order.
        mine = None
        for start in range(0, world, ring_size):
            g = dist.new_group(list(range(start, start + ring_size)))
            if start <= dist.get_rank() < start + ring_size:
                mine = g
        _SUBGROUPS[ring_size] = mine
    return _SUBGROUPS[ring_size]


def resolve_ring(
    process_group: dist.ProcessGroup | None, ring_size: int | None, layout: str | None
) -> RingContext:
    """The ring context a layer should use now (see the module docstring for the order)."""
    if process_group is not None:
        return RingContext(process_group, layout or "contiguous")
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
        return active
    if dist.is_available() and dist.is_initialized():
        size = ring_size if ring_size is not None else dist.get_world_size()
        return RingContext(adjacent_ring_group(size), layout or "contiguous")
    if ring_size not in (None, 1):
        raise ValueError(
            f"ring_size={ring_size} needs torch.distributed to be initialised (e.g. run under torchrun); "
            "in a single process the ring size is 1"
        )
    return RingContext(None, layout or "contiguous")
