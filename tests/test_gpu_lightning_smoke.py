"""``benchmarks/gpu_lightning.py --smoke`` runs end to end under torchrun on CPU (gloo, tiny model)."""

from __future__ import annotations

import math

import pytest

from tests.bench_smoke import run_smoke


@pytest.mark.timeout(240)
def test_gpu_lightning_script_smoke(tmp_path):
    result = run_smoke("gpu_lightning", tmp_path)
    assert [row["strategy"] for row in result["equivalence"]] == ["ring_deepspeed_zero2", "ring_deepspeed_zero3",
                                                                    "ring_ddp"]
    assert all(row["ok"] for row in result["equivalence"]), result["equivalence"]
    train = result["train"]
    assert train["zero_stage"] == 3 and train["gpus"] == 2 and len(train["losses"]) == train["steps"]
    assert all(math.isfinite(x) for x in train["losses"]) and train["tokens_per_s"] > 0
