"""Checks before anything is built: a GPU recipe on a machine without GPUs names what it needs and the CPU-sized
alternative; ``debug=fdr`` writes nothing, as it says."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from tests import prefork

from .helpers import REPO, env, ring_train_cmd


@pytest.mark.skipif(torch.cuda.is_available(), reason="the check under test is the one for a machine without GPUs")
def test_gpu_recipe_without_gpus_fails_first(tmp_path: Path) -> None:
    out = subprocess.run([prefork.python(), "-m", "ring_plugin.app.train", "recipe=dense_128k_zero3",
                          f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO, env={**env(), "HYDRA_FULL_ERROR": ""},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    # Before the token files are checked (validation) or the 3B model is built.
    assert out.stderr.strip() == (
        "ring-train: config error: this recipe needs 2 GPUs (recipe=dense_128k_zero3, devices=2); found none. "
        "On this machine: ring-train recipe=cpu_default (a 2-layer GPT on 2 CPU processes)")


def test_fast_dev_run_writes_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "fdr"
    out = subprocess.run([*ring_train_cmd(run_dir, "debug=fdr")], cwd=REPO, env=env(), capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "== ring-train summary (step 1) ==" in out.stdout
    assert [p.relative_to(run_dir) for p in run_dir.rglob("*")] == []  # no train.log, .hydra, logs or checkpoint
