"""``ring-plan``: recommend a layout for a ``ring-train`` recipe on a cluster.

    ring-plan recipe=dense_128k_zero3
    ring-plan recipe=dense_128k_zero3 gpus_per_node=8 nodes=8 seq_len=1048576 gpu=h200
    ring-plan recipe=dense_128k_zero3 --json
    ring-plan what-if                      # the 3B model at 128K..4M tokens on 8, 64 and 512 GPUs

Planner keys: gpu, gpus_per_node, nodes, nvlink_gbps, internode_gbps (GB/s per direction), host_gb (host
memory per node, GB; default 128 per GPU), batch (samples per ring), zero (e.g. 2,3), checkpointing (none, full,
selective, comma-separated; true = full,selective; false = none; all or both = every mode, the default).
Any other key=value is a ``ring-train`` override (seq_len=..., model=gpt_3b, model.n_layer=24, ...).
Without gpus_per_node and nodes the recipe's own devices x num_nodes are planned; without a recipe,
ring-train's default model with one sample per ring (batch=N for more).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

from ..app.known_keys import check_config, check_overrides
from .app_config import compose
from .cluster import cluster as make_cluster
from .command import train_command
from .model_states import parameter_count
from .recipe_job import job_from_config
from .recommend import MODES, Candidate, Report, plan

PLANNER_KEYS = ("gpu", "gpus_per_node", "nodes", "nvlink_gbps", "internode_gbps", "host_gb", "zero", "checkpointing",
                "batch", "recipe")
LEGEND = ("Layout: dpN data-parallel replicas (samples per step = N x batch); U Ulysses group (ulysses_size); "
          "R ring (ring_size); Z ZeRO stage (strategy.stage); noAC no activation checkpointing, AC whole blocks "
          "recomputed, SAC all but attention recomputed, a number (SAC6) the first blocks checkpointed, +host "
          "checkpoint inputs in host memory and the MLP in tiles.")
WHAT_IF_GPUS = (8, 64, 512)
WHAT_IF_TOKENS = (131072, 524288, 1048576, 4194304)


def _split(args: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    mine: dict[str, str] = {}
    hydra: list[str] = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep:
            raise SystemExit(f"ring-plan: expected key=value, got {arg!r}")
        if key in PLANNER_KEYS:
            mine[key] = value
        else:
            hydra.append(arg)
    return mine, hydra


def _number(settings: dict[str, str], key: str, kind: type, default: Any) -> Any:
    """``settings[key]`` as an int or float (``default`` when absent); a bad one is named in the error."""
    if key not in settings:
        return default
    try:
        value = kind(settings[key])
    except ValueError:
        raise ValueError(f"{key}={settings[key]!r} must be a positive {kind.__name__}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{key}={settings[key]!r} must be a positive {kind.__name__}")
    return value


def _stages(settings: dict[str, str]) -> list[int]:
    text = settings.get("zero", "0,1,2,3")
    try:
        stages = [int(z) for z in text.split(",")]
    except ValueError:
        stages = []
    if not stages or any(z not in (0, 1, 2, 3) for z in stages):
        raise ValueError(f"zero={text!r} must be ZeRO stages 0-3, comma-separated (e.g. 2,3)")
    return stages


@dataclasses.dataclass(frozen=True)
class Planned:
    """A report with what made it: the recipe, the user's ring-train overrides and the composed config."""

    report: Report
    recipe: str | None
    overrides: tuple[str, ...]
    cfg: Any

    def command(self, candidate: Candidate) -> str:
        r = self.report
        return train_command(self.recipe, self.overrides, self.cfg, r.job, candidate.layout, r.cluster)


def planned_for(args: Sequence[str]) -> Planned:
    """The planner's report for ``ring-plan``'s key=value arguments, with the config it planned. Every
    setting is checked (a one-line ValueError naming it) before anything is planned."""
    mine, hydra = _split(args)
    recipe = mine.get("recipe")
    notes = []
    if "batch" in mine:
        hydra.append(f"data.batch_size={_number(mine, 'batch', int, 1)}")
    elif recipe is None and not any(arg.startswith("data.batch_size=") for arg in hydra):
        hydra.append("data.batch_size=1")
        notes.append("No recipe: ring-train's default model and data with 1 sample per ring (its CPU default "
                     "trains 8; batch=N plans N).")
    per_node, nodes = _number(mine, "gpus_per_node", int, None), _number(mine, "nodes", int, None)
    links = [_number(mine, key, float, None) for key in ("nvlink_gbps", "internode_gbps", "host_gb")]
    stages = _stages(mine)
    value = mine.get("checkpointing", "all").lower()
    aliases = {"true": ("full", "selective"), "false": ("none",), "both": MODES, "all": MODES}
    ac = aliases.get(value) or tuple(value.split(","))
    check_overrides(hydra, PLANNER_KEYS)
    cfg = compose(recipe, hydra)
    check_config(cfg, PLANNER_KEYS)
    job = job_from_config(cfg, recipe or "default")
    cl = make_cluster(mine.get("gpu", "h200"), per_node or int(cfg.devices), nodes or int(cfg.num_nodes), *links)
    report = plan(job, cl, stages=stages, checkpointing=ac)
    return Planned(dataclasses.replace(report, notes=notes + report.notes), recipe, tuple(hydra), cfg)


def report_for(args: Sequence[str]) -> Report:
    """The planner's report for ``ring-plan``'s key=value arguments."""
    return planned_for(args).report


def _gb(x: float) -> str:
    return f"{x / 1e9:.1f}"


def format_table(report: Report, limit: int, planned: Planned | None = None) -> str:
    """The table ``ring-plan`` prints; with ``planned``, the ring-train command of its recommendation."""
    job, cl = report.job, report.cluster
    c = job.model.config
    kind = "transformers" if job.model.hf else f"RingGPT, attention {job.attention}"
    lines = [f"{job.name}: {parameter_count(job.model) / 1e9:.2f}B parameters ({kind}), {c.n_layer} layers, "
             f"d={c.n_embd}, {c.n_head} heads ({c.kv_heads} K/V), {job.flops_per_token / 1e9:.1f} GFLOP/token; "
             f"{job.seq_len:,} tokens x {job.batch} per ring; {cl.world} x {cl.gpu.name} ({cl.nodes} node(s) of "
             f"{cl.gpus_per_node}), usable {_gb(report.usable_bytes)} GB per GPU", *report.notes, LEGEND]
    head = f"{'layout':<22} {'mem GB':>7} {'phase':>9} {'step s':>8} {'tok/s':>10} {'MFU':>6}  verdict"
    lines += [head, "-" * len(head)]
    best = report.best
    for cand in report.candidates[:limit]:
        lines.append(_row(cand, cand is best, cand.layout == job.recipe_layout))
    if len(report.candidates) > limit:
        lines.append(f"... {len(report.candidates) - limit} more candidates (--top N, --json)")
    lines.append(_reasoning(report))
    if planned is not None and report.best is not None:
        lines.append(f"Run it: {planned.command(report.best)}")
    return "\n".join(lines)


def _row(cand: Candidate, best: bool, recipe: bool) -> str:
    label = cand.layout.label + (" *" if recipe else "")
    if cand.memory is None or cand.step is None:
        return f"{label:<22} {'':>7} {'':>9} {'':>8} {'':>10} {'':>6}  rejected: {cand.reason}"
    verdict = "BEST" if best else ("fits" if cand.fits else f"rejected: {cand.reason}")
    return (f"{label:<22} {_gb(cand.memory.total):>7} {cand.memory.phase:>9} {cand.step.total:>8.3f} "
            f"{cand.tokens_per_s:>10,.0f} {100 * cand.mfu:>5.1f}%  {verdict}")


def _reasoning(report: Report) -> str:
    best = report.best
    if best is None or best.step is None or best.memory is None:
        closest = report.closest
        if closest is None or closest.memory is None:
            return "No candidate fits: every layout is impossible (see the reasons above)."
        short = "host memory" if closest.reason and closest.reason.startswith("host") else "GPU memory"
        return (f"No candidate fits. Closest: {closest.layout.label}, {_gb(closest.memory.total)} GB per GPU, "
                f"{short} short by {_gb(closest.shortfall)} GB: more GPUs (gpus_per_node, nodes) or a shorter "
                "seq_len.")
    s = best.step
    parts = ", ".join(f"{name} {getattr(s, name):.3f} s" for name in
                      ("matmul", "attention", "elementwise", "ulysses", "zero_exposed", "optimizer")
                      if getattr(s, name) > 0.0005) or "each part under 1 ms"
    return (f"Recommended: {best.layout.label} — the fastest candidate that fits ({_gb(best.memory.total)} GB of "
            f"{_gb(report.usable_bytes)} usable, peak in {best.memory.phase}); step {s.total:.3f} s = {parts}. "
            "* marks the recipe's own layout.")


def _jsonable(report: Report) -> dict[str, Any]:
    def conv(x: Any) -> Any:
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            out = {f.name: conv(getattr(x, f.name)) for f in dataclasses.fields(x)}
            for prop in ("total", "fits", "world", "label", "mode"):
                if hasattr(type(x), prop):
                    out[prop] = getattr(x, prop)
            return out
        if isinstance(x, (list, tuple)):
            return [conv(v) for v in x]
        if isinstance(x, dict):
            return {k: conv(v) for k, v in x.items()}
        return x

    data = conv(report)
    data["best"] = conv(report.best)
    return data


def what_if(gpus: Sequence[int] = WHAT_IF_GPUS, tokens: Sequence[int] = WHAT_IF_TOKENS,
            gpus_per_node: int = 8) -> list[tuple[int, int, Report]]:
    """The 3B recipe model (gpt_3b) at each sequence length on each GPU count (nodes of 8 H200s)."""
    rows = []
    for world in gpus:
        for n in tokens:
            cfg = compose("dense_128k_zero3", [f"seq_len={n}"])
            job = job_from_config(cfg, "gpt_3b")
            per_node = min(world, gpus_per_node)
            rows.append((world, n, plan(job, make_cluster("h200", per_node, world // per_node))))
    return rows


def format_what_if(rows: list[tuple[int, int, Report]]) -> str:
    head = "| GPUs | tokens | best layout | mem GB/GPU | step s | tokens/s | MFU | runner-up |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for world, n, report in rows:
        fitting = [c for c in report.candidates if c.fits]
        if not fitting:
            lines.append(f"| {world} | {n // 1024}K | nothing fits | | | | | |")
            continue
        b = fitting[0]
        assert b.memory is not None and b.step is not None
        runner = fitting[1].layout.label if len(fitting) > 1 else "-"
        lines.append(f"| {world} | {n // 1024}K | {b.layout.label} | {_gb(b.memory.total)} | {b.step.total:.2f} | "
                     f"{b.tokens_per_s:,.0f} | {100 * b.mfu:.1f}% | {runner} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ring-plan", description=__doc__.split("\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("args", nargs="*", help="'what-if', or key=value settings and ring-train overrides")
    parser.add_argument("--json", action="store_true", help="print the whole report as JSON")
    parser.add_argument("--top", type=int, default=25, help="rows of the table (default 25)")
    ns = parser.parse_args(argv)
    if ns.args[:1] == ["what-if"]:
        rows = what_if()
        if ns.json:
            print(json.dumps([{"gpus": w, "tokens": n, "best": _jsonable(r)["best"]} for w, n, r in rows], indent=1))
        else:
            print(format_what_if(rows))
        return
    from hydra.errors import HydraException

    if ns.top < 1:
        parser.error(f"--top={ns.top} must be a positive int")
    try:
        planned = planned_for(ns.args)
    except (ValueError, HydraException) as err:  # a bad setting or recipe: its message, not a traceback
        parser.error(str(err))
    report = planned.report
    if ns.json:
        data = _jsonable(report)
        data["command"] = planned.command(report.best) if report.best is not None else None
        print(json.dumps(data, indent=1))
    else:
        print(format_table(report, ns.top, planned))


if __name__ == "__main__":
    main(sys.argv[1:])
