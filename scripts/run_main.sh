#!/usr/bin/env bash
# Sets up .venv (CPU torch, pinned) and runs the main job: `ring-train` on its embedded default
# (2 CPU processes, one ring of size 2, a small GPT learning a long-context task). Extra arguments
# are Hydra overrides, e.g. `bash scripts/run_main.sh recipe=cpu_default`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export WANDB_MODE="${WANDB_MODE:-offline}"
exec .venv/bin/ring-train "$@"
