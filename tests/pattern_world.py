"""Shared multi-process harness for the pattern tests (dilated, block-sparse, Hilbert).

Spawning a gloo world costs seconds on a small machine, so every pattern case of a test file runs in ONE
world of 2 and ONE world of 4 processes (the worlds are reused; the results cached per pytest process).
Each case returns its errors against the oracle (output, dQ, dK, dV), keyed by the case's name, which the
test files assert in the parent, one pytest case per name.
"""

from __future__ import annotations

import functools
import zlib
from typing import Any

import torch
import torch.distributed as dist

from ring_plugin import HilbertRingAttention, create_ring_attention, reference_attention, shard_sequence
from ring_plugin.patterns import DilatedPattern, hilbert_permutation, inverse_permutation
from ring_plugin.testing import run_in_process_group

Case = dict[str, Any]

# Short words for the config fields in case names.
_SHORT = {"segment_lengths": "seg", "dilation_rates": "rate", "block_size": "bs", "sparsity_ratio": "sp",
          "pattern_type": "", "backend": "", "grid": "grid", "hilbert_level": "level", "token_order": "order",
          "grad_comm_dtype": "grad"}


def _word(key: str, value: Any) -> str:
    if isinstance(value, (list, tuple)):
        value = "x".join(map(str, value))
    return f"{_SHORT.get(key, key)}{value}"


def _case(variant: str, shape: tuple[int, int, int, int, int], causal: bool, layout: str = "contiguous",
          dtype: torch.dtype = torch.float32, **kw: Any) -> Case:
    b, n, h, hkv, d = shape
    words = [variant, f"b{b}n{n}h{h}kv{hkv}d{d}", "causal" if causal else "full", layout,
             str(dtype).removeprefix("torch."), *(_word(k, v) for k, v in kw.items())]
    return {"name": "-".join(words), "variant": variant, "shape": shape, "causal": causal, "layout": layout,
            "dtype": dtype, "kw": kw}


def dilated_cases() -> list[Case]:
    cases = []
    # Segments shorter than, equal to and longer than a shard (n=32: shard 16 at world 2, 8 at world 4;
    # zigzag chunks are half that), a segment longer than the sequence (clipped), odd heads, GQA.
    configs = [
        ((2, 32, 5, 5, 8), {"segment_lengths": [4, 8, 16], "dilation_rates": [1, 2, 4]}),
        ((1, 32, 6, 3, 8), {"segment_lengths": [8, 32], "dilation_rates": [2, 3]}),
        ((2, 32, 3, 1, 8), {"segment_lengths": [16, 64], "dilation_rates": [1, 2]}),
    ]
    # One segment spanning the whole ring, rate 4: only the dilated quarter of K/V travels.
    for layout in ("contiguous", "zigzag"):
        for causal in (False, True):
            cases.append(_case("standard", (2, 32, 4, 4, 8), causal, layout,
                               segment_lengths=[32], dilation_rates=[4]))
    for shape, kw in configs:
        for layout in ("contiguous", "zigzag"):
            for causal in (False, True):
                cases.append(_case("standard", shape, causal, layout, **kw))
    shape, kw = configs[0]
    for variant in ("sdpa", "distributed", "correct"):
        cases.append(_case(variant, shape, True, "contiguous", **kw))
    cases.append(_case("standard", shape, True, "zigzag", torch.bfloat16, **kw))
    cases.append(_case("standard", configs[1][0], False, "contiguous", torch.bfloat16, **configs[1][1]))
    return cases


def block_sparse_cases() -> list[Case]:
    cases = []
    shape = (2, 64, 3, 3, 8)
    for i, (pattern, sparsity) in enumerate(
        [("local", 0.5), ("local", 0.9), ("dilated_sparse", 0.75), ("dilated_sparse", 0.0),
         ("global_local", 0.75), ("global_local", 0.9)]
    ):
        for causal in (False, True):
            layout = ("contiguous", "zigzag")[(i + causal) % 2]
            cases.append(_case("block_sparse", shape, causal, layout, block_size=4,
                               sparsity_ratio=sparsity, pattern_type=pattern))
    cases.append(_case("block_sparse", (1, 64, 4, 2, 8), True, "zigzag", torch.bfloat16, block_size=4,
                       sparsity_ratio=0.5, pattern_type="local"))
    # The gathered path (fetched rows + one masked call; on CPU the exact masked softmax).
    flex = [
        ("local", 0.5, False, "contiguous", torch.float32, {}),
        ("local", 0.75, True, "zigzag", torch.float32, {}),
        ("dilated_sparse", 0.75, True, "contiguous", torch.float32, {}),
        ("dilated_sparse", 0.5, False, "zigzag", torch.bfloat16, {}),
        ("global_local", 0.75, True, "zigzag", torch.float32, {}),
        ("global_local", 0.9, False, "contiguous", torch.bfloat16, {"grad_comm_dtype": "input"}),
    ]
    for pattern, sparsity, causal, layout, dtype, kw in flex:
        cases.append(_case("block_sparse", shape, causal, layout, dtype, block_size=4, sparsity_ratio=sparsity,
                           pattern_type=pattern, backend="flex", **kw))
    cases.append(_case("block_sparse", (1, 64, 4, 2, 8), True, "zigzag", torch.bfloat16, block_size=4,
                       sparsity_ratio=0.5, pattern_type="global_local", backend="flex"))  # GQA
    return cases


def hilbert_cases() -> list[Case]:
    kw = {"segment_lengths": [8, 16], "dilation_rates": [1, 2]}
    return [
        _case("hilbert", (2, 64, 3, 3, 8), False, "contiguous", hilbert_level=3, **kw),
        _case("hilbert", (2, 64, 3, 3, 8), True, "zigzag", hilbert_level=3, **kw),
        _case("hilbert", (1, 32, 4, 2, 8), True, "contiguous", grid=(4, 8), **kw),
        _case("hilbert", (2, 48, 3, 3, 8), False, "zigzag", grid=(6, 8), **kw),
        _case("hilbert", (1, 48, 2, 2, 8), True, "contiguous", grid=(8, 6)),  # dense in Hilbert order
        _case("hilbert", (1, 48, 3, 3, 8), False, "contiguous", grid=(6, 8), token_order="hilbert", **kw),
        _case("hilbert", (1, 64, 2, 2, 8), True, "contiguous", torch.bfloat16, grid=(8, 8), **kw),
    ]


def hilbert_block_sparse_cases() -> list[Case]:
    # Shards of 16 (world 4: 8 zigzag rows per chunk) hold whole blocks; 90 % on a 16x16 grid.
    return [
        _case("hilbert_block_sparse", (2, 64, 3, 3, 8), True, "contiguous", grid=(8, 8), block_size=4,
              sparsity_ratio=0.75, pattern_type="local"),
        _case("hilbert_block_sparse", (2, 64, 3, 3, 8), False, "zigzag", hilbert_level=3, block_size=4,
              sparsity_ratio=0.75, pattern_type="dilated_sparse"),
        _case("hilbert_block_sparse", (1, 48, 4, 2, 8), True, "zigzag", grid=(6, 8), block_size=3,
              sparsity_ratio=0.5, pattern_type="global_local"),
        _case("hilbert_block_sparse", (1, 256, 2, 2, 8), True, "contiguous", grid=(16, 16), block_size=8,
              sparsity_ratio=0.9, pattern_type="local"),
        _case("hilbert_block_sparse", (1, 64, 2, 2, 8), False, "contiguous", grid=(8, 8), block_size=4,
              sparsity_ratio=0.5, pattern_type="local", token_order="hilbert"),
        _case("hilbert_block_sparse", (1, 64, 4, 2, 8), True, "zigzag", torch.bfloat16, grid=(8, 8), block_size=4,
              sparsity_ratio=0.75, pattern_type="global_local", backend="flex"),
    ]


# The pattern families, one per test file: a file's world runs its family's cases and checks alone, so two
# pytest workers never compute the same world.
FAMILIES = ("dilated", "block_sparse", "hilbert")


def family_cases(family: str) -> list[Case]:
    cases = {"dilated": dilated_cases, "block_sparse": block_sparse_cases,
             "hilbert": lambda: hilbert_cases() + hilbert_block_sparse_cases()}[family]()
    names = [c["name"] for c in cases]
    assert len(set(names)) == len(names), "case names must be unique: they key the results"
    return cases


def block_sparse_definition(n_blocks: int, sparsity_ratio: float, pattern_type: str) -> torch.Tensor:
    """(query block, key block) pairs each pattern keeps, written pair by pair from the patterns' documented
    meaning, apart from ``ring_plugin.patterns.block_mask`` (what the ring plans from): each query block keeps
    ``keep = round((1 - sparsity) * n_blocks)`` key blocks (at least one)."""
    keep = max(1, round((1.0 - sparsity_ratio) * n_blocks))
    mask = torch.zeros(n_blocks, n_blocks, dtype=torch.bool)
    for query in range(n_blocks):
        if pattern_type == "local":  # a window of `keep` blocks centred on the diagonal (an even one leans right)
            keys = set(range(query - (keep - 1) // 2, query - (keep - 1) // 2 + keep))
        elif pattern_type == "dilated_sparse":  # every stride-th block counted from the diagonal, both ways
            stride = max(1, round(1.0 / (1.0 - sparsity_ratio)))
            keys = {query + stride * m for m in range(-n_blocks, n_blocks + 1)}
        elif pattern_type == "global_local":
            # the first keep // 4 blocks see and are seen by every block; the rest of the budget is a local window
            n_global = max(1, keep // 4)
            window = max(1, keep - n_global)
            keys = set(range(query - (window - 1) // 2, query - (window - 1) // 2 + window)) | set(range(n_global))
            if query < n_global:
                keys = set(range(n_blocks))
        else:
            raise ValueError(pattern_type)
        for key in keys:
            if 0 <= key < n_blocks:
                mask[query, key] = True
    return mask


def oracle_mask(layer, n: int, heads: int) -> torch.Tensor | None:
    """The oracle's mask: none (dense), the dilated pattern's counts, or the block-sparse definition expanded to
    tokens."""
    if layer.pattern is None:
        return None
    if isinstance(layer.pattern, DilatedPattern):
        return layer.pattern.counts(n, heads)
    c = layer.config
    blocks = block_sparse_definition(n // c.block_size, c.sparsity_ratio, c.pattern_type)
    return blocks.repeat_interleave(c.block_size, 0).repeat_interleave(c.block_size, 1)


def oracle(layer, q, k, v, causal: bool):
    """Dense attention with the pattern's mask (:func:`oracle_mask`); a Hilbert layer taking row-major tokens:
    permute into Hilbert order, the same, permute back."""
    n, heads = q.shape[1], q.shape[2]
    counts = oracle_mask(layer, n, heads)
    if isinstance(layer, HilbertRingAttention) and layer.config.token_order == "row_major":
        perm = hilbert_permutation(*layer.grid_for(n))
        out = reference_attention(q[:, perm], k[:, perm], v[:, perm], causal=causal, allowed=counts)
        return out[:, inverse_permutation(perm)]
    return reference_attention(q, k, v, causal=causal, allowed=counts)


def run_case(rank: int, world: int, case: Case) -> list[float]:
    """Errors of output, dQ, dK, dV against autograd through the oracle (fp32: abs; half: relative)."""
    b, n, h, hkv, d = case["shape"]
    dtype, layout, causal = case["dtype"], case["layout"], case["causal"]
    gen = torch.Generator().manual_seed(zlib.crc32(case["name"].encode()))
    q, k, v = (torch.randn(b, n, hh, d, generator=gen).to(dtype) for hh in (h, hkv, hkv))
    grad = torch.randn(b, n, h, d, generator=gen).to(dtype)
    layer = create_ring_attention(case["variant"], layout=layout, **case["kw"])
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    ref = oracle(layer, *ref_in, causal)
    (ref * grad.double()).sum().backward()
    mine = [shard_sequence(t, 1, layout, rank, world).clone().requires_grad_() for t in (q, k, v)]
    out = layer(*mine, is_causal=causal)
    (out * shard_sequence(grad, 1, layout, rank, world)).sum().backward()
    errs = []
    for got, want in zip([out, *(t.grad for t in mine)], [ref, *(t.grad for t in ref_in)]):
        want = shard_sequence(want.detach(), 1, layout, rank, world)
        diff = (got.double() - want).abs().max().item()
        if dtype != torch.float32:
            diff /= max(want.abs().max().item(), 1e-6)
        errs.append(diff)
    assert torch.isfinite(out).all()
    return errs


def _dilated_bytes(world: int) -> dict[str, list[int]]:
    """Bytes this rank sends (forward, then forward+backward) for one segment = the whole sequence at
    rate 4, causal and not, and for the dense ring on the same shapes (4 heads, shard of 8 rows)."""
    res: dict[str, list[int]] = {}
    gen = torch.Generator().manual_seed(7)
    x = [torch.randn(2, 8, 4, 16, generator=gen, requires_grad=True) for _ in range(3)]
    for name, kw in (("dilated", {"segment_lengths": [8 * world], "dilation_rates": [4]}), ("dense", {})):
        for causal in (False, True):
            attn = create_ring_attention("distributed", **kw)
            out = attn(*x, is_causal=causal)
            fwd = attn.stats.bytes_sent
            out.sum().backward()
            res[f"{name}_{'causal' if causal else 'full'}"] = [fwd, attn.stats.bytes_sent]
    return res


def _gathered_bytes(rank: int, world: int) -> dict[str, list[int]]:
    """Bytes the gathered block-sparse path sends (forward, forward+backward), and the K/V rows the
    mask says other ranks read of ours and we read of theirs ('local', contiguous, 2 K/V heads)."""
    res: dict[str, list[int]] = {}
    gen = torch.Generator().manual_seed(11)
    n_local = 16
    n = n_local * world
    owner = torch.arange(n) // n_local
    for name, causal, dtype in (("full", False, torch.float32), ("causal", True, torch.float32),
                                ("causal_bf16", True, torch.bfloat16)):
        layer = create_ring_attention("block_sparse", backend="flex", block_size=4, sparsity_ratio=0.5,
                                      pattern_type="local", layout="contiguous", collect_stats=True)
        x = [torch.randn(1, n_local, h, 4, generator=gen).to(dtype).requires_grad_() for h in (4, 2, 2)]
        out = layer(*x, is_causal=causal)
        fwd = layer.stats.bytes_sent
        out.sum().backward()
        allowed = layer.pattern.counts(n, 4).bool()
        if causal:
            allowed &= torch.ones(n, n, dtype=torch.bool).tril()
        mine = owner == rank
        # A row read by several ranks is sent to each of them.
        sent = sum(int(allowed[owner == a][:, mine].any(0).sum()) for a in range(world) if a != rank)
        read = int(allowed[mine][:, ~mine].any(0).sum())
        res[name] = [fwd, layer.stats.bytes_sent, sent, read]
    return res


def _extra_checks(rank: int, world: int, family: str) -> dict[str, Any]:
    """The family's communication facts and errors raised before any ring message."""
    res: dict[str, Any] = {}
    if family == "dilated":
        # Every segment fits in a shard: the ring sends nothing.
        attn = create_ring_attention("distributed", segment_lengths=[4, 8], dilation_rates=[1, 2])
        x = [torch.randn(1, 8, 2, 4, requires_grad=True) for _ in range(3)]
        attn(*x, is_causal=True).sum().backward()
        res["local_bytes"] = attn.stats.bytes_sent
        # One segment spanning every shard: the ring sends.
        spanning = create_ring_attention("distributed", segment_lengths=[32], dilation_rates=[1])
        spanning(*x).sum().backward()
        res["spanning_bytes"] = spanning.stats.bytes_sent
        res["sparse_bytes"] = _dilated_bytes(world)
    if family == "block_sparse":
        res["gathered_bytes"] = _gathered_bytes(rank, world)
    # Bad configurations for a shard of 8 rows: each raises (the message is kept) on every rank.
    bad_by_family = {
        "dilated": {"segment_length": ("standard", {"segment_lengths": [12], "dilation_rates": [1]})},  # 8*world % 12
        "block_sparse": {"block_size": ("block_sparse", {"block_size": 16})},
        "hilbert": {
            "hilbert_grid": ("hilbert", {"grid": (3, 3)}),
            "hilbert_block_sparse_grid": ("hilbert_block_sparse", {"grid": (3, 3), "block_size": 4}),
            "hilbert_block_sparse_block_size": ("hilbert_block_sparse", {"grid": (world, 8), "block_size": 16}),
        },
    }
    bad = bad_by_family[family]
    res["bad"] = {}
    t = torch.randn(1, 8, 2, 4)
    for key, (name, kw) in bad.items():
        try:
            create_ring_attention(name, **kw)(t, t, t)
            res["bad"][key] = None
        except ValueError as err:
            res["bad"][key] = str(err)
    dist.barrier()
    return res


def _errors_by_name(rank: int, world: int, family: str) -> dict[str, list[float]]:
    return {c["name"]: run_case(rank, world, c) for c in family_cases(family)}


def world_worker(rank: int, world: int, family: str) -> dict[str, Any]:
    return {"errors": _errors_by_name(rank, world, family), "extra": _extra_checks(rank, world, family)}


@functools.cache
def world_results(world: int, family: str) -> tuple[list[dict[str, list[float]]], list[dict[str, Any]]]:
    """Per rank: errors of every case of the family (by name) in a world of ``world`` processes, and the
    facts of :func:`_extra_checks` (none in one process)."""
    if world == 1:
        return [_errors_by_name(0, 1, family)], []
    out = run_in_process_group(world_worker, world, family, timeout=200, reuse=True)
    return [r["errors"] for r in out], [r["extra"] for r in out]


@functools.cache
def _family_by_name() -> dict[str, str]:
    return {c["name"]: family for family in FAMILIES for c in family_cases(family)}


def worst_errors(world: int, case: Case) -> list[float]:
    """The worst over ranks of the case's [out, dq, dk, dv] errors."""
    per_rank = [errors[case["name"]] for errors in world_results(world, _family_by_name()[case["name"]])[0]]
    return [max(column) for column in zip(*per_rank)]


def case_name(case: Case) -> str:
    """The pytest id of a case."""
    return case["name"]


def tolerance(case: Case) -> float:
    return 1e-5 if case["dtype"] == torch.float32 else 2e-2
