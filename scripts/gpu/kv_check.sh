#!/usr/bin/env bash
# KV-cache compression on the device machine (issue 16's GPU part). Expects the stripped CLI as
# .dev/longattn.xz (carried); FlashInfer from .peers/flashinfer + .peers/light (carried with
# .peers/install.sh) for the peer rows.
#   bash scripts/gpu/kv_check.sh checks   # selftest groups kv, decode (ragged ...), sparse
#   bash scripts/gpu/kv_check.sh bench    # longattn kv bench with SDPA and FlashInfer
#   bash scripts/gpu/kv_check.sh memcheck # compute-sanitizer memcheck over the kv group
#   bash scripts/gpu/kv_check.sh ahead    # the page read one copy ahead (opt-in,
#                                         # LONGATTN_CUDA_DECODE_PAGE_AHEAD=1): the decode selftest
#                                         # groups with it, then kv bench (no peers) without / with
#   bash scripts/gpu/kv_check.sh scores   # press scores: selftest, then the bench's accumulation
#                                         # rows with the Hopper kernel (the default) and with
#                                         # the generic one (LONGATTN_CUDA_SCORE_WG=0)
#   bash scripts/gpu/kv_check.sh ab       # the score fold's resident rows, the Hopper fold's
#                                         # four-item turn, Quest's register select (defaults since
#                                         # 2026-12-07) against the former kernels: selftest, kv bench
#                                         # A / B, Quest's register path around its threshold
#   bash scripts/gpu/kv_check.sh quest    # Quest's score kernel (pages per lane group, LQ_SPP):
#                                         # selftest kv, kv bench against one page a group
#                                         # (LONGATTN_CUDA_QUEST_SPP=1), ncu (QUEST_NCU=0: none)
#   bash scripts/gpu/kv_check.sh splits   # the full decode at SPLIT_CONFIGS with the split count
#                                         # forced to each of SPLITS (LONGATTN_CUDA_DECODE=0,S)
#   bash scripts/gpu/kv_check.sh ncu_fold # Nsight Compute on the per-head decode without / with H2O's
#                                         # fold (32 x 8k): throughput, instructions, stalls
#   bash scripts/gpu/kv_check.sh ncu_colscore # Nsight Compute on H2O's full accumulation (one
#                                         # la_kv_colscore launch at 32 x 8k): pipes, L2, stalls
#   bash scripts/gpu/kv_check.sh unswitch # H2O's accumulation with the mask's test only in
#                                         # items on the diagonal (default) against every item
#                                         # (LONGATTN_CUDA_SCORE_UNSWITCH=0): selftest, kv bench A / B
#   bash scripts/gpu/kv_check.sh fold     # H2O's fold in the decode as a reduction at L2 (default)
#                                         # against the copy of the old scores
#                                         # (LONGATTN_CUDA_DECODE_FOLD_RED=0): selftest, kv bench
#   bash scripts/gpu/kv_check.sh prefix   # Quest's register select from the keys' first differing
#                                         # bit with an early stop (default) against four fixed
#                                         # passes (LONGATTN_CUDA_QUEST_PREFIX=0): selftest kv, kv
#                                         # bench A / B (with the fold's paired rows and the SM clock
#                                         # sampled beside), ncu of the score / select kernels
#   bash scripts/gpu/kv_check.sh ncu      # Nsight Compute: Quest's score / select (1 x 128k), the
#                                         # SnapKV window's fold (32 x 8k)
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
# unpacked on every call: a warm machine keeps /tmp from the call before, with its older binary
xz -dc .dev/longattn.xz > /tmp/longattn && chmod +x /tmp/longattn
for what in "${@:-checks}"; do
case "$what" in
checks)
  timeout 240 /tmp/longattn selftest --backend cuda --filter kv > "$OUT/selftest_kv.txt" 2>&1
  echo "selftest kv rc=$?"; grep -vE " pass " "$OUT/selftest_kv.txt" | tail -30
  for f in ragged split long softcap append contiguous refuses; do
    timeout 120 /tmp/longattn selftest --backend cuda --filter "$f" > "$OUT/selftest_dec_$f.txt" 2>&1
    echo "selftest $f rc=$?"; tail -2 "$OUT/selftest_dec_$f.txt"
  done
  timeout 240 /tmp/longattn selftest --backend cuda --filter sparse > "$OUT/selftest_sparse.txt" 2>&1
  echo "selftest sparse rc=$?"; tail -3 "$OUT/selftest_sparse.txt"
  ;;
bench)
  # the carried bundles of the two (FlashInfer's peer rows need only `flashinfer`)
  bundles=""; for x in flashinfer light; do [ -d .peers/$x ] && bundles="$bundles $x"; done
  if [ -n "$bundles" ]; then E=$(bash .peers/install.sh $bundles) && eval "$E"; fi
  timeout 400 /tmp/longattn kv bench ${KV_BENCH_ARGS:-} > "$OUT/kv_bench.txt" 2>&1
  echo "kv bench rc=$?"; cat "$OUT/kv_bench.txt" | grep -v "^kv bench " | tail -60
  ;;
ahead)
  for f in kv ragged split long softcap; do
    LONGATTN_CUDA_DECODE_PAGE_AHEAD=1 timeout 240 /tmp/longattn selftest --backend cuda --filter "$f" \
      > "$OUT/selftest_ahead_$f.txt" 2>&1
    echo "selftest $f (page ahead) rc=$?"; grep -vE " pass " "$OUT/selftest_ahead_$f.txt" | tail -3
  done
  for a in 0 1 0 1; do
    LONGATTN_CUDA_DECODE_PAGE_AHEAD=$a timeout 300 /tmp/longattn kv bench --compare none \
      --configs ${AHEAD_CONFIGS:-32x8k,1x128k,8x128k} > "$OUT/kv_bench_ahead$a.txt" 2>&1
    echo "kv bench (LONGATTN_CUDA_DECODE_PAGE_AHEAD=$a) rc=$?"
    grep -E "tokens,|^\| (full|per-head)" "$OUT/kv_bench_ahead$a.txt" | head -12
  done
  ;;
scores)
  timeout 300 /tmp/longattn selftest --backend cuda --filter "kv scores" --jobs 6 > "$OUT/selftest_scores.txt" 2>&1
  echo "selftest kv scores rc=$?"; cat "$OUT/selftest_scores.txt" | tail -25
  for wg in 1 0; do
    LONGATTN_CUDA_SCORE_WG=$wg timeout 300 /tmp/longattn kv bench --compare none \
      --configs ${SCORE_CONFIGS:-32x8k,1x128k} > "$OUT/kv_bench_scores_wg$wg.txt" 2>&1
    echo "kv bench (LONGATTN_CUDA_SCORE_WG=$wg) rc=$?"
    grep -E "config|accumulation|prefill forward|window scores" "$OUT/kv_bench_scores_wg$wg.txt"
  done
  ;;
ab)
  # The score fold's resident rows, the Hopper fold's four-item turn and Quest's register select
  # (defaults since 2026-12-07) against the former kernels (LONGATTN_CUDA_SCORE_RESIDENT=0,
  # LONGATTN_CUDA_SCORE_PIPE=2, LONGATTN_CUDA_QUEST_REG_MIN=8192): the kv selftest group with
  # the defaults, then kv bench (no peers) alternating, twice; then Quest's register path
  # from every length (REG_MIN=0) against none at the lengths around its threshold
  OLD="LONGATTN_CUDA_SCORE_RESIDENT=0 LONGATTN_CUDA_SCORE_PIPE=2 LONGATTN_CUDA_QUEST_REG_MIN=8192"
  timeout 200 /tmp/longattn selftest --backend cuda --filter kv --jobs 12 > "$OUT/selftest_kv.txt" 2>&1
  echo "selftest kv rc=$?"; grep -vE " pass " "$OUT/selftest_kv.txt" | tail -4
  for it in ${AB_RUNS:-1 2}; do
    for v in default "$OLD"; do
      tag=$(echo "$v" | cut -c1-20 | tr -c 'A-Za-z0-9\n' _)
      envs="X=0"; [ "$v" != default ] && envs="$v"
      env $envs timeout 120 /tmp/longattn kv bench --compare none --configs ${AB_CONFIGS:-32x8k,1x128k} \
        > "$OUT/kv_bench_${tag}_$it.txt" 2>&1
      echo "== kv bench ($v, $it) rc=$?"
      grep -E "^\| (full paged|decode \+|quest\(|h2o|snapkv|causal)" "$OUT/kv_bench_${tag}_$it.txt" | cut -d'|' -f2-3
    done
  done
  for m in ${REG_MINS:-0 8192 0 8192}; do
    LONGATTN_CUDA_QUEST_REG_MIN=$m timeout 120 /tmp/longattn kv bench --compare none \
      --configs ${REG_CONFIGS:-32x8k,1x32k,1x64k,1x128k} > "$OUT/kv_bench_regmin$m.txt" 2>&1
    echo "== kv bench (LONGATTN_CUDA_QUEST_REG_MIN=$m) rc=$?"
    grep -E "tokens,|^\| quest\(0.2\) score" "$OUT/kv_bench_regmin$m.txt" | cut -d'|' -f1-3 | cut -c1-60
  done
  ;;
fold)
  # H2O's fold inside the decode as a reduction at L2 (the default) against the copy of the old
  # scores with the tile (LONGATTN_CUDA_DECODE_FOLD_RED=0): the kv selftest group, then kv bench
  # (no peers) in turn, FOLD_RUNS times
  timeout 200 /tmp/longattn selftest --backend cuda --filter kv --jobs 12 > "$OUT/selftest_kv.txt" 2>&1
  echo "selftest kv rc=$?"; grep -vE " pass " "$OUT/selftest_kv.txt" | tail -4
  for it in ${FOLD_RUNS:-1 2}; do
    for r in 1 0; do
      LONGATTN_CUDA_DECODE_FOLD_RED=$r timeout 150 /tmp/longattn kv bench --compare none \
        --configs ${FOLD_CONFIGS:-32x8k,1x128k} > "$OUT/kv_bench_red${r}_$it.txt" 2>&1
      echo "== kv bench (LONGATTN_CUDA_DECODE_FOLD_RED=$r, $it) rc=$?"
      grep -E "tokens,|host-bound|^\| (full paged|full per-head|decode \+)" "$OUT/kv_bench_red${r}_$it.txt" | cut -d'|' -f1-3 | cut -c1-80
    done
  done
  ;;
ncu)
  # Nsight Compute on the kernels of two rows: Quest's score and select at 1 x 128k, and the
  # SnapKV window's fold at 32 x 8k (la_kv_score launches past the decode step's H2O row)
  # and the full paged decode at 1 x 128k (its first launches: the bench's base row)
  for spec in ${NCU_SPECS:-"1x128k regex:la_quest_s 0 4" "32x8k regex:^la_kv_score$ 200 2" "1x128k regex:^la_decode 0 2"}; do
    read -r cfg kn skip cnt <<< "$spec"
    tag=$(echo "$cfg$kn" | tr -c 'A-Za-z0-9\n' _)
    timeout 240 ncu --kernel-name "$kn" --launch-skip "$skip" --launch-count "$cnt" \
      --section SpeedOfLight --section Occupancy --section LaunchStats \
      /tmp/longattn kv bench --compare none --configs "$cfg" > "$OUT/ncu_$tag.txt" 2>&1
    echo "ncu $cfg $kn rc=$?"
    grep -E "la_quest|la_kv_score|la_decode|Duration|DRAM Throughput|Memory Throughput|Compute \(SM\) Thr|Achieved Occupancy|Registers Per|Grid Size|Block Size|Dynamic Shared" "$OUT/ncu_$tag.txt" | head -40
  done
  ;;
quest)
  timeout 200 /tmp/longattn selftest --backend cuda --filter kv --jobs 12 > "$OUT/selftest_kv.txt" 2>&1
  echo "selftest kv rc=$?"; grep -vE " pass " "$OUT/selftest_kv.txt" | tail -6; grep -E "quest" "$OUT/selftest_kv.txt" | grep -E "register|ties" | cut -c1-200
  for it in 1 2; do
    for v in default "LONGATTN_CUDA_QUEST_SPP=1"; do
      envs="X=0"; [ "$v" != default ] && envs="$v"
      env $envs timeout 120 /tmp/longattn kv bench --compare none --configs ${QUEST_CONFIGS:-1x128k,8x128k,32x8k} \
        > "$OUT/kv_bench_quest_${it}_${#v}.txt" 2>&1
      echo "== kv bench ($v, $it) rc=$?"
      grep -E "tokens,|^\| (full paged|quest\()" "$OUT/kv_bench_quest_${it}_${#v}.txt" | cut -d'|' -f1-3 | cut -c1-70
    done
  done
  if [ "${QUEST_NCU:-1}" != 0 ]; then
    timeout 200 ncu --kernel-name regex:la_quest_s --launch-skip 0 --launch-count 4 --section SpeedOfLight \
      /tmp/longattn kv bench --compare none --configs 1x128k > "$OUT/ncu_quest_new.txt" 2>&1
    echo "ncu quest rc=$?"; grep -E "la_quest|Duration|DRAM Throughput" "$OUT/ncu_quest_new.txt" | head -12
  fi
  ;;
splits)
  for sp in ${SPLITS:-0 33 44 66 99 132}; do
    LONGATTN_CUDA_DECODE=0,$sp timeout 120 /tmp/longattn kv bench --compare none \
      --configs ${SPLIT_CONFIGS:-1x128k,8x128k} > "$OUT/kv_bench_split$sp.txt" 2>&1
    echo "== kv bench (splits $sp; 0 = planned) rc=$?"
    grep -E "tokens,|^\| (full paged|evict to 0.2 \(|quest\(0.2,)" "$OUT/kv_bench_split$sp.txt" | cut -d'|' -f1-3 | cut -c1-70
  done
  ;;
ncu_fold)
  # Nsight Compute on the decode of the per-head cache without and with H2O's fold (32 x 8k, the
  # bench's la_decode launches: 143 of the paged row, 143 of the per-head row, then the fold's)
  for sk in 143 286; do
    timeout 240 ncu --kernel-name la_decode --launch-skip $sk --launch-count 1 \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
      --section InstructionStats --section LaunchStats \
      /tmp/longattn kv bench --compare none --configs 32x8k > "$OUT/ncu_fold_$sk.txt" 2>&1
    echo "ncu la_decode launch $sk rc=$?"
    grep -E "Duration|DRAM Throughput|Memory Throughput|L2 Cache Throughput|Executed Ipc A|Issue Slots Busy|Executed Instructions  |Warp Cycles Per Issued|Registers Per|Stall|L2 Hit|Mem Busy|Max Bandwidth" "$OUT/ncu_fold_$sk.txt" | head -30
  done
  ;;
ncu_colscore)
  timeout 300 ncu --kernel-name regex:la_kv_colscore --launch-skip 1 --launch-count 1 \
    --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
    --section WarpStateStats --section Occupancy --section InstructionStats \
    /tmp/longattn kv bench --compare none --configs 32x8k > "$OUT/ncu_colscore.txt" 2>&1
  echo "ncu colscore rc=$?"
  grep -E "la_kv_colscore|Duration|Throughput|Pipe|Issue Slots|Executed Ipc|L2 Hit|Stall|Warp Cycles|Occupancy|Registers" "$OUT/ncu_colscore.txt" | head -50
  ;;
unswitch)
  timeout 200 /tmp/longattn selftest --backend cuda --filter "kv scores" --jobs 8 > "$OUT/selftest_scores.txt" 2>&1
  echo "selftest kv scores rc=$?"; grep -vE " pass " "$OUT/selftest_scores.txt" | tail -3
  for it in 1 2; do
    for u in 1 0; do
      LONGATTN_CUDA_SCORE_UNSWITCH=$u timeout 200 /tmp/longattn kv bench --compare none --configs ${UNSWITCH_CONFIGS:-32x8k,1x128k} \
        > "$OUT/kv_bench_unswitch${u}_$it.txt" 2>&1
      echo "== kv bench (unswitch $u, $it) rc=$?"
      grep -E "tokens,|accumulation|prefill forward" "$OUT/kv_bench_unswitch${u}_$it.txt" | cut -d'|' -f1-3 | cut -c1-110
    done
  done
  ;;
prefix)
  timeout 200 /tmp/longattn selftest --backend cuda --filter kv --jobs 12 > "$OUT/selftest_kv.txt" 2>&1
  echo "selftest kv rc=$?"; grep -vE " pass " "$OUT/selftest_kv.txt" | tail -4
  grep -E "quest" "$OUT/selftest_kv.txt" | grep -E "register|ties|tied" | cut -c1-160 | head -8
  nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv,noheader \
    -lms 100 > "$OUT/clocks.csv" 2>&1 &
  smi=$!
  for it in ${PREFIX_RUNS:-1 2}; do
    for x in 1 0; do
      LONGATTN_CUDA_QUEST_PREFIX=$x timeout 200 /tmp/longattn kv bench --compare none \
        --configs ${PREFIX_CONFIGS:-1x128k,8x128k,32x8k} > "$OUT/kv_bench_prefix${x}_$it.txt" 2>&1
      echo "== kv bench (prefix $x, $it) rc=$?"
      grep -E "tokens,|^\| (full p|decode \+|per-head decode|quest\()" "$OUT/kv_bench_prefix${x}_$it.txt" \
        | cut -d'|' -f1-3 | cut -c1-90
    done
  done
  kill $smi 2>/dev/null
  awk -F', ' '{print $2}' "$OUT/clocks.csv" | sort | uniq -c | sort -rn | head -5
  if [ "${QUEST_NCU:-1}" = 1 ]; then
    for x in 1 0; do
      LONGATTN_CUDA_QUEST_PREFIX=$x timeout 200 ncu --kernel-name regex:la_quest_s --launch-skip 0 --launch-count 4 \
        --section SpeedOfLight --section WarpStateStats --section MemoryWorkloadAnalysis \
        /tmp/longattn kv bench --compare none --configs 1x128k > "$OUT/ncu_quest_prefix$x.txt" 2>&1
      echo "ncu quest (prefix $x) rc=$?"
      grep -E "la_quest|Duration|DRAM Throughput|Stall Long|Warp Cycles Per Issued|L2 Hit" "$OUT/ncu_quest_prefix$x.txt" | head -16
    done
  fi
  ;;
memcheck)
  timeout 400 compute-sanitizer --tool memcheck /tmp/longattn selftest --backend cuda --filter kv \
    > "$OUT/memcheck_kv.txt" 2>&1
  echo "memcheck rc=$?"; grep -E "ERROR SUMMARY|passed|failed" "$OUT/memcheck_kv.txt" | tail -5
  ;;
esac
done
