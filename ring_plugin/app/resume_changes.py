"""What a resume changes, said before training: ``resume=force``'s new settings, and a longer LR schedule.

``resume=force`` continues a run under a changed config. The optimizer and LR schedule take the new ``model.*``
values (``RingCausalLM.on_train_start`` sets them on the restored state); a change the checkpoint's weights
cannot take (the model's shape) is refused, naming the key. Without ``model.schedule_steps`` the cosine schedule
ends at ``max_steps``: a resume with a larger ``max_steps`` stretches it, which raises the LR; the start line says
so and how to keep the schedule.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from ..callbacks.checkpoint_files import checkpoints_newest_first
from .config_error import ConfigError
from .identity import flat_config, identity_diff, load_record

# GPTConfig fields that set a weight's shape (or which weights exist): a checkpoint cannot take another value.
SHAPE_KEYS = ("vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "tie_weights", "mlp_hidden", "norm", "bias")
# The optimizer's and schedule's settings: applied to the restored optimizer and scheduler.
OPTIMIZER_KEYS = ("lr", "weight_decay", "betas", "warmup_steps", "min_lr_ratio", "schedule_steps")


def changes_shape(key: str) -> bool:
    """Whether a changed key changes the model's parameters (a transformers config or model, or a GPT's shape)."""
    if key in ("model._target_", "model.pretrained") or key.startswith("model.config."):
        return True
    return key.startswith("model.") and key.removeprefix("model.") in SHAPE_KEYS


def schedule_length(config: dict[str, Any]) -> int | None:
    """The cosine schedule's length of a flat config: ``model.schedule_steps``, else ``max_steps``."""
    return config.get("model.schedule_steps") or config.get("max_steps")


def resume_notes(cfg: DictConfig) -> list[str]:
    """Lines for the start of a resumed run (none for a new run); raises :class:`ConfigError` for a forced
    change the checkpoint cannot take. Call before ``open_run``, which replaces the stored config."""
    old = load_record(cfg.paths.output_dir)
    if old is None or cfg.resume == "never" or not checkpoints_newest_first(cfg.paths.checkpoints):
        return []
    new = flat_config(cfg)
    notes = []
    if cfg.resume == "force":
        changed = identity_diff(old.config, new)
        for key in changed:
            if changes_shape(key):
                raise ConfigError(f"resume=force cannot apply {key}: {old.config.get(key)!r} -> {new.get(key)!r} "
                                  "(the checkpoint's weights have the old shape); use name=NEW for a new run")
        if changed:
            shown = ", ".join(f"{k} {old.config.get(k)!r} -> {new.get(k)!r}" for k in changed)
            applied = [k for k in changed if k.removeprefix("model.") in OPTIMIZER_KEYS]
            notes.append(f"[ring-train] resume=force continues with the new {shown}"
                         + (f" (the restored optimizer and LR schedule take {', '.join(applied)})" if applied else ""))
    before, after = schedule_length(old.config), schedule_length(new)
    if before and after and before != after:
        notes.append(f"[ring-train] the cosine LR schedule now ends at step {after} instead of {before}: "
                     + ("a longer schedule raises the LR where the run left it; set " if after > before else
                        "a shorter one lowers it; set ")
                     + f"model.schedule_steps={before} to keep the schedule")
    return notes


def steps(n: int) -> str:
    return f"{n} step" if n == 1 else f"{n} steps"


def schedule_summary(model: Any) -> str:
    """`` LR 0.01, 50 warm-up steps, cosine to 0.1x at step 600`` for the start line."""
    hp = getattr(model, "hparams", {})
    length = model.schedule_length() if hasattr(model, "schedule_length") else None
    if "lr" not in hp or length is None:
        return ""
    return (f"; LR {hp.lr:g}, {steps(hp.warmup_steps)} of warm-up, cosine to {hp.min_lr_ratio:g}x at step {length}"
            + ("" if hp.get("schedule_steps") else " (max_steps; fix it with model.schedule_steps)"))

