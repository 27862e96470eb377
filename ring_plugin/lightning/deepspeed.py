"""``RingDeepSpeedStrategy``: DeepSpeed ZeRO 0-3 with sequence parallelism.

On CUDA it is Lightning's ``DeepSpeedStrategy`` unchanged plus the ring. Lightning refuses CPU; what
it takes to run there anyway (DeepSpeed itself runs ZeRO on CPU with gloo) is in ``deepspeed_cpu.py``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from lightning.pytorch.strategies import DeepSpeedStrategy

from .deepspeed_cpu import DeepSpeedOnCPU
from .ring import DEFAULT_STARTUP_TIMEOUT, RingStrategyMixin

ZERO_STAGES = (0, 1, 2, 3)


class RingDeepSpeedStrategy(RingStrategyMixin, DeepSpeedOnCPU, DeepSpeedStrategy):
    """``DeepSpeedStrategy(stage=..., offload_optimizer=..., offload_parameters=..., config=...)`` plus
    ``ring_size``, ``ulysses_size``, ``layout``, ``sequence_keys`` and ``startup_timeout`` (see
    :class:`~ring_plugin.lightning.RingStrategy`).

    A ``config`` dict or JSON path is handed to DeepSpeed untouched (its ``zero_optimization.stage``
    wins over ``stage``). DeepSpeed's data-parallel group is the whole world: ZeRO shards over every
    rank and averages gradients over all of them, which the loss scaling of ``RingCausalLM`` expects.
    """

    strategy_name = "ring_deepspeed"

    def __init__(self, stage: int = 2, ring_size: int | None = None, layout: str = "zigzag",
                 sequence_keys: Iterable[str] = (), startup_timeout: float | timedelta = DEFAULT_STARTUP_TIMEOUT,
                 ulysses_size: int = 1, **deepspeed_kwargs: Any):
        if isinstance(stage, bool) or stage not in ZERO_STAGES:
            raise ValueError(f"stage={stage!r} is not a ZeRO stage; valid: {', '.join(map(str, ZERO_STAGES))}")
        self._init_ring(ring_size, layout, sequence_keys, startup_timeout, ulysses_size)
        super().__init__(stage=stage, **deepspeed_kwargs)
        user_config = deepspeed_kwargs.get("config") is not None or self.DEEPSPEED_ENV_VAR in os.environ
        if deepspeed_kwargs.get("offload_optimizer") and not user_config:
            # The optimizer comes from configure_optimizers (a torch optimizer); DeepSpeed refuses that with
            # offload unless told otherwise. Return deepspeed.ops.adam.DeepSpeedCPUAdam there for speed.
            self.config.setdefault("zero_force_ds_cpu_optimizer", False)

    def setup_distributed(self) -> None:
        self._init_process_group()
        super().setup_distributed()
        self._setup_ring()
