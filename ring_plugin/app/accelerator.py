"""A GPU config on a machine without enough GPUs fails at once, before anything is built, with the CPU-sized
alternative (instead of building a 3B model for a minute, then Lightning's raw ``MisconfigurationException``)."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from .config_error import ConfigError

GPU_ACCELERATORS = ("gpu", "cuda")
CPU_ALTERNATIVE = "ring-train recipe=cpu_default (a 2-layer GPT on 2 CPU processes)"


def check_accelerator(cfg: DictConfig, recipe: str | None = None) -> None:
    """``trainer.accelerator=gpu`` needs ``devices`` GPUs on this node; ``recipe`` names what asked for them."""
    accelerator = str(cfg.trainer.accelerator)
    if accelerator not in GPU_ACCELERATORS:
        return
    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if found < cfg.devices:
        what = f"recipe={recipe}" if recipe else f"trainer.accelerator={accelerator}"
        raise ConfigError(f"this recipe needs {cfg.devices} GPUs ({what}, devices={cfg.devices}); "
                          f"found {found or 'none'}. On this machine: {CPU_ALTERNATIVE}"
                          + (f", or devices={found}" if found else ""))
