"""Packed documents on the ring, on GPUs: exactness over NCCL, then speed against one GPU's varlen call.

Run: ``torchrun --nproc_per_node=2 benchmarks/bench_packed.py`` (``--smoke``: tiny CPU/gloo run).

1. Equivalence: the ring with ``document_ids`` (contiguous and zigzag, causal and not, bf16 and fp32,
   grouped-query heads) against the fp64 oracle of the document mask.
2. Timing at 128K tokens, 32 heads x 128, bf16, fwd+bwd, documents of a seeded log-normal generator:
   the ring in each layout (balanced, zigzag, contiguous; balanced also with the ids prepared once, as
   a model passes them to its layers); the same documents on ONE GPU as one
   varlen flash call over the whole packed sequence (the practical limit); the dense causal ring.
   Rates are per GPU on the FLOPs the document mask needs (causal pairs inside documents), so
   ``ring / one GPU`` is the efficiency. The work imbalance of each layout is the planner's count:
   per rank (max / mean) and per lock-step ring step (``packed_layouts.ring_step_imbalance``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_ring import fwd_bwd_attention_flops, oracle_errors, peak_gb, reset_peak, time_fn  # noqa: E402
from packed_layouts import document_ids_from_lengths, layout_imbalance  # noqa: E402
from provenance import write_json  # noqa: E402

from ring_plugin import create_ring_attention, shard_sequence  # noqa: E402
from ring_plugin.attention.oracle import document_mask  # noqa: E402
from ring_plugin.documents import packed_document_lengths  # noqa: E402
from ring_plugin.layout import resolve_layout  # noqa: E402

LAYOUTS = ("balanced", "zigzag", "contiguous")


def ids_of(lengths: list[int]) -> torch.Tensor:
    return document_ids_from_lengths(lengths)[None]


def causal_pairs(lengths: list[int]) -> float:
    return float(sum(x * (x + 1) // 2 for x in lengths))


def one_gpu_varlen(lengths: list[int], heads: int, d: int, device: torch.device, warmup: int, repeat: int) -> dict:
    """One varlen flash call (fwd + bwd) over the whole packed sequence on this GPU."""
    n = sum(lengths)
    q, k, v, dout = (torch.randn(n, heads, d, device=device, dtype=torch.bfloat16) for _ in range(4))
    cu = torch.tensor([0, *lengths], device=device).cumsum(0).to(torch.int32)
    mx = max(lengths)
    aten = torch.ops.aten
    rng = torch.zeros(2, dtype=torch.int64, device=device)

    def run() -> None:
        out, lse, *_ = aten._flash_attention_forward(q, k, v, cu, cu, mx, mx, 0.0, True, False)
        aten._flash_attention_backward(dout, q, k, v, out, lse, cu, cu, mx, mx, 0.0, True, rng,
                                       torch.empty(0, device=device))

    reset_peak(device)
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeat):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        s.record()
        run()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    times.sort()
    return {"seconds": times[len(times) // 2], "peak_gb": torch.cuda.max_memory_allocated(device) / 1e9}


def ring_time(lengths, layout, heads, d, rank, world, device, warmup, repeat, with_docs=True,
              prepared=False) -> dict:
    """fwd + bwd of one ring layer; ``prepared``: the ids gathered and checked once, outside the timed
    calls (``prepare_documents``), as a model does for all its layers of a step."""
    n = sum(lengths)
    shards = resolve_layout(layout, world, ids_of(lengths))
    gen = torch.Generator(device=device).manual_seed(5)  # on the device: CPU randn of 4 GB takes minutes
    full = [torch.randn(1, n, heads, d, generator=gen, dtype=torch.bfloat16, device=device) for _ in range(4)]
    q, k, v, g = (shard_sequence(t, 1, shards, rank, world) for t in full)
    del full
    for t in (q, k, v):
        t.requires_grad_()
    ids = shard_sequence(ids_of(lengths), 1, shards, rank, world).to(device)
    attn = create_ring_attention("standard", layout=layout)
    kwargs = {"document_ids": attn.prepare_documents(ids) if prepared else ids} if with_docs else {}

    def run() -> None:
        for t in (q, k, v):
            t.grad = None
        attn(q, k, v, is_causal=True, **kwargs).backward(g)

    reset_peak(device)
    seconds = time_fn(run, warmup, repeat, device)
    return {"seconds": seconds, "peak_gb": peak_gb(device)}


def say(rank: int, text: str) -> None:
    if rank == 0:
        print(text, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--length", type=int, default=131072)
    ap.add_argument("--mean-doc", type=float, default=8192)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    backend = "gloo" if args.smoke else "nccl"
    # A hang (a bug) fails with a traceback after two minutes instead of eating the run's time limit.
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu") if args.smoke else torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    heads, d = (4, 16) if args.smoke else (32, 128)

    # 1. exactness over this world's backend
    eq_n, eq_mean = (64, 12.0) if args.smoke else (4096, 512.0)
    eq_lengths = packed_document_lengths(eq_n, 11, mean=eq_mean)
    ids = ids_of(eq_lengths)
    equivalence = []
    for dtype in (torch.bfloat16, torch.float32):
        for layout in ("contiguous", "zigzag"):
            for causal in (True, False):
                attn = create_ring_attention("standard", layout=layout)
                shape = (1, eq_n, 8 if not args.smoke else 4, 2, 128 if not args.smoke else 16)
                errs = oracle_errors(rank, world, device, attn, shape, layout, causal, dtype,
                                     allowed=document_mask(ids).to(device), document_ids=ids)
                tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
                worst = max(errs[f"{x}_rel"] for x in ("out", "dq", "dk", "dv"))
                equivalence.append(dict(layout=layout, causal=causal, dtype=str(dtype), **errs,
                                        passed=bool(worst < tol)))
                say(rank, f"equivalence {layout} causal={causal} {dtype}: worst rel {worst:.2e}")

    # 2. timing
    runs = []
    n = 256 if args.smoke else args.length
    for seed in args.seeds:
        lengths = packed_document_lengths(n, seed, mean=args.mean_doc if not args.smoke else 40.0)
        flops = fwd_bwd_attention_flops(causal_pairs(lengths) * heads, d, causal=False)
        row: dict = {"seed": seed, "documents": len(lengths), "longest": max(lengths), "mask_tflop": flops / 1e12}
        say(rank, f"seed {seed}: {len(lengths)} documents, longest {max(lengths)}")
        if device.type == "cuda":
            single = one_gpu_varlen(lengths, heads, d, device, args.warmup, args.repeat) if rank == 0 else {}
            dist.barrier()
            if rank == 0:
                single["tflops"] = flops / single["seconds"] / 1e12
                row["one_gpu_varlen"] = single
        for layout in LAYOUTS:
            r = ring_time(lengths, layout, heads, d, rank, world, device, args.warmup, args.repeat)
            say(rank, f"  ring {layout}: {r['seconds'] * 1e3:.1f} ms")
            r["tflops_per_gpu"] = flops / world / r["seconds"] / 1e12
            r["imbalance"] = layout_imbalance(ids_of(lengths), layout, world, per="rank")
            r["step_imbalance"] = layout_imbalance(ids_of(lengths), layout, world, per="step")
            row[f"ring_{layout}"] = r
        r = ring_time(lengths, "balanced", heads, d, rank, world, device, args.warmup, args.repeat, prepared=True)
        say(rank, f"  ring balanced, prepared ids: {r['seconds'] * 1e3:.1f} ms")
        r["tflops_per_gpu"] = flops / world / r["seconds"] / 1e12
        row["ring_balanced_prepared"] = r
        dense = ring_time(lengths, "zigzag", heads, d, rank, world, device, args.warmup, args.repeat, False)
        dense_flops = fwd_bwd_attention_flops(float(n) * n * heads, d, True)
        dense["tflops_per_gpu"] = dense_flops / world / dense["seconds"] / 1e12
        row["dense_causal_ring"] = dense
        if "one_gpu_varlen" in row:
            for key in [f"ring_{layout}" for layout in LAYOUTS] + ["ring_balanced_prepared"]:
                row[key]["vs_one_gpu_rate"] = row[key]["tflops_per_gpu"] / row["one_gpu_varlen"]["tflops"]
        runs.append(row)

    if rank == 0:
        result = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "gpus": world, "torch": torch.__version__, "date": datetime.date.today().isoformat(),
            "heads": heads, "head_dim": d, "dtype": "bfloat16", "length": n,
            "generator": {"kind": "ring_plugin.documents.packed_document_lengths (log-normal, sigma 1.0)",
                          "mean": args.mean_doc, "seeds": args.seeds},
            "flops": "fwd+bwd = 3.5 x 4 x d x (causal pairs inside documents) x heads",
            "equivalence": equivalence, "runs": runs,
        }
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        tag = "smoke" if args.smoke else f"{world}x{torch.cuda.get_device_name(device).split()[-1]}"
        path = out_dir / f"bench_packed_{tag}_{result['date']}.json"
        write_json(path, result, indent=1)
        print(f"equivalence: {sum(e['passed'] for e in equivalence)}/{len(equivalence)} passed; "
              f"worst bf16 rel {max(e['out_rel'] for e in equivalence if 'bfloat16' in e['dtype']):.2e}")
        for row in runs:
            single = row.get("one_gpu_varlen", {})
            print(f"seed {row['seed']}: {row['documents']} docs (longest {row['longest']}), "
                  f"1 GPU varlen {single.get('tflops', float('nan')):.0f} TFLOP/s; "
                  + "; ".join(f"{lay} {row[f'ring_{lay}']['tflops_per_gpu']:.0f} TFLOP/s/GPU "
                              f"({row[f'ring_{lay}'].get('vs_one_gpu_rate', float('nan')):.2f}x, "
                              f"imbalance {row[f'ring_{lay}']['imbalance']:.3f} rank / "
                              f"{row[f'ring_{lay}']['step_imbalance']:.3f} step)" for lay in LAYOUTS)
                  + f"; balanced with prepared ids {row['ring_balanced_prepared']['tflops_per_gpu']:.0f} "
                  f"({row['ring_balanced_prepared'].get('vs_one_gpu_rate', float('nan')):.2f}x)"
                  + f"; dense causal ring {row['dense_causal_ring']['tflops_per_gpu']:.0f}")
        print(f"wrote {path}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
