"""Hilbert order for 2-D grids of any size (the generalised "gilbert" curve), and locality figures.

``hilbert_permutation(H, W)[t]`` is the row-major index of the t-th cell along the curve, so
``x[:, perm]`` puts a row-major sequence in Hilbert order and ``y[:, inverse_permutation(perm)]``
puts it back. Contiguous runs of the curve are compact 2-D regions, which is the point: a segment
(or a rank's shard) then holds tokens that are near each other on the grid.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..cache import BoundedCache


def _sgn(x: int) -> int:
    return (x > 0) - (x < 0)


def _walk(x: int, y: int, ax: int, ay: int, bx: int, by: int) -> Iterator[tuple[int, int]]:
    """Cover the rectangle spanned by the major axis (ax, ay) and minor axis (bx, by) from (x, y)."""
    w, h = abs(ax + ay), abs(bx + by)
    dax, day, dbx, dby = _sgn(ax), _sgn(ay), _sgn(bx), _sgn(by)
    if h == 1:
        for _ in range(w):
            yield x, y
            x, y = x + dax, y + day
        return
    if w == 1:
        for _ in range(h):
            yield x, y
            x, y = x + dbx, y + dby
        return
    ax2, ay2, bx2, by2 = ax // 2, ay // 2, bx // 2, by // 2
    w2, h2 = abs(ax2 + ay2), abs(bx2 + by2)
    if 2 * w > 3 * h:
        # Long rectangle: split along the major axis into two halves (keep the halves even).
        if w2 % 2 and w > 2:
            ax2, ay2 = ax2 + dax, ay2 + day
        yield from _walk(x, y, ax2, ay2, bx, by)
        yield from _walk(x + ax2, y + ay2, ax - ax2, ay - ay2, bx, by)
    else:
        # Standard Hilbert split: up the minor axis, across, and back down.
        if h2 % 2 and h > 2:
            bx2, by2 = bx2 + dbx, by2 + dby
        yield from _walk(x, y, bx2, by2, ax2, ay2)
        yield from _walk(x + bx2, y + by2, ax, ay, bx - bx2, by - by2)
        yield from _walk(
            x + (ax - dax) + (bx2 - dbx), y + (ay - day) + (by2 - dby), -bx2, -by2, -(ax - ax2), -(ay - ay2)
        )


_CURVES: BoundedCache[tuple[tuple[int, int], ...]] = BoundedCache(16)  # a model uses a grid or two


def gilbert_curve(height: int, width: int) -> tuple[tuple[int, int], ...]:
    """(row, col) cells of an ``height x width`` grid in generalised Hilbert order."""
    if height <= 0 or width <= 0:
        raise ValueError(f"grid=({height}, {width}) must be two positive integers")
    return _CURVES.get((height, width), lambda: _curve(height, width))


def _curve(height: int, width: int) -> tuple[tuple[int, int], ...]:
    walk = _walk(0, 0, width, 0, 0, height) if width >= height else _walk(0, 0, 0, height, width, 0)
    return tuple((y, x) for x, y in walk)


def hilbert_permutation(height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
    """Row-major index of each position along the Hilbert curve (int64, length ``height*width``)."""
    cells = torch.tensor(gilbert_curve(height, width), dtype=torch.int64)
    return (cells[:, 0] * width + cells[:, 1]).to(device)


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


def block_locality(order: torch.Tensor, height: int, width: int, block: int, allowed: torch.Tensor) -> float:
    """Share of the tokens' 4-neighbours that lie in a block the token's block may attend to, when the
    grid is laid out as a sequence in ``order`` (``order[t]`` = row-major index of token t), cut into
    blocks of ``block`` tokens; ``allowed`` is the (query block, key block) bool mask (e.g.
    :func:`~ring_plugin.patterns.block_mask`). Each neighbour pair counts in both directions."""
    n = height * width
    if n % block:
        raise ValueError(f"block={block} must divide the grid's {height}x{width}={n} tokens")
    blk = torch.empty(n, dtype=torch.int64)
    blk[order] = torch.arange(n) // block
    grid = blk.view(height, width)
    down, up = grid[1:, :], grid[:-1, :]
    right, left = grid[:, 1:], grid[:, :-1]
    hits = sum(int(allowed[a, b].sum()) for a, b in ((down, up), (up, down), (right, left), (left, right)))
    pairs = 2 * ((height - 1) * width + height * (width - 1))
    return hits / pairs


def segment_locality(order: torch.Tensor, height: int, width: int, segment: int) -> float:
    """Share of the tokens' 4-neighbours that lie in the token's own segment of ``segment`` tokens,
    when the grid is laid out as a sequence in ``order`` (``order[t]`` = row-major index of token t)."""
    own = torch.eye(height * width // segment, dtype=torch.bool)
    return block_locality(order, height, width, segment, own)
