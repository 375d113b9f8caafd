#!/usr/bin/env bash
# Dynamic sparse prefill on the device machine (issue 15's GPU part). Expects the stripped CLI as
# .dev/longattn.xz (carried).
#   bash scripts/gpu/sparse_check.sh checks    # selftest group sparse (vertical-slash, lowbit, refusals)
#   bash scripts/gpu/sparse_check.sh memcheck  # compute-sanitizer memcheck over the quick lowbit cases
#   bash scripts/gpu/sparse_check.sh bench     # longattn bench --backend cuda --sparse (SPARSE_SPECS, SPARSE_LENS)
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
# unpacked on every call: a warm machine keeps /tmp from the call before, with its older binary
xz -dc .dev/longattn.xz > /tmp/longattn && chmod +x /tmp/longattn
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
esac
done
