"""Misuse the shard plan makes impossible or refuses: ranks that build their layers with different
``ulysses_size`` are refused at the first call on every rank (no timeout), and a plan cut for one layout
is refused by a layer whose ring runs another."""

from __future__ import annotations

import pytest
import torch

from ring_plugin import create_ring_attention, sequence_shards
from ring_plugin.testing import run_in_process_group


def _disagreeing_ulysses(rank: int, world: int) -> str:
    attn = create_ring_attention("standard", ulysses_size=2 if rank == 0 else 1)
    q = torch.randn(1, 8, 4, 8)
    try:
        attn(q, q, q, is_causal=True)
    except ValueError as err:
        return str(err)
    return "no error"


def test_ranks_disagreeing_on_ulysses_size_are_refused_on_every_rank():
    for message in run_in_process_group(_disagreeing_ulysses, 2, timeout=60):
        assert ("ranks build their layers with different sizes (None: the default): "
                "{0: {'ring_size': None, 'ulysses_size': 2}, 1: {'ring_size': None, 'ulysses_size': 1}}") in message


def test_a_plan_cut_contiguous_is_refused_by_a_balanced_layer():
    ids = torch.tensor([[0] * 8 + [1] * 8])
    plan = sequence_shards(ids, layout="contiguous")
    q = torch.randn(1, 16, 2, 4)
    with pytest.raises(ValueError, match=r"\('contiguous', 1, 1, 0\) does not match the layer's ring \('balanced'"):
        create_ring_attention("standard", layout="balanced")(q, q, q, is_causal=True, document_ids=plan)
