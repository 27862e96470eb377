"""The longest sequence one GPU trains a full step on: ring_plugin's long-context switches beside ALST's parts.

For a Llama-3.2-1B-shaped (``--model 1b``) or Llama-3.1-8B-shaped (``--model 8b``) transformers model
(random init, bf16), each variant on the same GPU:

- ``ring``: ``ring_plugin.hf.enable_long_context`` (loss and MLP in tiles, every decoder layer
  checkpointed with its input in pinned host memory), ``attn_implementation="ring"``;
- ``alst``: DeepSpeed's ALST parts: ``TiledMLP`` on every MLP, ``TiledFusedLogitsLoss`` for the head and
  loss, transformers' gradient checkpointing with ``CheckpointHiddenStatesOffload`` (checkpoint inputs on
  the host), ``attn_implementation="sdpa"`` (flash on the GPU; ``--alst-attention ring`` gives it the
  ring variant's attention, so only the tiling and offload parts differ);
- ``plain``: the model alone with transformers' gradient checkpointing (full logits, whole MLPs).

Every step is a full one: forward, backward and the optimizer step, under DeepSpeed ZeRO-3 with the
optimizer (fp32 master weights, its states and the step) offloaded to the CPU (``--engine deepspeed``),
or a torch optimizer on the model's device (``--engine torch``). Given candidate lengths
(``--lengths 262144,524288,786432``), the script confirms them with real steps, bisecting over the sorted
candidates (``--search bisect``; ``descending`` tries the largest first), each attempt in its own
subprocess so an out-of-memory kills only that attempt. Each attempt runs a short warm-up step, then
``--steps`` steps at the length and times the last: its seconds, tokens/s, causal MFU (the flops_per_token of
``HFCausalLM``: forward + backward matmuls and causal attention, recomputation not counted, over
``--peak-tflops``), peak GPU memory (allocated and reserved) and the process's peak host memory (its
maximum resident set, pinned buffers included). Each attempt's record is appended to the ``records``
of ``<out>/bench_longest.json`` as it ends, with the commit, the tree's state and the GPU's name. New attempts stop
when fewer than ``--attempt-timeout`` seconds remain of ``--budget-s`` (size both to the 10-minute
limit of one command). ``--layers 2`` builds the model with 2 decoder layers: with offloaded checkpoints
the GPU peak is one layer's working set, so this finds the GPU's limit in a fraction of a step's time;
each further layer adds its input (seq_len x hidden x 2 bytes) to the host memory.

``--tiny`` runs a 2-layer fp32 model on the CPU (torch engine, SGD), where every variant's first loss
must equal ``plain``'s within 1e-6.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import resource
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from provenance import source_state, write_json  # noqa: E402

from ring_plugin.models.loss import IGNORE_INDEX  # noqa: E402

LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=8192)
MODELS = {
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
    "tiny": dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, tie_word_embeddings=False),
}
VARIANTS = ("ring", "alst", "plain")
RESULT_PREFIX = "BENCH_LONGEST_RESULT "


def llama_config(model: str, seq_len: int, layers: int | None = None) -> Any:
    from transformers import LlamaConfig

    rope = {} if model == "tiny" else {"rope_parameters": LLAMA3_ROPE}
    shape = {**MODELS[model], **({"num_hidden_layers": layers} if layers else {})}
    return LlamaConfig(**shape, **rope, max_position_embeddings=max(seq_len, 8192), rms_norm_eps=1e-5,
                       use_cache=False)


# ---- the variants: one loss module each, handed to the engine ----

class RingLoss(nn.Module):
    """ring_plugin's switches; the loss is the model's own (tiled) loss over shard_batch's batch."""

    def __init__(self, model: nn.Module, args: argparse.Namespace):
        super().__init__()
        from ring_plugin.hf import enable_long_context

        self.model = enable_long_context(model, tiled_loss=True, mlp_tile_tokens=args.mlp_tile_tokens,
                                         offload_checkpoints=True, loss_tile_tokens=args.loss_tile_tokens)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return _model_loss(self.model, input_ids)


class PlainLoss(nn.Module):
    """The model alone: full logits, whole MLPs, transformers' gradient checkpointing."""

    def __init__(self, model: nn.Module, args: argparse.Namespace):
        super().__init__()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return _model_loss(self.model, input_ids)


def _model_loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    import ring_plugin.hf as hf

    batch = hf.shard_batch({"input_ids": input_ids, "labels": input_ids})
    return model(**batch, use_cache=False).loss


class AlstLoss(nn.Module):
    """DeepSpeed's ALST parts, as ArcticTraining applies them to a transformers Llama."""

    def __init__(self, model: nn.Module, args: argparse.Namespace):
        super().__init__()
        from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

        tile = args.mlp_tile_tokens

        def tiled_mlp_forward(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
            shards = max(1, math.ceil(x.shape[-2] / tile))
            params = [mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight]
            return TiledMLP.apply(lambda m, t: type(m).forward(m, t), mlp, x, shards, params)

        for layer in model.model.layers:
            layer.mlp.forward = types.MethodType(tiled_mlp_forward, layer.mlp)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model, self.loss_tile_tokens = model, args.loss_tile_tokens

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledFusedLogitsLoss

        labels = nn.functional.pad(input_ids, (0, 1), value=IGNORE_INDEX)[:, 1:]
        count = (labels != IGNORE_INDEX).sum()
        hidden = self.model.model(input_ids=input_ids, use_cache=False).last_hidden_state
        head = self.model.lm_head

        def loss_fn(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            # Each shard's share of the mean: TiledFusedLogitsLoss accumulates the head's gradient of
            # each shard's output in its forward, unscaled by the gradient that reaches it later.
            logits = module(x).float()
            return nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1),
                                               ignore_index=IGNORE_INDEX, reduction="sum") / count

        shards = max(1, math.ceil(input_ids.numel() / self.loss_tile_tokens))
        return TiledFusedLogitsLoss.apply(loss_fn, head, hidden, labels, None, shards, [head.weight], "sum")


LOSSES = {"ring": RingLoss, "alst": AlstLoss, "plain": PlainLoss}


def step_context(variant: str) -> contextlib.AbstractContextManager:
    """ALST's checkpoint offload wraps forward and backward together."""
    if variant != "alst":
        return contextlib.nullcontext()
    from deepspeed.runtime.activation_checkpointing.offload_activations import (
        get_checkpoint_hidden_states_offloading_ctx_manager,
    )

    return get_checkpoint_hidden_states_offloading_ctx_manager()


# ---- one attempt (the worker process) ----

def build_engine(loss_module: nn.Module, args: argparse.Namespace) -> tuple[Any, Any]:
    """(callable training module, object with backward/step) for the chosen engine."""
    opt_cls = torch.optim.SGD if args.optimizer == "sgd" else torch.optim.AdamW
    optimizer = opt_cls(loss_module.parameters(), lr=1e-5)
    if args.engine == "torch":

        def step() -> None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return loss_module, types.SimpleNamespace(backward=lambda loss: loss.backward(), step=step)
    import deepspeed

    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "bf16": {"enabled": args.model != "tiny"},
              "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                                    **({"offload_param": {"device": "cpu", "pin_memory": True}}
                                       if args.offload_params else {})},
              "zero_force_ds_cpu_optimizer": False, "zero_allow_untested_optimizer": True,
              "gradient_clipping": 0.0, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=loss_module, optimizer=optimizer, config=config)
    return engine, engine


def attempt(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    import ring_plugin.hf  # noqa: F401 - registers "ring"
    from ring_plugin.models import HFCausalLM

    tiny = args.model == "tiny"
    device = torch.device("cpu" if tiny else "cuda")
    dtype = torch.float32 if tiny else torch.bfloat16
    if args.engine == "deepspeed" and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        import deepspeed

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        deepspeed.init_distributed(dist_backend="gloo" if tiny else "nccl")
    torch.manual_seed(0)
    attn = args.alst_attention if args.variant == "alst" else "ring"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(llama_config(args.model, args.seq_len, args.layers),
                                                 attn_implementation=attn,
                                                 dtype=dtype)
    model.train()
    loss_module = LOSSES[args.variant](model, args)
    module, engine = build_engine(loss_module, args)
    flops = HFCausalLM.flops_per_token(types.SimpleNamespace(_require_model=lambda: model), args.seq_len)

    def one_step(length: int) -> float:
        ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))
        with step_context(args.variant):
            loss = module(ids.to(device))
            engine.backward(loss)
        engine.step()
        return float(loss.detach())

    cuda = device.type == "cuda"
    if args.warmup_tokens:
        one_step(args.warmup_tokens)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
    for _ in range(args.steps):  # the last step is the one reported (the first at a length pins its host buffers)
        start = time.perf_counter()
        losses.append(one_step(args.seq_len))
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    seconds, loss = times[-1], losses[0]
    tokens_per_s = args.seq_len / seconds
    return {
        "status": "ok", "loss": loss, "losses": losses, "step_s": seconds, "step_times_s": times,
        "tokens_per_s": tokens_per_s, "attention": attn,
        "mfu": flops * tokens_per_s / (args.peak_tflops * 1e12),
        "flops_per_token": flops,
        "peak_gpu_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "peak_gpu_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
        # ru_maxrss is in KiB on Linux: the worker's peak resident host memory, pinned buffers included.
        "peak_host_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


# ---- the driver ----

def run_attempt(args: argparse.Namespace, seq_len: int) -> dict[str, Any]:
    """One attempt in its own process; an OOM, a crash or a timeout is a record, not an exception."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--seq-len", str(seq_len),
           *[a for key, value in vars(args).items() if key in WORKER_KEYS
             for a in (f"--{key.replace('_', '-')}", str(value))]]
    if args.offload_params:
        cmd.append("--offload-params")
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.attempt_timeout,
                              env=dict(os.environ, PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True"))
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "wall_s": time.monotonic() - start}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode == 0 and lines:
        return {**json.loads(lines[-1][len(RESULT_PREFIX):]), "wall_s": time.monotonic() - start}
    tail = (proc.stdout + proc.stderr)[-1500:]
    oom = "out of memory" in tail.lower() or "OutOfMemoryError" in tail or proc.returncode in (-9, 137)
    return {"status": "oom" if oom else "error", "returncode": proc.returncode, "wall_s": time.monotonic() - start,
            "tail": tail}


WORKER_KEYS = ("model", "variant", "engine", "optimizer", "mlp_tile_tokens", "loss_tile_tokens", "warmup_tokens",
               "peak_tflops", "steps", "alst_attention", "layers")


def append_record(out: Path, record: dict[str, Any]) -> None:
    """Append ``record`` to the ``records`` of ``out/bench_longest.json`` (with the code's source state)."""
    path = out / "bench_longest.json"
    records = json.loads(path.read_text())["records"] if path.exists() else []
    write_json(path, {"records": [*records, record]}, indent=1)


def environment() -> dict[str, Any]:
    source = source_state()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    host_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"commit": source["commit"], "tree_clean": source["tree_clean"], "gpu": gpu,
            "host_memory_gib": round(host_gib, 1), "torch": torch.__version__}


def search(args: argparse.Namespace) -> dict[str, Any]:
    """The longest candidate that trains a step (bisection assumes a longer one fails if a shorter does)."""
    lengths = sorted(set(args.lengths))
    deadline = time.monotonic() + args.budget_s
    env = environment()
    lo, hi, tried = -1, len(lengths), []  # lengths[lo] trained, lengths[hi] did not
    while hi - lo > 1 and deadline - time.monotonic() > args.attempt_timeout:
        index = hi - 1 if args.search == "descending" else (lo + hi) // 2
        record = {"model": args.model, "variant": args.variant, "seq_len": lengths[index], "engine": args.engine,
                  "optimizer": args.optimizer, "mlp_tile_tokens": args.mlp_tile_tokens, "steps": args.steps,
                  "layers": args.layers or MODELS[args.model]["num_hidden_layers"],
                  "loss_tile_tokens": args.loss_tile_tokens, "offload_params": args.offload_params,
                  "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **env,
                  **run_attempt(args, lengths[index])}
        append_record(Path(args.out), record)
        tried.append(record)
        print(json.dumps({k: v for k, v in record.items() if k != "tail"}), flush=True)
        if record["status"] == "ok":
            lo = index
            if args.search == "descending":
                break
        else:
            hi = index
    longest = lengths[lo] if lo >= 0 else None
    summary = {"kind": "longest", "model": args.model, "variant": args.variant, "longest_trained": longest,
               "first_failed": lengths[hi] if hi < len(lengths) else None, "settled": hi - lo == 1, **env}
    append_record(Path(args.out), summary)
    print(json.dumps(summary), flush=True)
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="1b")
    p.add_argument("--variant", choices=VARIANTS, default="ring")
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="candidate sequence lengths, comma-separated")
    p.add_argument("--search", choices=("bisect", "descending"), default="bisect")
    p.add_argument("--engine", choices=("deepspeed", "torch"), default=None,
                   help="default: deepspeed (ZeRO-3, optimizer offloaded to the CPU); torch with --tiny")
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    p.add_argument("--offload-params", action="store_true", help="ZeRO-3 parameters in host memory too")
    p.add_argument("--mlp-tile-tokens", type=int, default=16384)
    p.add_argument("--loss-tile-tokens", type=int, default=16384)
    p.add_argument("--warmup-tokens", type=int, default=8192, help="a short step first (0: none)")
    p.add_argument("--layers", type=int, default=0, help="decoder layers (0: the model's): a quick GPU-memory probe")
    p.add_argument("--steps", type=int, default=1, help="steps at the length; the last one is timed")
    p.add_argument("--alst-attention", choices=("sdpa", "ring"), default="sdpa",
                   help="the alst variant's attention (ring: the same kernel as the ring variant)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU, for MFU")
    p.add_argument("--attempt-timeout", type=float, default=420.0)
    p.add_argument("--budget-s", type=float, default=480.0, help="start no attempt that could end after this")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--tiny", action="store_true", help="2-layer fp32 model on the CPU: every variant, one length")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--seq-len", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:
        args.model, args.optimizer, args.warmup_tokens = "tiny", "sgd", 0
        args.engine = args.engine or "torch"
        args.mlp_tile_tokens, args.loss_tile_tokens = 7, 9
        args.lengths = args.lengths or [48]
    for name in ("mlp_tile_tokens", "loss_tile_tokens", "warmup_tokens", "steps", "layers"):
        if getattr(args, name) < (0 if name in ("warmup_tokens", "layers") else 1):
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be positive (or 0 if optional)")
    if not args.worker and not args.lengths:
        p.error("--lengths is required: candidate sequence lengths, e.g. --lengths 262144,524288,786432")
    if args.lengths and min(args.lengths) < 2:
        p.error(f"--lengths={args.lengths}: every length must be at least 2 tokens")
    args.engine = args.engine or "deepspeed"
    if args.model == "tiny" and not (args.tiny or args.worker):
        p.error("--model tiny runs on the CPU: pass --tiny")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(RESULT_PREFIX + json.dumps(attempt(args)), flush=True)
        return
    if not args.tiny:
        search(args)
        return
    # CPU check: every variant on the same weights and tokens; the first step's losses must agree.
    losses = {}
    for variant in VARIANTS:
        args.variant = variant
        losses[variant] = search(args)
    records = json.loads((Path(args.out) / "bench_longest.json").read_text())["records"]
    first = {r["variant"]: r["loss"] for r in records if r.get("status") == "ok"}
    diffs = {v: abs(first[v] - first["plain"]) for v in VARIANTS if v in first}
    append_record(Path(args.out), {"kind": "tiny_losses", "losses": first, "abs_diff_vs_plain": diffs})
    print(json.dumps({"losses": first, "abs_diff_vs_plain": diffs}), flush=True)


if __name__ == "__main__":
    main()
