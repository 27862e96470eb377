"""``ring-train`` (2 CPU processes, tiny model) with damaged checkpoints, restarts and a late rank: it falls
back to an older good checkpoint bit for bit, refuses to start over silently, rotates across restarts,
and a rank that starts late does not fail the rendezvous."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from ring_plugin.callbacks.checkpoint_files import checkpoints_newest_first, manifest_path

from .helpers import corrupt_tensor_bytes, final_weights, run_ring_train

pytestmark = pytest.mark.timeout(300)
QUICK = ["logger=[csv]", "callbacks.checkpointing.every_n_train_steps=5"]


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _assert_bitwise_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)


def test_damaged_newest_checkpoints_are_skipped_and_the_run_resumes_bit_for_bit(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [*QUICK, "max_steps=15", "callbacks.checkpointing.keep_last=3"]
    _ok(run_ring_train(out, *args))
    ckpts = out / "checkpoints"
    want = final_weights(ckpts / "step000015.ckpt")
    corrupt_tensor_bytes(ckpts / "step000015.ckpt")  # still a valid zip that loads
    data = (ckpts / "step000010.ckpt").read_bytes()
    (ckpts / "step000010.ckpt").write_bytes(data[: len(data) // 2])

    stdout = _ok(run_ring_train(out, *args))  # the same command again: resume=auto
    assert f"skipping checkpoint {ckpts / 'step000015.ckpt'}: checksum mismatch" in stdout, stdout[-3000:]
    assert f"skipping checkpoint {ckpts / 'step000010.ckpt'}: checksum mismatch" in stdout
    assert f"resuming from {ckpts / 'step000005.ckpt'}" in stdout
    assert "== ring-train summary (step 15) ==" in stdout
    _assert_bitwise_equal(final_weights(ckpts / "step000015.ckpt"), want)


def test_every_checkpoint_damaged_refuses_until_resume_never(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [*QUICK, "max_steps=10"]
    _ok(run_ring_train(out, *args))
    ckpts = out / "checkpoints"
    want = final_weights(ckpts / "step000010.ckpt")
    corrupt_tensor_bytes(ckpts / "step000010.ckpt")
    (ckpts / "step000005.ckpt").write_bytes(b"")
    damaged = {p: p.read_bytes() for p in checkpoints_newest_first(ckpts)}

    refused = run_ring_train(out, *args)
    text = refused.stdout + refused.stderr
    assert refused.returncode != 0 and "ring-train summary" not in text
    assert "resume=auto: none of the 2 checkpoint(s)" in text, text[-3000:]
    for path in damaged:
        assert f"{path}: checksum mismatch" in text
    assert "resume=never to start over" in text
    assert {p: p.read_bytes() for p in damaged} == damaged  # left exactly as they were

    stdout = _ok(run_ring_train(out, *args, "resume=never"))
    assert "moved 2 checkpoint(s) that this run will not continue from" in stdout
    assert "== ring-train summary (step 10) ==" in stdout and "resuming from" not in stdout
    (aside,) = ckpts.glob("set_aside_*")
    assert sorted(p.name for p in aside.glob("*.ckpt")) == ["step000005.ckpt", "step000010.ckpt"]
    _assert_bitwise_equal(final_weights(ckpts / "step000010.ckpt"), want)  # the same run again, from step 0


def test_keep_last_holds_across_restarts(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _ok(run_ring_train(out, *QUICK, "max_steps=10"))
    ckpts = out / "checkpoints"
    assert [p.name for p in checkpoints_newest_first(ckpts)] == ["step000010.ckpt", "step000005.ckpt"]
    stdout = _ok(run_ring_train(out, *QUICK, "max_steps=20"))  # resumes from step 10, writes 15 and 20
    assert f"resuming from {ckpts / 'step000010.ckpt'}" in stdout
    kept = checkpoints_newest_first(ckpts)
    assert [p.name for p in kept] == ["step000020.ckpt", "step000015.ckpt"]
    assert sorted(ckpts.glob("*.manifest.json")) == sorted(manifest_path(p) for p in kept)


@pytest.mark.parametrize("startup_timeout", [None, 4])
def test_a_late_rank_joins_when_comm_timeout_is_small(tmp_path: Path, startup_timeout: int | None) -> None:
    late = ["+callbacks.late._target_=tests.app.helpers.LateStart", "+callbacks.late.seconds=14"]
    args = [*QUICK, "max_steps=2", "comm_timeout=6", *late]
    if startup_timeout is not None:  # the rendezvous waits only as long as a peer would: the late rank misses it
        args.append(f"++strategy.startup_timeout={startup_timeout}")
    proc = run_ring_train(tmp_path / "run", *args, timeout=200)
    if startup_timeout is None:  # default start-up timeout: minutes, independent of comm_timeout
        assert "== ring-train summary (step 2) ==" in _ok(proc)
        return
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "ring-train summary" not in text
    assert "DistStoreError" in text and "1/2 clients joined" in text, text[-3000:]
