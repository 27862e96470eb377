"""``RingCall``: everything about one ring attention call that is not a tensor.

The algorithms (:mod:`.dense_ring`, :mod:`.peer_ring`, :mod:`.gathered`) read the ring, the shard
layout, the kernel and the masking rules from here; nothing in a call is keyed on shapes alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..comm.ring import RingComm
from ..documents.blocks import DocumentBlock, RingDocuments
from ..layout import ShardLayout
from ..ops.kernels import Kernel
from .plan import BandBlock, Block, plan_dense_step, plan_window_step


@dataclass(frozen=True)
class RingCall:
    comm: RingComm
    layout: ShardLayout
    kernel: Kernel
    scale: float
    causal: bool
    heads: int
    kv_heads: int
    # dtype of the dQ accumulator and of the dK/dV accumulators that travel home: fp32 keeps the
    # sums exact; the input's half precision halves their memory and traffic at one rounding a step.
    grad_dtype: torch.dtype = torch.float32
    documents: RingDocuments | None = None  # packed documents: attend within a document only
    window: int | None = None  # causal sliding window: a key at most window - 1 positions back

    def chunks(self, rank: int) -> tuple[int, ...]:
        return self.layout.chunks[rank]

    def kv_owner(self, step: int, rank: int | None = None) -> int:
        """The rank whose K/V ``rank`` (default: this one) holds at ring step ``step``."""
        rank = self.comm.rank if rank is None else rank
        return (rank - step) % self.comm.world_size

    def dense_blocks(self, step: int, n_local: int, rank: int | None = None
                     ) -> list[Block] | list[DocumentBlock] | list[Block | BandBlock]:
        """The blocks of ring step ``step`` for ``rank`` (default: this one): dense (optionally
        causal), restricted to a sliding window or to documents when the call has them (blocks left
        empty are skipped). Every rank can plan every other rank's steps."""
        rank = self.comm.rank if rank is None else rank % self.comm.world_size
        owner = self.kv_owner(step, rank)
        q_chunks = self.chunks(rank)
        if self.window is not None:
            return plan_window_step(q_chunks, self.chunks(owner), n_local // len(q_chunks), self.window)
        blocks = plan_dense_step(q_chunks, self.chunks(owner), n_local // len(q_chunks), self.causal)
        return blocks if self.documents is None else self.documents.blocks(blocks, rank, owner)
