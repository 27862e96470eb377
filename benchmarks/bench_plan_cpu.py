"""CPU time per call of the packed balanced layer on 2 gloo ranks: raw ids, prepared ids, the batch's plan.

One layer call (forward; ``--backward``: forward + backward) on this rank's shard of a packed sequence
in ``layout="balanced"``, timed per call, with the ids given as:

- ``ids``: this rank's shard of the ids (the slow path: the layer builds its plan in the call);
- ``prepared``: ``attn.prepare_documents(ids)`` made once before the timed calls;
- ``plan``: the batch's shard plan, made where the batch is cut (``ring_plugin.sequence_shards``), on
  trees that have it.

The same command runs on any tree of the project, so two commits compare side by side:

    PYTHONPATH=<tree> python benchmarks/bench_plan_cpu.py --out benchmarks/results/<name>.json

Small heads by default, so that the work a call does besides the kernels shows next to them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # PYTHONPATH picks the tree measured
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from provenance import write_json  # noqa: E402


def _lengths(n: int, seed: int) -> list[int]:
    try:
        from ring_plugin.documents import packed_document_lengths
    except ImportError:  # a tree from before the documents package
        from ring_plugin.balance import packed_document_lengths

    return packed_document_lengths(n, seed, mean=n / 12)


def time_calls(rank: int, world: int, n: int, calls: int, heads: int, head_dim: int,
               backward: bool) -> dict[str, object]:
    import ring_plugin
    from ring_plugin import create_ring_attention, ring_context, shard_sequence

    torch.set_num_threads(1)
    lengths = _lengths(n, 0)
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    gen = torch.Generator().manual_seed(0)
    q, k, v, g = (torch.randn(1, n, heads, head_dim, generator=gen) for _ in range(4))
    local = [shard_sequence(t, 1, "balanced", rank, world, document_ids=ids).requires_grad_() for t in (q, k, v)]
    grad = shard_sequence(g, 1, "balanced", rank, world, document_ids=ids)
    local_ids = shard_sequence(ids, 1, "balanced", rank, world, document_ids=ids)
    out: dict[str, object] = {}
    with ring_context(dist.group.WORLD, "balanced"):
        attn = create_ring_attention("standard", layout="balanced")
        modes = {"ids": lambda: local_ids, "prepared": lambda: attn.prepare_documents(local_ids)}
        if hasattr(ring_plugin, "sequence_shards"):
            modes["plan"] = lambda: ring_plugin.sequence_shards(ids)
        for mode, make in modes.items():
            given = make()  # made once, as a step would for all its layers
            times = []
            for i in range(calls + 2):
                dist.barrier()
                start = time.perf_counter()
                if backward:
                    attn(*local, is_causal=True, document_ids=given).backward(grad)
                else:
                    with torch.no_grad():
                        attn(*local, is_causal=True, document_ids=given)
                if i >= 2:  # two warm-up calls
                    times.append(time.perf_counter() - start)
            out[mode] = {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096, help="global sequence length")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--head-dim", type=int, default=8)
    parser.add_argument("--backward", action="store_true", help="time forward + backward (default: forward)")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON record here")
    args = parser.parse_args()
    from ring_plugin.testing import run_in_process_group

    per_rank = run_in_process_group(time_calls, 2, args.n, args.calls, args.heads, args.head_dim, args.backward,
                                    timeout=590)
    record = {
        "benchmark": "bench_plan_cpu", "backward": args.backward,
        "what": "packed balanced layer per call, 2 gloo ranks, statistics over the calls",
        "n": args.n, "heads": args.heads, "head_dim": args.head_dim, "calls": args.calls, "threads_per_rank": 1,
        "documents": len(_lengths(args.n, 0)),
        "per_rank": per_rank,
        "torch": torch.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    print(json.dumps(record, indent=1))
    if args.out is not None:
        write_json(args.out, record, indent=1)


if __name__ == "__main__":
    main()
