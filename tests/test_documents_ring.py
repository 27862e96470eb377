"""Packed documents: every dense ring variant with ``document_ids`` equals the fp64 oracle of the
document mask (output and dQ/dK/dV) at world sizes 1, 2 and 4, in both layouts, causal and not.

One spawned world per size runs the whole case list (spawning costs seconds on CI's 2 cores).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from ring_plugin import RingMultiheadAttention, create_ring_attention, shard_sequence
from ring_plugin.attention.oracle import document_mask
from ring_plugin.testing import run_in_process_group

from .errors import TOLERANCES, oracle, ring_errors, worst_over_ranks

N = 48  # global length: divisible by 2 * 4 (zigzag at world 4); chunks of 6 at world 4
# name -> document lengths (sum N); chosen against the chunk sizes 48, 24, 12 and 6
DOCUMENTS = {
    "shorter_than_a_block": [3, 2, 5, 1, 4, 3, 6, 2, 5, 7, 4, 6],
    "equal_to_a_shard": [12, 12, 12, 12],
    "spanning_every_rank": [2, 44, 2],
    "many_tiny": [1] * 48,
    "one_alone": [48],
    "uneven": [17, 9, 1, 21],
}
VARIANTS = ("standard", "sdpa", "distributed", "correct", "multihead")
LAYOUTS = ("contiguous", "zigzag")
DTYPES = (torch.float32, torch.bfloat16)
# (batch, heads, kv_heads, head_dim): grouped-query attention, batch > 1 with different documents
SHAPE = (2, 4, 2, 8)


def document_ids(name: str, batch: int) -> torch.Tensor:
    lengths = DOCUMENTS[name]
    first = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    # the second sample packs the same documents in reverse order (other boundaries)
    second = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths[::-1]))
    return torch.stack([first, second][:batch])


def _cases():
    return list(itertools.product(VARIANTS, LAYOUTS, (True, False), DTYPES, DOCUMENTS))


def _inputs_and_oracle(causal: bool, docs: str):
    b, h, hkv, d = SHAPE
    gen = torch.Generator().manual_seed(7)
    q, k, v, g = (torch.randn(b, N, hh, d, generator=gen) for hh in (h, hkv, hkv, h))
    ids = document_ids(docs, b)
    return (q, k, v, g), ids, *oracle(q, k, v, g, causal, document_mask(ids))


def _errors(rank, world, variant, layout, causal, dtype, docs) -> dict[str, float]:
    (q, k, v, g), ids, ref_out, ref = _inputs_and_oracle(causal, docs)
    local_ids = shard_sequence(ids, 1, layout, rank, world)
    if variant == "multihead":  # the projections are identities, so the oracle is the same
        b, h, hkv, d = SHAPE
        mha = RingMultiheadAttention(h * d, h, num_kv_heads=hkv, bias=False, kdim=hkv * d, vdim=hkv * d,
                                     layout=layout).to(dtype)
        with torch.no_grad():
            for w in (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight, mha.out_proj.weight):
                w.copy_(torch.eye(*w.shape))

        def attend(*qkv: torch.Tensor) -> torch.Tensor:  # (b, n, heads, d) in and out, as the ring layers
            out, _ = mha(*(t.flatten(2) for t in qkv), is_causal=causal, document_ids=local_ids)
            return out.view(out.shape[0], out.shape[1], h, d)
    else:
        attn = create_ring_attention(variant, layout=layout)

        def attend(*qkv: torch.Tensor) -> torch.Tensor:
            return attn(*qkv, is_causal=causal, document_ids=local_ids)
    return ring_errors(attend, (q, k, v, g), ref_out, ref, dtype, lambda t: shard_sequence(t, 1, layout, rank, world))


def _worker(rank: int, world: int, cases) -> list[dict[str, float]]:
    return [_errors(rank, world, *case) for case in cases]


@pytest.fixture(scope="module")
def errors_by_world() -> dict[int, list[dict[str, float]]]:
    return worst_over_ranks(_worker, _cases(), timeout=300)




@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("docs", list(DOCUMENTS))
def test_documents_match_the_oracle(errors_by_world, world, dtype, docs):
    keys, bound = TOLERANCES[dtype]
    cases = [(case, errs) for case, errs in zip(_cases(), errors_by_world[world]) if case[3] == dtype
             and case[4] == docs]
    assert len(cases) == len(VARIANTS) * len(LAYOUTS) * 2
    for case, errs in cases:
        for key in keys:
            assert errs[key] < bound, (case, key, errs[key])


def test_bf16_error_does_not_grow_with_ring_size(errors_by_world):
    """The worst bf16 error at ring 4 stays within 2x of the worst at ring 1 (same cases)."""
    for key in ("out_rel", "dq_rel", "dk_rel", "dv_rel"):
        worst = {w: max(e[key] for c, e in zip(_cases(), errors_by_world[w]) if c[3] == torch.bfloat16)
                 for w in (1, 2, 4)}
        assert worst[4] <= 2 * worst[1] + 1e-3, (key, worst)


def _bad_ids_worker(rank: int, world: int) -> dict[str, str]:
    q = torch.randn(1, 8, 2, 4)
    attn = create_ring_attention("standard", layout="contiguous")
    good = torch.zeros(1, 8, dtype=torch.long)
    cases = {
        "wrong shape": torch.zeros(1, 7, dtype=torch.long),
        "not int64": torch.zeros(1, 8, dtype=torch.int32),
        "decreasing inside a shard": torch.tensor([[0, 0, 1, 1, 0, 2, 2, 2]]),
        # every shard non-decreasing, but the global sequence is not: rank 1 restarts at 0
        "decreasing across ranks": torch.full((1, 8), 5 - 5 * rank, dtype=torch.long),
        "only rank 0 passes ids": good if rank == 0 else None,
    }
    messages = {}
    for name, ids in cases.items():
        bad = ids if (rank == world - 1 or name in ("decreasing across ranks", "only rank 0 passes ids")) else good
        try:
            attn(q, q, q, is_causal=True, document_ids=bad)
            messages[name] = "no error"
        except ValueError as err:
            messages[name] = str(err)
    # the ring still works afterwards
    out = attn(q, q, q, is_causal=True, document_ids=good)
    messages["after"] = f"{out.shape}"
    return messages


def test_bad_document_ids_raise_on_every_rank_before_any_send():
    per_rank = run_in_process_group(_bad_ids_worker, 2, timeout=120, reuse=True)
    expected = {
        "wrong shape": "document_ids must have shape (batch, n_local) = (1, 8)",
        "not int64": "document_ids must be int64",
        "decreasing inside a shard": "must be non-decreasing",
        "decreasing across ranks": "do not form one non-decreasing sequence",
        "only rank 0 passes ids": "different shapes",
    }
    for rank, messages in enumerate(per_rank):
        for name, text in expected.items():
            if rank == 1 or name in ("decreasing across ranks", "only rank 0 passes ids"):
                assert text in messages[name], (rank, name, messages[name])
            else:  # the other rank gets the agreement's message, never a hang
                assert "ring input check failed on rank(s) [1]" in messages[name], (rank, name, messages[name])
        assert messages["after"] == "torch.Size([1, 8, 2, 4])"


@pytest.mark.unit
def test_patterns_refuse_document_ids_clearly():
    q = torch.randn(1, 16, 2, 4)
    ids = torch.zeros(1, 16, dtype=torch.long)
    attn = create_ring_attention("block_sparse", block_size=4, sparsity_ratio=0.5)
    with pytest.raises(ValueError, match="document_ids are supported by the dense variants"):
        attn(q, q, q, document_ids=ids)


# ---------------------------------------------------------------------------------- balanced layout
BALANCED_N = 1024  # long enough for several chunks per rank (a chunk keeps >= 64 tokens)


def _balanced_errors(rank: int, world: int, causal: bool, seed: int) -> dict[str, float]:
    from benchmarks.packed_layouts import document_ids_from_lengths
    from ring_plugin.documents.balance import balanced_chunks
    from ring_plugin.documents.ids import packed_document_lengths

    ids = torch.stack([document_ids_from_lengths(packed_document_lengths(BALANCED_N, seed + s, mean=160.0))
                       for s in range(2)])
    gen = torch.Generator().manual_seed(seed)
    b, h, hkv, d = SHAPE
    inputs = tuple(torch.randn(b, BALANCED_N, hh, d, generator=gen) for hh in (h, hkv, hkv, h))
    ref_out, ref = oracle(*inputs, causal, document_mask(ids))

    def shard(t):
        return shard_sequence(t, 1, "balanced", rank, world, document_ids=ids)

    attn = create_ring_attention("standard", layout="balanced")
    errs = ring_errors(lambda *qkv: attn(*qkv, is_causal=causal, document_ids=shard(ids)), inputs, ref_out, ref,
                       torch.float32, shard)
    return {"chunks_per_rank": float(len(balanced_chunks(ids, world)[0])), **errs}


def _balanced_worker(rank: int, world: int) -> list[dict[str, float]]:
    return [_balanced_errors(rank, world, causal, seed) for causal in (True, False) for seed in (0, 1)]


@pytest.mark.parametrize("world", [2, 4])
def test_balanced_layout_matches_the_oracle(world):
    """layout='balanced': the layer rebuilds the permutation from the shards' ids and stays exact."""
    per_rank = run_in_process_group(_balanced_worker, world, timeout=240, reuse=True)
    for case in zip(*per_rank):
        for key in ("out_abs", "dq_abs", "dk_abs", "dv_abs"):
            assert max(r[key] for r in case) < 1e-5, (key, case)
    assert max(r["chunks_per_rank"] for case in per_rank for r in case) > 1  # several chunks per rank occur


@pytest.mark.unit
def test_hilbert_refuses_document_ids_instead_of_dropping_them():
    """The Hilbert variant reorders tokens; without a refusal it would silently ignore the documents."""
    from ring_plugin import HilbertRingAttention

    q = torch.randn(1, 16, 2, 4)
    ids = torch.tensor([[0] * 8 + [1] * 8])
    with pytest.raises(ValueError, match="document_ids are supported by the dense variants .* not by 'hilbert'"):
        HilbertRingAttention(grid=(4, 4), token_order="hilbert")(q, q, q, is_causal=True, document_ids=ids)


# ------------------------------------------------------------------------------ shard plans
def _plan_worker(rank: int, world: int) -> dict[str, object]:
    import ring_plugin.attention.modules as modules_module
    from ring_plugin import sequence_shards
    from ring_plugin.models.gpt import GPTConfig, RingGPT
    from ring_plugin.sharding import batch_documents, cut_batch

    ids = document_ids("uneven", 2)
    gen = torch.Generator().manual_seed(7)
    b, h, hkv, d = SHAPE
    q, k, v, g = (torch.randn(b, N, hh, d, generator=gen) for hh in (h, hkv, hkv, h))
    local = [shard_sequence(t, 1, "zigzag", rank, world).requires_grad_() for t in (q, k, v)]
    attn = create_ring_attention("standard", layout="zigzag")
    shard_ids = shard_sequence(ids, 1, "zigzag", rank, world)
    plan = sequence_shards(ids, layout="zigzag")
    results = {}
    for name, given in (("ids", shard_ids), ("prepared", attn.prepare_documents(shard_ids)), ("plan", plan)):
        for t in local:
            t.grad = None
        out = attn(*local, is_causal=True, document_ids=given)
        out.backward(shard_sequence(g, 1, "zigzag", rank, world))
        results[name] = [out.detach(), *(t.grad for t in local)]
    same = all(torch.equal(a, b) for name in ("prepared", "plan") for a, b in zip(results["ids"], results[name]))

    # misuse of a plan is a clear error on this rank
    contiguous = create_ring_attention("standard", layout="contiguous")
    errors = {}
    try:
        contiguous(*local, is_causal=True, document_ids=plan)
    except ValueError as err:
        errors["layout"] = str(err)
    try:
        attn(*(t[:1] for t in local), is_causal=True, document_ids=plan)
    except ValueError as err:
        errors["shape"] = str(err)
    balanced_plan = sequence_shards(ids, layout="balanced")
    try:
        contiguous(*local, is_causal=True, document_ids=balanced_plan)
    except ValueError as err:
        errors["balanced_vs_contiguous"] = str(err)
    bad = shard_ids.flip(1) if rank == world - 1 else shard_ids
    try:
        attn.prepare_documents(bad)
    except ValueError as err:
        errors["order"] = str(err)
    # a plan reused for another batch of the same shape: refused where the batch is read
    batch = cut_batch({"input_ids": torch.zeros(2, N, dtype=torch.long), "document_ids": ids}, "zigzag", rank, world)
    other = cut_batch({"input_ids": torch.zeros(2, N, dtype=torch.long),
                       "document_ids": document_ids("many_tiny", 2)}, "zigzag", rank, world)
    try:
        batch_documents({**other, "sequence_shards": batch["sequence_shards"]})
    except ValueError as err:
        errors["reused"] = str(err)

    # RingGPT: raw ids build one plan per forward (one all-gather); a cut batch's plan none at all
    calls = []
    original = modules_module.gather_shards

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    config = GPTConfig(vocab_size=32, n_layer=3, n_head=2, n_embd=16, max_seq_len=N,
                       attention_kwargs={"layout": "zigzag"})
    torch.manual_seed(0)
    model = RingGPT(config)
    tokens = shard_sequence(torch.randint(0, 32, (1, N), generator=gen), 1, "zigzag", rank, world)
    positions = shard_sequence(torch.arange(N)[None], 1, "zigzag", rank, world)
    modules_module.gather_shards = counting
    try:
        by_ids = model(tokens, positions, shard_sequence(ids[:1], 1, "zigzag", rank, world))
        gathers_ids = len(calls)
        by_plan = model(tokens, positions, sequence_shards(ids[:1], layout="zigzag"))
    finally:
        modules_module.gather_shards = original
    return {"same": same, "errors": errors, "gathers_ids": gathers_ids, "gathers_plan": len(calls) - gathers_ids,
            "model_same": torch.equal(by_ids, by_plan)}


def test_shard_plans_equal_per_call_ids_and_refuse_misuse():
    for rank, res in enumerate(run_in_process_group(_plan_worker, 2, timeout=120, reuse=True)):
        assert res["same"], rank  # bit for bit: the same blocks, the same kernels
        errors = res["errors"]
        assert f"('zigzag', 2, 1, {rank}) does not match the layer's ring ('contiguous', 2, 1, {rank})" \
            in errors["layout"], errors
        assert f"('balanced', 2, 1, {rank}) does not match the layer's ring ('contiguous'" \
            in errors["balanced_vs_contiguous"], errors
        assert "made for (batch, n_local) = (2, 24), the input has (1, 24)" in errors["shape"], errors
        assert "a plan belongs to the batch it was cut from" in errors["reused"], errors
        if rank == 1:
            assert "must be non-decreasing" in errors["order"], errors
        else:
            assert "ring input check failed on rank(s) [1]" in errors["order"], errors
        assert res["gathers_ids"] == 1  # one all-gather for the model's three layers
        assert res["gathers_plan"] == 0  # the plan came with the batch
        assert res["model_same"], rank
