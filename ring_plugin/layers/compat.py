"""The predecessor library's class names, resolving to ring_plugin's variants with the right pattern.

Single-layer names are the variants themselves; multi-head names are
:class:`~ring_plugin.layers.multihead.RingMultiheadAttention` with the attention variant fixed.
"""

from __future__ import annotations

from typing import Any, ClassVar

from ..attention.modules import DistributedRingAttention
from ..attention.pattern_modules import HilbertRingAttention, RingBlockSparseAttention
from .multihead import RingMultiheadAttention


class _FixedVariantMultihead(RingMultiheadAttention):
    attention_name: ClassVar[str] = "standard"

    def __init__(self, embed_dim: int, num_heads: int, *args: Any, **kwargs: Any):
        if "attention" in kwargs:
            raise TypeError(f"{type(self).__name__} fixes attention={self.attention_name!r}")
        super().__init__(embed_dim, num_heads, self.attention_name, *args, **kwargs)


class BlockSparseRingMultiheadDilatedAttention(_FixedVariantMultihead):
    """Multi-head block-sparse ring attention (``block_size``, ``sparsity_ratio``, ``pattern_type``)."""

    attention_name = "block_sparse"


class RingMultiheadDilatedAttention(_FixedVariantMultihead):
    """Multi-head ring attention, LongNet-dilated when ``segment_lengths``/``dilation_rates`` are given."""

    attention_name = "standard"


class HilbertRingMultiheadAttention(_FixedVariantMultihead):
    attention_name = "hilbert"


# Single-layer names of the predecessor (see docs/variants.md, "Migration").
BlockSparseRingDilatedAttention = RingBlockSparseAttention
BlockSparseRingDilatedAttentionFixed = RingBlockSparseAttention
BlockSparseRingDistributedDilatedAttention = RingBlockSparseAttention
BlockSparseRingAttention = RingBlockSparseAttention
RingDilatedAttentionHilbertGPUOptimized = HilbertRingAttention
RingDistributedDilatedAttention = DistributedRingAttention
EnterpriseDistributedDilatedAttention = DistributedRingAttention

__all__ = [
    "BlockSparseRingAttention",
    "BlockSparseRingDilatedAttention",
    "BlockSparseRingDilatedAttentionFixed",
    "BlockSparseRingDistributedDilatedAttention",
    "BlockSparseRingMultiheadDilatedAttention",
    "EnterpriseDistributedDilatedAttention",
    "HilbertRingMultiheadAttention",
    "RingDilatedAttentionHilbertGPUOptimized",
    "RingDistributedDilatedAttention",
    "RingMultiheadDilatedAttention",
]
