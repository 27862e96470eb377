"""Where a pattern layer's fwd+bwd time goes: torch.profiler over a few steps, top CUDA ops by time.

``torchrun --nproc_per_node=2 benchmarks/profile_pattern.py --length 262144 --variant standard \\
    --kw '{"segment_lengths": [2048, 8192, 32768, 131072], "dilation_rates": [1, 4, 16, 64]}'``;
packed documents: ``--length 131072 --documents 8192 --kw '{"layout": "balanced"}'``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ring_plugin import create_ring_attention  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=262144)
    ap.add_argument("--variant", default="standard")
    ap.add_argument("--kw", default="{}", help="layer keyword arguments as JSON")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--causal", type=int, default=1)
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument("--out", default=None, help="write rank 0's table here")
    ap.add_argument("--documents", type=float, default=0.0,
                    help="packed documents of this mean length (ring_plugin.balance generator, seed 0); 0: none")
    args = ap.parse_args()
    dist.init_process_group("nccl")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    layer = create_ring_attention(args.variant, **json.loads(args.kw))
    n_local = args.length // dist.get_world_size()
    q, k, v = (torch.randn(1, n_local, args.heads, args.head_dim, device=device, dtype=torch.bfloat16)
               .requires_grad_() for _ in range(3))

    masks = {}
    if args.documents:
        from ring_plugin.balance import document_ids_from_lengths, packed_document_lengths
        from ring_plugin.layout import shard_sequence

        ids = document_ids_from_lengths(packed_document_lengths(args.length, 0, mean=args.documents))[None]
        layout = json.loads(args.kw).get("layout", "contiguous")
        masks["document_ids"] = shard_sequence(ids, 1, layout, dist.get_rank(), dist.get_world_size(),
                                               document_ids=ids).to(device)

    def step() -> None:
        out = layer(q, k, v, is_causal=bool(args.causal), **masks)
        out.backward(torch.ones_like(out))

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60)
    if dist.get_rank() == 0:
        print(table)
        if args.out:
            Path(args.out).write_text(table)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
