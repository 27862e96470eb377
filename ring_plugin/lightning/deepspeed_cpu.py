"""DeepSpeed on CPU through Lightning: every override it takes, and why, in one place.

Lightning's ``DeepSpeedStrategy`` refuses anything but CUDA, while DeepSpeed itself runs ZeRO on CPU
with gloo (tests, laptops). On CUDA each method below defers to Lightning unchanged. On CPU:

* ``setup_environment`` (public): Lightning's raises for a non-CUDA accelerator; DDP's sets up the
  processes the same way.
* ``setup_distributed`` (public): Lightning's checks that CUDA device indices match the local ranks,
  and CPU devices have none; the rest of it (seed, DeepSpeed's environment variables and its view of
  the process group that the ring strategy created) is kept.
* ``_setup_model_and_optimizer`` (private, the only one): Lightning hands DeepSpeed
  ``device_rank=root_device.index``, which is None on CPU, where DeepSpeed needs the local rank; no
  public hook reaches that argument.
"""

from __future__ import annotations

import argparse
from typing import Any

from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.strategies import DDPStrategy


class DeepSpeedOnCPU:
    """Mixed in just before ``DeepSpeedStrategy``."""

    @property
    def on_cuda(self) -> bool:
        return isinstance(self.accelerator, CUDAAccelerator)  # type: ignore[attr-defined]

    def setup_environment(self) -> None:
        if self.on_cuda:
            super().setup_environment()  # type: ignore[misc]
        else:
            DDPStrategy.setup_environment(self)  # type: ignore[arg-type]

    def setup_distributed(self) -> None:
        if self.on_cuda:
            super().setup_distributed()  # type: ignore[misc]
        else:
            reset_seed()
            self._init_deepspeed_distributed()  # type: ignore[attr-defined]

    def _setup_model_and_optimizer(self, model: Any, optimizer: Any, lr_scheduler: Any = None) -> tuple[Any, Any]:
        if self.on_cuda:
            return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)  # type: ignore[misc]
        import deepspeed

        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank), config=self.config,  # type: ignore[attr-defined]
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], optimizer=optimizer,
            lr_scheduler=lr_scheduler, dist_init_required=False,
        )
        return engine, ds_optimizer
