"""Model building blocks whose attention runs on the ring."""

from .multihead import RingMultiheadAttention
from .rotary import RotaryEmbedding, apply_rotary
from .transformer import MLP, RotarySelfAttention, TransformerBlock

__all__ = ["MLP", "RingMultiheadAttention", "RotaryEmbedding", "RotarySelfAttention", "TransformerBlock",
           "apply_rotary"]
