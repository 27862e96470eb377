"""Atomic, verified checkpoints with rotation that survives restarts.

A checkpoint is first written under a temporary name; once every rank has finished, rank 0 fsyncs it,
writes its manifest (SHA-256 of every byte, see ``checkpoint_files``) and only then renames it into
place, so a crash mid-write leaves the previous checkpoints untouched and later damage is detected.
Works for single files (DDP) and checkpoint directories (DeepSpeed) alike.

Scheduled checkpoints are held back while the model is unhealthy (non-finite steps being skipped, or
non-finite weights), so a rollback never has only poisoned checkpoints to return to. Rotation keeps
the ``keep_last`` newest checkpoints of the directory, including those of earlier attempts, and never
deletes the newest checkpoint known to be good.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from .agree import all_ranks
from .checkpoint_files import (
    PARTIAL_SUFFIX,
    fsync_tree,
    is_healthy,
    rotate,
    write_manifest,
)
from .checkpoint_owner import claim_if_unowned
from .disk_full import cleaned_up_on_disk_full, remove_path


def weights_are_finite(pl_module: pl.LightningModule) -> bool:
    """Every rank's parameters are finite (ZeRO-3 keeps a rank's partition in ``ds_tensor``)."""
    local = all(bool(torch.isfinite(getattr(p, "ds_tensor", p.data)).all()) for p in pl_module.parameters())
    return all_ranks(local, pl_module.device)


class AtomicModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that writes every ``every_n_train_steps`` steps, atomically and with a manifest,
    and keeps the ``keep_last`` newest checkpoints of ``dirpath``."""

    def __init__(self, dirpath: str, every_n_train_steps: int = 100, keep_last: int = 2, **kwargs: Any):
        if keep_last < 1:
            raise ValueError(f"callbacks.checkpointing.keep_last={keep_last} must be at least 1")
        # Rotation is ours (it must see earlier attempts' files): Lightning keeps everything it writes.
        super().__init__(
            dirpath=dirpath, filename="step{step:06d}", auto_insert_metric_name=False,
            every_n_train_steps=every_n_train_steps, save_top_k=-1, monitor=None,
            save_on_train_epoch_end=False, enable_version_counter=False, **kwargs,
        )
        self.keep_last = keep_last
        self.hold_reason: str | None = None  # set while the model is unhealthy: no scheduled checkpoint
        self.last_good: Path | None = None  # newest checkpoint known to verify and to be healthy

    # ----------------------------------------------------------------- health
    def hold(self, reason: str) -> None:
        """Write no scheduled checkpoint until :meth:`release` (the model is unhealthy: ``reason``)."""
        self.hold_reason = reason

    def release(self) -> None:
        self.hold_reason = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if trainer.ckpt_path and Path(trainer.ckpt_path).resolve().parent == Path(self.dirpath or ".").resolve():
            resumed = Path(trainer.ckpt_path)  # verified by the resume logic before training started
            self._last_global_step_saved = trainer.global_step  # a signal now need not rewrite it
            if is_healthy(resumed):
                self.last_good = resumed

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        due = self._every_n_train_steps >= 1 and trainer.global_step % self._every_n_train_steps == 0
        if due and self.hold_reason is None and not weights_are_finite(pl_module):
            self.hold_reason = "the weights are not finite"
        if due and self.hold_reason is not None:
            if trainer.is_global_zero and trainer.global_step != self._last_global_step_saved:
                print(f"[ring-train] scheduled checkpoint at step {trainer.global_step} not written: "
                      f"{self.hold_reason}", flush=True)
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    # ------------------------------------------------------------------ saving
    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        self._write(trainer, filepath)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(self)

    def save_now(self, trainer: pl.Trainer) -> str:
        """Write a checkpoint of the current step outside the schedule (on a signal, say)."""
        filepath = os.path.join(self.dirpath or ".", f"step{trainer.global_step:06d}{self.FILE_EXTENSION}")
        if trainer.global_step != self._last_global_step_saved:
            self._write(trainer, filepath)
        return filepath

    def _write(self, trainer: pl.Trainer, filepath: str) -> None:
        healthy = self.hold_reason is None
        save_atomic(trainer, filepath, healthy)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if healthy:
            self.last_good = Path(filepath)
        if trainer.is_global_zero:  # never the one just written, never the last good one
            protect = {Path(filepath)} | ({self.last_good} if self.last_good is not None else set())
            rotate(Path(filepath).parent, self.keep_last, protect)


def save_atomic(trainer: pl.Trainer, filepath: str, healthy: bool = True) -> None:
    """Write ``filepath`` under a temporary name on every rank, then (rank 0) its manifest, then rename it."""
    target = Path(filepath)
    partial = target.with_name(target.name + PARTIAL_SUFFIX)
    if trainer.is_global_zero:
        remove_path(partial)
    trainer.strategy.barrier("ring_ckpt_clean")
    with cleaned_up_on_disk_full(target, partial):
        trainer.save_checkpoint(partial, weights_only=False)  # what is saved, in full: loading is what is guarded
    trainer.strategy.barrier("ring_ckpt_written")
    if trainer.is_global_zero:
        fsync_tree(partial)
        run_id = claim_if_unowned(target.parent)
        write_manifest(target, partial, trainer.global_step, healthy, run_id)  # before the rename: never unverifiable
        if target.is_dir():  # a directory cannot be replaced in one rename: move the old one aside first
            old = target.with_name(target.name + ".old")
            os.replace(target, old)
            os.replace(partial, target)
            shutil.rmtree(old)
        else:
            os.replace(partial, target)
        _fsync_dir(target.parent)
    trainer.strategy.barrier("ring_ckpt_renamed")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

