"""A tiny pretrained Llama folder (``save_pretrained``) with a short context, for recipes that extend it."""

from __future__ import annotations

from pathlib import Path

SHORT_CONTEXT = 8192


def short_context_llama(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=SHORT_CONTEXT)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder
