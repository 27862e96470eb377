"""End-to-end ``ring-train`` runs on CPU (2 processes, ring of 2, tiny model): logging and fault tolerance."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from ring_plugin.callbacks.checkpoint_files import checkpoints_newest_first

from .helpers import (
    REPO,
    env,
    final_weights,
    read_csv_metrics,
    read_wandb_history,
    ring_train_cmd,
    run_ring_train,
)

pytestmark = pytest.mark.timeout(240)


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"run ended early (rc {proc.returncode})"
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.05)


def test_logs_reach_wandb_and_csv_and_nan_steps_are_skipped(tmp_path: Path) -> None:
    out = tmp_path / "run"
    # One NaN step (7), then three in a row (12-14) from rank 1 only: skipped everywhere, then a rollback.
    stdout = _ok(run_ring_train(out, "+callbacks.nan._target_=tests.app.helpers.NanGradients",
                                "+callbacks.nan.steps=[7,12,13,14]", "+callbacks.nan.rank=1"))
    assert "== ring-train summary (step 20) ==" in stdout
    # vocab 64 x 32 tied embedding, 2 layers of (qkv 3072, proj 1024, MLP 8192, norms 64), final norm 32
    assert "  model              26,784 parameters" in stdout
    assert "skipped steps      4" in stdout
    assert "rolled back weights and optimizer" in stdout and "step000010.ckpt" in stdout

    rows = read_csv_metrics(out)
    monitored = [r for r in rows if r.get("monitor/tokens_per_s")]
    assert [int(r["step"]) for r in monitored] == [4, 9, 14, 19]  # the index of each window's last step
    for r in monitored:
        assert float(r["monitor/tokens_per_s"]) > 0 and 0 < float(r["monitor/mfu"]) < 1
        assert float(r["monitor/peak_mem_gb_rank0"]) > 0 and float(r["monitor/peak_mem_gb_rank1"]) > 0
        assert float(r["monitor/ring_bytes_sent"]) > 0  # the ring really passed K/V around
        assert 0 <= float(r["monitor/ring_wait_frac"]) <= 1 and float(r["monitor/step_skew"]) >= 0
        assert "monitor/lr" not in r and "monitor/loss" not in r  # train/lr and train/loss, logged once
    assert any(r.get("val/task_acc") for r in rows) and any(r.get("val/loss") for r in rows)
    assert max(float(r["fault/skipped_steps"]) for r in rows if r.get("fault/skipped_steps")) == 4

    history = read_wandb_history(out)
    by_step = {int(h["trainer/global_step"]): h for h in history if "monitor/tokens_per_s" in h}
    assert sorted(by_step) == [4, 9, 14, 19]
    csv_by_step = {int(r["step"]): r for r in monitored}
    for step, h in by_step.items():  # the same numbers went to both loggers
        assert h["monitor/tokens_per_s"] == pytest.approx(float(csv_by_step[step]["monitor/tokens_per_s"]))
    assert any("val/task_acc" in h for h in history)
    weights = final_weights(checkpoints_newest_first(out / "checkpoints")[0])
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_sigkill_of_a_rank_then_restart_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    steps = ["max_steps=30", "callbacks.checkpointing.every_n_train_steps=10"]
    reference = tmp_path / "reference"
    _ok(run_ring_train(reference, *steps))

    out, ranks = tmp_path / "killed", tmp_path / "ranks"
    steps += ["+callbacks.ranks._target_=tests.app.helpers.RecordRanks", f"+callbacks.ranks.dir={ranks}"]
    proc = subprocess.Popen(ring_train_cmd(out, *steps), cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda: (out / "checkpoints" / "step000010.ckpt").exists(), proc)
        rank1 = json.loads((ranks / "rank1.json").read_text())
        assert rank1["ppid"] == proc.pid  # Lightning's rank 1, started by the command
        os.kill(rank1["pid"], signal.SIGKILL)
        killed_run, _ = proc.communicate(timeout=60)  # the job ends (no hang) without reaching its last step
        assert proc.returncode != 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "checkpoints" / "step000030.ckpt").exists()
    (failure,) = [ln for ln in killed_run.splitlines() if ln.startswith("[ring-train] rank 0 failed:")]
    # Rank 0 learns at once that its peer is gone, and is told so: not a timeout.
    assert "did not answer" not in failure and "timed out" not in failure.lower(), failure
    assert "closed" in failure.lower() or "reset by peer" in failure.lower(), failure

    stdout = _ok(run_ring_train(out, *steps))  # the same command again: resume=auto
    assert "resuming from" in stdout
    got = final_weights(out / "checkpoints" / "step000030.ckpt")
    want = final_weights(reference / "checkpoints" / "step000030.ckpt")
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.Popen(ring_train_cmd(out, "max_steps=100000", "callbacks.checkpointing.every_n_train_steps=1000"),
                            cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda: any((out / "csv").glob("version_*/metrics.csv")), proc)
        time.sleep(1.0)  # into the training loop
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stdout[-3000:]
    assert "SIGTERM received" in stdout and "stopped by         SIGTERM" in stdout
    (ckpt,) = checkpoints_newest_first(out / "checkpoints")
    step = torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]
    assert 0 < step < 100000
