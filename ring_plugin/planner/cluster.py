"""What the planner knows about the hardware: GPU kinds and how a cluster of them is wired.

Nominal figures only; :mod:`.rates` replaces them with measured ones where a benchmark measured them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..gpu_peaks import BF16_PEAK_FLOPS

GB = 1e9
HOST_BYTES_PER_GPU = 128 * GB  # host memory per GPU of a node when not given (the one-GPU H100/H200 hosts')


@dataclass(frozen=True)
class GPUKind:
    name: str
    memory_bytes: float  # what torch.cuda reports as total_memory
    peak_bf16_flops: float  # dense bf16 peak, as the monitoring callback counts MFU
    peak_fp32_flops: float
    hbm_bytes_per_s: float


GPUS: dict[str, GPUKind] = {
    "h200": GPUKind("H200", 150.1e9, BF16_PEAK_FLOPS["H200"], 67e12, 4.8e12),
    "h100": GPUKind("H100", 85.0e9, BF16_PEAK_FLOPS["H100"], 67e12, 3.35e12),
    "a100": GPUKind("A100", 85.1e9, BF16_PEAK_FLOPS["A100"], 19.5e12, 2.0e12),
}


@dataclass(frozen=True)
class Cluster:
    gpu: GPUKind
    gpus_per_node: int = 8
    nodes: int = 1
    nvlink_bytes_per_s: float = 900 * GB  # per GPU and direction, nominal (measured p2p wins: rates.py)
    internode_bytes_per_s: float = 4 * 200e9 / 8  # per node and direction: 4 x 200 Gb/s InfiniBand
    # per node, what offloaded optimizer states and checkpoints share (None: 128 GB per GPU of the node)
    host_memory_bytes: float | None = None

    def __post_init__(self) -> None:
        if self.gpus_per_node < 1 or self.nodes < 1:
            raise ValueError(f"gpus_per_node={self.gpus_per_node} and nodes={self.nodes} must be >= 1")

    @property
    def host_bytes(self) -> float:
        return self.host_memory_bytes if self.host_memory_bytes is not None else HOST_BYTES_PER_GPU * self.gpus_per_node

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes

    def with_counts(self, gpus_per_node: int, nodes: int) -> Cluster:
        return replace(self, gpus_per_node=gpus_per_node, nodes=nodes)


def cluster(gpu: str = "h200", gpus_per_node: int = 8, nodes: int = 1, nvlink_gbps: float | None = None,
            internode_gbps: float | None = None, host_gb: float | None = None) -> Cluster:
    """A cluster by name and counts; ``*_gbps`` in GB/s per direction (NVLink per GPU, inter-node per node);
    ``host_gb``: host memory per node in GB."""
    try:
        kind = GPUS[gpu.lower()]
    except KeyError:
        raise ValueError(f"gpu={gpu!r} is not known; valid: {', '.join(GPUS)}") from None
    c = Cluster(kind, gpus_per_node, nodes)
    if nvlink_gbps is not None:
        c = replace(c, nvlink_bytes_per_s=nvlink_gbps * GB)
    if internode_gbps is not None:
        c = replace(c, internode_bytes_per_s=internode_gbps * GB)
    if host_gb is not None:
        c = replace(c, host_memory_bytes=host_gb * GB)
    return c
