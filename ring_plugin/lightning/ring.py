"""What both ring strategies share: arguments, groups, ring context, sampler, sharding, resumable loader.

Mixed in before a Lightning ``DDPStrategy`` subclass. Gradients need nothing special: DDP and
DeepSpeed average over the whole world, and :class:`~ring_plugin.models.RingCausalLM` scales its loss
so that this average is the full-batch gradient.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.distributed.constants import default_pg_timeout

from ..comm.context import RingContext, clear_ring_context, set_ring_context
from ..layout import check_layout
from .elastic import init_elastic_process_group
from .groups import RingGroups, build_ring_groups, check_ring_size
from .resumable import ResumableLoader
from .sharding import shard_batch


class RingStrategyMixin:
    """Sequence parallelism on top of a DDP-like strategy (``self`` is that strategy)."""

    def _init_ring(self, ring_size: int | None, layout: str, sequence_keys: Iterable[str]) -> None:
        if ring_size is not None and (isinstance(ring_size, bool) or not isinstance(ring_size, int) or ring_size <= 0):
            raise ValueError(f"ring_size={ring_size!r} must be a positive integer or None (the whole world)")
        check_layout(layout)
        if isinstance(sequence_keys, str):
            raise TypeError(f"sequence_keys={sequence_keys!r} must be a list of batch keys, not a string")
        self.ring_size = ring_size
        self.layout = layout
        self.sequence_keys = tuple(sequence_keys)
        self.ring_groups: RingGroups | None = None
        self.ring_context: RingContext | None = None

    def _init_elastic(self) -> None:
        """Under torchrun, create the default group on a per-attempt store (see ``elastic.py``)."""
        self.set_world_ranks()  # type: ignore[attr-defined]
        init_elastic_process_group(
            self._get_process_group_backend(), self.global_rank, self.world_size,  # type: ignore[attr-defined]
            self._timeout or default_pg_timeout,  # type: ignore[attr-defined]
        )

    def _setup_ring(self) -> None:
        """Build the groups and activate the ring context (after the default process group exists)."""
        size = check_ring_size(self.ring_size, self.world_size)
        self.ring_groups = build_ring_groups(size)
        clear_ring_context()
        self.ring_context = set_ring_context(self.ring_groups.ring, self.layout, mesh=self.ring_groups.mesh)

    def _require_groups(self) -> RingGroups:
        if self.ring_groups is None:
            raise RuntimeError(f"{type(self).__name__} is not set up yet: its process groups do not exist")
        return self.ring_groups

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # Ranks of one ring read the same sample; the rings split the data.
        g = self._require_groups()
        return {"num_replicas": g.dp_size, "rank": g.dp_rank}

    def batch_to_device(self, batch: Any, device: torch.device | None = None, dataloader_idx: int = 0) -> Any:
        g = self._require_groups()
        batch = shard_batch(batch, self.layout, g.ring_rank, g.ring_size, self.sequence_keys)
        return super().batch_to_device(batch, device, dataloader_idx)  # type: ignore[misc]

    def process_dataloader(self, dataloader: Any) -> Any:
        dataloader = super().process_dataloader(dataloader)  # type: ignore[misc]
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is None or not trainer.training or isinstance(dataloader, ResumableLoader):
            return dataloader
        return ResumableLoader(dataloader, lambda: _train_position(trainer))

    def teardown(self) -> None:
        clear_ring_context()
        self.ring_context = None
        super().teardown()  # type: ignore[misc]


def _train_position(trainer: Any) -> dict[str, int]:
    """Epoch and number of batches of it already trained on."""
    fit_loop = trainer.fit_loop
    return {"epoch": fit_loop.epoch_progress.current.processed,
            "batches": fit_loop.epoch_loop.batch_progress.current.processed}
