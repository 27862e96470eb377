"""2-D sequence parallelism (Ulysses x ring) equals the fp64 oracle: output and dQ/dK/dV.

The sequence is sharded over U x R = 2 x 2 ranks exactly as for a ring of 4; the layer trades heads
for sequence in each Ulysses group and runs the ring across the groups. One spawned world of 4 runs
every layer case, the bad-input cases, a transformers model, a RingStrategy training run and a ZeRO-3
step; one world of 8 (two data-parallel replicas of 2 x 2) checks that each replica computes its own
batch exactly (spawning costs seconds on CI's 2 cores, so each world runs a whole case list).
"""

from __future__ import annotations

from typing import Any

import pytest

from ring_plugin.comm.topology import build_mesh
from ring_plugin.documents.balance import balanced_chunks
from ring_plugin.testing import run_in_process_group

from . import lightning_harness as H
from .errors import TOLERANCES
from .ulysses_cases import (
    BAD_INPUT,
    BALANCED_N,
    RING,
    SEQ,
    SHAPES,
    ULYSSES,
    Case,
    bad_input_messages,
    case_document_ids,
    layer_cases,
    replica_cases,
    run_case,
    world8_worker,
)

# --------------------------------------------------------------------------------- the worlds
GQA_MODEL = dict(H.TINY, n_head=4, n_kv_head=1, n_embd=32)
# fp64 training: in fp32 even a plain ring of 4 ends these 3 Adam steps ~1e-5 from one process.
STRATEGY_CASES = {
    "dense": (H.Case("ddp", ring_size=RING, model=dict(GQA_MODEL), options=dict(ulysses_size=ULYSSES),
                     precision="64-true"), False),
    "packed-balanced": (H.Case("ddp", ring_size=RING, model=dict(GQA_MODEL), layout="balanced", seq_len=48,
                               options=dict(ulysses_size=ULYSSES), precision="64-true"), True),
}

# ZeRO-3 (fp32: DeepSpeed takes no fp64): the first step's loss and full gradients against one process.
DEEPSPEED_CASE = H.Case("deepspeed", 3, ring_size=RING, model=dict(GQA_MODEL), options=dict(ulysses_size=ULYSSES))

HF_CASES = (("llama", "zigzag"), ("mistral_sw8", "contiguous"))  # 4 heads, 2 K/V heads; a sliding window


def world4_worker(rank: int, world: int) -> dict[str, Any]:
    from .test_hf_ring import equivalence

    out: dict[str, Any] = {"bad": bad_input_messages(rank)}
    out["layers"] = {c["name"]: run_case(c, rank) for c in layer_cases()}
    for name, layout in HF_CASES:
        out[f"hf/{name}/{layout}"] = equivalence(name, layout, rank, world, mesh=build_mesh(RING, ULYSSES))
    for name, (case, packed) in STRATEGY_CASES.items():
        out["strategy/" + name] = H.run_isolated(H.packed_training_case, case, rank, world, 3, packed)
    out["deepspeed"] = H.run_isolated(H.equivalence_case, DEEPSPEED_CASE, rank, world)
    return out


@pytest.fixture(scope="module")
def world4() -> list[dict[str, Any]]:
    return run_in_process_group(world4_worker, SEQ, timeout=300, reuse=True)


@pytest.fixture(scope="module")
def world8() -> list[dict[str, dict[str, float]]]:
    return run_in_process_group(world8_worker, 2 * SEQ, timeout=240)


def _check(case: Case, per_rank: list[dict[str, float]]) -> None:
    keys, bound = TOLERANCES[case["dtype"]]
    for rank, errs in enumerate(per_rank):
        for key in keys:
            assert errs[key] < bound, (case["name"], rank, key, errs[key])


@pytest.mark.parametrize("case", layer_cases(), ids=lambda c: c["name"])
def test_ulysses_ring_matches_the_oracle(world4, case):
    _check(case, [r["layers"][case["name"]] for r in world4])


@pytest.mark.parametrize("case", replica_cases(), ids=lambda c: c["name"])
def test_data_parallel_replicas_compute_their_own_batches(world8, case):
    """Each replica (ranks 0-3 and 4-7) shards its own batch and matches the oracle of that batch."""
    _check(case, [r[case["name"]] for r in world8])


def test_balanced_cases_hold_several_chunks_per_rank():
    """The merged balanced layout is only a real test if ranks hold several, scattered chunks."""
    for case in layer_cases():
        if case["layout"] == "balanced":
            ids = case_document_ids(case, SHAPES[case["shape"]][0], BALANCED_N)
            assert len(balanced_chunks(ids, SEQ)[0]) > 1, case["name"]


@pytest.mark.parametrize("name", list(BAD_INPUT) + ["one rank's heads"])
def test_bad_combinations_raise_on_every_rank(world4, name):
    for rank, result in enumerate(world4):
        message = result["bad"][name]
        if name == "one rank's heads":
            expected = BAD_INPUT["heads not divisible"] if rank == 3 else "ring input check failed on rank(s) [3]"
        else:
            expected = BAD_INPUT[name]
        assert expected in message, (rank, name, message)


@pytest.mark.parametrize(("name", "layout"), HF_CASES)
def test_hf_model_matches_eager(world4, name, layout):
    """attn_implementation="ring" under a 2 x 2 mesh: logits, loss and gradients equal "eager" on the
    whole sequence (hf.shard_batch shards over the 4 sequence-parallel ranks)."""
    for rank, result in enumerate(world4):
        errs = result[f"hf/{name}/{layout}"]
        assert max(errs.values()) < 1e-5, (rank, errs)


@pytest.mark.parametrize("name", list(STRATEGY_CASES))
def test_strategy_trains_like_one_process(world4, name):
    """RingStrategy(ring_size=2, ulysses_size=2): 3 steps end with one process's weights."""
    result = H.every_rank(world4)["strategy/" + name]
    assert isinstance(result, dict), result
    assert result["moved"] > 1e-3, result  # the weights did change
    assert result["weight_abs"] < 1e-5, result


def test_deepspeed_step_matches_one_process(world4):
    """RingDeepSpeedStrategy(stage=3, ring_size=2, ulysses_size=2): loss and gradients of one process."""
    result = H.every_rank(world4)["deepspeed"]
    assert isinstance(result, dict), result
    assert result["loss"] < 1e-5 and result["grad_rel"] < 1e-5, result
