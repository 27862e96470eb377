"""``ring-train``: the Hydra app that trains long-context models on the ring.

``ring-train`` alone runs the embedded CPU default; ``ring-train recipe=NAME`` a recipe; any config key
can be overridden (``ring-train attention=dilated strategy=deepspeed_stage_2 max_steps=50``). With
``devices > 1`` Lightning re-runs this command once per extra process (same Hydra run directory), or
``torchrun --nproc-per-node N --max-restarts K -m ring_plugin.app.train ...`` starts the processes and
restarts them after a failure; either way the run resumes from its newest complete checkpoint.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from ..callbacks import FaultTolerance, RingMonitor, TaskAccuracy
from .resume import resolve_resume
from .validate import validate_config

# An absolute path works the same from a source checkout, an editable install and a wheel.
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def _configure_process(cfg: DictConfig) -> None:
    os.environ.setdefault("WANDB_MODE", "offline")  # no network needed unless the user asked for online
    os.environ.setdefault("WANDB_SILENT", "true")
    if cfg.trainer.accelerator == "cpu":
        # Processes share the cores: oversubscribed threads make every rank slower.
        torch.set_num_threads(cfg.threads_per_process or max(1, (os.cpu_count() or 1) // cfg.devices))


def build(cfg: DictConfig) -> tuple[pl.Trainer, pl.LightningModule, pl.LightningDataModule]:
    """Instantiate everything the run needs from the composed config."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    trainer = instantiate(cfg.trainer, strategy=instantiate(cfg.strategy), callbacks=callbacks,
                          logger=loggers or False)
    return trainer, model, datamodule


def run(cfg: DictConfig) -> dict[str, Any]:
    validate_config(cfg)
    _configure_process(cfg)
    trainer, model, datamodule = build(cfg)
    ckpt_path = resolve_resume(cfg.resume, cfg.paths.checkpoints)
    if ckpt_path is not None and trainer.is_global_zero:
        print(f"[ring-train] resuming from {ckpt_path}", flush=True)
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    except BaseException as err:
        _exit_if_distributed(trainer, err)
        raise
    summary = summarize(trainer, cfg)
    if trainer.is_global_zero:
        print(format_summary(summary), flush=True)
    return summary


def _exit_if_distributed(trainer: pl.Trainer, err: BaseException) -> None:
    """End a failed multi-process run now, with the error on stderr, instead of raising.

    After a dead or silent peer (``RingTimeoutError`` or a process-group timeout), collectives that
    never completed can block interpreter shutdown forever; a launcher (torchrun, Lightning) only sees
    the failure, and restarts the job, once this process has exited.
    """
    if trainer.world_size <= 1 or isinstance(err, SystemExit):
        return
    traceback.print_exception(err, file=sys.stderr)
    print(f"[ring-train] rank {trainer.global_rank} failed: {type(err).__name__}: {err}", file=sys.stderr,
          flush=True)
    # Lightning's own launcher started the other ranks as children of rank 0: do not leave them behind.
    for child in getattr(getattr(trainer.strategy, "launcher", None), "procs", None) or []:
        if child.poll() is None:
            child.kill()
    sys.stdout.flush()
    os._exit(1)


def _callback(trainer: pl.Trainer, kind: type) -> Any:
    return next((c for c in trainer.callbacks if isinstance(c, kind)), None)


def summarize(trainer: pl.Trainer, cfg: DictConfig) -> dict[str, Any]:
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    monitor = _callback(trainer, RingMonitor)
    task = _callback(trainer, TaskAccuracy)
    fault = _callback(trainer, FaultTolerance)
    summary: dict[str, Any] = {
        "step": trainer.global_step,
        "train_loss": metrics.get("train/loss"),
        "val_loss": metrics.get("val/loss"),
        "task_acc": task.last.get("val/task_acc") if task else None,
        "token_acc": task.last.get("val/token_acc") if task else None,
        "tokens_per_s": monitor.mean_tokens_per_s if monitor else None,
        "skipped_steps": fault.skipped_steps if fault else 0,
        "stopped_by_signal": fault.stopped_by_signal if fault else None,
        "checkpoints": str(cfg.paths.checkpoints),
        "output_dir": str(cfg.paths.output_dir),
    }
    for logger in trainer.loggers:
        if isinstance(logger, pl.loggers.WandbLogger) and trainer.is_global_zero:
            summary["wandb_dir"] = str(logger.experiment.dir).removesuffix("/files")
            summary["wandb_mode"] = os.environ.get("WANDB_MODE", "offline")
        elif isinstance(logger, pl.loggers.CSVLogger):
            summary["csv"] = os.path.join(logger.log_dir, "metrics.csv")
    chance = getattr(getattr(trainer.datamodule, "val_set", None), "passkey_digits", None)
    summary["task_chance"] = 10.0 ** -chance if chance else None
    return summary


def format_summary(s: dict[str, Any]) -> str:
    def num(v: Any, fmt: str) -> str:
        return "n/a" if v is None else format(v, fmt)

    lines = [
        "",
        f"== ring-train summary (step {s['step']}) ==",
        f"  final train loss   {num(s['train_loss'], '.4f')}   val loss {num(s['val_loss'], '.4f')}",
        f"  task accuracy      {num(s['task_acc'], '.3f')} exact match"
        + (f" (chance {s['task_chance']:.0e})" if s.get("task_chance") else "")
        + f", {num(s['token_acc'], '.3f')} of answer tokens",
        f"  throughput         {num(s['tokens_per_s'], ',.0f')} tokens/s",
        f"  checkpoints        {s['checkpoints']}",
    ]
    if "wandb_dir" in s:
        hint = "  (upload: wandb sync " + s["wandb_dir"] + ")" if s["wandb_mode"] == "offline" else ""
        lines.append(f"  W&B run ({s['wandb_mode']})  {s['wandb_dir']}{hint}")
    if "csv" in s:
        lines.append(f"  CSV log            {s['csv']}")
    if s["skipped_steps"]:
        lines.append(f"  skipped steps      {s['skipped_steps']} (non-finite gradients)")
    if s["stopped_by_signal"]:
        lines.append(f"  stopped by         {s['stopped_by_signal']}; the same command resumes")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
