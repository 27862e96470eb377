"""Measured rates (``measured.json``, copied from ``benchmarks/results``) and how the planner reads them.

Every lookup interpolates linearly in log2 of the size between the measured points and holds the end
values beyond them (no extrapolated trend). A figure the benchmarks never measured falls back to a
stated ratio of a measured one (see each method).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from typing import Any

from ..gpu_peaks import BF16_PEAK_FLOPS
from .cluster import Cluster


def _interp(points: list[tuple[float, float]], x: float) -> float:
    """Piecewise linear in log2(x) through ``points`` (x, y), constant beyond the ends."""
    pts = sorted(points)
    if x <= pts[0][0]:
        return pts[0][1]
    if x >= pts[-1][0]:
        return pts[-1][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            t = (math.log2(x) - math.log2(x0)) / (math.log2(x1) - math.log2(x0))
            return y0 + t * (y1 - y0)
    raise AssertionError("unreachable")


def load_measured() -> dict[str, Any]:
    return json.loads(resources.files(__package__).joinpath("measured.json").read_text())


@dataclass
class Rates:
    """Rates of one GPU kind and its links; seconds and bytes in, seconds out. ``data``: ``measured.json``."""

    data: dict[str, Any]
    cluster: Cluster

    @classmethod
    def for_cluster(cls, cluster: Cluster) -> Rates:
        return cls(load_measured(), cluster)

    @property
    def measured(self) -> bool:
        """Whether the measured figures are of this cluster's GPU kind (otherwise scaled by peak)."""
        return self.cluster.gpu.name.lower() == self.data["gpu"]

    def _scale(self) -> float:
        # Another GPU kind: the H200 figures scaled by its bf16 peak (a guess, flagged in the report).
        return 1.0 if self.measured else self.cluster.gpu.peak_bf16_flops / BF16_PEAK_FLOPS[self.data["gpu"].upper()]

    # ---------------------------------------------------------------------------------- compute
    def attention_flops_per_s(self, head_dim: int, n: int, causal: bool) -> float:
        """cuDNN fwd+bwd rate on one GPU for a length-``n`` call. head_dim 64 is measured causal only:
        non-causal takes the causal figure times head_dim 128's non-causal / causal ratio."""
        rows = self.data["attention_kernel_tflops"]
        dims = sorted({r["head_dim"] for r in rows})
        d = min(dims, key=lambda x: abs(math.log2(x) - math.log2(head_dim)))

        def curve(dim: int, want_causal: bool) -> list[tuple[float, float]]:
            return [(r["n"], r["tflops"]) for r in rows if r["head_dim"] == dim and r["causal"] == want_causal]

        own = curve(d, causal)
        if own:
            return _interp(own, n) * 1e12 * self._scale()
        ratio = _interp(curve(128, causal), n) / _interp(curve(128, not causal), n)
        return _interp(curve(d, not causal), n) * ratio * 1e12 * self._scale()

    def pattern_flops_per_s(self, case: str) -> float:
        """A pattern layer's measured per-GPU rate on its own FLOPs (2-GPU ring, dilated or block-sparse)."""
        rows = [r["tflops"] for r in self.data["pattern_ring_tflops"] if r["case"] == case]
        if not rows:
            raise ValueError(f"no measured rate for attention pattern {case!r}")
        return sum(rows) / len(rows) * 1e12 * self._scale()

    def linear_flops_per_s(self, k: int, n: int) -> float:
        """bf16 ``F.linear`` rate for an (m, k) x (k, n) product at m = 64K tokens: the measured shape of
        the same width (min(k, n)) nearest in size."""
        rows = self.data["linear_bf16_tflops"]
        width = min(k, n)

        def distance(r: dict[str, Any]) -> tuple[float, float]:
            return abs(math.log2(min(r["k"], r["n"]) / width)), abs(math.log2(r["k"] * r["n"] / (k * n)))

        best = min(rows, key=distance)
        return best["tflops"] * 1e12 * self._scale()

    def fp32_matmul_flops_per_s(self) -> float:
        rows = self.data["matmul_fp32_tflops"]
        return sum(r["tflops"] for r in rows) / len(rows) * 1e12 * self._scale()

    def hbm_bytes_per_s(self) -> float:
        """Bytes read + written per second by a plain device copy."""
        if self.measured:
            return self.data["copy_bytes_per_s"]["value"]
        return self.cluster.gpu.hbm_bytes_per_s * 0.87  # the H200's measured copy / nominal HBM ratio

    # ------------------------------------------------------------------------------------ links
    def p2p_bytes_per_s(self, message_bytes: float) -> float:
        """One GPU sending to a GPU of its node while receiving from another (NCCL, per direction)."""
        nominal = self.cluster.nvlink_bytes_per_s
        if not self.measured:
            return nominal * 0.4  # the H200's measured 1 GiB p2p / nominal NVLink ratio
        return min(nominal, _interp([(r["bytes"], r["bytes_per_s"]) for r in self.data["p2p"]], message_bytes))

    def _node_bus_bytes_per_s(self, op: str, bytes_per_rank: float) -> float:
        """Per-rank algorithm bandwidth of a collective inside a node, measured on 2 ranks: all-gather and
        all-to-all count the bytes a rank receives, reduce-scatter the bytes a rank sends."""
        rows = [r for r in self.data["collectives"] if r["op"] == op]
        moved = {"allgather": 1.0, "reducescatter": 1.0, "alltoall": 0.5, "allreduce": 1.0}[op]
        pts = [(r["bytes_per_rank"], r["bytes_per_rank"] * moved / r["seconds"]) for r in rows]
        return _interp(pts, bytes_per_rank) * (1.0 if self.measured else 0.4 * self.cluster.nvlink_bytes_per_s / 358e9)

    def collective_seconds(self, op: str, bytes_per_rank: float, ranks: int, nodes_spanned: int) -> float:
        """All-gather (per-rank input bytes), reduce-scatter (per-rank output bytes) or all-to-all (per-rank
        bytes) over ``ranks`` ranks on ``nodes_spanned`` nodes: the intra-node bus time (each rank moves
        (ranks - 1) x its bytes, at the measured bus rate), or the inter-node time (each node moves the
        share of the data that lives on other nodes through its links), whichever is longer."""
        if ranks <= 1 or bytes_per_rank <= 0:
            return 0.0
        per_node = ranks / nodes_spanned
        if op == "alltoall":
            intra = bytes_per_rank * (ranks - 1) / ranks / self._node_bus_bytes_per_s(op, bytes_per_rank)
            inter = bytes_per_rank * per_node * (nodes_spanned - 1) / nodes_spanned
        else:
            intra = bytes_per_rank * (ranks - 1) / self._node_bus_bytes_per_s(op, bytes_per_rank)
            inter = bytes_per_rank * per_node * (nodes_spanned - 1)
        return max(intra, inter / self.cluster.internode_bytes_per_s if nodes_spanned > 1 else 0.0)
