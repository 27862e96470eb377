"""``RingStrategy``: DDP with sequence parallelism (gloo on CPU, NCCL on GPU)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from lightning.pytorch.strategies import DDPStrategy

from .ring import DEFAULT_STARTUP_TIMEOUT, RingStrategyMixin


class RingStrategy(RingStrategyMixin, DDPStrategy):
    """``DDPStrategy`` whose world is data-parallel x ring.

    ``ring_size``: ranks that share one sample (default: all); ``layout``: ``'zigzag'`` (balances causal
    work) or ``'contiguous'``; ``sequence_keys``: batch keys sharded along dim 1 besides ``input_ids``,
    ``labels`` and ``position_ids``; ``startup_timeout``: seconds (or a timedelta) the rendezvous waits
    for every rank, apart from ``timeout``, the wait for a peer during training. Other keyword
    arguments go to ``DDPStrategy``.
    """

    strategy_name = "ring"

    def __init__(self, ring_size: int | None = None, layout: str = "zigzag", sequence_keys: Iterable[str] = (),
                 startup_timeout: float | timedelta = DEFAULT_STARTUP_TIMEOUT, **ddp_kwargs: Any):
        self._init_ring(ring_size, layout, sequence_keys, startup_timeout)
        super().__init__(**ddp_kwargs)

    def setup_distributed(self) -> None:
        self._init_process_group()
        super().setup_distributed()
        self._setup_ring()
