"""Long context on one GPU for any transformers causal LM: tiled loss, tiled MLPs, offloaded checkpoints.

    ring_plugin.hf.enable_long_context(model, tiled_loss=True, mlp_tile_tokens=8192, offload_checkpoints=True)

switches an already built model in place (its parameters, state dict and outputs' values unchanged):

- ``tiled_loss``: a call with ``labels`` or ``shift_labels`` returns the loss of the fused, chunked
  cross-entropy (:func:`ring_plugin.models.loss.linear_cross_entropy_sum`, ``loss_tile_tokens`` tokens
  at a time) and ``logits=None``: the (tokens, vocab) logits never exist. The loss follows
  transformers' convention: summed over the labelled tokens, divided by ``num_items_in_batch`` when
  given (the global count :func:`~ring_plugin.hf.shard_batch` makes), else by this call's count.
- ``mlp_tile_tokens``: each decoder layer's ``mlp`` runs over tiles of that many tokens, each
  recomputed in backward (:func:`ring_plugin.layers.recompute.tiled_over_sequence`).
- ``offload_checkpoints``: each decoder layer is checkpointed with its input in pinned host memory
  until backward (:func:`ring_plugin.layers.recompute.offloaded_checkpoint`). It replaces transformers'
  own gradient checkpointing on those layers, which must then stay off.

All three live inside the model's forward, so the same model trains under a plain loop, ``RingTrainer``
and the Lightning strategies (DDP, ZeRO), on a ring or on one process.
"""

from __future__ import annotations

import functools
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..comm.context import RingContext, current_ring_context, ring_context
from ..layers.recompute import offloaded_checkpoint, tiled_over_sequence
from ..models.loss import IGNORE_INDEX, linear_cross_entropy_sum

# Output transforms the fused head/loss does not apply: refused instead of silently dropped.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def logit_transform_error(model: nn.Module) -> str | None:
    """Why the fused head/loss would not compute ``model``'s own logits, or None."""
    bad = [name for name in LOGIT_TRANSFORMS if getattr(model.config, name, None) not in (None, 1, 1.0)]
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        return f"{type(model).__name__} has no linear output head"
    if bad or getattr(head, "bias", None) is not None:
        return (f"{type(model).__name__} transforms its logits ({bad or 'lm_head bias'}), which the chunked "
                "cross-entropy does not apply")
    return None


def check_long_context_args(tiled_loss: bool, mlp_tile_tokens: int | None, offload_checkpoints: bool,
                            loss_tile_tokens: int) -> None:
    """One-line errors naming the bad argument (run before any model is built)."""
    if not isinstance(tiled_loss, bool):
        raise ValueError(f"tiled_loss={tiled_loss!r} must be True or False")
    if mlp_tile_tokens is not None and (isinstance(mlp_tile_tokens, bool) or not isinstance(mlp_tile_tokens, int)
                                        or mlp_tile_tokens < 1):
        raise ValueError(f"mlp_tile_tokens={mlp_tile_tokens!r} must be None or a positive number of tokens")
    if not isinstance(offload_checkpoints, bool):
        raise ValueError(f"offload_checkpoints={offload_checkpoints!r} must be True or False")
    if isinstance(loss_tile_tokens, bool) or not isinstance(loss_tile_tokens, int) or loss_tile_tokens < 1:
        raise ValueError(f"loss_tile_tokens={loss_tile_tokens!r} must be a positive number of tokens")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a transformers causal LM (``model.get_decoder().layers``)."""
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__}'s decoder has no `layers` list; its layers cannot be tiled")
    return layers


def enable_long_context(model: nn.Module, tiled_loss: bool = True, mlp_tile_tokens: int | None = None,
                        offload_checkpoints: bool = False, loss_tile_tokens: int = 4096) -> nn.Module:
    """Switch ``model`` (a transformers causal LM) in place; see the module docstring. Returns it."""
    check_long_context_args(tiled_loss, mlp_tile_tokens, offload_checkpoints, loss_tile_tokens)
    if tiled_loss:
        error = logit_transform_error(model)
        if error is not None:
            raise ValueError(f"tiled_loss=True: {error}; train it with tiled_loss=False")
        head = model.get_output_embeddings()
        head.forward = types.MethodType(functools.partial(_fused_head_forward, loss_tile_tokens=loss_tile_tokens), head)
        model.forward = types.MethodType(_tiled_loss_forward, model)
    layers = decoder_layers(model) if mlp_tile_tokens is not None or offload_checkpoints else []
    for layer in layers:
        if mlp_tile_tokens is not None:
            mlp = getattr(layer, "mlp", None)
            if not isinstance(mlp, nn.Module):
                raise ValueError(f"mlp_tile_tokens: {type(layer).__name__} has no `mlp` module to tile")
            mlp.forward = functools.partial(tiled_over_sequence, type(mlp).forward.__get__(mlp),
                                            tile_tokens=mlp_tile_tokens)
        if offload_checkpoints:
            layer.gradient_checkpointing = False  # one checkpoint per layer: this one
            layer.forward = types.MethodType(_offloaded_layer_forward, layer)
    return model


def _fused_head_forward(self: nn.Module, hidden: torch.Tensor, labels: torch.Tensor | None = None,
                        loss_tile_tokens: int = 4096) -> torch.Tensor:
    """The head's own forward (logits), or with ``labels`` the summed cross-entropy of its logits in tiles.
    Run as the head module's call, so ZeRO-3 gathers its (possibly tied) weight as for the logits."""
    if labels is None:
        return type(self).forward(self, hidden)
    return linear_cross_entropy_sum(hidden, self.weight, labels, loss_tile_tokens)


def _offloaded_layer_forward(self: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    forward = type(self).forward.__get__(self)
    if not (self.training and torch.is_grad_enabled()):
        return forward(hidden_states, *args, **kwargs)
    # Every rank of a ring recomputes the same layers in the same order: the ring stays in step. The
    # recompute runs in backward, which a loop may call outside the ring context the forward ran in
    # (RingTrainer activates it around the model call only): the forward's ring is taken along.
    ring = current_ring_context()
    return offloaded_checkpoint(functools.partial(_forward_on_ring, ring, forward, kwargs), hidden_states, *args)


def _forward_on_ring(ring: RingContext | None, forward: Any, kwargs: dict[str, Any], *args: Any) -> Any:
    if ring is None:
        return forward(*args, **kwargs)
    with ring_context(None, ring.layout, mesh=ring.mesh):
        return forward(*args, **kwargs)


def _tiled_loss_forward(self: nn.Module, *args: Any, labels: torch.Tensor | None = None,
                        shift_labels: torch.Tensor | None = None,
                        num_items_in_batch: torch.Tensor | int | None = None, logits_to_keep: int = 0,
                        **kwargs: Any) -> Any:
    if labels is None and shift_labels is None:  # no loss asked for: the model's own forward, logits and all
        return type(self).forward(self, *args, logits_to_keep=logits_to_keep, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    outputs = self.get_decoder()(*args, **kwargs)
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    hidden = outputs.last_hidden_state
    loss = self.get_output_embeddings()(hidden, shift_labels.to(hidden.device))
    if num_items_in_batch is None:
        num_items_in_batch = (shift_labels != IGNORE_INDEX).sum()
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return CausalLMOutputWithPast(loss=loss / num_items_in_batch, logits=None,
                                  hidden_states=getattr(outputs, "hidden_states", None),
                                  attentions=getattr(outputs, "attentions", None))
