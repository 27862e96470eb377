"""Checks of a composed ``ring-train`` config before anything is built or any process starts.

The rules live in the library (layouts, ring sizes, attention and model configs, strategies); this module
calls them on the config's values and turns their errors into a :class:`ConfigError` naming the config
key. What only the app knows is checked here: every key is said once (values derived from a top-level key
may not be set on their own) and the top-level numbers are in range. A bad command line fails in a
second, on every rank, instead of hanging a ring.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ..attention.factory import available_ring_attention, create_ring_attention
from ..config import RingAttentionConfig
from ..layout import sequence_divisor
from ..lightning.groups import check_sequence_sizes
from ..models import GPTConfig, RingCausalLM
from ..patterns.dilated import dilated_error
from .config_error import ConfigError
from .run_values import check_run_values

# Keys set from one top-level key: overriding them on their own would make two values of one setting
# (``trainer.max_steps=-1`` training forever while the LR schedule ends at ``max_steps``).
DERIVED = {
    "trainer.max_steps": "max_steps",
    "trainer.devices": "devices",
    "trainer.num_nodes": "num_nodes",
    "strategy.ring_size": "ring_size",
    "strategy.ulysses_size": "ulysses_size",
    "strategy.layout": "layout",
    "strategy.timeout.seconds": "comm_timeout",
    "data.train.seq_len": "seq_len",
    "data.val.seq_len": "seq_len",
    "data.seq_len": "seq_len",
    "data.train.vocab_size": "model.vocab_size",
    "data.val.vocab_size": "model.vocab_size",
    "callbacks.monitoring.log_every_n_steps": "trainer.log_every_n_steps",
}
# The data groups' vocabulary: the GPT model group's ``vocab_size``, or a transformers config's (model=hf).
MODEL_VOCAB = "${oc.select:model.vocab_size,${oc.select:model.config.vocab_size,null}}"
# GPTConfig / RingCausalLM arguments the app sets from the rest of the config (see ``model_kwargs``).
MODEL_FROM_APP = ("max_seq_len", "attention", "attention_kwargs", "max_steps")
RESUME_WORDS = ("auto", "never", "force")


@contextlib.contextmanager
def _as_config_error(prefix: str) -> Iterator[None]:
    """Re-raise a library ``ValueError``/``TypeError`` (which names its argument) under the config key."""
    try:
        yield
    except (ValueError, TypeError, InstantiationException) as err:
        cause = err.__cause__ if isinstance(err, InstantiationException) else err
        if not isinstance(cause, (ValueError, TypeError)):
            raise
        raise ConfigError(f"{prefix}.{cause}" if prefix else str(cause)) from None


def _positive_int(cfg: DictConfig, key: str) -> int:
    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{key}={value!r} must be a positive integer")
    return value


def _raw(cfg: DictConfig, key: str) -> Any:
    node: Any = OmegaConf.to_container(cfg, resolve=False)
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def check_said_once(cfg: DictConfig) -> None:
    for key, source in DERIVED.items():
        raw = _raw(cfg, key)
        if raw is not None and raw not in ("${" + source + "}", MODEL_VOCAB if source == "model.vocab_size" else None):
            raise ConfigError(f"{key}={raw!r} is set from {source}: set {source}=... instead (one value for both)")
    for key in MODEL_FROM_APP:
        if key in cfg.model:
            raise ConfigError(f"model.{key} is set by the app (from seq_len, attention, max_steps); remove it")


def model_kwargs(cfg: DictConfig, attention_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """``RingCausalLM`` arguments: ``cfg.model``'s GPTConfig fields as ``model``, the rest as they are."""
    values = OmegaConf.to_container(cfg.model, resolve=True)
    gpt_fields = GPTConfig.__dataclass_fields__
    arch = {k: v for k, v in values.items() if k in gpt_fields}
    arch.update(max_seq_len=cfg.seq_len, attention=cfg.attention.layer,
                attention_kwargs={**OmegaConf.to_container(cfg.attention.kwargs, resolve=True),
                                  **(attention_extra or {})})
    return {"model": arch, "max_steps": cfg.max_steps, **{k: v for k, v in values.items() if k not in gpt_fields}}


CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
# Groups the config declares optional: Hydra skips a name it cannot find there instead of failing.
OPTIONAL_GROUPS = ("recipe", "debug")


def check_optional_choices(choices: dict[str, Any]) -> None:
    """A misspelt ``recipe=``/``debug=`` would silently train the defaults: refuse it, listing the names."""
    for group in OPTIONAL_GROUPS:
        choice = choices.get(group)
        names = sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml"))
        if choice is not None and choice not in names:
            raise ConfigError(f"{group}={choice} is not a {group} config; valid: {', '.join(names)}")


def validate_config(cfg: DictConfig) -> None:
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{missing[0]} has no value (??? in the config): set {missing[0]}=...")
    for key in ("seq_len", "devices", "num_nodes", "ring_size", "ulysses_size", "max_steps"):
        _positive_int(cfg, key)
    check_said_once(cfg)
    with _as_config_error(""):
        check_sequence_sizes(cfg.ring_size, cfg.ulysses_size, cfg.devices * cfg.num_nodes)
    with _as_config_error(""):
        divisor = sequence_divisor(cfg.layout, cfg.ring_size * cfg.ulysses_size)
    if cfg.seq_len % divisor:
        sizes = f"ring_size={cfg.ring_size}" + (f" x ulysses_size={cfg.ulysses_size}" if cfg.ulysses_size > 1 else "")
        raise ConfigError(f"seq_len={cfg.seq_len} must be a multiple of {divisor} ({sizes}, layout={cfg.layout})")
    resume = cfg.get("resume")
    if not isinstance(resume, str) or not resume:
        raise ConfigError(f"resume={resume!r} must be {', '.join(RESUME_WORDS)} or a checkpoint path")
    with _as_config_error(""):
        RingAttentionConfig(comm_timeout=cfg.comm_timeout, layout=cfg.layout, ring_size=cfg.ring_size,
                            ulysses_size=cfg.ulysses_size)
    _validate_attention(cfg)
    _validate_model(cfg)

    check_run_values(cfg)
    with _as_config_error("strategy"):
        instantiate(cfg.strategy)


def instantiate_data(cfg: DictConfig) -> Any:
    """The data group, built; a library error (a bad path, field or tokenizer) becomes a ConfigError naming
    ``data.<argument>``, a one-line error before any process spawns."""
    with _as_config_error("data"):
        return instantiate(cfg.data)


def _validate_attention(cfg: DictConfig) -> None:
    names = available_ring_attention()
    if cfg.attention.layer not in names:
        raise ConfigError(f"attention.layer={cfg.attention.layer!r} is not a ring attention layer; "
                          f"valid: {', '.join(names)}")
    kwargs = OmegaConf.to_container(cfg.attention.kwargs, resolve=True)
    with _as_config_error("attention.kwargs"):
        config = RingAttentionConfig().replace(**kwargs)
    if config.segment_lengths is not None:
        error = dilated_error(config.segment_lengths, config.dilation_rates or [], cfg.seq_len)
        if error:
            raise ConfigError(f"attention.kwargs.segment_lengths: {error}")
    # The layer learns the sequence length only at its first call: check the grid against seq_len now.
    grid = config.grid
    if grid is not None and grid[0] * grid[1] != cfg.seq_len:
        raise ConfigError(f"attention.kwargs.grid={list(grid)} must be [H, W] with H x W = seq_len={cfg.seq_len}")
    if cfg.ulysses_size > 1:
        layer = create_ring_attention(cfg.attention.layer, config)
        if layer.pattern is not None or not layer.takes_masks:
            raise ConfigError(f"ulysses_size={cfg.ulysses_size} is supported by the dense attention layers (standard, "
                              f"sdpa, distributed, correct), not by attention={cfg.attention.name}")


def is_hf_model(cfg: DictConfig) -> bool:
    """Whether the model group is a transformers model (``model=hf``), built from its own ``_target_``."""
    return "_target_" in cfg.model


def _validate_model(cfg: DictConfig) -> None:
    if is_hf_model(cfg):
        _validate_hf_model(cfg)
        return
    kwargs = model_kwargs(cfg)
    with _as_config_error("model"):
        model = GPTConfig.from_dict(kwargs.pop("model"))
    if model.n_head % cfg.ulysses_size:
        raise ConfigError(f"model.n_head={model.n_head} must be a multiple of ulysses_size={cfg.ulysses_size} "
                          "(each rank of a Ulysses group attends n_head / ulysses_size heads)")
    unknown = set(kwargs) - set(inspect.signature(RingCausalLM).parameters)
    if unknown:
        raise ConfigError(f"model.{sorted(unknown)[0]} is neither a GPTConfig field nor a RingCausalLM argument")


def _validate_hf_model(cfg: DictConfig) -> None:
    """The transformers config the run trains (the pretrained folder's, read without weights), with its
    ``config_overrides``, holds ``seq_len``; transformers checks the rest when HFCausalLM builds the model."""
    from ..models.hf_overrides import check_context
    from .hf_model import model_config

    with _as_config_error("model"):
        config = model_config(cfg)
        check_context(config, cfg.seq_len)
    _check_vocabulary(cfg, config)


def _check_vocabulary(cfg: DictConfig, config: Any) -> None:
    """``data=hf``'s tokenizer loads, and its ids fit the model's embedding (else every rank fails mid-step)."""
    if not str(cfg.data.get("_target_", "")).endswith("HFTextDataModule"):
        return
    from ..data.hf_source import load_tokenizer

    with _as_config_error("data"):
        tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.data.get("messages_field"))
    if len(tokenizer) > config.vocab_size:
        key = "the pretrained model's vocab_size" if cfg.model.get("pretrained") else "model.config.vocab_size"
        raise ConfigError(f"{key}={config.vocab_size} is smaller than the {len(tokenizer)} tokens of "
                          f"data.tokenizer={cfg.data.tokenizer!r}: set model.config.vocab_size={len(tokenizer)}")
