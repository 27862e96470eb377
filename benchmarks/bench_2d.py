"""Ulysses x ring on 2 GPUs: U=2 (all-to-all, no ring) against R=2 (the ring), the dense layer.

Run on a machine with 2 GPUs::

    torchrun --nproc_per_node=2 benchmarks/bench_2d.py --out benchmarks/results

Both are ring_plugin's ``standard`` layer (zigzag shards, cuDNN/flash blocks), ``ulysses_size=2,
ring_size=1`` against ``ulysses_size=1, ring_size=2``: first the output and input gradients at 16K
tokens against one GPU's cuDNN SDPA on the whole sequence (bf16), then fwd+bwd at 128K tokens, 32 heads
of 128 (CUDA events, warm-up, median): seconds, TFLOP/s per GPU (causal FLOPs halved) and peak memory.
Writes ``bench_2d_<tag>_<date>.json`` into ``--out``; the planner reads it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_ring import _fwd_bwd, _sdpa_cudnn, attention_flops, peak_gb, reset_peak, time_fn  # noqa: E402
from provenance import write_json  # noqa: E402

from ring_plugin import create_ring_attention, shard_sequence  # noqa: E402

SPLITS = {"ulysses2": dict(ulysses_size=2, ring_size=1), "ring2": dict(ulysses_size=1, ring_size=2)}


def exactness(n: int, h: int, d: int, device: torch.device) -> dict[str, Any]:
    """Max |error| of out, dq, dk, dv on this rank's shard vs one GPU's SDPA on the whole sequence."""
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator(device=device).manual_seed(1)
    full = [torch.randn(1, n, h, d, device=device, dtype=torch.bfloat16, generator=g) for _ in range(4)]
    leaves = [t.clone().requires_grad_() for t in full[:3]]
    ref = _sdpa_cudnn(*(t.transpose(1, 2) for t in leaves), True).transpose(1, 2)
    ref.backward(full[3])
    refs = [ref.detach(), *(t.grad for t in leaves)]
    rows: dict[str, Any] = {}
    for name, split in SPLITS.items():
        attn = create_ring_attention("standard", layout="zigzag", **split)
        local = [shard_sequence(t, 1, "zigzag", rank, world).clone().requires_grad_() for t in full[:3]]
        out = attn(*local, is_causal=True)
        out.backward(shard_sequence(full[3], 1, "zigzag", rank, world))
        errs = []
        for mine, theirs in zip([out.detach(), *(t.grad for t in local)], refs):
            e = (mine.float() - shard_sequence(theirs, 1, "zigzag", rank, world).float()).abs().max().reshape(1)
            dist.all_reduce(e, op=dist.ReduceOp.MAX)
            errs.append(float(e))
        rows[name] = dict(zip(("out", "dq", "dk", "dv"), errs))
    scale = max(float(t.float().abs().max()) for t in refs)
    return {"seq_len": n, "heads": h, "head_dim": d, "dtype": "bfloat16", "max_abs_error": rows,
            "reference_max_abs": scale,
            "ok": all(e <= 0.02 * scale for r in rows.values() for e in r.values())}


def timing(n: int, h: int, d: int, causal: bool, device: torch.device, warmup: int, repeat: int) -> dict:
    world = dist.get_world_size()
    row: dict[str, Any] = {"n": n, "heads": h, "head_dim": d, "causal": causal}
    for name, split in SPLITS.items():
        reset_peak(device)
        q, k, v = (torch.randn(1, n // world, h, d, device=device, dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        grad = torch.randn(1, n // world, h, d, device=device, dtype=torch.bfloat16)
        attn = create_ring_attention("standard", layout="zigzag", check_inputs_across_ranks=False, **split)
        sec = time_fn(_fwd_bwd(lambda a, b, c, attn=attn: attn(a, b, c, is_causal=causal), [q, k, v], grad), warmup,
                      repeat, device)
        row[name] = dict(seconds=sec, tflops_per_gpu=attention_flops(n, h, d, causal) / world / sec / 1e12,
                         peak_gb=peak_gb(device), **split)
        del q, k, v, grad
        torch.cuda.empty_cache()
    row["ring2_over_ulysses2_seconds"] = row["ring2"]["seconds"] / row["ulysses2"]["seconds"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--seq-len", type=int, default=131072)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl")
    if dist.get_world_size() != 2:
        raise SystemExit("bench_2d.py compares U=2 with R=2: run it on exactly 2 GPUs")
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device), "torch": torch.__version__, "cuda": torch.version.cuda,
        "gpus": 2, "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H%M%SZ"),
        "exactness": exactness(16384, 32, 128, device),
        "runs": [timing(args.seq_len, 32, 128, causal, device, args.warmup, args.repeat) for causal in (True, False)],
    }
    if dist.get_rank() == 0:
        ex = result["exactness"]
        print(f"16K vs one GPU (max |ref| {ex['reference_max_abs']:.2f}): {json.dumps(ex['max_abs_error'])} "
              f"ok={ex['ok']}")
        for r in result["runs"]:
            print(f"n={r['n']} causal={r['causal']}: " + ", ".join(
                f"{k} {r[k]['seconds'] * 1e3:.1f} ms {r[k]['tflops_per_gpu']:.0f} TFLOP/s {r[k]['peak_gb']:.1f} GB"
                for k in SPLITS) + f"; ring2/ulysses2 time {r['ring2_over_ulysses2_seconds']:.3f}")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / f"bench_2d_2gpu_{result['date']}.json", result)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
