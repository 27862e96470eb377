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
    for row in result["equivalence"]:  # fp32 on CPU: one process's loss and gradients at fp32's tolerance
        assert row["ok"] and row["loss_abs_err"] < 1e-5 and row["grad_max_rel_err"] < 1e-5, row
    train = result["train"]
    assert train["zero_stage"] == 3 and train["gpus"] == 2 and len(train["losses"]) == train["steps"]
    assert all(math.isfinite(x) for x in train["losses"])
    # the figures follow from the median step: tokens per step / seconds, per GPU, FLOPs over the assumed peak
    import statistics

    step_s = statistics.median(train["step_seconds"][train["warmup_steps_excluded"]:] or train["step_seconds"])
    assert train["median_step_seconds"] == step_s > 0
    assert train["tokens_per_s"] == pytest.approx(train["seq_len"] / step_s, rel=1e-12)
    assert train["tokens_per_s_per_gpu"] == pytest.approx(train["tokens_per_s"] / 2, rel=1e-12)
    assert train["mfu"] == pytest.approx(train["model_flops_per_token"] * train["tokens_per_s"]
                                         / (2 * train["peak_tflops_assumed"] * 1e12), rel=1e-12)
