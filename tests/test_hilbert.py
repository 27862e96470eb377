"""Hilbert-ordered attention vs the oracle (permute, plain pattern, un-permute), and the curve itself."""

from __future__ import annotations

import pytest
import torch

from ring_plugin import HilbertRingAttention, create_ring_attention, hilbert_permutation, inverse_permutation
from ring_plugin.patterns import gilbert_curve, segment_locality
from tests.pattern_world import case_errors, tolerance, world_results


@pytest.mark.parametrize("world", [1, 2, 4])
def test_hilbert_matches_oracle(world: int) -> None:
    rows = case_errors(world, "hilbert")
    assert len(rows) == 7
    for case, errs in rows:
        assert max(errs) <= tolerance(case), (case, errs)


@pytest.mark.parametrize("world", [2, 4])
def test_grid_mismatch_raises_on_every_rank(world: int) -> None:
    for extra in world_results(world)[1]:
        assert "must equal the grid's H*W" in extra["bad"][1]


@pytest.mark.parametrize("grid", [(1, 1), (1, 7), (4, 4), (5, 7), (6, 10), (3, 17), (16, 16), (32, 48), (9, 2)])
def test_curve_is_a_path_through_every_cell(grid: tuple[int, int]) -> None:
    cells = gilbert_curve(*grid)
    assert sorted(cells) == [(r, c) for r in range(grid[0]) for c in range(grid[1])]
    steps = [abs(a[0] - b[0]) + abs(a[1] - b[1]) for a, b in zip(cells, cells[1:])]
    assert all(s == 1 for s in steps)  # these sizes have an exact path (odd x odd may need a diagonal)
    perm = hilbert_permutation(*grid)
    assert torch.equal(perm[inverse_permutation(perm)], torch.arange(grid[0] * grid[1]))


def test_hilbert_segments_are_more_local_than_row_major() -> None:
    perm = hilbert_permutation(64, 64)
    assert segment_locality(perm, 64, 64, 256) > segment_locality(torch.arange(4096), 64, 64, 256)


def test_factory_and_level() -> None:
    layer = create_ring_attention(hilbert_level=2)  # 'auto' picks hilbert when a grid is given
    assert isinstance(layer, HilbertRingAttention) and layer.grid_for(16) == (4, 4)
    with pytest.raises(ValueError, match="grid"):
        HilbertRingAttention(grid=(0, 4))
    x = torch.randn(1, 12, 2, 4)
    with pytest.raises(ValueError, match="must equal the grid"):
        HilbertRingAttention(hilbert_level=2)(x, x, x)
