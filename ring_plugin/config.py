"""``RingAttentionConfig``: every knob of a ring attention layer, validated on construction."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .layout import LAYOUTS
from .ops.kernels import BACKENDS

PATTERN_TYPES = ("local", "dilated_sparse", "global_local")

# The predecessor library's keyword arguments: renamed ones map onto ours; the others had no effect
# that a ring layer can honour, so they are accepted with a warning saying what does it instead.
LEGACY_RENAMED = {"enable_monitoring": "collect_stats", "world_size": "ring_size"}
LEGACY_WITHOUT_EFFECT = {
    "use_deepspeed": "DeepSpeed is chosen by the strategy (RingDeepSpeedStrategy), not by a layer",
}


def translate_legacy(overrides: dict[str, Any]) -> dict[str, Any]:
    """``overrides`` with the predecessor's keyword arguments mapped onto ours."""
    out = {}
    for name, value in overrides.items():
        if name in LEGACY_WITHOUT_EFFECT:
            warnings.warn(f"{name}={value!r} has no effect: {LEGACY_WITHOUT_EFFECT[name]}", UserWarning, stacklevel=3)
            continue
        out[LEGACY_RENAMED.get(name, name)] = value
    return out


def _ints(name: str, value: Sequence[int] | None) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name}={value!r} must be a list of positive integers")
    out = list(value)
    for v in out:
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name}={out!r} must hold positive integers; {v!r} is not one")
    return out


@dataclass
class RingAttentionConfig:
    """Configuration shared by every ring attention variant.

    ``segment_lengths``/``dilation_rates``: LongNet dilated attention pairs (both or neither).
    ``ring_size``: ranks in one ring (default: the active ring, else the whole world).
    ``ulysses_size``: 2-D sequence parallelism: groups of U adjacent ranks trade heads for sequence by
    an all-to-all and the ring runs across those groups; the sequence is sharded over U x ring_size
    ranks (default: the active mesh's, else 1; the query head count must be a multiple of it).
    ``layout``: shard layout, ``'contiguous'`` or ``'zigzag'`` (default: the active ring's, else
    contiguous). ``backend``: kernel backend (``'auto'`` picks by device and dtype).
    ``comm_timeout``: seconds to wait for a ring peer before raising (None: wait forever).
    ``collect_stats``: record communication statistics in the layer's ``.stats`` (None: the variant's
    default, on for ``distributed`` only); costs a device sync per ring step.
    ``oracle_dtype``: compute dtype of the ``correct`` variant (``'float32'`` or ``'float64'``).
    ``grad_comm_dtype``: dtype of the dK/dV accumulators that travel round the ring in backward:
    ``'float32'`` (exact sum, the default) or ``'input'`` (the inputs' dtype: half the memory and
    traffic for bf16, one extra rounding per ring hop). The gathered block-sparse path sends its
    kernel's own dK/dV rows as they are (inputs' dtype) and sums them at home in this dtype.
    ``block_size``/``sparsity_ratio``/``pattern_type``: block-sparse pattern (sparsity = share of block
    pairs skipped). ``grid``/``hilbert_level``: 2-D token grid of the Hilbert variant;
    ``token_order``: order of the tokens handed to it, ``'row_major'`` (it permutes) or ``'hilbert'``
    (already in Hilbert order, e.g. sharded with ``hilbert_permutation``).
    """

    segment_lengths: list[int] | None = None
    dilation_rates: list[int] | None = None
    dropout: float = 0.0
    ring_size: int | None = None
    ulysses_size: int | None = None
    layout: str | None = None
    backend: str = "auto"
    softmax_scale: float | None = None
    comm_timeout: float | None = None
    collect_stats: bool | None = None
    oracle_dtype: str = "float32"
    grad_comm_dtype: str = "float32"
    check_inputs_across_ranks: bool = True
    # Block-sparse and Hilbert variants.
    block_size: int = 64
    sparsity_ratio: float = 0.9
    pattern_type: str = "dilated_sparse"
    hilbert_level: int | None = None
    grid: tuple[int, int] | None = None
    token_order: str = "row_major"

    def __post_init__(self) -> None:
        self.segment_lengths = _ints("segment_lengths", self.segment_lengths)
        self.dilation_rates = _ints("dilation_rates", self.dilation_rates)
        if (self.segment_lengths is None) != (self.dilation_rates is None):
            raise ValueError(
                "segment_lengths and dilation_rates go together: give both or neither "
                f"(got segment_lengths={self.segment_lengths}, dilation_rates={self.dilation_rates})"
            )
        if self.segment_lengths is not None and len(self.segment_lengths) != len(self.dilation_rates or []):
            raise ValueError(
                f"segment_lengths={self.segment_lengths} and dilation_rates={self.dilation_rates} "
                "must have the same length"
            )
        if self.segment_lengths is not None and not self.segment_lengths:
            raise ValueError("segment_lengths=[] must name at least one segment (or be None for dense)")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout!r} must be a float in [0, 1)")
        if self.ring_size is not None and (
            isinstance(self.ring_size, bool) or not isinstance(self.ring_size, int) or self.ring_size <= 0
        ):
            raise ValueError(f"ring_size={self.ring_size!r} must be a positive integer or None")
        if self.ulysses_size is not None and (
            isinstance(self.ulysses_size, bool) or not isinstance(self.ulysses_size, int) or self.ulysses_size < 1
        ):
            raise ValueError(f"ulysses_size={self.ulysses_size!r} must be a positive integer or None")
        if self.layout is not None and self.layout not in LAYOUTS:
            raise ValueError(f"layout={self.layout!r} is not a known shard layout; valid: {', '.join(LAYOUTS)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r} is not a known kernel backend; valid: {', '.join(BACKENDS)}")
        if self.softmax_scale is not None and not self.softmax_scale > 0:
            raise ValueError(f"softmax_scale={self.softmax_scale!r} must be positive or None")
        if self.comm_timeout is not None and not self.comm_timeout > 0:
            raise ValueError(f"comm_timeout={self.comm_timeout!r} must be positive seconds or None")
        if self.grad_comm_dtype not in ("float32", "input"):
            raise ValueError(f"grad_comm_dtype={self.grad_comm_dtype!r} must be 'float32' or 'input'")
        if self.oracle_dtype not in ("float32", "float64"):
            raise ValueError(f"oracle_dtype={self.oracle_dtype!r} must be 'float32' or 'float64'")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size <= 0:
            raise ValueError(f"block_size={self.block_size!r} must be a positive integer")
        if not isinstance(self.sparsity_ratio, (int, float)) or not 0.0 <= self.sparsity_ratio < 1.0:
            raise ValueError(
                f"sparsity_ratio={self.sparsity_ratio!r} must lie in [0, 1): the fraction of block pairs "
                "skipped (0.9 = 90% sparse)"
            )
        if self.pattern_type not in PATTERN_TYPES:
            raise ValueError(f"pattern_type={self.pattern_type!r} is not known; valid: {', '.join(PATTERN_TYPES)}")
        if self.hilbert_level is not None and (not isinstance(self.hilbert_level, int) or self.hilbert_level < 0):
            raise ValueError(f"hilbert_level={self.hilbert_level!r} must be a non-negative integer")
        if self.grid is not None:
            grid = tuple(self.grid)
            if len(grid) != 2 or any(isinstance(g, bool) or not isinstance(g, int) or g <= 0 for g in grid):
                raise ValueError(f"grid={self.grid!r} must be two positive integers (H, W)")
            self.grid = grid  # type: ignore[assignment]
        if self.token_order not in ("row_major", "hilbert"):
            raise ValueError(f"token_order={self.token_order!r} must be 'row_major' or 'hilbert'")

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    def replace(self, **overrides: Any) -> RingAttentionConfig:
        overrides = translate_legacy(overrides)
        unknown = set(overrides) - self.field_names()
        if unknown:
            raise TypeError(
                f"unknown ring attention argument(s) {sorted(unknown)}; valid: {sorted(self.field_names())}"
            )
        return dataclasses.replace(self, **overrides)
