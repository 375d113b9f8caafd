// CPU emulation of the CUDA pieces the linear-attention kernels use (no GPU needed): one block at
// a time, one std::thread per CUDA thread, __syncthreads as a barrier, warp collectives (shuffles,
// ldmatrix, mma.sync m16n8k16) through per-warp exchange buffers with the PTX fragment layouts,
// cp.async as a synchronous copy (so it cannot catch a wrong wait_group), shared memory poisoned
// with NaN before every block. It replaces common.cuh; build.sh assembles a translation unit.
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>
typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;
typedef unsigned long long u64;
#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(x) alignas(x)
#define LA_INF INFINITY
#define LA_LOG2E 1.4426950408889634f
#define LA_LN2 0.6931471805599453f
struct uint3_ { unsigned x, y, z; };
thread_local uint3_ threadIdx;
uint3_ blockIdx, blockDim, gridDim;

std::barrier<>* g_block_bar;
std::barrier<>* g_warp_bar[64];
inline void __syncthreads() { g_block_bar->arrive_and_wait(); }
std::atomic<int> g_or{0};
inline int __syncthreads_or(int x) {
    if (x) g_or = 1;
    __syncthreads();
    const int r = g_or;
    __syncthreads();
    if (threadIdx.x == 0) g_or = 0;
    __syncthreads();
    return r;
}
inline void __trap() { fprintf(stderr, "trap\n"); abort(); }
inline int emu_warp() { return threadIdx.x >> 5; }
inline int emu_lane() { return threadIdx.x & 31; }
inline void warp_sync() { g_warp_bar[emu_warp()]->arrive_and_wait(); }
inline void __syncwarp() { warp_sync(); }

float xf[64][32];
inline float __shfl_xor_sync(unsigned, float v, int d) {
    int w = emu_warp(), l = emu_lane();
    xf[w][l] = v; warp_sync(); float r = xf[w][l ^ d]; warp_sync(); return r;
}
inline float __shfl_up_sync(unsigned, float v, int d) {
    int w = emu_warp(), l = emu_lane();
    xf[w][l] = v; warp_sync(); float r = l >= d ? xf[w][l - d] : v; warp_sync(); return r;
}
inline float __shfl_sync(unsigned, float v, int s) {
    int w = emu_warp(), l = emu_lane();
    xf[w][l] = v; warp_sync(); float r = xf[w][s]; warp_sync(); return r;
}
std::mutex g_atomic;
inline float atomicAdd(float* p, float v) { std::lock_guard<std::mutex> g(g_atomic); float o = *p; *p += v; return o; }

inline float la_exp2(float x) { return exp2f(x); }
inline float bf16f(u16 x) { u32 b = ((u32)x) << 16; float f; memcpy(&f, &b, 4); return f; }
inline u16 f2bf(float x) { u32 b; memcpy(&b, &x, 4); if (std::isnan(x)) return 0x7fc0; return (u16)((b + 0x7fff + ((b >> 16) & 1)) >> 16); }
#if LA_F16
inline float la_to_f32(u16 x) { _Float16 h; memcpy(&h, &x, 2); return (float)h; }
inline u16 f2el(float x) { _Float16 h = (_Float16)x; u16 r; memcpy(&r, &h, 2); return r; }
#else
inline float la_to_f32(u16 x) { return bf16f(x); }
inline u16 f2el(float x) { return f2bf(x); }
#endif
inline u32 la_pack2(float lo, float hi) { return (u32)f2el(lo) | ((u32)f2el(hi) << 16); }
inline u32 la_smem_addr(const void*) { return 0; }
inline void la_cp_async16(void* dst, const void* src, int bytes) {
    if (bytes == 16) memcpy(dst, src, 16); else memset(dst, 0, 16);
}
inline void la_cp_commit() {}
template <int N> inline void la_cp_wait() {}

// ldmatrix .x4: lane l gives the address of row l % 8 of matrix l / 8; register j of lane l gets
// matrix j's row l / 4, columns 2 (l % 4) and + 1 (.trans: rows 2 (l % 4), + 1 of column l / 4).
const u16* xa[64][32];
inline void la_ldmatrix_x4(u32* r, const void* p) {
    int w = emu_warp(), l = emu_lane();
    xa[w][l] = (const u16*)p; warp_sync();
    for (int j = 0; j < 4; j++) {
        const u16* row = xa[w][8 * j + (l >> 2)];
        r[j] = (u32)row[2 * (l & 3)] | ((u32)row[2 * (l & 3) + 1] << 16);
    }
    warp_sync();
}
inline void la_ldmatrix_x4_trans(u32* r, const void* p) {
    int w = emu_warp(), l = emu_lane();
    xa[w][l] = (const u16*)p; warp_sync();
    for (int j = 0; j < 4; j++) {
        const u16* r0 = xa[w][8 * j + 2 * (l & 3)];
        const u16* r1 = xa[w][8 * j + 2 * (l & 3) + 1];
        r[j] = (u32)r0[l >> 2] | ((u32)r1[l >> 2] << 16);
    }
    warp_sync();
}
// mma m16n8k16: A (16 x 16) a[0] rows g k 2t..2t+1, a[1] rows g + 8, a[2] / a[3] the same at
// k + 8; B (16 x 8) b[0] k 2t..2t+1 column g, b[1] k + 8; C c[0..1] row g columns 2t, 2t + 1,
// c[2..3] row g + 8 (g = lane / 4, t = lane % 4).
u32 xA[64][32][4], xB[64][32][2];
inline float half_of(u32 w, int hi) { return la_to_f32((u16)(hi ? w >> 16 : w & 0xffff)); }
inline void la_mma16816(float* c, const u32* a, const u32* b) {
    int w = emu_warp(), l = emu_lane();
    for (int i = 0; i < 4; i++) xA[w][l][i] = a[i];
    for (int i = 0; i < 2; i++) xB[w][l][i] = b[i];
    warp_sync();
    auto A = [&](int m, int k) { return half_of(xA[w][(m % 8) * 4 + (k % 8) / 2][(m >= 8) + 2 * (k >= 8)], k % 2); };
    auto B = [&](int k, int n) { return half_of(xB[w][n * 4 + (k % 8) / 2][k >= 8], k % 2); };
    const int g = l >> 2, t4 = l & 3;
    for (int e = 0; e < 4; e++) {
        int m = g + 8 * (e >> 1), n = 2 * t4 + (e & 1);
        float s = 0.f;
        for (int k = 0; k < 16; k++) s += A(m, k) * B(k, n);
        c[e] += s;
    }
    warp_sync();
}
inline int la_imax(int a, int b) { return a > b ? a : b; }
inline int la_imin(int a, int b) { return a < b ? a : b; }

alignas(128) u16 lin_smem[1 << 17];

template <class F>
void emu_launch(F kernel, int gx, int gy, int gz, int threads) {
    gridDim = {(unsigned)gx, (unsigned)gy, (unsigned)gz};
    blockDim = {(unsigned)threads, 1, 1};
    for (int z = 0; z < gz; z++)
        for (int y = 0; y < gy; y++)
            for (int x = 0; x < gx; x++) {
                blockIdx = {(unsigned)x, (unsigned)y, (unsigned)z};
                for (auto& e : lin_smem) e = 0x7fc1;  // NaN: every read must follow a write
                std::barrier<> bb(threads);
                g_block_bar = &bb;
                for (int i = 0; i < (threads + 31) / 32; i++) g_warp_bar[i] = new std::barrier<>(32);
                std::vector<std::thread> ts;
                for (int t = 0; t < threads; t++)
                    ts.emplace_back([&, t] { threadIdx = {(unsigned)t, 0, 0}; kernel(); });
                for (auto& t : ts) t.join();
                for (int i = 0; i < (threads + 31) / 32; i++) delete g_warp_bar[i];
            }
}
