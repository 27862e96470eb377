"""``RunWandbLogger``: one W&B run across a run's attempts, its steps the trainer's.

Lightning's ``WandbLogger`` lets W&B count its own step, which restarts at 0 in every attempt (each resume
opens a new offline segment of the same run id): the charts of a resumed run would start over. Here every
row is logged at the trainer's step, so a resumed run's charts continue where they stopped.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only


class RunWandbLogger(WandbLogger):
    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if step is None:
            super().log_metrics(metrics, step)
            return
        # W&B drops a row whose step is below its newest one: Lightning and RingMonitor log in step order.
        self.experiment.log({**metrics, "trainer/global_step": step}, step=step)


def offline_segments(run_dir: str | Path, run_id: str) -> list[Path]:
    """Every offline segment of W&B run ``run_id`` under ``run_dir/wandb`` (one per attempt), oldest first."""
    return sorted(Path(run_dir).glob(f"wandb/offline-run-*-{run_id}"))


def sync_hint(run_dir: str | Path, run_id: str) -> str:
    """The command that uploads the whole run (all its segments, in order)."""
    segments = offline_segments(run_dir, run_id)
    if len(segments) <= 1:
        return f"wandb sync {segments[0] if segments else Path(run_dir) / 'wandb'}"
    return f"wandb sync {Path(run_dir) / 'wandb'}/offline-run-*-{run_id}   ({len(segments)} segments, one per attempt)"
