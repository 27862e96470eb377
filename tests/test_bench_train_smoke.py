"""``benchmarks/bench_train.py --smoke`` runs its ring variants end to end under torchrun on CPU (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(240)
def test_bench_train_script_smoke(tmp_path):
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions")),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "benchmarks" / "bench_train.py"), "--smoke", "--out", str(tmp_path),
           "--variants", "ring", "ring_recompute", "ring_ulysses"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = tmp_path.glob("bench_train_smoke_*.json")
    rows = {row["variant"]: row for row in json.loads(path.read_text())["train"]}
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
