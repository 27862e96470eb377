"""``ring-plan`` end to end (a subprocess, as users run it) and the recommendation on cases with a
known answer."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

from ring_plugin.planner.cli import format_table, report_for
from ring_plugin.planner.recommend import evaluate

REPO = Path(__file__).resolve().parents[1]


def ring_plan(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "ring_plugin.planner.cli", *args], cwd=REPO, env=env,
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


def test_bad_settings_are_one_line_errors_naming_them() -> None:
    """An unknown recipe, a recipe the planner cannot model, a bad number: exit 2 with the reason, no traceback."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cases = {"recipe=nope": "recipe='nope' is not a ring-train recipe; valid: block_sparse_90",
             "recipe=hf_llama_128k": "the planner models RingGPT",
             "gpus_per_node=abc": "gpus_per_node='abc' must be a positive int",
             "nodes=0": "nodes='0' must be a positive int"}
    for arg, message in cases.items():
        done = subprocess.run([sys.executable, "-m", "ring_plugin.planner.cli", arg], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, (arg, done.stderr)


def test_packed_recipe_plans_one_sample_per_step_that_fits() -> None:
    report = report_for(["recipe=packed_128k"])
    own = next(c for c in report.candidates if c.layout == report.job.recipe_layout)
    assert report.job.batch == 1 and own.fits, own.reason
