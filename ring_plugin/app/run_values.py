"""Values that Lightning or the model would only reject after processes spawn or training starts, checked
on the composed config instead: each failure is a one-line :class:`ConfigError` naming the key."""

from __future__ import annotations

import math

from omegaconf import DictConfig, OmegaConf

from .config_error import ConfigError

# Datasets that give no document ids (one document per row): the balanced layout has nothing to balance.
UNPACKED_DATA = ("ring_plugin.data.PasskeyRetrieval", "ring_plugin.data.AssociativeRecall",
                 "ring_plugin.data.ByteTextDataset", "ring_plugin.data.TokenFileDataset")


def check_run_values(cfg: DictConfig) -> None:
    _check_val_check_interval(OmegaConf.select(cfg, "trainer.val_check_interval"))
    lr = OmegaConf.select(cfg, "model.lr")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr)
                           or lr <= 0):
        raise ConfigError(f"model.lr={lr!r} must be a positive number")
    target = OmegaConf.select(cfg, "data.train._target_")
    if cfg.layout == "balanced" and target in UNPACKED_DATA:
        raise ConfigError(f"layout=balanced balances packed documents, but data.train ({target}) has one document "
                          "per row: use data=packed, or layout=zigzag")


def _check_val_check_interval(value: object) -> None:
    """An int is a number of steps (>= 1); a float a fraction of an epoch in (0, 1]; null: once per epoch."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or (isinstance(value, int) and value < 1) \
            or (isinstance(value, float) and not (0.0 < value <= 1.0)):
        raise ConfigError(f"trainer.val_check_interval={value!r} must be a number of steps >= 1, or a fraction of "
                          "an epoch in (0, 1]")
