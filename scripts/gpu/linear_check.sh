#!/usr/bin/env bash
# Linear attention on the device machine. Expects the stripped CLI as .dev/longattn.xz and the
# wheel in .dev-wheels/ (carried); the FLA peer from .peers/light (carried with .peers/install.sh).
#   bash scripts/gpu/linear_check.sh checks   # selftest group `linear`, pytest test_linear on CUDA
#   bash scripts/gpu/linear_check.sh perf     # linear_check.py: vs FLA (same process), decode step
#   bash scripts/gpu/linear_check.sh gla      # gla_check.py: the gate's forward vs FLA's chunk_gla
#   bash scripts/gpu/linear_check.sh extra    # CLI cpu-vs-cuda (softmax and linear), memcheck on pytest
#   bash scripts/gpu/linear_check.sh segcheck # the checks again with every sequence cut into
#                                             # segments of 64 / 128 tokens (LONGATTN_LINEAR_SEG)
#   bash scripts/gpu/linear_check.sh sweep    # timings only, per slice width / segment length
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
# unpacked on every call: a warm machine keeps /tmp from the call before, with its older binary
xz -dc .dev/longattn.xz > /tmp/longattn && chmod +x /tmp/longattn
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .dev-wheels/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
# FLA from the carried light bundle, and a newer Triton for its gated backward
# (scripts/gpu/slim_triton.sh) in front of the installed one.
fla_env() {
  if [ -d .peers/light ]; then
    E=$(bash .peers/install.sh light) && eval "$E"
    export PYTHONPATH=/tmp/site:$PYTHONPATH
  fi
  tri=$(ls .peers/triton-*-slim.tar.xz 2>/dev/null | tail -1)
  if [ -n "$tri" ]; then
    mkdir -p /tmp/tri && [ -d /tmp/tri/triton ] || xz -dc "$tri" | tar xf - -C /tmp/tri
    export PYTHONPATH=/tmp/site:/tmp/tri:$PYTHONPATH TRITON_PTXAS_PATH=${TRITON_PTXAS_PATH:-$(command -v ptxas || echo /usr/local/cuda/bin/ptxas)}
  fi
}
case "${1:-checks}" in
checks)
  LONGATTN_CUDA_VERBOSE=${VERBOSE:-0} timeout 300 /tmp/longattn selftest --backend cuda --filter linear \
    > "$OUT/selftest_linear.txt" 2>&1; echo "selftest rc=$?"
  grep -vE "^linear .* pass " "$OUT/selftest_linear.txt" | tail -25
  timeout 200 python3 -m pytest -q crates/longattn-py/tests/test_linear.py -k cuda -p no:cacheprovider \
    > "$OUT/pytest_linear.txt" 2>&1; echo "pytest rc=$?"; tail -15 "$OUT/pytest_linear.txt"
  ;;
segcheck)
  LONGATTN_LINEAR_SEG=64 timeout 300 /tmp/longattn selftest --backend cuda --filter linear \
    > "$OUT/selftest_linear_seg64.txt" 2>&1; echo "selftest (segments of 64) rc=$?"
  grep -vE "^linear .* pass " "$OUT/selftest_linear_seg64.txt" | tail -12
  LONGATTN_LINEAR_SEG=128 timeout 200 python3 -m pytest -q crates/longattn-py/tests/test_linear.py -k cuda \
    -p no:cacheprovider > "$OUT/pytest_linear_seg128.txt" 2>&1; echo "pytest (segments of 128) rc=$?"
  tail -4 "$OUT/pytest_linear_seg128.txt"
  ;;
sweep)
  if [ -d .peers/light ]; then
    E=$(bash .peers/install.sh light) && eval "$E"
    export PYTHONPATH=/tmp/site:$PYTHONPATH
  fi
  CFGS=("LONGATTN_LINEAR_SEG=0" "LONGATTN_LINEAR_NW=16" "LONGATTN_LINEAR_NW=16 LONGATTN_LINEAR_SEG=0"
        "LONGATTN_LINEAR_NW=16 LONGATTN_LINEAR_BV=64" "LONGATTN_LINEAR_BV=64")
  [ -n "${SWEEP:-}" ] && IFS=';' read -r -a CFGS <<< "$SWEEP"  # SWEEP="A=1 B=2;A=3"
  for cfg in "${CFGS[@]}"; do
    echo "== $cfg"
    env $cfg python3 crates/longattn-py/bench/linear_check.py --perf-only --no-fla 2>&1 | grep -E "^b[0-9]|Error|error" | head -5
  done 2>&1 | tee "$OUT/linear_sweep.txt"
  ;;
perf)
  fla_env
  python3 -c "import triton; print('triton', triton.__version__, triton.__file__)"
  python3 crates/longattn-py/bench/linear_check.py --json "$OUT/linear_check.json" 2>&1 | tee "$OUT/linear_check.txt"
  ;;
gla)
  # The per-key-dim gate (GLA) against FLA's chunk_gla: checks, forward and fwd+bwd timings.
  fla_env
  python3 crates/longattn-py/bench/gla_check.py ${GLA_ARGS:-} --json "$OUT/gla_check.json" 2>&1 | tee "$OUT/gla_check.txt"
  ;;
extra)
  # The CLI's CUDA routes (softmax and linear) against its CPU routes; memcheck on a pytest run.
  python3 scripts/gpu/cli_backend_check.py --bin /tmp/longattn 2>&1 | tee "$OUT/cli_check.txt" | tail -8
  timeout 300 compute-sanitizer --tool memcheck --print-limit 20 python3 -m pytest -q -p no:cacheprovider \
    crates/longattn-py/tests/test_linear.py crates/longattn-py/tests/test_kvcache.py -k cuda \
    > "$OUT/memcheck_pytest.txt" 2>&1; echo "memcheck pytest rc=$?"; grep -E "passed|failed|ERROR SUMMARY" "$OUT/memcheck_pytest.txt" | tail -3
  ;;
esac
# Profile of the chunked forward at (1, 16k, 32, 128): `bash scripts/gpu/linear_check.sh profile`
if [ "${1:-}" = profile ]; then
  timeout 240 ncu --kernel-name lin_fwd --launch-skip 1 --launch-count 1 --section SpeedOfLight \
    --section WarpStateStats --section Occupancy --section MemoryWorkloadAnalysis \
    --section ComputeWorkloadAnalysis --section InstructionStats --section LaunchStats python3 -c "
import torch, torch.nn.functional as F, longattn
q, k, v = (torch.randn(1, 16384, 32, 128, device='cuda', dtype=torch.bfloat16) for _ in range(3))
g = F.logsigmoid(torch.randn(1, 16384, 32, device='cuda')) / 16
for _ in range(2): longattn.chunk_simple_gla(q, k, v, g)
torch.cuda.synchronize()" > "$OUT/ncu_lin_fwd.txt" 2>&1; echo "ncu rc=$?"
  grep -E "Duration|Throughput|Achieved Occupancy|Stall|Warp Cycles|Registers|Eligible|Issued|Pipe|Spill|Executed Ipc" "$OUT/ncu_lin_fwd.txt" | head -40
fi
