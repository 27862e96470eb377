"""2-D sequence parallelism (Ulysses x ring) equals the fp64 oracle: output and dQ/dK/dV.

The sequence is sharded over U x R = 2 x 2 ranks exactly as for a ring of 4; the layer trades heads
for sequence in each Ulysses group and runs the ring across the groups. One spawned world of 4 runs
every layer case, the bad-input cases, a transformers model, a RingStrategy training run and a ZeRO-3
step; one world of 8 (two data-parallel replicas of 2 x 2) checks that each replica computes its own
batch exactly (spawning costs seconds on CI's 2 cores, so each world runs a whole case list).
"""

from __future__ import annotations

import zlib
from typing import Any

import pytest
import torch
import torch.distributed as dist

from ring_plugin import create_ring_attention, ring_context, shard_sequence
from ring_plugin.attention.oracle import document_mask
from ring_plugin.balance import balanced_chunks, document_ids_from_lengths, packed_document_lengths
from ring_plugin.comm.topology import build_mesh
from ring_plugin.testing import run_in_process_group

from . import lightning_harness as H
from .errors import TOLERANCES, oracle, ring_errors
from .test_documents_ring import document_ids

ULYSSES, RING = 2, 2
SEQ = ULYSSES * RING
# (batch, n_global, heads, kv_heads, head_dim): K/V heads a multiple of U, fewer than U, not divisible by U
SHAPES = {"mha": (2, 32, 4, 4, 8), "gqa2": (2, 32, 4, 2, 8), "gqa1": (1, 32, 4, 1, 8), "gqa3": (1, 48, 6, 3, 8)}
BALANCED_N = 1024  # long enough for several balanced chunks per rank (a chunk keeps >= 64 tokens)

Case = dict[str, Any]


def _case(shape: str, layout: str, causal: bool, variant: str = "standard", dtype: torch.dtype = torch.float32,
          docs: str | None = None, window: int | None = None) -> Case:
    words = [variant, shape, layout, "causal" if causal else "full", str(dtype).removeprefix("torch."),
             *([f"docs={docs}"] if docs else []), *([f"window={window}"] if window else [])]
    return {"name": "-".join(words), "shape": shape, "layout": layout, "causal": causal, "variant": variant,
            "dtype": dtype, "docs": docs, "window": window}


def layer_cases() -> list[Case]:
    cases = [_case(shape, layout, causal) for shape in SHAPES for layout in ("contiguous", "zigzag")
             for causal in (False, True)]
    cases += [
        _case("gqa1", "zigzag", True, dtype=torch.bfloat16),
        _case("gqa2", "contiguous", False, dtype=torch.bfloat16),
        _case("gqa2", "zigzag", True, variant="sdpa"),
        _case("gqa1", "zigzag", True, variant="distributed"),
        _case("gqa2", "zigzag", False, variant="correct"),
        _case("gqa2", "zigzag", True, window=5),
        _case("mha", "contiguous", True, window=12),
    ]
    for docs, layout, causal in (("shorter_than_a_block", "zigzag", True), ("spanning_every_rank", "contiguous", True),
                                 ("uneven", "zigzag", False)):
        cases.append(_case("gqa1", layout, causal, docs=docs))
    cases += [_case("gqa2", "balanced", causal, docs=f"packed{seed}") for causal in (True, False) for seed in (0, 1)]
    cases.append(_case("gqa1", "balanced", True, variant="correct", docs="packed0"))
    return cases


def replica_cases() -> list[Case]:
    return [_case("gqa1", "zigzag", True), _case("gqa2", "contiguous", False),
            _case("gqa1", "zigzag", True, docs="uneven"), _case("gqa2", "balanced", True, docs="packed1")]


def _document_ids(case: Case, batch: int, n: int) -> torch.Tensor | None:
    name = case["docs"]
    if name is None:
        return None
    if name.startswith("packed"):
        seed = int(name.removeprefix("packed"))
        return torch.stack([document_ids_from_lengths(packed_document_lengths(n, seed + s, mean=160.0))
                            for s in range(batch)])
    return document_ids(name, batch)


def _global_n(case: Case) -> int:
    if case["docs"] is not None and case["docs"].startswith("packed"):
        return BALANCED_N
    return 48 if case["docs"] is not None else SHAPES[case["shape"]][1]


def run_case(case: Case, seq_rank: int, replica: int = 0) -> dict[str, float]:
    """Errors of this rank's output and dQ/dK/dV against autograd through the fp64 oracle."""
    b, _, h, hkv, d = SHAPES[case["shape"]]
    n = _global_n(case)
    gen = torch.Generator().manual_seed(zlib.crc32(case["name"].encode()) + 1000 * replica)
    q, k, v, g = (torch.randn(b, n, hh, d, generator=gen) for hh in (h, hkv, hkv, h))
    ids = _document_ids(case, b, n)
    allowed = None if ids is None else document_mask(ids)
    if case["window"] is not None:
        pos = torch.arange(n)
        allowed = pos[:, None] - pos[None, :] < case["window"]
    ref_out, ref = oracle(q, k, v, g, case["causal"], allowed)

    def shard(t: torch.Tensor) -> torch.Tensor:
        return shard_sequence(t, 1, case["layout"], seq_rank, SEQ, document_ids=ids)

    attn = create_ring_attention(case["variant"], layout=case["layout"], ulysses_size=ULYSSES, ring_size=RING)
    masks: dict[str, Any] = {}
    if ids is not None:
        masks["document_ids"] = shard(ids)
    if case["window"] is not None:
        masks["sliding_window"] = case["window"]
    return ring_errors(lambda *qkv: attn(*qkv, is_causal=case["causal"], **masks), (q, k, v, g), ref_out, ref,
                       case["dtype"], shard)


# ------------------------------------------------------------------------------------ bad input
def _error_of(call) -> str:
    try:
        call()
    except ValueError as err:
        return str(err)
    return "no error"


def bad_input_messages(rank: int) -> dict[str, str]:
    """Each bad combination on this rank of a 2 x 2 world; every rank must raise (no hang)."""
    q = torch.randn(1, 8, 4, 8)

    def layer(**kw: Any):
        return create_ring_attention("standard", layout="zigzag", **kw)

    odd = torch.randn(1, 8, 3, 8)
    return {
        "heads not divisible": _error_of(lambda: layer(ulysses_size=2)(odd, odd, odd, is_causal=True)),
        # Only rank 3 is wrong: ranks 0 and 1 share neither its ring nor its Ulysses group.
        "one rank's heads": _error_of(lambda: layer(ulysses_size=2)(*(odd if rank == 3 else q,) * 3)),
        "pattern": _error_of(lambda: create_ring_attention("block_sparse", block_size=2, sparsity_ratio=0.5,
                                                           ulysses_size=2)(q, q, q)),
        "ulysses not dividing the world": _error_of(lambda: layer(ulysses_size=3)(q, q, q)),
        "ulysses x ring not dividing the world": _error_of(lambda: layer(ulysses_size=2, ring_size=4)(q, q, q)),
        "ulysses_size=0": _error_of(lambda: layer(ulysses_size=0)),
        "process_group": _error_of(lambda: create_ring_attention("standard", process_group=dist.group.WORLD,
                                                                 ulysses_size=2)(q, q, q)),
        "disagrees with the active mesh": _error_of(lambda: _under_ring(lambda: layer(ulysses_size=2)(q, q, q))),
    }


def _under_ring(call) -> None:
    with ring_context(None, "zigzag", mesh=build_mesh(4)):
        call()


BAD_INPUT = {
    "heads not divisible": "q heads (3) must be a multiple of ulysses_size=2",
    "pattern": "ulysses_size > 1 is supported by the dense variants (standard, sdpa, distributed, correct), "
               "not by 'block_sparse'",
    "ulysses not dividing the world": "ulysses_size=3 must divide the world size 4",
    "ulysses x ring not dividing the world": "ring_size=4 x ulysses_size=2 must divide the world size 4",
    "ulysses_size=0": "ulysses_size=0 must be a positive integer or None",
    "process_group": "ulysses_size=2 needs Ulysses and ring groups",
    "disagrees with the active mesh": "ulysses_size=2 on the layer disagrees with the active mesh's ulysses_size 1",
}

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


def world8_worker(rank: int, world: int) -> dict[str, dict[str, float]]:
    replica, seq_rank = divmod(rank, SEQ)  # sequence-parallel groups are adjacent ranks
    return {c["name"]: run_case(c, seq_rank, replica) for c in replica_cases()}


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
            ids = _document_ids(case, SHAPES[case["shape"]][0], BALANCED_N)
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
