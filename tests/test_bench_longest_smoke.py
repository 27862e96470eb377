"""``benchmarks/bench_longest.py``: its CPU run (``--tiny``) trains a step of every variant, whose first
losses agree with the plain model's within 1e-6 (fp32), and its search finds the longest length that
trains, appending each attempt to the JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.bench_smoke import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import bench_longest  # noqa: E402

from tests import prefork


@pytest.mark.timeout(300)
def test_tiny_run_trains_every_variant_with_the_plain_models_loss(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([prefork.python(), str(REPO / "benchmarks" / "bench_longest.py"), "--tiny", "--out",
                           str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = json.loads((tmp_path / "bench_longest.json").read_text())["records"]
    steps = [r for r in records if r.get("status")]
    assert [(r["variant"], r["status"], r["seq_len"]) for r in steps] == [(v, "ok", 48) for v in bench_longest.VARIANTS]
    for r in steps:
        assert r["tokens_per_s"] == pytest.approx(48 / r["step_s"]) and r["peak_host_gib"] > 0
        assert r["commit"] and r["gpu"] == "cpu" and isinstance(r["tree_clean"], bool)
    summaries = [r for r in records if r.get("kind") == "longest"]
    assert [s["longest_trained"] for s in summaries] == [48, 48, 48]
    (check,) = [r for r in records if r.get("kind") == "tiny_losses"]
    assert set(check["losses"]) == set(bench_longest.VARIANTS)
    assert max(check["abs_diff_vs_plain"].values()) <= 1e-6, check


@pytest.mark.parametrize("mode, expected_tries", [("bisect", [40, 60, 50]), ("descending", [70, 60, 50])])
def test_search_finds_the_longest_length_that_trains(tmp_path, monkeypatch, mode, expected_tries):
    """Lengths up to 50 train, longer ones run out of memory: both searches settle on 50."""
    tried = []

    def fake_attempt(args, seq_len):
        tried.append(seq_len)
        return {"status": "ok" if seq_len <= 50 else "oom"}

    monkeypatch.setattr(bench_longest, "run_attempt", fake_attempt)
    args = bench_longest.parse_args(["--model", "1b", "--lengths", "70,10,60,40,50,20,30", "--search", mode,
                                     "--out", str(tmp_path), "--attempt-timeout", "1"])
    summary = bench_longest.search(args)
    assert (summary["longest_trained"], summary["first_failed"], summary["settled"]) == (50, 60, True)
    assert tried == expected_tries
    records = json.loads((tmp_path / "bench_longest.json").read_text())["records"]
    assert [r.get("seq_len") for r in records] == [*expected_tries, None]


@pytest.mark.parametrize("argv, match", [
    (["--model", "1b"], "--lengths is required"),
    (["--lengths", "1024", "--mlp-tile-tokens", "0"], "--mlp-tile-tokens=0 must be positive"),
    (["--lengths", "1"], "every length must be at least 2 tokens"),
])
def test_bad_arguments_are_refused(argv, match, capsys):
    with pytest.raises(SystemExit):
        bench_longest.parse_args(argv)
    assert match in capsys.readouterr().err
