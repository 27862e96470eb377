"""One step of a 4-layer HF Llama with packed documents on 2 gloo ranks: the batch's shard plan carries
the document ids, so they never cross the wire, and the ranks agree on the step's inputs once, not per
layer (``benchmarks/count_collectives.py`` measures the same step on any tree)."""

from __future__ import annotations

from benchmarks.count_collectives import LAYERS, count_step
from ring_plugin.testing import run_in_process_group


def test_a_packed_hf_step_gathers_no_ids_and_agrees_once():
    per_rank = run_in_process_group(count_step, 2, "zigzag", timeout=240)
    for rank in per_rank:
        assert rank["id_all_gathers"] == 0
        assert rank["calls"] == {
            "all_gather": 2,  # the adapter's check of the step's data, the engine's check of its inputs
            "all_reduce": 4 * 9 + 3,  # reduce_gradients: 9 parameters per layer, embeddings, final norm, head
            "batch_isend_irecv": LAYERS * 3,  # zigzag ring of 2: one exchange forward, two backward per layer
        }, rank
