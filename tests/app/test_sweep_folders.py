"""Sweep job folders are named by the job's overrides: the same setting maps to the same folder, a new one to a
new folder; names stay valid folder names however long the overrides are."""

from __future__ import annotations

from ring_plugin.app.sweep_dirs import MAX_NAME, job_folder


def test_short_overrides_are_the_folder_name() -> None:
    assert job_folder("attention=sdpa,max_steps=100") == "attention=sdpa,max_steps=100"
    assert job_folder("") == "defaults"


def test_long_or_nested_overrides_are_shortened_with_a_hash() -> None:
    long = ",".join(f"model.key_{i}={i}" for i in range(20))
    assert job_folder(long) == job_folder(long) and len(job_folder(long)) <= MAX_NAME
    assert job_folder(long) != job_folder(long.replace("=19", "=20"))  # a changed value past the cut: new folder
    path = job_folder("data.train.path=/data/train.bin")
    assert "/" not in path and path.startswith("data.train.path=_data_train.bin-")
