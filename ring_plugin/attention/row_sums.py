"""A ring call's per-block results summed into its final tensor, in fp32 only where a row needs it.

Which blocks touch which rows of an output (query rows: the output and logsumexp, dQ; key rows: dK/dV,
with the messages that come home) is known before the first kernel runs: it is the call's plan. So
each row's number of contributions ``T`` is known in advance:

- ``T = 1``: the row takes its block's result as it is;
- ``T = 2`` with a first result in the final dtype: that result stays in the final tensor and the
  second is combined with it in fp32 on the way (a half-precision value is exact in fp32, so this is
  the arithmetic of an fp32 accumulator, rounded once);
- otherwise (``T >= 3``, or a first result wider than the final dtype): the row sums in an fp32 buffer
  of its own run of rows, rounded into the final tensor at its last contribution and then freed.

Results are therefore bit for bit those of a full fp32 accumulator rounded at the end. At ring size 2
with half-precision kernels most rows never need the fp32 buffer, and where one block's result covers
every row first (a rank's own step) the final tensor is that result: nothing is copied.

Rows are dim 2 of ``(B, H, L[, D])`` tensors; contributions arrive in the plan's order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops.merge import merge_into
from .accumulators import new_accumulator


@dataclass(frozen=True)
class _Piece:
    """Rows of one contribution that every other contribution covers alike (a run of the plan)."""

    rows: slice  # rows of the final tensor
    at: int  # where they start in the contribution's own rows
    run: int  # which run of the plan
    index: int  # this is the run's ``index``-th contribution (from 0)
    count: int  # contributions the run gets in all

    @property
    def last(self) -> bool:
        return self.index == self.count - 1


@dataclass(frozen=True)
class RowPlan:
    """The rows each contribution of a call covers, cut into runs that the same contributions cover."""

    touches: tuple[tuple[int, int], ...]  # each contribution's (start, stop), in arrival order
    pieces: tuple[tuple[_Piece, ...], ...]  # per contribution
    untouched: tuple[slice, ...]  # rows no contribution covers: 0 (and lse -inf) in the result
    length: int

    @classmethod
    def of(cls, touches: list[slice], length: int) -> RowPlan:
        spans = tuple((s.start, s.stop) for s in touches)
        cuts = sorted({0, length, *(a for a, _ in spans), *(b for _, b in spans)})
        runs: list[tuple[int, int, tuple[int, ...]]] = []  # (start, stop, contributions covering it)
        for a, b in zip(cuts, cuts[1:]):
            covering = tuple(i for i, (s, e) in enumerate(spans) if s <= a and b <= e and s < e)
            if runs and runs[-1][2] == covering and runs[-1][1] == a:
                runs[-1] = (runs[-1][0], b, covering)  # merge equal neighbours
            else:
                runs.append((a, b, covering))
        pieces: list[list[_Piece]] = [[] for _ in spans]
        for r, (a, b, covering) in enumerate(runs):
            for index, i in enumerate(covering):
                pieces[i].append(_Piece(slice(a, b), a - spans[i][0], r, index, len(covering)))
        untouched = tuple(slice(a, b) for a, b, covering in runs if not covering)
        return cls(spans, tuple(tuple(p) for p in pieces), untouched, length)


class RowSums:
    """The final tensor of one output of a call (see the module docstring).

    ``add(rows, value)`` sums (gradients); ``merge(rows, out, lse)`` merges by logsumexp (forward outputs;
    ``.lse`` then holds every row's fp32 logsumexp). Each call is the plan's next contribution.
    ``wide_dtype``: what rows that cannot stay in ``dtype`` sum in (fp32; where it is ``dtype`` itself,
    every row sums in the final tensor, rounded at each contribution)."""

    def __init__(self, plan: RowPlan, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                 seq_major: bool = False, wide_dtype: torch.dtype = torch.float32):
        self.plan, self.shape, self.dtype, self.device = plan, tuple(shape), dtype, device
        self.seq_major, self.wide_dtype = seq_major, wide_dtype
        self.final: torch.Tensor | None = None
        self.lse: torch.Tensor | None = None
        self._next = 0
        self._wide: dict[int, torch.Tensor] = {}  # run -> its partial sum in wide_dtype
        self._narrow: set[int] = set()  # runs summed in the final tensor itself

    # ------------------------------------------------------------------------------ contributions
    def add(self, rows: slice, value: torch.Tensor) -> None:
        adopted = self._arrive(rows, value)
        for piece, part in self._parts(value):
            if piece.index == 0:
                self._first(piece, part, adopted)
            elif piece.run in self._narrow:
                self.final[:, :, piece.rows].add_(part)  # type: ignore[index]  # fp32 math, one rounding
            else:
                self._wide[piece.run].add_(part)
                self._round_if_last(piece)

    def merge(self, rows: slice, out: torch.Tensor, lse: torch.Tensor) -> None:
        adopted = self._arrive(rows, out)
        if adopted and lse.dtype == torch.float32:
            self.lse = lse
        elif self.lse is None:
            self.lse = torch.full(self.shape[:3], float("-inf"), dtype=torch.float32, device=self.device)
        lse_adopted = self.lse is lse
        for piece, part in self._parts(out):
            part_lse = lse[:, :, piece.at:piece.at + part.shape[2]]
            lse_rows = self.lse[:, :, piece.rows]
            if piece.index == 0:
                self._first(piece, part, adopted)
                if not lse_adopted:
                    lse_rows.copy_(part_lse)
            elif piece.run in self._narrow:
                target = self.final[:, :, piece.rows]  # type: ignore[index]
                wide = target.float()
                merge_into(wide, lse_rows, part, part_lse)
                target.copy_(wide)
            else:
                merge_into(self._wide[piece.run], lse_rows, part, part_lse)
                self._round_if_last(piece)

    def result(self) -> torch.Tensor:
        assert self._next == len(self.plan.touches), (
            f"{self._next} of the plan's {len(self.plan.touches)} contributions arrived")
        if self.final is None:  # nothing touched any row
            self.final = self._new(self.shape, self.dtype, 0.0)
            self.lse = torch.full(self.shape[:3], float("-inf"), dtype=torch.float32, device=self.device)
        return self.final

    @property
    def wide_elements(self) -> int:
        """Elements held in fp32 (``wide_dtype``) buffers now: rows between their first and last result."""
        return sum(t.numel() for t in self._wide.values())

    # --------------------------------------------------------------------------------- internals
    def _arrive(self, rows: slice, value: torch.Tensor) -> bool:
        """Check this is the plan's next contribution; on the first, set up the final tensor. Returns
        whether ``value`` became the final tensor."""
        i = self._next
        assert i < len(self.plan.touches) and self.plan.touches[i] == (rows.start, rows.stop), (
            f"contribution {i} covers rows {rows.start}:{rows.stop}, the plan expected "
            f"{self.plan.touches[i] if i < len(self.plan.touches) else 'none'}")
        self._next += 1
        if self.final is not None:
            return False
        if (rows.start == 0 and rows.stop == self.plan.length and value.dtype == self.dtype
                and tuple(value.shape) == self.shape and all(self._stays(p, value) for p in self.plan.pieces[i])):
            self.final = value  # every row's first result, kept where it is
            return True
        self.final = self._new(self.shape, self.dtype, None)
        for s in self.plan.untouched:
            self.final[:, :, s].zero_()
        return False

    def _parts(self, value: torch.Tensor):
        """This contribution's pieces, each with its rows of ``value``."""
        for piece in self.plan.pieces[self._next - 1]:
            yield piece, value[:, :, piece.at:piece.at + piece.rows.stop - piece.rows.start]

    def _stays(self, piece: _Piece, first: torch.Tensor) -> bool:
        """Whether a run sums in the final tensor, given its first result (see the module docstring)."""
        return (piece.count == 1 or self.wide_dtype == self.dtype
                or (piece.count == 2 and first.dtype == self.dtype))

    def _first(self, piece: _Piece, part: torch.Tensor, adopted: bool) -> None:
        if self._stays(piece, part):
            if piece.count > 1:
                self._narrow.add(piece.run)
            if not adopted:
                self.final[:, :, piece.rows].copy_(part)  # type: ignore[index]
            return
        wide = self._new((*self.shape[:2], part.shape[2], *self.shape[3:]), self.wide_dtype, None)
        wide.copy_(part)
        self._wide[piece.run] = wide

    def _round_if_last(self, piece: _Piece) -> None:
        if piece.last:
            self.final[:, :, piece.rows].copy_(self._wide.pop(piece.run))  # type: ignore[index]

    def _new(self, shape: tuple[int, ...], dtype: torch.dtype, fill: float | None) -> torch.Tensor:
        return new_accumulator(shape, dtype, self.device, fill, self.seq_major and len(shape) == 4)
