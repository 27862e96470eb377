"""Recomputation that trades FLOPs for memory, shared by RingGPT's blocks and transformers models.

- :func:`tiled_over_sequence`: a token-wise function over tiles of the sequence, each recomputed in
  backward, so its inner activations exist for one tile at a time.
- :func:`offloaded_checkpoint`: a checkpoint whose only kept tensor (its input) waits in pinned host
  memory until backward needs it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint


def tiled_over_sequence(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                        tile_tokens: int | None) -> torch.Tensor:
    """``fn(x)`` for a ``fn`` that treats every token alone, over tiles of ``tile_tokens`` tokens of dim -2.

    Each tile is checkpointed, so ``fn``'s intermediate tensors (an MLP's 4x-wide hidden activation)
    never exist for the whole sequence; ``split``'s backward is one ``cat``, not a full-size zero
    tensor per tile. ``None`` (or a sequence no longer than one tile) runs ``fn`` whole.
    """
    if tile_tokens is None or x.shape[-2] <= tile_tokens:
        return fn(x)
    tiles = x.split(tile_tokens, dim=-2)
    if not torch.is_grad_enabled():
        return torch.cat([fn(t) for t in tiles], dim=-2)
    return torch.cat([checkpoint(fn, t, use_reentrant=False) for t in tiles], dim=-2)


def offloaded_checkpoint(fn: Callable[..., Any], x: torch.Tensor, *args: Any) -> Any:
    """``fn(x, *args)`` recomputed in backward, with ``x`` held in host memory until then.

    ``x`` is copied to pinned host memory (asynchronously, on its stream) by an autograd-tracked copy
    whose backward returns the gradient to ``x``'s device; a non-reentrant checkpoint of "copy back,
    then ``fn``" keeps only that host copy. The copy back is issued on the stream the recompute runs
    on, so it is ordered after the copy out and before its first use without a host sync. Being
    non-reentrant, each parameter's gradient is accumulated once per backward, as DDP requires. The
    other ``args`` (rotary tables shared by every layer, document ids) stay where they are.
    """
    return checkpoint(_to_device_then, fn, host_copy(x), x.device, *args, use_reentrant=False)


def host_copy(x: torch.Tensor) -> torch.Tensor:
    """``x`` in (pinned, for a GPU tensor) host memory; gradients flow back to ``x``."""
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=x.is_cuda)
    return host.copy_(x, non_blocking=x.is_cuda)


def _to_device_then(fn: Callable[..., Any], host: torch.Tensor, device: torch.device, *args: Any) -> Any:
    return fn(host.to(device, non_blocking=True), *args)
