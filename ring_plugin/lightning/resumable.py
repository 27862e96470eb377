"""A dataloader wrapper that resumes mid-epoch without loading the batches it skips.

Lightning saves the wrapper's ``state_dict`` (the epoch and the batches of it already trained on) with
the loops, and calls ``load_state_dict`` before iterating again. The next iteration then starts at that
batch: the sampler is told to start there when it can (``start_at(batch)``, as
:class:`~ring_plugin.data.StepSampler` can, at the cost of nothing), otherwise the skipped batches are
loaded and dropped, which is slow for long sequences and says so once.

The position comes from the trainer's progress counters, not from counting what this wrapper yields:
Lightning fetches a batch ahead, so the wrapper cannot tell what was trained on.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any


def train_position(trainer: Any) -> dict[str, int]:
    """Epoch and number of batches of it already trained on."""
    fit_loop = trainer.fit_loop
    return {"epoch": fit_loop.epoch_progress.current.processed,
            "batches": fit_loop.epoch_loop.batch_progress.current.processed}


def _skipping_sampler(loader: Any) -> Any | None:
    """The sampler that decides the batches' samples, if it can start at a given batch of ``loader``.

    A sample sampler under a ``BatchSampler`` qualifies only if its steps are the loader's batches
    (same ``batch_size``), as in :class:`~ring_plugin.data.RingDataModule`.
    """
    batch_sampler = getattr(loader, "batch_sampler", None)
    if callable(getattr(batch_sampler, "start_at", None)):
        return batch_sampler
    sampler = getattr(batch_sampler, "sampler", None) if batch_sampler is not None else getattr(loader, "sampler", None)
    same_batches = batch_sampler is None or getattr(sampler, "batch_size", None) == batch_sampler.batch_size
    return sampler if callable(getattr(sampler, "start_at", None)) and same_batches else None


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
        skip = resume["batches"] if resume is not None and resume["epoch"] == self._position()["epoch"] else 0
        sampler = _skipping_sampler(self.loader) if skip else None
        if sampler is not None:
            sampler.start_at(skip)  # the sampler's next pass begins at that batch: nothing is loaded
            skip = 0
        it = iter(self.loader)
        if skip:
            warnings.warn(
                f"resuming by loading and dropping {skip} batch(es): give the loader's sampler a "
                "start_at(batch) method (as ring_plugin.data.StepSampler has) to skip them for free",
                stacklevel=2,
            )
            for _ in zip(range(skip), it):
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
