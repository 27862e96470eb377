"""Block-sparse ring attention vs the oracle (dense attention with the block mask) at world 1, 2, 4."""

from __future__ import annotations

import pytest
import torch

from ring_plugin import RingAttentionConfig, RingBlockSparseAttention, create_ring_attention
from ring_plugin.patterns import block_mask
from tests.pattern_world import (
    block_sparse_cases,
    block_sparse_definition,
    case_name,
    tolerance,
    world_results,
    worst_errors,
)


@pytest.mark.parametrize("case", block_sparse_cases(), ids=case_name)
@pytest.mark.parametrize("world", [1, 2, 4])
def test_block_sparse_matches_oracle(world: int, case) -> None:
    errs = worst_errors(world, case)  # [out, dq, dk, dv]
    assert max(errs) <= tolerance(case), errs


@pytest.mark.parametrize("world", [2, 4])
def test_gathered_path_sends_exactly_the_rows_read(world: int) -> None:
    # Forward: K and V (2 heads x 4 dims) of exactly the rows other ranks' queries may read;
    # backward adds the dK/dV of the rows this rank read, in the kernel's dtype (bf16 stays bf16:
    # the default fp32 grad_comm_dtype is where they are summed, not what they travel in).
    totals = {"full": 0, "causal": 0, "causal_bf16": 0}
    for extra in world_results(world, "block_sparse")[1]:
        for name, (fwd, both, sent, read) in extra["gathered_bytes"].items():
            row_bytes = 2 * 2 * 4 * (2 if name.endswith("bf16") else 4)
            assert fwd == sent * row_bytes, (name, fwd, sent)
            assert both - fwd == read * row_bytes, (name, both, read)
            assert world > 2 or sent < 16  # less than the 16-row shard travels to the one peer
            totals[name] += sent
    assert totals["full"] > 0 and totals["causal"] > 0 and totals["causal_bf16"] == totals["causal"]


@pytest.mark.parametrize("world", [2, 4])
def test_bad_block_size_raises_on_every_rank(world: int) -> None:
    for extra in world_results(world, "block_sparse")[1]:
        assert "block_size=16 must divide" in extra["bad"]["block_size"]


@pytest.mark.unit
def test_oracle_definition_by_hand() -> None:
    """The oracle's masks (8 blocks), spelled out: keep = round((1 - sparsity) * 8) blocks per query block."""
    rows = {
        # keep 3: the diagonal and one block either side
        ("local", 0.625): ["11000000", "11100000", "01110000", "00111000",
                           "00011100", "00001110", "00000111", "00000011"],
        # keep 2: the diagonal and the next block
        ("local", 0.75): ["11000000", "01100000", "00110000", "00011000",
                          "00001100", "00000110", "00000011", "00000001"],
        # stride 4: blocks 0, 4 from block 0; 1, 5 from block 1; ...
        ("dilated_sparse", 0.75): ["10001000", "01000100", "00100010", "00010001",
                                   "10001000", "01000100", "00100010", "00010001"],
        # keep 4: block 0 is global, a window of 3 around the diagonal
        ("global_local", 0.5): ["11111111", "11100000", "11110000", "10111000",
                                "10011100", "10001110", "10000111", "10000011"],
    }
    for (pattern, sparsity), want in rows.items():
        got = ["".join(str(int(x)) for x in row) for row in block_sparse_definition(8, sparsity, pattern)]
        assert got == want, (pattern, sparsity, got)


@pytest.mark.unit
@pytest.mark.parametrize("pattern", ["local", "dilated_sparse", "global_local"])
def test_block_mask_is_the_definition(pattern: str) -> None:
    for n_blocks in (1, 2, 3, 7, 8, 16, 33, 64):
        for sparsity in (0.0, 0.3, 0.5, 0.625, 0.75, 0.9, 0.95):
            want = block_sparse_definition(n_blocks, sparsity, pattern)
            assert torch.equal(block_mask(n_blocks, sparsity, pattern), want), (pattern, n_blocks, sparsity)


@pytest.mark.unit
@pytest.mark.parametrize("pattern", ["local", "dilated_sparse", "global_local"])
@pytest.mark.parametrize("sparsity", [0.5, 0.75, 0.9])
def test_sparsity_is_fraction_skipped(pattern: str, sparsity: float) -> None:
    mask = block_mask(64, sparsity, pattern)
    skipped = 1.0 - mask.float().mean().item()
    assert abs(skipped - sparsity) < 0.08, skipped
    assert mask.diagonal().all()  # every block sees itself: no empty rows
    layer = create_ring_attention("block_sparse", block_size=2, sparsity_ratio=sparsity, pattern_type=pattern)
    assert isinstance(layer, RingBlockSparseAttention)
    assert torch.equal(layer.block_mask(128), mask)


@pytest.mark.unit
def test_uncovered_rows_are_zero_with_finite_gradients() -> None:
    # Every pattern keeps the diagonal, so uncovered rows come from dilation: rate 2 with one head
    # leaves odd positions uncovered; they output 0 (never NaN) and get zero gradient.
    from ring_plugin import DilatedAttention

    q = torch.randn(1, 16, 1, 4, requires_grad=True)
    out = DilatedAttention([8], [2])(q, q, q, is_causal=True)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
    assert out[:, 1::2].abs().max() == 0 and out[:, 0::2].abs().max() > 0


@pytest.mark.unit
@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5])
def test_bad_sparsity_raises(sparsity: float) -> None:
    with pytest.raises(ValueError, match="sparsity_ratio"):
        RingBlockSparseAttention(sparsity_ratio=sparsity)
    with pytest.raises(ValueError, match="sparsity_ratio"):
        RingAttentionConfig(sparsity_ratio=sparsity)


@pytest.mark.unit
def test_bad_pattern_raises() -> None:
    with pytest.raises(ValueError, match="pattern_type"):
        RingBlockSparseAttention(pattern_type="random")
