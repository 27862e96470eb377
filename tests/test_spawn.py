"""ring_plugin.testing.run_in_process_group: results by rank, a failing or silent rank fails the call, and a
reused world runs later calls in the same processes as a fresh world would (environment, random seed)."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from ring_plugin.testing import run_in_process_group

pytestmark = pytest.mark.timeout(120)


def _facts(rank: int, world: int, tag: str) -> dict:
    total = torch.tensor([rank + 1.0])
    dist.all_reduce(total)
    seen = os.environ.get("SPAWN_TEST_TAG")
    os.environ["SPAWN_TEST_TAG"] = tag  # must not leak into the next call
    return {"pid": os.getpid(), "sum": float(total), "tag_before": seen, "world": dist.get_world_size()}


def _fail_on(rank: int, world: int, bad_rank: int) -> int:
    if rank == bad_rank:
        raise ValueError(f"rank {rank} refuses")
    return rank


def _sleep_on(rank: int, world: int, bad_rank: int) -> int:
    if rank == bad_rank:
        time.sleep(60)
    return rank


def test_fresh_worlds_return_by_rank() -> None:
    out = run_in_process_group(_facts, 2, "a", timeout=60)
    assert [r["sum"] for r in out] == [3.0, 3.0] and [r["world"] for r in out] == [2, 2]
    assert out[0]["pid"] != out[1]["pid"] and [r["tag_before"] for r in out] == [None, None]


def test_reused_world_keeps_its_processes_and_starts_each_call_clean() -> None:
    first = run_in_process_group(_facts, 2, "a", timeout=60, reuse=True)
    second = run_in_process_group(_facts, 2, "b", timeout=60, reuse=True)
    assert [r["pid"] for r in first] == [r["pid"] for r in second]  # the same processes: start-up paid once
    assert [r["sum"] for r in second] == [3.0, 3.0]
    assert [r["tag_before"] for r in second] == [None, None]  # the first call's environment is gone


@pytest.mark.parametrize("reuse", [False, True])
def test_an_exception_on_rank_1_fails_the_call_and_a_reused_world_is_replaced(reuse: bool) -> None:
    before = run_in_process_group(_facts, 2, "a", timeout=60, reuse=True)
    with pytest.raises(RuntimeError, match=r"a rank failed:\nrank 1:[\s\S]*ValueError: rank 1 refuses"):
        run_in_process_group(_fail_on, 2, 1, timeout=60, reuse=reuse)
    after = run_in_process_group(_facts, 2, "b", timeout=60, reuse=True)
    assert [r["sum"] for r in after] == [3.0, 3.0]
    if reuse:  # the failed call's world is gone: a new one answered
        assert not {r["pid"] for r in before} & {r["pid"] for r in after}


def test_a_silent_rank_times_out_instead_of_hanging() -> None:
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"1 rank\(s\) did not finish within 3 s"):
        run_in_process_group(_sleep_on, 2, 1, timeout=3, reuse=True)
    assert time.monotonic() - start < 15
    assert run_in_process_group(_fail_on, 2, -1, timeout=60, reuse=True) == [0, 1]
