"""Atomic checkpoints and finding the newest complete one.

A checkpoint is first written under a temporary name and renamed into place only when every rank
has finished writing it, so a crash mid-write leaves the previous checkpoints untouched. Works for
single files (DDP) and checkpoint directories (DeepSpeed) alike.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

_STEP = re.compile(r"step(\d+)")
_PARTIAL = ".partial"


def _fsync_tree(path: Path) -> None:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def _is_complete(path: Path) -> bool:
    """A renamed checkpoint directory is complete by construction; a file must still open (not truncated)."""
    if path.is_dir():
        return any(path.iterdir())
    try:
        torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception:  # noqa: BLE001 - any failure to read means "not usable"
        return False
    return True


def checkpoints_newest_first(dirpath: str | Path) -> list[Path]:
    d = Path(dirpath)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if not p.name.endswith(_PARTIAL)
             and (m := _STEP.search(p.name))]
    return [p for _, p in sorted(found, key=lambda sp: (sp[0], sp[1].stat().st_mtime), reverse=True)]


def newest_complete_checkpoint(dirpath: str | Path) -> Path | None:
    """The newest checkpoint under ``dirpath`` that can be read; damaged ones are skipped with a warning."""
    for path in checkpoints_newest_first(dirpath):
        if _is_complete(path):
            return path
        print(f"[ring-train] skipping unreadable checkpoint {path}", flush=True)
    return None


class AtomicModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that keeps the ``keep_last`` newest checkpoints, each written atomically."""

    def __init__(self, dirpath: str, every_n_train_steps: int = 100, keep_last: int = 2, **kwargs):
        if keep_last < 1:
            raise ValueError(f"callbacks.checkpointing.keep_last={keep_last} must be at least 1")
        super().__init__(
            dirpath=dirpath, filename="step{step:06d}", auto_insert_metric_name=False,
            every_n_train_steps=every_n_train_steps, save_top_k=keep_last, monitor="step", mode="max",
            save_on_train_epoch_end=False, **kwargs,
        )

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        self.save_atomic(trainer, filepath)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(self)

    def save_now(self, trainer: pl.Trainer) -> str:
        """Write a checkpoint of the current step outside the schedule (on a signal, say)."""
        filepath = os.path.join(self.dirpath or ".", f"step{trainer.global_step:06d}{self.FILE_EXTENSION}")
        if trainer.global_step != self._last_global_step_saved:
            self.save_atomic(trainer, filepath)
            self._last_global_step_saved = trainer.global_step
        return filepath

    @staticmethod
    def save_atomic(trainer: pl.Trainer, filepath: str) -> None:
        target = Path(filepath)
        partial = target.with_name(target.name + _PARTIAL)
        if trainer.is_global_zero and partial.exists():
            shutil.rmtree(partial) if partial.is_dir() else partial.unlink()
        trainer.strategy.barrier("ring_ckpt_clean")
        trainer.save_checkpoint(partial, weights_only=False)
        trainer.strategy.barrier("ring_ckpt_written")
        if trainer.is_global_zero:
            _fsync_tree(partial)
            if target.is_dir():  # a directory cannot be replaced in one rename: move the old one aside first
                old = target.with_name(target.name + ".old")
                os.replace(target, old)
                os.replace(partial, target)
                shutil.rmtree(old)
            else:
                os.replace(partial, target)
        trainer.strategy.barrier("ring_ckpt_renamed")
