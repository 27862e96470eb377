"""What both ring strategies share: arguments, start-up, groups, ring context, sampler, sharding,
resumable loader.

Mixed in before a Lightning ``DDPStrategy`` subclass. Gradients need nothing special: DDP and
DeepSpeed average over the whole world, and :class:`~ring_plugin.models.RingCausalLM` scales its loss
so that this average is the full-batch gradient.

Two timeouts, because they guard different things: ``startup_timeout`` is how long the rendezvous
waits for every rank to arrive (a rank may start minutes late on a loaded or freshly booted node);
``timeout`` (Lightning's argument) is how long a collective waits for a peer once training runs, which
should be short so that a dead peer ends the job quickly.
"""

from __future__ import annotations

import atexit
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout

from ..comm.context import RingContext, clear_ring_context, set_ring_context
from ..comm.topology import check_ulysses_size
from ..layout import check_layout
from ..sharding import cut_batch
from .elastic import elastic_attempt_store
from .groups import RingGroups, build_ring_groups, check_sequence_sizes
from .resumable import ResumableLoader, train_position

DEFAULT_STARTUP_TIMEOUT = 600.0  # seconds: slow imports and late nodes, not a dead peer


def check_startup_timeout(startup_timeout: float | timedelta) -> timedelta:
    seconds = startup_timeout.total_seconds() if isinstance(startup_timeout, timedelta) else startup_timeout
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
        raise ValueError(f"startup_timeout={startup_timeout!r} must be positive seconds (or a timedelta)")
    return timedelta(seconds=seconds)


class RingStrategyMixin:
    """Sequence parallelism on top of a DDP-like strategy (``self`` is that strategy)."""

    def _init_ring(self, ring_size: int | None, layout: str, sequence_keys: Iterable[str],
                   startup_timeout: float | timedelta, ulysses_size: int = 1) -> None:
        if ring_size is not None and (isinstance(ring_size, bool) or not isinstance(ring_size, int) or ring_size <= 0):
            raise ValueError(f"ring_size={ring_size!r} must be a positive integer or None (the whole world)")
        self.ulysses_size = check_ulysses_size(ulysses_size)
        check_layout(layout)
        if isinstance(sequence_keys, str):
            raise TypeError(f"sequence_keys={sequence_keys!r} must be a list of batch keys, not a string")
        self.startup_timeout = check_startup_timeout(startup_timeout)
        self.ring_size = ring_size
        self.layout = layout
        self.sequence_keys = tuple(sequence_keys)
        self.ring_groups: RingGroups | None = None
        self.ring_context: RingContext | None = None

    def _init_process_group(self) -> None:
        """Create the default group before Lightning would (Lightning then keeps it): the rendezvous
        waits ``startup_timeout`` for every rank, collectives then wait ``timeout`` for a peer.

        Under torchrun's agent store, the rendezvous keys belong to this restart attempt (``elastic.py``).
        """
        self.set_world_ranks()  # type: ignore[attr-defined]
        if dist.is_initialized():
            return
        env = self.cluster_environment  # type: ignore[attr-defined]
        rank, world = self.global_rank, self.world_size  # type: ignore[attr-defined]
        store = elastic_attempt_store(self.startup_timeout) or dist.TCPStore(
            env.main_address, env.main_port, world, is_master=rank == 0, timeout=self.startup_timeout,
            wait_for_workers=True,
        )
        device = self.root_device  # type: ignore[attr-defined]
        backend = self._get_process_group_backend()  # type: ignore[attr-defined]
        peer_timeout = self._timeout or default_pg_timeout  # type: ignore[attr-defined]  # Lightning's `timeout`
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=peer_timeout,
                                device_id=device if device.type == "cuda" else None)
        if backend == "nccl":  # as Lightning does: torch warns about an NCCL group left at exit
            atexit.register(_destroy_process_group)

    def _setup_ring(self) -> None:
        """Build the groups and activate the ring context (after the default process group exists)."""
        size, ulysses = check_sequence_sizes(self.ring_size, self.ulysses_size, self.world_size)
        self.ring_groups = build_ring_groups(size, ulysses)
        clear_ring_context()
        self.ring_context = set_ring_context(self.ring_groups.ring, self.layout, mesh=self.ring_groups.mesh)

    def _require_groups(self) -> RingGroups:
        if self.ring_groups is None:
            raise RuntimeError(f"{type(self).__name__} is not set up yet: its process groups do not exist")
        return self.ring_groups

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # Ranks of one sequence-parallel group read the same sample; the groups split the data.
        g = self._require_groups()
        return {"num_replicas": g.dp_size, "rank": g.dp_rank}

    def batch_to_device(self, batch: Any, device: torch.device | None = None, dataloader_idx: int = 0) -> Any:
        g = self._require_groups()
        batch = cut_batch(batch, self.layout, g.sequence_rank, g.sequence_size, self.sequence_keys,
                          g.mesh.size("ulysses"))
        return super().batch_to_device(batch, device, dataloader_idx)  # type: ignore[misc]

    def process_dataloader(self, dataloader: Any) -> Any:
        dataloader = super().process_dataloader(dataloader)  # type: ignore[misc]
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is None or not trainer.training or isinstance(dataloader, ResumableLoader):
            return dataloader
        return ResumableLoader(dataloader, lambda: train_position(trainer))

    def teardown(self) -> None:
        clear_ring_context()
        self.ring_context = None
        super().teardown()  # type: ignore[misc]


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
