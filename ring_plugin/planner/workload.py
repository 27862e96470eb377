"""What is being planned: the model's shape and the training job (sequence, batch, precision), read
from a ``ring-train`` recipe (Hydra compose, the same config files and overrides) or given directly."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from ..cache import BoundedCache
from ..models.gpt import GPTConfig, RingGPT

DENSE = ("standard", "sdpa", "distributed", "correct")


@dataclass(frozen=True)
class ModelSpec:
    """A model's shape as the planner needs it: a :class:`~ring_plugin.models.GPTConfig` for RingGPT, or
    the same fields read from a transformers config (``hf=True``: a Llama-style decoder through
    ``HFCausalLM``; see :mod:`.hf_models` for what differs)."""

    config: GPTConfig
    hf: bool = False

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelSpec:
        known = {f.name for f in dataclasses.fields(GPTConfig)}
        return cls(GPTConfig(**{k: v for k, v in values.items() if k in known}))

    @property
    def mlp_hidden(self) -> int:
        return self.config.mlp_hidden or 4 * self.config.n_embd

    @property
    def mlp_matrices(self) -> int:
        """Weight matrices of one MLP: fc and proj (RingGPT's GELU MLP), gate, up and down (HF's SwiGLU)."""
        return 3 if self.hf else 2

    def figures(self, seq_len: int) -> tuple[float, float]:
        """(training FLOPs per token, keys per query over the dense count) at ``seq_len``: RingGPT's own
        formula from the meta model (the monitoring callback's), ``HFCausalLM.flops_per_token``'s for HF."""
        if not self.hf:  # building the meta model costs a third of a second; a plan asks once per candidate
            shape = dataclasses.replace(self.config, activation_checkpointing=False, recompute_attention=True,
                                        checkpoint_layers=None, offload_checkpoints=False, mlp_tile_tokens=None)
            return _RING_GPT_FIGURES.get((repr(shape), seq_len), lambda: _ring_gpt_figures(shape, seq_len))
        c = self.config
        linear = c.n_layer * (c.n_embd * (c.n_head + 2 * c.kv_heads) * c.head_dim + c.n_embd * c.n_embd
                              + self.mlp_matrices * c.n_embd * self.mlp_hidden) + c.n_embd * c.vocab_size
        attention = c.n_layer * c.n_head * 4 * c.head_dim * seq_len * 0.5
        return 3.0 * (2.0 * linear + attention), 1.0


def _ring_gpt_figures(config: GPTConfig, seq_len: int) -> tuple[float, float]:
    """From the real model on the meta device (no memory): its FLOP formula is the one MFU uses."""
    with torch.device("meta"):
        model = RingGPT(config)
    return model.flops_per_token(seq_len), model.keys_per_query(seq_len) / seq_len


_RING_GPT_FIGURES: BoundedCache[tuple[float, float]] = BoundedCache(64)


LONG_CONTEXT_TILE = 65536  # MLP tile of a host_offload plan (the dense_1m recipe's)

# Activation checkpointing modes: (GPTConfig.activation_checkpointing, GPTConfig.recompute_attention).
# "full" recomputes whole blocks (attention included); "selective" recomputes everything but attention
# (q, k, v, the attention output and logsumexp stay saved, backward runs no attention forward).
CHECKPOINTING = {"none": (False, True), "full": (True, True), "selective": (True, False)}


@dataclass(frozen=True)
class Layout:
    """One way to run the job: world = dp x ulysses x ring, a ZeRO stage, activation checkpointing
    (``recompute_attention=False``: selective, attention kept out of the recomputation)."""

    dp: int
    ulysses: int
    ring: int
    zero: int
    checkpointing: bool
    recompute_attention: bool = True  # only meaningful with checkpointing
    checkpoint_layers: int | None = None  # with checkpointing, blocks checkpointed (the first ones); None: all
    host_offload: bool = False  # full checkpointing with inputs in host memory and MLP tiles (Job.with_host_offload)

    def __post_init__(self) -> None:
        if not self.checkpointing and not self.recompute_attention:
            object.__setattr__(self, "recompute_attention", True)  # nothing is recomputed: one "none" mode

    @classmethod
    def of(cls, dp: int, ulysses: int, ring: int, zero: int, mode: str) -> Layout:
        """A layout with checkpointing ``mode`` "none", "full" or "selective"."""
        return cls(dp, ulysses, ring, zero, *CHECKPOINTING[mode])

    @property
    def mode(self) -> str:
        if not self.checkpointing:
            return "none"
        return "full" if self.recompute_attention else "selective"

    @property
    def selective(self) -> bool:
        return self.mode == "selective"

    @property
    def world(self) -> int:
        return self.dp * self.ulysses * self.ring

    @property
    def label(self) -> str:
        """``dp2 U1 R4 Z3 SAC``; ``SAC8``: only the first 8 blocks checkpointed."""
        tag = {"none": "noAC", "full": "AC", "selective": "SAC"}[self.mode]
        k = "" if self.mode == "none" or self.checkpoint_layers is None else str(self.checkpoint_layers)
        host = "+host" if self.host_offload and self.mode == "full" else ""
        return f"dp{self.dp} U{self.ulysses} R{self.ring} Z{self.zero} {tag}{k}{host}"


@dataclass(frozen=True)
class ZeroSettings:
    """The DeepSpeed settings the memory model reads: the gradient bucket (``reduce_bucket_size``
    elements, allocated whole on the GPU), ZeRO-3's optimizer sub-groups (``sub_group_size``: the offloaded
    optimizer steps one sub-group at a time) and how many parameter groups the optimizer has (sub-groups
    never span two). The defaults are what ``ring-train`` runs: Lightning's ``DeepSpeedStrategy`` and
    ``RingCausalLM``'s AdamW (matrices with weight decay, vectors without)."""

    reduce_bucket_elements: float = 2e8
    sub_group_elements: float = 1e12
    param_groups: int = 2


LIGHTNING_ZERO = ZeroSettings()
# deepspeed.initialize with a config that sets neither (DeepSpeedZeroConfig's defaults) and one AdamW
# group over model.parameters(), as benchmarks/bench_longest.py runs it.
DEEPSPEED_DEFAULT_ZERO = ZeroSettings(reduce_bucket_elements=5e8, sub_group_elements=1e9, param_groups=1)


@dataclass(frozen=True)
class Job:
    model: ModelSpec
    seq_len: int
    batch: int = 1  # samples of seq_len per ring (data-parallel replica) per step
    act_bytes: int = 2  # bf16 activations and parameters (DeepSpeed bf16)
    grad_comm_bytes: int = 4  # the ring's dQ/dK/dV accumulators (grad_comm_dtype float32)
    loss_chunk: int = 4096  # RingCausalLM.loss_chunk_tokens
    causal: bool = True  # RingGPT is causal; the attention benchmarks also run non-causal
    fused_norm: bool = True  # CUDA's fused RMSNorm saves its input and rstd; the CPU composite saves fp32 copies
    tiled_loss: bool = True  # logits and cross-entropy in loss_chunk tiles; False: the full (n, vocab) logits
    offload_optimizer: bool = False  # ZeRO's fp32 master weights, Adam moments and fp32 gradients in host memory
    zero: ZeroSettings = LIGHTNING_ZERO
    name: str = "custom"
    recipe_layout: Layout | None = None  # what the recipe itself runs, marked in the table
    notes: tuple[str, ...] = field(default=())

    @property
    def attention(self) -> str:
        return self.model.config.attention

    @property
    def flops_per_token(self) -> float:
        """Training FLOPs per token, as the monitoring callback counts MFU."""
        return self.model.figures(self.seq_len)[0]

    @property
    def attention_fraction(self) -> float:
        """Keys per query of the attention pattern over the dense count (1 for dense attention)."""
        return self.model.figures(self.seq_len)[1]

    def checkpointed_layers(self, layout: Layout) -> int:
        """Blocks that recompute in backward under ``layout``'s checkpointing (``checkpoint_layers``, all
        when None); none without checkpointing. A recipe's own count is its layout's (:func:`job_from_config`)."""
        if not layout.checkpointing:
            return 0
        return self.model.config.n_layer if layout.checkpoint_layers is None else layout.checkpoint_layers

    def with_host_offload(self) -> Job:
        """This job with the long-context settings a ``host_offload`` layout plans: checkpointed blocks'
        inputs in host memory and the MLP in tiles (the model's own tile size, else 64K tokens)."""
        c = self.model.config
        config = dataclasses.replace(c, activation_checkpointing=True, recompute_attention=True,
                                     offload_checkpoints=True, mlp_tile_tokens=c.mlp_tile_tokens or LONG_CONTEXT_TILE)
        return dataclasses.replace(self, model=dataclasses.replace(self.model, config=config))

    def offloads(self, layout: Layout) -> bool:
        """Whether checkpointed blocks keep their input in host memory (``offload_checkpoints``; full
        checkpointing only)."""
        return bool(self.model.config.offload_checkpoints) and layout.mode == "full"

    def forward_passes(self, layout: Layout) -> float:
        """Forwards of the blocks' matmuls (and ZeRO-3 gathers) per step: 1 plus the recomputed share."""
        return 1 + self.checkpointed_layers(layout) / self.model.config.n_layer

    def attention_forward_passes(self, layout: Layout) -> float:
        """Forwards of attention per step: recomputed too only in "full" checkpointing."""
        return self.forward_passes(layout) if layout.mode == "full" else 1.0
