"""``RingStrategy``: DDP with sequence parallelism (gloo on CPU, NCCL on GPU)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from lightning.pytorch.strategies import DDPStrategy

from .ring import DEFAULT_STARTUP_TIMEOUT, RingStrategyMixin


class RingStrategy(RingStrategyMixin, DDPStrategy):
    """``DDPStrategy`` whose world is data-parallel x Ulysses x ring.

    ``ring_size``: ranks of one ring (default: all, over the Ulysses groups); ``layout``: ``'zigzag'``
    (balances causal work) or ``'contiguous'``; ``sequence_keys``: batch keys sharded along dim 1 besides
    ``input_ids``, ``labels`` and ``position_ids``; ``startup_timeout``: seconds (or a timedelta) the
    rendezvous waits for every rank, apart from ``timeout``, the wait for a peer during training;
    ``ulysses_size``: ranks of one Ulysses group (2-D sequence parallelism: ``ulysses_size x ring_size``
    adjacent ranks share one sample, sharded as for a ring of that size, and each attention layer trades
    heads for sequence in its group around the ring; default 1: the ring alone). Other keyword
    arguments go to ``DDPStrategy``.
    """

    strategy_name = "ring"

    def __init__(self, ring_size: int | None = None, layout: str = "zigzag", sequence_keys: Iterable[str] = (),
                 startup_timeout: float | timedelta = DEFAULT_STARTUP_TIMEOUT, ulysses_size: int = 1,
                 **ddp_kwargs: Any):
        self._init_ring(ring_size, layout, sequence_keys, startup_timeout, ulysses_size)
        super().__init__(**ddp_kwargs)

    def setup_distributed(self) -> None:
        self._init_process_group()
        super().setup_distributed()
        self._setup_ring()
