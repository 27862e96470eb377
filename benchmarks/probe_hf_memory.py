"""What a long-context training step of a transformers Llama keeps alive, counted on the CPU, beside the
planner's terms for the same shape.

The model is ``bench_longest``'s (``--model 1b``: Llama-3.2-1B-shaped, bf16) with ``--layers`` decoder
layers, switched as its ``ring`` variant is (``enable_long_context``: tiled loss, MLP tiles, every layer
checkpointed with its input in host memory), run at ``--seq-len`` tokens in one process (world 1)
through ``shard_batch`` and the model's own loss, as the benchmark runs it. Counted with
:class:`live_bytes.LiveBytes` (every storage an operator creates, until it is freed) and
``saved_tensors_hooks``:

- ``host``: the bytes ``offloaded_checkpoint`` copies to host memory (each layer's input);
- ``layer_kept``: what one decoder layer keeps for backward when it runs (its recompute in backward);
- ``loss_peak``: the highest total while the fused head and loss run, split into what the forward left
  (the final norm's saved tensors, the hidden states, rotary tables) and the loss' own (dH, fp32 dW, tiles);
- ``backward_peak``: the highest total in backward (CPU kernels: attention here computes in fp32 on the
  CPU, which the GPU's cuDNN does not, so this one is reported, not compared).

Each is printed beside the planner's term (:mod:`ring_plugin.planner.memory`) for the same shape and
length. Parameters and the input ids are not counted (they exist before the step).

    python benchmarks/probe_hf_memory.py --layers 2 --seq-len 2048 --mlp-tile-tokens 128 --loss-tile-tokens 128
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_leaves

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from live_bytes import LiveBytes  # noqa: E402


def build(shape: dict[str, Any], seq_len: int, mlp_tile: int, loss_tile: int) -> torch.nn.Module:
    """A bf16 transformers Llama of ``shape`` on the CPU, switched as bench_longest's ring variant."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    import ring_plugin.hf  # noqa: F401 - registers "ring"
    from ring_plugin.hf import enable_long_context

    config = LlamaConfig(**shape, max_position_embeddings=max(seq_len, 8192), rms_norm_eps=1e-5, use_cache=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="ring", dtype=torch.bfloat16).train()
    return enable_long_context(model, tiled_loss=True, mlp_tile_tokens=mlp_tile, offload_checkpoints=True,
                               loss_tile_tokens=loss_tile)


def measure(model: torch.nn.Module, seq_len: int) -> dict[str, Any]:
    """One forward and backward of ``model`` on ``seq_len`` random tokens, counted (see the module doc)."""
    import ring_plugin.hf as hf
    import ring_plugin.layers.recompute as recompute

    layers = model.get_decoder().layers
    captured: dict[str, Any] = {}

    def capture(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        # the layer's other arguments (rotary tables, positions: alive for the whole step anyway); not its
        # input, which would stay alive here
        captured.setdefault("call", (args[0].shape, args[0].dtype, args[1:], kwargs))

    def set_label(name: str):
        def hook(*_: Any) -> None:
            probe.current = name
        return hook

    handles = [layers[0].register_forward_pre_hook(capture, with_kwargs=True),
               model.get_output_embeddings().register_forward_pre_hook(set_label("loss")),
               model.get_output_embeddings().register_forward_hook(set_label("after loss"))]
    host_copy = recompute.host_copy

    def labelled_host_copy(x: torch.Tensor) -> torch.Tensor:
        with probe.label("host"):
            return host_copy(x)

    recompute.host_copy = labelled_host_copy
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(seq_len))
    try:
        batch = hf.shard_batch({"input_ids": ids, "labels": ids})
        probe = LiveBytes([*model.parameters(), *model.buffers(), *tree_leaves(batch)])
        with probe:
            probe.current = "forward"
            loss = model(**batch, use_cache=False).loss
            forward_left = probe.breakdown()
            probe.current = "backward"
            loss.backward()
    finally:
        recompute.host_copy = host_copy
        for h in handles:
            h.remove()
    host = forward_left.pop("host", 0)
    result = {
        "seq_len": seq_len,
        "host": host,
        "forward_left": forward_left,
        # the highest total while the head and loss ran (the host copies excluded), and what was alive then
        "loss_peak": probe.peak_by_label.get("loss", 0) - host,
        "backward_peak": probe.peak_by_label.get("backward", 0) - host,
        "step_peak_breakdown": {k: v for k, v in probe.at_peak.items() if k != "host"},
    }
    model.zero_grad(set_to_none=True)
    result["layer_kept"] = _layer_kept(layers[0], *captured["call"])
    return result


def _layer_kept(layer: torch.nn.Module, shape: torch.Size, dtype: torch.dtype, args: tuple, kwargs: dict) -> int:
    """Bytes one decoder layer's forward leaves alive for its backward (what its recompute keeps)."""
    hidden = torch.randn(shape, dtype=dtype, requires_grad=True)
    probe = LiveBytes([hidden, *layer.parameters(), *tree_leaves((args, kwargs))])
    with probe:
        out = type(layer).forward(layer, hidden, *args, **kwargs)
    out_bytes = out.untyped_storage().nbytes()
    return probe.now - out_bytes


def planner_terms(shape: dict[str, Any], seq_len: int, mlp_tile: int, loss_tile: int) -> dict[str, float]:
    """The planner's terms for what :func:`measure` counts (the CPU's code paths: the fused loss' weight-gradient
    product is made in bf16 first there)."""
    from ring_plugin.planner.hf_models import spec_from_hf_config
    from ring_plugin.planner.memory import (
        checkpoint_saved_per_token,
        layer_saved_per_token,
        shared_saved_per_token,
        tiled_loss_bytes,
    )

    spec = spec_from_hf_config(shape, seq_len, True, mlp_tile, True)
    n, a, e, v = seq_len, 2, shape["hidden_size"], shape["vocab_size"]
    left = n * (shared_saved_per_token(spec, a, fused_norm=False) - 8)  # the ids are the batch's: not counted
    buffers = n * e * a + v * e * 4  # the loss' dH and fp32 dW
    return {"host": shape["num_hidden_layers"] * n * checkpoint_saved_per_token(spec, a),
            "layer_kept": n * layer_saved_per_token(spec, a, fused_norm=False),
            "forward_left": left + buffers,
            "loss_peak": left + n * e * a + buffers + tiled_loss_bytes(n, loss_tile, v, e, a, device="cpu")}


def main(argv: list[str] | None = None) -> None:
    from bench_longest import MODELS

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=("1b", "tiny"), default="1b")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--mlp-tile-tokens", type=int, default=128)
    p.add_argument("--loss-tile-tokens", type=int, default=128)
    args = p.parse_args(argv)
    shape = {**MODELS[args.model], "num_hidden_layers": args.layers}
    model = build(shape, args.seq_len, args.mlp_tile_tokens, args.loss_tile_tokens)
    found = measure(model, args.seq_len)
    found["forward_left_total"] = sum(found["forward_left"].values())
    planned = planner_terms(shape, args.seq_len, args.mlp_tile_tokens, args.loss_tile_tokens)
    for term, key in (("host", "host"), ("layer_kept", "layer_kept"), ("forward_left", "forward_left_total"),
                      ("loss_peak", "loss_peak")):
        print(f"{term:<14} measured {found[key]:>14,} planner {planned[term]:>16,.0f}")
    print(json.dumps({"shape": shape, "args": vars(args), "measured": found, "planner": planned}))


if __name__ == "__main__":
    main()
