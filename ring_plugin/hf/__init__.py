"""Hugging Face models on the ring: importing this module registers ``attn_implementation="ring"``.

    import ring_plugin.hf  # registers "ring"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="ring")
    batch = ring_plugin.hf.shard_batch(full_batch)   # this rank's shard, global positions, shifted labels
    loss = model(**batch, use_cache=False).loss      # this rank's share of the global mean
    loss.backward(); ring_plugin.hf.reduce_gradients(model)

``ring_plugin.hf.enable_long_context(model, tiled_loss=True, mlp_tile_tokens=..., offload_checkpoints=True)``
makes the longest sequences fit (no full logits, MLPs in tiles, layer inputs in host memory). Or hand
the model to ``ring_plugin.hf.RingTrainer`` (transformers' ``Trainer`` on rings).

Every attention layer then runs on the active ring (the strategy's, or ``ring_plugin.ring_context``);
one process without a ring computes plain attention.
"""

from __future__ import annotations

try:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
except ImportError as err:  # pragma: no cover - depends on the installed extras
    raise ImportError("ring_plugin.hf needs transformers: pip install 'ring_plugin[hf]'") from err

from .attention import RING, MaskRefusal, ring_attention_forward, ring_mask
from .batch import reduce_gradients, shard_batch
from .tiling import enable_long_context

AttentionInterface.register(RING, ring_attention_forward)
AttentionMaskInterface.register(RING, ring_mask)

__all__ = ["RING", "MaskRefusal", "RingTrainer", "enable_long_context", "reduce_gradients", "ring_attention_forward",
           "ring_mask",
           "shard_batch"]


def __getattr__(name: str):
    # RingTrainer pulls in transformers' Trainer (and accelerate): loaded only when asked for.
    if name == "RingTrainer":
        from .trainer import RingTrainer

        return RingTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
