"""A run's folder belongs to its run: another run cannot take its checkpoints, a second start is refused
while it runs, nothing in its checkpoints folder is unpickled unless this run wrote and verified it, and a
failed forced resume leaves its record as it was. 2 ranks on CPU, one trained run shared by the tests."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from ring_plugin.app.run_lock import LOCK
from ring_plugin.callbacks.checkpoint_files import checkpoints_newest_first

from .helpers import REPO, env, exited_pid, read_csv_metrics, ring_train_cmd, run_ring_train

VICTIM_STEPS = 10


class CreatesMarker:
    """Unpickling this creates ``path``: proof that a file was unpickled with ``weights_only=False``."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def plant_payload(checkpoint: Path, marker: Path) -> None:
    """A ``stepN.ckpt`` (a file, or a DeepSpeed-style directory when ``checkpoint`` ends in '/') that runs code
    when unpickled, without a manifest."""
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "global_step": 999999, "payload": CreatesMarker(marker)}, checkpoint)


@pytest.fixture(scope="module")
def victim(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A completed run, and what a second identical start printed while it was running."""
    out = tmp_path_factory.mktemp("victim") / "run"
    first = subprocess.Popen(ring_train_cmd(out, "name=dup", f"max_steps={VICTIM_STEPS}"), cwd=REPO, env=env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (out / LOCK).exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    holder = json.loads((out / LOCK).read_text())
    second = run_ring_train(out, "name=dup", f"max_steps={VICTIM_STEPS}", timeout=120)
    still_running = first.poll() is None
    stdout, stderr = first.communicate(timeout=180)
    assert first.returncode == 0, stderr[-3000:]
    return {"out": out, "holder": holder, "second": second, "first_running": still_running,
            "first_stdout": stdout}


def _copy(victim: dict[str, Any], dest: Path) -> Path:
    shutil.copytree(victim["out"], dest, symlinks=True)
    return dest


def test_second_start_of_a_running_run_is_refused_naming_the_process(victim: dict[str, Any]) -> None:
    second, holder = victim["second"], victim["holder"]
    assert victim["first_running"]  # refused while the first one still trains, not after it
    assert second.returncode != 0
    assert (f"run folder {victim['out']} is in use by pid {holder['pid']} on {socket.gethostname()}"
            in second.stderr), second.stderr[-2000:]
    assert holder["host"] == socket.gethostname()
    assert not (victim["out"] / LOCK).exists()  # released when the run ended
    steps = [int(row["step"]) for row in read_csv_metrics(victim["out"]) if row.get("train/loss")]
    assert len(steps) == len(set(steps))  # every step logged once: the second start trained nothing


def test_another_run_is_refused_on_a_runs_checkpoints(victim: dict[str, Any], tmp_path: Path) -> None:
    ckpts = victim["out"] / "checkpoints"
    before = {p.name: p.read_bytes() for p in ckpts.iterdir() if p.is_file() and not p.is_symlink()}
    thief = run_ring_train(tmp_path / "thief", "name=thief", f"paths.checkpoints={ckpts}", "model.lr=0.5",
                           "max_steps=15", timeout=120)
    assert thief.returncode != 0
    record = yaml.safe_load((victim["out"] / "run.yaml").read_text())
    assert (f"paths.checkpoints={ckpts} belongs to run 'dup' ({victim['out'].resolve()}, run id "
            f"{record['run_id']}); this run 'thief' ({(tmp_path / 'thief').resolve()}") in thief.stderr, \
        thief.stderr[-2000:]
    assert {p.name: p.read_bytes() for p in ckpts.iterdir() if p.is_file() and not p.is_symlink()} == before
    assert not (tmp_path / "thief" / "csv").exists()  # refused before anything was built


def test_moving_paths_checkpoints_away_from_the_runs_checkpoints_is_refused(victim: dict[str, Any],
                                                                            tmp_path: Path) -> None:
    out = _copy(victim, tmp_path / "run")
    moved = tmp_path / "moved"
    result = run_ring_train(out, "name=dup", f"max_steps={VICTIM_STEPS + 5}", f"paths.checkpoints={moved}",
                            timeout=120)
    assert result.returncode != 0
    assert (f"paths.checkpoints moved from {out / 'checkpoints'} to {moved}, but run 'dup' has its "
            f"checkpoints in") in result.stderr, result.stderr[-2000:]
    assert not moved.exists() and len(read_csv_metrics(out)) == len(read_csv_metrics(victim["out"]))


def test_planted_pickle_is_never_loaded_and_a_stale_lock_is_taken_over(victim: dict[str, Any],
                                                                       tmp_path: Path) -> None:
    """DDP: a manifest-less step999999.ckpt whose unpickling creates a file is reported and left alone; the
    run resumes from its own newest checkpoint. A lock left by a process that is gone does not block it."""
    out = _copy(victim, tmp_path / "run")
    marker, payload = tmp_path / "marker", out / "checkpoints" / "step999999.ckpt"
    plant_payload(payload, marker)
    (out / LOCK).write_text(json.dumps({"pid": exited_pid(), "host": socket.gethostname(), "process_start": "1",
                                        "started": "earlier", "command": "ring-train"}))
    result = run_ring_train(out, "name=dup", f"max_steps={VICTIM_STEPS + 5}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not marker.exists()
    assert f"ignoring {payload}: no manifest: not written by this run, left alone" in result.stdout
    assert f"resuming from {out / 'checkpoints' / f'step{VICTIM_STEPS:06d}.ckpt'}" in result.stdout + result.stderr
    assert "took over the lock of" in result.stdout
    assert payload.exists()  # left alone, and not counted by rotation (keep_last=2 of this run's own)
    assert [p.name for p in checkpoints_newest_first(out / "checkpoints")] == [
        "step999999.ckpt", f"step{VICTIM_STEPS + 5:06d}.ckpt", f"step{VICTIM_STEPS:06d}.ckpt"]


def test_failed_forced_resume_leaves_the_record_unchanged(victim: dict[str, Any], tmp_path: Path) -> None:
    out = _copy(victim, tmp_path / "run")
    record = (out / "run.yaml").read_bytes()
    forced = run_ring_train(out, "name=dup", f"max_steps={VICTIM_STEPS + 5}", "resume=force", "model.lr=0.5",
                            "+callbacks.fail._target_=tests.app.helpers.FailRestore")
    assert forced.returncode != 0 and "restore failed on purpose" in forced.stderr, forced.stderr[-2000:]
    assert (out / "run.yaml").read_bytes() == record
    again = run_ring_train(out, "name=dup", f"max_steps={VICTIM_STEPS}")
    assert again.returncode == 0 and f"run 'dup' is complete ({VICTIM_STEPS} steps" in again.stdout + again.stderr


def test_deepspeed_never_loads_a_planted_checkpoint_directory(tmp_path: Path) -> None:
    """DeepSpeed: a manifest-less checkpoint directory is never handed to DeepSpeed (which unpickles)."""
    out, marker = tmp_path / "run", tmp_path / "marker"
    payload = out / "checkpoints" / "step999999.ckpt"
    plant_payload(payload / "checkpoint" / "mp_rank_00_model_states.pt", marker)
    result = run_ring_train(out, "strategy=deepspeed", "max_steps=2", "callbacks.checkpointing.every_n_train_steps=2",
                            timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not marker.exists() and (payload / "checkpoint" / "mp_rank_00_model_states.pt").exists()
    assert f"ignoring {payload}: no manifest" in result.stdout
    assert "resuming from" not in result.stdout + result.stderr


def test_no_module_unpickles_with_weights_only_false() -> None:
    """Every load in the package is ``weights_only=True`` (saving a full state is not loading)."""
    offenders = []
    for path in (REPO / "ring_plugin").rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "weights_only=False" in line and "save_checkpoint(" not in line:
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
            if ("torch.load(" in line or "load_checkpoint(" in line) and "weights_only=True" not in line \
                    and "def " not in line:
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert offenders == []
