#!/bin/bash
# Builds the CPU emulation of the linear-attention kernels (see emu_common.h):
#   scripts/linear_emu/build.sh K V BV F16 [main.cpp|main_step.cpp]  -> $OUT/emu_K_V_BV_F16 (or step_...)
# then e.g. `$OUT/emu_64_64_32_0 B T H Hk decay(0 none|1 head|2 token) s0(0|1) gmin [cu_seqlens...]`
# prints the error of every output against an f64 recurrence; `$OUT/step_.. decay(0..3)`.
# GLA=1 NW=16 builds the per-key-dim gate's forward (decay 3; the backward is left out).
# EMU_SEG=<tokens> (a multiple of 64) cuts the sequences into segments (linear_seg.cu).
set -e
HERE=$(cd "$(dirname "$0")" && pwd)
KD="$HERE/../../crates/longattn/src/cuda/kernels"
OUT=${OUT:-/tmp/linear_emu}
mkdir -p "$OUT"
K=$1; V=$2; BV=$3; F16=${4:-0}; MAIN=${5:-main.cpp}
NW=${NW:-8}  # warps of the forward (16: the backward is left out, it is built for 8)
NAME=$([ "$MAIN" = main.cpp ] && echo emu || echo step)
python3 - "$KD" "$HERE" "$MAIN" "$NW" > "$OUT/$NAME.cpp" <<'PY'
import sys, re
kd, here, main, nw = sys.argv[1:5]
lc = open(kd + '/linear_common.cuh').read()
lc = re.sub(r'asm volatile\("cp\.async\.ca\.shared\.global.*?"r"\(bytes\)\);',
            'if (bytes == 4) memcpy(dst, src, 4); else memset(dst, 0, 4);', lc, flags=re.S)
lc = re.sub(r'asm volatile\("red\.add\.f32.*?"memory"\);', 'atomicAdd(p, v);', lc, flags=re.S)
out = open(here + '/emu_common.h').read() + lc
for f in ['linear_seg.cu', 'linear_fwd.cu'] + (['linear_bwd.cu', 'linear_step.cu'] if nw == '8' else []):
    out += open(kd + '/' + f).read().replace('extern __shared__ __align__(128) u16 lin_smem[];', '')
out += open(here + '/' + main).read()
print(out)
PY
SUF=$([ "$NW" = 8 ] && echo "" || echo "_nw$NW")$([ "${GLA:-0}" = 1 ] && echo _gla || true)
g++ -std=c++20 -O1 -pthread -w -DLA_F16=$F16 -DLIN_K=$K -DLIN_V=$V -DLIN_BV=$BV -DLIN_BK=32 -DLIN_NW=$NW -DLIN_GLA=${GLA:-0} \
    "$OUT/$NAME.cpp" -o "$OUT/${NAME}_${K}_${V}_${BV}_${F16}${SUF}"
