"""Every code example of the seed reference guide runs against ring_plugin (import line changed),
in one process and under a multi-process launch (gloo world of 2 and 4), checked against the
single-device computation of the same pattern."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from ring_plugin import (
    DilatedAttention,
    DistributedRingAttention,
    EnterpriseDistributedDilatedAttention,
    HilbertRingAttention,
    RingAttentionConfig,
    RingBlockSparseAttention,
    RingDilatedAttentionCorrect,
    RingDilatedAttentionHilbertGPUOptimized,
    RingDilatedAttentionProduction,
    RingDilatedAttentionSDPA,
    RingDistributedDilatedAttention,
    StandardRingAttention,
    create_ring_attention,
    hilbert_permutation,
    inverse_permutation,
    reference_attention,
    shard_sequence,
)
from ring_plugin.testing import run_in_process_group


def seed_examples(world_size: int) -> dict[str, torch.nn.Module]:
    """The guide's examples, as written (only the import line differs)."""
    ex: dict[str, torch.nn.Module] = {}
    ex["standard"] = StandardRingAttention(
        segment_lengths=[2048, 4096, 8192], dilation_rates=[1, 2, 4], dropout=0.0, ring_size=world_size
    )
    ex["distributed"] = DistributedRingAttention(
        segment_lengths=[2048, 4096], dilation_rates=[1, 2], dropout=0.0, ring_size=world_size,
        use_deepspeed=True, enable_monitoring=True,
    )
    ex["hilbert"] = HilbertRingAttention(
        segment_lengths=[2048, 4096], dilation_rates=[1, 2], dropout=0.0, ring_size=world_size, hilbert_level=8
    )
    ex["block_sparse"] = RingBlockSparseAttention(
        segment_lengths=[2048, 4096], dilation_rates=[1, 2], sparsity_ratio=0.9, pattern_type="dilated_sparse"
    )
    ex["correct"] = RingDilatedAttentionCorrect(
        segment_lengths=[2048, 4096], dilation_rates=[1, 2], dropout=0.0, ring_size=world_size
    )
    ex["sdpa"] = RingDilatedAttentionSDPA(
        segment_lengths=[2048, 4096], dilation_rates=[1, 2], dropout=0.0, ring_size=world_size
    )
    ex["preset"] = create_ring_attention("standard", world_size=4)
    config = RingAttentionConfig(
        segment_lengths=[2048, 4096, 8192], dilation_rates=[1, 2, 4], dropout=0.1, ring_size=world_size
    )
    ex["config"] = create_ring_attention("distributed", config=config)
    return ex


# name -> (global length, pattern reference); lengths are the smallest the examples' segments allow.
LENGTHS = {"standard": 8192, "distributed": 4096, "hilbert": 65536, "block_sparse": 4096, "correct": 4096,
           "sdpa": 4096, "preset": 4096, "config": 8192}


def _reference(name: str, layer, q, k, v) -> torch.Tensor:
    n = q.shape[1]
    if name == "block_sparse":
        mask = layer.pattern.counts(n, q.shape[2]).bool()
        return reference_attention(q, k, v, causal=True, allowed=mask, compute_dtype=torch.float32)
    if name == "preset":
        return reference_attention(q, k, v, causal=True, compute_dtype=torch.float32)
    c = layer.config
    single = DilatedAttention(c.segment_lengths, c.dilation_rates)
    if name == "hilbert":
        perm = hilbert_permutation(256, 256)
        return single(q[:, perm], k[:, perm], v[:, perm], is_causal=True)[:, inverse_permutation(perm)]
    return single(q, k, v, is_causal=True)


def run_examples(rank: int, world: int, names: list[str]) -> dict[str, float]:
    layers = seed_examples(world)
    errors: dict[str, float] = {}
    for name in names:
        layer = layers[name].eval()  # the config example asks for dropout=0.1: exact only in eval
        n = LENGTHS[name]
        gen = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(1, n, 2, 8, generator=gen) for _ in range(3))
        want = _reference(name, layer, q, k, v)
        mine = [shard_sequence(t, 1, "contiguous", rank, world) for t in (q, k, v)]
        got = layer(*mine, is_causal=True)
        errors[name] = (got - shard_sequence(want, 1, "contiguous", rank, world)).abs().max().item()
    if world > 1:
        dist.barrier()
    return errors


SINGLE = ["standard", "distributed", "hilbert", "block_sparse", "correct", "sdpa", "config"]


def test_examples_in_one_process() -> None:
    errors = run_examples(0, 1, SINGLE)
    assert max(errors.values()) < 1e-5, errors
    # The preset asks for a ring of 4: in one process that is a clear error, not a hang.
    x = torch.randn(1, 64, 2, 8)
    with pytest.raises(ValueError, match="ring_size=4 needs torch.distributed"):
        seed_examples(1)["preset"](x, x, x)
    with pytest.raises(ValueError, match="dropout=0.1"):
        seed_examples(1)["config"].train()(x, x, x)


@pytest.mark.parametrize("world", [2, 4])
def test_examples_multi_process(world: int) -> None:
    names = [n for n in LENGTHS if n != "preset" or world == 4]
    results = run_in_process_group(run_examples, world, names, timeout=200)
    for rank_errors in results:
        assert max(rank_errors.values()) < 1e-5, rank_errors


def test_migration_names() -> None:
    assert RingDilatedAttentionProduction is StandardRingAttention
    assert issubclass(RingDilatedAttentionHilbertGPUOptimized, HilbertRingAttention)
    assert RingDistributedDilatedAttention is DistributedRingAttention
    assert EnterpriseDistributedDilatedAttention is DistributedRingAttention


def test_multihead_alias_uses_block_sparse() -> None:
    from ring_plugin import BlockSparseRingMultiheadDilatedAttention

    mha = BlockSparseRingMultiheadDilatedAttention(16, 2, block_size=4, sparsity_ratio=0.5, pattern_type="local")
    assert isinstance(mha.attention, RingBlockSparseAttention)
    x = torch.randn(2, 16, 16)
    out, _ = mha(x, x, x)
    q, k, v = (t.view(2, 16, 2, 8) for t in mha._project(x, x, x))
    att = reference_attention(q, k, v, allowed=mha.attention.pattern.counts(16, 2).bool())
    assert (out - mha.out_proj(att.reshape(2, 16, 16))).abs().max() < 1e-5
