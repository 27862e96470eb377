"""This rank's groups as the strategies see them (built by :mod:`..comm.topology`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from ..comm.topology import SequenceMesh, build_mesh, check_ring_size, check_sequence_sizes

__all__ = ["RingGroups", "build_ring_groups", "check_ring_size", "check_sequence_sizes"]


@dataclass(frozen=True)
class RingGroups:
    """This rank's ring, its sequence-parallel group (the ulysses x ring ranks holding shards of the
    same samples; the ring itself without Ulysses) and data-parallel group (ranks holding the same
    shard position of different samples)."""

    mesh: SequenceMesh
    ring_size: int
    ring_rank: int
    dp_size: int
    dp_rank: int
    sequence_size: int
    sequence_rank: int

    @property
    def ring(self) -> dist.ProcessGroup | None:
        return self.mesh.group("ring")

    @property
    def data_parallel(self) -> dist.ProcessGroup | None:
        return self.mesh.group("dp")


def build_ring_groups(ring_size: int, ulysses_size: int = 1) -> RingGroups:
    """Every group of the world (collective), seen from this rank."""
    mesh = build_mesh(ring_size, ulysses_size)
    return RingGroups(mesh, mesh.size("ring"), mesh.rank("ring"), mesh.size("dp"), mesh.rank("dp"),
                      mesh.size("sequence"), mesh.rank("sequence"))
