"""``benchmarks/provenance.py``: every benchmark result records the commit it ran on and whether the
working tree was clean, and every benchmark script writes its results through it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from provenance import source_state, text_header, write_json  # noqa: E402


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout


def test_result_records_the_commit_and_the_trees_state(tmp_path: Path) -> None:
    path = write_json(tmp_path / "out" / "result.json", {"tokens_per_s": 1.5})
    written = json.loads(path.read_text())
    changed = [line[3:] for line in _git("status", "--porcelain", "--untracked-files=no").splitlines() if line.strip()]
    assert written == {"tokens_per_s": 1.5, "source": {"commit": _git("rev-parse", "HEAD").strip(),
                                                       "tree_clean": not changed, "changed": changed}}
    assert re.fullmatch(r"[0-9a-f]{40}", written["source"]["commit"])
    state = source_state()
    assert text_header() == f"# commit {state['commit']}, tree clean: {state['tree_clean']}\n"


def test_every_benchmark_script_writes_through_provenance() -> None:
    """No benchmark writes a result file of its own: each one that writes uses write_json or text_header."""
    writers = []
    for script in sorted((REPO / "benchmarks").glob("*.py")):
        text = script.read_text()
        if script.name == "provenance.py":
            continue
        assert not re.search(r"write_text\(json\.dumps|json\.dump\(", text), script.name
        if "write_json(" in text or "text_header(" in text:
            writers.append(script.stem)
    assert {"bench_2d", "bench_calibration", "bench_hf", "bench_hf_data", "bench_longest", "bench_packed",
            "bench_patterns", "bench_ring", "bench_train",
            "check_document_kernels", "gpu_lightning", "hilbert_locality", "packed_balance",
            "profile_pattern"} <= set(writers)


def test_results_index_lists_every_current_result_and_who_quotes_it() -> None:
    """benchmarks/results/README.md names each file at the top of the folder once, and every doc it says
    quotes a file does quote it (outside history/)."""
    results = REPO / "benchmarks" / "results"
    index = (results / "README.md").read_text()
    rows = re.findall(r"^\| `([^`]+)` \| [^|]+ \| ([^|]+) \|$", index, flags=re.M)
    listed = [name for name, _ in rows]
    current = sorted(p.name for p in results.iterdir() if p.is_file() and p.name != "README.md")
    assert sorted(listed) == current
    for name, quoted in rows:
        for doc in re.findall(r"((?:docs/)?[\w.]+\.md) §", quoted):
            text = (REPO / doc).read_text()
            assert re.search(rf"(?<!history/){re.escape(name)}", text), (name, doc)


def test_a_tree_without_git_takes_the_commit_from_the_environment(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    import provenance

    monkeypatch.setattr(provenance, "REPO", tmp_path)  # no git repository there
    monkeypatch.delenv("BENCH_COMMIT", raising=False)
    monkeypatch.delenv("BENCH_TREE_CLEAN", raising=False)
    assert source_state() == {"commit": None, "tree_clean": None, "changed": []}
    monkeypatch.setenv("BENCH_COMMIT", "0" * 40)
    monkeypatch.setenv("BENCH_TREE_CLEAN", "false")
    assert source_state() == {"commit": "0" * 40, "tree_clean": False, "changed": []}


def test_the_environment_wins_over_an_enclosing_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tree unpacked inside another checkout reports the commit its copier names, not the checkout's."""
    monkeypatch.setenv("BENCH_COMMIT", "1" * 40)
    monkeypatch.setenv("BENCH_TREE_CLEAN", "true")
    assert source_state() == {"commit": "1" * 40, "tree_clean": True, "changed": []}
