"""Pattern benchmarks on the ring: dilated (LongNet), block-sparse (also in Hilbert order) and the dense
ring for speed-up.

GPU: ``torchrun --nproc_per_node=2 benchmarks/bench_patterns.py --out benchmarks/results/patterns_h200.json``
CPU smoke (gloo, tiny sizes): ``python benchmarks/bench_patterns.py --smoke``

Each case is timed fwd+bwd with CUDA events (warm-up, median). TFLOP/s count the pattern's own
FLOPs: 4*n_q*n_k*d per head over the computed pairs, x0.5 under causal, x3.5 for fwd+bwd. Each
case runs in try/except, so one failure (e.g. OOM) is recorded and the run goes on.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist

# bench_ring (this folder) also puts the repository on sys.path, so no install is needed.
from bench_ring import fwd_bwd_attention_flops, oracle_errors
from provenance import write_json  # noqa: E402

from ring_plugin import create_ring_attention
from ring_plugin.patterns import DilatedPattern

DILATED = {"segment_lengths": [2048, 8192, 32768, 131072], "dilation_rates": [1, 4, 16, 64]}


def pattern_flops(name: str, layer, n: int, heads: int, d: int, causal: bool) -> float:
    """Forward+backward FLOPs of the pairs the pattern computes (x0.5 under causal)."""
    if name == "dilated":
        pairs = 0.0
        assert isinstance(layer.pattern, DilatedPattern)
        for w, r in layer.pattern.pairs(n):
            # Every head is in exactly one offset group: (w/r)^2 pairs per segment, n/w segments.
            pairs += heads * (n / w) * (w / r) ** 2
    elif name in ("block_sparse", "hilbert_block_sparse"):
        mask = layer.block_mask(n)
        pairs = heads * float(mask.sum()) * layer.config.block_size**2
    else:
        pairs = heads * float(n) * n
    return fwd_bwd_attention_flops(pairs, d, causal)


def cases(smoke: bool) -> list[dict[str, Any]]:
    if smoke:
        small = {"segment_lengths": [16, 32, 64, 128], "dilation_rates": [1, 2, 4, 8]}
        return [
            {"name": "dense", "n": 256, "kw": {}},
            {"name": "dilated", "n": 256, "kw": small},
            {"name": "block_sparse", "n": 256, "kw": {"block_size": 16, "sparsity_ratio": 0.9}},
            {"name": "hilbert_block_sparse", "n": 256,
             "kw": {"block_size": 16, "sparsity_ratio": 0.9, "grid": (16, 16)}},
        ]
    # Each case runs in its best layout: the dense causal ring balanced (zigzag); the local patterns
    # contiguous, where segments and local blocks stay inside a shard.
    dense = {"layout": "zigzag"}
    out = []
    for n in (262144, 1048576):
        out += [{"name": "dilated", "n": n, "kw": {**DILATED, "layout": "contiguous"}},
                {"name": "dense", "n": n, "kw": dense}]
    out += [
        {"name": "block_sparse", "n": 131072,
         "kw": {"block_size": 128, "sparsity_ratio": 0.9, "pattern_type": "local", "layout": "contiguous"}},
        {"name": "block_sparse", "n": 131072,  # the sparsity of flex_attention's published 7.2x
         "kw": {"block_size": 128, "sparsity_ratio": 0.95, "pattern_type": "local", "layout": "contiguous"}},
        {"name": "dense", "n": 131072, "kw": dense},
        # Block-sparse along the Hilbert curve of a 256x512 grid, data already in Hilbert order: the
        # same FLOPs as the 90 % block-sparse case above, so the same time within noise is the target.
        {"name": "hilbert_block_sparse", "n": 131072,
         "kw": {"block_size": 128, "sparsity_ratio": 0.9, "pattern_type": "local", "layout": "contiguous",
                "grid": (256, 512), "token_order": "hilbert"}},
    ]
    return out


def equivalence_cases(smoke: bool) -> list[dict[str, Any]]:
    """Pattern layers vs the fp64 oracle: view blocks (local segments), index blocks (segments spanning
    ranks, grouped-query K/V) and block-sparse (its GPU path and the engine path), both layouts."""
    if smoke:
        dil = {"segment_lengths": [16, 32, 64], "dilation_rates": [1, 2, 4]}
        return [{"name": "standard", "shape": (1, 128, 4, 4, 16), "kw": dil, "layout": "zigzag", "causal": True},
                {"name": "block_sparse", "shape": (1, 128, 4, 4, 16), "causal": True, "layout": "contiguous",
                 "kw": {"block_size": 16, "sparsity_ratio": 0.5}}]
    spanning = {"segment_lengths": [256, 1024, 2048, 4096], "dilation_rates": [1, 4, 16, 64]}
    local = {"segment_lengths": [128, 512, 1024, 2048], "dilation_rates": [1, 2, 4, 8]}
    out = []
    for layout in ("contiguous", "zigzag"):
        for causal in (False, True):
            out.append({"name": "standard", "shape": (1, 4096, 8, 8, 128), "kw": spanning, "layout": layout,
                        "causal": causal})
            out.append({"name": "standard", "shape": (2, 4096, 8, 8, 128), "kw": local, "layout": layout,
                        "causal": causal})
    out.append({"name": "standard", "shape": (1, 4096, 8, 2, 128), "kw": spanning, "layout": "zigzag",
                "causal": True})  # grouped-query: index blocks
    out.append({"name": "standard", "shape": (1, 4096, 8, 8, 128), "kw": {**local, "backend": "flash"},
                "layout": "contiguous", "causal": True})
    out.append({"name": "standard", "shape": (1, 4096, 8, 8, 64), "kw": local, "layout": "contiguous",
                "causal": True, "dtype": torch.float32})
    for pattern in ("local", "dilated_sparse", "global_local"):
        for causal in (False, True):
            for backend in ("auto", "cudnn"):
                out.append({"name": "block_sparse", "shape": (1, 4096, 8, 8, 128), "layout": "contiguous",
                            "causal": causal, "kw": {"block_size": 128, "sparsity_ratio": 0.75,
                                                     "pattern_type": pattern, "backend": backend}})
    out.append({"name": "block_sparse", "shape": (1, 4096, 8, 4, 128), "layout": "zigzag", "causal": True,
                "kw": {"block_size": 64, "sparsity_ratio": 0.75, "pattern_type": "local"}})
    return out


def check_patterns(rank: int, world: int, device: torch.device, smoke: bool = False) -> list[dict[str, Any]]:
    rows = []
    for case in equivalence_cases(smoke):
        dtype = case.get("dtype", torch.bfloat16 if device.type == "cuda" else torch.float32)
        row: dict[str, Any] = {"variant": case["name"], "shape": list(case["shape"]), "layout": case["layout"],
                               "causal": case["causal"], "dtype": str(dtype), **case["kw"]}
        try:
            layer = create_ring_attention(case["name"], layout=case["layout"], **case["kw"])
            n, heads = case["shape"][1], case["shape"][2]
            allowed = layer.pattern.counts(n, heads, device)
            if case["name"] == "block_sparse":
                allowed = allowed.bool()
            errs = oracle_errors(rank, world, device, layer, case["shape"], case["layout"], case["causal"], dtype,
                                 allowed)
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            row.update(errs, passed=bool(max(errs[f"{x}_rel"] for x in ("out", "dq", "dk", "dv")) < tol))
        except Exception as err:  # noqa: BLE001 - recorded as a failure, the run goes on
            row.update(passed=False, error=f"{type(err).__name__}: {str(err)[:300]}")
        rows.append(row)
        if rank == 0:
            print(json.dumps(row), flush=True)
    return rows


def _timer(device: torch.device):
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        return (lambda: start.record()), (lambda: (end.record(), end.synchronize(), start.elapsed_time(end))[2])
    mark: list[float] = []
    return (lambda: mark.append(time.perf_counter())), (lambda: (time.perf_counter() - mark.pop()) * 1e3)


def run_pattern_benchmarks(rank: int, world: int, device: torch.device, results: list[dict[str, Any]],
                           smoke: bool = False, heads: int = 32, head_dim: int = 128, causal: bool = True,
                           warmup: int = 2, iters: int = 5, max_dense_seconds: float = 60.0,
                           only: list[str] | None = None) -> None:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if smoke:
        heads, head_dim, warmup, iters = 4, 16, 1, 2
    name_map = {"dense": "standard", "dilated": "standard", "block_sparse": "block_sparse",
                "hilbert_block_sparse": "hilbert_block_sparse"}
    todo = cases(smoke)
    if only is not None:  # the dense ring runs only at the lengths of the selected pattern cases
        lengths = {c["n"] for c in todo if c["name"] in only and c["name"] != "dense"}
        todo = [c for c in todo if c["name"] in only and (c["name"] != "dense" or c["n"] in lengths)]
    for case in todo:
        name, n = case["name"], case["n"]
        row: dict[str, Any] = {"case": name, "n": n, "world": world, "heads": heads, "head_dim": head_dim,
                               "causal": causal, "dtype": str(dtype), **{k: v for k, v in case["kw"].items()}}
        try:
            layer = create_ring_attention(name_map[name], **case["kw"])
            gen = torch.Generator(device="cpu").manual_seed(0)
            n_local = n // world
            q, k, v = (torch.randn(1, n_local, heads, head_dim, generator=gen).to(device, dtype).requires_grad_()
                       for _ in range(3))
            start, stop = _timer(device)
            times = []
            # The dense 1M ring takes tens of seconds per step: one warm-up, one timed run.
            warm, reps = (1, 1) if (name == "dense" and n >= 1 << 20) else (warmup, iters)
            for i in range(warm + reps):
                if i == warm and device.type == "cuda":  # the step's peak, not the first call's compile
                    torch.cuda.reset_peak_memory_stats(device)
                start()
                out = layer(q, k, v, is_causal=causal)
                out.backward(torch.ones_like(out))
                ms = stop()
                q.grad = k.grad = v.grad = None
                if i >= warm:
                    times.append(ms)
                if ms / 1e3 * (warm + reps) > max_dense_seconds and i >= warm:
                    break  # keep the whole run within a few minutes
            med = statistics.median(times)
            flops = pattern_flops(name, layer, n, heads, head_dim, causal) / world
            row.update(ms=med, tflops_per_gpu=flops / (med / 1e3) / 1e12,
                       peak_gb=(torch.cuda.max_memory_allocated(device) / 2**30) if device.type == "cuda" else None)
        except Exception as err:  # noqa: BLE001 - recorded, the run goes on
            row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
            if device.type == "cuda":
                torch.cuda.empty_cache()
        results.append(row)
        if rank == 0:
            print(json.dumps(row), flush=True)
    dense = {r["n"]: r["ms"] for r in results if r["case"] == "dense" and "ms" in r}
    for r in results:
        if r["case"] != "dense" and "ms" in r and r["n"] in dense:
            r["speedup_vs_dense_ring"] = dense[r["n"]] / r["ms"]


def _smoke_worker(rank: int, world: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    results: list[dict[str, Any]] = []
    equivalence = check_patterns(rank, world, torch.device("cpu"), smoke=True)
    run_pattern_benchmarks(rank, world, torch.device("cpu"), results, smoke=True)
    return equivalence, results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run on 2 gloo processes")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--skip-equivalence", action="store_true")
    ap.add_argument("--cases", default="dense,dilated,block_sparse,hilbert_block_sparse",
                    help="comma-separated timed cases")
    args = ap.parse_args()
    if args.smoke:
        from ring_plugin.testing import run_in_process_group

        equivalence, results = run_in_process_group(_smoke_worker, 2, timeout=300)[0]
        device_name = "cpu"
    else:
        dist.init_process_group("nccl")
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        results = []
        equivalence = [] if args.skip_equivalence else check_patterns(rank, world, device)
        run_pattern_benchmarks(rank, world, device, results, heads=args.heads, only=args.cases.split(","))
        device_name = torch.cuda.get_device_name(device)
        if rank != 0:
            dist.destroy_process_group()
            return
    bad = [r for r in equivalence if not r["passed"]]
    worst = max((r.get(f"{x}_rel", 0.0) for r in equivalence for x in ("out", "dq", "dk", "dv")), default=0.0)
    print(f"equivalence vs oracle: {len(equivalence) - len(bad)}/{len(equivalence)} pass, worst rel {worst:.2e}")
    for r in bad:
        print("  FAILED", {k: r.get(k) for k in ("variant", "layout", "causal", "backend", "pattern_type", "error")})
    print(f"{'case':22}{'n':>9}{'ms':>10}{'TFLOP/s':>9}{'speedup':>9}{'peak GB':>9}")
    for r in results:
        nan = float("nan")
        print(f"{r['case']:22}{r['n']:>9}{r.get('ms', nan):>10.1f}{r.get('tflops_per_gpu', nan):>9.1f}"
              f"{r.get('speedup_vs_dense_ring', float('nan')):>9.2f}{(r.get('peak_gb') or float('nan')):>9.1f}"
              f"  {r.get('error', '')}")
    report = {"device": device_name, "torch": torch.__version__, "date": datetime.date.today().isoformat(),
              "equivalence": equivalence, "results": results}
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        write_json(args.out, report, indent=1)
    if not args.smoke:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
