"""Bytes of tensors alive during a computation on any device, counted by storage, with the peak and
what was alive there (CPU-friendly: no allocator hooks needed).

``LiveBytes()`` is a ``TorchDispatchMode``: every storage an operator returns while it is active is
counted once (views and in-place results share their storage) until Python frees it, so ``peak`` is the
highest sum of the storages created inside it that were alive at one time, ``at_peak`` splits that sum
by the ``label`` set when each storage was created (``with probe.label("loss"): ...``, or ``current``
set from a hook) and ``peak_by_label`` is the highest total reached while each label was set. Storages
that existed before are not counted (name them in ``exclude``: parameters and inputs, whose views an
operator returns); nor is scratch memory an operator allocates and frees inside its own kernel (a fused
kernel's workspace), which only a device allocator sees.

``saved_bytes(fn)`` runs ``fn`` under ``saved_tensors_hooks`` and sums, by label, the unique storages
autograd saves for backward (parameters excluded).
"""

from __future__ import annotations

import contextlib
import weakref
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        # Storages that exist already (parameters, inputs): their views are not new memory.
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude if isinstance(t, torch.Tensor)}
        self.live: dict[int, tuple[int, str]] = {}  # storage data_ptr -> (bytes, label)
        self.now = 0
        self.peak = 0
        self.at_peak: dict[str, int] = {}  # the storages alive at the peak, by label
        self.peak_by_label: dict[str, int] = {}  # the highest total reached while each label was set
        self.current = "other"

    @contextlib.contextmanager
    def label(self, name: str) -> Iterator[None]:
        """Storages created inside carry ``name`` (the innermost label counts)."""
        outer, self.current = self.current, name
        try:
            yield
        finally:
            self.current = outer

    def breakdown(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for size, label in self.live.values():
            out[label] += size
        return dict(out)

    def _freed(self, ptr: int) -> None:
        size, _ = self.live.pop(ptr, (0, ""))
        self.now -= size

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            ptr, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or ptr in self.live or ptr in self.exclude:
                continue
            self.live[ptr] = (size, self.current)
            weakref.finalize(storage, self._freed, ptr)
            self.now += size
            self.peak_by_label[self.current] = max(self.peak_by_label.get(self.current, 0), self.now)
            if self.now > self.peak:
                self.peak = self.now
                self.at_peak = self.breakdown()
        return out


def saved_bytes(fn: Callable[[], Any], label: Callable[[], Hashable] = lambda: "all",
                exclude: set[int] | None = None) -> tuple[Any, dict[Hashable, int]]:
    """(``fn()``, bytes of the unique storages autograd saved for backward while it ran, by ``label()``
    at the time each was first saved); storages whose data_ptr is in ``exclude`` (parameters) are not
    counted."""
    seen: set[int] = set(exclude or ())
    found: dict[Hashable, int] = defaultdict(int)

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            found[label()] += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, dict(found)
