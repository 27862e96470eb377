"""A Hydra callback that refuses, in one line, an output folder this process cannot write.

Hydra creates the run folder and opens ``train.log`` in it before the app runs; an unwritable folder
would otherwise end in a traceback about a logging handler ("Unable to configure handler 'file'").
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


def unwritable_reason(folder: Path) -> str | None:
    """Why files cannot be created in ``folder`` (or in its nearest existing parent, where it is to be made)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a folder"
    try:
        fd, probe = tempfile.mkstemp(prefix=".ring-train-write-test-", dir=existing)
    except OSError as err:
        return err.strerror or type(err).__name__
    os.close(fd)
    os.unlink(probe)
    return None


def refuse_unwritable(folder: Path, key: str) -> None:
    reason = unwritable_reason(folder)
    if reason is not None:
        print(f"ring-train: config error: the output folder {folder} cannot be written ({reason}): set {key}= a "
              "writable folder, or run from one", file=sys.stderr, flush=True)
        sys.exit(2)


class WritableOutput(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        refuse_unwritable(Path(str(config.hydra.run.dir)), "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        refuse_unwritable(Path(str(config.hydra.sweep.dir)), "hydra.sweep.dir")
