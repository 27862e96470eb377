"""``RingDeepSpeedStrategy``: DeepSpeed ZeRO 0-3 with sequence parallelism.

On CUDA it is Lightning's ``DeepSpeedStrategy`` unchanged plus the ring. Lightning refuses CPU, so
on CPU (tests, laptops) it sets up the environment like DDP, skips the CUDA device-index check and
reports a CPU root device; DeepSpeed itself runs ZeRO on CPU with gloo.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable
from typing import Any

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

from .ring import RingStrategyMixin

ZERO_STAGES = (0, 1, 2, 3)


class RingDeepSpeedStrategy(RingStrategyMixin, DeepSpeedStrategy):
    """``DeepSpeedStrategy(stage=..., offload_optimizer=..., offload_parameters=..., config=...)`` plus
    ``ring_size``, ``layout`` and ``sequence_keys`` (see :class:`~ring_plugin.lightning.RingStrategy`).

    A ``config`` dict or JSON path is handed to DeepSpeed untouched (its ``zero_optimization.stage``
    wins over ``stage``). DeepSpeed's data-parallel group is the whole world: ZeRO shards over every
    rank and averages gradients over all of them, which the loss scaling of ``RingCausalLM`` expects.
    """

    strategy_name = "ring_deepspeed"

    def __init__(self, stage: int = 2, ring_size: int | None = None, layout: str = "zigzag",
                 sequence_keys: Iterable[str] = (), **deepspeed_kwargs: Any):
        if isinstance(stage, bool) or stage not in ZERO_STAGES:
            raise ValueError(f"stage={stage!r} is not a ZeRO stage; valid: {', '.join(map(str, ZERO_STAGES))}")
        self._init_ring(ring_size, layout, sequence_keys)
        super().__init__(stage=stage, **deepspeed_kwargs)
        user_config = deepspeed_kwargs.get("config") is not None or self.DEEPSPEED_ENV_VAR in os.environ
        if deepspeed_kwargs.get("offload_optimizer") and not user_config:
            # The optimizer comes from configure_optimizers (a torch optimizer); DeepSpeed refuses that with
            # offload unless told otherwise. Return deepspeed.ops.adam.DeepSpeedCPUAdam there for speed.
            self.config.setdefault("zero_force_ds_cpu_optimizer", False)

    @property
    def _on_cuda(self) -> bool:
        return isinstance(self.accelerator, CUDAAccelerator)

    @property
    def root_device(self) -> torch.device:
        return super().root_device if self._on_cuda else torch.device("cpu")

    def setup_environment(self) -> None:
        if self._on_cuda:
            super().setup_environment()
        else:
            DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        self._init_elastic()
        if self._on_cuda:
            super().setup_distributed()
        else:
            reset_seed()
            self.set_world_ranks()
            self._init_deepspeed_distributed()
        self._setup_ring()

    def _setup_model_and_optimizer(self, model: Any, optimizer: Any, lr_scheduler: Any = None) -> tuple[Any, Any]:
        if self._on_cuda:
            return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)
        import deepspeed

        # Lightning passes device_rank=root_device.index, which is None on CPU; DeepSpeed wants the local rank.
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank), config=self.config, model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad], optimizer=optimizer,
            lr_scheduler=lr_scheduler, dist_init_required=False,
        )
        return engine, ds_optimizer
