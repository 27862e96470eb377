#!/usr/bin/env bash
# Sets up .venv (CPU torch, pinned) and runs the linter and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export TORCH_EXTENSIONS_DIR="$PWD/.torch_extensions"  # DeepSpeed compiles its CPU comm op once
export WANDB_MODE=offline WANDB_SILENT=true
.venv/bin/ruff check .
# -n 2 --dist loadfile: two workers, a test file's tests on one worker, so module fixtures (a shared app run,
# a spawned world) serve the whole file once; most tests wait on subprocesses, so the second core is idle
# without it. --durations=15: the slowest tests close every run, so growth shows.
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --durations=15 "$@"
