"""The predecessor library's names, as aliases of ring_plugin's own classes.

A user migrating from the predecessor changes the import line only. Single-layer names are the
variants themselves; multi-head names are :class:`~ring_plugin.layers.multihead.RingMultiheadAttention`
with the attention variant fixed (tiny subclasses, so ``isinstance`` checks keep working); the
utilities are the library's own classes under their old names (``RingAttentionFunction``: the dense
ring's autograd function, subclassed only to document its call here). What each name maps to, and what
replaces the predecessor's internal mixins and state classes: docs/variants.md, "Migration".
"""

from __future__ import annotations

from typing import Any, ClassVar

from .attention.dense_ring import DenseRingAttention
from .attention.modules import DistributedRingAttention, RingAttentionBase
from .attention.pattern_modules import HilbertBlockSparseAttention, HilbertRingAttention, RingBlockSparseAttention
from .comm.ring import RingStats
from .config import RingAttentionConfig
from .layers.multihead import RingMultiheadAttention
from .ops.merge import StableRingAccumulator


class _FixedAttentionMultihead(RingMultiheadAttention):
    """``RingMultiheadAttention(embed_dim, num_heads, attention=<fixed by the class>, **kwargs)``."""

    attention_name: ClassVar[str]

    def __init__(self, embed_dim: int, num_heads: int, **kwargs: Any):
        if "attention" in kwargs:
            raise TypeError(f"{type(self).__name__} fixes the attention variant; "
                            "use RingMultiheadAttention to choose it")
        super().__init__(embed_dim, num_heads, self._attention_for(kwargs), **kwargs)

    def _attention_for(self, kwargs: dict[str, Any]) -> str:
        """The variant's factory name (may consume the class's own keyword arguments)."""
        return self.attention_name


class RingMultiheadDilatedAttention(_FixedAttentionMultihead):
    """Multi-head ring attention, LongNet-dilated when ``segment_lengths``/``dilation_rates`` are given."""

    attention_name = "standard"


class HilbertRingMultiheadAttention(_FixedAttentionMultihead):
    """Multi-head ring attention in Hilbert order over a ``grid=(H, W)`` of tokens."""

    attention_name = "hilbert"


class BlockSparseRingMultiheadDilatedAttention(_FixedAttentionMultihead):
    """Multi-head block-sparse ring attention (``block_size``, ``sparsity_ratio``, ``pattern_type``);
    ``use_hilbert=True`` (with ``grid=(H, W)`` or ``hilbert_level``) takes the blocks along the Hilbert
    curve: :class:`~ring_plugin.attention.pattern_modules.HilbertBlockSparseAttention`."""

    def _attention_for(self, kwargs: dict[str, Any]) -> str:
        return "hilbert_block_sparse" if kwargs.pop("use_hilbert", False) else "block_sparse"


class RingAttentionFunction(DenseRingAttention):
    """The ring engine's autograd function (the dense ring): ``RingAttentionFunction.apply(q, k, v, call)``.

    ``q``/``k``/``v`` are this rank's shards as ``(batch, heads, n_local, head_dim)`` (``k``/``v``
    contiguous, possibly fewer heads); ``call`` is the call's non-tensor description, built by a layer
    for inputs shaped ``(batch, n_local, heads, head_dim)``:
    ``layer.ring_call(q_bnhd, k_bnhd, causal, layer.resolve_ring())``. Returns the output shard in
    ``q``'s layout; backward returns dQ/dK/dV for the shards (the ring's exchange included). Inputs
    are not validated here: a layer's ``forward`` does that on every rank before any message. Under a
    mesh with ``ulysses_size > 1`` this is only the ring across the Ulysses groups (the layer's forward
    wraps it in the all-to-all): call the layer there.
    """


# Layers.
BlockSparseRingAttention = RingBlockSparseAttention
BlockSparseRingDilatedAttention = RingBlockSparseAttention
BlockSparseRingDilatedAttentionFixed = RingBlockSparseAttention
BlockSparseRingDistributedDilatedAttention = RingBlockSparseAttention
BlockSparseRingDilatedAttentionHilbertPostPattern = HilbertBlockSparseAttention
RingDilatedAttentionHilbertGPUOptimized = HilbertRingAttention
RingDistributedDilatedAttention = DistributedRingAttention
EnterpriseDistributedDilatedAttention = DistributedRingAttention

# Utilities.
BaseRingAttention = RingAttentionBase  # subclass it and implement _attend(q, k, v, causal, ring)
RingCommunicationStats = RingStats  # what DistributedRingAttention.stats holds
StandardizedRingConfig = RingAttentionConfig
__all__ = [
    "BaseRingAttention",
    "BlockSparseRingAttention",
    "BlockSparseRingDilatedAttention",
    "BlockSparseRingDilatedAttentionFixed",
    "BlockSparseRingDilatedAttentionHilbertPostPattern",
    "BlockSparseRingDistributedDilatedAttention",
    "BlockSparseRingMultiheadDilatedAttention",
    "EnterpriseDistributedDilatedAttention",
    "HilbertRingMultiheadAttention",
    "RingAttentionFunction",
    "RingCommunicationStats",
    "RingDilatedAttentionHilbertGPUOptimized",
    "RingDistributedDilatedAttention",
    "RingMultiheadDilatedAttention",
    "StableRingAccumulator",
    "StandardizedRingConfig",
]
