"""A small GPT on ring attention, and Lightning modules for causal-LM training of it or of a transformers model."""

from .gpt import GPTConfig, RingGPT
from .hf_lightning_module import HFCausalLM
from .lightning_module import RingCausalLM

__all__ = ["GPTConfig", "HFCausalLM", "RingCausalLM", "RingGPT"]
