"""Lightning + DeepSpeed on GPUs: exact equivalence over NCCL, then a 128K-context training run.

Run on a machine with 2 GPUs::

    torchrun --nproc_per_node=2 benchmarks/gpu_lightning.py --out benchmarks/results

(a) One training step of a small GPT (fp32) under ``RingDeepSpeedStrategy`` ZeRO 2 and 3 (Lightning's
unmodified CUDA path) and ``RingStrategy``, ring over all GPUs, against one process on the full
sequence: max loss error and max per-tensor relative gradient error. (b) A short ZeRO-3 bf16 run of a
~124M-parameter RingGPT at 128K tokens per sample with activation checkpointing: tokens/s, MFU and
peak memory per GPU. MFU = flops_per_token x tokens/s / (GPUs x peak), with the model's FLOPs
(matmuls + attention, causal halved, x3 for fwd+bwd, no recompute) and the dense bf16 peak given by
``--peak-tflops`` (default 989, H100/H200 SXM). Writes ``gpu_lightning_<tag>_<date>.json`` into
``--out``. ``--smoke`` runs a tiny CPU/gloo version (``torchrun --nproc_per_node=2 ... --smoke``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader, Dataset, DistributedSampler

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from provenance import write_json  # noqa: E402

from ring_plugin.comm.context import ring_context  # noqa: E402
from ring_plugin.lightning import RingDeepSpeedStrategy, RingStrategy  # noqa: E402
from ring_plugin.models import GPTConfig, RingCausalLM  # noqa: E402


class RandomTokens(Dataset):
    """Deterministic random token samples with pre-shifted labels (the last label ignored)."""

    def __init__(self, n: int, seq_len: int, vocab: int, seed: int = 0):
        self.n, self.seq_len, self.vocab, self.seed = n, seq_len, vocab, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 100003 + i)
        ids = torch.randint(0, self.vocab, (self.seq_len + 1,), generator=g)
        labels = ids[1:].clone()
        labels[torch.rand(self.seq_len, generator=g) < 0.1] = -100
        labels[-1] = -100
        return {"input_ids": ids[:-1].clone(), "labels": labels}


class StepStats(Callback):
    """Loss and wall time of every step; the first optimizer step's full gradients when asked."""

    def __init__(self, capture_grads: bool = False):
        self.capture_grads = capture_grads
        self.grads: dict[str, torch.Tensor] | None = None
        self.losses: list[float] = []
        self.seconds: list[float] = []
        self._t0 = 0.0

    def _sync(self, module: pl.LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync(pl_module)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync(pl_module)
        self.seconds.append(time.perf_counter() - self._t0)
        self.losses.append(float(outputs["loss"].detach()))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self.capture_grads or self.grads is not None:
            return
        if isinstance(trainer.strategy, RingDeepSpeedStrategy):
            from deepspeed.utils import safe_get_full_grad

            self.grads = {n: safe_get_full_grad(p).float().cpu() for n, p in pl_module.named_parameters()}
        else:
            self.grads = {n: p.grad.float().cpu() for n, p in pl_module.named_parameters()}


def make_trainer(strategy, accelerator: str, world: int, steps: int, precision: str, callbacks) -> Trainer:
    return Trainer(accelerator=accelerator, devices=world, num_nodes=1, strategy=strategy, max_steps=steps,
                   precision=precision, callbacks=callbacks, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                   limit_val_batches=0)


def release(trainer: Trainer) -> None:
    """Free what a finished fit still holds: a DeepSpeed engine stays alive after ``fit`` (its hooks keep
    it reachable), and with it the optimizer states, which a later run in the same process would
    count in its peak memory (11.6 GiB of the 3B model's). Never raises: a row already measured must not
    be lost to its clean-up (a failure is a warning, and the next row's peak says what was left)."""
    engine = getattr(trainer.strategy, "model", None)
    try:
        _drop_engine_state(engine)
    except Exception as exc:  # noqa: BLE001 - see the docstring
        warnings.warn(f"could not release the finished engine ({type(exc).__name__}: {exc})", RuntimeWarning,
                      stacklevel=2)
    free_memory()


def _drop_engine_state(engine: object) -> None:
    if hasattr(engine, "destroy"):
        engine.destroy()
        # The engine itself stays reachable from hooks torch holds outside Python's view, so drop what
        # it owns: the optimizer's states and flat partitions, and the module (weights, ZeRO-3 shards).
        optimizer = getattr(engine, "optimizer", None)
        for owner in (optimizer, getattr(optimizer, "optimizer", None)):
            for name, value in list(vars(owner).items()) if owner is not None else []:
                if isinstance(value, (list, dict)) and _holds_tensors(value):
                    setattr(owner, name, type(value)())
        for p in engine.module.parameters():
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
            if hasattr(p, "ds_tensor"):
                p.ds_tensor = torch.empty(0, dtype=p.dtype, device=p.device)


def _holds_tensors(value: list | dict) -> bool:
    items = value.values() if isinstance(value, dict) else value
    return any(isinstance(v, torch.Tensor) or (isinstance(v, (list, dict)) and _holds_tensors(v)) for v in items)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_equivalence(args, world: int, rank: int, accelerator: str, device: torch.device) -> list[dict]:
    """One fp32 step per strategy vs one process on the same (full-length) batch."""
    model = (dict(vocab_size=61, n_layer=2, n_head=3, n_kv_head=1, n_embd=24, max_seq_len=256) if args.smoke
             else dict(vocab_size=1024, n_layer=2, n_head=8, n_kv_head=2, n_embd=512, max_seq_len=16384))
    seq_len = 64 if args.smoke else 8192
    data = RandomTokens(8, seq_len, model["vocab_size"], seed=1)
    # Lightning's training sampler shuffles with seed 0; one ring (dp = 1) reads sample order[0] first.
    first = next(iter(DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=0)))
    strategies = {
        "ring_deepspeed_zero2": lambda: RingDeepSpeedStrategy(stage=2, logging_level=40),
        "ring_deepspeed_zero3": lambda: RingDeepSpeedStrategy(stage=3, logging_level=40),
        "ring_ddp": lambda: RingStrategy(),
    }
    rows = []
    for name, make in strategies.items():
        torch.manual_seed(0)
        module = RingCausalLM(GPTConfig(**model), lr=1e-3)
        stats = StepStats(capture_grads=True)
        trainer = make_trainer(make(), accelerator, world, 1, "32-true", [stats])
        trainer.fit(module, DataLoader(data, batch_size=1))
        release(trainer)  # the training run after these checks must not count their engines in its peak
        row = {"strategy": name, "world": world, "seq_len": seq_len, "dtype": "float32"}
        if rank == 0:
            row.update(_errors_vs_reference(model, data[first], stats, device))
            print(json.dumps(row), flush=True)
        rows.append(row)
        del module, stats
        free_memory()
        dist.barrier()
    return rows


def _errors_vs_reference(model: dict, sample: dict, stats: StepStats, device: torch.device) -> dict:
    torch.manual_seed(0)
    ref = RingCausalLM(GPTConfig(**model)).to(device)
    ids, labels = sample["input_ids"][None].to(device), sample["labels"][None].to(device)
    with ring_context(None):
        logits = ref.model(ids, torch.arange(ids.shape[1], device=device))
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    loss.backward()
    rel = {n: float((stats.grads[n] - p.grad.float().cpu()).abs().max() / p.grad.abs().max().clamp_min(1e-20))
           for n, p in ref.named_parameters()}
    worst = max(rel, key=rel.get)
    loss_err = abs(stats.losses[0] - float(loss))
    return {"loss": stats.losses[0], "loss_ref": float(loss), "loss_abs_err": loss_err,
            "grad_max_rel_err": rel[worst], "grad_worst_param": worst,
            "ok": loss_err < 1e-4 and rel[worst] < 1e-3}


def train_run(args, world: int, rank: int, accelerator: str) -> dict:
    """ZeRO-3, bf16, activation checkpointing, ring over every GPU, one sample of ``seq_len`` per step."""
    config = (GPTConfig(vocab_size=61, n_layer=2, n_head=3, n_embd=24, max_seq_len=256,
                        activation_checkpointing=True) if args.smoke
              else GPTConfig(vocab_size=50304, n_layer=12, n_head=12, n_embd=768, max_seq_len=args.seq_len,
                             activation_checkpointing=True))
    seq_len = 128 if args.smoke else args.seq_len
    torch.manual_seed(0)
    module = RingCausalLM(config, lr=3e-4, warmup_steps=2, max_steps=args.steps)
    stats = StepStats()
    if torch.cuda.is_available() and not args.smoke:
        torch.cuda.reset_peak_memory_stats()
    strategy = RingDeepSpeedStrategy(stage=3, logging_level=40)
    data = RandomTokens(args.steps, seq_len, config.vocab_size, seed=2)
    make_trainer(strategy, accelerator, world, args.steps, args.precision, [stats]).fit(
        module, DataLoader(data, batch_size=1))
    return {
        "params": module.model.num_parameters(), "n_layer": config.n_layer, "n_embd": config.n_embd,
        "n_head": config.n_head, "vocab_size": config.vocab_size, "seq_len": seq_len, "gpus": world,
        "ring_size": world, "zero_stage": 3, "precision": args.precision, "activation_checkpointing": True,
        **step_figures(stats, seq_len, module.flops_per_token(seq_len), args, world, rank),
    }


def add_run_arguments(parser: argparse.ArgumentParser, steps: int, warmup: int,
                      smoke_help: str = "tiny CPU/gloo run that only checks the script") -> None:
    """The options every timed training benchmark takes (output folder, length, steps, precision, peak)."""
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--seq-len", type=int, default=131072)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--warmup", type=int, default=warmup, help="first steps left out of the timing")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU for MFU")
    parser.add_argument("--smoke", action="store_true", help=smoke_help)


def step_figures(stats: StepStats, seq_len: int, flops_per_token: float, args, world: int, rank: int) -> dict:
    """Timing, MFU and every rank's peak memory of a run of one ``seq_len`` sample per step over
    ``world`` GPUs (collective: every rank calls it). Median step after ``args.warmup`` steps."""
    on_gpu = torch.cuda.is_available() and not args.smoke
    peak = {"rank": rank, "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if on_gpu else None}
    peaks: list = [None] * world
    dist.all_gather_object(peaks, peak)
    step_s = statistics.median(stats.seconds[args.warmup:] or stats.seconds)
    tokens_per_s = seq_len / step_s  # one sample per step, split over the GPUs
    return {
        "steps": args.steps, "warmup_steps_excluded": args.warmup, "step_seconds": stats.seconds,
        "median_step_seconds": step_s, "tokens_per_s": tokens_per_s, "tokens_per_s_per_gpu": tokens_per_s / world,
        "model_flops_per_token": flops_per_token, "tflops_per_gpu": flops_per_token * tokens_per_s / world / 1e12,
        "mfu": flops_per_token * tokens_per_s / (world * args.peak_tflops * 1e12),
        "peak_tflops_assumed": args.peak_tflops, "losses": stats.losses, "memory": peaks,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_run_arguments(parser, steps=15, warmup=3)
    parser.add_argument("--skip-check", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    smoke = args.smoke or not torch.cuda.is_available()
    args.smoke = smoke
    if smoke:
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
        args.steps, args.warmup = min(args.steps, 4), 1
    accelerator = "cpu" if smoke else "gpu"
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = torch.device("cpu") if smoke else torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if not smoke:
        torch.cuda.set_device(device)
    import deepspeed

    result: dict = {
        "device": torch.cuda.get_device_name(device) if not smoke else "cpu (smoke)",
        "torch": torch.__version__, "cuda": torch.version.cuda, "deepspeed": deepspeed.__version__,
        "lightning": pl.__version__, "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H%M%SZ"),
        "world": world,
    }
    t0 = time.perf_counter()
    if not args.skip_check:
        result["equivalence"] = check_equivalence(args, world, rank, accelerator, device)
    result["train"] = train_run(args, world, rank, accelerator)
    result["wall_seconds"] = time.perf_counter() - t0
    if rank == 0:
        _report(result, args.out, "smoke" if smoke else f"{world}gpu")
    dist.barrier()
    dist.destroy_process_group()


def _report(result: dict, out: str, tag: str) -> None:
    for row in result.get("equivalence", []):
        print(f"{row['strategy']:>22}: loss err {row['loss_abs_err']:.2e}, "
              f"grad max rel err {row['grad_max_rel_err']:.2e} ({row['grad_worst_param']}) ok={row['ok']}")
    t = result["train"]
    print(f"train {t['params']:,} params, {t['seq_len']} tokens on {t['gpus']} GPU(s): "
          f"{t['tokens_per_s']:.0f} tokens/s, {t['tflops_per_gpu']:.1f} TFLOP/s per GPU, "
          f"MFU {100 * t['mfu']:.1f}% of {t['peak_tflops_assumed']:.0f}; peak memory "
          + ", ".join(f"{m['peak_allocated_gib'] or 0:.1f} GiB" for m in t["memory"]))
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"gpu_lightning_{tag}_{result['date']}.json"
    write_json(path, result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
