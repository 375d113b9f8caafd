#!/usr/bin/env bash
# Context parallelism on the device machine: what one GPU (or a few) can check.
#   bash scripts/gpu/cp_check.sh                 # every mode below, in order
#   bash scripts/gpu/cp_check.sh loopback        # one mode; several: `... nccl loopback`
# The binary: LONGATTN_BIN if set, else /tmp/longattn, unpacked from .dev/longattn.xz (carried,
# as the other scripts here expect) when missing. Prints PASS / FAIL lines (and the commands' own
# PASS / FAIL lines); exits non-zero on a FAIL. Outputs under $OUT (default /tmp/out/cp).
# Modes:
#   nccl      NCCL is found (LONGATTN_NCCL_LIB if set; else torch's nvidia-nccl package is looked up
#             and LONGATTN_NCCL_LIB pointed at its libnccl.so.2); `longattn cp nccl-check` in a
#             world of one (the CLI restarts itself once with the link folder on LD_LIBRARY_PATH),
#             with its fault check (a second rank, a thread, that never enters NCCL's init: rank 0
#             must get an error naming it within --fault-timeout, the communicator aborted);
#             the same under torchrun --nproc-per-node=1; with two GPUs or more, under torchrun
#             --nproc-per-node=2 (send / receive ring too).
#   loopback  `longattn cp loopback-check --require-gpu`: P in {1, 2, 3, 4, 5, 8} ranks as streams of
#             GPU 0, causal and full, the ring against the f64 oracle (173 tokens) and against the
#             single-GPU forward at 16411 tokens with per-step compute / copy / exposed-wait times;
#             `cp run --transport loopback --ranks 5` on a bf16 file against `run --backend cuda`;
#             then f16 at D 64 with P = 3 over 1031 tokens.
#   tcp       `cp run --transport tcp` across 2 processes (the launcher's variables set here, and
#             under torchrun --nproc-per-node=2 when installed) on a generated input, against `run`.
set -uo pipefail
OUT=${OUT:-/tmp/out}/cp
mkdir -p "$OUT"
BIN=${LONGATTN_BIN:-/tmp/longattn}
if [ ! -x "$BIN" ] && [ -f .dev/longattn.xz ]; then xz -dc .dev/longattn.xz > "$BIN" && chmod +x "$BIN"; fi
[ -x "$BIN" ] || { echo "FAIL no longattn binary at $BIN (set LONGATTN_BIN or carry .dev/longattn.xz)"; exit 1; }
export NCCL_NVLS_ENABLE=0
fails=0
pass() { echo "PASS $*"; }
fail() { echo "FAIL $*"; fails=$((fails + 1)); }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
gpus() { nvidia-smi -L 2>/dev/null | grep -c '^GPU'; }

mode_nccl() {
  if [ -z "${LONGATTN_NCCL_LIB:-}" ]; then
    lib=$(python3 - <<'PY' 2>/dev/null
import glob, os
try:
    import nvidia.nccl as n
    roots = list(n.__path__)
except Exception:
    roots = []
for r in roots:
    for f in sorted(glob.glob(os.path.join(r, "lib", "libnccl.so*"))):
        print(f); raise SystemExit
PY
)
    if [ -n "$lib" ]; then export LONGATTN_NCCL_LIB=$lib; fi
  fi
  if [ -n "${LONGATTN_NCCL_LIB:-}" ] && [ -f "$LONGATTN_NCCL_LIB" ]; then
    pass "nccl library: LONGATTN_NCCL_LIB=$LONGATTN_NCCL_LIB"
  else
    echo "note: no NCCL library named by LONGATTN_NCCL_LIB or found in torch's nvidia package; the CLI searches itself"
  fi
  timeout 120 "$BIN" cp nccl-check > "$OUT/nccl_check.txt" 2> "$OUT/nccl_check.err"; rc=$?
  cat "$OUT/nccl_check.txt"; tail -3 "$OUT/nccl_check.err"
  if [ $rc -eq 0 ] && grep -q "PASS rank 0 of 1: nccl all-reduce" "$OUT/nccl_check.txt" \
     && ! grep -q FAIL "$OUT/nccl_check.txt"; then
    pass "nccl-check: world of 1 initialises, all-reduces, all-gathers, all-to-alls"
  else
    fail "nccl-check: world of 1 (rc=$rc; see $OUT/nccl_check.err)"
  fi
  if grep -q "PASS rank 0 of 1: a second rank that never enters NCCL's init" "$OUT/nccl_check.txt"; then
    pass "nccl-check: a rank that never enters NCCL's init is an error within the timeout (non-blocking init, abort)"
  else
    fail "nccl-check: the absent-rank fault check did not pass (see $OUT/nccl_check.txt)"
  fi
  if command -v torchrun > /dev/null; then
    timeout 180 torchrun --no-python --nproc-per-node=1 --master-port "$(free_port)" "$BIN" cp nccl-check \
      > "$OUT/nccl_torchrun1.txt" 2>&1; rc=$?
    if [ $rc -eq 0 ] && grep -q "PASS rank 0 of 1: nccl all-reduce" "$OUT/nccl_torchrun1.txt"; then
      pass "torchrun --nproc-per-node=1 cp nccl-check"
    else
      fail "torchrun --nproc-per-node=1 cp nccl-check (rc=$rc)"; tail -5 "$OUT/nccl_torchrun1.txt"
    fi
    if [ "$(gpus)" -ge 2 ]; then
      timeout 180 torchrun --no-python --nproc-per-node=2 --master-port "$(free_port)" "$BIN" cp nccl-check \
        > "$OUT/nccl_torchrun2.txt" 2>&1; rc=$?
      grep -E "PASS|FAIL" "$OUT/nccl_torchrun2.txt"
      if [ $rc -eq 0 ] && [ "$(grep -c 'nccl send / receive ring' "$OUT/nccl_torchrun2.txt")" -eq 2 ] \
         && ! grep -q FAIL "$OUT/nccl_torchrun2.txt"; then
        pass "torchrun --nproc-per-node=2 cp nccl-check (both ranks, ring included)"
      else
        fail "torchrun --nproc-per-node=2 cp nccl-check (rc=$rc)"; tail -8 "$OUT/nccl_torchrun2.txt"
      fi
    else
      echo "note: one GPU: NCCL across ranks needs two (NCCL refuses two ranks on one GPU)"
    fi
  else
    echo "note: torchrun not installed: nccl-check ran in a world of one only"
  fi
}

mode_loopback() {
  timeout 590 "$BIN" cp loopback-check --require-gpu > "$OUT/loopback.txt" 2> "$OUT/loopback.err"; rc=$?
  cat "$OUT/loopback.txt"; tail -3 "$OUT/loopback.err"
  if [ $rc -eq 0 ] && ! grep -q FAIL "$OUT/loopback.txt" \
     && [ "$(grep -c '^PASS' "$OUT/loopback.txt")" -eq 24 ]; then
    pass "cp loopback-check: P 1 2 3 4 5 8 x causal / full, oracle and single-GPU cases (24 PASS)"
  else
    fail "cp loopback-check (rc=$rc; see $OUT/loopback.txt, $OUT/loopback.err)"
  fi
  # cp run --transport loopback (the file contract of run) against run --backend cuda
  in=$OUT/loopback_in.safetensors
  python3 - "$in" <<'PY'
# seeded random bf16 q / k / v (4097 tokens, Hq 8, Hk 2, D 128), standard library only
import json, random, struct, sys
random.seed(23)
n, hq, hk, d = 4097, 8, 2, 128
def bf16(x):
    b = struct.unpack("<I", struct.pack("<f", x))[0]
    return (b + 0x7FFF + ((b >> 16) & 1)) >> 16
head, blobs, off = {}, [], 0
for name, shape in {"q": [1, n, hq, d], "k": [1, n, hk, d], "v": [1, n, hk, d]}.items():
    count = shape[0] * shape[1] * shape[2] * shape[3]
    b = struct.pack(f"<{count}H", *(bf16(random.gauss(0.0, 1.0)) for _ in range(count)))
    head[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [off, off + len(b)]}
    blobs.append(b)
    off += len(b)
h = json.dumps(head).encode()
h += b" " * (-len(h) % 8)
open(sys.argv[1], "wb").write(struct.pack("<Q", len(h)) + h + b"".join(blobs))
PY
  timeout 200 "$BIN" run --backend cuda --input "$in" --output "$OUT/loopback_single.safetensors" --force \
    --mask causal > /dev/null 2> "$OUT/loopback_single.err"; rc1=$?
  timeout 200 "$BIN" cp run --transport loopback --ranks 5 --input "$in" --output "$OUT/loopback_cp.safetensors" \
    --force --mask causal > /dev/null 2> "$OUT/loopback_cp.err"; rc2=$?
  tail -1 "$OUT/loopback_cp.err"
  cmp=$(python3 - "$OUT/loopback_single.safetensors" "$OUT/loopback_cp.safetensors" 2>/dev/null <<'PY'
import json, struct, sys
def load(path):
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    head = json.loads(raw[8:8 + n])
    out = {}
    for k, t in head.items():
        if k == "__metadata__":
            continue
        a, b = t["data_offsets"]
        body = raw[8 + n + a:8 + n + b]
        if t["dtype"] == "F32":
            out[k] = struct.unpack(f"<{len(body) // 4}f", body)
        elif t["dtype"] == "BF16":
            out[k] = [struct.unpack("<f", struct.pack("<I", w << 16))[0] for w in struct.unpack(f"<{len(body) // 2}H", body)]
    return out
x, y = load(sys.argv[1]), load(sys.argv[2])
scale = max(abs(v) for v in x["out"])
eo = max(abs(p - q) for p, q in zip(x["out"], y["out"])) / scale
el = max(abs(p - q) for p, q in zip(x["lse"], y["lse"]))
print(f"{eo:.2e} {el:.2e}")
PY
)
  eo=${cmp% *}; el=${cmp#* }
  if [ $rc1 -eq 0 ] && [ $rc2 -eq 0 ] && python3 -c "import sys; sys.exit(0 if float('$eo') <= 0.03 and float('$el') <= 2e-4 else 1)" 2>/dev/null; then
    pass "cp run --transport loopback --ranks 5 causal 4097 tokens equals run --backend cuda (out $eo, lse $el)"
  else
    fail "cp run --transport loopback (rc $rc1 / $rc2, out ${eo:-none}, lse ${el:-none}; see $OUT/loopback_cp.err)"
  fi
  timeout 300 "$BIN" cp loopback-check --require-gpu --f16 --dim 64 --heads 4 --kv-heads 1 --ranks 3 --len 1031 \
    > "$OUT/loopback_f16.txt" 2>&1; rc=$?
  cat "$OUT/loopback_f16.txt"
  if [ $rc -eq 0 ] && ! grep -q FAIL "$OUT/loopback_f16.txt"; then
    pass "cp loopback-check --f16 --dim 64 (MQA) --ranks 3 --len 1031"
  else
    fail "cp loopback-check --f16 --dim 64 --ranks 3 (rc=$rc)"
  fi
}

mode_tcp() {
  in=$OUT/cp_in.safetensors
  if ! python3 - "$in" <<'PY'
# a safetensors file of seeded random f32 tensors, written with the standard library only
import json, random, struct, sys
random.seed(17)
n, hq, hk, d = 1023, 4, 2, 64
shapes = {"q": [1, n, hq, d], "k": [1, n, hk, d], "v": [1, n, hk, d], "do": [1, n, hq, d]}
head, blobs, off = {}, [], 0
for name, shape in shapes.items():
    count = 1
    for x in shape:
        count *= x
    b = struct.pack(f"<{count}f", *(random.gauss(0.0, 1.0) for _ in range(count)))
    head[name] = {"dtype": "F32", "shape": shape, "data_offsets": [off, off + len(b)]}
    blobs.append(b)
    off += len(b)
h = json.dumps(head).encode()
h += b" " * (-len(h) % 8)
with open(sys.argv[1], "wb") as f:
    f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))
PY
  then
    fail "writing the generated input $in"; return
  fi
  "$BIN" run --input "$in" --output "$OUT/single.safetensors" --force --mask causal --backward \
    > /dev/null 2>&1 || fail "single-rank run"
  port=$(free_port)
  pids=()
  for r in 0 1; do
    RANK=$r WORLD_SIZE=2 LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
      timeout 300 "$BIN" cp run --transport tcp --input "$in" --output "$OUT/cp.safetensors" --force \
      --mask causal --backward --scheme ring --timeout 60 > "$OUT/tcp_run_$r.txt" 2>&1 &
    pids+=($!)
  done
  rc=0; for j in "${pids[@]}"; do wait "$j" || rc=1; done
  cmp=$(python3 - "$OUT/single.safetensors" "$OUT/cp.safetensors" <<'PY'
import json, struct, sys
def load(path):
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    head = json.loads(raw[8:8 + n])
    out = {}
    for k, t in head.items():
        if k == "__metadata__" or t["dtype"] != "F32":
            continue
        a, b = t["data_offsets"]
        out[k] = struct.unpack(f"<{(b - a) // 4}f", raw[8 + n + a:8 + n + b])
    return out
x, y = load(sys.argv[1]), load(sys.argv[2])
worst = 0.0
for k in ["out", "lse", "dq", "dk", "dv"]:
    scale = max(1.0, max(abs(v) for v in x[k]))
    worst = max(worst, max(abs(p - q) for p, q in zip(x[k], y[k])) / scale)
print(f"{worst:.2e}")
PY
)
  if [ $rc -eq 0 ] && python3 -c "import sys; sys.exit(0 if float('$cmp') <= 1e-5 else 1)" 2>/dev/null; then
    pass "cp run --transport tcp --backward, 2 processes, equals run (largest relative difference $cmp)"
  else
    fail "cp run --transport tcp, 2 processes (rc=$rc, difference ${cmp:-none})"; tail -3 "$OUT"/tcp_run_*.txt
  fi
  if command -v torchrun > /dev/null; then
    timeout 300 torchrun --no-python --nproc-per-node=2 --master-port "$(free_port)" "$BIN" cp run \
      --transport tcp --input "$in" --output "$OUT/cp_torchrun.safetensors" --force --mask causal \
      --scheme ring > "$OUT/torchrun_run.txt" 2>&1; rc=$?
    if [ $rc -eq 0 ] && [ -f "$OUT/cp_torchrun.safetensors" ]; then
      pass "torchrun --nproc-per-node=2 cp run --transport tcp"
    else
      fail "torchrun --nproc-per-node=2 cp run --transport tcp (rc=$rc)"; tail -5 "$OUT/torchrun_run.txt"
    fi
  fi
}

for mode in "${@:-nccl loopback tcp}"; do
  for m in $mode; do
    case "$m" in
      nccl) mode_nccl ;;
      loopback) mode_loopback ;;
      tcp) mode_tcp ;;
      *) fail "unknown mode $m (nccl, loopback, tcp)" ;;
    esac
  done
done
echo "cp_check: $fails failure(s)"
[ $fails -eq 0 ]
