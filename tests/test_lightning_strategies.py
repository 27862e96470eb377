"""The ring strategies train exactly like one process on the full sequence (CPU, gloo, spawned worlds).

One spawned world per world size runs every case in a loop (spawning costs seconds on 2 cores).
"""

from __future__ import annotations

import tempfile

import pytest

from ring_plugin.testing import run_in_process_group

from . import lightning_harness as H
from .lightning_harness import TINY, Case

# Any engine variant runs LongNet's dilated pattern when given segment_lengths / dilation_rates.
DILATED = dict(TINY, attention_kwargs=dict(segment_lengths=[8, 32], dilation_rates=[1, 2]))
STRATEGIES = [("ddp", 0), ("deepspeed", 1), ("deepspeed", 2), ("deepspeed", 3)]


def _equivalence_cases(ring_size: int) -> list[Case]:
    return [Case(kind, stage, ring_size=ring_size, model=dict(model), layout=layout)
            for model, layout in ((TINY, "zigzag"), (DILATED, "zigzag"), (TINY, "contiguous"))
            for kind, stage in STRATEGIES
            if layout == "zigzag" or kind == "ddp"]


OFFLOAD = dict(offload_optimizer=True, offload_parameters=True)
# Long-context memory settings: block inputs offloaded to the host (reentrant checkpoints under ZeRO-3's
# hooks) and the MLP in tiles of 5 tokens: the same step as one process.
LONG = dict(TINY, activation_checkpointing=True, offload_checkpoints=True, mlp_tile_tokens=5)
LONG_CASES = [Case("deepspeed", 3, model=dict(LONG)), Case("ddp", model=dict(LONG))]
WORLD2 = _equivalence_cases(2) + [Case("deepspeed", 0), Case("deepspeed", 3, options=OFFLOAD)]
WORLD4 = _equivalence_cases(4) + [Case("ddp", ring_size=2, batch_size=2), Case("deepspeed", 2, ring_size=2),
                                  Case("deepspeed", 3, ring_size=2, batch_size=2)]
RESUME = [Case("ddp"), Case("deepspeed", 2), Case("deepspeed", 3), Case("ddp", ring_size=1)]
# Packed documents at ring 2: every layout, DDP and ZeRO-3.
PACKED = [Case(kind, stage, layout=layout, seq_len=48) for kind, stage in (("ddp", 0), ("deepspeed", 3))
          for layout in ("zigzag", "balanced", "contiguous") if kind == "ddp" or layout == "balanced"]


def world2_worker(rank: int, world: int, workdir: str) -> dict:
    out = {c.name: H.run_isolated(H.equivalence_case, c, rank, world) for c in WORLD2}
    out["validate"] = H.run_isolated(H.validate_case, Case("ddp"), rank, world)
    for causal in (False, True):
        out[f"multihead/causal={causal}"] = H.run_isolated(H.multihead_case, rank, world, causal)
    out["ring_size=3"] = H.run_isolated(H.equivalence_case, Case("ddp", ring_size=3), rank, world)
    for c in RESUME:
        out["resume/" + c.name] = H.run_isolated(H.resume_case, c, rank, world, workdir)
    for c in PACKED:
        out["packed/" + c.name] = H.run_isolated(H.packed_training_case, c, rank, world)
    return out


def long_context_worker(rank: int, world: int) -> dict:
    return {c.name: H.run_isolated(H.equivalence_case, c, rank, world) for c in LONG_CASES}


def world4_worker(rank: int, world: int) -> dict:
    return {c.name + f"/batch={c.batch_size}": H.run_isolated(H.equivalence_case, c, rank, world) for c in WORLD4}


@pytest.fixture(scope="module")
def world2() -> dict:
    with tempfile.TemporaryDirectory() as workdir:
        return H.every_rank(run_in_process_group(world2_worker, 2, workdir, timeout=240, reuse=True))


@pytest.fixture(scope="module")
def long_context() -> dict:
    return H.every_rank(run_in_process_group(long_context_worker, 2, timeout=240, reuse=True))


@pytest.fixture(scope="module")
def world4() -> dict:
    return H.every_rank(run_in_process_group(world4_worker, 4, timeout=240, reuse=True))


def _check_equivalence(result) -> None:
    assert isinstance(result, dict), result
    assert result["loss"] < 1e-5, result
    assert result["grad_rel"] < 1e-5, result


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", [c.name for c in WORLD2])
def test_ring2_step_matches_one_process(world2, name):
    _check_equivalence(world2[name])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", [c.name for c in LONG_CASES])
def test_long_context_settings_step_like_one_process(long_context, name):
    """Offloaded block inputs and MLP tiles, under ZeRO-3 and DDP on a ring of 2: one process's step."""
    _check_equivalence(long_context[name])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", [c.name + f"/batch={c.batch_size}" for c in WORLD4])
def test_world4_step_matches_one_process(world4, name):
    """Ring of 4, and 2 data-parallel x ring of 2 against one process on the concatenated batch."""
    _check_equivalence(world4[name])


@pytest.mark.timeout(300)
def test_validation_loss_is_full_sequence_mean(world2):
    assert isinstance(world2["validate"], dict), world2["validate"]
    assert world2["validate"]["loss"] < 1e-5


@pytest.mark.timeout(300)
@pytest.mark.parametrize("causal", [False, True])
def test_multihead_on_two_ranks_matches_torch(world2, causal):
    result = world2[f"multihead/causal={causal}"]
    assert isinstance(result, dict), result
    assert result["out"] < 1e-5 and result["grad"] < 1e-5, result


@pytest.mark.timeout(300)
def test_ring_size_not_dividing_world_fails_clearly(world2):
    assert world2["ring_size=3"].startswith("ValueError: ring_size=3 must be a positive divisor of the world size 2")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", [c.name for c in RESUME])
def test_resume_gives_same_next_losses(world2, name):
    """Checkpoint at step 2 (mid-epoch), resume into a fresh model: steps 3-5 repeat the uninterrupted run."""
    result = world2["resume/" + name]
    assert isinstance(result, dict), result
    assert len(result["full"]) == 5 and len(result["resumed"]) == 3
    assert result["resumed"] == pytest.approx(result["full"][2:], abs=1e-6)


@pytest.mark.unit
def test_dilated_case_is_not_dense():
    """The dilated cases would prove nothing if the layer silently ran dense attention."""
    dense, _ = H.reference_step(Case("ddp"), H.make_samples(1, 32, seed=1))
    dilated, _ = H.reference_step(Case("ddp", model=dict(DILATED)), H.make_samples(1, 32, seed=1))
    assert abs(dense - dilated) > 1e-4


@pytest.mark.parametrize("name", [c.name for c in PACKED])
def test_packed_documents_train_like_one_process(world2, name):
    """3 steps on packed documents (positions per document, document masks) end with one process's weights."""
    result = world2["packed/" + name]
    assert isinstance(result, dict), result
    assert result["moved"] > 1e-3, result  # the weights did change
    assert result["weight_abs"] < 1e-5, result


@pytest.mark.unit
def test_a_failure_on_any_rank_fails_the_case():
    """A world's results are read through every_rank: rank 1's exception is the case's result, not rank 0's dict."""
    ok = {"loss": 0.0, "grad_rel": 0.0}
    merged = H.every_rank([{"a": ok, "b": ok, "c": "ValueError: x", "d": "ValueError: x"},
                           {"a": None, "b": "RuntimeError: boom", "c": "ValueError: x", "d": "ValueError: y"}])
    assert merged == {"a": ok, "b": "rank 1: RuntimeError: boom", "c": "ValueError: x",
                      "d": "rank 0: ValueError: x; rank 1: ValueError: y"}
    with pytest.raises(AssertionError):
        _check_equivalence(merged["b"])
