"""``ring-train``: the Hydra app that trains long-context models on the ring.

``ring-train`` alone runs the embedded CPU default; ``ring-train recipe=NAME`` a recipe; any config key
can be overridden (``ring-train attention=dilated strategy=deepspeed max_steps=50``). With
``devices > 1`` Lightning re-runs this command once per extra process (same Hydra run directory), or
``torchrun --nproc-per-node N --max-restarts K -m ring_plugin.app.train ...`` starts the processes and
restarts them after a failure; either way the run resumes from its newest complete checkpoint. On several
nodes one ``torchrun --nnodes N`` per node, or ``srun`` under SLURM, starts every process (Lightning spawns
none) with ``devices`` = processes per node and ``num_nodes`` = N (docs/app.md, "Multi-node"). The same
command on a completed run says so and exits; a changed config is refused (see ``identity``).
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from ..callbacks import FaultTolerance, FinalCheckpoint, RingProgressBar
from ..callbacks.disk_full import DiskFullError
from ..callbacks.progress import ProgressLines
from ..lightning import RingDeepSpeedStrategy
from ..models import RingCausalLM
from .accelerator import check_accelerator
from .config_checks import (
    CONF_DIR,
    ConfigError,
    check_optional_choices,
    instantiate_data,
    is_hf_model,
    model_kwargs,
    validate_config,
)
from .hf_model import check_attention_dropout
from .hf_model import describe as describe_hf_model
from .identity import RunRecord, SaveRecordWhenRestored, is_complete, open_run, save_record, set_aside_logs
from .known_keys import check_config, check_overrides
from .launch import check_launch, is_global_rank_zero, launcher
from .quiet import quiet_known_noise, route_lightning_logs
from .resume import resolve_resume
from .resume_changes import resume_notes, schedule_summary, steps
from .run_folder import check_checkpoints_folder, claim_checkpoints_folder
from .run_lock import acquire_run_lock
from .run_summary import SummaryInCheckpoint, find_callback, finish_from_checkpoint, training_metrics
from .sweep_dirs import register as register_sweep_folders
from .wandb_log import sync_hint

register_sweep_folders()
# An absolute path works the same from a source checkout, an editable install and a wheel.
CONFIG_DIR = str(CONF_DIR)
log = logging.getLogger("ring_plugin.app")
# RingAttentionConfig field that makes a layer count its ring traffic for the monitoring callback.
STATS_FLAG = "collect_stats"


def _configure_process(cfg: DictConfig) -> None:
    os.environ.setdefault("WANDB_MODE", "offline")  # no network needed unless the user asked for online
    os.environ.setdefault("WANDB_SILENT", "true")
    route_lightning_logs()
    if cfg.trainer.accelerator == "cpu":
        # Processes share the cores: oversubscribed threads make every rank slower.
        torch.set_num_threads(cfg.threads_per_process or max(1, (os.cpu_count() or 1) // cfg.devices))


def _attention_extra(cfg: DictConfig) -> dict[str, Any]:
    """Layer arguments said once at the top of the config (and ring statistics when they are monitored)."""
    extra: dict[str, Any] = {"comm_timeout": cfg.comm_timeout}
    if any(c.get("_target_", "").endswith("RingMonitor") for c in (cfg.get("callbacks") or {}).values() if c):
        extra[STATS_FLAG] = True
    return extra


def build(cfg: DictConfig, record: RunRecord | None = None
          ) -> tuple[pl.Trainer, pl.LightningModule, pl.LightningDataModule]:
    """Instantiate everything the run needs from the composed config."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate_data(cfg)
    if is_hf_model(cfg):  # a transformers model: every layer runs the ring engine, no attention group
        model = instantiate(cfg.model, max_steps=cfg.max_steps)
    else:
        model = RingCausalLM(**model_kwargs(cfg, _attention_extra(cfg)))
    model._log_hyperparams = False  # the app logs the whole config (_log_config): the model group stays as typed
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    callbacks.append(SummaryInCheckpoint())
    bar = cfg.trainer.enable_progress_bar and sys.stdout.isatty()
    if cfg.trainer.enable_progress_bar:  # a bar on a terminal; redirected, a line every log_every_n_steps
        callbacks.append(RingProgressBar() if bar else ProgressLines(cfg.trainer.log_every_n_steps))
    loggers = [_logger(c, cfg, record) for c in (cfg.get("logger") or {}).values() if c is not None]
    trainer = instantiate(cfg.trainer, strategy=instantiate(cfg.strategy), callbacks=callbacks,
                          logger=loggers or False, enable_progress_bar=bar)
    return trainer, model, datamodule


def _logger(node: DictConfig, cfg: DictConfig, record: RunRecord | None) -> Any:
    target = node.get("_target_", "")
    if target.endswith("WandbLogger"):
        group = cfg.group or (cfg.name if _is_multirun() else None)
        extra = {"group": group}
        if record is not None:  # the stored id: a resume continues the same W&B run
            extra.update(id=record.wandb_id, resume="allow")
        if _is_multirun():
            extra["name"] = f"{cfg.name}-{Path(cfg.paths.output_dir).name}"  # the job's folder: its overrides
        logger = instantiate(node, **extra)
        logger._wandb_init.pop("anonymous", None)  # Lightning passes None, which wandb warns about
        return logger
    return instantiate(node)


def _is_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _pin_run_dir_for_ranks(cfg: DictConfig) -> None:
    """Under ``--multirun`` Lightning re-runs the command line (the whole sweep) for its extra ranks, in
    ``hydra.run.dir``: point both at this job, so the extra ranks run this job in its own folder."""
    if not _is_multirun():
        return
    hc = HydraConfig.get()
    with read_write(hc), open_dict(hc):
        hc.run.dir = str(cfg.paths.output_dir)
    sys.argv = [sys.argv[0], *hc.overrides.task]


def run(cfg: DictConfig) -> dict[str, Any]:
    quiet_known_noise()  # before validation, which builds the strategy (and may import DeepSpeed)
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    check_optional_choices(choices)
    check_config(cfg)
    check_accelerator(cfg, choices.get("recipe"))
    validate_config(cfg)
    if is_hf_model(cfg):
        check_attention_dropout(cfg)
    check_launch(cfg.devices, cfg.num_nodes)
    _configure_process(cfg)
    owner = is_global_rank_zero()  # the run's files are written once, by global rank 0 (of every node)
    if owner:
        acquire_run_lock(cfg.paths.output_dir)  # a second start of this run is refused, naming this process
    notes = resume_notes(cfg)
    record = open_run(cfg)
    check_checkpoints_folder(cfg, record)
    if cfg.resume != "never" and is_complete(record, cfg.max_steps, cfg.paths.checkpoints):
        if owner:
            log.info(f"[ring-train] run {cfg.name!r} is complete ({record.completed_step} steps, "
                     f"{cfg.paths.output_dir}); its summary:" + format_summary(record.summary) +
                     "\nUse name=NEW for a new run, or a larger max_steps to train this one further.")
        return record.summary
    checkpointed = finish_from_checkpoint(cfg, record.wandb_id)
    if checkpointed is not None:  # the last step is checkpointed, the run was not marked complete: mark it now
        if owner:
            record.completed_step, record.summary = checkpointed["step"], checkpointed
            save_record(cfg.paths.output_dir, record)
            log.info(f"[ring-train] run {cfg.name!r} reached step {checkpointed['step']} (checkpointed) but was not "
                     "marked complete: completed now, nothing to train" + format_summary(checkpointed))
        return checkpointed
    keeps_record = owner and not cfg.trainer.fast_dev_run
    if keeps_record:
        claim_checkpoints_folder(cfg, record)
        if cfg.resume == "never":
            set_aside_logs(cfg.paths.output_dir)
        if cfg.resume != "force":  # a forced resume is recorded once its checkpoint is restored
            save_record(cfg.paths.output_dir, record)
    _pin_run_dir_for_ranks(cfg)
    env_before = dict(os.environ)
    trainer, model, datamodule = build(cfg, record)
    if keeps_record and cfg.resume == "force":
        trainer.callbacks.append(SaveRecordWhenRestored(cfg.paths.output_dir, record))
    ckpt_path = resolve_resume("auto" if cfg.resume == "force" else cfg.resume, cfg.paths.checkpoints)
    if trainer.is_global_zero:
        _announce(cfg, trainer, model, ckpt_path)
        for note in notes if ckpt_path else ():
            log.info(note)
        _log_config(trainer, cfg, model)
    try:
        # Tensors and plain containers only: nothing in a checkpoint file can run code while it loads.
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except BaseException as err:
        _exit_if_distributed(trainer, err)
        raise
    summary = summarize(trainer, cfg)
    if _is_multirun():  # the next sweep job starts its own ranks: no group, no launcher variables left
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(env_before)
    if trainer.is_global_zero:
        _finish_loggers(trainer, summary)
        finished = summary["stopped_by_signal"] is None and trainer.global_step >= cfg.max_steps
        if owner and finished and not trainer.fast_dev_run:
            record.completed_step, record.summary = trainer.global_step, summary
            save_record(cfg.paths.output_dir, record)
        log.info(format_summary(summary))
    return summary


def _announce(cfg: DictConfig, trainer: pl.Trainer, model: RingCausalLM, ckpt_path: str | None) -> None:
    attention, params = f"{cfg.attention.name} attention", sum(p.numel() for p in model.parameters())
    if is_hf_model(cfg):  # built later, in the strategy's context: described from its config
        attention, params = describe_hf_model(cfg)
    log.info(f"[ring-train] run {cfg.name!r} in {cfg.paths.output_dir}: {attention}, "
             f"{params / 1e6:.2f}M parameters, seq_len {cfg.seq_len}, {cfg.devices * cfg.num_nodes} processes"
             f"{_nodes(cfg)} ({_sequence_parallel(cfg)}, {cfg.layout}), {steps(trainer.max_steps)}"
             + schedule_summary(model) + (f"; resuming from {ckpt_path}" if ckpt_path else ""))
    if cfg.num_nodes > 1 and cfg.devices % cfg.ulysses_size:
        # Ulysses groups are adjacent ranks: one that straddles two nodes sends its all-to-alls over the network.
        log.warning(f"[ring-train] ulysses_size={cfg.ulysses_size} does not divide devices={cfg.devices}: some "
                    "Ulysses groups span two nodes (slow all-to-all); pick ulysses_size dividing devices")
    if isinstance(trainer.strategy, RingDeepSpeedStrategy) and cfg.trainer.accelerator == "cpu" \
            and not _deepspeed_cpu_op_built():
        log.info("[ring-train] building DeepSpeed's CPU communication op, once, ~2 min ...")


def _nodes(cfg: DictConfig) -> str:
    """`` on 2 nodes (torchrun)``: how the processes were started, for the start line."""
    return f" on {cfg.num_nodes} nodes ({launcher()})" if cfg.num_nodes > 1 else ""


def _sequence_parallel(cfg: DictConfig) -> str:
    ring = f"ring of {cfg.ring_size}"
    return ring if cfg.ulysses_size == 1 else f"Ulysses {cfg.ulysses_size} x {ring}"


def _deepspeed_cpu_op_built() -> bool:
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    return any(root.glob("**/deepspeed_shm_comm*.so")) or any(root.glob("**/deepspeed_ccl_comm*.so"))


def _log_config(trainer: pl.Trainer, cfg: DictConfig, model: RingCausalLM) -> None:
    """Every group of the resolved config, the chosen group options and the parameter count, to every logger."""
    params = OmegaConf.to_container(cfg, resolve=True)
    if HydraConfig.initialized():
        params["choices"] = {k: v for k, v in HydraConfig.get().runtime.choices.items()
                             if not k.startswith("hydra")}
    params["parameters"] = sum(p.numel() for p in model.parameters())
    for logger in trainer.loggers:
        logger.log_hyperparams(params)


def _finish_loggers(trainer: pl.Trainer, summary: dict[str, Any]) -> None:
    """The run's summary metrics into W&B's summary, then close the W&B run (the next sweep job opens its own)."""
    for logger in trainer.loggers:
        if isinstance(logger, pl.loggers.WandbLogger):
            logger.experiment.summary.update({f"final/{k}": v for k, v in summary.items()
                                              if isinstance(v, (int, float)) and not isinstance(v, bool)})
            logger.experiment.finish()


def _exit_if_distributed(trainer: pl.Trainer, err: BaseException) -> None:
    """End a failed multi-process run now, with the error on stderr, instead of raising.

    After a dead or silent peer (``RingTimeoutError`` or a process-group timeout), collectives that
    never completed can block interpreter shutdown forever; a launcher (torchrun, Lightning) only sees
    the failure, and restarts the job, once this process has exited.
    """
    if trainer.world_size <= 1 or isinstance(err, SystemExit):
        return
    if not isinstance(err, DiskFullError):  # its message says it all
        traceback.print_exception(err, file=sys.stderr)
    print(f"[ring-train] rank {trainer.global_rank} failed: {type(err).__name__}: {err}", file=sys.stderr,
          flush=True)
    # Lightning's own launcher started the other ranks as children of rank 0: do not leave them behind.
    for child in getattr(getattr(trainer.strategy, "launcher", None), "procs", None) or []:
        if child.poll() is None:
            child.kill()
    sys.stdout.flush()
    os._exit(1)


def summarize(trainer: pl.Trainer, cfg: DictConfig) -> dict[str, Any]:
    fault = find_callback(trainer, FaultTolerance)
    final = find_callback(trainer, FinalCheckpoint)
    summary: dict[str, Any] = {
        **training_metrics(trainer),
        "stopped_by_signal": fault.stopped_by_signal if fault else None,
        "checkpoint": final.last_path if final and final.last_path and os.path.exists(final.last_path) else None,
        "output_dir": str(cfg.paths.output_dir),
    }
    for logger in trainer.loggers:
        if isinstance(logger, pl.loggers.WandbLogger) and trainer.is_global_zero:
            summary["wandb_dir"] = str(logger.experiment.dir).removesuffix("/files")
            summary["wandb_mode"] = os.environ.get("WANDB_MODE", "offline")
            summary["wandb_sync"] = sync_hint(cfg.paths.output_dir, logger.version)
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
        f"  model              {num(s.get('parameters'), ',')} parameters",
        f"  final train loss   {num(s['train_loss'], '.4f')}   val loss {num(s['val_loss'], '.4f')}",
        f"  task accuracy      {num(s['task_acc'], '.3f')} exact match"
        + (f" (chance {s['task_chance']:.0e})" if s.get("task_chance") else "")
        + f", {num(s['token_acc'], '.3f')} of answer tokens",
        f"  throughput         {num(s['tokens_per_s'], ',.0f')} tokens/s, MFU {num(s.get('mfu'), '.2%')}",
    ]
    if s.get("checkpoint"):
        lines.append(f"  checkpoint         {s['checkpoint']} (also last.ckpt)")
    if "wandb_dir" in s:
        sync = s.get("wandb_sync") or f"wandb sync {s['wandb_dir']}"
        hint = f"  (upload: {sync})" if s["wandb_mode"] == "offline" else ""
        lines.append(f"  W&B run ({s['wandb_mode']})  {s['wandb_dir']}{hint}")
    if "csv" in s:
        lines.append(f"  CSV log            {s['csv']}")
    if s["skipped_steps"]:
        lines.append(f"  skipped steps      {s['skipped_steps']} (non-finite gradients)")
    if s["stopped_by_signal"]:
        lines.append(f"  stopped by         {s['stopped_by_signal']}; the same command resumes")
    return "\n".join(lines)


def _config_error(err: ConfigError) -> None:
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise err
    print(f"ring-train: config error: {err}", file=sys.stderr, flush=True)  # one line, no traceback
    sys.exit(2)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except ConfigError as err:
        _config_error(err)
    except DiskFullError as err:
        print(f"ring-train: {err}", file=sys.stderr, flush=True)  # one line: where the disk is full
        sys.exit(1)


def main() -> None:
    """The console script: unknown keys on the command line are refused before Hydra composes the config."""
    try:
        check_overrides(sys.argv[1:])
    except ConfigError as err:
        _config_error(err)
    hydra_main()


if __name__ == "__main__":
    main()
