"""Quiet, informative output: known noise filtered by its message, Lightning's log lines in ``train.log``."""

from __future__ import annotations

import logging
import warnings

# (message regex, why it is safe to hide)
_NOISE = (
    # torch's pytree deprecation, raised inside Lightning's own code, not ours.
    (r".*LeafSpec.*is deprecated", FutureWarning),
    (r".*LeafSpec.*is deprecated", DeprecationWarning),
    # val/* metrics are already reduced over every rank by the module and callbacks before they are logged.
    (r".*self\.log\('val/.*sync_dist=True", Warning),
    # a resumed run writes into its own checkpoint folder on purpose.
    (r"Checkpoint directory .* exists and is not empty", Warning),
    # DeepSpeed's own collectives on a current torch, not ours.
    (r".*all_gather_into_tensor` is deprecated", FutureWarning),
)


class _DropTips(logging.Filter):
    """Lightning's advertisement for an unrelated package ('💡 Tip: ... litmodels')."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in record.getMessage()


class _DropCpuAccelerator(logging.Filter):
    """DeepSpeed's warning that it runs on CPU, which a CPU run asked for."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Setting accelerator to CPU" not in record.getMessage()


def quiet_known_noise() -> None:
    for message, category in _NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
    deepspeed_logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _DropCpuAccelerator) for f in deepspeed_logger.filters):
        deepspeed_logger.addFilter(_DropCpuAccelerator())


def route_lightning_logs() -> None:
    """Lightning installs its own console handler when imported before logging is configured; send its
    records to the root logger instead, which Hydra writes to the console and to ``<run dir>/train.log``."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropTips())
