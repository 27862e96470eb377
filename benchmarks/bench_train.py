"""End-to-end training speed: ring_plugin against DeepSpeed Ulysses and torch ``context_parallel``.

Run on a machine with 2 GPUs::

    torchrun --nproc_per_node=2 benchmarks/bench_train.py --out benchmarks/results

Every variant trains the same model (the ``gpt_3b`` recipe model: 16 layers, 4096 wide, 32 query / 8
KV heads of 128, 3.0B parameters; and the 124M GPT) on one 128K-token sample per step split over the
GPUs, under ``RingDeepSpeedStrategy`` ZeRO-3 with bf16 and activation checkpointing. Only the
attention layer differs:

- ``ring``: ring_plugin's ``sdpa`` ring (zigzag layout), attention kept out of recomputation
  (``recompute_attention=False``); ``ring_recompute``: the same, recomputing whole blocks (the
  recipes' setting before this benchmark); ``ring_ulysses``: ring_plugin with ``ulysses_size=2`` (its
  own all-to-all, no ring: U=2 against the ring's R=2);
- ``ulysses``: DeepSpeed's ``DistributedAttention`` (all-to-all heads <-> sequence) around cuDNN SDPA on
  the whole sequence (contiguous layout; GQA's K/V heads repeated after the all-to-all);
- ``torch_cp``: torch's ``context_parallel`` ring SDPA (cuDNN, head-tail load balancing = zigzag; K/V
  heads repeated before the call, as its SDPA takes equal head counts).

Before timing, each attention layer's output at 8K tokens is compared with one GPU's cuDNN SDPA on the
whole sequence (bf16). Reported per variant: tokens/s (median step after warm-up), causal MFU =
flops_per_token x tokens/s / (GPUs x peak) with flops_per_token = 3 x (2 x matmul weights +
layers x heads x 4 x head_dim x seq_len / 2) (forward + backward; recomputation not counted; the
causal mask halving attention) and peak = ``--peak-tflops`` (989, the dense bf16 peak of an H200),
and peak memory per GPU. Writes ``bench_train_<tag>_<date>.json`` into ``--out``; ``--smoke`` runs a
tiny CPU/gloo version of the ring variants.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, NamedTuple

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from gpu_lightning import RandomTokens, StepStats, add_run_arguments, free_memory, make_trainer, release, step_figures  # noqa: E402
from provenance import write_json  # noqa: E402

from ring_plugin import create_ring_attention, shard_sequence  # noqa: E402
from ring_plugin.comm.context import ring_context  # noqa: E402
from ring_plugin.lightning import RingDeepSpeedStrategy  # noqa: E402
from ring_plugin.models import GPTConfig, RingCausalLM  # noqa: E402

MODEL_KEYS = {f for f in GPTConfig.__dataclass_fields__}
MODELS = {
    "3b": lambda: {k: v for k, v in OmegaConf.to_container(
        OmegaConf.load(REPO / "ring_plugin" / "conf" / "model" / "gpt_3b.yaml")).items() if k in MODEL_KEYS},
    "124m": lambda: dict(vocab_size=50304, n_layer=12, n_head=12, n_embd=768, activation_checkpointing=True),
    "smoke": lambda: dict(vocab_size=61, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, activation_checkpointing=True),
}
class Variant(NamedTuple):
    attention: str  # ring_plugin's "ring", or a peer swapped in
    layout: str  # the strategy's shard layout
    recompute_attention: bool
    ulysses_size: int = 1  # ring_plugin's
    model: dict[str, Any] = {}  # GPTConfig overrides


VARIANTS = {
    "ring": Variant("ring", "zigzag", False),
    "ring_recompute": Variant("ring", "zigzag", True),
    "ring_ulysses": Variant("ring", "zigzag", False, 2),
    # The long-context settings (the dense_1m recipe's): every block recomputed, inputs in host memory,
    # the MLP in 64K-token tiles (--seq-len for the length).
    "ring_offload": Variant("ring", "zigzag", True, model=dict(checkpoint_layers=None, offload_checkpoints=True,
                                                                mlp_tile_tokens=65536)),
    "ulysses": Variant("ulysses", "contiguous", False),
    "torch_cp": Variant("torch_cp", "zigzag", False),
}


def _repeat_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(b, n, kv_heads, d) -> (b, n, heads, d): each K/V head serves heads // kv_heads query heads."""
    return t.repeat_interleave(heads // t.shape[2], dim=2)


def _cudnn_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal cuDNN SDPA on (b, n, h, d) tensors (the sequence-major layout of the ring layers)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.CUDNN_ATTENTION] if q.is_cuda else [SDPBackend.MATH]
    with sdpa_kernel(backends):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return out.transpose(1, 2)


class UlyssesAttention(nn.Module):
    """DeepSpeed Ulysses with the ring layers' call shape: (b, n_local, h, d) shards, contiguous layout."""

    pattern = None  # dense: what the model's FLOP count asks its attention layers

    def __init__(self, group: dist.ProcessGroup):
        super().__init__()
        import deepspeed
        from deepspeed.sequence.layer import DistributedAttention

        deepspeed.init_distributed(dist_backend=dist.get_backend())  # its all-to-all asks DeepSpeed's comm

        def local(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            return _cudnn_sdpa(q, _repeat_kv(k, q.shape[2]), _repeat_kv(v, q.shape[2]))

        self.layer = DistributedAttention(local, group, scatter_idx=2, gather_idx=1)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool = True) -> torch.Tensor:
        return self.layer(q, k, v, 0)


class TorchContextParallelAttention(nn.Module):
    """torch's ring SDPA, which ``torch_context_parallel`` patches into ``F.scaled_dot_product_attention``."""

    pattern = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool = True) -> torch.Tensor:
        return _cudnn_sdpa(q, _repeat_kv(k, q.shape[2]), _repeat_kv(v, q.shape[2]))


def torch_context_parallel(device: torch.device) -> AbstractContextManager:
    """torch's ``context_parallel`` over all GPUs, SDPA patched for the whole block. Its public entry
    shards given buffers; ours are sharded by the strategy, so it gets one dummy buffer (2 x world
    long: its head-tail load balancing is then on, the zigzag layout the strategy shards with)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel

    world = dist.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    return context_parallel(mesh, buffers=[torch.zeros(1, 1, 2 * world, device=device)], buffer_seq_dims=[2])


def make_attention(kind: str) -> nn.Module:
    if kind == "ulysses":
        return UlyssesAttention(dist.group.WORLD)
    return TorchContextParallelAttention()


def check_attention(device: torch.device, seq_len: int, heads: int, kv_heads: int, head_dim: int) -> dict[str, Any]:
    """Each variant's attention output on its shard vs one GPU's cuDNN SDPA on the whole sequence."""
    world, rank = dist.get_world_size(), dist.get_rank()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(3)
    q = torch.randn(1, seq_len, heads, head_dim, device=device, dtype=dtype, generator=g)
    k, v = (torch.randn(1, seq_len, kv_heads, head_dim, device=device, dtype=dtype, generator=g) for _ in range(2))
    reference = _cudnn_sdpa(q, _repeat_kv(k, heads), _repeat_kv(v, heads))
    errors: dict[str, Any] = {}
    for kind, layout in (("ring", "zigzag"), ("ulysses", "contiguous"), ("torch_cp", "zigzag")):
        shards = [shard_sequence(t, 1, layout, rank, world) for t in (q, k, v)]
        context = torch_context_parallel(device) if kind == "torch_cp" else nullcontext()
        try:
            with torch.no_grad(), context, ring_context(dist.group.WORLD, layout):
                layer = create_ring_attention("sdpa") if kind == "ring" else make_attention(kind)
                out = layer(*shards, is_causal=True)
            err = (out.float() - shard_sequence(reference, 1, layout, rank, world).float()).abs().max().reshape(1)
            dist.all_reduce(err, op=dist.ReduceOp.MAX)
            errors[kind] = float(err)
        except Exception as exc:  # noqa: BLE001 - a peer that cannot run must not lose the other figures
            errors[kind] = f"{type(exc).__name__}: {exc}"
    scale = float(reference.float().abs().max())
    return {"seq_len": seq_len, "dtype": str(dtype), "reference_max_abs": scale, "max_abs_error": errors,
            "ok": all(isinstance(e, float) and e <= 0.02 * scale for e in errors.values())}


def train(variant: str, model_name: str, args, world: int, rank: int, device: torch.device,
          checkpoint_layers: int | None = None) -> dict[str, Any]:
    kind, layout, recompute, ulysses, model_overrides = VARIANTS[variant]
    overrides: dict[str, Any] = {"max_seq_len": args.seq_len, "attention": "sdpa", "recompute_attention": recompute,
                                 **model_overrides}
    if checkpoint_layers is not None:
        overrides["checkpoint_layers"] = None if checkpoint_layers < 0 else checkpoint_layers
    config = GPTConfig(**{**MODELS[model_name](), **overrides})
    torch.manual_seed(0)
    module = RingCausalLM(config, lr=3e-4, warmup_steps=2, max_steps=args.steps)
    if kind != "ring":
        for block in module.model.blocks:
            block.attn.attn = make_attention(kind)
    stats = StepStats()
    callbacks: list[Any] = [stats]
    if args.snapshot_step is not None:
        from memory_peak import PeakSnapshot

        callbacks.append(PeakSnapshot(args.snapshot_step))
    at_start = 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        at_start = torch.cuda.memory_allocated() / 2**30  # what earlier rows left: part of this row's peak
    data = RandomTokens(args.steps, args.seq_len, config.vocab_size, seed=2)
    context = torch_context_parallel(device) if kind == "torch_cp" else nullcontext()
    with context:
        strategy = RingDeepSpeedStrategy(stage=3, layout=layout, ulysses_size=ulysses, ring_size=world // ulysses,
                                         logging_level=40)
        trainer = make_trainer(strategy, device.type, world, args.steps, args.precision, callbacks)
        trainer.fit(module, DataLoader(data, batch_size=1))
    row = {
        "variant": variant, "attention": kind, "layout": layout, "recompute_attention": recompute,
        "ulysses_size": ulysses, "ring_size": world // ulysses,
        "model": model_name, "params": module.model.num_parameters(), "seq_len": args.seq_len, "gpus": world,
        "zero_stage": 3, "precision": args.precision, "activation_checkpointing": True,
        "checkpoint_layers": config.checkpointed_layers, "n_layer": config.n_layer,
        "offload_checkpoints": config.offload_checkpoints, "mlp_tile_tokens": config.mlp_tile_tokens,
        "allocated_at_start_gib": at_start,
        **step_figures(stats, args.seq_len, module.flops_per_token(args.seq_len), args, world, rank),
    }
    if args.snapshot_step is not None:
        row["memory_at_peak"] = callbacks[-1].result
    del module, stats
    release(trainer)
    dist.barrier()
    return row


def _variant(spec: str) -> str:
    """``NAME`` or ``NAME@K`` (checkpoint_layers K for this variant only), checked."""
    name, at, layers = spec.partition("@")
    if name not in VARIANTS or (at and not layers.lstrip("-").isdigit()):
        raise argparse.ArgumentTypeError(f"{spec!r}: expected one of {', '.join(VARIANTS)}, optionally @K")
    return spec


def guarded(fn: Callable[..., dict], *args: Any, **kwargs: Any) -> dict[str, Any]:
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - an OOM in one variant must not lose the others' figures
        free_memory()
        return {"variant": args[0], "model": args[1], "checkpoint_layers_asked": kwargs.get("checkpoint_layers"),
                "error": f"{type(exc).__name__}: {exc}"[:500]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_run_arguments(parser, steps=6, warmup=2, smoke_help="tiny CPU/gloo run of the ring variants")
    parser.add_argument("--models", nargs="+", default=["3b", "124m"], choices=sorted(MODELS))
    parser.add_argument("--variants", nargs="+", type=_variant,
                        default=[v for v in VARIANTS if v not in ("ring_ulysses", "ring_offload")],
                        help=f"{', '.join(VARIANTS)}; NAME@K runs that variant with checkpoint_layers=K only")
    parser.add_argument("--checkpoint-layers", nargs="+", type=int, default=[None],
                        help="run every variant with each of these GPTConfig.checkpoint_layers (-1: all blocks); "
                             "default: the model config's own")
    parser.add_argument("--comm-timeout", type=float, default=300,
                        help="seconds a collective may wait (a rank that died fails the run this fast)")
    parser.add_argument("--snapshot-step", type=int, default=None,
                        help="record this training batch's allocations (CUDA) and report what is alive at its peak")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    args.smoke = args.smoke or not torch.cuda.is_available()
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if args.smoke:
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
        args.seq_len, args.steps, args.warmup, args.precision = 64, 3, 1, "32-true"
        args.models = ["smoke"]
        args.variants = [v for v in args.variants if VARIANTS[v.split("@")[0]].attention == "ring"]
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    # A rank that fails (an out-of-memory variant) must not leave the other waiting for the default 10 minutes.
    dist.init_process_group("gloo" if args.smoke else "nccl", timeout=dt.timedelta(seconds=args.comm_timeout))
    import deepspeed

    result: dict[str, Any] = {
        "device": "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(device),
        "torch": torch.__version__, "cuda": torch.version.cuda, "deepspeed": deepspeed.__version__,
        "lightning": pl.__version__, "world": world,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H%M%SZ"),
        "mfu_formula": "3 * (2 * matmul_weights + layers * heads * 4 * head_dim * seq_len / 2) * tokens_per_s "
                       "/ (gpus * peak_flops); recomputation not counted",
    }
    t0 = time.perf_counter()
    if not args.smoke:
        result["attention_check"] = check_attention(device, 8192, 32, 8, 128)
    result["train"] = []
    tag = "smoke" if args.smoke else f"{world}gpu"
    for model in args.models:
        for spec in args.variants:
            variant, _, own = spec.partition("@")
            if model == "124m" and variant == "ring_recompute":
                continue
            for layers in [int(own)] if own else args.checkpoint_layers:
                result["train"].append(guarded(train, variant, model, args, world, rank, device,
                                                    checkpoint_layers=layers))
                _compare(result)
                result["wall_seconds"] = time.perf_counter() - t0
                if rank == 0:  # after every variant, so a run stopped by a time limit keeps what it measured
                    _write(result, args.out, tag)
    if rank == 0:
        _report(result)
        print(f"wrote {_write(result, args.out, tag)}")
    dist.barrier()
    dist.destroy_process_group()


def _compare(result: dict[str, Any]) -> None:
    """Per model (and checkpointed block count): ring's tokens/s over each other variant's, in this run."""
    ratios: dict[str, dict[str, float]] = {}

    def key(row: dict[str, Any]) -> str:
        return row["model"] if row.get("checkpoint_layers") in (None, row.get("n_layer")) else \
            f"{row['model']} checkpoint_layers={row['checkpoint_layers']}"

    for row in result["train"]:
        ring = next((r for r in result["train"] if "tokens_per_s" in r and key(r) == key(row)
                     and r["variant"] == "ring"), None)
        if ring and "tokens_per_s" in row and row["variant"] != "ring":
            ratios.setdefault(key(row), {})[f"ring_over_{row['variant']}"] = ring["tokens_per_s"] / row["tokens_per_s"]
    result["ring_tokens_per_s_ratios"] = ratios
    # Each variant at its fastest setting in this run (e.g. the most blocks it can leave un-checkpointed).
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for row in result["train"]:
        k = (row["model"], row["variant"])
        if "tokens_per_s" in row and (k not in best or row["tokens_per_s"] > best[k]["tokens_per_s"]):
            best[k] = row
    result["fastest_ring_over"] = {
        f"{model} {variant}@{row['checkpoint_layers']}": best[model, "ring"]["tokens_per_s"] / row["tokens_per_s"]
        for (model, variant), row in best.items() if variant != "ring" and (model, "ring") in best}


def _report(result: dict[str, Any]) -> None:
    if "attention_check" in result:
        check = result["attention_check"]
        print(f"attention at {check['seq_len']} vs one GPU (max |ref| {check['reference_max_abs']:.2f}): "
              + ", ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in check["max_abs_error"].items()) + f" ok={check['ok']}")
    print(f"{'model':>6} {'variant':>15} {'AC blocks':>9} {'tokens/s':>9} {'MFU':>6} {'TFLOP/s':>8} "
          f"{'peak GiB/GPU':>13}")
    for t in result["train"]:
        if "error" in t:
            print(f"{t['model']:>6} {t['variant']:>15} {str(t.get('checkpoint_layers_asked')):>9} {t['error']}")
            continue
        peak = max(m["peak_allocated_gib"] or 0 for m in t["memory"])
        print(f"{t['model']:>6} {t['variant']:>15} {t['checkpoint_layers']:>9} {t['tokens_per_s']:>9.0f} "
              f"{100 * t['mfu']:>5.1f}% {t['tflops_per_gpu']:>8.1f} {peak:>13.1f}")
    print("ring tokens/s over:", json.dumps(result["ring_tokens_per_s_ratios"]))


def _write(result: dict[str, Any], out: str, tag: str) -> Path:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bench_train_{tag}_{result['date']}.json"
    write_json(path, result)
    return path


if __name__ == "__main__":
    main()
