#!/usr/bin/env bash
# Gathered keys in the CUDA forward (FwdPlan::with_gather, LA_GATHER in attn_fwd_ws.cu) on the
# device machine. Expects the stripped CLI as .dev/longattn.xz (carried).
#   bash scripts/gpu/gather_check.sh checks  # selftest group gather, memcheck over its quick
#                                            # cases, selftest --quick
#   bash scripts/gpu/gather_check.sh bench   # longattn bench --backend cuda --gather: the
#                                            # gathered forward against our dense causal one
#                                            # (GATHER_P, GATHER_LENS, GATHER_DIMS)
#   bash scripts/gpu/gather_check.sh ncu     # Nsight Compute on the dense and the gathered
#                                            # forward at 16k, every key gathered (P 1)
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
xz -dc .dev/longattn.xz > /tmp/longattn && chmod +x /tmp/longattn
for what in "${@:-checks}"; do
case "$what" in
checks)
  timeout 300 /tmp/longattn selftest --backend cuda --filter gather --jobs 8 > "$OUT/selftest_gather.txt" 2>&1
  echo "selftest gather rc=$?"; grep -E "^gather|passed|failed" "$OUT/selftest_gather.txt" | cut -c1-230 | tail -24
  timeout 300 compute-sanitizer --tool memcheck /tmp/longattn selftest --backend cuda --filter gather --quick \
    > "$OUT/memcheck_gather.txt" 2>&1
  echo "memcheck rc=$?"; grep -E "ERROR SUMMARY|passed|failed" "$OUT/memcheck_gather.txt" | tail -3
  timeout 400 /tmp/longattn selftest --backend cuda --quick --jobs 8 > "$OUT/selftest_quick.txt" 2>&1
  echo "selftest quick rc=$?"; grep -E "FAIL|passed|failed" "$OUT/selftest_quick.txt" | cut -c1-200 | tail -8
  ;;
bench)
  timeout 500 /tmp/longattn bench --backend cuda --gather "${GATHER_P:-0,0.05,0.1,0.2,0.4,1}" \
    --lens "${GATHER_LENS:-16k,64k,128k}" --dims "${GATHER_DIMS:-128}" --out "$OUT/bench_gather" \
    > "$OUT/bench_gather.txt" 2>&1
  echo "bench gather rc=$?"; tail -20 "$OUT/bench_gather.txt"
  ;;
ncu)
  # Launches 23-24: the P 1 row's dense and gathered warm-up launches (after the tiles row's 2 + 2 x 10).
  timeout 300 ncu --section SpeedOfLight --section WarpStateStats --section MemoryWorkloadAnalysis \
    --section SchedulerStats -k regex:la_attn_fwd_ws --launch-skip 22 -c 2 \
    /tmp/longattn bench --backend cuda --gather 1 --lens 16k --reps 1 --out "$OUT/bench_ncu" > "$OUT/ncu_gather.txt" 2>&1
  echo "ncu rc=$?"; grep -E "attn_fwd_ws|Duration|Compute \(SM\) Throughput|Memory Throughput|L1/TEX Hit|L2 Hit|Issued Warp|No Eligible|Stall|Warp Cycles Per Issued" "$OUT/ncu_gather.txt" | head -40
  ;;
esac
done
