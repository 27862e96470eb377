"""The planner's memory terms for a transformers Llama with the long-context switches, against what the real
code keeps alive on the CPU (``benchmarks/live_bytes.py``: every storage an operator creates, until freed),
byte for byte: the offloaded checkpoints, what one decoder layer keeps for its recompute, what the forward
leaves for backward, the fused loss' buffers and its tiles' working set, the RMSNorm backward's
temporaries, AdamW's step temporaries; and the host model's pinned rounding and DeepSpeed's sub-groups."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

from ring_plugin.planner.hf_models import spec_from_hf_config
from ring_plugin.planner.memory import (
    checkpoint_saved_per_token,
    layer_saved_per_token,
    norm_backward_per_token,
    shared_saved_per_token,
    tiled_loss_bytes,
)
from ring_plugin.planner.model_states import optimizer_sub_groups, param_tensors, pinned_bytes
from ring_plugin.planner.workload import DEEPSPEED_DEFAULT_ZERO, LIGHTNING_ZERO, ModelSpec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from live_bytes import LiveBytes  # noqa: E402

transformers = pytest.importorskip("transformers")
probe = pytest.importorskip("probe_hf_memory")

# A small Llama (grouped-query heads, tied head) with the bench's switches: MLP tiles of 32, loss tiles of LOSS_TILES.
SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
N, MLP_TILE, A = 256, 32, 2  # tokens, MLP tile, bytes of a bf16 activation
# 64: tile i+1's exp beside tile i's p and p_low peaks; 16: a tile's weight-gradient product (vocab x hidden) peaks
LOSS_TILES = (64, 16)


@pytest.fixture(scope="module", params=LOSS_TILES, ids=[f"loss_tile={t}" for t in LOSS_TILES])
def measured(request: pytest.FixtureRequest) -> tuple[int, dict]:
    model = probe.build(SHAPE, N, MLP_TILE, request.param)
    return request.param, probe.measure(model, N)


def _spec() -> ModelSpec:
    return spec_from_hf_config(SHAPE, N, activation_checkpointing=True, mlp_tile_tokens=MLP_TILE,
                               offload_checkpoints=True)


def test_offloaded_checkpoints_are_each_layers_input(measured: tuple[int, dict]) -> None:
    _, found = measured
    assert found["host"] == SHAPE["num_hidden_layers"] * N * checkpoint_saved_per_token(_spec(), A)


def test_a_layer_keeps_what_the_planner_recomputes(measured: tuple[int, dict]) -> None:
    """Two RMSNorms (fp32 input, rstd, bf16 copy), the q/k/v input, q, k, v, the attention output and lse, the
    MLP input (its tiles keep views of it); the output projection reads the attention output in place."""
    _, found = measured
    assert found["layer_kept"] == N * layer_saved_per_token(_spec(), A, fused_norm=False)


def test_forward_leaves_the_final_norm_and_the_loss_buffers(measured: tuple[int, dict]) -> None:
    """After the forward: the final norm's saved tensors and the rotary tables (the token ids are the batch's,
    not counted), and the fused loss' dH (bf16) and dW (fp32, vocab x hidden)."""
    _, found = measured
    e, v = SHAPE["hidden_size"], SHAPE["vocab_size"]
    ids = 8
    assert found["forward_left"]["forward"] == N * (shared_saved_per_token(_spec(), A, fused_norm=False) - ids)
    assert found["forward_left"]["loss"] == N * e * A + v * e * 4


def test_loss_peak_is_the_tiles_working_set(measured: tuple[int, dict]) -> None:
    """The highest total while the head and loss run: what the forward left, the final hidden states, dH, dW and
    :func:`tiled_loss_bytes` (CPU: the weight-gradient product is made in bf16 first), to within the fp32
    loss accumulator (4 bytes)."""
    chunk, found = measured
    e, v = SHAPE["hidden_size"], SHAPE["vocab_size"]
    before = found["forward_left"]["forward"] + N * e * A  # + the final hidden states the loss reads
    predicted = before + N * e * A + v * e * 4 + tiled_loss_bytes(N, chunk, v, e, A, device="cpu")
    assert 0 <= found["loss_peak"] - predicted <= 4


def test_which_loss_point_peaks() -> None:
    """The tile carried into the next one: 1.5 tiles of fp32 logits more than one tile's three fp32 arrays."""
    v, e, chunk = 128256, 2048, 16384
    one = 3 * 4 * chunk * v
    assert tiled_loss_bytes(chunk, chunk, v, e, 2) == one + 17 * chunk  # one tile: logits, logits - lse, exp
    assert tiled_loss_bytes(16 * chunk, chunk, v, e, 2) == (4 + 2 + 12) * chunk * v + 17 * chunk


def test_rmsnorm_backward_temporaries() -> None:
    """transformers' RMSNorm backward holds five fp32 tensors of its width at once; by then its bf16 copy (and
    rstd) are freed. Within 8 bytes a token (the weight's gradient and one-value-a-token vectors)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    e = SHAPE["hidden_size"]
    norm = LlamaRMSNorm(e).to(torch.bfloat16)
    x = torch.randn(1, N, e, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(1, N, e, dtype=torch.bfloat16)
    live = LiveBytes([x, grad, *norm.parameters()])
    with live:
        y = norm(x)
        before = live.now
        with live.label("backward"):
            y.backward(grad)
    transient = live.peak_by_label["backward"] - before
    assert abs(transient - N * (norm_backward_per_token(_spec()) - e * A)) <= 8 * N


def test_adamw_step_makes_two_fp32_temporaries() -> None:
    """torch's AdamW on CPU tensors (single-tensor path): exp_avg_sq.sqrt() and its quotient, one group's size."""
    param = torch.nn.Parameter(torch.randn(100_000))
    param.grad = torch.randn_like(param)
    opt = torch.optim.AdamW([param], lr=1e-3)
    opt.step()  # creates the moments
    live = LiveBytes([param, param.grad, *(t for s in opt.state.values() for t in s.values()
                                           if isinstance(t, torch.Tensor))])
    with live:
        opt.step()
    assert live.peak == 2 * 4 * param.numel()


def test_pinned_bytes_round_to_a_power_of_two() -> None:
    assert [pinned_bytes(b) for b in (0, 1, 1024, 1025, 2**30, 2**30 + 1)] == [0, 1, 1024, 2048, 2**30, 2**31]


def test_sub_groups_follow_deepspeeds_cut() -> None:
    """DeepSpeed's own cutting rule (stage3's _create_fp16_sub_groups) on the parameters in the planner's order."""
    stage3 = pytest.importorskip("deepspeed.runtime.zero.stage3")
    values = dict(SHAPE, vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=64)
    spec = spec_from_hf_config(values, 1024)
    params = [types.SimpleNamespace(partition_numel=lambda n=n: n) for n, _ in param_tensors(spec)]
    fake = types.SimpleNamespace(sub_group_size=int(DEEPSPEED_DEFAULT_ZERO.sub_group_elements))
    theirs = [sum(p.partition_numel() for p in g)
              for g in stage3.DeepSpeedZeroOptimizer_Stage3._create_fp16_sub_groups(fake, params)]
    assert optimizer_sub_groups(spec, 1, DEEPSPEED_DEFAULT_ZERO) == theirs and len(theirs) == 2
    # ring-train: Lightning's sub_group_size (1e12) leaves the two AdamW groups (matrices, vectors) whole
    groups = optimizer_sub_groups(spec, 1, LIGHTNING_ZERO)
    assert len(groups) == 2 and sum(groups) == sum(n for n, _ in param_tensors(spec))
