"""Fault tolerance during training: signals, non-finite losses and bounded rollback.

* SIGTERM / SIGINT: every rank learns of it at the next step end (one tiny all-reduce), a checkpoint
  is written, and training stops cleanly. A second SIGINT aborts at once.
* A non-finite gradient skips the optimizer step (gradients are dropped, so the optimizer leaves
  weights and moments alone); skips are counted and logged, and no scheduled checkpoint is written
  until a step is finite again. ``max_consecutive_nonfinite`` skips in a row roll the weights and
  optimizer back to the newest checkpoint that verifies and was written while the model was healthy.
* Needing more than ``max_rollbacks`` rollbacks to the same checkpoint means the run cannot recover
  by itself: it stops with an error that says what to do.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from .agree import all_ranks, all_reduce_scalar
from .checkpoint_files import scan
from .checkpointing import AtomicModelCheckpoint


class RollbackExhaustedError(RuntimeError):
    """Non-finite steps kept coming back after ``max_rollbacks`` rollbacks."""


class FaultTolerance(Callback):
    def __init__(self, max_consecutive_nonfinite: int = 3, handle_signals: bool = True, max_rollbacks: int = 3):
        for key, value in (("max_consecutive_nonfinite", max_consecutive_nonfinite), ("max_rollbacks", max_rollbacks)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"callbacks.fault_tolerance.{key}={value!r} must be an integer >= 1")
        self.max_consecutive_nonfinite = max_consecutive_nonfinite
        self.max_rollbacks = max_rollbacks
        self.handle_signals = handle_signals
        self.skipped_steps = 0
        self.consecutive = 0
        self.rollbacks = 0
        self.rollback_target: str | None = None  # the checkpoint of the last rollback
        self.rollbacks_to_target = 0  # rollbacks to it: a newer healthy checkpoint resets the count
        self.stopped_by_signal: str | None = None
        self._signal: int | None = None
        self._previous: dict[int, Any] = {}

    # ------------------------------------------------------------------ signals
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._install()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Again after Lightning registered its own SIGTERM handler (which exits without a checkpoint).
        self._install()
        ckpt = _checkpoint_callback(trainer)
        if ckpt is not None and self.consecutive:  # resumed from a checkpoint written while skipping
            ckpt.hold(f"{self.consecutive} non-finite step(s) in a row")

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
        got = all_reduce_scalar(float(self._signal or 0), dist.ReduceOp.MAX, pl_module.device)
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
        finite = all_ranks(finite, pl_module.device)
        ckpt = _checkpoint_callback(trainer)
        if finite:
            self.consecutive = 0
            if ckpt is not None:
                ckpt.release()
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        self.skipped_steps += 1
        self.consecutive += 1
        if ckpt is not None:
            ckpt.hold(f"{self.consecutive} non-finite step(s) in a row")
        pl_module.log("fault/skipped_steps", float(self.skipped_steps), on_step=True, rank_zero_only=True)
        if trainer.is_global_zero:
            print(f"\n[ring-train] non-finite gradients at step {trainer.global_step}: step skipped "
                  f"({self.consecutive} in a row, {self.skipped_steps} in total)", flush=True)
        if self.consecutive >= self.max_consecutive_nonfinite:
            self._rollback(trainer)

    def _rollback(self, trainer: pl.Trainer) -> None:
        ckpt = _checkpoint_callback(trainer)
        what = (f"{self.consecutive} non-finite steps in a row at step {trainer.global_step} "
                f"(callbacks.fault_tolerance.max_consecutive_nonfinite={self.max_consecutive_nonfinite})")
        found = scan(ckpt.dirpath, healthy_only=True) if ckpt is not None and ckpt.dirpath else None
        if found is None or found.found is None:
            raise RollbackExhaustedError(
                f"{what} and no healthy checkpoint to roll back to"
                + (f"; rejected:\n{found.report()}" if found is not None and found.rejected else "")
            )
        path = found.found
        if str(path) != self.rollback_target:  # a newer healthy checkpoint: the run made progress
            self.rollback_target, self.rollbacks_to_target = str(path), 0
        if self.rollbacks_to_target >= self.max_rollbacks:
            raise RollbackExhaustedError(
                f"{what}, after {self.rollbacks_to_target} rollback(s) to {path} "
                f"(callbacks.fault_tolerance.max_rollbacks={self.max_rollbacks}): the run does not recover by "
                "itself. Lower the learning rate or check the data, then run the command again: it resumes from "
                f"the newest good checkpoint (or pass resume=PATH for an older one in {ckpt.dirpath})."
            )
        state = trainer.strategy.load_checkpoint(path, weights_only=True)  # verified by scan: this run's
        trainer.strategy.load_model_state_dict(state)
        trainer.strategy.load_optimizer_state_dict(state)
        self.rollbacks += 1
        self.rollbacks_to_target += 1
        self.consecutive = 0
        # Still no checkpoint until a step is finite: one now would copy the rollback target and hide
        # from max_rollbacks that the run has not made progress.
        ckpt.hold(f"rolled back to {path.name}; no finite step since")
        if trainer.is_global_zero:
            print(f"[ring-train] rolled back weights and optimizer to {path} (rollback {self.rollbacks_to_target} "
                  f"of at most {self.max_rollbacks} to it); data continues forward", flush=True)

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps, "rollbacks": self.rollbacks, "consecutive": self.consecutive,
                "rollback_target": self.rollback_target, "rollbacks_to_target": self.rollbacks_to_target}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        self.rollbacks = int(state_dict.get("rollbacks", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))
        self.rollback_target = state_dict.get("rollback_target")
        self.rollbacks_to_target = int(state_dict.get("rollbacks_to_target", 0))


def _checkpoint_callback(trainer: pl.Trainer) -> AtomicModelCheckpoint | None:
    return next((c for c in trainer.callbacks if isinstance(c, AtomicModelCheckpoint)), None)
