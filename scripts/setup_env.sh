#!/usr/bin/env bash
# Creates .venv (if missing) and installs ring_plugin with everything the tests and the app need.
# torch is pinned to the CPU build (constraints.txt) so no CUDA wheel is ever pulled.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.ring_plugin_installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
  # A line per step: the first set-up takes minutes, and pip -q alone is silent all that time.
  echo "[setup 1/3] upgrading pip in .venv ..."
  .venv/bin/python -m pip install -q --upgrade pip
  echo "[setup 2/3] installing torch 2.13.0 (CPU build) ..."
  .venv/bin/python -m pip install -q -c constraints.txt "torch==2.13.0"
  echo "[setup 3/3] installing ring_plugin with its train, deepspeed, hf and dev extras ..."
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[train,deepspeed,hf,dev]"
  touch "$stamp"
  echo "[setup] done: .venv is ready"
fi
