"""Run a benchmark script's ``--smoke`` mode under torchrun (2 CPU processes, gloo) and read its JSON."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from tests import prefork

REPO = Path(__file__).resolve().parents[1]


def run_smoke(script: str, out: Path, *args: str, timeout: float = 200) -> dict[str, Any]:
    """``benchmarks/<script>.py --smoke --out out ...``; the one ``<script>_smoke_*.json`` it wrote."""
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions")),
               OMP_NUM_THREADS="1")
    cmd = [prefork.python(), "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "benchmarks" / f"{script}.py"), "--smoke", "--out", str(out), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = out.glob(f"{script}_smoke_*.json")
    return json.loads(path.read_text())
