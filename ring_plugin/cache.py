"""The one cache policy of the package: small, bounded, least-recently-used.

Plans (which rows meet which, who sends what) are pure functions of what defines them — ring
geometry, shapes, the pattern's parameters — so they are worth building once. Every cache is a
:class:`BoundedCache` keyed by exactly those things, so a long run over many shapes cannot grow memory
without bound. What a batch defines (its layout, its documents' blocks) lives in the batch's shard plan
(:mod:`ring_plugin.shard_plan`) and goes with it, so nothing is kept by a batch's content.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class BoundedCache(Generic[T]):
    """A least-recently-used map of at most ``max_entries`` values."""

    def __init__(self, max_entries: int = 64):
        if max_entries <= 0:
            raise ValueError(f"max_entries={max_entries} must be positive")
        self.max_entries = max_entries
        self._items: OrderedDict[Hashable, T] = OrderedDict()

    def get(self, key: Hashable, build: Callable[[], T]) -> T:
        """The value for ``key``, built with ``build()`` on a miss (evicting the oldest entry when full)."""
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = build()
        self._items[key] = value
        if len(self._items) > self.max_entries:
            self._items.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        self._items.clear()
