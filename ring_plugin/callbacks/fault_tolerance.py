"""Fault tolerance during training: signals, non-finite losses and rollback.

* SIGTERM / SIGINT: every rank learns of it at the next step end (one tiny all-reduce), a checkpoint
  is written, and training stops cleanly. A second SIGINT aborts at once.
* A non-finite gradient skips the optimizer step (gradients are dropped, so the optimizer leaves
  weights and moments alone); skips are counted and logged. ``max_consecutive_nonfinite`` skips in a
  row roll the weights and optimizer back to the newest complete checkpoint.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from .checkpointing import AtomicModelCheckpoint, newest_complete_checkpoint


def _all_reduce(value: float, op: dist.ReduceOp, device: torch.device) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return float(t.item())


class FaultTolerance(Callback):
    def __init__(self, max_consecutive_nonfinite: int = 3, handle_signals: bool = True):
        if max_consecutive_nonfinite < 1:
            raise ValueError(
                f"callbacks.fault_tolerance.max_consecutive_nonfinite={max_consecutive_nonfinite} must be >= 1"
            )
        self.max_consecutive_nonfinite = max_consecutive_nonfinite
        self.handle_signals = handle_signals
        self.skipped_steps = 0
        self.consecutive = 0
        self.rollbacks = 0
        self.stopped_by_signal: str | None = None
        self._signal: int | None = None
        self._previous: dict[int, Any] = {}

    # ------------------------------------------------------------------ signals
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._install()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Again after Lightning registered its own SIGTERM handler (which exits without a checkpoint).
        self._install()

    def _install(self) -> None:
        if self.handle_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous = signal.signal(sig, self._on_signal)
                self._previous.setdefault(sig, previous)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop waiting for the step to end
        self._signal = signum

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        got = _all_reduce(float(self._signal or 0), dist.ReduceOp.MAX, pl_module.device)
        if got == 0:
            return
        name = signal.Signals(int(got)).name
        ckpt = _checkpoint_callback(trainer)
        path = ckpt.save_now(trainer) if ckpt is not None else None
        if trainer.is_global_zero:
            print(f"\n[ring-train] {name} received: checkpoint {path} written at step {trainer.global_step}; "
                  "stopping. Run the same command again to resume.", flush=True)
        self.stopped_by_signal = name
        trainer.should_stop = True

    # -------------------------------------------------------- non-finite steps
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        finite = all(bool(torch.isfinite(g).all()) for g in grads)
        # Gradients are already averaged across ranks, but agree explicitly so no rank steps alone.
        finite = _all_reduce(float(finite), dist.ReduceOp.MIN, pl_module.device) > 0
        if finite:
            self.consecutive = 0
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        self.skipped_steps += 1
        self.consecutive += 1
        pl_module.log("fault/skipped_steps", float(self.skipped_steps), on_step=True, rank_zero_only=True)
        if trainer.is_global_zero:
            print(f"\n[ring-train] non-finite gradients at step {trainer.global_step}: step skipped "
                  f"({self.consecutive} in a row, {self.skipped_steps} in total)", flush=True)
        if self.consecutive >= self.max_consecutive_nonfinite:
            self._rollback(trainer)

    def _rollback(self, trainer: pl.Trainer) -> None:
        ckpt = _checkpoint_callback(trainer)
        path = newest_complete_checkpoint(ckpt.dirpath) if ckpt is not None and ckpt.dirpath else None
        if path is None:
            raise RuntimeError(
                f"{self.consecutive} non-finite steps in a row (callbacks.fault_tolerance.max_consecutive_nonfinite="
                f"{self.max_consecutive_nonfinite}) and no checkpoint to roll back to"
            )
        state = trainer.strategy.load_checkpoint(path)
        trainer.strategy.load_model_state_dict(state)
        trainer.strategy.load_optimizer_state_dict(state)
        self.rollbacks += 1
        self.consecutive = 0
        if trainer.is_global_zero:
            print(f"[ring-train] rolled back weights and optimizer to {path}; data continues forward", flush=True)

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps, "rollbacks": self.rollbacks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        self.rollbacks = int(state_dict.get("rollbacks", 0))


def _checkpoint_callback(trainer: pl.Trainer) -> AtomicModelCheckpoint | None:
    return next((c for c in trainer.callbacks if isinstance(c, AtomicModelCheckpoint)), None)
