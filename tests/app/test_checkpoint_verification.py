"""Checkpoint manifests, verification, resume decisions and rotation, on files written here (no training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ring_plugin.app.resume import ResumeError, resolve_resume
from ring_plugin.callbacks.checkpoint_files import (
    checkpoints_newest_first,
    manifest_path,
    rotate,
    scan,
    verify,
    write_manifest,
)
from ring_plugin.callbacks.checkpoint_owner import write_owner

from .helpers import corrupt_tensor_bytes

RUN_ID = "run-under-test"


def _write(directory: Path, step: int, healthy: bool = True, manifest: bool = True, run_id: str = RUN_ID) -> Path:
    """A checkpoint as the callback writes it into a folder of run ``RUN_ID``: saved, manifest from its bytes,
    then in place."""
    write_owner(directory, RUN_ID, "under-test", str(directory.parent))
    path = directory / f"step{step:06d}.ckpt"
    partial = path.with_name(path.name + ".partial")
    torch.save({"global_step": step, "state_dict": {"w": torch.full((64, 64), float(step))}}, partial)
    if manifest:
        write_manifest(path, partial, step, healthy, run_id)
    partial.rename(path)
    return path


def test_corrupt_tensor_bytes_inside_a_valid_zip_are_caught_and_skipped(tmp_path: Path, capsys) -> None:
    older, newest = _write(tmp_path, 5), _write(tmp_path, 10)
    corrupt_tensor_bytes(newest)
    loaded = torch.load(newest, map_location="cpu", weights_only=False)  # the damage is invisible to a load ...
    assert loaded["global_step"] == 10 and torch.isfinite(loaded["state_dict"]["w"]).all()
    assert loaded["state_dict"]["w"].max() > 1e38  # ... yet the weights are garbage
    assert verify(newest) == f"checksum mismatch in {newest} (damaged since it was written)"
    assert verify(older) is None
    assert resolve_resume("auto", tmp_path) == str(older)
    assert f"skipping checkpoint {newest}: checksum mismatch" in capsys.readouterr().out


def test_every_checkpoint_damaged_refuses_then_never_sets_them_aside(tmp_path: Path) -> None:
    truncated, corrupt = _write(tmp_path, 5), _write(tmp_path, 10)
    truncated.write_bytes(truncated.read_bytes()[:100])
    corrupt_tensor_bytes(corrupt)
    before = {p: p.read_bytes() for p in (truncated, corrupt)}
    with pytest.raises(ResumeError) as info:
        resolve_resume("auto", tmp_path)
    message = str(info.value)
    assert f"{truncated}: checksum mismatch" in message and f"{corrupt}: checksum mismatch" in message
    assert "none of the 2 checkpoint(s)" in message and "resume=never" in message
    assert {p: p.read_bytes() for p in before} == before  # nothing deleted or changed by the refusal

    assert resolve_resume("never", tmp_path) is None  # starting over: the damaged files are kept aside
    assert checkpoints_newest_first(tmp_path) == []
    (aside,) = tmp_path.glob("set_aside_*")
    assert sorted(p.name for p in aside.iterdir()) == sorted(
        [truncated.name, corrupt.name, manifest_path(truncated).name, manifest_path(corrupt).name])
    assert resolve_resume("auto", tmp_path) is None  # a fresh run now, not a refusal


def test_explicit_resume_verifies_and_sets_newer_checkpoints_aside(tmp_path: Path) -> None:
    old, newer = _write(tmp_path, 5), _write(tmp_path, 10)
    assert resolve_resume(str(old), tmp_path) == str(old)
    assert checkpoints_newest_first(tmp_path) == [old]  # step 10 belongs to the abandoned timeline
    assert (next(tmp_path.glob("set_aside_*")) / newer.name).exists()
    corrupt_tensor_bytes(old)
    with pytest.raises(ResumeError, match="checksum mismatch"):
        resolve_resume(str(old), tmp_path)


def test_checkpoint_without_this_runs_manifest_is_foreign_and_left_alone(tmp_path: Path, capsys) -> None:
    own = _write(tmp_path, 5)
    bare, other = _write(tmp_path, 10, manifest=False), _write(tmp_path, 15, run_id="another-run")
    assert verify(bare) == "no manifest: not written by this run, left alone"
    assert verify(other) == ("written by another run (run id another-run, this folder's is run-under-test), "
                             "left alone")
    found = scan(tmp_path)
    assert found.found == own and found.rejected == []
    assert found.foreign == [(other, verify(other)), (bare, verify(bare))]
    assert f"ignoring {other}: written by another run" in capsys.readouterr().out
    assert resolve_resume("auto", tmp_path) == str(own)
    assert resolve_resume("never", tmp_path) is None  # starting over sets aside this run's only
    assert checkpoints_newest_first(tmp_path) == [other, bare]


def test_rollback_candidates_skip_checkpoints_written_while_skipping(tmp_path: Path, capsys) -> None:
    good, unhealthy = _write(tmp_path, 5), _write(tmp_path, 10, healthy=False)
    assert json.loads(manifest_path(unhealthy).read_text())["healthy"] is False
    assert scan(tmp_path).found == unhealthy  # resuming from it is fine: its weights are intact
    found = scan(tmp_path, healthy_only=True)
    assert found.found == good
    assert found.rejected == [(unhealthy, "written while non-finite steps were being skipped")]
    assert "skipping checkpoint" in capsys.readouterr().out


def test_rotation_counts_earlier_attempts_and_keeps_the_last_good(tmp_path: Path) -> None:
    paths = {step: _write(tmp_path, step) for step in (5, 10, 15, 20, 25)}
    orphan = manifest_path(tmp_path / "step000030.ckpt")
    orphan.write_text(json.dumps({"run_id": RUN_ID}))  # a write interrupted between manifest and rename
    deleted = rotate(tmp_path, keep_last=2, protect={paths[10]})
    assert sorted(deleted) == [paths[5], paths[15]]
    assert checkpoints_newest_first(tmp_path) == [paths[25], paths[20], paths[10]]
    assert sorted(p.name for p in tmp_path.glob("*.manifest.json")) == sorted(
        manifest_path(paths[s]).name for s in (10, 20, 25))


def test_rotation_neither_counts_nor_deletes_junk_or_another_runs_checkpoints(tmp_path: Path) -> None:
    own = {step: _write(tmp_path, step) for step in (5, 10)}
    junk = tmp_path / "step000900.ckpt"
    junk.write_bytes(b"not a checkpoint")
    foreign = _write(tmp_path, 800, run_id="another-run")
    foreign_orphan = manifest_path(tmp_path / "step000700.ckpt")
    foreign_orphan.write_text(json.dumps({"run_id": "another-run"}))
    assert rotate(tmp_path, keep_last=2, protect=set()) == []  # two of this run's: nothing to delete
    assert rotate(tmp_path, keep_last=1, protect=set()) == [own[5]]
    assert checkpoints_newest_first(tmp_path) == [junk, foreign, own[10]]
    assert junk.read_bytes() == b"not a checkpoint" and foreign_orphan.exists() and manifest_path(foreign).exists()


def test_directory_checkpoints_verify_every_file(tmp_path: Path) -> None:
    """DeepSpeed writes a directory per checkpoint: each of its files is in the manifest."""
    path, partial = tmp_path / "step000005.ckpt", tmp_path / "step000005.ckpt.partial"
    (partial / "checkpoint").mkdir(parents=True)
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_1_optim_states.pt"):
        torch.save({"w": torch.arange(100.0)}, partial / "checkpoint" / name)
    write_owner(tmp_path, RUN_ID)
    write_manifest(path, partial, 5, True, RUN_ID)
    partial.rename(path)
    assert verify(path) is None
    shard = path / "checkpoint" / "zero_pp_rank_1_optim_states.pt"
    corrupt_tensor_bytes(shard, count=64)
    assert verify(path) == f"checksum mismatch in {shard} (damaged since it was written)"
    shard.unlink()
    assert verify(path) == f"{shard} is missing"
