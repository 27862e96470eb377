"""Checks of a composed ``ring-train`` config before anything is built or any process starts.

Each error names the config key, its value and what would be valid, so a bad command line fails in a
second instead of hanging a ring.
"""

from __future__ import annotations

from omegaconf import DictConfig

from ..attention.factory import available_ring_attention

ZERO_STAGES = (0, 1, 2, 3)
LAYOUT_CHUNKS = {"contiguous": 1, "zigzag": 2}


class ConfigError(ValueError):
    """A value in the composed config is invalid; the message names the key."""


def _positive_int(cfg: DictConfig, key: str) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{key}={value!r} must be a positive integer")
    return value


def validate_config(cfg: DictConfig) -> None:
    for key in ("seq_len", "devices", "num_nodes", "ring_size", "max_steps"):
        _positive_int(cfg, key)
    world = cfg.devices * cfg.num_nodes
    if world % cfg.ring_size:
        divisors = [d for d in range(1, world + 1) if world % d == 0]
        raise ConfigError(
            f"ring_size={cfg.ring_size} must divide the number of processes devices x num_nodes = {world}; "
            f"valid: {divisors}"
        )
    if cfg.layout not in LAYOUT_CHUNKS:
        raise ConfigError(f"layout={cfg.layout!r} is not a shard layout; valid: {', '.join(LAYOUT_CHUNKS)}")
    divisor = cfg.ring_size * LAYOUT_CHUNKS[cfg.layout]
    if cfg.seq_len % divisor:
        raise ConfigError(
            f"seq_len={cfg.seq_len} must be a multiple of ring_size x {LAYOUT_CHUNKS[cfg.layout]} = {divisor} "
            f"(layout={cfg.layout})"
        )
    if not (isinstance(cfg.comm_timeout, (int, float)) and cfg.comm_timeout > 0):
        raise ConfigError(f"comm_timeout={cfg.comm_timeout!r} must be positive seconds")
    resume = cfg.get("resume")
    if not isinstance(resume, str) or not resume:
        raise ConfigError(f"resume={resume!r} must be 'auto', 'never' or a checkpoint path")
    _validate_attention(cfg)
    _validate_strategy(cfg)
    model = cfg.model.get("model")  # RingCausalLM's GPT config; a transformers model (model=hf) has none
    if model is not None and model.max_seq_len < cfg.seq_len:
        raise ConfigError(f"model.model.max_seq_len={model.max_seq_len} is shorter than seq_len={cfg.seq_len}")


def _validate_attention(cfg: DictConfig) -> None:
    names = available_ring_attention()
    name = cfg.attention.name
    if name not in names:
        raise ConfigError(f"attention.name={name!r} is not a known attention variant; valid: {', '.join(names)}")
    kwargs = cfg.attention.get("kwargs") or {}
    segments = kwargs.get("segment_lengths")
    if segments:
        bad = [w for w in segments if w < cfg.seq_len and cfg.seq_len % w]
        if bad:
            raise ConfigError(
                f"attention.kwargs.segment_lengths={list(segments)}: {bad} shorter than seq_len={cfg.seq_len} "
                "must divide it"
            )
    grid = kwargs.get("grid")
    if grid is not None and (len(grid) != 2 or grid[0] * grid[1] != cfg.seq_len):
        raise ConfigError(f"attention.kwargs.grid={list(grid)} must be [H, W] with H x W = seq_len={cfg.seq_len}")
    sparsity = kwargs.get("sparsity_ratio")
    if sparsity is not None and not 0.0 <= sparsity < 1.0:
        raise ConfigError(
            f"attention.kwargs.sparsity_ratio={sparsity} must lie in [0, 1): the fraction of block pairs skipped"
        )


def _validate_strategy(cfg: DictConfig) -> None:
    if "stage" in cfg.strategy and cfg.strategy.stage not in ZERO_STAGES:
        raise ConfigError(
            f"strategy.stage={cfg.strategy.stage!r} is not a ZeRO stage; valid: {', '.join(map(str, ZERO_STAGES))}"
        )
    if cfg.strategy.get("ring_size") not in (None, cfg.ring_size):
        raise ConfigError(
            f"strategy.ring_size={cfg.strategy.ring_size} differs from ring_size={cfg.ring_size}; set ring_size only"
        )
