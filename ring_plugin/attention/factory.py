"""``create_ring_attention(name, config=None, process_group=None, **overrides)``."""

from __future__ import annotations

from typing import Any

from ..config import RingAttentionConfig
from .modules import (
    DistributedRingAttention,
    RingAttentionBase,
    RingDilatedAttentionCorrect,
    RingDilatedAttentionSDPA,
    StandardRingAttention,
)
from .pattern_modules import HilbertBlockSparseAttention, HilbertRingAttention, RingBlockSparseAttention

_REGISTRY: dict[str, type[RingAttentionBase]] = {
    "standard": StandardRingAttention,
    "sdpa": RingDilatedAttentionSDPA,
    "correct": RingDilatedAttentionCorrect,
    "distributed": DistributedRingAttention,
    "block_sparse": RingBlockSparseAttention,
    "hilbert": HilbertRingAttention,
    "hilbert_block_sparse": HilbertBlockSparseAttention,
}


def register_ring_attention(name: str, cls: type[RingAttentionBase]) -> None:
    """Make ``cls`` available to :func:`create_ring_attention` under ``name``."""
    _REGISTRY[name] = cls


def available_ring_attention() -> list[str]:
    return sorted([*_REGISTRY, "auto"])


def create_ring_attention(
    name: str = "auto",
    config: RingAttentionConfig | None = None,
    process_group: Any = None,
    **overrides: Any,
) -> RingAttentionBase:
    """Build a ring attention layer by name.

    ``overrides`` are :class:`RingAttentionConfig` fields applied on top of ``config`` (the
    predecessor's keywords, e.g. ``world_size`` for ``ring_size``, are translated). ``'auto'`` picks the standard
    engine (the fastest exact dense variant) unless a config field asks for a pattern variant.
    """
    if name == "auto":
        name = _auto_name(config, overrides)
    if name not in _REGISTRY:
        raise ValueError(f"unknown ring attention {name!r}; valid names: {', '.join(available_ring_attention())}")
    return _REGISTRY[name](config=config, process_group=process_group, **overrides)


def _auto_name(config: RingAttentionConfig | None, overrides: dict[str, Any]) -> str:
    grid = overrides.get("grid", config.grid if config else None)
    level = overrides.get("hilbert_level", config.hilbert_level if config else None)
    if (grid is not None or level is not None) and "hilbert" in _REGISTRY:
        return "hilbert"
    return "standard"
