"""``benchmarks/bench_patterns.py --smoke`` runs end to end on CPU (2 gloo processes, tiny sizes)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests import prefork

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(240)
def test_bench_patterns_smoke(tmp_path):
    out = tmp_path / "patterns.json"
    cmd = [prefork.python(), str(REPO / "benchmarks" / "bench_patterns.py"), "--smoke", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [r["variant"] for r in report["equivalence"]] == ["standard", "block_sparse"]
    for row in report["equivalence"]:  # fp32 on CPU: the pattern layers equal the fp64 oracle at fp32's tolerance
        assert row["passed"] and max(row[f"{x}_rel"] for x in ("out", "dq", "dk", "dv")) < 1e-5, row
    timed = {r["case"]: r for r in report["results"]}
    assert set(timed) == {"dense", "dilated", "block_sparse", "hilbert_block_sparse"}
    assert all(r["ms"] > 0 and "error" not in r for r in timed.values())
    for case in ("dilated", "block_sparse", "hilbert_block_sparse"):  # each speed-up is its two timings' ratio
        row = timed[case]
        assert row["n"] == timed["dense"]["n"], row
        assert row["speedup_vs_dense_ring"] == pytest.approx(timed["dense"]["ms"] / row["ms"], rel=1e-12), row
