"""A tiny pretrained Llama folder (``save_pretrained``, with a tokenizer) and a short context, for recipes that
extend it."""

from __future__ import annotations

from pathlib import Path

SHORT_CONTEXT = 8192


def short_context_llama(folder: Path, context: int = SHORT_CONTEXT) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from ..hf_data_fixtures import train_tokenizer

    tokenizer = train_tokenizer(folder, chat=True)
    config = LlamaConfig(vocab_size=len(AutoTokenizer.from_pretrained(tokenizer)), hidden_size=32,
                         intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=context)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder
