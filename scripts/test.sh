#!/usr/bin/env bash
# The whole test suite: the Rust workspace, then the Python package's pytest suite.
#
#   scripts/test.sh              # Rust + Python (needs a Python >= 3.9 with pip)
#   LONGATTN_SKIP_PY=1 scripts/test.sh   # Rust only
#
# The Python part installs the package (maturin builds the Rust extension) and its test
# dependencies (torch, transformers, gguf, accelerate, pytest) into a virtual environment,
# `$LONGATTN_VENV` (default .venv), made once and reused; it also compiles the linear-attention
# CUDA kernels with NVRTC from PyPI (scripts/nvrtc_check.py; no GPU needed).
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
# The linear-attention kernels compile with NVRTC (from PyPI; no GPU needed): every variant.
"$VENV/bin/python" -m pip install -q nvidia-cuda-nvrtc-cu12
"$VENV/bin/python" scripts/nvrtc_check.py > "$VENV/nvrtc_check.txt" || { grep -v "^PASS" "$VENV/nvrtc_check.txt"; exit 1; }
echo "NVRTC: $(tail -1 "$VENV/nvrtc_check.txt")"
# The Hopper forward and backward kernels (their source is assembled in Rust) through the same NVRTC.
NVRTC_LIB=$("$VENV/bin/python" -c "import nvidia.cuda_nvrtc as m, os; print(os.path.join(list(m.__path__)[0], 'lib'))")
LD_LIBRARY_PATH="$NVRTC_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    cargo test -q -p longattn --lib kernels_compile_with_nvrtc -- --nocapture 2>&1 | grep -E "skipped|test result"
# The Hugging Face tests compare against `longattn eval`: the binary `cargo test` just built.
export LONGATTN_BIN="${LONGATTN_BIN:-$PWD/target/debug/longattn}"
"$VENV/bin/python" -m pytest -q -ra crates/longattn-py/tests
