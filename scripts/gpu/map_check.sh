#!/usr/bin/env bash
# The pooled attention map of the CUDA forward (FwdPlan::with_map, LA_MAP in attn_fwd_ws.cu) on
# the device machine. Expects the stripped CLI as .dev/longattn.xz and the wheel in .dev-wheels/
# (both carried).
#   bash scripts/gpu/map_check.sh checks  # selftest group map, pytest's CUDA map tests, memcheck
#   bash scripts/gpu/map_check.sh bench   # longattn bench --backend cuda --map: the forward with
#                                         # the map against the plain one, in turns (MAP_BLOCK,
#                                         # MAP_LENS, MAP_DIMS, MAP_MASKS)
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
xz -dc .dev/longattn.xz > /tmp/longattn && chmod +x /tmp/longattn
for what in "${@:-checks}"; do
case "$what" in
checks)
  timeout 300 /tmp/longattn selftest --backend cuda --filter map --jobs 8 > "$OUT/selftest_map.txt" 2>&1
  echo "selftest map rc=$?"; grep -E "^map|passed|failed" "$OUT/selftest_map.txt" | cut -c1-230 | tail -24
  if ls .dev-wheels/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .dev-wheels/*.whl > /dev/null
    PYTHONPATH=/tmp/site timeout 200 python3 -m pytest -q crates/longattn-py/tests/test_attention.py \
      -k "attention_map" -p no:cacheprovider > "$OUT/pytest_map.txt" 2>&1
    echo "pytest map rc=$?"; tail -4 "$OUT/pytest_map.txt"
  fi
  timeout 300 compute-sanitizer --tool memcheck /tmp/longattn selftest --backend cuda --filter map --quick \
    > "$OUT/memcheck_map.txt" 2>&1
  echo "memcheck rc=$?"; grep -E "ERROR SUMMARY|passed|failed" "$OUT/memcheck_map.txt" | tail -3
  ;;
bench)
  timeout 500 /tmp/longattn bench --backend cuda --map "${MAP_BLOCK:-128}" --masks "${MAP_MASKS:-causal,full}" \
    --lens "${MAP_LENS:-4k,16k}" --dims "${MAP_DIMS:-64,128}" --dtypes bf16 --out "$OUT/bench_map" \
    > "$OUT/bench_map.txt" 2>&1
  echo "bench map rc=$?"; grep -E "pooled map|FAILED|error" "$OUT/bench_map.txt" "$OUT/bench_map"/*.md 2>/dev/null | tail -12
  ;;
esac
done
