"""``RingProgressBar``: Lightning's bar without ``v_num`` (a logger version, not a training number); ``ProgressLines``:
a plain line every N steps, where the output is not a terminal."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, TQDMProgressBar


class RingProgressBar(TQDMProgressBar):
    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


class ProgressLines(Callback):
    """A line every ``every`` steps (and at the last) instead of a bar, for output that is not a terminal: a
    redirected bar rewrites itself thousands of times into the file."""

    def __init__(self, every: int):
        if every < 1:
            raise ValueError(f"every={every} must be >= 1")
        self.every = every

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or (step % self.every and step != trainer.max_steps):
            return
        metrics = trainer.progress_bar_metrics
        shown = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))
        print(f"step {step}/{trainer.max_steps}  {shown}".rstrip(), flush=True)
