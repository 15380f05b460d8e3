#!/usr/bin/env bash
# Set up a development install in .venv and run one thing:
#   bash packaging/setup.sh demo   -> appliance demo (the whole loop on the embedded default model)
#   bash packaging/setup.sh test   -> the static checks, then the test suite, fast tier then slow tier
#   bash packaging/setup.sh check  -> the static checks only: ruff (lint, format), mypy, import layers
#   bash packaging/setup.sh        -> set up only
# Safe to re-run: each step skips what is already in place. Needs Python >= 3.11 and
# the package registry (PyPI) once; nothing is downloaded at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
ACTION="${1:-setup}"
PY="${PYTHON:-python3}"
LLAMA_CPP_VERSION=0.3.36
TORCH_VERSION=2.13.0

step() { printf '\n== %s\n' "$*" >&2; }

if [[ ! -x .venv/bin/python ]]; then
    step "creating .venv"
    "$PY" -m venv .venv
fi
VPY=.venv/bin/python

# torch first: a bare 'torch' requirement would pull a multi-GB CUDA build on a CPU
# machine. This pin is a CPU build where the machine provides one locally, and
# PyPI's CUDA build on a machine with an NVIDIA GPU.
if ! "$VPY" -c "import torch" 2>/dev/null; then
    step "installing torch $TORCH_VERSION"
    "$VPY" -m pip install -q "torch==$TORCH_VERSION"
fi

# llama-cpp-python builds from source (~5 minutes on 2 cores; pip caches the wheel).
# With CUDA present it is built with GPU offload, never from a CPU wheel in the cache.
if ! "$VPY" -c "import llama_cpp" 2>/dev/null; then
    if command -v nvcc >/dev/null 2>&1 && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        step "building llama-cpp-python $LLAMA_CPP_VERSION with CUDA"
        CMAKE_ARGS="-DGGML_CUDA=on" "$VPY" -m pip install -q --no-cache-dir "llama-cpp-python==$LLAMA_CPP_VERSION"
    else
        step "building llama-cpp-python $LLAMA_CPP_VERSION (CPU; cached after the first build)"
        "$VPY" -m pip install -q "llama-cpp-python==$LLAMA_CPP_VERSION"
    fi
fi

step "installing the appliance and its test tools"
"$VPY" -m pip install -q -e ".[test]"

step "unpacking llama.cpp's converter from the llama-cpp-python $LLAMA_CPP_VERSION sdist"
bash packaging/fetch_converter.sh "$VPY"
bash packaging/build_llama_server.sh "$VPY"   # native llama-server for the endpoint (cached after the first build)

check() {
    step "static checks: ruff (lint and format), mypy, import layers"
    .venv/bin/ruff check appliance tui tests benchmarks packaging examples
    .venv/bin/ruff format --check appliance tui tests benchmarks packaging examples
    .venv/bin/mypy
    .venv/bin/lint-imports
}

case "$ACTION" in
    check) check ;;
    demo)
        step "appliance demo"
        exec .venv/bin/appliance demo ;;
    test)
        check
        step "tests, fast tier"
        .venv/bin/python -m pytest -m "not slow" --durations=15
        step "tests, slow tier (the embedded default model end to end)"
        .venv/bin/python -m pytest -m slow --durations=15 ;;
    setup) ;;
    *) echo "usage: bash packaging/setup.sh [demo|test|check]" >&2; exit 2 ;;
esac
