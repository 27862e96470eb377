"""Rollback and checkpoint health in one process (a 5-parameter model, a few steps): bounded rollbacks,
never to a checkpoint written while steps were skipped, no scheduled checkpoint of a non-finite model."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from ring_plugin.callbacks import AtomicModelCheckpoint, FaultTolerance
from ring_plugin.callbacks.checkpoint_files import checkpoints_newest_first, is_healthy
from ring_plugin.callbacks.fault_tolerance import RollbackExhaustedError

from .helpers import NanGradients

pytestmark = pytest.mark.timeout(120)


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.layer(batch).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.01)


class SaveAt(pl.Callback):
    """Writes an unscheduled checkpoint at the given steps, as a signal would."""

    def __init__(self, steps: list[int]):
        self.steps = set(steps)

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        if trainer.global_step in self.steps:
            next(c for c in trainer.callbacks if isinstance(c, AtomicModelCheckpoint)).save_now(trainer)


class PoisonWeights(pl.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.layer.weight.fill_(float("nan"))


def _fit(tmp_path: Path, max_steps: int, *callbacks: pl.Callback, keep_last: int = 2) -> tuple[pl.Trainer, Path]:
    pl.seed_everything(0, verbose=False)
    ckpt_dir = tmp_path / "checkpoints"
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[AtomicModelCheckpoint(str(ckpt_dir), every_n_train_steps=5, keep_last=keep_last), *callbacks],
    )
    trainer.fit(Tiny(), DataLoader(torch.randn(128, 4), batch_size=2))
    return trainer, ckpt_dir


def _names(ckpt_dir: Path) -> list[str]:
    return [p.name for p in checkpoints_newest_first(ckpt_dir)]


def test_rollbacks_are_bounded_and_no_checkpoint_is_written_meanwhile(tmp_path: Path, capsys) -> None:
    fault = FaultTolerance(max_consecutive_nonfinite=2, max_rollbacks=2, handle_signals=False)
    with pytest.raises(RollbackExhaustedError) as info:
        _fit(tmp_path, 40, fault, NanGradients(list(range(6, 40))))
    message = str(info.value)
    assert "2 non-finite steps in a row at step 11" in message and "after 2 rollback(s) to" in message
    assert "max_rollbacks=2" in message and "Lower the learning rate" in message
    assert fault.rollbacks == 2
    out = capsys.readouterr().out
    assert out.count("step000005.ckpt (rollback") == 2
    assert "scheduled checkpoint at step 10 not written: rolled back to step000005.ckpt" in out
    assert _names(tmp_path / "checkpoints") == ["step000005.ckpt"]  # nothing written while non-finite


def test_a_newer_healthy_checkpoint_resets_the_bound(tmp_path: Path, capsys) -> None:
    fault = FaultTolerance(max_consecutive_nonfinite=2, max_rollbacks=1, handle_signals=False)
    trainer, ckpt_dir = _fit(tmp_path, 15, fault, NanGradients([6, 7, 11, 12]))
    assert trainer.global_step == 15 and fault.rollbacks == 2 and fault.skipped_steps == 4
    out = capsys.readouterr().out
    assert "step000005.ckpt (rollback 1 of at most 1" in out
    assert "step000010.ckpt (rollback 1 of at most 1" in out  # step 10 was healthy: progress
    assert _names(ckpt_dir) == ["step000015.ckpt", "step000010.ckpt"]


def test_rollback_skips_checkpoints_written_while_skipping_and_rotation_keeps_the_good_one(
        tmp_path: Path, capsys) -> None:
    fault = FaultTolerance(max_consecutive_nonfinite=4, handle_signals=False)
    _, ckpt_dir = _fit(tmp_path, 12, fault, NanGradients([6, 7, 8, 9]), SaveAt([7, 8]), keep_last=1)
    out = capsys.readouterr().out
    assert "skipping checkpoint" in out and "step000008.ckpt: written while non-finite steps were being skipped" in out
    assert f"rolled back weights and optimizer to {ckpt_dir / 'step000005.ckpt'}" in out
    # keep_last=1 keeps the newest (step 8, unhealthy) and, beyond it, the last good one (step 5).
    assert _names(ckpt_dir) == ["step000008.ckpt", "step000005.ckpt"]
    assert not is_healthy(ckpt_dir / "step000008.ckpt") and is_healthy(ckpt_dir / "step000005.ckpt")


def test_no_scheduled_checkpoint_of_non_finite_weights(tmp_path: Path, capsys) -> None:
    _, ckpt_dir = _fit(tmp_path, 15, PoisonWeights(7), keep_last=1)
    assert _names(ckpt_dir) == ["step000005.ckpt"]
    state = torch.load(ckpt_dir / "step000005.ckpt", weights_only=False)["state_dict"]
    assert all(torch.isfinite(w).all() for w in state.values())
    out = capsys.readouterr().out
    assert "scheduled checkpoint at step 10 not written: the weights are not finite" in out


@pytest.mark.parametrize("key", ["max_rollbacks", "max_consecutive_nonfinite"])
def test_bad_limits_name_the_key(key: str) -> None:
    with pytest.raises(ValueError, match=f"callbacks.fault_tolerance.{key}=0 must be an integer >= 1"):
        FaultTolerance(**{key: 0})
