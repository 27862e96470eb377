"""``benchmarks/bench_train.py --smoke`` runs its ring variants end to end under torchrun on CPU (gloo)."""

from __future__ import annotations

import pytest

from tests.bench_smoke import run_smoke


@pytest.mark.timeout(300)
def test_bench_train_script_smoke(tmp_path):
    result = run_smoke("bench_train", tmp_path, "--variants", "ring", "ring_recompute", "ring_ulysses",
                       "ring_recompute@0", "ring_offload@2", "--checkpoint-layers", "-1", "1")
    rows = {(row["variant"], row["checkpoint_layers"]): row for row in result["train"]}
    expected = [(v, k) for v in ("ring", "ring_recompute", "ring_ulysses") for k in (1, 2)]
    expected += [("ring_recompute", 0), ("ring_offload", 2)]
    assert sorted(rows) == sorted(expected), rows
    ring, recompute = rows["ring", 2], rows["ring_recompute", 2]
    assert not ring["recompute_attention"] and recompute["recompute_attention"]
    assert len(ring["losses"]) == ring["steps"] == 3 and ring["tokens_per_s"] > 0
    # Keeping attention out of recomputation, checkpointing one block of two instead of both, keeping the
    # checkpoints in host memory, or trading the ring for an all-to-all (U=2 instead of R=2), changes no
    # number: the same losses, step by step.
    for key, row in rows.items():
        assert row["losses"] == pytest.approx(ring["losses"], rel=1e-6), key
    assert (rows["ring_ulysses", 2]["ulysses_size"], rows["ring_ulysses", 2]["ring_size"]) == (2, 1)
    assert ring["losses"][-1] < ring["losses"][0]
    assert set(result["ring_tokens_per_s_ratios"]) == {"smoke", "smoke checkpoint_layers=1"}
