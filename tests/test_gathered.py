"""The gathered block-sparse path: its flex BlockMask, and where backend='flex' is accepted.

Its numbers against the oracle at world 1, 2, 4 are checked with the other block-sparse cases
(``tests/pattern_world.py``, ``backend='flex'``); its bytes in ``tests/test_block_sparse.py``.
The BlockMask is checked on CPU here: structurally (tiles and mask_mod expand to the exact mask),
with flex_attention's eager forward (which applies mask_mod only), and with one compiled CPU forward
(which skips absent tiles and applies mask_mod on partial tiles only, as the GPU kernel does).
Flex has no CPU backward; the flex backward runs on GPU only.
"""

from __future__ import annotations

import types
import warnings

import pytest
import torch
from torch.nn.attention.flex_attention import flex_attention

from ring_plugin import create_ring_attention
from ring_plugin.attention.call import RingCall
from ring_plugin.attention.exchange import build_exchange_plan
from ring_plugin.attention.gathered import Geometry, build_gathered_plan, dense_masked_attention, flex_block_mask
from ring_plugin.layout import ShardLayout
from ring_plugin.ops.kernels import KERNELS, select_kernel
from ring_plugin.patterns import BlockSparsePattern

N = 512
SCALE = 0.25


def _geometry(block_size: int, causal: bool, world: int, rank: int, layout: str) -> Geometry:
    """The geometry of ``rank`` in a ring of ``world`` (no process group: the plan needs rank and size only)."""
    pattern = BlockSparsePattern(block_size, 0.25, "global_local")
    comm = types.SimpleNamespace(rank=rank, world_size=world)
    call = RingCall(comm=comm, layout=ShardLayout.named(layout, world), kernel=KERNELS["math"],  # type: ignore[arg-type]
                    scale=SCALE, causal=causal, heads=2, kv_heads=1)
    exchange = build_exchange_plan(pattern, call, N // world)
    return build_gathered_plan(pattern, ("test",), call, exchange).geometry


def _expand(block_mask, geo: Geometry) -> torch.Tensor:
    """The (Lq, Lk) pairs a flex kernel computes: full tiles, plus partial tiles where mask_mod holds."""
    lq, lk = geo.pos_q.numel(), geo.pos_k.numel()
    dense = block_mask.to_dense()[0, 0]  # partial | full tiles
    full = torch.zeros_like(dense)
    if block_mask.full_kv_num_blocks is not None:
        for i in range(full.shape[0]):
            full[i, block_mask.full_kv_indices[0, 0, i, : block_mask.full_kv_num_blocks[0, 0, i]]] = True
    bq, bk = block_mask.BLOCK_SIZE
    tiles = dense.repeat_interleave(bq, 0).repeat_interleave(bk, 1)[:lq, :lk]
    full = full.repeat_interleave(bq, 0).repeat_interleave(bk, 1)[:lq, :lk]
    mod = block_mask.mask_mod(None, None, torch.arange(lq)[:, None], torch.arange(lk)[None, :])
    return full | (tiles & mod)


CONFIGS = [
    # block_size 128: tiles built directly (full / partial / absent); 64: create_block_mask.
    (bs, causal, world, rank, layout)
    for bs in (128, 64)
    for causal in (False, True)
    for world, rank, layout in ((1, 0, "contiguous"), (2, 1, "zigzag"), (4, 2, "contiguous"))
]


@pytest.mark.parametrize("bs,causal,world,rank,layout", CONFIGS)
def test_flex_block_mask_matches_exact_mask(bs: int, causal: bool, world: int, rank: int, layout: str) -> None:
    geo = _geometry(bs, causal, world, rank, layout)
    if world > 1:
        assert geo.pos_k.numel() > geo.pos_q.numel()  # rows of other ranks are read
    allowed = geo.allowed()
    block_mask = flex_block_mask(geo, torch.device("cpu"))
    assert tuple(block_mask.seq_lengths) == tuple(allowed.shape)
    assert torch.equal(_expand(block_mask, geo), allowed)
    # No wasted tiles: every listed tile has an allowed pair.
    tiles = block_mask.to_dense()[0, 0].repeat_interleave(128, 0).repeat_interleave(128, 1)
    padded = torch.zeros_like(tiles)
    padded[: allowed.shape[0], : allowed.shape[1]] = allowed
    per_tile = padded.unflatten(0, (-1, 128)).unflatten(2, (-1, 128)).any(3).any(1)
    assert torch.equal(per_tile, block_mask.to_dense()[0, 0])
    # Eager flex (mask_mod on every pair) agrees with the exact masked path.
    gen = torch.Generator().manual_seed(bs + world)
    q = torch.randn(1, 2, allowed.shape[0], 16, generator=gen)
    k, v = (torch.randn(1, 1, allowed.shape[1], 16, generator=gen) for _ in range(2))
    want = dense_masked_attention(q, k, v, allowed, SCALE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
        got = flex_attention(q, k, v, block_mask=block_mask, scale=SCALE, enable_gqa=True)
    assert (got - want).abs().max().item() < 1e-5


def test_compiled_cpu_flex_forward_matches_exact() -> None:
    # The compiled kernel reads the tiles (absent tiles are skipped, full ones unmasked): the
    # tile-built mask of a causal zigzag rank with fetched rows, as the GPU path builds it.
    geo = _geometry(128, True, 2, 1, "zigzag")
    block_mask = flex_block_mask(geo, torch.device("cpu"))
    assert block_mask.full_kv_num_blocks.sum() > 0 and block_mask.kv_num_blocks.sum() > 0
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, geo.pos_q.numel(), 16, generator=gen)
    k, v = (torch.randn(1, 1, geo.pos_k.numel(), 16, generator=gen) for _ in range(2))
    want = dense_masked_attention(q, k, v, geo.allowed(), SCALE)
    got = torch.compile(flex_attention, dynamic=False)(q, k, v, block_mask=block_mask, scale=SCALE, enable_gqa=True)
    assert (got - want).abs().max().item() < 1e-5


@pytest.mark.unit
@pytest.mark.parametrize("name", ["standard", "sdpa", "distributed", "correct", "hilbert"])
def test_flex_backend_is_block_sparse_only(name: str) -> None:
    with pytest.raises(ValueError, match="backend='flex'"):
        create_ring_attention(name, backend="flex")
    with pytest.raises(ValueError, match="backend='flex'"):
        select_kernel("flex", torch.device("cpu"), torch.float32, 64)


@pytest.mark.unit
def test_gathered_path_selection() -> None:
    q = torch.randn(1, 8, 2, 4, dtype=torch.bfloat16)
    assert create_ring_attention("block_sparse", backend="flex").uses_gathered_path(q)
    assert not create_ring_attention("block_sparse").uses_gathered_path(q)  # auto on CPU: the engine
    assert not create_ring_attention("block_sparse", backend="math").uses_gathered_path(q)


@pytest.mark.unit
def test_uncovered_rows_are_zero_with_finite_gradients() -> None:
    q = torch.randn(1, 2, 8, 4, requires_grad=True)
    allowed = torch.ones(8, 8, dtype=torch.bool).tril()
    allowed[3] = False
    out = dense_masked_attention(q, q[:, :1], q[:, :1], allowed, SCALE)
    out.sum().backward()
    assert out[:, :, 3].abs().max() == 0 and out[:, :, 4].abs().max() > 0
    assert torch.isfinite(q.grad).all()
