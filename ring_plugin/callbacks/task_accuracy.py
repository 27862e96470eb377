"""``TaskAccuracy``: did the model learn the synthetic task? Logged as ``val/task_acc`` and ``val/token_acc``.

``val/task_acc`` is the share of validation samples whose every scored token (the passkey digits, the
queried values) is predicted exactly; ``val/token_acc`` the share of scored tokens. A sample's tokens
may sit on several ranks of a ring, so per-sample error counts are summed over the ring first.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from ..comm.context import current_ring_context
from ..data.tasks import answer_accuracy
from ..sharding import batch_documents


class TaskAccuracy(Callback):
    def __init__(self) -> None:
        self.last: dict[str, float] = {}
        self._sums = torch.zeros(4, dtype=torch.float64)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sums = torch.zeros(4, dtype=torch.float64, device=pl_module.device)

    @torch.no_grad()
    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        # The batch's documents and layout travel in its shard plan: packed samples attend within documents.
        logits = pl_module(batch["input_ids"], batch["position_ids"], batch_documents(batch))
        wrong, scored = answer_accuracy(logits, batch["labels"])
        counts = torch.stack([wrong, scored]).to(torch.float64)
        ring = current_ring_context()
        if ring is not None and ring.sequence_group is not None:  # every rank holding a shard of the samples
            dist.all_reduce(counts, group=ring.sequence_group)
        wrong, scored = counts
        has_answer = scored > 0
        self._sums += torch.stack([((wrong == 0) & has_answer).sum(), has_answer.sum(), scored.sum() - wrong.sum(),
                                   scored.sum()]).to(self._sums)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sums = self._sums.clone()
        # Ranks of a sequence-parallel group hold identical counts, so the ratios over the whole world are unaffected.
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
        exact, samples, right, scored = sums.tolist()
        if samples == 0:
            return
        self.last = {"val/task_acc": exact / samples, "val/token_acc": right / max(scored, 1.0)}
        pl_module.log("val/task_acc", self.last["val/task_acc"], prog_bar=True, rank_zero_only=True)
        pl_module.log("val/token_acc", self.last["val/token_acc"], rank_zero_only=True)
