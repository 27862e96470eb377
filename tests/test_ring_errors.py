"""Multi-process behaviour: bad input raises on every rank (never hangs), dead peers time out,
communication statistics count the bytes, and several rings share one world."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from ring_plugin import RingTimeoutError, create_ring_attention, reference_attention, shard_sequence
from ring_plugin.testing import run_in_process_group


def _good_call(rank: int, world: int) -> float:
    """A valid ring call after a failed one: the ring must still be usable and exact."""
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 8 * world, 3, 4, generator=gen) for _ in range(3))
    out = create_ring_attention("standard")(*(shard_sequence(t, 1, "contiguous", rank, world) for t in (q, k, v)))
    ref = shard_sequence(reference_attention(q, k, v), 1, "contiguous", rank, world)
    return (out - ref).abs().max().item()


def _bad_input_worker(rank: int, world: int) -> list[tuple[str, str, float]]:
    x = torch.randn(1, 8, 2, 4)
    scenarios = {
        "lengths differ between ranks": lambda: create_ring_attention("standard")(
            *(torch.randn(1, 8 if rank == 0 else 6, 2, 4) for _ in range(3))),
        "zigzag needs an even shard": lambda: create_ring_attention("standard", layout="zigzag")(
            *(torch.randn(1, 7, 2, 4) for _ in range(3))),
        "dtype mix on one rank": lambda: create_ring_attention("standard")(
            x, x.to(torch.bfloat16) if rank == 1 else x, x),
        "q and k disagree": lambda: create_ring_attention("standard")(
            x, torch.randn(1, 8, 2, 8), torch.randn(1, 8, 2, 8)),
        "ring size not dividing the world": lambda: create_ring_attention("standard", ring_size=3)(x, x, x),
        "unknown backend": lambda: create_ring_attention("standard", backend="tpu"),
        "a list as q on one rank": lambda: create_ring_attention("standard")(
            [x] if rank == 1 else x, x, x),
    }
    results = []
    for name, call in scenarios.items():
        try:
            call()
            message = "no error"
        except ValueError as err:
            message = str(err)
        results.append((name, message, _good_call(rank, world)))
    return results


def test_bad_input_raises_on_every_rank_before_any_send():
    per_rank = run_in_process_group(_bad_input_worker, 2, timeout=90, reuse=True)
    expected = {
        "lengths differ between ranks": ["different shapes", "different shapes"],
        "zigzag needs an even shard": ["positive multiple of 2", "positive multiple of 2"],
        "dtype mix on one rank": ["failed on rank(s) [1]", "share one dtype"],
        "q and k disagree": ["must agree in batch, n_local and head_dim"] * 2,
        "ring size not dividing the world": ["ring_size=3 must be a positive divisor of the world size 2"] * 2,
        "unknown backend": ["backend='tpu' is not a known kernel backend"] * 2,
        "a list as q on one rank": ["failed on rank(s) [1]", "q must be a torch.Tensor, got list"],
    }
    for rank, results in enumerate(per_rank):
        for name, message, after in results:
            assert expected[name][rank] in message, (rank, name, message)
            assert after < 1e-5, (rank, name, after)  # the ring still works afterwards


def _dead_peer_worker(rank: int, world: int, timeout: float) -> tuple[str, float]:
    x = torch.randn(1, 8, 2, 4)
    attn = create_ring_attention("distributed", comm_timeout=timeout)
    if rank == 1:
        time.sleep(timeout + 3)  # a peer that never joins the ring step
        return "slept", 0.0
    start = time.monotonic()
    try:
        attn(x, x, x)
        return "no error", time.monotonic() - start
    except RingTimeoutError as err:
        return str(err), time.monotonic() - start


def test_dead_peer_raises_within_the_timeout_instead_of_hanging():
    results = run_in_process_group(_dead_peer_worker, 2, 2.0, timeout=60)
    message, elapsed = results[0]
    assert "did not answer" in message and "2.0 s" in message, message
    assert 1.5 <= elapsed < 6.0, elapsed


def _stats_worker(rank: int, world: int) -> dict[str, float]:
    q, k, v = (torch.randn(2, 8, 4, 16, requires_grad=True) for _ in range(3))
    attn = create_ring_attention("distributed")
    attn(q, k, v, is_causal=True).sum().backward()
    stats = attn.get_communication_stats()
    stats["kv_bytes"] = float(k.numel() * k.element_size() * 2)
    return stats


def test_distributed_variant_counts_bytes_and_time():
    world = 4
    for rank, stats in enumerate(run_in_process_group(_stats_worker, world, timeout=90, reuse=True)):
        # forward: K and V go round (world - 1) times; backward: again, plus the dK/dV of each step
        # that had work, straight home. Contiguous causal shards: rank r attends to the K/V of
        # r - 1 .. 0 (whole shards, fp32 on CPU), so it sends r such messages; rank 0 none.
        expected = 2 * (world - 1) * stats["kv_bytes"] + rank * stats["kv_bytes"]
        assert stats["bytes_sent"] == expected, (rank, stats)
        assert stats["compute_seconds"] > 0 and stats["wait_seconds"] >= 0
        assert 0.0 <= stats["wait_fraction"] <= 1.0


def _two_rings_worker(rank: int, world: int) -> float:
    ring, pos = divmod(rank, 2)  # ranks {0, 1} and {2, 3} form two rings with different data
    gen = torch.Generator().manual_seed(100 + ring)
    q, k, v = (torch.randn(2, 16, 3, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    attn = create_ring_attention("standard", ring_size=2, layout="zigzag")
    out = attn(*(shard_sequence(t, 1, "zigzag", pos, 2) for t in (q, k, v)), is_causal=True)
    ref = shard_sequence(reference_attention(q, k, v, causal=True), 1, "zigzag", pos, 2)
    assert dist.get_world_size() == 4
    return (out - ref).abs().max().item()


def test_ring_size_smaller_than_world_builds_adjacent_rings():
    errors = run_in_process_group(_two_rings_worker, 4, timeout=90, reuse=True)
    assert max(errors) < 1e-6, errors


def _half_grad_comm_worker(rank: int, world: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(5)
    q, k, v, g = (torch.randn(2, 64, 4, 16, generator=gen) for _ in range(4))
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    (reference_attention(*ref, causal=True) * g.double()).sum().backward()
    local = [shard_sequence(t.bfloat16(), 1, "zigzag", rank, world).requires_grad_() for t in (q, k, v)]
    attn = create_ring_attention("standard", layout="zigzag", grad_comm_dtype="input")
    (attn(*local, is_causal=True) * shard_sequence(g.bfloat16(), 1, "zigzag", rank, world)).sum().backward()
    return {
        name: ((mine.grad.double() - shard_sequence(theirs.grad, 1, "zigzag", rank, world)).abs().max()
               / theirs.grad.abs().max()).item()
        for name, mine, theirs in zip(("dq", "dk", "dv"), local, ref)
    }


def test_half_precision_grad_accumulators_stay_within_bf16_tolerance():
    for errors in run_in_process_group(_half_grad_comm_worker, 4, timeout=90, reuse=True):
        assert max(errors.values()) < 2e-2, errors
