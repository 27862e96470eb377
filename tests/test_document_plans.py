"""A packed batch's plan is built once where the batch is cut: every layer of the step (and a call's
forward, backward and peers' plans) reuses its blocks and varlen runs; bad ids are refused when the plan
is made; blocks are cut to the rows that share a document; nothing is kept by content across batches."""

from __future__ import annotations

import pytest
import torch

from ring_plugin.attention.plan import Block
from ring_plugin.shard_plan import plan_shards


def _ids(lengths: list[int]) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]


def test_a_plan_builds_its_blocks_once_and_a_new_batch_gets_a_new_plan():
    first = plan_shards("contiguous", 0, 1, _ids([5, 11]))
    again = plan_shards("contiguous", 0, 1, _ids([5, 11]))
    assert again.documents is not first.documents  # no cache keyed by the ids' content
    dense = [Block(slice(0, 16), slice(0, 16), True)]
    blocks = first.documents.blocks(dense, 0, 0)
    assert first.documents.blocks(dense, 0, 0) is blocks
    assert blocks[0].runs(torch.device("cpu")) is blocks[0].runs(torch.device("cpu"))
    assert blocks[0].runs(torch.device("cpu")).cu_q.tolist() == [0, 5, 16]
    assert first.positions(16).tolist() == list(range(16))


def test_a_plan_holds_each_ranks_ids_and_positions():
    ids = _ids([3, 9, 4])
    plan = plan_shards("zigzag", 1, 2, ids)
    assert plan.layout.chunks == ((0, 3), (1, 2))
    assert plan.local_ids.tolist() == [[1, 1, 1, 1, 1, 1, 1, 1]]
    assert plan.positions(8).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    assert plan.documents.by_rank[0].tolist() == [[0, 0, 0, 1, 2, 2, 2, 2]]
    assert (plan.ring_rank, plan.ulysses_rank) == (1, 0)
    assert plan_shards("zigzag", 3, 4, ids, ulysses_size=2).ring_rank == 1


def test_bad_ids_are_refused_when_the_plan_is_made():
    with pytest.raises(ValueError, match="non-decreasing"):
        plan_shards("contiguous", 0, 1, torch.tensor([[0, 0, 1, 0]]))
    with pytest.raises(ValueError, match="layout='balanced' balances packed documents"):
        plan_shards("balanced", 0, 2, None)


def test_blocks_are_cut_to_the_rows_that_share_a_document():
    # rows 0..7 hold documents 0 (rows 0-2), 1 (3-5), 2 (6-7); queries 4..7 against keys 0..3 share
    # document 1 only: queries 4-5 and key 3
    docs = plan_shards("contiguous", 0, 1, _ids([3, 3, 2])).documents
    (block,) = docs.blocks([Block(slice(4, 8), slice(0, 4), False)], 0, 0)
    assert (block.q, block.kv) == (slice(4, 6), slice(3, 4))
    assert block.q_docs.tolist() == [[1, 1]] and block.k_docs.tolist() == [[1]]
    # no shared document: no block; a causal diagonal block stays whole
    assert docs.blocks([Block(slice(6, 8), slice(0, 3), False)], 0, 0) == []
    (diag,) = docs.blocks([Block(slice(0, 8), slice(0, 8), True)], 0, 0)
    assert (diag.q, diag.kv) == (slice(0, 8), slice(0, 8))
