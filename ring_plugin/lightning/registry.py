"""Names for ``Trainer(strategy=...)``."""

from __future__ import annotations

from lightning.pytorch.strategies import StrategyRegistry

from .ddp import RingStrategy
from .deepspeed import ZERO_STAGES, RingDeepSpeedStrategy


def register_strategies() -> None:
    """Register ``ring``, ``ring_deepspeed``, ``ring_deepspeed_stage_{0..3}`` and
    ``ring_deepspeed_stage_3_offload`` (idempotent)."""
    StrategyRegistry.register("ring", RingStrategy, description="DDP with ring attention sequence parallelism",
                              override=True)
    StrategyRegistry.register("ring_deepspeed", RingDeepSpeedStrategy,
                              description="DeepSpeed ZeRO 2 with ring attention sequence parallelism", override=True)
    for stage in ZERO_STAGES:
        StrategyRegistry.register(f"ring_deepspeed_stage_{stage}", RingDeepSpeedStrategy,
                                  description=f"DeepSpeed ZeRO {stage} with ring sequence parallelism",
                                  override=True, stage=stage)
    StrategyRegistry.register("ring_deepspeed_stage_3_offload", RingDeepSpeedStrategy,
                              description="DeepSpeed ZeRO 3 with CPU offload and ring sequence parallelism",
                              override=True, stage=3, offload_optimizer=True, offload_parameters=True)
