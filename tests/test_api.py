"""Single-process checks of the public API: config, factory, names, layouts and kernels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ring_plugin
from ring_plugin import (
    BlockSparseRingMultiheadDilatedAttention,
    HilbertBlockSparseAttention,
    HilbertRingAttention,
    HilbertRingMultiheadAttention,
    RingAttentionConfig,
    RingBlockSparseAttention,
    RingMultiheadAttention,
    RingMultiheadDilatedAttention,
    StandardRingAttention,
    compat,
    create_ring_attention,
    global_positions,
    reference_attention,
    shard_sequence,
    unshard_sequence,
)
from ring_plugin.attention.plan import Block, plan_dense_step
from ring_plugin.ops.kernels import KERNELS, select_kernel
from ring_plugin.ops.merge import merge_into
from tests.pattern_world import oracle


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(segment_lengths=[4, 8], dilation_rates=[1]), "same length"),
        (dict(segment_lengths=[4]), "give both or neither"),
        (dict(segment_lengths=[0], dilation_rates=[1]), "positive integers"),
        (dict(segment_lengths=[4], dilation_rates=[-2]), "positive integers"),
        (dict(dropout=1.5), "dropout"),
        (dict(ring_size=0), "ring_size"),
        (dict(layout="spiral"), "contiguous, zigzag"),
        (dict(backend="tpu"), "valid: auto"),
        (dict(sparsity_ratio=1.0), "sparsity_ratio"),
        (dict(pattern_type="diagonal"), "pattern_type"),
        (dict(grid=(4,)), "grid"),
        (dict(comm_timeout=-1), "comm_timeout"),
    ],
)
def test_config_rejects_bad_values_naming_the_argument(kwargs, word):
    with pytest.raises((ValueError, TypeError), match=word):
        RingAttentionConfig(**kwargs)


def test_factory_names_and_errors():
    assert {"standard", "sdpa", "correct", "distributed", "auto"} <= set(ring_plugin.available_ring_attention())
    with pytest.raises(ValueError, match="valid names: .*standard"):
        create_ring_attention("ringy")
    with pytest.raises(TypeError, match="unknown ring attention argument"):
        create_ring_attention("standard", not_a_field=1)
    # the seeds' preset form: world_size is the old word for ring_size
    attn = create_ring_attention("standard", world_size=4)
    assert isinstance(attn, StandardRingAttention) and attn.config.ring_size == 4
    cfg = RingAttentionConfig(dropout=0.1, ring_size=2)
    attn = create_ring_attention("distributed", config=cfg, layout="zigzag")
    assert (attn.config.dropout, attn.config.ring_size, attn.config.layout) == (0.1, 2, "zigzag")
    assert type(create_ring_attention("auto")) is StandardRingAttention


def test_old_names_resolve_to_standard():
    assert ring_plugin.RingDilatedAttention is StandardRingAttention
    assert ring_plugin.RingDilatedAttentionProduction is StandardRingAttention


def test_compat_names_are_the_library_classes_exported_at_the_top():
    for name in compat.__all__:
        assert getattr(ring_plugin, name) is getattr(compat, name), name
    assert compat.BlockSparseRingDilatedAttention is RingBlockSparseAttention
    assert compat.BlockSparseRingDilatedAttentionHilbertPostPattern is HilbertBlockSparseAttention
    assert compat.BaseRingAttention is ring_plugin.RingAttentionBase
    assert compat.RingCommunicationStats is ring_plugin.RingStats


@pytest.mark.parametrize(
    "cls, kwargs, variant",
    [
        (RingMultiheadDilatedAttention, {"segment_lengths": [8, 16], "dilation_rates": [1, 2]}, StandardRingAttention),
        (HilbertRingMultiheadAttention, {"grid": (4, 4), "segment_lengths": [8], "dilation_rates": [2]},
         HilbertRingAttention),
        (BlockSparseRingMultiheadDilatedAttention, {"block_size": 4, "sparsity_ratio": 0.5, "pattern_type": "local"},
         RingBlockSparseAttention),
        (BlockSparseRingMultiheadDilatedAttention, {"use_hilbert": True, "hilbert_level": 2, "block_size": 2,
                                                    "sparsity_ratio": 0.75, "pattern_type": "dilated_sparse"},
         HilbertBlockSparseAttention),
    ],
)
def test_multihead_names_fix_the_variant_and_match_the_oracle(cls, kwargs, variant):
    torch.manual_seed(4)
    mha = cls(16, 2, **kwargs)
    assert isinstance(mha, RingMultiheadAttention) and type(mha.attention) is variant
    x = torch.randn(2, 16, 16)
    out, _ = mha(x, x, x, is_causal=True)
    q, k, v = (t.view(2, 16, 2, 8) for t in F.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, -1))
    want = mha.out_proj(oracle(mha.attention, q, k, v, causal=True).reshape(2, 16, 16))
    assert (out - want).abs().max() < 1e-5
    with pytest.raises(TypeError, match="fixes the attention variant"):
        cls(16, 2, attention="standard")


def test_ring_size_without_a_process_group_is_refused():
    attn = create_ring_attention("standard", ring_size=2)
    x = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match="ring_size=2 needs torch.distributed"):
        attn(x, x, x)


def test_dropout_in_training_is_refused_not_ignored():
    attn = create_ring_attention("standard", dropout=0.1)
    x = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match="dropout=0.1"):
        attn(x, x, x)
    attn.eval()  # dropout is inactive in eval: the exact result
    torch.testing.assert_close(attn(x, x, x), reference_attention(x, x, x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("layout, world", [("contiguous", 1), ("contiguous", 4), ("zigzag", 2), ("zigzag", 4)])
def test_shard_unshard_round_trip_and_positions(layout, world):
    x = torch.arange(2 * 24 * 3).view(2, 24, 3)
    shards = [shard_sequence(x, 1, layout, r, world) for r in range(world)]
    assert torch.equal(unshard_sequence(shards, 1, layout), x)
    for r, shard in enumerate(shards):
        pos = global_positions(shard.shape[1], layout, r, world)
        assert torch.equal(shard, x[:, pos])


def test_zigzag_holds_chunks_r_and_2k_minus_1_minus_r():
    assert global_positions(4, "zigzag", 1, 4).tolist() == [2, 3, 12, 13]
    with pytest.raises(ValueError, match="multiple of 8"):
        shard_sequence(torch.zeros(1, 12), 1, "zigzag", 0, 4)


def test_zigzag_causal_plan_halves_the_off_diagonal_work():
    # rank 1 of 2 holds chunks (1, 2); rank 0 holds (0, 3)
    assert plan_dense_step((1, 2), (1, 2), 8, True) == [Block(slice(0, 16), slice(0, 16), True)]
    assert plan_dense_step((1, 2), (0, 3), 8, True) == [Block(slice(0, 16), slice(0, 8), False)]
    assert plan_dense_step((0, 3), (1, 2), 8, True) == [Block(slice(8, 16), slice(0, 16), False)]
    # contiguous: a later rank's keys are fully masked, so the step has no block at all
    assert plan_dense_step((0,), (1,), 8, True) == []


def test_cpu_flash_and_math_kernels_agree_forward_and_backward():
    torch.manual_seed(0)
    q, k, v, g = (torch.randn(2, 3, 16, 8) for _ in range(4))
    for causal in (False, True):
        o1, l1 = KERNELS["cpu_flash"].forward(q, k, v, causal, 0.3)
        o2, l2 = KERNELS["math"].forward(q, k, v, causal, 0.3)
        torch.testing.assert_close(o1, o2, atol=1e-5, rtol=0)
        torch.testing.assert_close(l1, l2, atol=1e-5, rtol=0)
        g1 = KERNELS["cpu_flash"].backward(g, q, k, v, o1, l1, causal, 0.3)
        g2 = KERNELS["math"].backward(g, q, k, v, o2, l2, causal, 0.3)
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_two_block_merge_equals_one_softmax():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    out = torch.zeros(1, 2, 8, 4)
    lse = torch.full((1, 2, 8), float("-inf"))
    for part in (slice(0, 5), slice(5, 16)):
        o, l = KERNELS["math"].forward(q, k[:, :, part], v[:, :, part], False, 0.5)
        merge_into(out, lse, o, l)
    o_all, l_all = KERNELS["math"].forward(q, k, v, False, 0.5)
    torch.testing.assert_close(out, o_all, atol=1e-6, rtol=0)
    torch.testing.assert_close(lse, l_all, atol=1e-6, rtol=0)


def test_merge_of_empty_rows_stays_zero_not_nan():
    out, lse = torch.zeros(1, 1, 2, 3), torch.full((1, 1, 2), float("-inf"))
    merge_into(out, lse, torch.zeros(1, 1, 2, 3), torch.full((1, 1, 2), float("-inf")))
    assert torch.equal(out, torch.zeros_like(out)) and torch.isinf(lse).all()


def test_kernel_selection_by_device_dtype_and_errors():
    cpu = torch.device("cpu")
    assert select_kernel("auto", cpu, torch.float32, 64).name == "cpu_flash"
    assert select_kernel("auto", cpu, torch.float64, 64).name == "math"
    with pytest.raises(ValueError, match="needs CUDA"):
        select_kernel("cudnn", cpu, torch.bfloat16, 64)
    with pytest.raises(ValueError, match="valid: auto"):
        select_kernel("triton", cpu, torch.float32, 64)


def test_single_process_module_matches_oracle_with_gqa_and_fp64():
    torch.manual_seed(2)
    q = torch.randn(2, 20, 6, 8, dtype=torch.float64)
    k, v = (torch.randn(2, 20, 3, 8, dtype=torch.float64) for _ in range(2))
    for name in ("standard", "sdpa", "distributed", "correct"):
        out = create_ring_attention(name, oracle_dtype="float64")(q, k, v, is_causal=True)
        torch.testing.assert_close(out, reference_attention(q, k, v, causal=True), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "q_shape, k_shape, dtypes, word",
    [
        ((1, 8, 4, 8), (1, 6, 4, 8), (torch.float32,) * 2, "must agree in batch, n_local"),
        ((1, 8, 4, 8), (1, 8, 3, 8), (torch.float32,) * 2, "must divide q heads"),
        ((1, 8, 4), (1, 8, 4, 8), (torch.float32,) * 2, "must be 4-D"),
        ((1, 8, 4, 8), (1, 8, 4, 8), (torch.float32, torch.bfloat16), "share one dtype"),
    ],
)
def test_bad_inputs_raise_clear_errors(q_shape, k_shape, dtypes, word):
    q = torch.randn(*q_shape, dtype=dtypes[0])
    k = torch.randn(*k_shape, dtype=dtypes[1])
    with pytest.raises(ValueError, match=word):
        create_ring_attention("standard")(q, k, k)


def test_predecessor_keywords_are_translated_or_warned():
    from ring_plugin import RingBlockSparseAttention, StandardRingAttention

    assert StandardRingAttention(enable_monitoring=True).config.collect_stats is True
    assert StandardRingAttention(enable_monitoring=True).collects_stats
    assert not StandardRingAttention().collects_stats
    with pytest.warns(UserWarning, match="use_deepspeed=True has no effect: DeepSpeed is chosen by the strategy"):
        StandardRingAttention(use_deepspeed=True)
    with pytest.warns(UserWarning, match=r"segment_lengths=\[64\] / dilation_rates=\[1\] do not change"):
        RingBlockSparseAttention(segment_lengths=[64], dilation_rates=[1])
