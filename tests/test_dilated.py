"""LongNet dilated attention: every variant vs the oracle at world 1, 2, 4, plus LongNet's own rule."""

from __future__ import annotations

import math

import pytest
import torch

from ring_plugin import (
    DilatedAttention,
    MultiheadDilatedAttention,
    RingAttentionConfig,
    StandardRingAttention,
    reference_attention,
)
from ring_plugin.patterns import DilatedPattern, ViewBlock
from tests.pattern_world import case_name, dilated_cases, tolerance, world_results, worst_errors


@pytest.mark.parametrize("case", dilated_cases(), ids=case_name)
@pytest.mark.parametrize("world", [1, 2, 4])
def test_dilated_matches_oracle(world: int, case) -> None:
    errs = worst_errors(world, case)  # [out, dq, dk, dv]
    assert max(errs) <= tolerance(case), errs


@pytest.mark.parametrize("world", [2, 4])
def test_local_segments_send_nothing_and_bad_lengths_raise(world: int) -> None:
    _, extra = world_results(world, "dilated")
    for rank_extra in extra:
        assert rank_extra["local_bytes"] == 0  # every segment fits in a shard: no ring traffic
        assert rank_extra["spanning_bytes"] > 0
        assert "multiple of every segment length" in rank_extra["bad"]["segment_length"]


@pytest.mark.parametrize("world", [2, 4])
def test_spanning_segment_sends_only_the_dilated_share(world: int) -> None:
    # One segment = the whole sequence, rate 4, 4 heads: head j keeps positions j mod 4, so each rank
    # packs a quarter of its K/V rows and sends them straight to each rank that reads them: forward
    # sends (ranks that read us) x (compact K + V); backward sends K/V again plus the compact dK/dV
    # back to their owners. The dense ring sends the whole K/V world - 1 times.
    _, extra = world_results(world, "dilated")
    shard_kv = 2 * (2 * 4 * 8 * 16) * 4  # K and V: batch 2, 4 heads, 8 rows, head_dim 16, fp32
    compact = shard_kv // 4
    for rank, rank_extra in enumerate(extra):
        got = rank_extra["sparse_bytes"]
        assert got["dense_full"][0] == (world - 1) * shard_kv
        assert got["dilated_full"] == [(world - 1) * compact, 3 * (world - 1) * compact]
        assert got["dilated_full"][0] * 4 == got["dense_full"][0]
        # Causal: only later ranks read our keys; we return dK/dV to every earlier rank we read.
        later, earlier = world - 1 - rank, rank
        assert got["dilated_causal"] == [later * compact, (2 * later + earlier) * compact]
        assert got["dense_causal"][0] == (world - 1) * shard_kv


def _longnet(q, k, v, segs, rates, causal):
    """LongNet written out: per pair, head offset and segment, then weights exp(lse_i)/sum exp(lse_j)."""
    b, n, h, d = q.shape
    outs, lses = [], []
    for w, r in zip(segs, rates):
        w = min(w, n)
        o_p = torch.zeros(b, n, h, d, dtype=torch.float64)
        l_p = torch.full((b, n, h), -math.inf, dtype=torch.float64)
        for j in range(h):
            for s in range(n // w):
                idx = torch.arange(s * w + j % r, (s + 1) * w, r)
                sc = q[:, idx, j] @ k[:, idx, j].transpose(-1, -2) * d**-0.5
                if causal:
                    sc = sc.masked_fill(torch.ones(len(idx), len(idx), dtype=torch.bool).triu(1), -math.inf)
                o_p[:, idx, j] = torch.softmax(sc, -1) @ v[:, idx, j]
                l_p[:, idx, j] = torch.logsumexp(sc, -1)
        outs.append(o_p)
        lses.append(l_p)
    weights = torch.softmax(torch.stack(lses), 0).nan_to_num(0.0)
    return sum(weights[i][..., None] * outs[i] for i in range(len(outs)))


@pytest.mark.unit
@pytest.mark.parametrize("segs,rates", [([8, 16, 48], [1, 2, 4]), ([12, 96], [1, 3]), ([16], [2])])
@pytest.mark.parametrize("causal", [False, True])
def test_oracle_is_longnets_rule(segs, rates, causal) -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 48, 5, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    want = _longnet(q, k, v, segs, rates, causal)
    got = reference_attention(q, k, v, causal=causal, allowed=DilatedPattern(segs, rates).counts(48, 5))
    assert (got - want).abs().max() < 1e-12
    # Gradients through the weights too (nothing detached).
    g = torch.randn_like(want)
    gw = torch.autograd.grad((want * g).sum(), (q, k, v))
    gg = torch.autograd.grad((got * g).sum(), (q, k, v))
    assert max((a - b).abs().max().item() for a, b in zip(gw, gg)) < 1e-10
    layer = DilatedAttention(segs, rates)
    assert (layer(q.float(), k.float(), v.float(), is_causal=causal).double() - want).abs().max() < 1e-5


@pytest.mark.unit
def test_multihead_dilated_matches_projections_plus_oracle() -> None:
    torch.manual_seed(1)
    mha = MultiheadDilatedAttention(24, 3, dilation_rates=[1, 2], segment_lengths=[8, 16])
    x = torch.randn(2, 16, 24)
    out, weights = mha(x, x, x, is_causal=True)
    assert weights is None
    q, k, v = (p(x).view(2, 16, 3, 8) for p in (mha.q_proj, mha.k_proj, mha.v_proj))
    att = reference_attention(q, k, v, causal=True, allowed=DilatedPattern([8, 16], [1, 2]).counts(16, 3))
    want = mha.out_proj(mha.norm(att.reshape(2, 16, 24)))
    assert (out - want).abs().max() < 1e-5


@pytest.mark.parametrize(
    "kw,word",
    [
        ({"segment_lengths": [8, 16], "dilation_rates": [1]}, "same length"),
        ({"segment_lengths": [8, 0], "dilation_rates": [1, 2]}, "positive integers"),
        ({"segment_lengths": [8, 16], "dilation_rates": [1, -2]}, "positive integers"),
        ({"segment_lengths": [8]}, "give both or neither"),
    ],
)
@pytest.mark.unit
def test_bad_dilated_configs_raise(kw, word) -> None:
    with pytest.raises(ValueError, match=word):
        StandardRingAttention(**kw)
    with pytest.raises(ValueError, match=word):
        RingAttentionConfig(**kw)


@pytest.mark.unit
def test_length_not_multiple_of_segment_raises() -> None:
    x = torch.randn(1, 24, 2, 4)
    with pytest.raises(ValueError, match=r"multiple of every segment length.*\[16\]"):
        DilatedAttention([8, 16], [1, 2])(x, x, x)


@pytest.mark.unit
def test_regular_dilated_pairs_plan_as_views_with_few_calls() -> None:
    # The config on a 128K shard, 32 heads: offsets fold into the head axis, so each pair is
    # at most 4 kernel calls on strided views (1 + 4 + 2 + 1), with no gathered index blocks.
    pattern = DilatedPattern([2048, 8192, 32768, 131072], [1, 4, 16, 64])
    blocks = pattern.plan((0,), (0,), 131072, 262144, True, 32, 32)
    assert all(isinstance(b, ViewBlock) for b in blocks)
    assert [b.heads for b in blocks] == [32, 8, 8, 8, 8, 16, 16, 32]
    assert [b.groups for b in blocks] == [64, 16, 16, 16, 16, 4, 4, 1]
    # The rate-1 pair covers every (head, row) once: it initialises the accumulators.
    assert [b.covers(32, 131072) for b in blocks] == [True] + [False] * 7
    # Grouped-query K/V fall back to index blocks (a query head's K/V head is not a strided step).
    assert not any(isinstance(b, ViewBlock) for b in pattern.plan((0,), (0,), 4096, 8192, True, 8, 2))


@pytest.mark.unit
@pytest.mark.parametrize("head_step", [(3, 0), (1, 1)])
def test_view_block_reads_the_rows_its_indices_name(head_step) -> None:
    block = ViewBlock(groups=2, group_stride=12, heads=2, head_start=1, head_step=head_step, q_start=1,
                      q_rows=3, kv_start=2, kv_rows=4, row_step=3, causal=False)
    x = torch.arange(2 * 7 * 30 * 4, dtype=torch.float32).view(2, 7, 30, 4)
    idx = block.index_block(30, 30)
    for view, flat in ((block.q_view(x), idx.q_index), (block.kv_view(x), idx.kv_index)):
        gathered = x.reshape(2, 7 * 30, 4)[:, flat.flatten()].view(2, *flat.shape, 4)
        assert torch.equal(view, gathered)
    lse = x[..., 0]
    assert torch.equal(block.q_view(lse), block.q_view(x)[..., 0])
