"""Recomputation that trades FLOPs for memory, shared by RingGPT's blocks and transformers models.

- :func:`tiled_over_sequence`: a token-wise function over tiles of the sequence, each recomputed in
  backward, so its inner activations exist for one tile at a time.
- :func:`offloaded_checkpoint`: a checkpoint whose only saved tensors (its inputs) wait in pinned host
  memory until backward needs them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.autograd.graph import save_on_cpu
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
    """``fn(x, *args)`` recomputed in backward, its input ``x`` held in host memory until then.

    The reentrant checkpoint saves its tensor inputs with ``save_for_backward``, which ``save_on_cpu``
    moves to pinned host memory (copied back without blocking the host when backward unpacks them);
    the non-reentrant form would keep them referenced on the GPU. Tensors ``fn`` closes over (a
    ``functools.partial``'s) are not saved by the checkpoint and stay where they are.
    """
    with save_on_cpu(pin_memory=x.is_cuda):
        return checkpoint(fn, x, *args, use_reentrant=True)
