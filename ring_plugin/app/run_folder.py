"""A run's checkpoints folder belongs to its run: another run is refused there, and a run whose
``paths.checkpoints`` moved away from its checkpoints is refused instead of starting over at step 0.

The folder's ``owner.json`` (``callbacks.checkpoint_owner``) names the run; a folder owned by the same
run id or by the same run folder (a run whose ``run.yaml`` was removed starts a new run id there) is
this run's. Checkpoints of another run id left in it are never loaded and never deleted.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from ..callbacks.checkpoint_files import checkpoints_newest_first, foreign_reason
from ..callbacks.checkpoint_owner import describe_owner, read_owner, write_owner
from .config_error import ConfigError
from .identity import RunRecord


def _run_dir(cfg: DictConfig) -> str:
    return str(Path(cfg.paths.output_dir).resolve())


def check_checkpoints_folder(cfg: DictConfig, record: RunRecord) -> None:
    """Raise :class:`ConfigError` if ``paths.checkpoints`` belongs to another run, or if this run's
    checkpoints are still in the folder it used before and the new one has none of them."""
    directory = Path(cfg.paths.checkpoints)
    owner = read_owner(directory)
    if owner is not None and owner["run_id"] != record.run_id and owner.get("run_dir") != _run_dir(cfg):
        raise ConfigError(
            f"paths.checkpoints={directory} belongs to {describe_owner(owner)}; this run {cfg.name!r} "
            f"({_run_dir(cfg)}, run id {record.run_id}) may not resume or rotate its checkpoints: "
            "pick another paths.checkpoints (or another name)")
    if cfg.resume == "never" or not record.checkpoints:
        return
    before = Path(cfg.paths.output_dir) / record.checkpoints  # relative to the run folder, which may move
    if before.resolve() == directory.resolve():
        return
    if _has_checkpoints_of(before, record.run_id) and not _has_checkpoints_of(directory, record.run_id):
        raise ConfigError(
            f"paths.checkpoints moved from {before} to {directory}, but run {cfg.name!r} has its checkpoints in "
            f"{before}: move them there (mv {before} {directory}) or set paths.checkpoints={before}; "
            "resume=never starts this run over from step 0")


def _has_checkpoints_of(directory: Path, run_id: str) -> bool:
    owner = read_owner(directory)
    if owner is None or owner["run_id"] != run_id:
        return False
    return any(foreign_reason(p) is None for p in checkpoints_newest_first(directory))


def claim_checkpoints_folder(cfg: DictConfig, record: RunRecord) -> None:
    """Make ``paths.checkpoints`` this run's (rank 0, after :func:`check_checkpoints_folder`)."""
    directory = Path(cfg.paths.checkpoints)
    owner = read_owner(directory)
    wanted = {"run_id": record.run_id, "name": cfg.name, "run_dir": _run_dir(cfg)}
    if owner != wanted:
        write_owner(directory, **wanted)
    run_dir = Path(cfg.paths.output_dir).resolve()
    resolved = directory.resolve()
    record.checkpoints = str(resolved.relative_to(run_dir) if resolved.is_relative_to(run_dir) else resolved)

