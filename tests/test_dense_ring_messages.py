"""What the dense ring's backward sends home: each step's dK/dV block by block, over the key rows each
block touched, in the dtype the kernel returned them in (fp32 where grouped-query heads were summed).

The dtype rule is checked exactly on hand-built blocks; the bytes on a 2-rank gloo ring, where they
follow from the shapes alone.
"""

from __future__ import annotations

import torch

from ring_plugin import create_ring_attention, shard_sequence
from ring_plugin.attention.call import RingCall
from ring_plugin.attention.dense_ring import home_grad_dtype
from ring_plugin.attention.plan import Block
from ring_plugin.comm.ring import RingComm
from ring_plugin.documents.blocks import DocumentBlock
from ring_plugin.layout import ShardLayout
from ring_plugin.ops.kernels import KERNELS
from ring_plugin.testing import run_in_process_group


def _call(kernel: str, heads: int = 4, kv_heads: int = 4) -> RingCall:
    return RingCall(RingComm(None), ShardLayout.named("contiguous", 1), KERNELS[kernel], 1.0, True, heads, kv_heads)


def _doc(q: slice, kv: slice) -> DocumentBlock:
    ids = torch.zeros(1, 1, dtype=torch.int64)
    return DocumentBlock(q, kv, False, ids, ids)


BF16, FP32 = torch.bfloat16, torch.float32


def test_wire_dtype_is_the_kernels_unless_gradients_were_summed():
    dense, doc = Block(slice(0, 8), slice(0, 8), False), _doc(slice(0, 8), slice(0, 8))
    assert home_grad_dtype(_call("flash"), dense, BF16) == BF16  # the kernel's own bf16 dK/dV
    assert home_grad_dtype(_call("flash", 4, 2), dense, BF16) == FP32  # two query heads summed per K/V head
    assert home_grad_dtype(_call("cpu_flash"), dense, BF16) == FP32  # this kernel returns fp32 partials
    assert home_grad_dtype(_call("cpu_flash"), doc, BF16) == BF16  # masked: the input's dtype
    assert home_grad_dtype(_call("flash", 4, 2), doc, BF16) == BF16  # heads summed by the kernel itself
    assert home_grad_dtype(_call("flash"), dense, FP32) == FP32


N, HEADS, DIM = 32, 2, 8


def _bytes_worker(rank: int, world: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(3)
    full = [torch.randn(1, N, HEADS, DIM, generator=gen, dtype=torch.bfloat16) for _ in range(3)]
    # documents [0, 10) [10, 32): at world 2 rank 1's rows 16..31 read keys 10..15 of rank 0 only
    ids = torch.tensor([[0] * 10 + [1] * 22])
    q, k, v = (shard_sequence(t, 1, "contiguous", rank, world).requires_grad_() for t in full)
    attn = create_ring_attention("distributed", layout="contiguous")
    attn(q, k, v, is_causal=True, document_ids=shard_sequence(ids, 1, "contiguous", rank, world)).sum().backward()
    return {"sent": attn.get_communication_stats()["bytes_sent"], "kv": float(2 * k.numel() * k.element_size())}


def test_a_step_sends_home_only_the_rows_it_read_in_the_kernels_dtype():
    sent = run_in_process_group(_bytes_worker, 2, timeout=90, reuse=True)
    row_bytes = HEADS * DIM * 2 * 2  # one key row of dK and dV in bf16
    # forward and backward: K/V once each way; rank 0's queries read nothing of rank 1
    assert sent[0]["sent"] == 2 * sent[0]["kv"]
    # rank 1 sends dK/dV of rank 0's key rows 10..15 (local 10:16), bf16 as the masked kernel returned them
    assert sent[1]["sent"] == 2 * sent[1]["kv"] + 6 * row_bytes
