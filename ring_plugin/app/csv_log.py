"""``RunCSVLogger``: one ``metrics.csv`` per run that a resume appends to.

Lightning's CSV logger deletes an existing ``metrics.csv`` of its version when it starts; a resumed run
would lose its history (or, with a new version per attempt, split it). Rows of steps a crash made the run
repeat appear twice; readers keep the last row of a step.
"""

from __future__ import annotations

import csv
import os
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = sorted(next(csv.reader(f), []))


class RunCSVLogger(CSVLogger):
    def __init__(self, save_dir: str, name: str = "csv", version: int | str = 0, **kwargs: Any):
        super().__init__(save_dir=save_dir, name=name, version=version, **kwargs)

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
