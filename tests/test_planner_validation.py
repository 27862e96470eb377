"""The planner against every committed GPU run of the present engine in
benchmarks/results/planner_manifest.json: step time within 15 %, peak GPU and host memory within 10 %
(docs/planner.md, 'Validation') but for the manifest's listed misses, which must still be misses, and the
table docs/planner.md prints is the one the planner computes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ring_plugin.planner.validate import KINDS, RESULTS, Check, markdown_table, validate

CHECKS, TARGETS = validate()
DOCS = Path(__file__).resolve().parents[1] / "docs" / "planner.md"


def within_target(check: Check) -> bool:
    return abs(check.error) <= TARGETS[check.quantity]


@pytest.mark.parametrize("check", CHECKS, ids=[f"{c.run}:{c.quantity}" for c in CHECKS])
def test_prediction_within_target(check: Check) -> None:
    if check.miss:
        assert not within_target(check), f"now within target ({100 * check.error:+.1f} %): drop it from 'misses'"
        return
    assert within_target(check), f"{100 * check.error:+.1f} %"


def test_the_target_check_rejects_a_miss() -> None:
    """The bound the test above applies fails a prediction 11 % off in memory and 16 % off in time."""
    assert TARGETS == {"step_time": 0.15, "peak_memory": 0.1, "host_memory": 0.1}
    for quantity, miss, hit in (("peak_memory", 1.11, 1.09), ("step_time", 0.84, 0.86)):
        assert not within_target(Check("x", quantity, miss, 1.0)) and within_target(Check("x", quantity, hit, 1.0))


def test_docs_table_is_the_planners_output() -> None:
    """docs/planner.md's validation table, row for row, is what the planner predicts now."""
    text = DOCS.read_text()
    table = markdown_table(CHECKS)
    assert table in text, "regenerate with: python -m ring_plugin.planner.validate --markdown"


def test_manifest_checks_the_present_engine_and_keeps_superseded_runs_as_history() -> None:
    manifest = json.loads((RESULTS / "planner_manifest.json").read_text())
    quantities = {(c.run, c.quantity) for c in CHECKS}
    assert ("bench_ring_2xH200_2026-11-30_seq_major.json ring n=131072 causal", "peak_memory") in quantities
    assert ("bench_train_2xH200_2026-11-30_checkpoint6.json 3b ring@6", "peak_memory") in quantities
    assert ("history/bench_train_2xH200_2026-11-30_seq_major.json 3b ulysses@12", "step_time") in quantities
    longest = "bench_longest_1xH100_2026-12-07.json 1b ring n=262144"
    assert {(longest, q) for q in ("step_time", "peak_memory", "host_memory")} <= quantities
    assert [c.quantity for c in CHECKS if c.miss] == ["step_time", "host_memory"]  # each with its why
    assert len(CHECKS) == 18
    checked = {entry["file"] for entry in manifest["runs"]}
    for entry in manifest["history"]:  # a record, each saying what changed since; never checked
        assert entry["superseded"] and entry["file"] not in checked
        assert entry["file"].startswith("history/") or entry["file"] in {  # current results, due to be re-measured
            "bench_2d_2xH200_2026-11-30.json", "bench_hf_2xH200_2026-11-30.json",
            "bench_patterns_2xH200_2026-11-30.json", "bench_train_2xH200_2026-11-30_768k.json",
            "gpu_lightning_2xH200_2026-11-22.json"}
        assert (RESULTS / entry["file"]).is_file()
        assert not any(c.run.startswith(entry["file"] + " ") for c in CHECKS)


def test_history_files_still_read() -> None:
    """The readers of every kind still read the history's files (ready for the same runs measured again):
    each gives checks with positive predictions and measurements."""
    manifest = json.loads((RESULTS / "planner_manifest.json").read_text())
    for entry in manifest["history"]:
        data = json.loads((RESULTS / entry["file"]).read_text())
        found = KINDS[entry["kind"]](data, entry["file"], entry)
        assert found and all(c.predicted > 0 and c.measured > 0 for c in found), entry["file"]
