"""Every code example of the seed reference guide runs against ring_plugin (import line changed),
in one process and under a multi-process launch (gloo world of 2 and 4), checked against the
single-device computation of the same pattern; every class the seed list of implementations names
imports from ring_plugin and works as described there, or is in the migration table."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import ring_plugin
from ring_plugin import (
    BaseRingAttention,
    BlockSparseRingDilatedAttentionHilbertPostPattern,
    BlockSparseRingMultiheadDilatedAttention,
    DilatedAttention,
    DistributedRingAttention,
    EnterpriseDistributedDilatedAttention,
    HilbertBlockSparseAttention,
    HilbertRingAttention,
    RingAttentionConfig,
    RingAttentionFunction,
    RingBlockSparseAttention,
    RingCommunicationStats,
    RingDilatedAttentionCorrect,
    RingDilatedAttentionHilbertGPUOptimized,
    RingDilatedAttentionProduction,
    RingDilatedAttentionSDPA,
    RingDistributedDilatedAttention,
    StableRingAccumulator,
    StandardizedRingConfig,
    StandardRingAttention,
    create_ring_attention,
    hilbert_permutation,
    inverse_permutation,
    reference_attention,
    shard_sequence,
)
from ring_plugin.comm.collectives import all_gather_sequence
from ring_plugin.ops.kernels import KERNELS
from ring_plugin.testing import run_in_process_group

from .pattern_world import oracle_mask

REPO = Path(__file__).resolve().parents[1]


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
        mask = oracle_mask(layer, n, q.shape[2]).bool()
        return reference_attention(q, k, v, causal=True, allowed=mask, compute_dtype=torch.float32)
    if name == "preset":
        return reference_attention(q, k, v, causal=True, compute_dtype=torch.float32)
    c = layer.config
    single = DilatedAttention(c.segment_lengths, c.dilation_rates)
    if name == "hilbert":
        perm = hilbert_permutation(256, 256)
        return single(q[:, perm], k[:, perm], v[:, perm], is_causal=True)[:, inverse_permutation(perm)]
    return single(q, k, v, is_causal=True)


class UserRing(BaseRingAttention):
    """A user's own ring variant, the way the seed's base class is used: subclass it and implement the
    attention step; config, validation on every rank and ring resolution come from the base. This one
    all-gathers K/V and merges one rank's keys at a time with StableRingAccumulator (non-causal)."""

    variant = "user_ring"

    def _attend(self, q, k, v, causal, ring):
        if causal:
            raise ValueError("UserRing computes non-causal attention only")
        qt = q.transpose(1, 2)
        kt, vt = (all_gather_sequence(t, 1, ring.layout, ring.group).transpose(1, 2) for t in (k, v))
        acc = StableRingAccumulator(qt.shape, device=q.device, dtype=q.dtype)
        for kb, vb in zip(kt.chunk(ring.world_size, 2), vt.chunk(ring.world_size, 2)):
            acc.update(*KERNELS["math"].forward(qt, kb, vb, False, self.scale_for(q.shape[-1])))
        return acc.get_output().transpose(1, 2)


def utility_errors(rank: int, world: int) -> dict[str, float]:
    """The seed's utilities used as it describes them, against the oracle (forward and gradients)."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 16 * world, 4, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(*ref_in)
    ref.sum().backward()
    mine = [shard_sequence(t, 1, "contiguous", rank, world).requires_grad_() for t in (q, k, v)]

    def error(out: torch.Tensor) -> float:
        out.sum().backward()
        errs = [(a - shard_sequence(b.detach(), 1, "contiguous", rank, world)).abs().max().item()
                for a, b in zip([out, *(t.grad for t in mine)], [ref, *(t.grad for t in ref_in)])]
        for t in mine:
            t.grad = None
        return max(errs)

    errors = {"BaseRingAttention": error(UserRing(layout="contiguous")(*mine))}
    # The engine's autograd function on (batch, heads, n_local, head_dim) shards and a layer's call.
    layer = StandardRingAttention(layout="contiguous")
    call = layer.ring_call(mine[0], mine[1], False, layer.resolve_ring())
    qt, kt, vt = (t.transpose(1, 2) for t in mine)
    errors["RingAttentionFunction"] = error(RingAttentionFunction.apply(qt, kt.contiguous(), vt.contiguous(),
                                                                        call).transpose(1, 2))
    # .stats: the dense forward sends K and V (fp64) to the next rank world - 1 times.
    attn = DistributedRingAttention(layout="contiguous")
    attn(*mine)
    assert isinstance(attn.stats, RingCommunicationStats)
    errors["RingCommunicationStats"] = abs(attn.stats.bytes_sent - (world - 1) * 2 * mine[1].numel() * 8)
    return errors


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
    errors.update(utility_errors(rank, world))
    if world > 1:
        dist.barrier()
    return errors


SINGLE = ["standard", "distributed", "hilbert", "block_sparse", "correct", "sdpa", "config"]


def test_examples_in_one_process() -> None:
    errors = run_examples(0, 1, SINGLE)
    assert set(errors) == {*SINGLE, "BaseRingAttention", "RingAttentionFunction", "RingCommunicationStats"}
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
    results = run_in_process_group(run_examples, world, names, timeout=200, reuse=True)
    for rank_errors in results:
        assert {"BaseRingAttention", "RingAttentionFunction", "RingCommunicationStats"} <= set(rank_errors)
        assert max(rank_errors.values()) < 1e-5, rank_errors


@pytest.mark.unit
def test_migration_names() -> None:
    assert RingDilatedAttentionProduction is StandardRingAttention
    assert issubclass(RingDilatedAttentionHilbertGPUOptimized, HilbertRingAttention)
    assert RingDistributedDilatedAttention is DistributedRingAttention
    assert EnterpriseDistributedDilatedAttention is DistributedRingAttention


# The seed list of implementations: its 14 classes, and its supporting classes.
SEED_IMPLEMENTATIONS = [
    "StandardRingAttention", "HilbertRingAttention", "DistributedRingAttention", "BlockSparseRingAttention",
    "RingDilatedAttentionHilbertGPUOptimized", "RingDilatedAttentionCorrect", "RingDilatedAttentionSDPA",
    "EnterpriseDistributedDilatedAttention", "RingDistributedDilatedAttention", "BlockSparseRingDilatedAttention",
    "BlockSparseRingDilatedAttentionFixed", "BlockSparseRingDilatedAttentionHilbertPostPattern",
    "BlockSparseRingMultiheadDilatedAttention", "BlockSparseRingDistributedDilatedAttention",
]
SEED_UTILITIES = ["BaseRingAttention", "RingAttentionConfig", "StandardizedRingConfig", "RingAttentionFunction",
                  "StableRingAccumulator", "RingCommunicationStats", "create_ring_attention"]
SEED_INTERNALS = ["RingCommunicationMixin", "AsyncRingCommunicator", "RingAttentionState", "HilbertAttentionMixin",
                  "StandardizedRingAttentionMixin"]


@pytest.mark.unit
def test_every_seed_name_imports_or_is_in_the_migration_table() -> None:
    for name in SEED_IMPLEMENTATIONS + SEED_UTILITIES:
        assert name in ring_plugin.__all__ and getattr(ring_plugin, name).__doc__, name
    assert set(ring_plugin.compat.__all__) <= set(ring_plugin.__all__)
    table = (REPO / "docs" / "variants.md").read_text().split("## Migration", 1)[1]
    for name in SEED_INTERNALS:
        assert not hasattr(ring_plugin, name)
        assert f"| `{name}` |" in table, name


@pytest.mark.unit
def test_standardized_config_is_the_config() -> None:
    config = StandardizedRingConfig(segment_lengths=[8, 16], dilation_rates=[1, 2], ring_size=1)
    assert StandardizedRingConfig is RingAttentionConfig
    layer = create_ring_attention("standard", config=config)
    x = torch.randn(1, 16, 2, 8)
    want = DilatedAttention([8, 16], [1, 2])(x, x, x, is_causal=True)
    assert (layer(x, x, x, is_causal=True) - want).abs().max() < 1e-6
    with pytest.raises(ValueError, match="dilation_rates"):
        StandardizedRingConfig(segment_lengths=[8, 16], dilation_rates=[1])


@pytest.mark.unit
def test_stable_accumulator_merges_blocks_into_one_softmax() -> None:
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 3, 12, 8) for _ in range(3))
    want = reference_attention(*(t.transpose(1, 2) for t in (q, k, v)), scale=0.4).transpose(1, 2)
    for dtype in (torch.float32, torch.bfloat16):
        acc = StableRingAccumulator(q.shape, dtype=dtype)
        for part in (slice(0, 5), slice(5, 7), slice(7, 12)):
            acc.update(*KERNELS["math"].forward(q.to(dtype), k[:, :, part].to(dtype), v[:, :, part].to(dtype),
                                                False, 0.4))
        assert acc.output.dtype == torch.float32 and acc.get_output().dtype == dtype
        tol = 1e-6 if dtype == torch.float32 else 3e-2
        assert (acc.get_output().float() - want).abs().max() < tol
    empty = StableRingAccumulator((1, 2, 4))  # no block covers any row: 0, not NaN
    empty.update(torch.zeros(1, 2, 4), torch.full((1, 2), float("-inf")))
    assert torch.equal(empty.get_output(), torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match="must match the accumulator"):
        empty.update(torch.zeros(1, 3, 4), torch.zeros(1, 3))


@pytest.mark.unit
def test_hilbert_post_pattern_and_its_multihead_form() -> None:
    assert BlockSparseRingDilatedAttentionHilbertPostPattern is HilbertBlockSparseAttention
    kw = dict(grid=(4, 4), block_size=4, sparsity_ratio=0.5, pattern_type="local")
    mha = BlockSparseRingMultiheadDilatedAttention(16, 2, use_hilbert=True, **kw)
    assert isinstance(mha, BlockSparseRingMultiheadDilatedAttention)
    assert isinstance(mha.attention, HilbertBlockSparseAttention)
    x = torch.randn(2, 16, 16)
    out, _ = mha(x, x, x, is_causal=True)
    q, k, v = (t.view(2, 16, 2, 8) for t in F.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, -1))
    perm = hilbert_permutation(4, 4)
    mask = oracle_mask(mha.attention, 16, 2).bool()
    att = reference_attention(q[:, perm], k[:, perm], v[:, perm], causal=True, allowed=mask)
    att = att[:, inverse_permutation(perm)]
    assert (out - mha.out_proj(att.reshape(2, 16, 16))).abs().max() < 1e-5
    with pytest.raises(TypeError, match="fixes the attention variant"):
        BlockSparseRingMultiheadDilatedAttention(16, 2, attention="standard")
