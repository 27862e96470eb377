"""The suite's checks per test module: oracle cases and failure-mode tests, to compare two versions of the suite.

    python scripts/test_inventory.py > now.tsv              # collect (no test runs) and count
    python scripts/test_inventory.py --compare old.tsv now.tsv

A check is one collected pytest item. It is a failure-mode check when its test function expects an error:
it uses ``pytest.raises``, asserts a non-zero return code or an error message, or its name says so (fails,
refuses, rejects, raises, error, timeout, ...); every other item is an oracle or exact-expectation check.
``--compare`` prints both counts per module and exits 1 when a module has fewer of either.
"""

from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FAILURE_NAME = re.compile(r"fail|refus|reject|raise|error|timeout|timed_out|invalid|bad_|corrupt|kill|hang|"
                          r"sigterm|nan_|mismatch|wrong|clear|damaged|missing|unknown|not_", re.I)
FAILURE_BODY = re.compile(r"pytest\.raises|returncode != 0|returncode == [12]\b|Error\b|\.startswith\(\"ring-")


def collected_ids(paths: list[str]) -> list[str]:
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *paths],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if "::" in line]


def failure_functions(path: Path) -> set[str]:
    """Names of the test functions of ``path`` that check a failure mode."""
    source = path.read_text()
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
            body = ast.get_source_segment(source, node) or ""
            if FAILURE_NAME.search(node.name) or FAILURE_BODY.search(body):
                names.add(node.name)
    return names


def inventory(paths: list[str]) -> dict[str, Counter]:
    table: dict[str, Counter] = {}
    failures: dict[str, set[str]] = {}
    for node_id in collected_ids(paths):
        module, rest = node_id.split("::", 1)
        function = rest.split("::")[-1].split("[")[0]
        if module not in failures:
            failures[module] = failure_functions(REPO / module)
        kind = "failure" if function in failures[module] else "oracle"
        table.setdefault(module, Counter())[kind] += 1
    return table


def write(table: dict[str, Counter]) -> None:
    print("module\toracle\tfailure")
    for module in sorted(table):
        print(f"{module}\t{table[module]['oracle']}\t{table[module]['failure']}")


def read(path: str) -> dict[str, Counter]:
    rows = [line.split("\t") for line in Path(path).read_text().splitlines()[1:] if line.strip()]
    return {m: Counter(oracle=int(o), failure=int(f)) for m, o, f in rows}


def compare(old: dict[str, Counter], new: dict[str, Counter]) -> int:
    fewer = 0
    print(f"{'module':48} {'oracle':>15} {'failure':>15}")
    for module in sorted(set(old) | set(new)):
        a, b = old.get(module, Counter()), new.get(module, Counter())
        flag = ""
        if b["oracle"] < a["oracle"] or b["failure"] < a["failure"]:
            flag, fewer = "  FEWER", fewer + 1
        print(f"{module:48} {a['oracle']:>6} -> {b['oracle']:<6} {a['failure']:>6} -> {b['failure']:<6}{flag}")
    total = [sum(t[k]["oracle"] + t[k]["failure"] for k in t) for t in (old, new)]
    print(f"total checks {total[0]} -> {total[1]}; modules with fewer: {fewer}")
    return 1 if fewer else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", default=["tests"], help="test paths to collect (default: tests)")
    parser.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"), help="two tables this script wrote")
    args = parser.parse_args()
    if args.compare:
        return compare(read(args.compare[0]), read(args.compare[1]))
    write(inventory(args.paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
