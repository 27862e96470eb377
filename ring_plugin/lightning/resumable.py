"""A dataloader wrapper that resumes mid-epoch: Lightning saves its ``state_dict`` with the loops and
calls ``load_state_dict`` before iterating again, and the next iteration skips the batches that the
interrupted run had already trained on."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any


class ResumableLoader:
    """Wraps an iterable dataloader; ``position()`` says how many batches of the current epoch are done.

    Attribute access (``sampler``, ``batch_sampler``, ``dataset`` ...) goes to the wrapped loader, so
    Lightning still calls ``set_epoch`` on the distributed sampler.
    """

    _OWN = ("loader", "_position", "_resume")

    def __init__(self, loader: Any, position: Callable[[], dict[str, int]]):
        self.loader = loader
        self._position = position
        self._resume: dict[str, int] | None = None

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning sets e.g. worker_init_fn after wrapping: it belongs to the wrapped loader.
        if name in self._OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self.loader, name, value)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        resume, self._resume = self._resume, None
        it = iter(self.loader)
        if resume is not None and resume["epoch"] == self._position()["epoch"]:
            # Replays the sampler's order for this epoch and drops what was already trained on.
            for _ in zip(range(resume["batches"]), it):
                pass
        yield from it

    def __getattr__(self, name: str) -> Any:
        if name in self._OWN:  # not set yet (e.g. during unpickling)
            raise AttributeError(name)
        return getattr(self.loader, name)

    def state_dict(self) -> dict[str, int]:
        return dict(self._position())

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = dict(state)
