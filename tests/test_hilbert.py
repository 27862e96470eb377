"""Hilbert-ordered attention (dense, dilated, block-sparse) vs the oracle (permute, plain pattern,
un-permute), the curve itself, and its locality figures."""

from __future__ import annotations

import pytest
import torch

from ring_plugin import (
    HilbertBlockSparseAttention,
    HilbertRingAttention,
    create_ring_attention,
    hilbert_permutation,
    inverse_permutation,
    reference_attention,
)
from ring_plugin.patterns import block_locality, block_mask, gilbert_curve, segment_locality
from tests.pattern_world import (
    case_name,
    hilbert_block_sparse_cases,
    hilbert_cases,
    tolerance,
    world_results,
    worst_errors,
)


@pytest.mark.parametrize("case", hilbert_cases(), ids=case_name)
@pytest.mark.parametrize("world", [1, 2, 4])
def test_hilbert_matches_oracle(world: int, case) -> None:
    errs = worst_errors(world, case)  # [out, dq, dk, dv]
    assert max(errs) <= tolerance(case), errs


@pytest.mark.parametrize("case", hilbert_block_sparse_cases(), ids=case_name)
@pytest.mark.parametrize("world", [1, 2, 4])
def test_hilbert_block_sparse_matches_oracle(world: int, case) -> None:
    errs = worst_errors(world, case)  # [out, dq, dk, dv]
    assert max(errs) <= tolerance(case), errs


@pytest.mark.parametrize("world", [2, 4])
def test_grid_mismatch_raises_on_every_rank(world: int) -> None:
    for extra in world_results(world, "hilbert")[1]:
        assert "must equal the grid's H*W" in extra["bad"]["hilbert_grid"]
        assert "must equal the grid's H*W" in extra["bad"]["hilbert_block_sparse_grid"]
        assert "block_size=16 must divide" in extra["bad"]["hilbert_block_sparse_block_size"]


@pytest.mark.unit
def test_hilbert_blocks_are_2d_patches() -> None:
    # 8x8 grid, blocks of 4 curve positions, one block per window: each token attends to exactly
    # the 2x2 patch its block covers, in any order of the 4 cells.
    layer = HilbertBlockSparseAttention(grid=(8, 8), block_size=4, sparsity_ratio=0.95, pattern_type="local")
    assert torch.equal(layer.block_mask(64), torch.eye(16, dtype=torch.bool))
    q, k, v = (torch.randn(1, 64, 2, 8) for _ in range(3))
    out = layer(q, k, v)
    cells = gilbert_curve(8, 8)
    for b in range(16):
        patch = cells[4 * b: 4 * b + 4]
        rows = {r for r, _ in patch}
        cols = {c for _, c in patch}
        assert len(rows) == 2 and len(cols) == 2  # a 2x2 square
        idx = torch.tensor([r * 8 + c for r, c in patch])
        want = reference_attention(q[:, idx], k[:, idx], v[:, idx])
        assert (out[:, idx] - want).abs().max() < 1e-5


@pytest.mark.unit
@pytest.mark.parametrize("grid", [(1, 1), (1, 7), (4, 4), (5, 7), (6, 10), (3, 17), (16, 16), (32, 48), (9, 2)])
def test_curve_is_a_path_through_every_cell(grid: tuple[int, int]) -> None:
    cells = gilbert_curve(*grid)
    assert sorted(cells) == [(r, c) for r in range(grid[0]) for c in range(grid[1])]
    steps = [abs(a[0] - b[0]) + abs(a[1] - b[1]) for a, b in zip(cells, cells[1:])]
    assert all(s == 1 for s in steps)  # these sizes have an exact path (odd x odd may need a diagonal)
    perm = hilbert_permutation(*grid)
    assert torch.equal(perm[inverse_permutation(perm)], torch.arange(grid[0] * grid[1]))


@pytest.mark.unit
def test_hilbert_segments_are_more_local_than_row_major() -> None:
    perm = hilbert_permutation(64, 64)
    assert segment_locality(perm, 64, 64, 256) > segment_locality(torch.arange(4096), 64, 64, 256)


@pytest.mark.unit
def test_block_locality_counts_neighbours_in_allowed_blocks() -> None:
    # 4x4 grid, blocks of 4, each block sees itself only: row-major blocks are rows (12 of the 24
    # neighbour pairs inside), Hilbert blocks are 2x2 squares (4 pairs each: 16 of 24).
    own = torch.eye(4, dtype=torch.bool)
    assert block_locality(torch.arange(16), 4, 4, 4, own) == 0.5
    assert block_locality(hilbert_permutation(4, 4), 4, 4, 4, own) == 16 / 24
    # Blocks that see their neighbours: every vertical pair in row-major is one block apart.
    band = (torch.arange(4)[:, None] - torch.arange(4)[None, :]).abs() <= 1
    assert block_locality(torch.arange(16), 4, 4, 4, band) == 1.0
    # At 90 % dilated_sparse (stride 10 blocks) row-major loses vertical neighbours, Hilbert keeps most.
    mask = block_mask(64, 0.9, "dilated_sparse")
    rm = block_locality(torch.arange(4096), 64, 64, 64, mask)
    hi = block_locality(hilbert_permutation(64, 64), 64, 64, 64, mask)
    assert rm == 0.5 and hi > 0.85
    with pytest.raises(ValueError, match="block=5 must divide"):
        block_locality(torch.arange(16), 4, 4, 5, own)


@pytest.mark.unit
def test_factory_and_level() -> None:
    layer = create_ring_attention(hilbert_level=2)  # 'auto' picks hilbert when a grid is given
    assert isinstance(layer, HilbertRingAttention) and layer.grid_for(16) == (4, 4)
    sparse = create_ring_attention("hilbert_block_sparse", hilbert_level=2, block_size=2)
    assert isinstance(sparse, HilbertBlockSparseAttention) and sparse.grid_for(16) == (4, 4)
    with pytest.raises(ValueError, match="grid"):
        HilbertRingAttention(grid=(0, 4))
    x = torch.randn(1, 12, 2, 4)
    with pytest.raises(ValueError, match="must equal the grid"):
        HilbertRingAttention(hilbert_level=2)(x, x, x)


def _neighbour_share(order: torch.Tensor, height: int, width: int, block: int, allowed: torch.Tensor) -> float:
    """Share of (token, 4-neighbour) pairs whose blocks the mask allows, counted here from positions: the
    sequence position of each grid cell, its block, every right and down neighbour pair in both directions."""
    position = torch.empty(height * width, dtype=torch.int64)
    position[order] = torch.arange(height * width)
    blocks = (position // block).view(height, width)
    pairs = [(blocks[:, :-1], blocks[:, 1:]), (blocks[:-1, :], blocks[1:, :])]
    hits = sum(int(allowed[a, b].sum()) + int(allowed[b, a].sum()) for a, b in pairs)
    return hits / sum(2 * a.numel() for a, _ in pairs)


@pytest.mark.unit
def test_the_documented_locality_figures() -> None:
    """The README's and docs/variants.md's locality figures, recomputed (3 decimals as printed)."""
    import re
    from pathlib import Path

    from tests.pattern_world import block_sparse_definition

    repo = Path(__file__).resolve().parents[1]
    readme = " ".join(repo.joinpath("README.md").read_text().split())
    h, w, seg, hilbert, row_major = re.search(
        r"on a (\d+)×(\d+) grid with (\d+)-token segments, ([\d.]+) % of a token's 4-neighbours lie in its own "
        r"segment in Hilbert order against ([\d.]+) % in row-major order", readme).groups()
    h, w, seg = int(h), int(w), int(seg)
    own = torch.eye(h * w // seg, dtype=torch.bool)
    assert round(100 * _neighbour_share(hilbert_permutation(h, w), h, w, seg, own), 1) == float(hilbert)
    assert round(100 * _neighbour_share(torch.arange(h * w), h, w, seg, own), 1) == float(row_major)

    docs = repo.joinpath("docs", "variants.md").read_text()
    segments = re.findall(r"^\| (\d+)x(\d+) \| (\d+) \| ([\d.]+) \| ([\d.]+) \|$", docs, re.M)
    blocks = re.findall(r"^\| (\d+)x(\d+) \| (local|dilated_sparse|global_local) \| ([\d.]+) \| ([\d.]+) \|$", docs,
                        re.M)
    assert len(segments) == 6 and len(blocks) == 9
    perms: dict[tuple[int, int], torch.Tensor] = {}
    for rows, block_of in ((segments, lambda n, seg: (int(seg), torch.eye(n // int(seg), dtype=torch.bool))),
                           (blocks, lambda n, pattern: (64, block_sparse_definition(n // 64, 0.9, pattern)))):
        for h, w, key, row_major, hilbert in rows:
            h, w = int(h), int(w)
            block, allowed = block_of(h * w, key)
            perm = perms.setdefault((h, w), hilbert_permutation(h, w))
            got = [round(_neighbour_share(order, h, w, block, allowed), 3) for order in (torch.arange(h * w), perm)]
            assert got == [float(row_major), float(hilbert)], (h, w, key, got)
    # the library's own figure function agrees with this count
    assert block_locality(perms[(64, 64)], 64, 64, 256, torch.eye(16, dtype=torch.bool)) == pytest.approx(
        _neighbour_share(perms[(64, 64)], 64, 64, 256, torch.eye(16, dtype=torch.bool)), abs=1e-12)
