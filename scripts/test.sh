#!/usr/bin/env bash
# The whole test suite: the Rust workspace, then the Python package's pytest suite.
#
#   scripts/test.sh              # Rust + Python (needs a Python >= 3.9 with pip)
#   LONGATTN_SKIP_PY=1 scripts/test.sh   # Rust only
#
# The Python part installs the package (maturin builds the Rust extension) and its test
# dependencies (torch, transformers, gguf, accelerate, pytest) into a virtual environment,
# `$LONGATTN_VENV` (default .venv), made once and reused.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace
if [ "${LONGATTN_SKIP_PY:-0}" = 1 ]; then
    echo "Python tests skipped (LONGATTN_SKIP_PY=1)"
    exit 0
fi
VENV="${LONGATTN_VENV:-.venv}"
PY="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first (the large one), then the package with its test extras.
"$VENV/bin/python" -m pip install -q torch numpy pytest "transformers>=4.56" gguf accelerate
"$VENV/bin/python" -m pip install -q --force-reinstall --no-deps ./crates/longattn-py
# The Hugging Face tests compare against `longattn eval`: the binary `cargo test` just built.
export LONGATTN_BIN="${LONGATTN_BIN:-$PWD/target/debug/longattn}"
"$VENV/bin/python" -m pytest -q -ra crates/longattn-py/tests
