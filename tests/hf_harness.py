"""Tiny random transformers models (configs built in code: no network) and the one-process oracle."""

from __future__ import annotations

import copy
from typing import Any

import torch

VOCAB = 61


def tiny_config(kind: str, **overrides: Any):
    """A 2-layer model: ``llama`` (grouped-query heads), ``qwen2`` (qkv bias), ``mistral`` (sliding window),
    ``gemma3`` (a sliding-window layer of 8 tokens, then a global one), ``gemma2`` (softcapped attention) and
    ``llama4`` (both refused by the ring)."""
    from transformers import Gemma2Config, Gemma3TextConfig, Llama4TextConfig, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=False, use_cache=False)
    configs = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig, "gemma3": Gemma3TextConfig,
               "gemma2": Gemma2Config, "llama4": Llama4TextConfig}
    extra = {"mistral": dict(sliding_window=64),
             "gemma3": dict(head_dim=8, sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
             "gemma2": dict(head_dim=8, sliding_window=8),
             "llama4": dict(head_dim=8, intermediate_size_mlp=48, num_local_experts=2)}.get(kind, {})
    return configs[kind](**{**common, **extra, **overrides})


def tiny_model(kind: str, attn: str, seed: int = 0, **overrides: Any):
    from transformers import AutoModelForCausalLM

    import ring_plugin.hf  # noqa: F401 - registers "ring"

    torch.manual_seed(seed)
    # A deep copy per model: from_config writes the attention implementation into the config it is given.
    model = AutoModelForCausalLM.from_config(copy.deepcopy(tiny_config(kind, **overrides)), attn_implementation=attn,
                                             dtype=torch.float32)
    # Non-zero biases so a wrong bias gradient cannot hide.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model


def token_batch(batch: int, length: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=g)
    labels = ids.clone()
    labels[torch.rand(batch, length, generator=g) < 0.25] = -100
    return {"input_ids": ids, "labels": labels}


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute error relative to the reference tensor's largest entry."""
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
