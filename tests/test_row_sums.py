"""RowSums: a call's per-block results summed into the final tensor, bit for bit an fp32 accumulator's."""

from __future__ import annotations

import pytest
import torch

from ring_plugin.attention.row_sums import RowPlan, RowSums
from ring_plugin.ops.merge import merge_into

B, H, D = 2, 3, 4


def test_plan_cuts_rows_into_runs_the_same_contributions_cover() -> None:
    plan = RowPlan.of([slice(0, 8), slice(2, 4), slice(6, 10)], 12)
    as_tuples = [[(p.rows.start, p.rows.stop, p.at, p.index, p.count) for p in pieces] for pieces in plan.pieces]
    assert as_tuples == [
        [(0, 2, 0, 0, 1), (2, 4, 2, 0, 2), (4, 6, 4, 0, 1), (6, 8, 6, 0, 2)],
        [(2, 4, 0, 1, 2)],
        [(6, 8, 0, 1, 2), (8, 10, 2, 0, 1)],
    ]
    assert plan.untouched == (slice(10, 12),)


def _random_touches(gen: torch.Generator, length: int) -> list[slice]:
    touches = []
    for _ in range(int(torch.randint(1, 7, (1,), generator=gen))):
        a, b = sorted(torch.randint(0, length + 1, (2,), generator=gen).tolist())
        touches.append(slice(a, max(b, a + 1) if a < length else length))
    return [s for s in touches if s.stop > s.start]


def _value(gen: torch.Generator, rows: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(B, H, rows, D, generator=gen).to(dtype)


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("seq_major", [False, True])
def test_sums_equal_an_fp32_accumulator_rounded_at_the_end(seed: int, seq_major: bool) -> None:
    gen = torch.Generator().manual_seed(seed)
    length = 24
    touches = _random_touches(gen, length)
    # mostly bf16 results, some fp32 (grouped-query sums, fp32 messages)
    values = [_value(gen, s.stop - s.start, torch.float32 if seed % 3 == 0 and i == 1 else torch.bfloat16)
              for i, s in enumerate(touches)]
    sums = RowSums(RowPlan.of(touches, length), (B, H, length, D), torch.bfloat16, torch.device("cpu"), seq_major)
    reference = torch.zeros(B, H, length, D)
    for s, value in zip(touches, values):
        sums.add(s, value)
        reference[:, :, s] += value
    assert torch.equal(sums.result(), reference.to(torch.bfloat16))
    assert sums.wide_elements == 0  # every fp32 buffer was rounded and freed at its last contribution


@pytest.mark.parametrize("seed", range(40))
def test_merges_equal_an_fp32_accumulator_rounded_at_the_end(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    length = 24
    touches = _random_touches(gen, length)
    sums = RowSums(RowPlan.of(touches, length), (B, H, length, D), torch.bfloat16, torch.device("cpu"))
    out_ref = torch.zeros(B, H, length, D)
    lse_ref = torch.full((B, H, length), float("-inf"))
    for s in touches:
        out, lse = _value(gen, s.stop - s.start, torch.bfloat16), torch.randn(B, H, s.stop - s.start, generator=gen)
        sums.merge(s, out, lse)
        merge_into(out_ref[:, :, s], lse_ref[:, :, s], out, lse)
    assert torch.equal(sums.result(), out_ref.to(torch.bfloat16))
    assert torch.equal(sums.lse, lse_ref)


@pytest.mark.parametrize("seed", range(10))
def test_half_precision_sums_round_at_every_contribution(seed: int) -> None:
    """wide_dtype = the final dtype (grad_comm_dtype='input'): a half-precision accumulator's sums."""
    gen = torch.Generator().manual_seed(seed)
    touches = _random_touches(gen, 16)
    sums = RowSums(RowPlan.of(touches, 16), (B, H, 16, D), torch.bfloat16, torch.device("cpu"),
                   wide_dtype=torch.bfloat16)
    reference = torch.zeros(B, H, 16, D, dtype=torch.bfloat16)
    for s in touches:
        value = _value(gen, s.stop - s.start, torch.bfloat16)
        sums.add(s, value)
        reference[:, :, s] += value
        assert sums.wide_elements == 0
    assert torch.equal(sums.result(), reference)


def test_a_first_result_over_every_row_becomes_the_result_and_nothing_is_widened() -> None:
    """A rank's own step at ring size 2: its result covers every row first; the peer's blocks touch a
    few rows once more. The result is the own step's tensor itself and no fp32 buffer is made."""
    gen = torch.Generator().manual_seed(0)
    touches = [slice(0, 16), slice(2, 5), slice(9, 12)]
    sums = RowSums(RowPlan.of(touches, 16), (B, H, 16, D), torch.bfloat16, torch.device("cpu"))
    values = [_value(gen, s.stop - s.start, torch.bfloat16) for s in touches]
    reference = torch.zeros(B, H, 16, D)
    for s, value in zip(touches, values):
        sums.add(s, value)
        reference[:, :, s] += value
        assert sums.wide_elements == 0
    assert sums.result() is values[0]
    assert torch.equal(values[0], reference.to(torch.bfloat16))


def test_rows_touched_three_times_sum_in_fp32_buffers_of_their_own_rows() -> None:
    touches = [slice(0, 8), slice(0, 4), slice(2, 4)]  # rows 2:4 get three contributions, 0:2 two
    sums = RowSums(RowPlan.of(touches, 8), (1, 1, 8, 2), torch.bfloat16, torch.device("cpu"))
    sums.add(touches[0], torch.ones(1, 1, 8, 2, dtype=torch.bfloat16))
    assert sums.wide_elements == 2 * 2  # rows 2:4 only
    sums.add(touches[1], torch.full((1, 1, 4, 2), 2.0 ** -8, dtype=torch.bfloat16))
    sums.add(touches[2], torch.full((1, 1, 2, 2), 2.0 ** -8, dtype=torch.bfloat16))
    assert sums.wide_elements == 0
    result = sums.result()[0, 0, :, 0].float()
    # 1 + 2^-8 rounds to 1 in bf16 (rows 0:2); 1 + 2 * 2^-8 = 1 + 2^-7 is exact (rows 2:4), where rounding
    # after each contribution would have lost both
    assert result.tolist() == [1.0, 1.0, 1.0 + 2.0 ** -7, 1.0 + 2.0 ** -7, 1.0, 1.0, 1.0, 1.0]


def test_untouched_rows_are_zero_and_contributions_must_follow_the_plan() -> None:
    plan = RowPlan.of([slice(2, 4)], 6)
    sums = RowSums(plan, (1, 1, 6, 1), torch.float32, torch.device("cpu"))
    with pytest.raises(AssertionError, match="the plan expected"):
        sums.add(slice(0, 2), torch.ones(1, 1, 2, 1))
    sums = RowSums(plan, (1, 1, 6, 1), torch.float32, torch.device("cpu"))
    sums.add(slice(2, 4), torch.ones(1, 1, 2, 1))
    assert sums.result()[0, 0, :, 0].tolist() == [0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
