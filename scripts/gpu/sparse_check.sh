#!/usr/bin/env bash
# Dynamic sparse prefill on the device machine (issue 15's GPU part). Expects the stripped CLI as
# .dev/longattn.xz (carried; LONGATTN_XZ names another).
#   bash scripts/gpu/sparse_check.sh checks    # selftest group sparse (vertical-slash, lowbit, refusals)
#   bash scripts/gpu/sparse_check.sh memcheck  # compute-sanitizer memcheck over the quick lowbit cases
#   bash scripts/gpu/sparse_check.sh bench     # longattn bench --backend cuda --sparse (SPARSE_SPECS, SPARSE_LENS)
#   bash scripts/gpu/sparse_check.sh columns   # the gathered form of `columns` (sparse::columns): selftest group
#                                              # columns, memcheck over its quick cases, pytest's columns /
#                                              # gathered / sparse-gradient CUDA tests (wheel in .dev-wheels/), bench (COLUMNS_LENS, COLUMNS_INPUTS:
#                                              # structured and / or sharp)
#   bash scripts/gpu/sparse_check.sh gather    # selftest group gather: the gathered forward and the backward
#                                              # through a gathered selection (BwdPlan::with_gather)
#   bash scripts/gpu/sparse_check.sh columns_ncu   # Nsight Compute on one launch of each estimator kernel
#                                              # (cl_hist, cl_emit_stored, cl_check_lse, cl_check) at
#                                              # NCU_LEN (default 16k), sharp inputs, COLUMNS_SPEC's first spec
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
# unpacked on every call: a warm machine keeps /tmp from the call before, with its older binary
xz -dc "${LONGATTN_XZ:-.dev/longattn.xz}" > /tmp/longattn && chmod +x /tmp/longattn
for what in "${@:-checks}"; do
case "$what" in
checks)
  timeout 300 /tmp/longattn selftest --backend cuda --filter sparse --jobs 4 > "$OUT/selftest_sparse.txt" 2>&1
  echo "selftest sparse rc=$?"; grep -vE " pass " "$OUT/selftest_sparse.txt" | tail -30
  grep -E "lowbit" "$OUT/selftest_sparse.txt" | head -40
  ;;
memcheck)
  timeout 300 compute-sanitizer --tool memcheck /tmp/longattn selftest --backend cuda --quick --filter lowbit \
    > "$OUT/memcheck_sparse.txt" 2>&1
  echo "memcheck rc=$?"; grep -E "ERROR SUMMARY|passed|failed" "$OUT/memcheck_sparse.txt" | tail -5
  ;;
bench)
  SPECS=${SPARSE_SPECS:-"lowbit(tau=0.05,dense_below=0);lowbit(tau=0.3,dense_below=0);vertical_slash(v=32,s=16,local=128,dense_below=0)"}
  timeout 400 /tmp/longattn bench --backend cuda --sparse "$SPECS" --lens "${SPARSE_LENS:-16k,64k,128k}" \
    > "$OUT/sparse_bench.txt" 2>&1
  echo "sparse bench rc=$?"; cat "$OUT/sparse_bench.txt" | tail -40
  ;;
columns)
  timeout 300 /tmp/longattn selftest --backend cuda --filter columns --jobs 8 > "$OUT/selftest_columns.txt" 2>&1
  echo "selftest columns rc=$?"; grep -vE " pass " "$OUT/selftest_columns.txt" | cut -c1-260 | tail -30
  timeout 300 compute-sanitizer --tool memcheck /tmp/longattn selftest --backend cuda --quick --filter columns \
    > "$OUT/memcheck_columns.txt" 2>&1
  echo "memcheck rc=$?"; grep -E "ERROR SUMMARY|passed|failed" "$OUT/memcheck_columns.txt" | tail -5
  if ls .dev-wheels/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .dev-wheels/*.whl >/dev/null
    PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} timeout 200 python3 -m pytest -q -ra crates/longattn-py/tests \
      --ignore=crates/longattn-py/tests/test_hf.py -k "columns or gathered or device_selection" -p no:cacheprovider \
      > "$OUT/pytest_columns.txt" 2>&1; echo "pytest rc=$?"; tail -8 "$OUT/pytest_columns.txt"
  fi
  SPEC=${COLUMNS_SPEC:-"columns(gamma=0.97,rows=4,check=0.92,block=128,sink=4,local=64,dense_below=0)"}
  for inputs in ${COLUMNS_INPUTS:-structured}; do
    timeout 400 /tmp/longattn bench --backend cuda --sparse "$SPEC" --lens "${COLUMNS_LENS:-16k,64k,128k}" \
      --inputs "$inputs" > "$OUT/columns_bench_$inputs.txt" 2>&1
    echo "columns bench ($inputs) rc=$?"; tail -30 "$OUT/columns_bench_$inputs.txt"
  done
  ;;
gather)
  timeout 300 /tmp/longattn selftest --backend cuda --filter gather --jobs 8 > "$OUT/selftest_gather.txt" 2>&1
  echo "selftest gather rc=$?"; grep -vE " pass " "$OUT/selftest_gather.txt" | cut -c1-260 | tail -30
  grep -E "backward" "$OUT/selftest_gather.txt" | cut -c1-200 | head -20
  ;;
columns_ncu)
  SPEC=${COLUMNS_SPEC:-"columns(gamma=0.97,rows=4,check=0.92,block=128,sink=4,local=64,dense_below=0)"}
  timeout 300 ncu --clock-control none --kernel-name regex:"cl_hist|cl_emit_stored|cl_check_lse|cl_check" \
    --launch-count 4 --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    /tmp/longattn bench --backend cuda --sparse "${SPEC%%;*}" --lens "${NCU_LEN:-16k}" --inputs sharp \
    > "$OUT/ncu_columns.txt" 2>&1
  echo "ncu rc=$?"; grep -E "^  cl_|Duration|Compute \(SM\) Throughput|Memory Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy|Block Limit|Warp Cycles Per Issued|Stall|Dynamic Shared" "$OUT/ncu_columns.txt" | head -80
  ;;
esac
done
