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

from provenance import text_header  # noqa: E402

from ring_plugin import create_ring_attention  # noqa: E402


def timeline_summary(trace: dict, steps: int, gap_us: float = 50.0) -> str:
    """Per CUDA stream: kernels' busy time (intervals merged) over the traced span; for the compute
    stream (the one with the most kernels), its idle gaps longer than ``gap_us`` and the kernels
    around each, and its kernels by time."""
    kernels = [e for e in trace["traceEvents"] if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not kernels:
        return "no GPU kernels traced"
    start = min(e["ts"] for e in kernels)
    end = max(e["ts"] + e["dur"] for e in kernels)
    by_stream: dict = {}
    for e in kernels:
        by_stream.setdefault(e["tid"], []).append(e)
    lines = [f"traced span {(end - start) / 1e3:.2f} ms over {steps} steps"]
    busiest, busiest_time = None, -1
    for stream, events in sorted(by_stream.items(), key=lambda kv: str(kv[0])):
        events.sort(key=lambda e: e["ts"])
        busy, cur_s, cur_e = 0.0, None, None
        for e in events:
            s, t = e["ts"], e["ts"] + e["dur"]
            if cur_e is None or s > cur_e:
                busy += 0.0 if cur_e is None else cur_e - cur_s
                cur_s, cur_e = s, t
            else:
                cur_e = max(cur_e, t)
        busy += cur_e - cur_s
        lines.append(f"stream {stream}: {len(events)} kernels, busy {busy / 1e3:.2f} ms")
        if len(events) > busiest_time:  # the compute stream launches the most kernels
            busiest, busiest_time = stream, len(events)
    events = by_stream[busiest]
    gaps = []
    for a, b in zip(events, events[1:]):
        gap = b["ts"] - (a["ts"] + a["dur"])
        if gap > gap_us:
            gaps.append((gap, a["name"][:70], b["name"][:70]))
    idle = sum(g[0] for g in gaps) / 1e3
    lines.append(f"stream {busiest} idle gaps > {gap_us:.0f} us: {len(gaps)}, total {idle:.2f} ms")
    for gap, a, b in sorted(gaps, reverse=True)[:15]:
        lines.append(f"  {gap / 1e3:7.3f} ms after {a} | before {b}")
    by_name: dict = {}
    for e in events:
        by_name[e["name"][:90]] = by_name.get(e["name"][:90], 0.0) + e["dur"]
    lines.append("compute stream kernels by total time (ms per step):")
    for name, dur in sorted(by_name.items(), key=lambda kv: -kv[1])[:25]:
        lines.append(f"  {dur / 1e3 / steps:8.3f}  {name}")
    return "\n".join(lines)


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
    ap.add_argument("--timeline", action="store_true",
                    help="also print each CUDA stream's busy time and the compute stream's idle gaps")
    ap.add_argument("--documents", type=float, default=0.0,
                    help="packed documents of this mean length (ring_plugin.documents generator, seed 0); 0: none")
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
        from benchmarks.packed_layouts import document_ids_from_lengths
        from ring_plugin.documents import packed_document_lengths
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
    if args.timeline:
        trace = Path(f"/tmp/profile_pattern_trace_{dist.get_rank()}.json")
        prof.export_chrome_trace(str(trace))
        table += "\n" + timeline_summary(json.loads(trace.read_text()), steps=2)
    if dist.get_rank() == 0:
        print(table)
        if args.out:
            Path(args.out).write_text(text_header() + table)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
