"""A transformers Llama on the ring with packed documents: time of one forward + backward step.

The batch is cut with ``ring_plugin.hf.shard_batch`` (global positions, shifted labels and, for packed
documents, what the attention layers need) and the model called as ``model(**batch)``; the same command
runs on any tree of the project, so two commits compare side by side on one machine. One GPU or several::

    torchrun --nproc_per_node=1 benchmarks/bench_hf_packed.py --out benchmarks/results/hf_packed.json
    torchrun --nproc_per_node=2 benchmarks/bench_hf_packed.py --layout balanced

Defaults: Llama-3.2-1B-shaped layers (2048 wide, 32 query / 8 KV heads of 64), ``--layers`` of them,
128K tokens of seeded log-normal documents (mean 8K), bf16. ``--smoke``: a tiny CPU/gloo run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # PYTHONPATH picks the tree measured
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from provenance import write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=131072)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--mean-doc", type=float, default=8192)
    ap.add_argument("--layout", default="balanced", choices=["balanced", "zigzag", "contiguous"])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    import ring_plugin.hf as hf
    from ring_plugin import ring_context
    try:
        from ring_plugin.documents import packed_document_lengths
    except ImportError:  # a tree from before the documents package
        from ring_plugin.balance import packed_document_lengths

    cuda = torch.cuda.is_available() and not args.smoke
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=300))
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if args.smoke:
        args.length, args.layers, args.mean_doc, args.warmup, args.repeat = 512, 2, 64, 1, 2
        shape = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    else:
        shape = dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8)
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, num_hidden_layers=args.layers, max_position_embeddings=args.length,
                         use_cache=False, attn_implementation="ring", **shape)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    lengths = packed_document_lengths(args.length, 0, mean=args.mean_doc)
    tokens = torch.randint(0, 32000, (1, args.length), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": tokens, "labels": tokens.clone(),
             "position_ids": torch.cat([torch.arange(n) for n in lengths])[None]}
    times = []
    with ring_context(dist.group.WORLD if dist.is_initialized() else None, args.layout):
        for i in range(args.warmup + args.repeat):
            model.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            if dist.is_initialized():
                dist.barrier()
            start = datetime.datetime.now()
            shard = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in hf.shard_batch(batch).items()}
            model(**shard, use_cache=False).loss.backward()
            if cuda:
                torch.cuda.synchronize()
            if i >= args.warmup:
                times.append((datetime.datetime.now() - start).total_seconds())
    slowest = torch.tensor(statistics.median(times))
    if dist.is_initialized():
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    if rank == 0:
        record = {
            "benchmark": "bench_hf_packed", "seconds_per_step": float(slowest), "world": world,
            "layout": args.layout, "length": args.length, "layers": args.layers, "documents": len(lengths),
            "dtype": str(dtype), "device": torch.cuda.get_device_name(device) if cuda else "cpu",
            "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        print(json.dumps(record, indent=1))
        if args.out is not None:
            write_json(args.out, record, indent=1)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
