"""Transformers models (``model=hf``) as the planner sees them, and the longest sequence one GPU trains.

A Llama-style decoder (Llama, Mistral, Qwen2, ...) differs from RingGPT where memory and time are
concerned in two places, each modelled in :mod:`.memory` and :mod:`.step_time` under ``ModelSpec.hf``:
a SwiGLU MLP (gate, up and down projections; four hidden-width tensors saved) and the composite RMSNorm
of transformers (an fp32 copy of its input saved). Checkpointing is per decoder layer
(``model.activation_checkpointing``, all layers, attention recomputed); the long-context switches are
``model.tiled_loss``, ``model.mlp_tile_tokens`` and ``model.offload_checkpoints``, and one GPU can move
the optimizer to host memory (``strategy.offload_optimizer``, ZeRO-3).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..models.gpt import GPTConfig
from .cluster import GB, cluster
from .memory import estimate_memory
from .model_states import HOST_PROCESS_BYTES
from .rates import Rates
from .step_time import estimate_step
from .workload import Job, Layout, ModelSpec

HF_TARGET = "ring_plugin.models.HFCausalLM"
HF_SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
# MLP tile of the long-context plans (tokens): SwiGLU holds six hidden-width tensors per tiled token.
HF_MLP_TILE = 16384
# Sequence lengths the longest-sequence search steps by (a multiple of the zigzag's 2 chunks and of the tiles).
SEQ_STEP = 16384


def spec_from_hf_config(values: Mapping[str, Any], seq_len: int, activation_checkpointing: bool = False,
                        mlp_tile_tokens: int | None = None, offload_checkpoints: bool = False) -> ModelSpec:
    """The planner's model for a transformers config (a ``config.json`` or ``model.config`` mapping):
    hidden size, layers, heads, K/V heads, intermediate size, vocabulary and ``tie_word_embeddings``."""
    missing = [key for key in HF_SHAPE_KEYS if values.get(key) is None]
    if missing:
        raise ValueError(f"model.config lacks {', '.join(missing)}: the planner reads a Llama-style decoder's "
                         f"{', '.join(HF_SHAPE_KEYS)}")
    hidden, heads = int(values["hidden_size"]), int(values["num_attention_heads"])
    head_dim = int(values.get("head_dim") or hidden // heads)
    if head_dim * heads != hidden:
        raise ValueError(f"model.config.head_dim={head_dim} x num_attention_heads={heads} != hidden_size={hidden}: "
                         "the planner models heads that split the hidden size")
    config = GPTConfig(vocab_size=int(values["vocab_size"]), n_layer=int(values["num_hidden_layers"]), n_head=heads,
                       n_kv_head=int(values.get("num_key_value_heads") or heads), n_embd=hidden,
                       max_seq_len=max(seq_len, 1), mlp_hidden=int(values["intermediate_size"]),
                       tie_weights=bool(values.get("tie_word_embeddings", True)),
                       activation_checkpointing=activation_checkpointing, offload_checkpoints=offload_checkpoints,
                       mlp_tile_tokens=mlp_tile_tokens)
    return ModelSpec(config, hf=True)


def spec_from_hf_model(model: Mapping[str, Any], seq_len: int) -> ModelSpec:
    """The planner's model for ``ring-train``'s ``model`` group of ``model=hf``: the ``config.json`` of
    ``model.pretrained`` (read as JSON; nothing is imported or executed) when given, else ``model.config``."""
    pretrained = model.get("pretrained")
    if pretrained:
        path = Path(str(pretrained)) / "config.json"
        if not path.is_file():
            raise ValueError(f"model.pretrained={pretrained!r} has no config.json to plan from")
        values = json.loads(path.read_text())
    else:
        values = dict(model.get("config") or {})
    values = values.get("text_config", values)  # multimodal configs nest the decoder's
    return spec_from_hf_config(values, seq_len, bool(model.get("activation_checkpointing", False)),
                               model.get("mlp_tile_tokens"), bool(model.get("offload_checkpoints", False)))


@dataclass(frozen=True)
class LongestFit:
    """The longest sequence one GPU trains with the long-context switches, and what limits it."""

    seq_len: int
    gpu_bytes: float  # predicted peak GPU memory at seq_len
    host_bytes: float  # predicted host memory of the process at seq_len
    step_seconds: float
    limit: str  # "GPU memory" or "host memory": what the next length up exceeds
    overrides: tuple[str, ...]  # the ring-train overrides of the plan (model=hf, its shape and switches)

    @property
    def command(self) -> str:
        return " ".join(("ring-train", *self.overrides))


def long_context_job(spec: ModelSpec, seq_len: int, offload_optimizer: bool = True,
                     offload_checkpoints: bool = True) -> Job:
    """One sample of ``seq_len`` with the long-context switches: every layer checkpointed (its input in
    host memory with ``offload_checkpoints``), the MLP and the loss in tiles, ZeRO-3 (the optimizer in
    host memory with ``offload_optimizer``)."""
    config = dataclasses.replace(spec.config, max_seq_len=seq_len, activation_checkpointing=True,
                                 recompute_attention=True, offload_checkpoints=offload_checkpoints,
                                 mlp_tile_tokens=min(HF_MLP_TILE, seq_len))
    return Job(dataclasses.replace(spec, config=config), seq_len, tiled_loss=True,
               offload_optimizer=offload_optimizer, name="longest")


# (offload_optimizer, offload_checkpoints) tried by longest_sequence: host memory first, then the GPU's.
OFFLOAD_CHOICES = ((True, True), (False, True), (True, False), (False, False))
ONE_GPU = Layout(1, 1, 1, 3, True)


def longest_sequence(hf_config: Mapping[str, Any], gpu_memory_bytes: float, host_memory_bytes: float,
                     gpu: str = "h100", usable_fraction: float = 0.9) -> LongestFit:
    """The longest sequence (a multiple of 16K tokens) whose full training step one GPU holds, for a
    transformers config: its peak within ``usable_fraction`` of ``gpu_memory_bytes`` and the host's
    pinned buffers, optimizer states and process within ``usable_fraction`` of ``host_memory_bytes``,
    over the offload choices (optimizer and checkpoints in host memory or not). Raises ValueError, naming
    the memory that is short, when not even 16K tokens fit."""
    for name, value in (("gpu_memory_bytes", gpu_memory_bytes), ("host_memory_bytes", host_memory_bytes)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name}={value!r} must be a positive number")
    spec = spec_from_hf_config(hf_config, SEQ_STEP)
    limits = usable_fraction * gpu_memory_bytes, usable_fraction * host_memory_bytes

    def over(seq_len: int, choice: tuple[bool, bool]) -> tuple[float, float]:
        memory = estimate_memory(long_context_job(spec, seq_len, *choice), ONE_GPU)
        return memory.total - limits[0], memory.host + HOST_PROCESS_BYTES - limits[1]

    found = [(_longest_steps(lambda k, c=choice: max(over(k * SEQ_STEP, c)) <= 0), choice)
             for choice in OFFLOAD_CHOICES]
    steps, choice = max(found, key=lambda item: item[0])
    if steps == 0:
        gpu_over, host_over = over(SEQ_STEP, OFFLOAD_CHOICES[0])
        raise ValueError(f"not even {SEQ_STEP} tokens fit one GPU: with the optimizer in host memory the host is "
                         f"short by {max(host_over, 0) / GB:.1f} GB and the GPU by {max(gpu_over, 0) / GB:.1f} GB; "
                         f"without, the GPU by {over(SEQ_STEP, OFFLOAD_CHOICES[3])[0] / GB:.1f} GB")
    seq_len = steps * SEQ_STEP
    job = long_context_job(spec, seq_len, *choice)
    memory = estimate_memory(job, ONE_GPU)
    next_gpu, next_host = over(seq_len + SEQ_STEP, choice)
    keys = (*HF_SHAPE_KEYS, "num_key_value_heads", "tie_word_embeddings")
    shape = tuple(f"model.config.{key}={_override_value(hf_config[key])}" for key in keys if key in hf_config)
    switches = _with_plus_where_new({"model.offload_checkpoints": _override_value(choice[1]),
                                     "model.mlp_tile_tokens": str(job.model.config.mlp_tile_tokens),
                                     "model.tiled_loss": "true"})
    overrides = ("model=hf", *shape, f"seq_len={seq_len}", "devices=1", "ring_size=1", "strategy=deepspeed",
                 "strategy.stage=3", f"strategy.offload_optimizer={_override_value(choice[0])}",
                 "model.activation_checkpointing=true", *switches)
    return LongestFit(seq_len, memory.total, memory.host + HOST_PROCESS_BYTES,
                      estimate_step(job, ONE_GPU, Rates.for_cluster(cluster(gpu, 1, 1))).total,
                      "host memory" if next_host > next_gpu else "GPU memory", overrides)


def _with_plus_where_new(settings: dict[str, str]) -> tuple[str, ...]:
    """``key=value`` overrides of ``model=hf``, with Hydra's ``+`` for keys its config group does not have."""
    from omegaconf import OmegaConf

    from .app_config import compose

    cfg = compose(None, ["model=hf"])
    return tuple(("" if OmegaConf.select(cfg, key, default=_ABSENT) is not _ABSENT else "+") + f"{key}={value}"
                 for key, value in settings.items())


_ABSENT = object()


def _override_value(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _longest_steps(fits: Callable[[int], bool]) -> int:
    """The largest k >= 1 with ``fits(k)`` (fits is monotone: true up to some k), 0 when fits(1) fails."""
    if not fits(1):
        return 0
    low, high = 1, 2
    while fits(high):
        low, high = high, 2 * high
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low
