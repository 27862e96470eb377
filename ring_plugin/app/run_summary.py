"""A run's summary numbers, kept in every checkpoint, and the finish of a run whose last step is checkpointed.

A run is marked complete (``run.yaml``) after its final checkpoint. A stop between the two (SIGINT on the last
step, a crash) leaves the checkpoint at ``max_steps`` but no mark: resuming it would train nothing and report
nothing. :func:`finish_from_checkpoint` instead completes such a run from the checkpoint's own numbers, with no
new W&B segment or process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

from ..callbacks import FaultTolerance, RingMonitor, TaskAccuracy
from ..callbacks.checkpoint_files import checkpoint_step, scan
from .wandb_log import offline_segments, sync_hint

CHECKPOINT_KEY = "ring_summary"


def find_callback(trainer: pl.Trainer, kind: type) -> Any:
    """The trainer's callback of class ``kind`` (None without one)."""
    return next((c for c in trainer.callbacks if isinstance(c, kind)), None)


def training_metrics(trainer: pl.Trainer) -> dict[str, Any]:
    """The summary's numbers at this point of training (plain floats and ints)."""
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    monitor = find_callback(trainer, RingMonitor)
    task = find_callback(trainer, TaskAccuracy)
    fault = find_callback(trainer, FaultTolerance)
    return {
        "step": trainer.global_step,
        # ZeRO-3 leaves each rank an empty partition: its full size is ds_numel
        "parameters": sum(getattr(p, "ds_numel", p.numel()) for p in trainer.lightning_module.parameters()),
        "train_loss": metrics.get("train/loss"),
        "val_loss": metrics.get("val/loss"),
        "task_acc": task.last.get("val/task_acc") if task else None,
        "token_acc": task.last.get("val/token_acc") if task else None,
        "tokens_per_s": monitor.mean_tokens_per_s if monitor and monitor.total_time > 0 else None,
        "mfu": monitor.last.get("monitor/mfu") if monitor else None,
        "skipped_steps": fault.skipped_steps if fault else 0,
    }


class SummaryInCheckpoint(Callback):
    """Writes :func:`training_metrics` into each checkpoint (under ``ring_summary``)."""

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = training_metrics(trainer)


def finish_from_checkpoint(cfg: DictConfig, wandb_id: str) -> dict[str, Any] | None:
    """The summary of a run whose newest intact checkpoint is at ``max_steps`` or later (else None)."""
    if cfg.resume not in ("auto", "force"):
        return None
    found = scan(cfg.paths.checkpoints).found  # verified against its manifest
    step = checkpoint_step(found) if found is not None else None
    if found is None or step is None or step < cfg.max_steps:
        return None
    state = torch.load(found, map_location="cpu", weights_only=True, mmap=True)
    numbers = {"train_loss": None, "val_loss": None, "task_acc": None, "token_acc": None, "tokens_per_s": None,
               "mfu": None, "skipped_steps": 0, "parameters": sum(t.numel() for t in state["state_dict"].values())}
    numbers.update(state.get(CHECKPOINT_KEY) or {})
    summary: dict[str, Any] = {**numbers, "step": int(state["global_step"]), "stopped_by_signal": None,
                               "checkpoint": str(found), "output_dir": str(cfg.paths.output_dir)}
    segments = offline_segments(cfg.paths.output_dir, wandb_id)
    if segments:
        summary.update(wandb_dir=str(segments[-1]), wandb_mode="offline",
                       wandb_sync=sync_hint(cfg.paths.output_dir, wandb_id))
    csv = Path(cfg.paths.output_dir) / "csv" / "version_0" / "metrics.csv"
    if csv.is_file():
        summary["csv"] = str(csv)
    return summary
