#!/usr/bin/env bash
# Dense softmax attention on the device machine against FlashAttention-4 (issue 14). Expects the
# stripped CLI as .dev/longattn.xz (carried); FA4 from .peers/fa4 with .peers/install.sh (carried,
# 55 MiB: it fits a call only with the tree and the compressed CLI).
#   bash scripts/gpu/dense_check.sh selftest  # selftest --backend cuda --quick --jobs 8 (every group;
#                                             # JOBS processes compile and run shares at once;
#                                             # FULL=1: every case, not the quick set)
#   bash scripts/gpu/dense_check.sh order     # forward TFLOP/s per head-group order
#                                             # (LONGATTN_CUDA_HGROUP; HGROUPS="1 2 4 16") at
#                                             # ORDER_LENS (16k,64k); SUSTAIN=S: `--sustain S`
#   bash scripts/gpu/dense_check.sh tiles     # forward TFLOP/s per tile config (LONGATTN_CUDA_WS;
#                                             # WS_CFGS, TILE_D, TILE_LENS)
#   bash scripts/gpu/dense_check.sh softmax   # forward TFLOP/s per softmax step
#                                             # (LONGATTN_CUDA_FWD_SOFTMAX=plain|fused|lazy; lazy the default) at 16k
#   bash scripts/gpu/dense_check.sh candidates  # the opt-in variants beside the defaults:
#                                             # selftest --quick --filter backward with
#                                             # LONGATTN_CUDA_BWD_DQ_ADD=red, then backward
#                                             # TFLOP/s (D 64 / 128) with bulk and red dQ adds
#   bash scripts/gpu/dense_check.sh ncu       # Nsight Compute on one forward launch per length
#                                             # (NCU_LENS, default 16k 64k; D 128 full): throughput
#                                             # of SM, DRAM and L2, L2 hit rate (where the 64k loss goes)
#   bash scripts/gpu/dense_check.sh ncu_fwd   # Nsight Compute on one forward launch of ours and
#                                             # one of FA4's per config (NCU_FWD="full:4k:64 ..."):
#                                             # stall reasons, issue slots, pipes (NCU_MEM=1:
#                                             # DRAM bytes and L2 hit rate instead)
#   bash scripts/gpu/dense_check.sh ncu_bwd   # Nsight Compute on one backward launch per config
#                                             # (NCU_BWD="full 16k 128" ...): stall reasons,
#                                             # issue slots, pipes, memory
#   bash scripts/gpu/dense_check.sh ncu_bwd_src  # Nsight Compute's per-instruction stall samples of
#                                             # one backward launch (NCU_SRC, default full:16k:128) as SASS CSV,
#                                             # xz-compressed: where the consumers wait
#   bash scripts/gpu/dense_check.sh ncu_fa4_bwd  # the same sections on FA4's backward kernel
#   bash scripts/gpu/dense_check.sh bwd_ab    # backward TFLOP/s of each binary in BINS, and of the
#                                             # first under each environment in VARIANTS
#                                             # (AB_PASS=fwd: the forward's, e.g. VARIANTS=
#                                             # LONGATTN_CUDA_FWD_DESC=add)
#   bash scripts/gpu/dense_check.sh bwd_parts # the backward's three kernels timed apart (Nsight
#                                             # Compute), per binary in BINS and config in NCU_BWD
#   bash scripts/gpu/dense_check.sh knock     # backward TFLOP/s with parts of the kernel dropped
#                                             # (LONGATTN_CUDA_BWD_KNOCK; wrong gradients, timing
#                                             # only) and with LONGATTN_CUDA_BWD_ORDER=dk_first
#   bash scripts/gpu/dense_check.sh skip      # skip-softmax: selftest group, bench on planted /
#                                             # structured inputs against the dense forward,
#                                             # votes read early (default) and late (opt-in)
#   bash scripts/gpu/dense_check.sh ncu_skip  # Nsight Compute on the forward with and without
#                                             # skip-softmax (its cost when nothing is dropped)
#   bash scripts/gpu/dense_check.sh fwd       # bench forward 4k..64k, full / causal, D 64 / 128,
#                                             # with FA4 and cuDNN in the same run
#   bash scripts/gpu/dense_check.sh bwd       # the same for the backward at 4k / 16k
#                                             # (fwd, bwd: SANDWICH=1 times ours again after the
#                                             # peers, `bench --sandwich`; SUSTAIN=S runs every
#                                             # kernel S seconds before its timing, `--sustain`:
#                                             # the clock of sustained load, not of a burst)
#   bash scripts/gpu/dense_check.sh power     # the forward under sustained load (ours, FA4; 16k,
#                                             # 64k; POWER_SECS s each) with nvidia-smi's SM clock,
#                                             # power and clock-event reasons per phase
#   bash scripts/gpu/dense_check.sh parity    # ours (the Python package, carried as fa4_env says)
#                                             # and FA4 timed by one do_bench in one process,
#                                             # forward and backward (fa4_parity.py; PARITY_LENS,
#                                             # ROUNDS, CLOCKS=1)
#   bash scripts/gpu/dense_check.sh racecheck # compute-sanitizer racecheck over the backward's
#                                             # quick selftest, with the default hand-back of a Q / dO
#                                             # stage and with LONGATTN_CUDA_BWD_ARRIVE=all (every
#                                             # consumer thread arrives), then the backward's TFLOP/s
#                                             # of both (bwd_ab)
#   bash scripts/gpu/dense_check.sh racerepro # the reduced reproduction of the backward's racecheck
#                                             # report (scripts/gpu/racecheck_repro.cu, nvcc): the
#                                             # stage handed back by every thread, then by lane 0
#                                             # after __syncwarp() as the kernel does
#   bash scripts/gpu/dense_check.sh d256      # D 256: selftest cases (D 256, 192, 96, 80; skip), then
#                                             # the forward at 4k / 16k / 64k with FA4 and cuDNN, and
#                                             # the mma.sync kernel it replaces
# Several modes run in order: `bash scripts/gpu/dense_check.sh selftest order fwd bwd`.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
# unpacked on every call: a warm machine keeps /tmp from the call before, with its older binary
xz -dc .dev/longattn.xz > /tmp/longattn && chmod +x /tmp/longattn
fa4_env() {
  # The install's export line is kept in /tmp (with /tmp/site it outlives the call while the
  # machine stays warm): a next call need not carry the 55 MiB bundle again.
  if [ -z "${FA4_READY:-}" ] && [ -d .peers/fa4 ]; then
    E=$(bash .peers/install.sh fa4) && echo "$E" > /tmp/fa4_env.sh && eval "$E" && FA4_READY=1
  elif [ -z "${FA4_READY:-}" ] && [ -s /tmp/fa4_env.sh ]; then
    eval "$(cat /tmp/fa4_env.sh)" && FA4_READY=1
  fi
  # Our Python package beside FA4, carried in .dev-wheels/: the peers' script then times ours in
  # its own process too, before and after FA4 (bench's "in the peers' process" line). A wheel,
  # or, to fit 64 MiB with the FA4 bundle and the CLI, the installed package as an xz tar:
  #   python3 -m pip install --no-deps --target /tmp/pk .dev-wheels/*.whl &&
  #   tar -C /tmp/pk -cJf .dev-wheels/longattn.tar.xz longattn && rm .dev-wheels/*.whl
  if [ -z "${PKG_READY:-}" ] && ! python3 -c "import longattn" 2> /dev/null; then
    if ls .dev-wheels/*.whl > /dev/null 2>&1; then
      python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .dev-wheels/*.whl > /dev/null
    elif [ -s .dev-wheels/longattn.tar.xz ]; then
      mkdir -p /tmp/site && tar -C /tmp/site -xJf .dev-wheels/longattn.tar.xz
    fi
    case ":${PYTHONPATH:-}:" in *:/tmp/site:*) ;; *) export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} ;; esac
  fi
  PKG_READY=1  # looked for once per script run (importing the package loads torch)
}
for mode in "${@:-selftest}"; do
  case "$mode" in
  selftest)
    # FULL=1: every case, not the quick set (392 cases in 42 s with JOBS=14 on an H100).
    set_name=quick; quick=--quick; [ -n "${FULL:-}" ] && set_name=full && quick=""
    timeout 400 /tmp/longattn selftest --backend cuda $quick --jobs ${JOBS:-8} > "$OUT/selftest_$set_name.txt" 2>&1
    echo "selftest ($set_name) rc=$?"
    grep -vE " pass " "$OUT/selftest_$set_name.txt" | tail -15
    ;;
  order)
    # The report's rows: mask | n | D | B x H | ms | TFLOP/s.
    for g in ${HGROUPS:-1 2 16}; do
      echo "== LONGATTN_CUDA_HGROUP=$g"
      LONGATTN_CUDA_HGROUP=$g timeout 200 /tmp/longattn bench --backend cuda --masks full,causal \
        --lens ${ORDER_LENS:-16k,64k} --dims 128 ${SUSTAIN:+--sustain $SUSTAIN} --out "$OUT/order_$g" > /dev/null 2>&1
      grep -E "^\| (full|causal)" "$OUT/order_$g/report_cuda.md" | cut -d'|' -f2-7
    done 2>&1 | tee "$OUT/order.txt"
    echo "== default (one head at a time)" | tee -a "$OUT/order.txt"
    timeout 200 /tmp/longattn bench --backend cuda --masks full,causal --lens 4k,16k,64k --dims 64,128 \
      --out "$OUT/order_default" > /dev/null 2>&1
    grep -E "^\| (full|causal)" "$OUT/order_default/report_cuda.md" | cut -d'|' -f2-7 | tee -a "$OUT/order.txt"
    ;;
  tiles)
    # Forward TFLOP/s per warp-specialized tile config (LONGATTN_CUDA_WS=consumers,bc[,blocks]).
    for cfg in ${WS_CFGS:-3,128 2,128 3,64 2,64 1,128,2}; do
      echo "== D ${TILE_D:-64} LONGATTN_CUDA_WS=$cfg"
      LONGATTN_CUDA_WS=$cfg timeout 200 /tmp/longattn bench --backend cuda --masks full,causal \
        --lens ${TILE_LENS:-4k,16k} --dims ${TILE_D:-64} --out "$OUT/tiles_$cfg" > /dev/null 2>&1
      grep -E "^\| (full|causal)" "$OUT/tiles_$cfg/report_cuda.md" | cut -d'|' -f2-7
    done 2>&1 | tee "$OUT/tiles.txt"
    ;;
  softmax)
    for sm in plain fused lazy; do
      echo "== LONGATTN_CUDA_FWD_SOFTMAX=$sm"
      LONGATTN_CUDA_FWD_SOFTMAX=$sm timeout 200 /tmp/longattn bench --backend cuda --masks full,causal \
        --lens ${SM_LENS:-16k} --dims 64,128 --out "$OUT/softmax_$sm" > /dev/null 2>&1
      grep -E "^\| (full|causal)" "$OUT/softmax_$sm/report_cuda.md" | cut -d'|' -f2-7
    done 2>&1 | tee "$OUT/softmax.txt"
    ;;
  candidates)
    # The opt-in variants beside the defaults: dQ added by vector reductions from registers
    # (LONGATTN_CUDA_BWD_DQ_ADD=red): the backward cases, then the bench (one / red; the split
    # wait of S^T and dP^T, LONGATTN_CUDA_BWD_WAIT=split, measured 2026-12-05: not adopted).
    LONGATTN_CUDA_BWD_DQ_ADD=red timeout 400 /tmp/longattn selftest --backend cuda --quick \
      --filter backward --jobs ${JOBS:-8} > "$OUT/selftest_candidates.txt" 2>&1
    echo "selftest --quick --filter backward (dQ by red) rc=$?"
    grep -vE " pass " "$OUT/selftest_candidates.txt" | grep -v "^\[" | tail -15
    for w in bulk red; do
      echo "== LONGATTN_CUDA_BWD_DQ_ADD=$w"
      LONGATTN_CUDA_BWD_DQ_ADD=$w timeout 200 /tmp/longattn bench --backend cuda --backward \
        --masks full,causal --lens ${BLENS:-4k,16k} --dims 64,128 --out "$OUT/bwd_$w" > /dev/null 2>&1
      grep -E "^\| (full|causal)" "$OUT/bwd_$w/report_cuda.md" | cut -d'|' -f2-7
    done 2>&1 | tee "$OUT/candidates_bwd.txt"
    ;;
  ncu)
    for n in ${NCU_LENS:-16k 64k}; do
      echo "== ncu forward full n $n D 128"
      timeout 240 ncu --clock-control none --kernel-name la_attn_fwd_ws --launch-skip 4 --launch-count 1 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --metrics \
        lts__t_sector_hit_rate.pct,dram__bytes_read.sum,lts__t_bytes.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed,gpu__time_duration.sum \
        /tmp/longattn bench --backend cuda --masks full --lens "$n" --dims 128 --out "$OUT/ncu_$n" \
        > "$OUT/ncu_$n.txt" 2>&1
      echo "ncu rc=$?"
      grep -E "Duration|DRAM Throughput|L2 Cache Throughput|Compute \(SM\) Throughput|Memory Throughput|L2 Hit Rate|hit_rate|dram__bytes_read|lts__t_bytes|gpu__time_duration|==ERR|==WARN" "$OUT/ncu_$n.txt" | head -20
    done
    ;;
  ncu_fwd)
    # The forward against FA4's, side by side (issue 14): one launch of ours and one of FA4's
    # forward kernel (its third, from fa4_bwd.py's iterations) per config (NCU_FWD="full:4k:64"
    # ...) under the sections of ncu_bwd plus the pipes' instruction counts and utilization.
    fa4_env
    for cfg in ${NCU_FWD:-full:4k:64 causal:4k:64}; do
      set -- ${cfg//:/ }
      for who in ours fa4; do
        echo "== ncu $who forward $1 n $2 D $3"
        if [ $who = ours ]; then
          kn=la_attn_fwd_ws; skip=4
          cmd="/tmp/longattn bench --backend cuda --masks $1 --lens $2 --dims $3 --out $OUT/ncu_fwd_$1_$2_$3"
        else
          kn=regex:ForwardSm90; skip=2
          cmd="python3 scripts/gpu/fa4_bwd.py $1 $2 $3"
        fi
        if [ -n "${NCU_MEM:-}" ]; then
          # NCU_MEM=1: memory traffic only (DRAM bytes, L2 hit rate; energy the power cap
          # charges though a burst does not wait for it).
          what=(--metrics dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sector_hit_rate.pct,lts__t_bytes.sum,gpu__time_duration.sum)
        else
          what=(--section SpeedOfLight --section WarpStateStats --section SchedulerStats
            --section ComputeWorkloadAnalysis --section LaunchStats --section InstructionStats
            --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,regex:sm__pipe_.*(tensor|xu|fma|alu).*cycles_active\.avg\.pct_of_peak_sustained_active,regex:sm__inst_executed_pipe_(xu|fma|alu|fmaheavy|fmalite|tensor).*\.sum$')
        fi
        timeout 240 ncu --clock-control none --kernel-name $kn --launch-skip $skip --launch-count 1 \
          "${what[@]}" $cmd > "$OUT/ncu_fwd_${who}_$1_$2_$3.txt" 2>&1
        echo "ncu rc=$?"
        grep -E "dram__bytes|lts__t|gpu__time|Duration|Compute \(SM\) Throughput|Issue Slots Busy|Issued Warp|No Eligible|Eligible Warps|Registers|Executed Ipc A|Executed Instructions  |Grid Size|Block Size|pipe_|inst_executed_pipe|==ERR|No kernels" \
          "$OUT/ncu_fwd_${who}_$1_$2_$3.txt" | head -40
        grep -E "issue_stalled" "$OUT/ncu_fwd_${who}_$1_$2_$3.txt" | awk '{print $NF, $1}' | sort -gr | head -8
      done
    done
    ;;
  ncu_bwd)
    # Where the backward's time goes (issue 14): one la_bwd_wg launch per config under Nsight
    # Compute with the warp-state (stall reasons), scheduler, pipe and memory sections.
    for cfg in ${NCU_BWD:-full:16k:128 causal:16k:128}; do
      set -- ${cfg//:/ }
      echo "== ncu backward $1 n $2 D $3"
      timeout 240 ncu --clock-control none --kernel-name la_bwd_wg --launch-skip 4 --launch-count 1 \
        --section SpeedOfLight --section WarpStateStats --section SchedulerStats \
        --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section LaunchStats \
        --section Occupancy --section InstructionStats --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' \
        /tmp/longattn bench --backend cuda --backward --masks "$1" --lens "$2" \
        --dims "$3" --out "$OUT/ncu_bwd_$1_$2_$3" > "$OUT/ncu_bwd_$1_$2_$3.txt" 2>&1
      echo "ncu rc=$?"
      grep -E "Duration|Throughput|Issue Slots|Issued Warp|No Eligible|Active Warps|Eligible Warps|Registers|Executed Ipc|Executed Instructions  |L2 Hit|==ERR|==WARN" \
        "$OUT/ncu_bwd_$1_$2_$3.txt" | head -30
      # Stall reasons, largest first (warps stalled per issued instruction).
      grep -E "issue_stalled" "$OUT/ncu_bwd_$1_$2_$3.txt" | awk '{print $NF, $1}' | sort -gr | head -12
    done
    ;;
  ncu_fa4_bwd)
    # FlashAttention-4's backward under the same sections as ncu_bwd (NCU_BWD configs): its
    # main kernel (FlashAttentionBackwardSm90) of the third iteration.
    fa4_env
    for cfg in ${NCU_BWD:-full:16k:128 causal:16k:128}; do
      set -- ${cfg//:/ }
      echo "== ncu FA4 backward $1 n $2 D $3"
      timeout 240 ncu --clock-control none --kernel-name regex:BackwardSm90 --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section WarpStateStats --section SchedulerStats \
        --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section LaunchStats \
        --section Occupancy --section InstructionStats --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' \
        python3 scripts/gpu/fa4_bwd.py "$1" "$2" "$3" > "$OUT/ncu_fa4_bwd_$1_$2_$3.txt" 2>&1
      echo "ncu rc=$?"
      grep -E "^  [A-Za-z].*Backward|Duration|Throughput|Issue Slots|Issued Warp|No Eligible|Active Warps|Eligible Warps|Registers|Executed Ipc|Executed Instructions  |L2 Hit|Block Size|Grid Size|==ERR|==WARN|No kernels" \
        "$OUT/ncu_fa4_bwd_$1_$2_$3.txt" | head -32
      grep -E "issue_stalled" "$OUT/ncu_fa4_bwd_$1_$2_$3.txt" | awk '{print $NF, $1}' | sort -gr | head -12
    done
    ;;
  bwd_ab)
    # The backward's TFLOP/s (fast mode, full / causal, BLENS x D 64 / 128) of each binary in
    # BINS (xz files; default .dev/longattn.xz) and, for the first, of each variant in VARIANTS
    # (environment assignments joined by commas, e.g. LONGATTN_CUDA_BWD_DQ_ADD=warp): before /
    # after comparisons on one machine.
    first=1
    for bin in ${BINS:-.dev/longattn.xz}; do
      xz -dc "$bin" > /tmp/ab_bin && chmod +x /tmp/ab_bin
      vars="default"; [ $first = 1 ] && vars="default ${VARIANTS:-}"
      for a in $vars; do
        tag="$(basename "$bin" .xz)_$(echo "$a" | tr -c 'A-Za-z0-9_\n' _)"
        echo "== $bin $a"
        envs=""; [ "$a" != default ] && envs="$(echo "$a" | tr , ' ')"
        # AB_PASS=fwd compares forwards (4k / 16k / 64k) instead.
        if [ "${AB_PASS:-bwd}" = fwd ]; then pass=""; lens=${BLENS:-4k,16k,64k}; else pass="--backward"; lens=${BLENS:-4k,16k}; fi
        env $envs timeout 300 /tmp/ab_bin bench --backend cuda $pass --masks full,causal \
          --lens $lens --dims ${BDIMS:-64,128} --out "$OUT/ab_$tag" > "$OUT/ab_$tag.txt" 2>&1
        echo "rc=$?"; grep -E "^\| (full|causal)" "$OUT/ab_$tag/report_cuda.md" | cut -d'|' -f2-7
        grep -E "deterministic mode" "$OUT/ab_$tag.txt" | sed 's/: deterministic mode / det /; s/ (.*fast mode / fast /' | tr '\n' ';'; echo
      done
      first=0
    done
    ;;
  bwd_parts)
    # The backward's three kernels (la_bwd_prep, la_bwd_wg, la_bwd_dq_store) timed apart by
    # Nsight Compute, per binary in BINS and config in NCU_BWD (default full 4k D 64 and 128).
    for bin in ${BINS:-.dev/longattn.xz}; do
      xz -dc "$bin" > /tmp/parts_bin && chmod +x /tmp/parts_bin
      for cfg in ${NCU_BWD:-full:4k:64 full:4k:128}; do
        set -- ${cfg//:/ }
        echo "== $bin backward $1 n $2 D $3"
        timeout 200 ncu --clock-control none --kernel-name regex:'la_bwd_(prep|wg|dq_store)' --launch-skip 6 \
          --launch-count 3 --section SpeedOfLight /tmp/parts_bin bench --backend cuda --backward --masks "$1" \
          --lens "$2" --dims "$3" --out "$OUT/parts_$1_$2_$3" > "$OUT/parts_$(basename "$bin" .xz)_$1_$2_$3.txt" 2>&1
        echo "ncu rc=$?"
        grep -E "^  la_bwd|Duration|DRAM Throughput|==ERR" "$OUT/parts_$(basename "$bin" .xz)_$1_$2_$3.txt" | head -12
      done
    done
    ;;
  ncu_bwd_src)
    # One config, NCU_SRC="mask:n:D" (default full:16k:128).
    cfg=${NCU_SRC:-full:16k:128}
    set -- ${cfg//:/ }
    timeout 300 ncu --clock-control none --kernel-name la_bwd_wg --launch-skip 4 --launch-count 1 \
      --section SourceCounters --section WarpStateStats -o "$OUT/bwd_src" -f \
      /tmp/longattn bench --backend cuda --backward --masks "$1" --lens "$2" --dims "$3" \
      --out "$OUT/ncu_bwd_src" > "$OUT/ncu_bwd_src.txt" 2>&1
    echo "ncu rc=$?"; grep -E "==ERR|==WARN" "$OUT/ncu_bwd_src.txt" | head -5
    ncu --import "$OUT/bwd_src.ncu-rep" --page source --csv --print-source sass > "$OUT/bwd_sass.csv" 2>&1
    echo "source page rc=$? $(wc -l < "$OUT/bwd_sass.csv") lines"; head -c 600 "$OUT/bwd_sass.csv"; echo
    xz -9 -f "$OUT/bwd_sass.csv"; rm -f "$OUT/bwd_src.ncu-rep"
    ;;
  knock)
    # What each part of the backward costs: TFLOP/s (D 128, 16k) with parts dropped (bits of
    # LA_KNOCK: 1 dQ adds, 2 the whole dQ product, 4 exponentials and mask, 16 the consumers'
    # barrier), then the dK-first order (before 2026-12-05); gradients of the knocked runs are
    # wrong (the bench says so and does not check them).
    for k in ${KNOCKS:-0 1 2 4 16 6}; do
      echo "== LONGATTN_CUDA_BWD_KNOCK=$k"
      LONGATTN_CUDA_BWD_KNOCK=$k timeout 200 /tmp/longattn bench --backend cuda --backward \
        --masks full,causal --lens ${KLENS:-16k} --dims ${KDIMS:-128} --out "$OUT/knock_$k" > /dev/null 2>&1
      grep -E "^\| (full|causal)" "$OUT/knock_$k/report_cuda.md" | cut -d'|' -f2-7
    done 2>&1 | tee "$OUT/knock.txt"
    echo "== LONGATTN_CUDA_BWD_ORDER=dk_first"
    LONGATTN_CUDA_BWD_ORDER=dk_first timeout 200 /tmp/longattn bench --backend cuda --backward \
      --masks full,causal --lens ${KLENS:-16k} --dims ${KDIMS:-128} --out "$OUT/dk_first" > /dev/null 2>&1
    grep -E "^\| (full|causal)" "$OUT/dk_first/report_cuda.md" | cut -d'|' -f2-7
    ;;
  skip)
    # Skip-softmax in the forward (issue 15 item 7): the selftest group, then the kernel against
    # our dense forward (same schedule, timed in turn) on planted near / far keys and on
    # structured ones; each with the votes read before S_n (default) and after it
    # (LONGATTN_CUDA_SKIP_VOTES=late, opt-in).
    for votes in early late; do
      export LONGATTN_CUDA_SKIP_VOTES=$votes
      echo "== LONGATTN_CUDA_SKIP_VOTES=$votes"
      timeout 200 /tmp/longattn selftest --backend cuda --filter skip --jobs ${JOBS:-6} \
        > "$OUT/selftest_skip_$votes.txt" 2>&1
      echo "selftest skip rc=$?"; grep -E "^skip|cases" "$OUT/selftest_skip_$votes.txt" | cut -c1-230 | tail -4
      timeout 200 /tmp/longattn bench --backend cuda --sparse "${SKIP_PLANTED:-skip(factor=256)}" \
        --inputs planted --lens ${SKIP_LENS:-16k,64k} --dims 128 --out "$OUT/skip_planted_$votes" \
        > "$OUT/skip_planted_$votes.txt" 2>&1
      echo "bench planted rc=$?"; grep -E "^n |^input" "$OUT/skip_planted_$votes.txt" | cut -c1-190
      timeout 200 /tmp/longattn bench --backend cuda --sparse "${SKIP_STRUCTURED:-skip(factor=600)}" \
        --lens ${SKIP_LENS:-16k,64k} --dims 128 --out "$OUT/skip_structured_$votes" \
        > "$OUT/skip_structured_$votes.txt" 2>&1
      echo "bench structured rc=$?"; grep -E "^n |^input" "$OUT/skip_structured_$votes.txt" | cut -c1-190
    done
    unset LONGATTN_CUDA_SKIP_VOTES
    ;;
  ncu_skip)
    # Where skip-softmax's cost goes when nothing is dropped: the forward kernel with and without
    # LA_SKIP (16k causal D 128, structured inputs), issue slots and stall reasons side by side:
    # the bench launches the dense kernel and the skip variant in turn (warm-up, then one of each
    # per repetition), so launches 11 and 12 are a dense one and a skip one.
    for spec in "skip(factor=600)"; do
      timeout 240 ncu --clock-control none --kernel-name la_attn_fwd_ws --launch-skip 10 --launch-count 2 \
        --section SpeedOfLight --section WarpStateStats --section SchedulerStats \
        --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' \
        /tmp/longattn bench --backend cuda --sparse "$spec" --lens 16k --dims 128 \
        --out "$OUT/ncu_skip" > "$OUT/ncu_skip.txt" 2>&1
      echo "ncu rc=$?"
      grep -E "Duration|Issue Slots|Issued Warp|No Eligible|Eligible Warps|Executed Ipc|==ERR" "$OUT/ncu_skip.txt" | head -20
      grep -E "issue_stalled" "$OUT/ncu_skip.txt" | awk '{print $NF, $1}' | sort -gr | head -16
    done
    ;;
  fwd)
    fa4_env
    timeout 500 /tmp/longattn bench --backend cuda --masks full,causal --lens ${LENS:-4k,16k,64k} \
      --dims 64,128 --compare torch --peers ${PEERS:-sdpa_cudnn,fa4} ${SANDWICH:+--sandwich} ${SUSTAIN:+--sustain $SUSTAIN} \
      --out "$OUT/fwd${SUSTAIN:+_sustain}" > "$OUT/fwd${SUSTAIN:+_sustain}.txt" 2>&1
    echo "bench fwd rc=$?"
    sed -n '/^longattn bench/,$p' "$OUT/fwd${SUSTAIN:+_sustain}.txt" | head -40
    ;;
  bwd)
    fa4_env
    timeout 500 /tmp/longattn bench --backend cuda --backward --masks full,causal --lens ${BLENS:-4k,16k} \
      --dims 64,128 --compare torch --peers ${PEERS:-sdpa_cudnn,fa4} ${SANDWICH:+--sandwich} ${SUSTAIN:+--sustain $SUSTAIN} \
      --out "$OUT/bwd${SUSTAIN:+_sustain}" > "$OUT/bwd${SUSTAIN:+_sustain}.txt" 2>&1
    echo "bench bwd rc=$?"
    sed -n '/^longattn bench/,$p' "$OUT/bwd${SUSTAIN:+_sustain}.txt" | head -40
    ;;
  power)
    # The forward under sustained load (issue 14: 64k against 16k): ours (`bench --sustain`) and
    # FA4 (fa4_sustained.py) in turn at POWER_LENS (default 16k 64k), full D 128, for POWER_SECS
    # seconds each (default 4) with a pause between, while nvidia-smi samples the SM clock, the
    # power and the clock-event reasons every 100 ms; then each phase's medians.
    fa4_env
    nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,clocks_event_reasons.active,temperature.gpu \
      --format=csv,noheader,nounits -lms 100 > "$OUT/power_smi.csv" 2>&1 &
    smi=$!
    : > "$OUT/power_phases.txt"
    for n in ${POWER_LENS:-16k 64k}; do
      for who in ours fa4; do
        sleep 8
        t0=$(date +%s.%N)
        if [ $who = ours ]; then
          timeout 200 /tmp/longattn bench --backend cuda --masks ${POWER_MASK:-full} --lens $n --dims 128 \
            --sustain ${POWER_SECS:-4} --out "$OUT/power_$n" > "$OUT/power_ours_$n.txt" 2>&1
          grep -E "^\| ${POWER_MASK:-full}" "$OUT/power_$n/report_cuda.md" | cut -d'|' -f2-7
        else
          timeout 200 python3 scripts/gpu/fa4_sustained.py ${POWER_MASK:-full} $n 128 ${POWER_SECS:-4} 2>&1 | tail -1
        fi
        echo "$who $n $t0 $(date +%s.%N)" >> "$OUT/power_phases.txt"
      done
    done
    kill $smi
    python3 - "$OUT/power_smi.csv" "$OUT/power_phases.txt" <<'PY'
import statistics, sys
from datetime import datetime
rows = []
for line in open(sys.argv[1]):
    f = [x.strip() for x in line.split(",")]
    try:
        t = datetime.strptime(f[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
        rows.append((t, float(f[1]), float(f[2]), f[3], float(f[4])))
    except (ValueError, IndexError):
        pass
for line in open(sys.argv[2]):
    who, n, t0, t1 = line.split()
    # The phase's loaded samples (power at least half its peak: the kernel's run, not the
    # bench's checks on the host), after the first second (the ramp up to the power cap).
    s = [r for r in rows if float(t0) <= r[0] <= float(t1)]
    peak = max((r[2] for r in s), default=0.0)
    s = [r for r in s if r[2] >= peak / 2]
    s = [r for r in s if r[0] >= s[0][0] + 1.0] if s else s
    if s:
        reasons = sorted({r[3] for r in s})
        print(f"{who} {n}: {len(s)} samples, SM clock median {statistics.median(r[1] for r in s):.0f} MHz, "
              f"power median {statistics.median(r[2] for r in s):.0f} W, temp max {max(r[4] for r in s):.0f} C, "
              f"reasons {' '.join(reasons)}")
PY
    ;;
  parity)
    fa4_env
    PYTHONUNBUFFERED=1 timeout 400 python3 scripts/gpu/fa4_parity.py \
      --lens ${PARITY_LENS:-4k,16k} --rounds ${ROUNDS:-2} ${CLOCKS:+--clocks} 2>&1 | grep -v -i "warning\|exe_args" \
      | tee "$OUT/parity.txt"
    ;;
  racecheck)
    for a in default all; do
      envs=""; [ $a = all ] && envs="LONGATTN_CUDA_BWD_ARRIVE=all"
      env $envs timeout 240 compute-sanitizer --tool racecheck --target-processes all /tmp/longattn selftest \
        --backend cuda --quick --filter backward --jobs 8 > "$OUT/racecheck_$a.txt" 2>&1
      echo "== hand-back $a rc=$?"; grep -E "cases:|RACECHECK SUMMARY" "$OUT/racecheck_$a.txt"
      grep -oE "at [a-z_0-9]+\(.*\)\+0x[0-9a-f]+ in [a-z_0-9]+\.cu:[0-9]+" "$OUT/racecheck_$a.txt" \
        | sed 's/+0x[0-9a-f]*//' | sort | uniq -c | sort -rn | head -4
    done
    VARIANTS=LONGATTN_CUDA_BWD_ARRIVE=all BLENS=${BLENS:-4k,16k} bash "$0" bwd_ab
    ;;
  racerepro)
    nvcc -O2 -arch=sm_90a -DLA_F16=0 -I crates/longattn/src/cuda/kernels -o /tmp/race_repro \
      scripts/gpu/racecheck_repro.cu > "$OUT/racerepro_build.txt" 2>&1
    echo "nvcc rc=$?"; tail -5 "$OUT/racerepro_build.txt"
    for m in every warp; do
      timeout 120 compute-sanitizer --tool racecheck /tmp/race_repro $m > "$OUT/racerepro_$m.txt" 2>&1
      echo "== $m rc=$?"; grep -E "sums|RACECHECK SUMMARY" "$OUT/racerepro_$m.txt"
    done
    ;;
  d256)
    # D 256 and the padded head dims on the warp-specialized kernel (the default)
    for dd in D256 D192 D96 D80; do
      timeout 200 /tmp/longattn selftest --backend cuda --filter $dd --jobs ${JOBS:-8} > "$OUT/selftest_$dd.txt" 2>&1
      echo "selftest $dd rc=$?"; grep -vE " pass " "$OUT/selftest_$dd.txt" | tail -8
    done
    timeout 200 /tmp/longattn selftest --backend cuda --filter skip --jobs ${JOBS:-8} > "$OUT/selftest_skip.txt" 2>&1
    echo "selftest skip rc=$?"; grep -vE " pass " "$OUT/selftest_skip.txt" | tail -8
    fa4_env
    timeout 300 /tmp/longattn bench --backend cuda --masks full,causal --lens ${D256_LENS:-4k,16k,64k} \
      --dims 256 --compare torch --peers ${PEERS:-sdpa_cudnn,fa4} --out "$OUT/d256" > "$OUT/d256.txt" 2>&1
    echo "bench D256 rc=$?"
    sed -n '/^longattn bench/,$p' "$OUT/d256.txt" | head -30
    echo "== LONGATTN_CUDA_WS_WIDE=0 (the mma.sync kernel)"
    LONGATTN_CUDA_WS_WIDE=0 timeout 200 /tmp/longattn bench --backend cuda --masks full,causal \
      --lens ${D256_LENS:-4k,16k,64k} --dims 256 --out "$OUT/d256_mma" > /dev/null 2>&1
    grep -E "^\| (full|causal)" "$OUT/d256_mma/report_cuda.md" | cut -d'|' -f2-7
    ;;
  *) echo "unknown mode $mode (selftest | order | tiles | softmax | candidates | ncu | ncu_fwd | ncu_bwd | ncu_fa4_bwd | bwd_ab | bwd_parts | ncu_bwd_src | knock | skip | ncu_skip | fwd | bwd | power | parity | racecheck | racerepro | d256)"; exit 2 ;;
  esac
done
