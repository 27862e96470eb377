"""``ring-plan`` end to end (a subprocess, as users run it) and the recommendation on cases with a
known answer."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from ring_plugin.models.gpt import RingGPT
from ring_plugin.planner import compose, job_from_config
from ring_plugin.planner.cli import format_table, main, planned_for, report_for
from ring_plugin.planner.model_states import parameter_count
from ring_plugin.planner.recommend import evaluate
from tests import prefork

REPO = Path(__file__).resolve().parents[1]


def ring_plan(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([prefork.python(), "-m", "ring_plugin.planner.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_3b_at_1m_tokens_on_2_gpus_never_picks_zero0_without_checkpointing() -> None:
    report = json.loads(ring_plan("recipe=dense_128k_zero3", "seq_len=1048576", "--json"))
    best = report["best"]  # on 2 GPUs nothing fits at 1M (checkpointed: ~220 GB per GPU)
    assert best is None or best["layout"]["checkpointing"] or best["layout"]["zero"] > 0
    zero0_no_ac = [c for c in report["candidates"] if c["layout"]["zero"] == 0 and not c["layout"]["checkpointing"]]
    assert zero0_no_ac and all(c["reason"] and c["reason"].startswith(("OOM by", "U=")) for c in zero0_no_ac)
    assert any(c["reason"].startswith("OOM by") for c in zero0_no_ac)


def test_3b_at_1m_tokens_on_one_node_of_8_checkpoints() -> None:
    report = report_for(["recipe=dense_128k_zero3", "seq_len=1048576", "gpus_per_node=8"])
    assert report.best is not None and report.best.layout.checkpointing
    assert all(not c.fits for c in report.candidates if c.layout.zero == 0 and not c.layout.checkpointing)


def test_ulysses_group_larger_than_the_heads_is_rejected() -> None:
    report = report_for(["model.n_head=8", "model.n_kv_head=8", "gpus_per_node=16", "seq_len=4096"])
    u16 = [c for c in report.candidates if c.layout.ulysses == 16]
    assert u16 and all(c.reason == "U=16 exceeds heads (8)" for c in u16)
    assert report.best is not None and report.best.layout.ulysses <= 8
    text = format_table(report, limit=1000)
    assert "rejected: U=16 exceeds heads (8)" in text and "BEST" in text


def test_ulysses_never_spans_nodes_and_gqa_replicates_kv_heads() -> None:
    report = report_for(["recipe=dense_128k_zero3", "gpus_per_node=8", "nodes=2", "zero=3", "checkpointing=true"])
    reasons = {c.layout.ulysses: c.reason for c in report.candidates}
    assert reasons[16] == "U=16 spans nodes (8 GPUs per node)"
    assert any(c.layout.ulysses == 8 and c.fits for c in report.candidates)  # 8 K/V heads: one per rank


def test_table_and_recipe_marker() -> None:
    out = ring_plan("recipe=dense_128k_zero3")
    assert "dp1 U1 R2 Z3 SAC6 *" in out and "Recommended:" in out  # gpt_3b keeps attention saved, 6 blocks


def test_selective_checkpointing_is_planned_and_wins_at_long_context_when_it_fits() -> None:
    report = report_for(["recipe=dense_128k_zero3", "seq_len=524288", "gpus_per_node=8"])
    assert report.best is not None and report.best.layout.mode == "selective"
    # Every block checkpointed: SAC is faster than AC and needs more memory.
    best = report.best.layout
    sac, ac = (evaluate(report.job, report.cluster, dataclasses.replace(best, recompute_attention=recompute,
                                                                        checkpoint_layers=None),
                        _rates(report), report.usable_bytes) for recompute in (False, True))
    assert sac.step is not None and ac.step is not None and sac.memory is not None and ac.memory is not None
    assert sac.step.total < ac.step.total and sac.memory.total > ac.memory.total
    only = report_for(["recipe=dense_128k_zero3", "checkpointing=selective"])
    assert {c.layout.mode for c in only.candidates} == {"selective"}


def _rates(report):  # noqa: ANN001, ANN202
    from ring_plugin.planner.rates import Rates

    return Rates.for_cluster(report.cluster)


def test_checkpointing_candidates_checkpoint_as_few_blocks_as_fit() -> None:
    """A fitting AC/SAC candidate checkpoints the fewest first blocks that fit: one fewer does not fit, and
    each block left out is faster and needs more memory."""
    report = report_for(["recipe=dense_128k_zero3", "checkpointing=selective", "zero=3"])
    # the fastest fitting candidate the planner searched (the recipe's own layout is listed besides)
    best = next(c for c in report.candidates if c.fits and c.layout != report.job.recipe_layout)
    assert best.layout.checkpoint_layers is not None
    k = best.layout.checkpoint_layers
    assert 0 < k < 16 and best.layout.label.endswith(f"SAC{k}")
    fewer, more = (evaluate(report.job, report.cluster, dataclasses.replace(best.layout, checkpoint_layers=j),
                            _rates(report), report.usable_bytes) for j in (k - 1, k + 1))
    assert not fewer.fits and more.fits
    assert fewer.memory.total > best.memory.total > more.memory.total
    assert fewer.step.total < best.step.total < more.step.total
    # The recipe's own layout (gpt_3b: 6 of 16 blocks) is a candidate, marked.
    assert any(c.layout.label == "dp1 U1 R2 Z3 SAC6" for c in report.candidates)


def test_host_offload_is_planned_where_full_checkpointing_does_not_fit() -> None:
    """1M tokens on 2 GPUs: plain AC is out of memory; the same layout with its checkpoints in host memory
    and the MLP in tiles fits, with less memory and the host copies' time on top."""
    report = report_for(["recipe=dense_128k_zero3", "seq_len=1048576", "checkpointing=full", "zero=3"])
    by_label = {c.layout.label: c for c in report.candidates}
    plain, host = by_label["dp1 U1 R2 Z3 AC"], by_label["dp1 U1 R2 Z3 AC14+host"]  # 14 of 16 checkpointed
    assert not plain.fits and host.fits
    assert host.memory.total < plain.memory.total - 60e9  # block inputs of 4.3 GB each leave the GPU
    assert host.step.elementwise > plain.step.elementwise  # ... and come back: 2 x 4.3 GB a block over the host link
    assert report.best is not None and report.best.layout.host_offload


def test_bad_settings_are_one_line_errors_naming_them(capsys) -> None:
    """An unknown recipe, a recipe the planner cannot model, a bad number: exit 2 with the reason, no traceback.
    The first case runs as users run it (a process: its exit code and stderr); the others through ``main``,
    the same code path without a process start each."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([prefork.python(), "-m", "ring_plugin.planner.cli", "recipe=nope"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "recipe='nope' is not a ring-train recipe; valid: block_sparse_90" in done.stderr, done.stderr
    cases = {"recipe=hf_llama_128k model.config.head_dim=96": "model.config.head_dim=96 x num_attention_heads=32",
             "gpus_per_node=abc": "gpus_per_node='abc' must be a positive int",
             "nodes=0": "nodes='0' must be a positive int"}
    for arg, message in cases.items():
        with pytest.raises(SystemExit) as exited:
            main(arg.split())
        err = capsys.readouterr().err
        assert exited.value.code == 2 and message in err and "Traceback" not in err, (arg, err)


def test_packed_recipe_plans_one_sample_per_step_that_fits() -> None:
    report = report_for(["recipe=packed_128k"])
    own = next(c for c in report.candidates if c.layout == report.job.recipe_layout)
    assert report.job.batch == 1 and own.fits, own.reason


@pytest.mark.parametrize(("arg", "message"), [
    ("seq_len=0", "seq_len=0 must be a positive integer"),
    ("zero=5", "zero='5' must be ZeRO stages 0-3"),
    ("zero=2,x", "zero='2,x' must be ZeRO stages 0-3"),
    ("batch=-3", "batch='-3' must be a positive int"),
    ("data.batch_size=0", "data.batch_size=0 must be a positive integer"),
    ("internode_gbps=nan", "internode_gbps='nan' must be a positive float"),
    ("nvlink_gbps=inf", "nvlink_gbps='inf' must be a positive float"),
    ("host_gb=-1", "host_gb='-1' must be a positive float"),
    ("checkpointing=some", "checkpointing mode 'some' is not known"),
])
def test_garbage_is_refused_naming_the_argument(arg: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["recipe=dense_128k_zero3", arg])
    err = capsys.readouterr()
    assert exit_info.value.code == 2 and err.out == ""
    last = err.err.strip().splitlines()[-1]
    assert last.startswith("ring-plan: error: ") and message in last, err.err


def _layout_of_command(command: str):  # noqa: ANN202
    """The layout ring-train would run for a printed command: its overrides composed like ring-train does."""
    words = command.split()
    assert words[0] == "ring-train"
    recipe = next((w.split("=", 1)[1] for w in words[1:] if w.startswith("recipe=")), None)
    overrides = [w for w in words[1:] if not w.startswith("recipe=")]
    cfg = compose(recipe, overrides)
    return job_from_config(cfg, recipe or "default"), cfg


@pytest.mark.parametrize("args", [
    ["recipe=dense_128k_zero3", "gpus_per_node=8", "nodes=4", "seq_len=1048576"],  # Ulysses x ring on 4 nodes
    ["recipe=dense_128k_zero3", "seq_len=1048576", "checkpointing=full", "zero=3"],  # checkpoints in host memory
    ["recipe=hf_llama_128k", "gpus_per_node=1", "seq_len=262144"],  # a transformers model on one GPU
    ["model.n_layer=4", "seq_len=8192"],  # no recipe: the default config, another model size
])
def test_printed_command_runs_the_recommended_layout(args: list[str]) -> None:
    """Composing the printed ring-train command gives the recommended layout, world and batch exactly."""
    planned = planned_for(args)
    best = planned.report.best
    assert best is not None
    command = planned.command(best)
    assert f"Run it: {command}" in format_table(planned.report, 5, planned)
    job, cfg = _layout_of_command(command)
    cluster = planned.report.cluster
    assert (int(cfg.devices), int(cfg.num_nodes)) == (cluster.gpus_per_node, cluster.nodes)
    assert job.recipe_layout == best.layout, (command, job.recipe_layout, best.layout)
    assert job.batch == planned.report.job.batch and job.seq_len == planned.report.job.seq_len


def test_header_has_the_parameter_count_and_a_legend() -> None:
    report = report_for(["recipe=dense_128k_zero3"])
    with torch.device("meta"):
        real = sum(p.numel() for p in RingGPT(report.job.model.config).parameters())
    assert parameter_count(report.job.model) == real
    text = format_table(report, 3)
    assert f"{real / 1e9:.2f}B parameters" in text.splitlines()[0]
    legend = next(line for line in text.splitlines() if line.startswith("Layout:"))
    for word in ("dpN data-parallel", "U Ulysses group (ulysses_size)", "R ring (ring_size)",
                 "Z ZeRO stage (strategy.stage)", "SAC all but attention recomputed", "(SAC6) the first blocks"):
        assert word in legend


def test_without_a_recipe_one_sample_per_ring_is_planned_and_said() -> None:
    report = report_for(["seq_len=4096"])
    assert report.job.batch == 1
    assert any("No recipe" in note and "batch=N" in note for note in report.notes)
    assert report_for(["seq_len=4096", "batch=8"]).job.batch == 8


def test_nothing_fits_names_the_closest_layout_and_its_shortfall() -> None:
    report = report_for(["recipe=dense_128k_zero3", "seq_len=4194304"])
    assert report.best is None and report.closest is not None
    closest = report.closest
    assert closest.shortfall == min(c.shortfall for c in report.candidates if c.memory is not None)
    assert closest.shortfall == pytest.approx(closest.memory.total - report.usable_bytes)
    text = format_table(report, 3)
    assert f"Closest: {closest.layout.label}, " in text and f"short by {closest.shortfall / 1e9:.1f} GB" in text
    assert "Run it" not in text


def test_what_if_end_to_end() -> None:
    """``ring-plan what-if`` as users run it: the table of docs/planner.md, row for row."""
    out = ring_plan("what-if")
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 12  # header, 3 clusters x 4 lengths
    assert rows[1].startswith("| 8 | 128K | dp1 U8 R1 Z3 noAC |")
    docs = (REPO / "docs" / "planner.md").read_text()
    assert out.strip() in docs


def test_docs_example_outputs_are_the_real_output(capsys: pytest.CaptureFixture[str]) -> None:
    """Every ``$ ring-plan ...`` console block of the docs prints what ring-plan prints."""
    import re
    import shlex

    blocks = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        blocks += re.findall(r"```console\n\$ ring-plan ([^\n]*)\n(.*?)```", path.read_text(), flags=re.S)
    assert len(blocks) >= 2
    for args, shown in blocks:
        main(shlex.split(args))
        assert capsys.readouterr().out == shown, args
