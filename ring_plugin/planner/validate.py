"""The planner against every committed GPU run of ``benchmarks/results/planner_manifest.json``.

Predictions use only ``measured.json``: kernel rates (single-GPU cuDNN, linear, fp32 matmul, copy)
and link rates, never the throughput of the run being predicted (the ring columns of bench_ring and
the training runs' tokens/s are not in it).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .app_config import CONFIG_DIR
from .cluster import cluster
from .hf_models import ONE_GPU, long_context_job, spec_from_hf_config
from .memory import attention_backward_bytes, estimate_memory, kv_heads_local
from .model_states import HOST_PROCESS_BYTES, pinned_bytes
from .rates import Rates
from .step_time import attention_seconds, estimate_step
from .workload import DEEPSPEED_DEFAULT_ZERO, Job, Layout, ModelSpec

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


@dataclass(frozen=True)
class Check:
    run: str  # file and entry
    quantity: str  # "step_time" (s), "peak_memory" (GPU bytes) or "host_memory" (the process's peak host bytes)
    predicted: float
    measured: float
    miss: str = ""  # why the manifest expects this check outside its target (its "misses" list); "" if not

    @property
    def error(self) -> float:
        return self.predicted / self.measured - 1.0


def _job(spec: ModelSpec, seq_len: int, entry: dict[str, Any], batch: int = 1, causal: bool = True) -> Job:
    """The job a run trained (the manifest lists only runs of the engine as it is now)."""
    return Job(spec, seq_len, batch=batch, causal=causal)


def _train(data: dict[str, Any], name: str, entry: dict[str, Any]) -> list[Check]:
    t = data["train"]
    spec = ModelSpec.from_dict({k: t[k] for k in ("vocab_size", "n_layer", "n_head", "n_embd")}
                               | {"n_kv_head": t.get("n_kv_head"), "max_seq_len": t["seq_len"]})
    gpus, ring = t["gpus"], t["ring_size"]
    layout = Layout(gpus // ring, 1, ring, t["zero_stage"], t["activation_checkpointing"])
    job = _job(spec, t["seq_len"], entry, batch=t.get("batch", 1))
    rates = Rates.for_cluster(cluster("h200", gpus, 1))
    peak = max(m["peak_allocated_gib"] for m in t["memory"]) * 2**30
    found = [Check(name, "step_time", estimate_step(job, layout, rates).total, t["median_step_seconds"]),
             Check(name, "peak_memory", estimate_memory(job, layout).total, peak)]
    return [check for check in found if not _skipped(entry, t, check.quantity)]


def _model_config(value: str | dict[str, Any]) -> dict[str, Any]:
    """A model named by its ``ring_plugin/conf/model`` file (package data, e.g. "gpt_3b") or given as keys."""
    if isinstance(value, str):
        import yaml

        return yaml.safe_load((CONFIG_DIR / "model" / f"{value}.yaml").read_text())
    return dict(value)


def _bench_train(data: dict[str, Any], name: str, entry: dict[str, Any]) -> list[Check]:
    """``bench_train.py`` rows (a list): the row's ``model`` resolved through the manifest entry's
    ``models`` map; variants ``ring`` / ``ring_recompute`` / ``ring_ulysses`` run ring_plugin at the
    row's ``ulysses_size`` x ``ring_size`` (a ring of all GPUs in files older than those fields),
    ``ulysses`` (DeepSpeed's) is a Ulysses group of all GPUs; only the variants the entry lists are
    checked (rows with an ``error`` never)."""
    out = []
    for row in data["train"]:
        if "error" in row or row["variant"] not in entry["variants"]:
            continue
        config = _model_config(entry["models"][row["model"]])
        config.update(max_seq_len=row["seq_len"], activation_checkpointing=row["activation_checkpointing"],
                      recompute_attention=row["recompute_attention"],
                      offload_checkpoints=row.get("offload_checkpoints", False),
                      mlp_tile_tokens=row.get("mlp_tile_tokens"))
        spec = ModelSpec.from_dict(config)
        gpus = row["gpus"]
        # DeepSpeed's Ulysses spans every GPU; ring_plugin's rows say their own sizes (older files: a ring).
        u = gpus if row["variant"] == "ulysses" else row.get("ulysses_size", 1)
        r = gpus // u
        layout = Layout(1, u, r, row["zero_stage"], row["activation_checkpointing"], row["recompute_attention"],
                        row.get("checkpoint_layers"))
        job = _job(spec, row["seq_len"], entry, batch=row.get("batch", 1))
        rates = Rates.for_cluster(cluster("h200", gpus, 1))
        peak = max(m["peak_allocated_gib"] for m in row["memory"]) * 2**30
        run = f"{name} {row['model']} {row['variant']}"
        if row.get("checkpoint_layers") not in (None, spec.config.n_layer):
            run += f"@{row['checkpoint_layers']}"
        found = [Check(run, "step_time", estimate_step(job, layout, rates).total, row["median_step_seconds"]),
                 Check(run, "peak_memory", estimate_memory(job, layout).total, peak)]
        out += [check for check in found if not _skipped(entry, row, check.quantity)]
    return out


def _skipped(entry: dict[str, Any], row: dict[str, Any], quantity: str) -> bool:
    """Whether the entry's ``skip`` list (each with a ``why``) leaves this row's quantity unchecked."""
    return bool(_rule(entry, row, quantity, "skip"))


def _rule(entry: dict[str, Any], row: dict[str, Any], quantity: str, rules: str) -> str:
    """The ``why`` of the first rule of the entry's ``rules`` list matching this row's quantity, or ""."""
    for rule in entry.get(rules, []):
        if rule["quantity"] == quantity and all(row.get(k) == v for k, v in rule.items()
                                                if k in ("model", "variant", "checkpoint_layers")):
            return rule["why"]
    return ""


def _attention_only(n: int, causal: bool, heads: int, head_dim: int, gpus: int, seconds: float, peak: float,
                    name: str, entry: dict[str, Any], ulysses: int = 1) -> list[Check]:
    """One dense ring layer, fwd+bwd, as the benchmarks time it: the inputs q, k, v and the output
    gradient (bf16), the output, and the backward working set."""
    spec = ModelSpec.from_dict(dict(vocab_size=64, n_layer=1, n_head=heads, n_embd=heads * head_dim, max_seq_len=n))
    job = _job(spec, n, entry, causal=causal)
    layout = Layout(1, ulysses, gpus // ulysses, 0, False)
    rates = Rates.for_cluster(cluster("h200", gpus, 1))
    local = n / gpus
    e, a = spec.config.n_embd, job.act_bytes
    kv = local * kv_heads_local(spec, 1) * head_dim
    held = 3 * local * e * a + 2 * kv * a  # q, dout, out, k, v
    if ulysses > 1:  # the all-to-all's outputs are new tensors the engine saves: q, k, v and the output by sequence
        held += 2 * local * e * a + 2 * local * ulysses * kv_heads_local(spec, ulysses) * head_dim * a
    return [Check(name, "step_time", attention_seconds(job, layout, rates, passes_forward=1), seconds),
            Check(name, "peak_memory", held + attention_backward_bytes(job, layout, local), peak)]


def _bench_ring(data: dict[str, Any], name: str, entry: dict[str, Any]) -> list[Check]:
    out = []
    for run in data["runs"]:
        ring = run["ring"]
        out += _attention_only(run["n"], run["causal"], data["heads"], data["head_dim"], data["gpus"],
                               ring["seconds"], ring["peak_gb"] * 1e9,
                               f"{name} ring n={run['n']} {'causal' if run['causal'] else 'non-causal'}", entry)
    return out


def _bench_patterns(data: dict[str, Any], name: str, entry: dict[str, Any]) -> list[Check]:
    out = []
    for r in data["results"]:
        if r["case"] == "dense":
            out += _attention_only(r["n"], r["causal"], r["heads"], r["head_dim"], r["world"], r["ms"] / 1e3,
                                   r["peak_gb"] * 1e9, f"{name} dense n={r['n']}", entry)
    return out


def _bench_hf(data: dict[str, Any], name: str, entry: dict[str, Any]) -> list[Check]:
    """bench_hf.py's rows: ``hf_llama``, the transformers Llama itself (planned from its config), and
    ``ring_gpt``, the RingGPT shaped like it (GELU MLP 1.5x the SwiGLU width, so as many weights); both
    ZeRO-3, every layer checkpointed, a ring of all GPUs."""
    llama = data["hf_config"]
    out = []
    for row in data["throughput"]:
        if row["model"] == "hf_llama":
            spec = spec_from_hf_config(llama, row["seq_len"], activation_checkpointing=True)
        else:
            spec = ModelSpec.from_dict(dict(
                vocab_size=llama["vocab_size"], n_layer=llama["num_hidden_layers"],
                n_head=llama["num_attention_heads"], n_kv_head=llama["num_key_value_heads"],
                n_embd=llama["hidden_size"], mlp_hidden=3 * llama["intermediate_size"] // 2,
                tie_weights=bool(llama.get("tie_word_embeddings", True)), max_seq_len=row["seq_len"],
                activation_checkpointing=True))
        layout = Layout(1, 1, row["gpus"], row["zero_stage"], True)
        job = _job(spec, row["seq_len"], entry)
        rates = Rates.for_cluster(cluster("h200", row["gpus"], 1))
        peak = max(m["peak_allocated_gib"] for m in row["memory"]) * 2**30
        run = f"{name} {row['model']}"
        found = [Check(run, "step_time", estimate_step(job, layout, rates).total, row["median_step_seconds"]),
                 Check(run, "peak_memory", estimate_memory(job, layout).total, peak)]
        out += [check for check in found if not _skipped(entry, row, check.quantity)]
    return out


def _bench_2d(data: dict[str, Any], name: str, entry: dict[str, Any]) -> list[Check]:
    """bench_2d.py: the dense layer as a Ulysses group of all GPUs and as a ring of all GPUs."""
    out = []
    for run in data["runs"]:
        for split in ("ulysses2", "ring2"):
            row = run[split]
            out += _attention_only(run["n"], run["causal"], run["heads"], run["head_dim"], data["gpus"],
                                   row["seconds"], row["peak_gb"] * 1e9,
                                   f"{name} {split} n={run['n']} {'causal' if run['causal'] else 'non-causal'}",
                                   entry, ulysses=row["ulysses_size"])
    return out


def _bench_longest(data: dict[str, Any], name: str, entry: dict[str, Any]) -> list[Check]:
    """bench_longest.py's records of the variants the entry lists (``ring``: ring_plugin's long-context
    switches) that trained a step: the transformers config of the record's ``model`` from the entry's
    ``models`` map, with the record's layers, tiles and length, on one GPU under ZeRO-3 with the optimizer
    in host memory, as the benchmark configures DeepSpeed (:data:`DEEPSPEED_DEFAULT_ZERO`). The process's
    host peak also holds the pinned checkpoint buffers of the benchmark's short warm-up step (``warmup_tokens``,
    8,192 in the benchmark), which torch's host cache keeps and a longer step cannot reuse."""
    out = []
    for row in data["records"]:
        if row.get("status") != "ok" or row.get("variant") not in entry["variants"] or row.get("offload_params"):
            continue
        values = {**entry["models"][row["model"]], "num_hidden_layers": row["layers"]}
        n = row["seq_len"]
        spec = spec_from_hf_config(values, n)
        job = long_context_job(spec, n, offload_optimizer=row["engine"] == "deepspeed")
        config = dataclasses.replace(job.model.config, mlp_tile_tokens=row["mlp_tile_tokens"])
        job = dataclasses.replace(job, model=dataclasses.replace(job.model, config=config),
                                  loss_chunk=row["loss_tile_tokens"], zero=DEEPSPEED_DEFAULT_ZERO)
        gpu = "h100" if "H100" in row["gpu"] else "h200"
        memory = estimate_memory(job, ONE_GPU)
        width = spec.config.n_embd * job.act_bytes
        warmup, step = (pinned_bytes(t * width) for t in (row.get("warmup_tokens", 8192), n))
        warmup_cache = row["layers"] * warmup if warmup and warmup != step else 0
        run = f"{name} {row['model']} {row['variant']} n={n}"
        host = memory.host + warmup_cache + HOST_PROCESS_BYTES
        found = [Check(run, "step_time", estimate_step(job, ONE_GPU, Rates.for_cluster(cluster(gpu, 1, 1))).total,
                       row["step_s"]),
                 Check(run, "peak_memory", memory.total, row["peak_gpu_allocated_gib"] * 2**30),
                 Check(run, "host_memory", host, row["peak_host_gib"] * 2**30)]
        out += [dataclasses.replace(c, miss=_rule(entry, row, c.quantity, "misses")) for c in found
                if not _skipped(entry, row, c.quantity)]
    return out


KINDS: dict[str, Callable[..., list[Check]]] = {
    "train": _train, "bench_ring": _bench_ring, "bench_patterns": _bench_patterns, "bench_train": _bench_train,
    "bench_2d": _bench_2d, "bench_hf": _bench_hf, "bench_longest": _bench_longest}


def validate(results: Path = RESULTS) -> tuple[list[Check], dict[str, float]]:
    """Every manifest entry's checks and the targets (relative error bounds by quantity). The manifest's
    ``history`` (runs of superseded engine states, kept in ``benchmarks/results/history``) is not checked."""
    manifest = json.loads((results / "planner_manifest.json").read_text())
    checks = []
    for entry in manifest["runs"]:
        data = json.loads((results / entry["file"]).read_text())
        checks += KINDS[entry["kind"]](data, entry["file"], entry)
    return checks, manifest["targets"]


def markdown_table(checks: list[Check]) -> str:
    """The validation table of docs/planner.md: one row per check, as a test compares it."""
    lines = ["| run | quantity | predicted | measured | error |", "|---|---|---|---|---|"]
    for check in checks:
        scale, unit = (1.0, "s") if check.quantity == "step_time" else (1e9, "GB")
        miss = " (known miss)" if check.miss else ""
        lines.append(f"| {check.run} | {check.quantity.replace('_', ' ')} | {check.predicted / scale:.3f} {unit} | "
                     f"{check.measured / scale:.3f} {unit} | {100 * check.error:+.1f} %{miss} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    found, targets = validate()
    if sys.argv[1:] == ["--markdown"]:
        print(markdown_table(found))
        raise SystemExit(0)
    for check in found:
        within = abs(check.error) <= targets[check.quantity]
        tag = "ok  " if within else ("miss" if check.miss else "MISS")  # miss: listed in the manifest's misses
        unit = (1.0, "s") if check.quantity == "step_time" else (1e9, "GB")
        print(f"{tag} {check.run:<70} {check.quantity:<11} "
              f"predicted {check.predicted / unit[0]:8.3f} measured {check.measured / unit[0]:8.3f} {unit[1]} "
              f"({100 * check.error:+.1f} %)")
