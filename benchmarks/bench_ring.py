"""Ring attention on GPUs: NCCL equivalence against the oracle, then throughput and memory side by side.

Run on a machine with 2 GPUs::

    torchrun --nproc_per_node=2 benchmarks/bench_ring.py --out benchmarks/results

It (1) checks every dense variant and kernel backend against the fp64 oracle over NCCL (output and
dQ/dK/dV), (2) times fwd+bwd at each length, causal and not, for: one GPU running cuDNN SDPA on the
whole sequence, ``ring_plugin`` on all GPUs, torch's ``context_parallel`` (cuDNN backend) and
DeepSpeed Ulysses (``DistributedAttention`` around cuDNN SDPA), all in this one run, and (3) records
the peak memory per GPU. Timings use CUDA events after warm-up; the median of the repeats is kept
and the slowest rank counts. TFLOP/s are per GPU, on the FLOPs the pattern needs
(4·n·n·d per head, x0.5 causal, x3.5 fwd+bwd). ``--smoke`` runs a tiny CPU/gloo version.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from provenance import write_json  # noqa: E402

from ring_plugin import create_ring_attention, reference_attention, shard_sequence  # noqa: E402


def fwd_bwd_attention_flops(pairs: float, head_dim: int, causal: bool) -> float:
    """FLOPs of fwd+bwd attention over ``pairs`` (query, key, head) triples: 4·d each, x0.5 causal, x3.5."""
    return 4.0 * pairs * head_dim * (0.5 if causal else 1.0) * 3.5


def attention_flops(n: int, heads: int, head_dim: int, causal: bool, batch: int = 1) -> float:
    """FLOPs of fwd+bwd dense attention over n tokens."""
    return fwd_bwd_attention_flops(float(n) * n * heads * batch, head_dim, causal)


def time_fn(fn: Callable[[], None], warmup: int, repeat: int, device: torch.device) -> float:
    """Median seconds of ``fn`` (CUDA events on GPU, wall clock on CPU); the slowest rank counts."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    med = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(med, op=dist.ReduceOp.MAX)
    return float(med.item())


def peak_gb(device: torch.device) -> float:
    if device.type != "cuda":
        return float("nan")
    peak = torch.tensor([torch.cuda.max_memory_allocated(device) / 1e9], dtype=torch.float64, device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return float(peak.item())


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ------------------------------------------------------------------------------------- equivalence
def oracle_errors(rank: int, world: int, device: torch.device, attn: torch.nn.Module, shape: tuple[int, ...],
                  layout: str, causal: bool, dtype: torch.dtype, allowed: torch.Tensor | None = None,
                  document_ids: torch.Tensor | None = None) -> dict:
    """Max abs and relative errors of ``attn``'s output and dQ/dK/dV vs the fp64 oracle, over all ranks.

    ``shape`` is (batch, n, heads, kv_heads, head_dim); ``allowed`` the oracle's pattern (None: dense);
    ``document_ids`` (batch, n): packed documents (each rank passes its shard; the oracle masks).
    """
    b, n, h, hkv, d = shape
    gen = torch.Generator(device="cpu").manual_seed(1234)
    full = [torch.randn(b, n, hh, d, generator=gen) for hh in (h, hkv, hkv, h)]
    q, k, v, g = (t.to(device) for t in full)
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out = reference_attention(*ref, causal=causal, allowed=allowed)
    (ref_out * g.double()).sum().backward()
    local = [shard_sequence(t.to(dtype), 1, layout, rank, world).requires_grad_() for t in (q, k, v)]
    docs = {} if document_ids is None else {"document_ids": shard_sequence(document_ids.to(device), 1, layout,
                                                                          rank, world)}
    out = attn(*local, is_causal=causal, **docs)
    (out * shard_sequence(g.to(dtype), 1, layout, rank, world)).sum().backward()
    errs = {}
    for label, mine, theirs in (("out", out.detach(), ref_out.detach()),
                                *zip(("dq", "dk", "dv"), (t.grad for t in local), (t.grad for t in ref))):
        theirs = shard_sequence(theirs, 1, layout, rank, world)
        diff = (mine.double() - theirs).abs().max()
        scale = theirs.abs().max().clamp_min(1e-12)
        stat = torch.stack([diff, diff / scale])
        dist.all_reduce(stat, op=dist.ReduceOp.MAX)
        errs[f"{label}_abs"] = float(stat[0])
        errs[f"{label}_rel"] = float(stat[1])
    return errs


def check_equivalence(rank: int, world: int, device: torch.device, smoke: bool) -> list[dict]:
    """Every dense variant and backend vs the fp64 oracle, output and gradients, over this world."""
    rows = []
    cases = []
    for dtype in (torch.bfloat16, torch.float32):
        backends = ["math"] if smoke else (["cudnn", "flash", "math"] if dtype == torch.bfloat16
                                           else ["efficient", "math"])
        for backend in backends:
            for layout in ("contiguous", "zigzag"):
                for causal in (False, True):
                    cases.append(("standard", backend, layout, causal, dtype))
        for name in ("sdpa", "distributed", "correct"):
            cases.append((name, "auto", "zigzag", True, dtype))
    shape = (2, 64, 5, 5, 16) if smoke else (2, 2048, 6, 2, 128)
    for name, backend, layout, causal, dtype in cases:
        attn = create_ring_attention(name, backend=backend, layout=layout)
        errs = oracle_errors(rank, world, device, attn, shape, layout, causal, dtype)
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
        worst = max(errs[f"{x}_rel"] for x in ("out", "dq", "dk", "dv"))
        rows.append(dict(variant=name, backend=backend, layout=layout, causal=causal, dtype=str(dtype),
                         world=world, shape=list(shape), **errs, passed=bool(worst < tol)))
    return rows


# ------------------------------------------------------------------------------------------ timing
def _fwd_bwd(fn: Callable[..., torch.Tensor], tensors: list[torch.Tensor], grad: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        for t in tensors:
            t.grad = None
        out = fn(*tensors)
        out.backward(grad)

    return run


def _sdpa_cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def bench_single_gpu(n, h, d, causal, dtype, device, warmup, repeat) -> dict:
    """cuDNN SDPA on one GPU over the whole sequence (rank 0 works, the others wait)."""
    res: dict = {}
    if dist.get_rank() == 0:
        reset_peak(device)
        q, k, v = (torch.randn(1, h, n, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        grad = torch.randn(1, h, n, d, device=device, dtype=dtype)
        run = _fwd_bwd(lambda a, b, c: _sdpa_cudnn(a, b, c, causal), [q, k, v], grad)
        for _ in range(warmup):
            run()
        times = []
        for _ in range(repeat):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            run()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        sec = statistics.median(times)
        res = dict(seconds=sec, tflops_per_gpu=attention_flops(n, h, d, causal) / sec / 1e12,
                   peak_gb=torch.cuda.max_memory_allocated(device) / 1e9)
        del q, k, v, grad
    box = [res]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def bench_ring(n, h, d, causal, dtype, device, warmup, repeat, layout, backend, grad_comm_dtype="float32") -> dict:
    world, rank = dist.get_world_size(), dist.get_rank()
    reset_peak(device)
    n_local = n // world
    q, k, v = (torch.randn(1, n_local, h, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(1, n_local, h, d, device=device, dtype=dtype)
    attn = create_ring_attention("standard", backend=backend, layout=layout, check_inputs_across_ranks=False,
                                 grad_comm_dtype=grad_comm_dtype)
    sec = time_fn(_fwd_bwd(lambda a, b, c: attn(a, b, c, is_causal=causal), [q, k, v], grad), warmup, repeat, device)
    out = dict(seconds=sec, tflops_per_gpu=attention_flops(n, h, d, causal) / world / sec / 1e12,
               peak_gb=peak_gb(device), layout=layout, backend=backend, grad_comm_dtype=grad_comm_dtype)
    del q, k, v, grad, rank
    return out


def bench_context_parallel(n, h, d, causal, dtype, device, warmup, repeat) -> dict:
    """torch's own context_parallel with the cuDNN backend (load balancing on for causal)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import _cp_options

    world = dist.get_world_size()
    mesh = init_device_mesh("cuda", (world,))
    _cp_options.enable_load_balance = causal
    reset_peak(device)
    q, k, v = (torch.randn(1, h, n, d, device=device, dtype=dtype) for _ in range(3))
    grad = torch.randn(1, h, n, d, device=device, dtype=dtype)
    with context_parallel(mesh, buffers=[q, k, v, grad], buffer_seq_dims=[2, 2, 2, 2]):
        # The buffers are resharded in place (and restored on exit), so they must not require grad:
        # the timed leaves are views of the local shards.
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        sec = time_fn(_fwd_bwd(lambda a, b, c: _sdpa_cudnn(a, b, c, causal), leaves, grad), warmup, repeat,
                      device)
    return dict(seconds=sec, tflops_per_gpu=attention_flops(n, h, d, causal) / world / sec / 1e12,
                peak_gb=peak_gb(device), load_balance=causal)


def bench_ulysses(n, h, d, causal, dtype, device, warmup, repeat) -> dict:
    """DeepSpeed Ulysses: all-to-all heads<->sequence around cuDNN SDPA."""
    import deepspeed
    from deepspeed.sequence.layer import DistributedAttention

    deepspeed.init_distributed(dist_backend="nccl")

    def local_attn(q, k, v, *args, **kwargs):  # (b, s, h/p, d) -> same
        out = _sdpa_cudnn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal)
        return out.transpose(1, 2)

    world = dist.get_world_size()
    layer = DistributedAttention(local_attn, dist.group.WORLD, scatter_idx=2, gather_idx=1)
    reset_peak(device)
    q, k, v = (torch.randn(1, n // world, h, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(1, n // world, h, d, device=device, dtype=dtype)
    sec = time_fn(_fwd_bwd(lambda a, b, c: layer(a, b, c, 0), [q, k, v], grad), warmup, repeat, device)
    return dict(seconds=sec, tflops_per_gpu=attention_flops(n, h, d, causal) / world / sec / 1e12,
                peak_gb=peak_gb(device))


def _guard(fn: Callable[..., dict], *args, **kwargs) -> dict:
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - one failing peer must not lose the other figures
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
        return {"error": f"{type(err).__name__}: {err}"[:500]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--lengths", type=int, nargs="+", default=[65536, 131072])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--skip-peers", action="store_true", help="skip context_parallel and Ulysses")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU/gloo run that only checks the script")
    args = parser.parse_args()

    smoke = args.smoke or not torch.cuda.is_available()
    dist.init_process_group("gloo" if smoke else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu") if smoke else torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    result: dict = dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        gpus=world, torch=torch.__version__, date=dt.date.today().isoformat(),
        cudnn=torch.backends.cudnn.version() if device.type == "cuda" else None,
        heads=args.heads, head_dim=args.head_dim, dtype="bfloat16", batch=1,
    )
    if not args.skip_check:
        result["equivalence"] = check_equivalence(rank, world, device, smoke)
    runs = []
    if not smoke:
        dtype = torch.bfloat16
        h, d = args.heads, args.head_dim
        for n in args.lengths:
            for causal in (True, False):
                common = (n, h, d, causal, dtype, device, args.warmup, args.repeat)
                row: dict = dict(n=n, causal=causal)
                row["single_gpu_cudnn"] = _guard(bench_single_gpu, *common)
                row["ring"] = _guard(bench_ring, *common, layout="zigzag", backend="cudnn")
                row["ring_bf16_grad_comm"] = _guard(bench_ring, *common, layout="zigzag", backend="cudnn",
                                                    grad_comm_dtype="input")
                if not args.skip_peers:
                    row["torch_context_parallel"] = _guard(bench_context_parallel, *common)
                    row["deepspeed_ulysses"] = _guard(bench_ulysses, *common)
                single, ring = row["single_gpu_cudnn"], row["ring"]
                if "tflops_per_gpu" in single and "tflops_per_gpu" in ring:
                    row["ring_vs_single_rate"] = ring["tflops_per_gpu"] / single["tflops_per_gpu"]
                    row["ring_vs_single_peak_memory"] = ring["peak_gb"] / single["peak_gb"]
                runs.append(row)
                if rank == 0:
                    print(json.dumps(row), flush=True)
    result["runs"] = runs
    if rank == 0:
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        tag = "smoke" if smoke else f"{world}gpu"
        path = out_dir / f"bench_ring_{tag}_{result['date']}.json"
        write_json(path, result)
        print_table(result)
        print(f"wrote {path}")
    dist.destroy_process_group()


def print_table(result: dict) -> None:
    eq = result.get("equivalence", [])
    if eq:
        bad = [r for r in eq if not r["passed"]]
        worst = max(max(r[f"{x}_rel"] for x in ("out", "dq", "dk", "dv")) for r in eq)
        print(f"equivalence: {len(eq) - len(bad)}/{len(eq)} cases pass (worst relative error {worst:.2e})")
        for r in bad:
            print("  FAIL", {k: r[k] for k in ("variant", "backend", "layout", "causal", "dtype")})
    header = f"{'n':>8} {'causal':>6} | {'method':<24} {'ms':>9} {'TFLOP/s/GPU':>12} {'peak GB':>8}"
    print(header)
    print("-" * len(header))
    for row in result.get("runs", []):
        for method in ("single_gpu_cudnn", "ring", "ring_bf16_grad_comm", "torch_context_parallel",
                       "deepspeed_ulysses"):
            r = row.get(method)
            if r is None:
                continue
            if "error" in r:
                print(f"{row['n']:>8} {row['causal']!s:>6} | {method:<24} {r['error'][:60]}")
                continue
            print(f"{row['n']:>8} {row['causal']!s:>6} | {method:<24} {r['seconds'] * 1e3:9.1f} "
                  f"{r['tflops_per_gpu']:12.1f} {r['peak_gb']:8.2f}")
        if "ring_vs_single_rate" in row:
            print(f"{'':>17} ring / single-GPU rate {row['ring_vs_single_rate']:.3f}, "
                  f"peak memory {row['ring_vs_single_peak_memory']:.3f}")


if __name__ == "__main__":
    main()
