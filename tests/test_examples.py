"""``examples/ring_demo.py`` runs as the README says and reports errors at the fp32 oracle tolerance."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests import prefork

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(200)
def test_ring_demo_matches_the_oracle(tmp_path: Path) -> None:
    proc = subprocess.run([prefork.python(), str(REPO / "examples" / "ring_demo.py"), "--world", "2", "--tokens", "256",
                           "--heads", "2", "--head-dim", "8"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == ("ring attention, 2 CPU processes (gloo), 256 tokens, 2 heads x 8, zigzag layout, fp32, "
                        "fwd+bwd"), proc.stdout
    rows = [re.fullmatch(r"\s*(True|False)\s+([0-9.e+-]+)\s+([0-9.]+)", line) for line in lines[2:]]
    assert [r.group(1) for r in rows if r] == ["True", "False"], proc.stdout  # causal, then not
    for row in rows:
        assert float(row.group(2)) < 1e-5, proc.stdout  # the ring's error against the oracle
