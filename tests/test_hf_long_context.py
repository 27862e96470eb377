"""``enable_long_context`` (tiled loss, tiled MLPs, offloaded checkpoints) changes no number: on a ring of 2
with packed documents, the loss and every gradient of Llama, Qwen2, Qwen3, Mistral and Gemma equal those of
the same model untiled (fp32, within 1e-6); the switches do what they say (no
full logits, MLP inputs of at most one tile, each layer's input packed for the host), and bad
arguments are refused with one-line errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from ring_plugin.comm.context import ring_context
from ring_plugin.hf.tiling import enable_long_context
from ring_plugin.testing import run_in_process_group

from .hf_harness import VOCAB, rel_err, token_batch
from .test_model_layers import record_host_copies

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma")
LENGTH, DOCUMENTS = 40, (13, 4, 23)  # documents cut across the zigzag chunks of both ranks
MLP_TILE, LOSS_TILE = 7, 9  # neither divides a rank's 20 tokens: a short last tile
TOLERANCE = 1e-6  # absolute, fp32
RELATIVE_TOLERANCE = 4e-6


def family_model(kind: str, seed: int = 0) -> torch.nn.Module:
    """A 2-layer random fp32 model of ``kind`` on attn_implementation="ring" (qkv biases made non-zero)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import ring_plugin.hf  # noqa: F401 - registers "ring"

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                  tie_word_embeddings=kind == "gemma", use_cache=False)
    # Mistral's window is off: packed documents with a sliding window are refused by the ring.
    extra = {"mistral": dict(sliding_window=None), "qwen2": dict(use_sliding_window=False)}.get(kind, {})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **common, **extra),
                                             attn_implementation="ring", dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model.train()


def packed_batch() -> dict[str, torch.Tensor]:
    batch = token_batch(2, LENGTH, seed=3)
    batch["position_ids"] = torch.cat([torch.arange(n) for n in DOCUMENTS])[None].expand(2, -1)
    return batch


def loss_and_grads(model: torch.nn.Module, shard: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The ring's global loss (the ranks' shares summed) and the summed gradients."""
    import ring_plugin.hf as hf

    out = model(**shard, use_cache=False)
    out.loss.backward()
    hf.reduce_gradients(model)
    loss = out.loss.detach().clone()
    dist.all_reduce(loss)
    return loss, {n: p.grad for n, p in model.named_parameters()}


def family_errors(kind: str) -> dict[str, float]:
    """Relative errors of the tiled model's loss and worst gradient against the untiled one, on the ring."""
    import ring_plugin.hf as hf

    plain = family_model(kind)
    tiled = enable_long_context(copy.deepcopy(plain), tiled_loss=True, mlp_tile_tokens=MLP_TILE,
                                offload_checkpoints=True, loss_tile_tokens=LOSS_TILE)
    with ring_context(dist.group.WORLD, "zigzag"):
        shard = hf.shard_batch(packed_batch())
        assert shard["document_ids"] is not None
        ref_loss, ref_grads = loss_and_grads(plain, shard)
        loss, grads = loss_and_grads(tiled, shard)
    if any(g is None for g in grads.values()):
        return {"missing_grads": 1.0}
    return {"loss_abs": float((loss - ref_loss).abs()),
            "grads_abs": max(float((grads[n] - g).abs().max()) for n, g in ref_grads.items()),
            "grads_rel": max(rel_err(grads[n], g) for n, g in ref_grads.items())}


def world_worker(rank: int, world: int) -> dict[str, dict[str, float]]:
    return {kind: family_errors(kind) for kind in FAMILIES}


@pytest.mark.timeout(300)
def test_tiled_model_equals_untiled_on_a_ring_of_2_with_packed_documents():
    for rank, result in enumerate(run_in_process_group(world_worker, 2, timeout=240)):
        for kind in FAMILIES:
            errors = result[kind]
            assert "missing_grads" not in errors, (rank, kind)
            assert errors["loss_abs"] <= TOLERANCE and errors["grads_abs"] <= TOLERANCE, (rank, kind, errors)
            # Relative to each gradient's largest entry too, so a small gradient cannot hide in the absolute bound
            # (a few fp32 roundings: tiles sum the weight gradients in another order).
            assert errors["grads_rel"] <= RELATIVE_TOLERANCE, (rank, kind, errors)


def test_switches_tile_the_loss_and_mlp_and_offload_each_layer(monkeypatch):
    """One process: the head's one call returns the loss (no full logits), every MLP sees at most MLP_TILE tokens, each
    decoder layer's input is copied to the host once, and the loss equals the untiled model's."""
    import ring_plugin.hf as hf

    packed = record_host_copies(monkeypatch)
    plain = family_model("llama")
    tiled = enable_long_context(copy.deepcopy(plain), mlp_tile_tokens=MLP_TILE, offload_checkpoints=True)
    head_calls, mlp_tokens = [], []
    tiled.lm_head.register_forward_hook(lambda m, i, o: head_calls.append(tuple(o.shape)))
    for layer in tiled.model.layers:
        layer.mlp.down_proj.register_forward_hook(lambda m, i, o: mlp_tokens.append(i[0].shape[-2]))
    shard = hf.shard_batch(packed_batch())
    out = tiled(**shard, use_cache=False)
    out.loss.backward()
    ref = plain(**shard, use_cache=False)
    assert out.logits is None and head_calls == [()]  # the head's one call returned the summed loss, no logits
    assert rel_err(out.loss.detach(), ref.loss.detach()) <= TOLERANCE
    # Forward and the recomputes in backward: only tiles of 7, 7, ..., 5 over 40 tokens (6 per layer forward).
    assert sorted(set(mlp_tokens)) == [LENGTH % MLP_TILE, MLP_TILE] and len(mlp_tokens) > 2 * 6
    assert packed == [(2, LENGTH, 32)] * 2, packed
    # Without labels the model's own forward runs: the full logits, as before.
    inputs = {k: v for k, v in shard.items() if k not in ("labels", "shift_labels", "num_items_in_batch")}
    with torch.no_grad():
        torch.testing.assert_close(tiled(**inputs).logits, plain(**inputs).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(mlp_tile_tokens=0), "mlp_tile_tokens=0 must be None or a positive"),
    (dict(loss_tile_tokens=-1), "loss_tile_tokens=-1 must be a positive"),
    (dict(tiled_loss="yes"), "tiled_loss='yes' must be True or False"),
    (dict(offload_checkpoints=1), "offload_checkpoints=1 must be True or False"),
])
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        enable_long_context(family_model("llama"), **kwargs)


def test_logit_transforms_are_refused_by_the_tiled_loss():
    model = family_model("llama")
    model.config.logit_scale = 0.5
    with pytest.raises(ValueError, match=r"tiled_loss=True: .*logit_scale"):
        enable_long_context(model)


def test_hf_causal_lm_switches_keep_the_loss_and_gradients():
    """HFCausalLM (the strategies' module) with MLP tiles, offloaded checkpoints and the loss in tiles: its loss
    and gradients equal the same weights without them (loss at once, no checkpointing)."""
    from ring_plugin.models import HFCausalLM

    config = family_model("qwen3").config.to_dict()
    plain = HFCausalLM(config=config, tiled_loss=False)
    long = HFCausalLM(config=config, activation_checkpointing=True, offload_checkpoints=True,
                      mlp_tile_tokens=MLP_TILE, loss_chunk_tokens=LOSS_TILE)
    for module in (plain, long):
        module.configure_model()
    long.model.load_state_dict(plain.model.state_dict())
    batch = token_batch(2, LENGTH, seed=5)
    batch = {"input_ids": batch["input_ids"], "position_ids": torch.arange(LENGTH)[None].expand(2, -1),
             "labels": batch["labels"]}
    means = []
    for module in (plain, long):
        module.model.train()
        loss_sum, (count, _, _) = module.local_loss(batch)
        (loss_sum / count.float()).backward()
        means.append(loss_sum.detach() / count.float())
    assert float((means[1] - means[0]).abs()) <= TOLERANCE
    for (name, a), b in zip(plain.model.named_parameters(), long.model.parameters()):
        assert float((b.grad - a.grad).abs().max()) <= TOLERANCE, name
        assert rel_err(b.grad, a.grad) <= RELATIVE_TOLERANCE, name


@pytest.mark.parametrize("kwargs, match", [
    (dict(offload_checkpoints=True), "offload_checkpoints=True needs activation_checkpointing=True"),
    (dict(mlp_tile_tokens=-4), "mlp_tile_tokens=-4 must be None or a positive"),
])
def test_hf_causal_lm_refuses_bad_switches(kwargs, match):
    from ring_plugin.models import HFCausalLM

    with pytest.raises(ValueError, match=match):
        HFCausalLM(config={"model_type": "llama", "hidden_size": 32}, **kwargs)
