"""Packed data: labels stop at document boundaries, positions restart, ids agree, all three sources, config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from ring_plugin.data import PackedSynthetic, PackedTextFolder, PackedTokenFile, packed_documents
from ring_plugin.documents import document_ids_from_position_ids

from .test_config import compose_app

EOT = 9


def _check_consistent(sample: dict[str, torch.Tensor], seq_len: int) -> None:
    assert set(sample) == {"input_ids", "labels", "position_ids", "document_ids"}
    for v in sample.values():
        assert v.shape == (seq_len,) and v.dtype == torch.int64
    assert torch.equal(sample["document_ids"], document_ids_from_position_ids(sample["position_ids"]))


def test_token_file_splits_at_end_of_text(tmp_path: Path) -> None:
    # Documents [1 2 EOT] [3 4 5 EOT] [6 EOT] [7 8 ...: the end-of-text token closes its document.
    stream = np.array([1, 2, EOT, 3, 4, 5, EOT, 6, EOT, 7, 8, 10, 11], dtype=np.uint16)
    stream.tofile(tmp_path / "train.bin")
    ds = PackedTokenFile(tmp_path / "train.bin", seq_len=6, eot_token=EOT)
    s = ds[0]  # window 1 2 EOT 3 4 5 | label-only 6th token: EOT
    _check_consistent(s, 6)
    assert s["input_ids"].tolist() == [1, 2, EOT, 3, 4, 5]
    assert s["labels"].tolist() == [2, EOT, -100, 4, 5, EOT]
    assert s["position_ids"].tolist() == [0, 1, 2, 0, 1, 2]
    assert s["document_ids"].tolist() == [0, 0, 0, 1, 1, 1]
    s = ds[1]  # starts after the first window, mid-stream: positions restart at the sample start
    assert s["input_ids"].tolist() == [EOT, 6, EOT, 7, 8, 10]
    assert s["labels"].tolist() == [-100, EOT, -100, 8, 10, 11]
    assert s["position_ids"].tolist() == [0, 0, 1, 0, 1, 2]
    assert s["document_ids"].tolist() == [0, 1, 1, 2, 2, 2]
    with pytest.raises(ValueError, match="eot_token=70000"):
        PackedTokenFile(tmp_path / "train.bin", seq_len=6, eot_token=70000)


def test_text_folder_one_file_one_document(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_bytes(b"abc")
    (tmp_path / "b.txt").write_bytes(b"")  # empty: no document
    (tmp_path / "sub" / "c.txt").write_bytes(b"defgh")
    (tmp_path / "d.txt").write_bytes(b"ij")
    ds = PackedTextFolder(tmp_path, seq_len=4, stride=3)  # sorted: a.txt, d.txt, sub/c.txt -> abc ij defgh
    assert ds.vocab_size == 256 and len(ds) == 2
    s = ds[0]
    _check_consistent(s, 4)
    assert s["input_ids"].tolist() == list(b"abci")
    assert s["labels"].tolist() == [ord("b"), ord("c"), -100, ord("j")]
    assert s["position_ids"].tolist() == [0, 1, 2, 0]
    s = ds[1]  # bytes 3..7: i j d e | f
    assert s["input_ids"].tolist() == list(b"ijde")
    assert s["labels"].tolist() == [ord("j"), -100, ord("e"), ord("f")]
    assert s["document_ids"].tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="no non-empty file"):
        PackedTextFolder(tmp_path, seq_len=4, pattern="*.md")
    with pytest.raises(FileNotFoundError, match="path="):
        PackedTextFolder(tmp_path / "a.txt", seq_len=4)


def test_synthetic_documents_repeat_a_pattern_and_are_deterministic() -> None:
    ds = PackedSynthetic(seq_len=256, vocab_size=64, num_samples=10, mean_doc_len=24, max_period=5, seed=5)
    s = ds[3]
    _check_consistent(s, 256)
    assert torch.equal(s["input_ids"], PackedSynthetic(256, 64, 10, 24, max_period=5, seed=5)[3]["input_ids"])
    assert not torch.equal(s["input_ids"], ds[4]["input_ids"])
    ids, labels, doc = s["input_ids"], s["labels"], s["document_ids"]
    last_of_doc = torch.cat([doc[1:] != doc[:-1], torch.tensor([True])])
    assert torch.equal(labels == -100, last_of_doc)  # -100 exactly where the next token is another document's
    assert torch.equal(labels[~last_of_doc], ids[1:][~last_of_doc[:-1]])
    for d in range(int(doc[-1]) + 1):
        tokens = ids[doc == d].tolist()
        # The period: the first repeated token; the pattern's tokens are distinct and then repeat.
        period = next((i for i in range(1, len(tokens)) if tokens[i] == tokens[0]), len(tokens))
        assert 2 <= period <= 5 or period == len(tokens) < 5
        assert len(set(tokens[:period])) == period and min(tokens) >= 13
        assert tokens == [tokens[i % period] for i in range(len(tokens))]
    assert int(doc[-1]) >= 3  # several documents per sample
    one = PackedSynthetic(seq_len=16, vocab_size=64, num_samples=1, mean_doc_len=1000, seed=0)[0]  # one document
    assert one["document_ids"].tolist() == [0] * 16 and one["position_ids"].tolist() == list(range(16))
    assert one["labels"].tolist() == one["input_ids"][1:].tolist() + [-100]
    with pytest.raises(ValueError, match="max_period=60"):
        PackedSynthetic(vocab_size=64, max_period=60)


def test_packed_documents_factory_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="source='tokens'"):
        packed_documents("tokens")
    with pytest.raises(ValueError, match="path is required"):
        packed_documents("text_folder", seq_len=8)
    np.zeros(20, dtype=np.uint16).tofile(tmp_path / "t.bin")
    with pytest.raises(ValueError, match="eot_token is required"):
        packed_documents("token_file", seq_len=8, path=str(tmp_path / "t.bin"))
    assert isinstance(packed_documents("token_file", seq_len=8, path=str(tmp_path / "t.bin"), eot_token=0),
                      PackedTokenFile)


def test_data_packed_config_builds_train_and_val(tmp_path: Path) -> None:
    cfg = compose_app("data=packed", "seq_len=64")
    dm = instantiate(cfg.data)
    assert isinstance(dm.train_set, PackedSynthetic) and dm.train_set.seq_len == 64
    assert dm.val_set.seed == 999983 and len(dm.val_set) == 256
    batch = next(iter(dm.train_dataloader()))
    assert batch["document_ids"].shape == (cfg.data.batch_size, 64)
    np.array([1, 2, 3, EOT] * 40, dtype=np.uint16).tofile(tmp_path / "t.bin")
    cfg = compose_app("data=packed", "seq_len=64", "data.train.source=token_file", f"data.train.path={tmp_path}/t.bin",
                      f"data.val.path={tmp_path}/t.bin", f"data.train.eot_token={EOT}")
    dm = instantiate(cfg.data)
    assert isinstance(dm.val_set, PackedTokenFile) and dm.val_set[0]["position_ids"][:5].tolist() == [0, 1, 2, 3, 0]
