"""Every candidate layout of a job on a cluster, with its memory, step time and why it is rejected;
the recommendation is the fastest (tokens/s) that fits."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from .cluster import Cluster
from .memory import MemoryEstimate, estimate_memory
from .model_states import HOST_PROCESS_BYTES
from .rates import Rates
from .step_time import StepTime, estimate_step
from .workload import DENSE, Job, Layout

# Share of the GPU's memory a plan may use: the caching allocator's fragmentation and NCCL/cuBLAS
# workspaces live in the rest (the 124M run reserved 1.17x what it allocated).
USABLE_FRACTION = 0.9


@dataclass(frozen=True)
class Candidate:
    layout: Layout
    memory: MemoryEstimate | None
    step: StepTime | None
    tokens_per_s: float
    mfu: float
    reason: str | None  # None: fits and runs
    shortfall: float = 0.0  # bytes beyond the usable GPU memory (or the node's host memory, see reason)

    @property
    def fits(self) -> bool:
        return self.reason is None


@dataclass(frozen=True)
class Report:
    job: Job
    cluster: Cluster
    usable_bytes: float
    candidates: list[Candidate]
    notes: list[str] = field(default_factory=list)

    @property
    def best(self) -> Candidate | None:
        return next((c for c in self.candidates if c.fits), None)

    @property
    def closest(self) -> Candidate | None:
        """The out-of-memory candidate that misses by the fewest bytes (None when one fits or none can run)."""
        if self.best is not None:
            return None
        missing = [c for c in self.candidates if c.memory is not None and c.shortfall > 0]
        return min(missing, key=lambda c: c.shortfall, default=None)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def structural_reason(job: Job, cluster: Cluster, layout: Layout) -> str | None:
    """Why a layout cannot run at all, whatever the memory (None: it can)."""
    c = job.model.config
    u, r = layout.ulysses, layout.ring
    if u > c.n_head:
        return f"U={u} exceeds heads ({c.n_head})"
    if c.n_head % u:
        return f"U={u} does not divide heads ({c.n_head})"
    if c.kv_heads % u and u % c.kv_heads:
        return f"U={u} neither divides nor is a multiple of K/V heads ({c.kv_heads})"
    if u > cluster.gpus_per_node:
        return f"U={u} spans nodes ({cluster.gpus_per_node} GPUs per node)"
    if u > 1 and job.attention not in DENSE:
        return "Ulysses with a sparse pattern is not modelled"
    if job.seq_len % (2 * u * r):
        return f"seq_len not a multiple of 2*U*R={2 * u * r} (zigzag chunks)"
    if job.model.hf and layout.mode == "selective":
        return "transformers layers checkpoint whole (no SAC)"
    if job.offload_optimizer and layout.zero == 0:
        return "offload_optimizer needs ZeRO 1-3"
    return None


MODES = ("none", "full", "selective")


def _modes(checkpointing: Iterable[bool | str]) -> list[str]:
    """Checkpointing modes from names ("none", "full", "selective") or booleans (True: both modes)."""
    out: list[str] = []
    for item in checkpointing:
        names = ["full", "selective"] if item is True else ["none"] if item is False else [str(item)]
        for name in names:
            if name not in MODES:
                raise ValueError(f"checkpointing mode {name!r} is not known; valid: {', '.join(MODES)}")
            if name not in out:
                out.append(name)
    return out


def layouts(world: int, stages: Iterable[int], checkpointing: Iterable[bool | str]) -> list[Layout]:
    return [Layout.of(world // (u * r), u, r, z, mode) for u in _divisors(world) for r in _divisors(world // u)
            for z in stages for mode in _modes(checkpointing)]


def evaluate(job: Job, cluster: Cluster, layout: Layout, rates: Rates, usable: float) -> Candidate:
    if layout.host_offload and layout.mode == "full" and not job.model.config.offload_checkpoints:
        job = job.with_host_offload()
    elif job.offloads(layout) and not layout.host_offload:  # the model's own offload_checkpoints: say so
        layout = dataclasses.replace(layout, host_offload=True)
    why = structural_reason(job, cluster, layout)
    if why:
        return Candidate(layout, None, None, 0.0, 0.0, why)
    memory = estimate_memory(job, layout)
    step = estimate_step(job, layout, rates)
    tokens_per_s = layout.dp * job.batch * job.seq_len / step.total
    mfu = job.flops_per_token * tokens_per_s / (layout.world * cluster.gpu.peak_bf16_flops)
    over = memory.total - usable
    if over > 0:
        return Candidate(layout, memory, step, tokens_per_s, mfu, f"OOM by {over / 1e9:.1f} GB", over)
    host_over = node_host_bytes(memory, cluster, layout) - USABLE_FRACTION * cluster.host_bytes
    if memory.host > 0 and host_over > 0:
        return Candidate(layout, memory, step, tokens_per_s, mfu, f"host OOM by {host_over / 1e9:.1f} GB", host_over)
    return Candidate(layout, memory, step, tokens_per_s, mfu, None)


def node_host_bytes(memory: MemoryEstimate, cluster: Cluster, layout: Layout) -> float:
    """Host memory of one node: each of its processes' offloaded bytes and the process itself."""
    return min(layout.world, cluster.gpus_per_node) * (memory.host + HOST_PROCESS_BYTES)


def fewest_checkpointed(job: Job, cluster: Cluster, candidate: Candidate, rates: Rates, usable: float) -> Candidate:
    """A checkpointing candidate that fits, with as few blocks checkpointed as still fit (each block left
    out saves its recomputation; memory grows with every one): the first k blocks, k found by bisection."""
    if not candidate.fits or candidate.layout.mode == "none" or job.model.hf:  # transformers: every layer
        return candidate
    n_layer = job.model.config.n_layer
    best, low, high = candidate, 1, n_layer - 1  # k = n_layer fits; k = 0 is "none", a candidate of its own
    while low <= high:
        k = (low + high) // 2
        trial = evaluate(job, cluster, dataclasses.replace(candidate.layout, checkpoint_layers=k), rates, usable)
        if trial.fits:
            best, high = trial, k - 1
        else:
            low = k + 1
    return best


def plan(job: Job, cluster: Cluster, rates: Rates | None = None, stages: Iterable[int] = (0, 1, 2, 3),
         checkpointing: Iterable[bool | str] = MODES) -> Report:
    """Every (dp, U, R) x ZeRO stage x checkpointing mode candidate on ``cluster``, fastest fitting first.
    ``checkpointing``: modes "none", "full", "selective"; True stands for both checkpointing modes. A
    checkpointing candidate that fits checkpoints only as many blocks as it must (``checkpoint_layers``);
    full checkpointing that does not fit is tried again with its inputs in host memory and the MLP in
    tiles (``+host``: ``model.offload_checkpoints``, ``model.mlp_tile_tokens``); the recipe's own layout
    is a candidate too."""
    rates = rates or Rates.for_cluster(cluster)
    memory = rates.data["memory_bytes"]["value"] if rates.measured else cluster.gpu.memory_bytes
    usable = USABLE_FRACTION * memory
    found = [evaluate(job, cluster, layout, rates, usable)
             for layout in layouts(cluster.world, tuple(stages), tuple(checkpointing))]
    # Full checkpointing that does not fit on the GPU alone: the same with inputs in host memory and MLP tiles.
    found += [evaluate(job, cluster, dataclasses.replace(c.layout, host_offload=True), rates, usable)
              for c in list(found) if c.layout.mode == "full" and not c.layout.host_offload and c.memory is not None
              and not c.fits]
    found = [fewest_checkpointed(job, cluster, c, rates, usable) for c in found]
    recipe = job.recipe_layout
    if recipe is not None and recipe.world == cluster.world and all(c.layout != recipe for c in found):
        found.append(evaluate(job, cluster, recipe, rates, usable))  # e.g. its own checkpoint_layers
    # Fitting plans by speed (within 1 %: the smaller memory first), then the out-of-memory ones by how
    # much they miss, then the impossible ones.
    found.sort(key=lambda c: (not c.fits, c.step is None, c.shortfall,
                              -round(math.log(max(c.tokens_per_s, 1.0)) / math.log(1.01)),
                              c.memory.total if c.memory else 0.0))
    notes = [] if rates.measured else [f"no measurements of {cluster.gpu.name}: H200 rates scaled by bf16 peak"]
    return Report(job, cluster, usable, found, notes)
