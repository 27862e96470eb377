"""Ring attention on 2 CPU processes: error against the oracle and time, causal and not.

    python examples/ring_demo.py [--world 2] [--tokens 4096]
"""

from __future__ import annotations

import argparse
import time

import torch

from ring_plugin import create_ring_attention, reference_attention, shard_sequence
from ring_plugin.testing import run_in_process_group


def _demo(rank: int, world: int, tokens: int, heads: int, head_dim: int) -> list[dict]:
    rows = []
    for causal in (True, False):
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, tokens, heads, head_dim, generator=gen) for _ in range(3))
        local = [shard_sequence(t, 1, "zigzag", rank, world).requires_grad_() for t in (q, k, v)]
        attn = create_ring_attention("standard", layout="zigzag")
        start = time.perf_counter()
        out = attn(*local, is_causal=causal)
        out.sum().backward()
        seconds = time.perf_counter() - start
        ref = shard_sequence(reference_attention(q, k, v, causal=causal), 1, "zigzag", rank, world)
        rows.append(dict(causal=causal, max_abs_error=(out - ref).abs().max().item(), seconds=seconds))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    args = parser.parse_args()
    per_rank = run_in_process_group(_demo, args.world, args.tokens, args.heads, args.head_dim, timeout=600)
    print(f"ring attention, {args.world} CPU processes (gloo), {args.tokens} tokens, "
          f"{args.heads} heads x {args.head_dim}, zigzag layout, fp32, fwd+bwd")
    print(f"{'causal':>6} {'max |ring - oracle|':>20} {'seconds':>8}")
    for i, row in enumerate(per_rank[0]):
        err = max(r[i]["max_abs_error"] for r in per_rank)
        sec = max(r[i]["seconds"] for r in per_rank)
        print(f"{row['causal']!s:>6} {err:20.2e} {sec:8.2f}")


if __name__ == "__main__":
    main()
