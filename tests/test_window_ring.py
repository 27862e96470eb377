"""Sliding windows (Mistral / Qwen2 local attention): every dense ring variant with ``sliding_window``
equals the fp64 oracle of the causal band (output and dQ/dK/dV) at world sizes 1, 2 and 4, in both
layouts, for windows shorter than a chunk, spanning chunks and longer than the sequence."""

from __future__ import annotations

import itertools

import pytest
import torch

from ring_plugin import create_ring_attention, shard_sequence

from .errors import TOLERANCES, oracle, ring_errors, worst_over_ranks

N = 48  # chunks of 6 at world 4 (zigzag)
WINDOWS = (1, 4, 7, 13, 30, 48, 100)
VARIANTS = ("standard", "sdpa", "distributed", "correct")
LAYOUTS = ("contiguous", "zigzag")
DTYPES = (torch.float32, torch.bfloat16)
SHAPE = (2, 4, 2, 8)  # batch, heads, kv_heads (grouped-query), head_dim


def _cases():
    return list(itertools.product(VARIANTS, LAYOUTS, DTYPES, WINDOWS))


def _errors(rank: int, world: int, variant: str, layout: str, dtype: torch.dtype, window: int) -> dict[str, float]:
    b, h, hkv, d = SHAPE
    gen = torch.Generator().manual_seed(window)
    q, k, v, g = (torch.randn(b, N, hh, d, generator=gen) for hh in (h, hkv, hkv, h))
    pos = torch.arange(N)
    band = (pos[:, None] - pos[None, :]) < window
    ref_out, ref = oracle(q, k, v, g, True, band)
    attn = create_ring_attention(variant, layout=layout)
    return ring_errors(lambda *qkv: attn(*qkv, is_causal=True, sliding_window=window), (q, k, v, g), ref_out, ref,
                       dtype, lambda t: shard_sequence(t, 1, layout, rank, world))


def _worker(rank: int, world: int, cases) -> list[dict[str, float]]:
    return [_errors(rank, world, *case) for case in cases]


@pytest.fixture(scope="module")
def errors_by_world() -> dict[int, list[dict[str, float]]]:
    return worst_over_ranks(_worker, _cases(), timeout=300)


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("window", WINDOWS)
def test_sliding_window_matches_the_oracle(errors_by_world, world, window):
    checked = 0
    for case, errs in zip(_cases(), errors_by_world[world]):
        if case[3] != window:
            continue
        checked += 1
        keys, bound = TOLERANCES[case[2]]
        for key in keys:
            assert errs[key] < bound, (case, key, errs[key])
    assert checked == len(VARIANTS) * len(LAYOUTS) * len(DTYPES)


@pytest.mark.parametrize("kwargs, message", [
    ({"sliding_window": 0}, "must be a positive integer"),
    ({"sliding_window": 4, "is_causal": False}, "is a causal window"),
    ({"sliding_window": 4, "document_ids": torch.zeros(1, 16, dtype=torch.long)}, "not supported yet"),
])
@pytest.mark.unit
def test_bad_sliding_window_is_refused(kwargs, message):
    q = torch.randn(1, 16, 2, 4)
    kwargs = {"is_causal": True, **kwargs}
    with pytest.raises(ValueError, match=message):
        create_ring_attention("standard")(q, q, q, **kwargs)


@pytest.mark.unit
def test_patterns_refuse_a_sliding_window():
    q = torch.randn(1, 16, 2, 4)
    with pytest.raises(ValueError, match="supported by the dense variants"):
        create_ring_attention("block_sparse", block_size=4, sparsity_ratio=0.5)(q, q, q, is_causal=True,
                                                                                 sliding_window=4)
