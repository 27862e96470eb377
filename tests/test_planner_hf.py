"""The planner's transformers models (``model=hf``) against the real thing on CPU: parameter counts of
Llama-3.2-1B and Llama-3.1-8B shapes (meta device), the bytes a decoder layer saves for backward
(saved_tensors_hooks around a bf16 forward of a small Llama on the ring), the recipe's plan, and the
longest-sequence proposal the one-GPU benchmark calls."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from benchmarks.live_bytes import saved_bytes
from ring_plugin.planner import Layout, compose, job_from_config
from ring_plugin.planner.cluster import GPUS
from ring_plugin.planner.hf_models import (
    OFFLOAD_CHOICES,
    ONE_GPU,
    SEQ_STEP,
    long_context_job,
    longest_sequence,
    spec_from_hf_config,
)
from ring_plugin.planner.memory import (
    checkpoint_saved_per_token,
    estimate_memory,
    layer_saved_per_token,
    shared_saved_per_token,
)
from ring_plugin.planner.model_states import HOST_PROCESS_BYTES, parameter_count

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
LLAMA_1B = dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True)
LLAMA_8B = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
SMALL = dict(model_type="llama", vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)


def _hf_model(values: dict, **kwargs: object) -> torch.nn.Module:
    import ring_plugin.hf  # noqa: F401 - registers attn_implementation="ring"
    from ring_plugin.models.hf_lightning_module import hf_config

    return transformers.AutoModelForCausalLM.from_config(hf_config(values), attn_implementation="ring", **kwargs)


@pytest.mark.parametrize("values", [LLAMA_1B, LLAMA_8B, SMALL], ids=["llama-3.2-1b", "llama-3.1-8b", "small"])
def test_parameter_count_equals_the_transformers_model(values: dict) -> None:
    with torch.device("meta"):
        model = _hf_model(values)
    assert parameter_count(spec_from_hf_config(values, 1024)) == sum(p.numel() for p in model.parameters())


def saved_bytes_by_layer(values: dict, n: int, checkpointing: bool) -> dict[object, int]:
    """Unique storages (parameters excluded) saved for backward in a bf16 training forward, by the decoder
    layer that saved them first ('embed' before the first, 'final' for the final norm)."""
    torch.manual_seed(0)
    model = _hf_model(values).to(torch.bfloat16).train()
    model.config.use_cache = False
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    where: list[object] = ["embed"]
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(lambda *_, i=i: where.__setitem__(0, i))
    model.model.norm.register_forward_pre_hook(lambda *_: where.__setitem__(0, "final"))
    ids = torch.randint(0, values["vocab_size"], (1, n))
    _, found = saved_bytes(lambda: model.model(input_ids=ids, position_ids=torch.arange(n)[None], use_cache=False),
                           label=lambda: where[0], exclude={p.untyped_storage().data_ptr() for p in model.parameters()})
    return found


@pytest.mark.parametrize("checkpointing", [False, True], ids=["none", "layers"])
def test_saved_activations_match_a_transformers_llama(checkpointing: bool) -> None:
    """Per decoder layer to the byte: two transformers RMSNorms, the q/k/v input, q, k, v, the attention
    output and lse, the MLP input and SwiGLU's four hidden tensors; checkpointed, only the layer's input."""
    n = 256
    spec = spec_from_hf_config(SMALL, n, activation_checkpointing=checkpointing)
    found = saved_bytes_by_layer(SMALL, n, checkpointing)
    per_layer = checkpoint_saved_per_token(spec, 2) if checkpointing else layer_saved_per_token(spec, 2, False)
    assert per_layer == (128 if checkpointing else 2200)  # the formula's own numbers for this shape
    for layer in (1, 2):  # layer 0 also saves the shared cos/sin
        assert found[layer] == n * per_layer
    # checkpointed layers take cos/sin as inputs the checkpoint keeps alive without packing them
    unpacked = 2 * spec.config.head_dim * 2 if checkpointing else 0
    shared = shared_saved_per_token(spec, 2, False) - unpacked
    assert sum(found.values()) == n * (SMALL["num_hidden_layers"] * per_layer + shared)


def test_hf_recipe_is_planned_from_its_config() -> None:
    job = job_from_config(compose("hf_llama_128k"), "hf_llama_128k")
    c = job.model.config
    assert job.model.hf and (c.n_embd, c.n_layer, c.n_head, c.kv_heads, c.mlp_hidden, c.vocab_size) == (
        2048, 16, 32, 8, 8192, 128256)
    assert c.tie_weights and job.seq_len == 131072
    assert job.recipe_layout == Layout(1, 1, 2, 3, True)


def test_tiled_loss_removes_the_full_logits() -> None:
    """At the end of forward the fused loss over one tile of all tokens (``tiled_loss=False``) holds the final
    hidden states, dH, the fp32 dW and the whole fp32 logits, logits - lse and their exp; tiled, one tile's."""
    n, e, v = 131072, 2048, 128256
    tiled = long_context_job(spec_from_hf_config(LLAMA_1B, n), n)
    full = dataclasses.replace(tiled, tiled_loss=False)
    layout = Layout(1, 1, 1, 3, True)
    bucket = 2e8 * 2  # ZeRO-3's gradient bucket, allocated with the engine; one GPU gathers no parameters
    assert estimate_memory(full, layout).phase == "loss"
    rows = 17 * n  # each tile's logsumexp, picked logit, clamped labels and mask
    assert estimate_memory(full, layout).transient == 2 * n * e * 2 + v * e * 4 + 3 * 4 * n * v + rows + bucket
    assert estimate_memory(tiled, layout).total < estimate_memory(full, layout).total - 0.9 * n * v * 12


@pytest.mark.parametrize("gpu", ["h100", "h200"])
def test_longest_sequence_is_the_longest_that_fits(gpu: str) -> None:
    memory, host = GPUS[gpu].memory_bytes, 128e9
    fit = longest_sequence(LLAMA_1B, memory, host, gpu)
    assert fit.seq_len % SEQ_STEP == 0 and fit.seq_len >= 786432
    assert fit.gpu_bytes <= 0.9 * memory and fit.host_bytes <= 0.9 * host
    assert f"seq_len={fit.seq_len}" in fit.command and fit.command.startswith("ring-train model=hf ")
    # the command composes to the planned shape and switches
    job = job_from_config(compose(None, fit.overrides), "longest")
    assert job.model.hf and job.seq_len == fit.seq_len and job.model.config.n_layer == 16
    assert job.model.config.offload_checkpoints == ("model.offload_checkpoints=true" in fit.command)
    assert job.tiled_loss and job.offload_optimizer == ("strategy.offload_optimizer=true" in fit.command)
    # one step longer does not fit, on the GPU or the host, with any offload choice
    spec = spec_from_hf_config(LLAMA_1B, fit.seq_len)
    for choice in OFFLOAD_CHOICES:
        longer = estimate_memory(long_context_job(spec, fit.seq_len + SEQ_STEP, *choice), ONE_GPU)
        assert longer.total > 0.9 * memory or longer.host + HOST_PROCESS_BYTES > 0.9 * host, choice
    bigger = longest_sequence(LLAMA_1B, memory * 1.2, host * 1.2, gpu)
    assert bigger.seq_len > fit.seq_len


def test_8b_on_a_128_gb_host_is_limited_by_host_memory() -> None:
    with pytest.raises(ValueError, match=r"host is short by \d+\.\d GB"):
        longest_sequence(LLAMA_8B, GPUS["h100"].memory_bytes, 128e9, "h100")
    assert longest_sequence(LLAMA_8B, GPUS["h100"].memory_bytes, 512e9, "h100").seq_len >= SEQ_STEP
    with pytest.raises(ValueError, match="host_memory_bytes=nan must be a positive number"):
        longest_sequence(LLAMA_1B, 80e9, float("nan"))


def test_docs_table_of_the_longest_sequences_is_the_functions_output() -> None:
    text = (REPO / "docs" / "planner.md").read_text()
    for name, values in (("Llama-3.2-1B", LLAMA_1B),):
        for gpu in ("h100", "h200"):
            fit = longest_sequence(values, GPUS[gpu].memory_bytes, 128e9, gpu)
            row = (f"| {name} | {gpu.upper()} | {fit.seq_len:,} | {fit.gpu_bytes / 1e9:.1f} | "
                   f"{fit.host_bytes / 1e9:.1f} | {fit.step_seconds:.0f} | {fit.limit} |")
            assert row in text, row
    for gpu in ("H100", "H200"):
        assert re.search(rf"\| Llama-3.1-8B \| {gpu} \| none \|", text)
