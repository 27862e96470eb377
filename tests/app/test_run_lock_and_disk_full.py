"""The run-folder lock (one live process per run; a dead holder's lock is taken over) and a full disk (the
half-written files are removed and the error says where), on files written here (no training)."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ring_plugin.app.identity import RECORD, RunRecord, load_record, save_record
from ring_plugin.app.run_lock import LOCK, RunLockedError, acquire_run_lock, release_run_lock
from ring_plugin.callbacks.checkpoint_files import manifest_path, write_manifest
from ring_plugin.callbacks.checkpointing import save_atomic
from ring_plugin.callbacks.disk_full import DiskFullError
from tests import prefork

from .helpers import REPO, env, exited_pid


def _acquire_elsewhere(run_dir: Path) -> subprocess.CompletedProcess:
    code = f"from ring_plugin.app.run_lock import acquire_run_lock; acquire_run_lock({str(run_dir)!r}); print('got it')"
    return subprocess.run([prefork.python(), "-c", code], cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=300)


def test_a_live_holder_is_named_and_a_dead_ones_lock_is_taken_over(tmp_path: Path) -> None:
    lock = acquire_run_lock(tmp_path)
    holder = json.loads(lock.read_text())
    assert (holder["pid"], holder["host"]) == (os.getpid(), socket.gethostname())
    other = _acquire_elsewhere(tmp_path)
    assert other.returncode != 0 and "got it" not in other.stdout
    assert f"run folder {tmp_path} is in use by pid {os.getpid()} on {socket.gethostname()}" in other.stderr
    release_run_lock(lock)
    assert not lock.exists()

    dead = {"pid": exited_pid(), "host": socket.gethostname(), "process_start": "1", "started": "x", "command": "c"}
    (tmp_path / LOCK).write_text(json.dumps(dead))
    taken = _acquire_elsewhere(tmp_path)
    assert taken.returncode == 0 and "got it" in taken.stdout, taken.stderr
    assert f"took over the lock of {tmp_path} left by pid {dead['pid']}" in taken.stdout
    assert not (tmp_path / LOCK).exists()  # released when that process exited


def test_a_reused_pid_is_stale_and_another_hosts_lock_is_refused(tmp_path: Path) -> None:
    reused = {"pid": os.getppid(), "host": socket.gethostname(), "process_start": "-1", "started": "x", "command": "c"}
    (tmp_path / LOCK).write_text(json.dumps(reused))  # a live pid, but not the process that took the lock
    assert _acquire_elsewhere(tmp_path).returncode == 0
    remote = {**reused, "host": "another-host", "pid": 1234}
    (tmp_path / LOCK).write_text(json.dumps(remote))
    with pytest.raises(RunLockedError, match=rf"in use by pid 1234 on another-host .* if that process is gone, "
                                             rf"delete {tmp_path / LOCK}"):
        acquire_run_lock(tmp_path)
    assert json.loads((tmp_path / LOCK).read_text()) == remote  # never taken from a host it cannot check


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_while_saving_the_record_keeps_the_old_one(tmp_path: Path, monkeypatch) -> None:
    old = RunRecord(config={"a": 1}, wandb_id="w1")
    save_record(tmp_path, old)
    original = Path.write_text

    def half_write(self: Path, text: str, *args, **kwargs):
        original(self, "", *args, **kwargs)  # the temporary file exists, empty, when the disk fills
        _no_space()

    monkeypatch.setattr(Path, "write_text", half_write)
    with pytest.raises(DiskFullError, match=rf"^disk full at {tmp_path / RECORD} "):
        save_record(tmp_path, RunRecord(config={"a": 2}, wandb_id="w2"))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [RECORD]  # no 0-byte temporary left
    assert load_record(tmp_path).config == {"a": 1}


def test_full_disk_while_writing_a_checkpoint_or_its_manifest_leaves_no_partial(tmp_path: Path,
                                                                                monkeypatch) -> None:
    target = tmp_path / "step000010.ckpt"

    def save_then_fill(path: Path, weights_only: bool) -> None:
        Path(path).write_bytes(b"")
        _no_space()

    trainer = SimpleNamespace(is_global_zero=True, global_step=10, save_checkpoint=save_then_fill,
                              strategy=SimpleNamespace(barrier=lambda name: None))
    with pytest.raises(DiskFullError, match=rf"^disk full at {target} "):
        save_atomic(trainer, str(target))
    assert list(tmp_path.iterdir()) == []

    partial = tmp_path / "step000010.ckpt.partial"
    torch.save({"w": torch.ones(4)}, partial)
    monkeypatch.setattr(json, "dump", _no_space)
    with pytest.raises(DiskFullError, match=rf"^disk full at {manifest_path(target)} "):
        write_manifest(target, partial, 10, True, "run")
    assert list(tmp_path.iterdir()) == []  # neither the manifest's .partial nor the checkpoint's
