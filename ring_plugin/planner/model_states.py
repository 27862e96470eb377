"""Model states per GPU and per host under ZeRO: parameters, gradients and optimizer states, and the host
buffers of ZeRO-3's ``offload_optimizer`` as DeepSpeed and torch's AdamW allocate them. Formulas:
docs/planner.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .workload import LIGHTNING_ZERO, ModelSpec, ZeroSettings

PARAM_BYTES, GRAD_BYTES, OPTIMIZER_BYTES = 2, 2, 12  # bf16 weights and grads; fp32 master + Adam m, v
ZERO3_LIVE_ELEMENTS = 1e9  # stage3_max_live_parameters: gathered parameters ZeRO-3 may keep (with reuse)
# Host memory of a training process beyond what the model below counts (Python, torch, CUDA's context and
# libraries, the data loader): an assumption, not measured.
HOST_PROCESS_BYTES = 8e9


def param_tensors(spec: ModelSpec) -> list[tuple[int, int]]:
    """(numel, ndim) of every parameter tensor of RingGPT built from ``spec`` (tied head counted once)."""
    c = spec.config
    e, f, hd = c.n_embd, spec.mlp_hidden, c.head_dim
    norm = [(e, 1)] + ([(e, 1)] if c.norm == "layernorm" else [])

    def linear(fan_in: int, fan_out: int) -> list[tuple[int, int]]:
        return [(fan_in * fan_out, 2)] + ([(fan_out, 1)] if c.bias else [])

    mlp = linear(e, f) * (spec.mlp_matrices - 1) + linear(f, e)
    layer = norm + linear(e, (c.n_head + 2 * c.kv_heads) * hd) + linear(e, e) + norm + mlp
    head = [] if c.tie_weights else [(c.vocab_size * e, 2)]
    return [(c.vocab_size * e, 2)] + layer * c.n_layer + norm + head


def parameter_count(spec: ModelSpec) -> int:
    return sum(numel for numel, _ in param_tensors(spec))


@dataclass(frozen=True)
class States:
    params: float
    grads: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer


def _partitioned(tensors: list[tuple[int, int]], world: int, per_tensor: bool) -> int:
    """Elements one rank holds: ZeRO-3 splits each tensor (ceil(numel / world), as DeepSpeed pads it);
    ZeRO-1/2 split each optimizer group's flat buffer (matrices decay, vectors do not)."""
    if per_tensor:
        return sum(math.ceil(n / world) for n, _ in tensors)
    groups = [sum(n for n, d in tensors if d >= 2), sum(n for n, d in tensors if d < 2)]
    return sum(math.ceil(g / world) for g in groups if g)


def state_bytes(spec: ModelSpec, world: int, zero: int, offload_optimizer: bool = False) -> States:
    """Parameters, gradients and optimizer states per rank on the GPU (ZeRO shards over the whole world);
    ``offload_optimizer``: the optimizer states live in host memory (:func:`host_state_bytes`), and under
    ZeRO-3 so do the gradient partitions (DeepSpeed's stage 3 puts its flat gradient buffer on the offload
    device; the GPU keeps only the reduce bucket)."""
    tensors = param_tensors(spec)
    full = sum(n for n, _ in tensors)
    split = _partitioned(tensors, world, per_tensor=zero == 3)
    grads = 0.0 if zero == 3 and offload_optimizer else GRAD_BYTES * (split if zero >= 2 else full)
    return States(params=PARAM_BYTES * (split if zero >= 3 else full), grads=grads,
                  optimizer=0.0 if offload_optimizer else OPTIMIZER_BYTES * (split if zero >= 1 else full))


def pinned_bytes(nbytes: float) -> int:
    """What one pinned host allocation of ``nbytes`` takes: torch's caching host allocator rounds every
    request up to a power of two (and keeps freed blocks for reuse, pinned)."""
    return 0 if nbytes <= 0 else 1 << (math.ceil(nbytes) - 1).bit_length()


def optimizer_sub_groups(spec: ModelSpec, world: int, zero: ZeroSettings = LIGHTNING_ZERO) -> list[int]:
    """Elements of each of a rank's ZeRO-3 optimizer sub-groups: DeepSpeed cuts each optimizer parameter
    group (ring-train's AdamW: matrices, then vectors), in parameter order, after the parameter that brings
    the running count to ``sub_group_size``, and the group's last parameter closes the last one."""
    tensors = param_tensors(spec)
    groups = [tensors] if zero.param_groups == 1 else [[t for t in tensors if t[1] >= 2],
                                                       [t for t in tensors if t[1] < 2]]
    out: list[int] = []
    for group in groups:
        numels = [math.ceil(n / world) for n, _ in group]
        run = 0
        for k in numels:
            run += k
            if run >= zero.sub_group_elements:
                out.append(run)
                run = 0
        if run:
            out.append(run)
    return out


@dataclass(frozen=True)
class HostStates:
    """Host bytes per rank of ZeRO-3's ``offload_optimizer`` with ring-train's torch AdamW
    (``zero_force_ds_cpu_optimizer=False``), at its peak (the optimizer step):

    - ``master``: the fp32 master weights (pageable);
    - ``moments``: AdamW's exp_avg and exp_avg_sq, fp32 (pageable);
    - ``fp32_grads``: one pinned fp32 gradient buffer per sub-group (each rounded to a power of two);
    - ``grad_partitions``: the flat gradient partitions the backward fills, in the model's dtype (DeepSpeed's
      grad_accum_dtype defaults to it), one pinned buffer;
    - ``step``: AdamW's single-tensor step on the CPU makes ``exp_avg_sq.sqrt()`` and its quotient by the
      bias correction before adding eps in place: two fp32 temporaries of the largest sub-group."""

    master: float
    moments: float
    fp32_grads: float
    grad_partitions: float
    step: float

    @property
    def total(self) -> float:
        return self.master + self.moments + self.fp32_grads + self.grad_partitions + self.step


def host_states(spec: ModelSpec, world: int, zero: ZeroSettings = LIGHTNING_ZERO) -> HostStates:
    groups = optimizer_sub_groups(spec, world, zero)
    local = sum(groups)
    return HostStates(master=4 * local, moments=8 * local, fp32_grads=sum(pinned_bytes(4 * k) for k in groups),
                      grad_partitions=pinned_bytes(GRAD_BYTES * local), step=2 * 4 * max(groups))


def host_state_bytes(spec: ModelSpec, world: int, zero: int, settings: ZeroSettings = LIGHTNING_ZERO) -> float:
    """Host bytes per rank of ZeRO's ``offload_optimizer``: ZeRO-3 as :class:`HostStates` counts it; ZeRO-1/2
    (not checked against a run) the fp32 master weights, both moments and the fp32 gradients (16 B per
    parameter of the rank's partition)."""
    if zero == 3:
        return host_states(spec, world, settings).total
    tensors = param_tensors(spec)
    return (OPTIMIZER_BYTES + 4) * (_partitioned(tensors, world, per_tensor=False) if zero >= 1
                                    else sum(n for n, _ in tensors))
