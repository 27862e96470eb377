"""ring_plugin: exact ring attention (sequence parallelism) for PyTorch, Lightning, DeepSpeed and Hydra."""

from . import compat
from .attention.factory import available_ring_attention, create_ring_attention, register_ring_attention
from .attention.modules import (
    DistributedRingAttention,
    RingAttentionBase,
    RingDilatedAttention,
    RingDilatedAttentionCorrect,
    RingDilatedAttentionProduction,
    RingDilatedAttentionSDPA,
    StandardRingAttention,
)
from .attention.oracle import reference_attention
from .attention.pattern_modules import HilbertBlockSparseAttention, HilbertRingAttention, RingBlockSparseAttention
from .comm.context import RingContext, current_ring_context, ring_context
from .comm.ring import RingPeerClosedError, RingPeerError, RingStats, RingTimeoutError
from .config import RingAttentionConfig
from .layers.dilated import DilatedAttention, MultiheadDilatedAttention
from .layers.multihead import RingMultiheadAttention
from .layout import gather_sequence, global_positions, shard_sequence, unshard_sequence
from .patterns import block_mask, hilbert_permutation, inverse_permutation
from .shard_plan import SequenceShards, sequence_shards

__version__ = "0.1.0"

__all__ = [
    "DilatedAttention",
    "DistributedRingAttention",
    "HilbertBlockSparseAttention",
    "HilbertRingAttention",
    "MultiheadDilatedAttention",
    "RingAttentionBase",
    "RingAttentionConfig",
    "RingBlockSparseAttention",
    "RingContext",
    "RingDilatedAttention",
    "RingDilatedAttentionCorrect",
    "RingDilatedAttentionProduction",
    "RingDilatedAttentionSDPA",
    "RingMultiheadAttention",
    "RingStats",
    "RingPeerClosedError",
    "RingPeerError",
    "RingTimeoutError",
    "SequenceShards",
    "StandardRingAttention",
    "available_ring_attention",
    "block_mask",
    "create_ring_attention",
    "current_ring_context",
    "gather_sequence",
    "global_positions",
    "hilbert_permutation",
    "inverse_permutation",
    "reference_attention",
    "register_ring_attention",
    "ring_context",
    "sequence_shards",
    "shard_sequence",
    "unshard_sequence",
    *compat.__all__,  # the predecessor's names
]


def __getattr__(name: str):
    """The predecessor's names (:mod:`ring_plugin.compat`), importable from the package itself."""
    if name in compat.__all__:
        return getattr(compat, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
