"""Packed documents' plans are built once per content: every layer of a step (and a call's forward,
backward and peers' plans) reuses the checked ids, their blocks and varlen runs; bad ids are judged
on every call; blocks are cut to the rows that share a document."""

from __future__ import annotations

import pytest
import torch

from ring_plugin.attention.documents import gather_documents
from ring_plugin.attention.plan import Block


def _ids(lengths: list[int]) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]


def test_same_ids_reuse_the_checked_documents_and_their_blocks():
    first = gather_documents(_ids([5, 11]), None, "contiguous", 1)
    again = gather_documents(_ids([5, 11]), None, "contiguous", 1)
    other = gather_documents(_ids([6, 10]), None, "contiguous", 1)
    assert again is first and other is not first
    dense = [Block(slice(0, 16), slice(0, 16), True)]
    blocks = first.blocks(dense, 0, 0)
    assert again.blocks(dense, 0, 0) is blocks
    assert blocks[0].runs(torch.device("cpu")) is blocks[0].runs(torch.device("cpu"))
    assert blocks[0].runs(torch.device("cpu")).cu_q.tolist() == [0, 5, 16]


def test_bad_ids_raise_on_every_call():
    for _ in range(2):
        with pytest.raises(ValueError, match="non-decreasing"):
            gather_documents(torch.tensor([[0, 0, 1, 0]]), None, "contiguous", 1)


def test_blocks_are_cut_to_the_rows_that_share_a_document():
    # rows 0..7 hold documents 0 (rows 0-2), 1 (3-5), 2 (6-7); queries 4..7 against keys 0..3 share
    # document 1 only: queries 4-5 and key 3
    docs = gather_documents(_ids([3, 3, 2]), None, "contiguous", 1)
    (block,) = docs.blocks([Block(slice(4, 8), slice(0, 4), False)], 0, 0)
    assert (block.q, block.kv) == (slice(4, 6), slice(3, 4))
    assert block.q_docs.tolist() == [[1, 1]] and block.k_docs.tolist() == [[1]]
    # no shared document: no block; a causal diagonal block stays whole
    assert docs.blocks([Block(slice(6, 8), slice(0, 3), False)], 0, 0) == []
    (diag,) = docs.blocks([Block(slice(0, 8), slice(0, 8), True)], 0, 0)
    assert (diag.q, diag.kv) == (slice(0, 8), slice(0, 8))
