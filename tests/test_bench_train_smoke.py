"""``benchmarks/bench_train.py --smoke`` runs its ring variants end to end under torchrun on CPU (gloo)."""

from __future__ import annotations

import pytest

from tests.bench_smoke import run_smoke


@pytest.mark.timeout(240)
def test_bench_train_script_smoke(tmp_path):
    result = run_smoke("bench_train", tmp_path, "--variants", "ring", "ring_recompute", "ring_ulysses")
    rows = {row["variant"]: row for row in result["train"]}
    assert sorted(rows) == ["ring", "ring_recompute", "ring_ulysses"], rows
    ring, recompute = rows["ring"], rows["ring_recompute"]
    assert not ring["recompute_attention"] and recompute["recompute_attention"]
    assert len(ring["losses"]) == ring["steps"] == 3 and ring["tokens_per_s"] > 0
    # Keeping attention out of recomputation, or trading the ring for an all-to-all (U=2 instead of
    # R=2), changes no number: the same losses, step by step.
    assert ring["losses"] == pytest.approx(recompute["losses"], rel=1e-6)
    assert (rows["ring_ulysses"]["ulysses_size"], rows["ring_ulysses"]["ring_size"]) == (2, 1)
    assert ring["losses"] == pytest.approx(rows["ring_ulysses"]["losses"], rel=1e-6)
    assert ring["losses"][-1] < ring["losses"][0]
