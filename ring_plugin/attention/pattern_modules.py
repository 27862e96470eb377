"""Ring variants defined by a pattern: block-sparse, Hilbert-ordered, and block-sparse in Hilbert order.

Each is the ring engine plus a pattern from :mod:`ring_plugin.patterns`; the dense variants in
:mod:`.modules` become LongNet dilated attention when given ``segment_lengths``/``dilation_rates``.
"""

from __future__ import annotations

import math
import warnings

import torch

from ..comm.collectives import all_gather_sequence
from ..comm.context import RingContext
from ..layout import global_positions
from ..patterns.block_sparse import BlockSparsePattern
from ..patterns.blocks import Pattern
from ..patterns.hilbert import hilbert_permutation, inverse_permutation
from .gathered import GatheredPlan, build_gathered_plan, gathered_attention
from .modules import RingEngineAttention


class RingBlockSparseAttention(RingEngineAttention):
    """Ring attention over a block mask (``block_size``, ``pattern_type``, ``sparsity_ratio``).

    Only allowed (query block, key block) pairs are computed; ring steps with no allowed pair are
    skipped and the ring stops after the last step any rank needs. ``segment_lengths`` and
    ``dilation_rates`` are accepted for the predecessor's call shape with a warning that they change
    nothing: the block mask alone defines the pattern. ``block_mask(n)`` shows which block pairs are
    computed.

    ``backend='flex'`` (and ``'auto'`` for CUDA half-precision inputs) runs the gathered path
    instead: the K/V rows of other ranks that this rank reads are fetched, then one masked attention
    call (flex_attention on CUDA, an exact masked softmax elsewhere) covers every allowed pair.
    """

    variant = "block_sparse"
    accepts_flex = True
    takes_masks = False

    def build_pattern(self) -> Pattern | None:
        c = self.config
        if c.segment_lengths is not None:
            warnings.warn(
                f"segment_lengths={c.segment_lengths} / dilation_rates={c.dilation_rates} do not change "
                f"{type(self).__name__}: the block mask (block_size, sparsity_ratio, pattern_type) alone "
                "defines block-sparse attention; for LongNet dilated attention use StandardRingAttention",
                UserWarning, stacklevel=3)
        return BlockSparsePattern(c.block_size, c.sparsity_ratio, c.pattern_type)

    def block_mask(self, n: int) -> torch.Tensor:
        """(n // block_size, n // block_size) bool: which (query block, key block) pairs are computed."""
        if n <= 0 or n % self.config.block_size:
            raise ValueError(f"n={n} must be a positive multiple of block_size={self.config.block_size}")
        assert isinstance(self.pattern, BlockSparsePattern)
        return self.pattern.mask(n)

    def uses_gathered_path(self, q: torch.Tensor) -> bool:
        """Whether a call on ``q`` runs the gathered path (flex is the fast GPU kernel for block
        masks; the engine's gathered blocks and fp32 merges cost more there)."""
        backend = self.config.backend
        half = q.dtype in (torch.float16, torch.bfloat16)
        return backend == "flex" or (backend == "auto" and q.is_cuda and half)

    def _attend(self, q, k, v, causal, ring):
        if not self.uses_gathered_path(q):
            return super()._attend(q, k, v, causal, ring)
        call = self.ring_call(q, k, causal, ring, backend="auto")  # the flex/masked call is the kernel here
        return gathered_attention(q, k, v, call, self.gathered_plan(call, q.shape[1]))

    def gathered_plan(self, call, n_local: int) -> GatheredPlan:
        """The gathered path's plan: the exchange plan's rounds as sequence rows, plus the geometry."""
        c = self.config
        pattern_key = ("block_sparse", c.block_size, c.sparsity_ratio, c.pattern_type)
        return self._plans.get(self.plan_key(call, n_local, "gathered"),
                               lambda: build_gathered_plan(self.pattern, pattern_key, call,
                                                           self.exchange_plan(call, n_local)))


class HilbertRingAttention(RingEngineAttention):
    """Attention for tokens of a 2-D grid, computed in generalised Hilbert order.

    ``grid=(H, W)`` (or ``hilbert_level=l`` for a ``2**l`` square; with neither, a square grid is
    inferred from the length). The pattern (dilated when ``segment_lengths`` are given, else dense)
    is applied along the Hilbert curve, so segments and shards are compact 2-D regions; causal means
    causal along the curve. With ``token_order='row_major'`` (default) the layer takes and returns
    row-major tokens: in a ring it all-gathers the sequence to re-shard it in Hilbert order (exact,
    O(n) per rank). For O(n/k), shard data already put in Hilbert order with
    :func:`~ring_plugin.patterns.hilbert_permutation` and pass ``token_order='hilbert'``.
    """

    variant = "hilbert"
    takes_masks = False

    def grid_for(self, n: int) -> tuple[int, int] | None:
        c = self.config
        if c.grid is not None:
            return c.grid
        if c.hilbert_level is not None:
            return (2**c.hilbert_level, 2**c.hilbert_level)
        side = math.isqrt(n)
        return (side, side) if side * side == n else None

    def _pattern_error(self, n_global: int, heads: int, ring: RingContext) -> str | None:
        grid = self.grid_for(n_global)
        c = self.config
        if grid is None or grid[0] * grid[1] != n_global:
            return (
                f"the sequence length {n_global} must equal the grid's H*W (grid={c.grid}, "
                f"hilbert_level={c.hilbert_level}); pass grid=(H, W) with H*W == {n_global}"
            )
        return super()._pattern_error(n_global, heads, ring)

    def _attend(self, q, k, v, causal, ring):
        if self.config.token_order == "hilbert":
            return super()._attend(q, k, v, causal, ring)
        n_local, world = q.shape[1], ring.world_size
        grid = self.grid_for(n_local * world)
        assert grid is not None
        perm = hilbert_permutation(*grid, device=q.device)
        mine = global_positions(n_local, ring.layout, ring.rank, world, device=q.device)
        # This rank's Hilbert-order shard: positions `mine` of the curve, taken from the full sequence.
        full = [all_gather_sequence(t, 1, ring.layout, ring.group) for t in (q, k, v)]
        local = [t.index_select(1, perm[mine]) for t in full]
        out_h = super()._attend(*local, causal, ring)
        out = all_gather_sequence(out_h, 1, ring.layout, ring.group).index_select(1, inverse_permutation(perm))
        return out.index_select(1, mine)


class HilbertBlockSparseAttention(HilbertRingAttention, RingBlockSparseAttention):
    """Block-sparse attention along the Hilbert curve of a 2-D token grid.

    The Hilbert variant's ordering composed with the block-sparse pattern: tokens are put in Hilbert
    order (``grid=(H, W)`` or ``hilbert_level``; ``token_order`` as in :class:`HilbertRingAttention`),
    cut into blocks of ``block_size`` consecutive curve positions, and the block mask
    (``pattern_type``, ``sparsity_ratio``) is applied to those blocks, so a block is a compact 2-D
    patch, a ``local`` window a 2-D neighbourhood, and blocks are computed in curve order. Exactly:
    ``x[:, perm]`` with ``perm = hilbert_permutation(H, W)``, block-sparse attention, then
    ``[:, inverse_permutation(perm)]``. Same FLOPs as :class:`RingBlockSparseAttention` at the same
    sparsity; ``block_mask(n)`` is the mask over curve-order blocks.
    """

    variant = "hilbert_block_sparse"
