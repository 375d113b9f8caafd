#!/usr/bin/env bash
# The GPU checks of the Python package and of the CLI's CUDA route, on the device machine.
# Expects the stripped CLI as .dev/longattn.xz and the wheel in .dev-wheels/ (both carried).
#   bash scripts/gpu/python_package_check.sh checks   # selftest, CLI cpu-vs-cuda, pytest on CUDA, memcheck
#   bash scripts/gpu/python_package_check.sh perf     # gpu_check.py: checks, host overhead, peers 1k..64k
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
# unpacked on every call: a warm machine keeps /tmp from the call before, with its older binary
xz -dc .dev/longattn.xz > /tmp/longattn && chmod +x /tmp/longattn
python3 -c "import longattn" 2>/dev/null || {
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .dev-wheels/*.whl >/dev/null
}
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
case "${1:-checks}" in
checks)
  timeout 280 /tmp/longattn selftest --backend cuda --jobs 8 > "$OUT/selftest.txt" 2>&1; echo "selftest rc=$?"
  grep -E "passed|failed|FAIL" "$OUT/selftest.txt" | tail -5
  python3 scripts/gpu/cli_backend_check.py --bin /tmp/longattn 2>&1 | tee "$OUT/cli_check.txt" | tail -7
  timeout 200 python3 -m pytest -q -x crates/longattn-py/tests --ignore=crates/longattn-py/tests/test_hf.py \
    -k cuda -p no:cacheprovider > "$OUT/pytest_cuda.txt" 2>&1; echo "pytest rc=$?"; tail -3 "$OUT/pytest_cuda.txt"
  timeout 150 compute-sanitizer --tool memcheck --print-limit 20 python3 crates/longattn-py/bench/gpu_check.py \
    --no-perf --no-overhead > "$OUT/memcheck.txt" 2>&1; echo "memcheck rc=$?"; tail -4 "$OUT/memcheck.txt"
  ;;
perf)
  python3 crates/longattn-py/bench/gpu_check.py --lens "${LENS:-1k,4k,16k,64k}" --json "$OUT/gpu_check.json" 2>&1 \
    | tee "$OUT/gpu_check.txt" | grep -v "^check"
  ;;
esac
