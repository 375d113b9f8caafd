#!/usr/bin/env bash
# Checks that the NVRTC kernel sources parse and lower to PTX, without a GPU or the CUDA toolkit:
# clang (apt-get install clang-14) compiles each decode variant to PTX against a stub prelude that
# declares the CUDA builtins the kernels use (NVRTC provides them for real). Also reports any
# local-memory use (register spills / stack arrays) of each variant. Not a substitute for NVRTC
# (PTX instruction syntax is not checked): a quick gate before a GPU run.
set -euo pipefail
CLANG=${CLANG:-clang-14}
K="$(cd "$(dirname "$0")/.." && pwd)/crates/longattn/src/cuda/kernels"
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
cat > "$T/prelude.h" <<'P'
#define __global__ __attribute__((global))
#define __device__ __attribute__((device))
#define __shared__ __attribute__((shared))
#define __forceinline__ __inline__ __attribute__((always_inline))
#define __launch_bounds__(...) __attribute__((launch_bounds(__VA_ARGS__)))
#define __align__(n) __attribute__((aligned(n)))
struct la_uint3 { unsigned x, y, z; };
extern __device__ const la_uint3 threadIdx, blockIdx, gridDim, blockDim;
__device__ float __uint_as_float(unsigned);
__device__ float __int_as_float(int);
__device__ float __shfl_xor_sync(unsigned, float, int);
__device__ void __syncthreads();
__device__ float __log2f(float);
__device__ float tanhf(float);
__device__ float logf(float);
__device__ float fmaxf(float, float);
__device__ float fmaf(float, float, float);
__device__ unsigned long long __cvta_generic_to_shared(const void*);
P
ptx() { # $1 = source, rest = defines
    local src=$1; shift
    cat "$T/prelude.h" "$K/common.cuh" "$K/$src" > "$T/t.cu"
    "$CLANG" -x cuda --cuda-device-only --cuda-gpu-arch=sm_80 -nocudainc -nocudalib -std=c++17 -O3 \
        -S -o "$T/t.ptx" "$@" "$T/t.cu"
    if grep -q '__local_depot' "$T/t.ptx"; then echo "local memory: $src $*"; fi
}
n=0
for F in 0 1; do for D in 32 64 128 256; do for G in 1 4 8; do for P in 0 16 48 256; do
    U=4; [ "$G" -ge 8 ] && U=2
    ptx decode.cu -DLA_F16=$F -DLA_D=$D -DLA_G=$G -DLA_PAGE=$P -DLA_SOFTCAP=$F -DLA_WARPS=4 -DLA_U=$U -DLA_MERGE_ONLY=0
    n=$((n + 1))
done; done; done; done
for F in 0 1; do for D in 32 64 128 256; do ptx decode.cu -DLA_F16=$F -DLA_D=$D -DLA_MERGE_ONLY=1; done; done
ptx kv_append.cu -DLA_F16=0
echo "ok: $n decode variants, the merge and kv_append lower to PTX"
