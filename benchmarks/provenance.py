"""What every benchmark result records about the code it measured: the commit and whether the working
tree was clean (uncommitted changes make a result unreproducible from its commit alone).

Every benchmark script writes its result with :func:`write_json` (or prefixes a text report with
:func:`text_header`), so a file in ``benchmarks/results`` says which code produced it.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def source_state() -> dict[str, Any]:
    """``{"commit": sha, "tree_clean": bool, "changed": [paths]}`` of the repository the benchmark runs
    from. A tree copied without its git directory (a GPU host) takes them from ``BENCH_COMMIT`` and
    ``BENCH_TREE_CLEAN`` ("true"/"false"), set by whoever copied it; these win over git, because a copy
    unpacked inside another checkout would otherwise report that checkout's commit. None where neither is
    known."""
    if "BENCH_COMMIT" in os.environ:
        clean = os.environ.get("BENCH_TREE_CLEAN")
        return {"commit": os.environ["BENCH_COMMIT"], "tree_clean": None if clean is None else clean == "true",
                "changed": []}
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    if commit is None or status is None:
        return {"commit": None, "tree_clean": None, "changed": []}
    changed = [line[3:] for line in status.splitlines() if line.strip()]
    return {"commit": commit.strip(), "tree_clean": not changed, "changed": changed}


def write_json(path: Path | str, result: dict[str, Any], indent: int = 2) -> Path:
    """Write ``result`` with its ``source`` (:func:`source_state`) as JSON at ``path``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**result, "source": source_state()}, indent=indent) + "\n")
    return path


def text_header() -> str:
    """The first line of a text result: the commit it ran on and whether the tree was clean."""
    state = source_state()
    return f"# commit {state['commit']}, tree clean: {state['tree_clean']}\n"
