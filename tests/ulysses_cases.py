"""The 2-D sequence-parallel (Ulysses x ring) layer cases of ``test_ulysses.py`` and the bad inputs, in a module
without Lightning, so that the processes of a world running only layer cases start quickly."""

from __future__ import annotations

import zlib
from typing import Any

import torch
import torch.distributed as dist

from benchmarks.packed_layouts import document_ids_from_lengths
from ring_plugin import create_ring_attention, ring_context, shard_sequence
from ring_plugin.attention.oracle import document_mask
from ring_plugin.comm.topology import build_mesh
from ring_plugin.documents import packed_document_lengths

from .errors import oracle, ring_errors
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


def case_document_ids(case: Case, batch: int, n: int) -> torch.Tensor | None:
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
    ids = case_document_ids(case, b, n)
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


def world8_worker(rank: int, world: int) -> dict[str, dict[str, float]]:
    replica, seq_rank = divmod(rank, SEQ)  # sequence-parallel groups are adjacent ranks
    return {c["name"]: run_case(c, seq_rank, replica) for c in replica_cases()}
