"""A run's identity: its config, its W&B run id and whether it is complete, kept in ``<run dir>/run.yaml``.

The same command resumes the same run; a changed config does not silently resume it. Keys that may change
on a resume (the step budget, logging, timeouts, the resume mode itself, checkpointing) are listed in
``MAY_CHANGE``;
any other difference refuses to resume, naming the keys, unless ``resume=force``. ``resume=never`` on a run
starts the run over under a new W&B run (its old checkpoints are set aside by ``resume.resolve_resume``).
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import yaml
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf

from ..callbacks.checkpoint_files import checkpoints_newest_first, is_own, verify
from ..callbacks.disk_full import cleaned_up_on_disk_full
from .config_error import ConfigError

RECORD = "run.yaml"
# Dotted prefixes of keys that may differ between the attempts of one run.
MAY_CHANGE = (
    "max_steps", "trainer.max_steps", "resume", "comm_timeout", "strategy.timeout", "strategy.startup_timeout",
    "threads_per_process", "tags", "group", "job_type", "paths", "logger", "callbacks", "data.val_batches",
    "data.num_workers",
    "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.log_every_n_steps",
    "trainer.val_check_interval", "trainer.limit_val_batches", "trainer.fast_dev_run",
    # Memory for speed only: the same gradients either way, so a run may switch to fit (or to go faster).
    "model.activation_checkpointing", "model.recompute_attention", "model.checkpoint_layers",
    "model.offload_checkpoints", "model.mlp_tile_tokens",
)
# Keys added to the config after runs may have been recorded, with the value that does what runs did
# before the key existed: a record without the key and a config with that value are the same run.
INTRODUCED = {"ulysses_size": 1, "strategy.ulysses_size": "${ulysses_size}"}


@dataclass
class RunRecord:
    """``run_id`` names the run folder's run for good (its checkpoints folder and manifests carry it; a
    ``resume=never`` restart keeps it), ``wandb_id`` the W&B run of the current attempt line, ``checkpoints``
    the folder its checkpoints were written to (relative to the run folder when inside it: the folder may move)."""

    config: dict[str, Any]
    wandb_id: str
    completed_step: int | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    checkpoints: str | None = None


def flat_config(cfg: DictConfig) -> dict[str, Any]:
    """The config as written, ``{dotted.key: value}`` (lists kept whole, empty dicts dropped).

    Unresolved: an interpolation (``data.train.seed: ${seed}``) is compared once, at the key a user sets.
    """
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):  # an empty dict adds no key: {} and an absent group compare equal
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    return out


def _may_change(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in MAY_CHANGE)


def _introduced_as_before(key: str, old: dict[str, Any], new: dict[str, Any]) -> bool:
    return key not in old and key in INTRODUCED and new.get(key) == INTRODUCED[key]


def identity_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Keys (outside ``MAY_CHANGE``) whose values differ, or that exist on one side only (except a key
    added since the old record, at the value that keeps the old behaviour: ``INTRODUCED``)."""
    return sorted(k for k in old.keys() | new.keys()
                  if not _may_change(k) and old.get(k) != new.get(k) and not _introduced_as_before(k, old, new))


def load_record(run_dir: str | Path) -> RunRecord | None:
    path = Path(run_dir) / RECORD
    if not path.is_file():
        return None
    data = yaml.safe_load(path.read_text()) or {}
    return RunRecord(config=data.get("config", {}), wandb_id=data["wandb_id"],
                     completed_step=data.get("completed_step"), summary=data.get("summary") or {},
                     run_id=data.get("run_id") or data["wandb_id"], checkpoints=data.get("checkpoints"))


def save_record(run_dir: str | Path, record: RunRecord) -> None:
    """Written to a temporary file and renamed, so another rank never reads half a record."""
    path = Path(run_dir) / RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{RECORD}.{os.getpid()}.tmp")
    with cleaned_up_on_disk_full(path, tmp):
        tmp.write_text(yaml.safe_dump({"run_id": record.run_id, "wandb_id": record.wandb_id,
                                       "completed_step": record.completed_step, "summary": record.summary,
                                       "checkpoints": record.checkpoints, "config": record.config},
                                      sort_keys=False))
        os.replace(tmp, path)


def open_run(cfg: DictConfig) -> RunRecord:
    """The record this attempt runs under: the stored one when resuming, else a new one (not yet saved).

    Raises :class:`ConfigError` when the config changed (unless ``resume=force``).
    """
    run_dir = Path(cfg.paths.output_dir)
    config = flat_config(cfg)
    old = load_record(run_dir)
    if old is None:
        return RunRecord(config=config, wandb_id=new_wandb_id())
    # A new start of the same run folder keeps its run id (and where its checkpoints were).
    fresh = RunRecord(config=config, wandb_id=new_wandb_id(), run_id=old.run_id, checkpoints=old.checkpoints)
    if cfg.resume == "never":
        return fresh
    has_checkpoints = any(is_own(p) for p in checkpoints_newest_first(cfg.paths.checkpoints))
    changed = identity_diff(old.config, config)
    if changed and not has_checkpoints and old.completed_step is None:
        return fresh  # nothing of the old attempt to continue
    if changed and cfg.resume != "force":
        shown = ", ".join(f"{k}: {old.config.get(k)!r} -> {config.get(k)!r}" for k in changed[:8])
        more = f" (and {len(changed) - 8} more)" if len(changed) > 8 else ""
        raise ConfigError(
            f"run {cfg.name!r} ({run_dir}) was started with a different config: {shown}{more}. "
            "Use name=NEW for a new run, or resume=force to continue this one with the new config")
    old.config = config
    return old


def new_wandb_id() -> str:
    return uuid.uuid4().hex[:8]


def is_complete(record: RunRecord, max_steps: int, checkpoint_dir: str | Path) -> bool:
    """The run reached ``max_steps`` and its final checkpoint is still intact (else it resumes, or refuses)."""
    if record.completed_step is None or record.completed_step < max_steps:
        return False
    final = record.summary.get("checkpoint")
    return final is not None and verify(Path(checkpoint_dir) / Path(final).name) is None


def set_aside_logs(run_dir: str | Path) -> None:
    """``resume=never``: the new run gets a fresh CSV log; the old one moves to ``csv/set_aside_<time>/``."""
    versions = sorted((Path(run_dir) / "csv").glob("version_*"))
    if versions:
        target = Path(run_dir) / "csv" / time.strftime("set_aside_%Y%m%d_%H%M%S")
        target.mkdir(exist_ok=True)
        for version in versions:
            os.replace(version, target / version.name)


class SaveRecordWhenRestored(Callback):
    """``resume=force``: the new config becomes the run's record only once training starts, that is after
    the checkpoint was restored into the new model. A forced resume that fails (a size mismatch, say)
    leaves the record, and the history it shows, as it was."""

    def __init__(self, run_dir: str | Path, record: RunRecord):
        self.run_dir = run_dir
        self.record = record

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        save_record(self.run_dir, self.record)
