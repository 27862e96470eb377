"""``benchmarks/bench_hf.py --smoke`` runs end to end under torchrun on CPU (gloo, tiny models)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(240)
def test_bench_hf_smoke(tmp_path):
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions")),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "benchmarks" / "bench_hf.py"), "--smoke", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = tmp_path.glob("bench_hf_smoke_*.json")
    result = json.loads(path.read_text())
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
