"""``benchmarks/gpu_lightning.py --smoke`` runs end to end under torchrun on CPU (gloo, tiny model)."""

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
def test_gpu_lightning_script_smoke(tmp_path):
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions")),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "benchmarks" / "gpu_lightning.py"), "--smoke", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = tmp_path.glob("gpu_lightning_smoke_*.json")
    result = json.loads(path.read_text())
    assert [row["strategy"] for row in result["equivalence"]] == ["ring_deepspeed_zero2", "ring_deepspeed_zero3",
                                                                    "ring_ddp"]
    assert all(row["ok"] for row in result["equivalence"]), result["equivalence"]
    train = result["train"]
    assert train["zero_stage"] == 3 and train["gpus"] == 2 and len(train["losses"]) == train["steps"]
    assert all(math.isfinite(x) for x in train["losses"]) and train["tokens_per_s"] > 0
