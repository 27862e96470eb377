"""Model families whose attention layers need what the ring cannot give them, refused by name.

A family lands here when its layers compute attention inputs from something other than the global
``position_ids`` the ring hands them, so the ring's result would differ from the model's own.
"""

from __future__ import annotations

from torch import nn

# model_type -> why the ring cannot run the family's attention exactly.
UNSUPPORTED = {
    "llama4_text": (
        "its decoder layers do not hand position_ids to attention, its chunked attention (attention_chunk_size) "
        "and attention temperature tuning are computed from cache_position (this rank's local positions), "
        "not from the global positions of the ring's shard"),
}


def family_refusal(module: nn.Module) -> str | None:
    """Why the attention layer ``module``'s model family cannot run on the ring, or None."""
    model_type = getattr(getattr(module, "config", None), "model_type", None)
    reason = UNSUPPORTED.get(model_type) if isinstance(model_type, str) else None
    if reason is None:
        return None
    name = type(module).__name__
    return f"{name} (model_type {model_type!r}) is not supported by attn_implementation='ring': {reason}"
