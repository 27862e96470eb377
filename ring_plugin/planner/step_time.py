"""Time of one optimizer step per GPU: matmuls, attention on the ring, elementwise work, the Ulysses
all-to-all, ZeRO's collectives and the optimizer. Formulas: docs/planner.md."""

from __future__ import annotations

from dataclasses import dataclass

from .memory import dkv_wire_bytes, kv_heads_local
from .model_states import param_tensors
from .rates import Rates
from .workload import DENSE, Job, Layout

# fp32 accumulator traffic per (query row x head x head_dim) element of the ring's merges and adds:
# read + write the fp32 accumulator, read the block's result (forward merge: out and its weights).
MERGE_BYTES = 12.0
ADAM_BYTES_PER_PARAM = 36.0  # fp32 master, m, v read + written, bf16 grad read, bf16 param written
LOSS_BYTES_PER_LOGIT = 40.0  # bf16 logits, fp32 copy, logsumexp, exp, the -1/mask pass, bf16 probabilities


@dataclass(frozen=True)
class StepTime:
    matmul: float
    attention: float  # kernels plus the ring's exposed communication and merges
    elementwise: float
    ulysses: float  # all-to-all, not overlapped
    zero_exposed: float  # ZeRO / data-parallel collectives not hidden behind compute
    optimizer: float

    @property
    def total(self) -> float:
        return self.matmul + self.attention + self.elementwise + self.ulysses + self.zero_exposed + self.optimizer


# GPU <-> pinned host memory, each way (PCIe 5 x16 in practice; an assumption, not measured on our GPUs).
HOST_LINK_BYTES_PER_S = 25e9
# The offloaded optimizer's step on the 16 cores of a one-GPU host, parameters updated per second (an
# assumption, not measured on our hosts: ring-train and bench_longest step torch's AdamW there, DeepSpeed's
# CPU Adam where a model returns it); each parameter's fp32 gradient goes to the host and its bf16 value back.
CPU_ADAM_PARAMS_PER_S = 1e9
OFFLOAD_LINK_BYTES_PER_PARAM = 4 + 2


def elementwise_bytes_per_token_layer(job: Job) -> float:
    """HBM bytes of one block's forward outside matmuls and attention kernels, per local token: two
    norms (read + write), rotary on q and k (bf16 -> fp32 halves -> four products -> cat -> bf16,
    about 24 bytes an element), two residual adds, GELU (SwiGLU: SiLU and the product), the contiguous
    K/V and output copies and the fp32 output's cast. Backward moves about twice this."""
    c, a = job.model.config, job.act_bytes
    e, hd = c.n_embd, c.head_dim
    rotary = (c.n_head + c.kv_heads) * hd * 24
    activation = 2 * (job.model.mlp_matrices - 1) * job.model.mlp_hidden * a
    return 2 * 2 * e * a + rotary + 2 * 3 * e * a + activation + 2 * 2 * c.kv_heads * hd * a + 2 * e * a + e * (4 + a)


def attention_seconds(job: Job, layout: Layout, rates: Rates, passes_forward: float) -> float:
    """Attention of all layers for one step: ``passes_forward`` forwards (2 with checkpointing) and one
    backward (2.5 forwards' FLOPs, as the benchmarks count fwd+bwd = 3.5x forward).

    Dense: each of the ring's R steps computes 1/R of the rank's work at the single-GPU kernel rate and
    overlaps the K/V transfer to the next rank (backward: K/V and the dK/dV going home), so a step
    costs max(compute, transfer); the fp32 merges / accumulator adds are extra, and so is the last
    step's dK/dV message home, which nothing overlaps. Patterns: the measured rate of the pattern's 2-GPU ring."""
    c = job.model.config
    s, b, hd = job.seq_len, job.batch, c.head_dim
    frac = job.attention_fraction
    causal = 0.5 if job.causal else 1.0
    fwd_flops = c.n_layer * b * 4.0 * s * s * frac * causal * hd * c.n_head / (layout.ulysses * layout.ring)
    units = passes_forward + 2.5
    if job.attention not in DENSE:
        case = "dilated" if c.attention_kwargs.get("segment_lengths") else "block_sparse"
        return fwd_flops * units / rates.pattern_flops_per_s(case)
    compute = fwd_flops * units / rates.attention_flops_per_s(hd, s, job.causal)
    ring = layout.ring
    if ring == 1:
        return compute
    n_ring = b * s / ring  # tokens of one ring rank (after the Ulysses gather)
    kv = n_ring * kv_heads_local(job.model, layout.ulysses) * hd  # elements of K (or V) per rank
    ab, wire = job.act_bytes, dkv_wire_bytes(job, layout.ulysses)
    link = _ring_link_bytes_per_s(job, layout, rates, 2 * kv * ab)
    fwd_msg, bwd_msg = 2 * kv * ab / link, 2 * kv * (ab + wire) / link
    per_step = compute / units / ring  # one forward's share of a ring step
    steps = c.n_layer * (ring - 1) * (passes_forward * max(per_step, fwd_msg) + max(2.5 * per_step, bwd_msg)
                                      - units * per_step)
    q_elems = n_ring * c.n_head / layout.ulysses * hd
    merges = c.n_layer * (ring - 1) * (passes_forward + 2) * q_elems * MERGE_BYTES / rates.hbm_bytes_per_s()
    last_hop = c.n_layer * 2 * kv * wire / link
    return compute + steps + merges + last_hop


def _ring_link_bytes_per_s(job: Job, layout: Layout, rates: Rates, message: float) -> float:
    """Per-rank send rate of a ring step: NVLink p2p inside a node; a ring that spans nodes shares each
    node's inter-node links among the rings crossing them (one crossing per ring per node boundary)."""
    cl = rates.cluster
    ranks_per_node = max(cl.gpus_per_node // layout.ulysses, 1)
    p2p = rates.p2p_bytes_per_s(message)
    if layout.ring <= ranks_per_node:
        return p2p
    crossing = cl.gpus_per_node // ranks_per_node  # rings leaving each node at the same time
    return min(p2p, cl.internode_bytes_per_s / crossing)


def matmul_seconds(job: Job, layout: Layout, rates: Rates, passes_forward: float) -> float:
    """Block matmuls: 2 FLOPs per weight per token per pass (forward, recompute, 2x in backward); the
    loss: logits, dH and dW (bf16 inputs, fp32 accumulation) in the activations' precision; dW is an
    fp32 GEMM only for fp32 activations (models/loss.py)."""
    c = job.model.config
    n = job.batch * job.seq_len / (layout.ulysses * layout.ring)
    e, hd, f = c.n_embd, c.head_dim, job.model.mlp_hidden
    mlp = [(e, f)] * (job.model.mlp_matrices - 1) + [(f, e)]
    shapes = [(e, (c.n_head + 2 * c.kv_heads) * hd), (e, e), *mlp]
    block = sum(2.0 * n * k * m / rates.linear_flops_per_s(k, m) for k, m in shapes)
    # MLP tiles recompute their forward once more in backward.
    tiles = sum(2.0 * n * k * m / rates.linear_flops_per_s(k, m) for k, m in mlp) if c.mlp_tile_tokens else 0.0
    head = 2 * 2.0 * n * e * c.vocab_size / rates.linear_flops_per_s(e, c.vocab_size)
    bf16_dw = job.act_bytes == 2
    dw_rate = rates.linear_flops_per_s(e, c.vocab_size) if bf16_dw else rates.fp32_matmul_flops_per_s()
    head += 2.0 * n * e * c.vocab_size / dw_rate
    return c.n_layer * (block * (passes_forward + 2) + tiles) + head


def zero_seconds(job: Job, layout: Layout, rates: Rates, passes_forward: float) -> tuple[float, float]:
    """(collective seconds, optimizer seconds). Gradients are reduced over the whole world (ZeRO-0/1:
    all-reduce = reduce-scatter + all-gather; ZeRO-2: reduce-scatter, then the updated bf16 parameters
    all-gathered; ZeRO-3: parameters all-gathered in every forward and in backward, gradients
    reduce-scattered). The optimizer streams the rank's fp32 states once."""
    cl = rates.cluster
    world = layout.world
    params = sum(n for n, _ in param_tensors(job.model))
    nodes = min(cl.nodes, -(-world // cl.gpus_per_node))
    shard = params * 2 / world  # bf16 bytes of one rank's share

    def coll(op: str, times: int) -> float:
        return times * rates.collective_seconds(op, shard, world, nodes)

    if layout.zero == 3:
        comm = coll("allgather", passes_forward + 1) + coll("reducescatter", 1)
    else:
        comm = coll("reducescatter", 1) + coll("allgather", 1)
    local = params / world if layout.zero >= 1 else params
    if job.offload_optimizer:
        return comm, local / CPU_ADAM_PARAMS_PER_S + local * OFFLOAD_LINK_BYTES_PER_PARAM / HOST_LINK_BYTES_PER_S
    return comm, local * ADAM_BYTES_PER_PARAM / rates.hbm_bytes_per_s()


def ulysses_seconds(job: Job, layout: Layout, rates: Rates, passes_forward: float) -> float:
    """Forward: q, k, v to heads-sharded and the output back; backward: the same in reverse. K/V heads
    replicated when the group is larger than their count."""
    u = layout.ulysses
    if u == 1:
        return 0.0
    c, a = job.model.config, job.act_bytes
    n = job.batch * job.seq_len / (u * layout.ring)
    kv = u * kv_heads_local(job.model, u) * c.head_dim
    per_pass = n * (2 * c.n_embd + 2 * kv) * a  # q and out, k and v, bytes per rank
    cl = rates.cluster
    one = rates.collective_seconds("alltoall", per_pass, u, 1) if cl.gpus_per_node >= u else float("inf")
    return c.n_layer * (passes_forward + 1) * one


def estimate_step(job: Job, layout: Layout, rates: Rates) -> StepTime:
    """Checkpointing runs the checkpointed blocks' matmuls, elementwise work and ZeRO-3 gathers twice;
    their attention (and the Ulysses all-to-all around it) twice only when it is recomputed too
    (``layout.mode == "full"``)."""
    passes, attention_passes = job.forward_passes(layout), job.attention_forward_passes(layout)
    c = job.model.config
    n = job.batch * job.seq_len / (layout.ulysses * layout.ring)
    matmul = matmul_seconds(job, layout, rates, passes)
    attention = attention_seconds(job, layout, rates, attention_passes)
    elementwise = (c.n_layer * n * elementwise_bytes_per_token_layer(job) * (passes + 2)
                   + n * c.vocab_size * LOSS_BYTES_PER_LOGIT) / rates.hbm_bytes_per_s()
    comm, optimizer = zero_seconds(job, layout, rates, passes)
    if job.offloads(layout):  # each checkpointed block's input to the host and back, not overlapped
        moved = 2 * job.checkpointed_layers(layout) * n * c.n_embd * job.act_bytes
        elementwise += moved / HOST_LINK_BYTES_PER_S
    compute = matmul + attention + elementwise
    return StepTime(matmul, attention, elementwise, ulysses_seconds(job, layout, rates, attention_passes),
                    max(comm - compute, 0.0), optimizer)
