"""Kernel and link rates the planner (``ring-plan``) is calibrated on, on 2 GPUs of one node.

Run::

    torchrun --nproc_per_node=2 benchmarks/bench_calibration.py --out benchmarks/results

Rank 0 alone times bf16 ``F.linear`` at the GPT models' shapes, the fp32 matmul of the chunked loss'
weight gradient, cuDNN SDPA fwd+bwd (causal) at head_dim 64 and 128, and a device copy; then both
ranks time NCCL point-to-point exchanges (as the ring posts them), all-gather, reduce-scatter,
all-reduce and all-to-all. CUDA events, the mean of 10 calls after 3 warm-ups (attention: 3 after 1).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from provenance import write_json  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel

LINEAR_SHAPES = [(65536, 768, 2304), (65536, 768, 3072), (65536, 3072, 768), (65536, 4096, 6144),
                 (65536, 4096, 16384), (65536, 16384, 4096), (4096, 768, 50304), (4096, 4096, 50304)]
ATTENTION = [(12, 64, 65536), (12, 64, 131072), (32, 128, 65536), (32, 128, 131072)]  # heads, head_dim, n


def timed(fn: Callable[[], object], repeat: int = 10, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / repeat


def kernels(results: dict) -> None:
    bf16 = torch.bfloat16
    for m, k, n in LINEAR_SHAPES:
        a, w = torch.randn(m, k, device="cuda", dtype=bf16), torch.randn(n, k, device="cuda", dtype=bf16)
        results[f"bf16_linear_{m}x{k}x{n}_tflops"] = 2 * m * k * n / timed(lambda a=a, w=w: F.linear(a, w)) / 1e12
    for k in (768, 4096):  # the loss' p^T @ h in fp32 (vocab x chunk x n_embd)
        a, b = torch.randn(50304, 4096, device="cuda"), torch.randn(4096, k, device="cuda")
        results[f"fp32_mm_50304x4096x{k}_tflops"] = 2 * 50304 * 4096 * k / timed(lambda a=a, b=b: a @ b, 3, 1) / 1e12
    for h, d, n in ATTENTION:
        q, k, v = (torch.randn(1, h, n, d, device="cuda", dtype=bf16, requires_grad=True) for _ in range(3))
        g = torch.randn_like(q)

        def step(q=q, k=k, v=v, g=g) -> None:
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(g)

        results[f"cudnn_causal_fwdbwd_h{h}_d{d}_n{n}_tflops"] = 7 * n * n * d * h / timed(step, 3, 1) / 1e12
        del q, k, v, g, step  # free this size before the next
    x = torch.empty(2**28, device="cuda", dtype=bf16)
    y = torch.empty_like(x)
    results["copy_GBps"] = 4 * x.numel() / timed(lambda: y.copy_(x)) / 1e9  # bytes read + written


def links(results: dict, rank: int) -> None:
    peer = 1 - rank
    for mib in (64, 256, 1024):
        n = mib * 2**19  # bf16 elements
        send = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        recv, gathered = torch.empty_like(send), torch.empty(2 * n, device="cuda", dtype=torch.bfloat16)

        def p2p(send=send, recv=recv) -> None:
            ops = [dist.P2POp(dist.isend, send, peer), dist.P2POp(dist.irecv, recv, peer)]
            for work in dist.batch_isend_irecv(ops):
                work.wait()

        results[f"p2p_{mib}MB_GBps"] = 2 * n / timed(p2p) / 1e9  # bytes sent per direction per second
        gather = timed(lambda s=send, g=gathered: dist.all_gather_into_tensor(g, s))
        results[f"allgather_{mib}MB_out{2 * mib}MB_s"] = gather
        results[f"reducescatter_in{2 * mib}MB_s"] = timed(lambda s=send, g=gathered: dist.reduce_scatter_tensor(s, g))
        results[f"allreduce_{mib}MB_s"] = timed(lambda s=send: dist.all_reduce(s))
        results[f"alltoall_{mib}MB_s"] = timed(lambda s=send, r=recv: dist.all_to_all_single(r, s))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    dist.init_process_group("nccl")
    rank = dist.get_rank()
    torch.cuda.set_device(rank)
    results: dict = {}
    if rank == 0:
        kernels(results)
    dist.barrier()
    links(results, rank)
    if rank == 0:
        date = dt.date.today().isoformat()
        out = {"device": torch.cuda.get_device_name(), "gpus": dist.get_world_size(), "torch": torch.__version__,
               "date": date, "memory_total_bytes": torch.cuda.get_device_properties(0).total_memory,
               "results": results}
        path = Path(args.out) / f"bench_calibration_{dist.get_world_size()}xH200_{date}.json"
        write_json(path, out)
        print(json.dumps(out, indent=2), f"\nwrote {path}", sep="", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__" and "RANK" in os.environ:
    main()
