"""Data determinism and labels; newest-complete checkpoint selection with a damaged newest file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ring_plugin.app.resume import resolve_resume
from ring_plugin.callbacks.checkpoint_files import newest_complete_checkpoint, write_manifest
from ring_plugin.callbacks.checkpoint_owner import write_owner
from ring_plugin.data import AssociativeRecall, ByteTextDataset, PasskeyRetrieval, StepSampler, TokenFileDataset


def test_passkey_is_deterministic_and_scores_only_the_answer() -> None:
    a, b = PasskeyRetrieval(128, 32, 50, 4, seed=3), PasskeyRetrieval(128, 32, 50, 4, seed=3)
    s = a[7]
    assert torch.equal(s["input_ids"], b[7]["input_ids"]) and not torch.equal(s["input_ids"], a[8]["input_ids"])
    scored = (s["labels"] != -100).nonzero().flatten()
    assert scored.tolist() == [123, 124, 125, 126]
    assert torch.equal(s["labels"][scored], s["input_ids"][scored + 1])
    key = (s["input_ids"] == 10).nonzero().item()
    assert torch.equal(s["input_ids"][key + 1 : key + 5], s["input_ids"][-4:])  # the answer is the hidden key


def test_associative_recall_answers_match_the_pairs() -> None:
    s = AssociativeRecall(64, 32, 10, num_pairs=6, num_queries=3, seed=1)[2]
    ids, labels = s["input_ids"].tolist(), s["labels"]
    pairs = dict(zip(ids[0:12:2], ids[1:12:2]))
    for t in (labels != -100).nonzero().flatten().tolist():
        assert pairs[ids[t]] == labels[t]


def test_step_sampler_splits_rings_and_depends_only_on_step() -> None:
    r0 = list(StepSampler(100, 2, rank=0, num_replicas=2, num_steps=3))
    r1 = list(StepSampler(100, 2, rank=1, num_replicas=2, num_steps=3))
    assert r0 == [0, 1, 4, 5, 8, 9] and r1 == [2, 3, 6, 7, 10, 11]


def test_token_and_byte_files(tmp_path: Path) -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    tokens.tofile(tmp_path / "train.bin")
    ds = TokenFileDataset(tmp_path / "train.bin", seq_len=10)
    assert len(ds) == 99 and ds[1]["input_ids"].tolist() == list(range(10, 20))
    assert ds[1]["labels"].tolist() == list(range(11, 21)) and ds[1]["input_ids"].dtype == torch.int64
    (tmp_path / "t.txt").write_bytes(b"hello ring world")
    assert ByteTextDataset(tmp_path / "t.txt", seq_len=4)[0]["labels"].tolist() == list(b"ello")
    with pytest.raises(ValueError, match="dtype='int8'"):
        TokenFileDataset(tmp_path / "train.bin", seq_len=10, dtype="int8")


def test_damaged_newest_checkpoint_falls_back_to_previous(tmp_path: Path) -> None:
    write_owner(tmp_path, "run")
    for step in (10, 20):
        path = tmp_path / f"step{step:06d}.ckpt"
        torch.save({"global_step": step}, path)
        write_manifest(path, path, step, True, "run")
    (tmp_path / "step000030.ckpt.partial").write_bytes(b"interrupted write")  # never a candidate
    assert newest_complete_checkpoint(tmp_path) == tmp_path / "step000020.ckpt"
    data = (tmp_path / "step000020.ckpt").read_bytes()
    (tmp_path / "step000020.ckpt").write_bytes(data[: len(data) // 2])  # truncated
    assert newest_complete_checkpoint(tmp_path) == tmp_path / "step000010.ckpt"
    assert resolve_resume("auto", tmp_path) == str(tmp_path / "step000010.ckpt")
    assert resolve_resume("never", tmp_path) is None
    with pytest.raises(FileNotFoundError, match="resume="):
        resolve_resume(str(tmp_path / "missing.ckpt"), tmp_path)
