"""``resume=auto|never|PATH`` → the checkpoint to start from (or None).

A run that has checkpoints never restarts from step 0 by accident: with ``auto``, if none of them
verifies, the run refuses to start and names each file and what is wrong with it. Starting over
(``never``) or from an older checkpoint (``PATH``) sets the checkpoints it would abandon aside
instead of deleting them, so a later ``auto`` cannot pick a checkpoint of the abandoned run. Files in
the folder that are not this run's checkpoints (no manifest naming the folder's owner) are reported,
never loaded and never moved.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from ..callbacks.checkpoint_files import (
    checkpoint_step,
    checkpoints_newest_first,
    is_own,
    manifest_path,
    scan,
    verify,
)
from .launch import is_global_rank_zero


class ResumeError(RuntimeError):
    """The run's checkpoints cannot be resumed and starting from zero was not asked for."""


def resolve_resume(resume: str, checkpoint_dir: str | Path) -> str | None:
    """The checkpoint to resume from; raises :class:`ResumeError` instead of silently starting over."""
    directory = Path(checkpoint_dir)
    if resume == "never":
        set_aside(_own_newest_first(directory), directory)
        return None
    if resume == "auto":
        found = scan(directory)
        if found.found is not None:
            return str(found.found)
        if found.rejected:
            raise ResumeError(
                f"resume=auto: none of the {len(found.rejected)} checkpoint(s) in {directory} can be used:\n"
                f"{found.report()}\n"
                "Pass resume=PATH to use a checkpoint from elsewhere, or resume=never to start over from step 0 "
                f"(the damaged files are then moved to {directory}/set_aside_*/, not deleted)."
            )
        return None
    path = Path(resume)
    if not path.exists():
        raise FileNotFoundError(f"resume={resume!r}: no such checkpoint (use 'auto', 'never' or an existing path)")
    reason = verify(path)
    if reason is not None:
        raise ResumeError(f"resume={resume!r} cannot be used: {reason}")
    step = checkpoint_step(path)
    if step is not None and path.parent.resolve() == directory.resolve():
        # Resuming an older checkpoint of this run: the newer ones belong to a timeline being abandoned.
        set_aside([p for p in _own_newest_first(directory) if (checkpoint_step(p) or 0) > step], directory)
    return resume


def _own_newest_first(directory: Path) -> list[Path]:
    return [p for p in checkpoints_newest_first(directory) if is_own(p)]


def set_aside(checkpoints: list[Path], directory: Path) -> None:
    """Move ``checkpoints`` (and their manifests) into ``directory/set_aside_<time>/`` (rank 0 only)."""
    if not checkpoints or not is_global_rank_zero():
        return
    target = directory / time.strftime("set_aside_%Y%m%d_%H%M%S")
    target.mkdir(exist_ok=True)
    for path in checkpoints:
        for item in (path, manifest_path(path)):
            with contextlib.suppress(FileNotFoundError):  # a checkpoint without a manifest
                os.replace(item, target / item.name)
    print(f"[ring-train] moved {len(checkpoints)} checkpoint(s) that this run will not continue from to {target}",
          flush=True)
