"""A Hugging Face Llama on the ring beside the equally shaped RingGPT, and its logits against one GPU.

Run on a machine with 2 GPUs::

    torchrun --nproc_per_node=2 benchmarks/bench_hf.py --out benchmarks/results

(a) Training throughput, both models in the same run, each under ``RingDeepSpeedStrategy`` ZeRO-3 with
bf16, activation checkpointing and one 128K-token sample per step split over the ring of 2:
``HFCausalLM`` on the Llama-3.2-1B-shaped config of the ``hf_llama_128k`` recipe (transformers'
LlamaForCausalLM, ``attn_implementation="ring"``, random init) and ``RingCausalLM`` on a RingGPT of the
same shape (16 layers, 2048 wide, 32 query / 8 KV heads of 64, tied 128256-token embedding; its GELU
MLP is 12288 wide so it has the SwiGLU MLP's 3 x 2048 x 8192 weights). Reported: tokens/s, peak memory
per GPU, and causal MFU = flops_per_token x tokens/s / (GPUs x peak), where flops_per_token =
3 x (2 x matmul weights + layers x heads x 4 x head_dim x seq_len / 2) (forward + backward, the causal
mask halving attention, recomputation not counted) and peak is ``--peak-tflops`` (default 989, the
dense bf16 peak of an H100/H200 SXM). Target: the HF model at >= 90 % of RingGPT's tokens/s.
(b) Logits of the HF model at 16K tokens on the ring of 2 (zigzag) against one GPU running
transformers' own "sdpa" on the whole sequence, in bf16 and in fp32. "Within bf16 noise": the ring's
bf16 logits are as close to the fp32 logits as one GPU's bf16 logits are (ratio <= 1.5).

Writes ``bench_hf_<tag>_<date>.json`` into ``--out``. ``--smoke`` runs tiny versions of both on CPU
(``torchrun --nproc_per_node=2 benchmarks/bench_hf.py --smoke``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from gpu_lightning import RandomTokens, StepStats, add_run_arguments, free_memory, make_trainer, release, step_figures  # noqa: E402
from provenance import write_json  # noqa: E402

from ring_plugin.comm.context import ring_context  # noqa: E402
from ring_plugin.layout import shard_sequence  # noqa: E402
from ring_plugin.lightning import RingDeepSpeedStrategy  # noqa: E402
from ring_plugin.models import GPTConfig, HFCausalLM, RingCausalLM  # noqa: E402
from ring_plugin.models.hf_lightning_module import hf_config  # noqa: E402

RECIPE = REPO / "ring_plugin" / "conf" / "recipe" / "hf_llama_128k.yaml"
SMOKE_LLAMA = dict(model_type="llama", vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)


def llama_config(smoke: bool) -> dict[str, Any]:
    """The recipe's Llama-3.2-1B-shaped config (one source of truth), or a tiny one for the smoke run."""
    if smoke:
        return dict(SMOKE_LLAMA)
    return OmegaConf.to_container(OmegaConf.load(RECIPE).model.config)


def same_shaped_gpt(llama: dict[str, Any], seq_len: int) -> GPTConfig:
    """RingGPT with the Llama's widths; its 2-matrix GELU MLP is 1.5x wider so it holds as many weights
    (and costs as many FLOPs) as the 3-matrix SwiGLU MLP."""
    head_dim = llama.get("head_dim") or llama["hidden_size"] // llama["num_attention_heads"]
    assert head_dim * llama["num_attention_heads"] == llama["hidden_size"], "RingGPT needs heads x head_dim = width"
    return GPTConfig(vocab_size=llama["vocab_size"], n_layer=llama["num_hidden_layers"],
                     n_head=llama["num_attention_heads"], n_kv_head=llama["num_key_value_heads"],
                     n_embd=llama["hidden_size"], mlp_hidden=3 * llama["intermediate_size"] // 2,
                     max_seq_len=seq_len, tie_weights=bool(llama.get("tie_word_embeddings", True)),
                     activation_checkpointing=True)


def _params(module: torch.nn.Module) -> int:
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in module.parameters())


def throughput(name: str, make_module: Callable[[], pl.LightningModule], args, world: int, rank: int,
               accelerator: str, vocab: int) -> dict[str, Any]:
    """ZeRO-3, ``args.precision``, one sample of ``args.seq_len`` tokens per step over the ring of all ranks."""
    torch.manual_seed(0)
    module = make_module()
    stats = StepStats()
    if accelerator == "gpu":
        torch.cuda.reset_peak_memory_stats()
    data = RandomTokens(args.steps, args.seq_len, vocab, seed=2)
    trainer = make_trainer(RingDeepSpeedStrategy(stage=3, logging_level=40), accelerator, world, args.steps,
                           args.precision, [stats])
    trainer.fit(module, DataLoader(data, batch_size=1))
    row = {
        "model": name, "params": _params(module), "seq_len": args.seq_len, "gpus": world, "ring_size": world,
        "zero_stage": 3, "precision": args.precision, "activation_checkpointing": True,
        **step_figures(stats, args.seq_len, module.flops_per_token(args.seq_len), args, world, rank),
    }
    del module, stats
    release(trainer)  # the next row's peak must not include this model's optimizer states
    dist.barrier()
    return row


def logits_check(args, world: int, rank: int, device: torch.device) -> dict[str, Any]:
    """Ring-of-``world`` logits (zigzag) vs one device running transformers' sdpa on the whole sequence."""
    from transformers import AutoModelForCausalLM

    import ring_plugin.hf as hf

    seq_len = args.logits_seq_len
    torch.manual_seed(0)  # the same weights on every rank: built on the CPU from one seed
    model = AutoModelForCausalLM.from_config(hf_config(llama_config(args.smoke)), attn_implementation="ring",
                                             dtype=torch.float32).to(device).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(5))
    batch = {"input_ids": ids.to(device)}

    def ring_logits(model: torch.nn.Module) -> torch.Tensor:
        model.set_attn_implementation("ring")
        with torch.no_grad(), ring_context(dist.group.WORLD, "zigzag"):
            shard = hf.shard_batch(batch)
            return model(input_ids=shard["input_ids"], position_ids=shard["position_ids"], use_cache=False).logits

    def one_device_rows(model: torch.nn.Module) -> torch.Tensor:
        model.set_attn_implementation("sdpa")
        with torch.no_grad():
            full = model(**batch, use_cache=False).logits
        return shard_sequence(full, 1, "zigzag", rank, world)  # this rank's rows

    def max_abs(t: torch.Tensor) -> float:
        t = t.float().abs().max().reshape(1)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    ring32, ref32 = ring_logits(model), one_device_rows(model)
    fp32_rel = max_abs(ring32 - ref32) / max_abs(ref32)
    model.to(torch.bfloat16)
    ring16, ref16 = ring_logits(model), one_device_rows(model)
    ring_vs_fp32, one_vs_fp32 = max_abs(ring16.float() - ref32), max_abs(ref16.float() - ref32)
    result = {
        "seq_len": seq_len, "layout": "zigzag", "gpus": world,
        "fp32_ring_vs_one_device_max_rel": fp32_rel,
        "bf16_ring_vs_one_device_max_abs": max_abs(ring16.float() - ref16.float()),
        "bf16_ring_vs_fp32_max_abs": ring_vs_fp32, "bf16_one_device_vs_fp32_max_abs": one_vs_fp32,
        "bf16_noise_ratio": ring_vs_fp32 / max(one_vs_fp32, 1e-12), "logits_max_abs": max_abs(ref32),
    }
    result["ok"] = fp32_rel <= 1e-4 and result["bf16_noise_ratio"] <= 1.5
    del model, ring32, ref32, ring16, ref16
    free_memory()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_run_arguments(parser, steps=12, warmup=3)
    parser.add_argument("--logits-seq-len", type=int, default=16384)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    args.smoke = args.smoke or not torch.cuda.is_available()
    if args.smoke:
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
        args.seq_len, args.logits_seq_len, args.steps, args.warmup = 128, 64, 3, 1
        args.precision = "32-true"
    accelerator = "cpu" if args.smoke else "gpu"
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = torch.device("cpu") if args.smoke else torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if not args.smoke:
        torch.cuda.set_device(device)
    import deepspeed
    import transformers

    llama = llama_config(args.smoke)
    result: dict[str, Any] = {
        "device": "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(device),
        "torch": torch.__version__, "cuda": torch.version.cuda, "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__, "lightning": pl.__version__, "world": world,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H%M%SZ"),
        "mfu_formula": "3 * (2 * matmul_weights + layers * heads * 4 * head_dim * seq_len / 2) * tokens_per_s "
                       "/ (gpus * peak_flops)",
        "hf_config": llama,
    }
    t0 = time.perf_counter()
    gpt = same_shaped_gpt(llama, args.seq_len)
    result["throughput"] = [
        throughput("hf_llama", lambda: HFCausalLM(config=llama, lr=3e-4, warmup_steps=2, max_steps=args.steps,
                                                  activation_checkpointing=True),
                   args, world, rank, accelerator, llama["vocab_size"]),
        throughput("ring_gpt", lambda: RingCausalLM(gpt, lr=3e-4, warmup_steps=2, max_steps=args.steps),
                   args, world, rank, accelerator, llama["vocab_size"]),
    ]
    hf_row, gpt_row = result["throughput"]
    result["hf_vs_ring_gpt_tokens_per_s"] = hf_row["tokens_per_s"] / gpt_row["tokens_per_s"]
    result["target_met"] = result["hf_vs_ring_gpt_tokens_per_s"] >= 0.9
    result["logits"] = logits_check(args, world, rank, device)
    result["wall_seconds"] = time.perf_counter() - t0
    if rank == 0:
        _report(result, args.out, "smoke" if args.smoke else f"{world}gpu")
    dist.barrier()
    dist.destroy_process_group()


def _report(result: dict[str, Any], out: str, tag: str) -> None:
    for t in result["throughput"]:
        print(f"{t['model']:>9}: {t['params']:,} params, {t['seq_len']} tokens on {t['gpus']} GPU(s): "
              f"{t['tokens_per_s']:.0f} tokens/s, MFU {100 * t['mfu']:.1f}%, peak "
              + ", ".join(f"{m['peak_allocated_gib'] or 0:.1f} GiB" for m in t["memory"]))
    print(f"HF / RingGPT tokens/s: {result['hf_vs_ring_gpt_tokens_per_s']:.3f} (target >= 0.9: "
          f"{result['target_met']})")
    lg = result["logits"]
    print(f"logits at {lg['seq_len']}: fp32 ring vs 1 device max rel {lg['fp32_ring_vs_one_device_max_rel']:.2e}; "
          f"bf16 ring vs fp32 {lg['bf16_ring_vs_fp32_max_abs']:.3e}, 1 device bf16 vs fp32 "
          f"{lg['bf16_one_device_vs_fp32_max_abs']:.3e} (ratio {lg['bf16_noise_ratio']:.2f}) ok={lg['ok']}")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bench_hf_{tag}_{result['date']}.json"
    write_json(path, result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
