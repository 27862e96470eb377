"""``RingDataModule``: train/val datasets behind step-indexed samplers, ready for sequence sharding.

Batches hold full-length sequences; the ring strategy shards them along the sequence. Ranks of one
ring share a data-parallel rank (``strategy.distributed_sampler_kwargs``) and so get the same samples.
Training data is endless (``max_steps`` ends the run) and its order depends only on the step, so the
ring strategy's resumable loader can replay a run exactly. Set the trainer's
``use_distributed_sampler=False``: the sampler already splits the data between rings.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset

from .stream import StepSampler


class RingDataModule(pl.LightningDataModule):
    def __init__(self, train: Dataset, val: Dataset | None = None, batch_size: int = 1, val_batches: int = 4,
                 num_workers: int = 0):
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"data.batch_size={batch_size} must be positive")
        self.train_set = train
        self.val_set = val
        self.batch_size = batch_size
        self.val_batches = val_batches
        self.num_workers = num_workers

    def _replica(self) -> tuple[int, int]:
        kwargs: dict[str, Any] = {}
        if self.trainer is not None:
            kwargs = getattr(self.trainer.strategy, "distributed_sampler_kwargs", None) or {}
        return int(kwargs.get("rank", 0)), int(kwargs.get("num_replicas", 1))

    def _loader(self, dataset: Dataset, num_steps: int | None) -> DataLoader:
        rank, replicas = self._replica()
        sampler = StepSampler(len(dataset), self.batch_size, rank, replicas, num_steps)  # type: ignore[arg-type]
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, None)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None or self.val_batches <= 0:
            return []
        return self._loader(self.val_set, self.val_batches)
