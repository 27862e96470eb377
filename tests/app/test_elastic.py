"""A silent ring peer under ``torchrun``: the job fails with a clear error within ``comm_timeout``, then
``--max-restarts=1`` brings it back from the newest checkpoint and it ends bit for bit where the same job without
the hang ends (CPU, 2 processes, tiny model)."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from ring_plugin.callbacks.checkpoint_files import checkpoints_newest_first
from ring_plugin.testing import free_port
from tests import prefork

from .helpers import REPO, TINY, env

pytestmark = pytest.mark.timeout(400)
COMM_TIMEOUT = 8


def _torchrun_cmd(out: Path, marker: Path, restarts: int, hang_step: int) -> list[str]:
    # Static rendezvous: rank 0 hosts a fresh store on every attempt (the agent's store, which --standalone
    # reuses across restarts, can hand the restarted ranks stale gloo addresses: "connectFullMesh failed").
    return [
        prefork.python(), "-m", "torch.distributed.run", "--rdzv-backend=static", "--master-addr=127.0.0.1",
        f"--master-port={free_port()}", "--nnodes=1", "--node-rank=0", "--nproc-per-node=2",
        f"--max-restarts={restarts}",
        "--monitor-interval=0.5", "-m", "ring_plugin.app.train", f"hydra.run.dir={out}", *TINY,
        "max_steps=16", "callbacks.checkpointing.every_n_train_steps=8", "trainer.val_check_interval=100",
        f"comm_timeout={COMM_TIMEOUT}", "logger=[csv]",
        "+callbacks.hang._target_=tests.app.helpers.HangOnce", f"+callbacks.hang.step={hang_step}",
        f"+callbacks.hang.marker={marker}",
    ]


@pytest.mark.parametrize("restarts", [0, 1])
def test_silent_peer_times_out_and_torchrun_restarts_from_the_checkpoint(tmp_path: Path, restarts: int) -> None:
    out, marker = tmp_path / "run", tmp_path / "hung_at"
    cmd = _torchrun_cmd(out, marker, restarts, hang_step=10)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: lines.extend((time.time(), ln) for ln in proc.stdout), daemon=True)
    reader.start()
    try:
        proc.wait(timeout=170)  # hard limit: a hang fails the test instead of stalling CI
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(timeout=10)
    text = "".join(ln for _, ln in lines)
    (tmp_path / "torchrun.log").write_text(text)

    # (e) the first attempt ended with the ring's own error, within the configured timeout of going silent.
    hung_at = float(marker.read_text())
    errors = [t for t, ln in lines if "failed: RingTimeoutError" in ln and "did not answer" in ln]
    assert errors, text[-4000:]
    assert errors[0] - hung_at < COMM_TIMEOUT + 10, (errors[0] - hung_at, text[-4000:])

    if restarts == 0:  # the job ends: no hang, no final checkpoint
        assert proc.returncode != 0 and not (out / "checkpoints" / "step000016.ckpt").exists()
        return
    assert proc.returncode == 0, text[-4000:]
    # ... and the elastic restart resumed from the last checkpoint before the hang and finished the run.
    assert f"resuming from {out / 'checkpoints' / 'step000008.ckpt'}" in text, text[-4000:]
    assert "== ring-train summary (step 16) ==" in text
    newest = checkpoints_newest_first(out / "checkpoints")[0]
    state = torch.load(newest, map_location="cpu", weights_only=False)
    assert newest.name == "step000016.ckpt" and state["global_step"] == 16
    # The restarted run ends bit for bit where the same job without a hang ends (the callback never fires).
    reference = tmp_path / "uninterrupted"
    ran = subprocess.run(_torchrun_cmd(reference, tmp_path / "never", 0, hang_step=1000), cwd=REPO, env=env(),
                         capture_output=True, text=True, timeout=170)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    want = torch.load(reference / "checkpoints" / "step000016.ckpt", map_location="cpu", weights_only=False)
    assert state["state_dict"].keys() == want["state_dict"].keys()
    for name, weight in want["state_dict"].items():
        torch.testing.assert_close(state["state_dict"][name], weight, rtol=0, atol=0, msg=name)
