"""``FinalCheckpoint``: training never ends without a validation and a checkpoint of its last step.

At the last step (``max_steps``, or a clean stop such as SIGTERM) it asks Lightning to stop, which runs a
validation after that step even off ``val_check_interval``; when training ends it writes a checkpoint of
the last step (unless one exists) and points ``last.ckpt`` at the newest checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from .checkpointing import AtomicModelCheckpoint

LAST = "last.ckpt"


class FinalCheckpoint(Callback):
    def __init__(self) -> None:
        self.last_path: str | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True  # Lightning validates after a step that stops the run

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ckpt = next((c for c in trainer.callbacks if isinstance(c, AtomicModelCheckpoint)), None)
        if ckpt is None or trainer.fast_dev_run or trainer.sanity_checking:
            return
        path = Path(ckpt.save_now(trainer))
        if trainer.is_global_zero:
            link = path.with_name(LAST)
            tmp = path.with_name(LAST + ".tmp")
            if tmp.is_symlink() or tmp.exists():
                tmp.unlink()
            os.symlink(path.name, tmp)  # relative: the run folder can move
            os.replace(tmp, link)
        self.last_path = str(path)
        trainer.strategy.barrier("ring_last_ckpt")
