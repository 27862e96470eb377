"""A small GPT on ring attention and its Lightning module for causal-LM training."""

from .gpt import GPTConfig, RingGPT
from .lightning_module import RingCausalLM

__all__ = ["GPTConfig", "RingCausalLM", "RingGPT"]
