"""Per-GPU memory of one training step: the model states (:mod:`.model_states`), saved activations, the
ring's in-flight buffers and the largest transient of each phase. Formulas: docs/planner.md.

Everything here is bytes per GPU. ``n`` is the tokens a GPU holds (batch x seq_len / (ulysses x ring)).
"""

from __future__ import annotations

from dataclasses import dataclass

from .model_states import (
    GRAD_BYTES,
    OPTIMIZER_BYTES,
    PARAM_BYTES,
    ZERO3_LIVE_ELEMENTS,
    States,
    host_state_bytes,
    parameter_count,
    pinned_bytes,
    state_bytes,
)
from .workload import Job, Layout, ModelSpec


# ---------------------------------------------------------------------------------- activations
def kv_heads_local(spec: ModelSpec, ulysses: int) -> int:
    """K/V heads a rank attends with after the Ulysses all-to-all (replicated when ulysses > kv heads)."""
    return max(spec.config.kv_heads // ulysses, 1)


def norm_saved_per_token(spec: ModelSpec, a: int, fused: bool) -> float:
    """RMSNorm: the fused CUDA kernel saves its input and fp32 rstd; the composite (CPU) saves the fp32
    upcast input, the fp32 normalised rows and rstd; transformers' RMSNorm (``spec.hf``) saves the fp32
    upcast input, rstd and the normalised rows cast back for the weight's product."""
    e = spec.config.n_embd
    if spec.hf:
        return e * 4 + e * a + 4
    return e * a + 4 if fused else 2 * e * 4 + 4


def kv_heads_grouped(spec: ModelSpec, ulysses: int) -> bool:
    """Whether a rank's query heads share K/V heads (grouped-query attention after the Ulysses split):
    the ring then sums their dK/dV into the accumulator dtype (fp32) before anything else."""
    return kv_heads_local(spec, ulysses) != spec.config.n_head // ulysses


def dkv_wire_bytes(job: Job, ulysses: int) -> int:
    """Bytes per element of the dK/dV a ring step sends home: the kernel's own (activation) dtype,
    unless grouped-query heads were summed into the accumulator dtype first (dense_ring.py)."""
    return job.grad_comm_bytes if kv_heads_grouped(job.model, ulysses) else job.act_bytes


def mlp_hidden_saved_per_token(spec: ModelSpec, a: int) -> float:
    """GELU's input and the MLP projection's input (SwiGLU: the gate and up outputs, SiLU's output and
    the down projection's input); none when the MLP runs in tiles (``mlp_tile_tokens``: each tile keeps
    only its input, a view of the fc input, and recomputes the rest in backward)."""
    return 0.0 if spec.config.mlp_tile_tokens else mlp_hidden_tensors_per_token(spec, a)


def mlp_hidden_tensors_per_token(spec: ModelSpec, a: int) -> float:
    """The hidden-width tensors an untiled MLP saves (a tile holds them while it recomputes)."""
    return 2 * (spec.mlp_matrices - 1) * spec.mlp_hidden * a



def layer_saved_per_token(spec: ModelSpec, a: int, fused_norm: bool, ulysses: int = 1) -> float:
    """Bytes a transformer block saves for backward per local token, without checkpointing: two norms;
    the qkv and fc inputs; the attention's q, k, v, out (bf16) and lse (fp32), out being the proj input
    too (a view of it); the MLP's hidden tensors (:func:`mlp_hidden_saved_per_token`).
    Rotary saves only cos/sin (shared, see :func:`shared_saved_per_token`)."""
    c = spec.config
    kv = ulysses * kv_heads_local(spec, ulysses) * c.head_dim  # K/V widths per local token
    return (2 * norm_saved_per_token(spec, a, fused_norm) + 4 * c.n_embd * a + 2 * kv * a + 4 * c.n_head
            + mlp_hidden_saved_per_token(spec, a))


def shared_saved_per_token(spec: ModelSpec, a: int, fused_norm: bool) -> float:
    """Saved once for the whole model: token ids (int64), rotary cos/sin (fp32; transformers: in the
    activations' dtype), the final norm."""
    rotary = 2 * spec.config.head_dim * a if spec.hf else 4 * spec.config.head_dim
    return 8 + rotary + norm_saved_per_token(spec, a, fused_norm)


def checkpoint_saved_per_token(spec: ModelSpec, a: int) -> float:
    """With activation checkpointing a block keeps only its input."""
    return spec.config.n_embd * a


def attention_kept_per_token(spec: ModelSpec, a: int, ulysses: int = 1) -> float:
    """What selective checkpointing (``recompute_attention=False``) keeps beyond the block input: the
    attention's q, k, v, output (bf16, also the output projection's input) and logsumexp (fp32), as in
    :func:`layer_saved_per_token`."""
    c = spec.config
    kv = ulysses * kv_heads_local(spec, ulysses) * c.head_dim
    return 2 * c.n_embd * a + 2 * kv * a + 4 * c.n_head


def block_kept_per_token(spec: ModelSpec, a: int, fused_norm: bool, ulysses: int, mode: str) -> float:
    """Bytes one block keeps for backward per local token in checkpointing ``mode`` ("none", "full",
    "selective")."""
    if mode == "none":
        return layer_saved_per_token(spec, a, fused_norm, ulysses)
    kept = checkpoint_saved_per_token(spec, a)
    return kept + attention_kept_per_token(spec, a, ulysses) if mode == "selective" else kept


def tiled_loss_bytes(n: float, chunk: int, vocab: int, hidden: int, a: int, device: str = "cuda") -> float:
    """The largest working set of ``linear_cross_entropy_sum``'s forward (models/loss.py) beyond its
    outputs (dH, the fp32 dW): each tile's logits in fp32, ``logits - lse`` and its exp ``p``, and ``p``
    cast to the activations' dtype for the gradient products. The loop rebinds ``logits``, ``p`` and
    ``p_low`` only when the next tile assigns them, so while tile i+1 computes, tile i's ``p`` and
    ``p_low`` are alive too. The peak is the largest of: tile i+1's logits (matmul output, then fp32)
    beside tile i's logits, p and p_low; tile i+1's ``logits - lse`` and exp beside its logits and tile
    i's p and p_low; a tile's weight-gradient product (fp32, vocab x hidden) beside its logits, p and
    p_low (on the CPU the bf16 product is made first, then converted). Each tile also has its
    logsumexp and picked logit (fp32), clamped labels (int64) and label mask (bool): 17 bytes a token."""
    c0 = min(chunk, n)
    c1 = min(chunk, max(n - chunk, 0.0))  # the second tile: the first one carried into the next
    low = a if a < 4 else 0  # p.to(the activations' dtype) is p itself when they are fp32
    rows = 4 + 4 + 8 + 1
    product = 4 * vocab * hidden + (a * vocab * hidden if device == "cpu" and a == 2 else 0)
    points = [(3 * 4 * vocab + rows) * c0, (2 * 4 + low) * c0 * vocab + rows * c0 + product]
    if c1:
        points += [(2 * 4 + low) * c0 * vocab + (4 + a) * c1 * vocab + rows * c1,
                   (4 + low) * c0 * vocab + (3 * 4 * vocab + rows) * c1]
    return max(points)


def norm_backward_per_token(spec: ModelSpec) -> float:
    """The largest set of temporaries of one norm's backward beyond its saved tensors, per token:
    transformers' composite RMSNorm (``spec.hf``) differentiates ``x * rsqrt(mean(x^2))`` op by op in fp32,
    with five fp32 tensors of its width alive at once (in the mean's and the power's backward: the
    product's gradient, the mean's expanded quotient, x^1, 2 x^1 and its product with the gradient;
    counted on the CPU, the same aten ops as on the GPU). RingGPT's fused norm is not modelled here."""
    return 5 * 4 * spec.config.n_embd if spec.hf else 0.0


@dataclass(frozen=True)
class RingBuffers:
    """Foreign K/V pairs and received dK/dV message pairs alive while a ring step computes (peak over
    steps); our own dK/dV accumulator is counted apart."""

    forward_kv: int
    backward_kv: int
    backward_dkv: int


def ring_step_received(ring: int, step: int, backward: bool) -> int:
    """Tensors received from peers that are alive while ring step ``step`` (1..ring-1) computes: the K/V
    pair of this step, the next pair in flight (not after the last step); in backward also, from step
    2, the dK/dV pair the previous step's peer sent home, landing once this step is posted (dense_ring.py)."""
    kv = 1 + (step + 1 <= ring - 1)
    dkv = int(step >= 2) if backward else 0
    return 2 * (kv + dkv)


def ring_buffers(ring: int) -> RingBuffers:
    if ring <= 1:
        return RingBuffers(0, 0, 0)
    kv = min(ring - 1, 2)
    # dK/dV: one message pair received (after the last step at ring 2, while the one sent leaves).
    return RingBuffers(kv, kv, 1)


@dataclass(frozen=True)
class MemoryEstimate:
    states: States
    saved: float  # activations still kept for backward at the peak
    transient: float  # the rest of the peak phase's working set (a recomputed block, the ring's buffers, ...)
    phase: str  # which phase peaks: "loss" (end of forward), "backward" or "optimizer"
    host: float = 0.0  # host memory of this rank: offloaded optimizer states and checkpoints (pinned)

    @property
    def total(self) -> float:
        return self.states.total + self.saved + self.transient


def attention_backward_bytes(job: Job, layout: Layout, n: float) -> float:
    """One attention layer's backward working set beyond its saved tensors: the fp32 dQ and own dK/dV
    sums, the dK/dV message received from a peer, foreign K/V in flight, the kernel's inputs K/V expanded
    to the query heads (grouped-query heads: ``expand_kv_heads`` copies them), its dQ/dK/dV (K/V expanded;
    what a step sends home) and its fp32 dQ workspace.

    The fp32 sums (:class:`~ring_plugin.attention.row_sums.RowSums`) exist only for rows with more than
    two results, or two whose first is fp32: at ring size 2 none for dQ, and for dK/dV only where
    grouped-query heads were summed into fp32 first. On one GPU (ring size 1) every row has one result:
    the fp32 dK/dV sums are made after the kernel returns, its workspace freed, and copied into the
    final tensors at once, so they add nothing to the kernel's peak."""
    c, a, g = job.model.config, job.act_bytes, job.grad_comm_bytes
    e = c.n_embd
    kv = n * layout.ulysses * kv_heads_local(job.model, layout.ulysses) * c.head_dim  # elements per K or V
    buffers = ring_buffers(layout.ring)
    wire = dkv_wire_bytes(job, layout.ulysses)
    full = layout.ring > 2
    dq = n * e * g if full else 0.0
    grouped = kv_heads_grouped(job.model, layout.ulysses)
    own = layout.ring > 1 and (full or grouped)  # our own sums, then the messages received
    dkv = (2 * kv * g if own else 0.0) + buffers.backward_dkv * 2 * kv * wire
    expanded = 2 * n * e * a if grouped else 0.0
    return dq + dkv + buffers.backward_kv * 2 * kv * a + expanded + 3 * n * e * a + n * e * 4


def freed_before_attention_backward(job: Job) -> float:
    """Bytes per token of a block's saved tensors its backward has freed when attention's backward
    starts: the MLP's (its norm, the fc input, the hidden tensors) and the output projection's input."""
    spec, a = job.model, job.act_bytes
    return (mlp_hidden_saved_per_token(spec, a) + norm_saved_per_token(spec, a, job.fused_norm)
            + 2 * spec.config.n_embd * a)


def estimate_memory(job: Job, layout: Layout) -> MemoryEstimate:
    spec, a = job.model, job.act_bytes
    c = spec.config
    e, v, world = c.n_embd, c.vocab_size, layout.world
    n = job.batch * job.seq_len / (layout.ulysses * layout.ring)
    states = state_bytes(spec, world, layout.zero, job.offload_optimizer)
    fused_norm = job.fused_norm
    per_layer = layer_saved_per_token(spec, a, fused_norm, layout.ulysses)
    kept = block_kept_per_token(spec, a, fused_norm, layout.ulysses, layout.mode)
    checkpointed = job.checkpointed_layers(layout)  # the first blocks; the others save everything
    shared = n * shared_saved_per_token(spec, a, fused_norm)
    # Offloaded checkpoints keep their inputs in host memory; one block's input is back on the GPU while
    # it recomputes (counted in ``recomputed``'s block input below).
    saved_checkpointed = (0.0 if job.offloads(layout) else n * checkpointed * kept) + shared
    saved = saved_checkpointed + n * (c.n_layer - checkpointed) * per_layer
    total_params = parameter_count(spec)
    # ZeRO-3 gathers a module's parameters into full-size buffers for its forward and backward; on one GPU
    # the partition is the whole parameter and DeepSpeed uses it in place (no gather, no buffer).
    gathered = min(total_params, ZERO3_LIVE_ELEMENTS) * PARAM_BYTES if layout.zero == 3 and world > 1 else 0.0
    # The gradient bucket (reduce_bucket_size elements, the gradients' dtype): ZeRO-3 allocates it whole when
    # the engine is built, so it is there in forward too; ZeRO-2's is counted in backward.
    bucket = job.zero.reduce_bucket_elements * GRAD_BYTES if layout.zero >= 2 else 0.0
    forward_bucket = bucket if layout.zero == 3 else 0.0
    # End of forward, inside the fused loss: the final hidden states, the loss' dH (bf16) and dW (fp32)
    # buffers and the tiles' working set (:func:`tiled_loss_bytes`). ``tiled_loss=False``: HFCausalLM runs
    # the same loss over one tile of all n tokens (the whole fp32 logits).
    chunk = job.loss_chunk if job.tiled_loss else n
    loss = 2 * n * e * a + v * e * 4 + tiled_loss_bytes(n, chunk, v, e, a)
    # Backward of a block peaks in one of two places (a GPU memory snapshot of the 3B model's step,
    # bench_train --snapshot-step): in the MLP's backward, where the GELU input and the gradients of its
    # output and input are alive (the GELU output, saved for the projection, is freed just before: one
    # hidden-width tensor beyond what the block saved), or in attention's backward, after the MLP's and
    # the output projection's saved tensors are freed (:func:`freed_before_attention_backward`), with the
    # ring's buffers alive.
    tile = min(spec.config.mlp_tile_tokens or n, n)
    # beyond the saved tensors: one hidden-width gradient (GELU) or two (SwiGLU's product and gate); a tile
    # recomputes its hidden tensors too
    width = (spec.mlp_matrices - 1) * spec.mlp_hidden * a
    mlp_peak = n * width if not spec.config.mlp_tile_tokens else tile * (width + mlp_hidden_tensors_per_token(spec, a))
    attention = attention_backward_bytes(job, layout, n) - n * freed_before_attention_backward(job)
    # transformers' RMSNorm backward (fp32, op by op): its temporaries, while the norm's bf16 copy and its
    # output (the MLP's input) are freed, and one hidden-size gradient is alive where ``rest`` counts two.
    norm = n * (norm_backward_per_token(spec) - 3 * e * a) if spec.hf else 0.0
    block_peak = max(mlp_peak, attention, norm)
    # The head's weight gradient (V x E, bf16) from the loss: with tied weights autograd holds it in the
    # embedding weight's input buffer until the embedding's own gradient arrives, at the end of backward.
    tied_dw = v * e * a if c.tie_weights else 0.0
    rest = 2 * n * e * a + bucket + gathered + tied_dw
    # A checkpointed block recomputes all it did not keep (selective: attention's tensors are kept). The top
    # block that saves everything peaks first; a checkpointed one only after the blocks above freed theirs.
    # Either runs after the final norm's backward, which freed what the norm saved.
    final_norm = n * norm_saved_per_token(spec, a, fused_norm)
    recomputed = n * (per_layer - (kept - checkpoint_saved_per_token(spec, a)))
    backward = [(saved - final_norm, block_peak)] if checkpointed < c.n_layer else []
    if checkpointed:
        backward.append((saved_checkpointed - final_norm, recomputed + block_peak))
    backward_saved, backward_peak = max(backward, key=sum)
    optimizer = 4 * states.optimizer / OPTIMIZER_BYTES  # fp32 gradients of the rank's partition at the step
    # (saved, transient) of each phase; activations are gone by the optimizer step.
    phases = {"loss": (saved, loss + gathered + forward_bucket),
              "backward": (backward_saved, backward_peak + rest),
              "optimizer": (0.0, optimizer)}
    name = max(phases, key=lambda k: sum(phases[k]))
    host = host_state_bytes(spec, world, layout.zero, job.zero) if job.offload_optimizer else 0.0
    if job.offloads(layout):
        # each checkpointed block's input, in its own pinned buffer (cached and reused from step to step)
        host += checkpointed * pinned_bytes(n * checkpoint_saved_per_token(spec, a))
    return MemoryEstimate(states, *phases[name], phase=name, host=host)
