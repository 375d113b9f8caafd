// The hand-back pattern that compute-sanitizer racecheck reports in the one-pass backward
// (attn_bwd_wg.cu: the consumers' ld.shared of a stage's L2 / Delta vectors against the
// producer's bulk refill of that stage), reduced to one block of 5 warps:
//   - lane 0 of warp 4 (the producer) bulk-copies 512 bytes a step into stage t & 1 of a
//     two-stage shared buffer (cp.async.bulk, completion as transaction bytes on full[st]),
//     after waiting on empty[st] for the consumers to be done with the stage's previous use;
//   - warps 0..3 (128 consumer threads) wait on full[st], read their float of the stage with
//     an ordinary shared load, and hand the stage back on empty[st]: with `every`, each thread
//     arrives (arrival count 128); with `warp`, as the kernel does, __syncwarp() and one
//     arrival by lane 0 (count 4).
// Both forms are correct (the sums are checked against the host's); the question is what the
// tool follows. Built and run by `bash scripts/gpu/dense_check.sh racerepro` (nvcc, sm_90a):
//   compute-sanitizer --tool racecheck race_repro every   (the 2026-11-23 run: 0 hazards)
//   compute-sanitizer --tool racecheck race_repro warp    (the 2026-11-23 run: 30752 hazards)
// The kernel part compiles under NVRTC too (test `racecheck_repro_compiles_with_nvrtc`), with
// the crate's own mbarrier and bulk-copy helpers (common.cuh, tma.cuh).
#include "common.cuh"
#include "tma.cuh"

#define LA_RR_N 128     // consumer threads, floats a step
#define LA_RR_STEPS 64  // steps (each stage used 32 times)

__device__ __forceinline__ void la_rr_fence_async_smem() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// out[i] = sum over steps t of src[t * N + i], summed in step order by consumer thread i.
template <bool EVERY_THREAD>
__global__ void __launch_bounds__(LA_RR_N + 32, 1) la_race_repro(const float* src, float* out) {
    __shared__ __align__(128) float buf[2][LA_RR_N];
    __shared__ __align__(8) u64 bars[4];
    u64* full = bars;
    u64* empty = bars + 2;
    const int tid = threadIdx.x;
    if (tid == 0) {
        for (int st = 0; st < 2; st++) {
            la_mbar_init(full + st, 1);
            la_mbar_init(empty + st, EVERY_THREAD ? LA_RR_N : LA_RR_N / 32);
        }
        la_mbar_fence_init();
    }
    __syncthreads();
    if (tid >= LA_RR_N) {
        if (tid != LA_RR_N) return;
        for (int t = 0; t < LA_RR_STEPS; t++) {
            const int st = t & 1;
            la_mbar_wait(empty + st, ((t >> 1) & 1) ^ 1);  // passes at once on a stage's first use
            la_rr_fence_async_smem();  // the consumers' generic reads before the async refill
            la_mbar_expect(full + st, LA_RR_N * 4);
            la_bulk_load(buf[st], src + (long long)t * LA_RR_N, LA_RR_N * 4, full + st);
        }
        return;
    }
    float sum = 0.f;
    for (int t = 0; t < LA_RR_STEPS; t++) {
        const int st = t & 1;
        la_mbar_wait(full + st, (t >> 1) & 1);
        sum += buf[st][tid];
        if (EVERY_THREAD) {
            la_mbar_arrive(empty + st);
        } else {
            __syncwarp();
            if ((tid & 31) == 0) la_mbar_arrive(empty + st);
        }
    }
    out[tid] = sum;
}

#ifdef __CUDACC_RTC__
// NVRTC (the compile test): both forms instantiated, so both are compiled.
template __global__ void la_race_repro<true>(const float*, float*);
template __global__ void la_race_repro<false>(const float*, float*);
#else
#include <cstdio>
#include <cstring>
#include <vector>

int main(int argc, char** argv) {
    const bool every = argc > 1 && std::strcmp(argv[1], "every") == 0;
    if (argc < 2 || (!every && std::strcmp(argv[1], "warp") != 0)) {
        std::fprintf(stderr, "usage: %s every|warp\n", argv[0]);
        return 2;
    }
    std::vector<float> src(LA_RR_STEPS * LA_RR_N), want(LA_RR_N, 0.f), got(LA_RR_N);
    unsigned x = 12345u;  // a fixed LCG: values in [-1, 1)
    for (auto& v : src) {
        x = x * 1664525u + 1013904223u;
        v = (float)(x >> 8) / (float)(1u << 23) - 1.f;
    }
    for (int t = 0; t < LA_RR_STEPS; t++)
        for (int i = 0; i < LA_RR_N; i++) want[i] += src[t * LA_RR_N + i];
    float *d_src = nullptr, *d_out = nullptr;
    if (cudaMalloc(&d_src, src.size() * 4) != cudaSuccess || cudaMalloc(&d_out, LA_RR_N * 4) != cudaSuccess) {
        std::fprintf(stderr, "cudaMalloc failed\n");
        return 1;
    }
    cudaMemcpy(d_src, src.data(), src.size() * 4, cudaMemcpyHostToDevice);
    if (every)
        la_race_repro<true><<<1, LA_RR_N + 32>>>(d_src, d_out);
    else
        la_race_repro<false><<<1, LA_RR_N + 32>>>(d_src, d_out);
    const cudaError_t e = cudaDeviceSynchronize();
    if (e != cudaSuccess) {
        std::fprintf(stderr, "kernel failed: %s\n", cudaGetErrorString(e));
        return 1;
    }
    cudaMemcpy(got.data(), d_out, LA_RR_N * 4, cudaMemcpyDeviceToHost);
    int bad = 0;
    for (int i = 0; i < LA_RR_N; i++) bad += got[i] != want[i];
    std::printf("mode %s: sums %s (%d of %d differ)\n", argv[1], bad ? "WRONG" : "right", bad, LA_RR_N);
    cudaFree(d_src);
    cudaFree(d_out);
    return bad ? 1 : 0;
}
#endif
