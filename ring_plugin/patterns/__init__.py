"""Attention patterns as pure functions of global positions.

Each pattern answers two questions: which (query, key) pairs of one ring step are computed (as
gathered :class:`~ring_plugin.patterns.blocks.IndexBlock` s or strided
:class:`~ring_plugin.patterns.blocks.ViewBlock` s for the engine), and how often each key counts for
each query (an integer matrix, for the oracle). Both come from the same definition.
"""

from .block_sparse import BlockSparsePattern, block_mask
from .blocks import IndexBlock, Pattern, ViewBlock
from .dilated import DilatedPattern, dilated_error
from .hilbert import block_locality, gilbert_curve, hilbert_permutation, inverse_permutation, segment_locality

__all__ = [
    "BlockSparsePattern",
    "DilatedPattern",
    "IndexBlock",
    "Pattern",
    "ViewBlock",
    "block_locality",
    "block_mask",
    "dilated_error",
    "gilbert_curve",
    "hilbert_permutation",
    "inverse_permutation",
    "segment_locality",
]
