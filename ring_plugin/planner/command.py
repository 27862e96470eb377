"""The ``ring-train`` command that runs a planned layout: the recipe, the user's overrides, and the keys
where the layout differs from the composed config."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from ..models.gpt import GPTConfig
from .cluster import Cluster
from .workload import LONG_CONTEXT_TILE, Job, Layout

GPT_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GPTConfig)}


def _value(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def layout_settings(cfg: Any, job: Job, layout: Layout, cluster: Cluster) -> dict[str, object]:
    """``ring-train`` keys and values that run ``layout`` of ``job`` on ``cluster`` (every key the layout
    decides, whatever the config holds)."""
    deepspeed = "DeepSpeed" in str(cfg.strategy.get("_target_", ""))
    settings: dict[str, object] = {"devices": cluster.gpus_per_node, "num_nodes": cluster.nodes,
                                   "ulysses_size": layout.ulysses, "ring_size": layout.ring}
    if deepspeed or layout.zero > 0:
        settings.update({"strategy": "deepspeed", "strategy.stage": layout.zero})
    settings["data.batch_size"] = job.batch
    settings["model.activation_checkpointing"] = layout.checkpointing
    if not job.model.hf:
        settings["model.recompute_attention"] = layout.recompute_attention
        settings["model.checkpoint_layers"] = layout.checkpoint_layers if layout.checkpointing else None
    offload = job.offloads(layout) or (layout.host_offload and layout.mode == "full")
    settings["model.offload_checkpoints"] = offload
    if offload:
        settings["model.mlp_tile_tokens"] = job.model.config.mlp_tile_tokens or LONG_CONTEXT_TILE
    return settings


ABSENT = object()


def _current(cfg: Any, key: str) -> object:
    """The config's value of ``key`` (ABSENT when the config has no such key)."""
    from omegaconf import OmegaConf

    if key == "strategy":
        return "deepspeed" if "DeepSpeed" in str(cfg.strategy.get("_target_", "")) else "ddp"
    return OmegaConf.select(cfg, key, default=ABSENT)


def train_command(recipe: str | None, overrides: Sequence[str], cfg: Any, job: Job, layout: Layout,
                  cluster: Cluster) -> str:
    """``ring-train recipe=... <the user's overrides> <the layout's keys that differ from cfg>``."""
    settings = {key: value for key, value in (arg.split("=", 1) for arg in overrides)}
    for key, value in layout_settings(cfg, job, layout, cluster).items():
        current = _current(cfg, key)
        absent = current is ABSENT and key.startswith("model.")  # strategy.* comes with strategy=deepspeed
        if absent:  # the model's own default applies (the key is added with '+' where it must change)
            current = getattr(job.model.config, key.removeprefix("model."), None) if job.model.hf else \
                GPT_DEFAULTS.get(key.removeprefix("model."))
        if key in settings or _value(current) != _value(value):
            settings[("+" if absent and key not in settings else "") + key] = _value(value)
    words = ["ring-train"] + ([f"recipe={recipe}"] if recipe else []) + [f"{k}={v}" for k, v in settings.items()]
    return " ".join(words)
