"""A sampler whose batches depend only on the step number, so a replayed run sees the same data.

Batch ``step`` of data-parallel replica ``rank`` (of ``num_replicas``) holds samples
``(step * num_replicas + rank) * batch_size + i`` (modulo the dataset length). The data a step sees
depends only on the step number, so starting at batch ``k`` (``start_at(k)``, pure arithmetic, no
sample is loaded) reproduces an uninterrupted run exactly, and every rank of one ring (same
data-parallel rank) gets the same samples.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import Sampler


class StepSampler(Sampler[int]):
    def __init__(self, dataset_len: int, batch_size: int, rank: int = 0, num_replicas: int = 1,
                 num_steps: int | None = None):
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size} must be positive")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank} must lie in [0, num_replicas={num_replicas})")
        if dataset_len <= 0:
            raise ValueError("the dataset is empty")
        self.dataset_len = dataset_len
        self.batch_size = batch_size
        self.rank = rank
        self.num_replicas = num_replicas
        self.num_steps = num_steps  # None: endless (training runs until max_steps)
        self._start = 0

    def start_at(self, step: int) -> None:
        """Begin the next pass at batch ``step`` (once; later passes start at 0): how a run resumes."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"start_at(step={step!r}): step must be a non-negative integer")
        self._start = step

    def __iter__(self) -> Iterator[int]:
        step, self._start = self._start, 0
        while self.num_steps is None or step < self.num_steps:
            first = (step * self.num_replicas + self.rank) * self.batch_size
            for i in range(self.batch_size):
                yield (first + i) % self.dataset_len
            step += 1

    def __len__(self) -> int:
        if self.num_steps is None:
            raise TypeError("an endless StepSampler has no length")
        return self.num_steps * self.batch_size
