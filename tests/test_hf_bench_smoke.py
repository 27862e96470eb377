"""``benchmarks/bench_hf.py --smoke`` runs end to end under torchrun on CPU (gloo, tiny models)."""

from __future__ import annotations

import math

import pytest

from tests.bench_smoke import run_smoke


@pytest.mark.timeout(240)
def test_bench_hf_smoke(tmp_path):
    result = run_smoke("bench_hf", tmp_path)
    hf_row, gpt_row = result["throughput"]
    assert (hf_row["model"], gpt_row["model"]) == ("hf_llama", "ring_gpt")
    assert hf_row["params"] == gpt_row["params"]  # equally shaped: the same number of weights
    for row in (hf_row, gpt_row):
        assert row["zero_stage"] == 3 and row["gpus"] == 2 and len(row["losses"]) == row["steps"]
        assert all(math.isfinite(x) for x in row["losses"]) and row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1
    assert result["hf_vs_ring_gpt_tokens_per_s"] == pytest.approx(hf_row["tokens_per_s"] / gpt_row["tokens_per_s"])
    logits = result["logits"]
    assert logits["fp32_ring_vs_one_device_max_rel"] <= 1e-5, logits  # fp32 on CPU: the ring is exact
    assert logits["bf16_noise_ratio"] <= 1.5 and logits["ok"], logits
