// Hopper (sm_90a) asynchronous-copy plumbing for the warp-specialized forward: the tensor memory
// accelerator (TMA), shared-memory barriers (mbarrier) with transaction counts, named barriers and
// warpgroup register reallocation. Inline PTX, no CUDA headers.

// A TMA descriptor built on the host by cuTensorMapEncodeTiled (128 opaque bytes). It must live in
// kernel-parameter, constant or global memory: kernels take it inside a __grid_constant__ struct.
struct __align__(64) LaTmap {
    u64 opaque[16];
};

// --- mbarrier: a 64-bit shared-memory barrier with a phase bit. A phase completes when the
// expected number of arrivals has happened and every expected transaction byte has landed.
__device__ __forceinline__ void la_mbar_init(u64* bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(la_smem_addr(bar)), "r"(count));
}
// Makes the initialised barriers visible to the async proxy (TMA) before first use.
__device__ __forceinline__ void la_mbar_fence_init() {
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void la_mbar_arrive(u64* bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(la_smem_addr(bar)) : "memory");
}
// One arrival that also announces `bytes` of TMA traffic the phase must wait for.
__device__ __forceinline__ void la_mbar_expect(u64* bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(la_smem_addr(bar)),
                 "r"(bytes)
                 : "memory");
}
// Waits until the phase of parity `parity` has completed. A fresh barrier is in phase 0, and a
// wait for parity 1 (the phase "before" it) returns at once: producers start with parity 1.
// Each try_wait carries a suspend-time hint (LA_MBAR_HINT ns, as CUTLASS's pipelines do): the
// thread sleeps in the barrier until the phase completes or the hint expires, instead of
// returning after the hardware's default limit. Without it (LA_MBAR_HINT 0) a waiting warp
// spun: in the backward at 4k, D 64, the producer's and adders' waits took ~80 try_wait, YIELD
// and branch rounds each, 10% of the kernel's instructions, issued on the consumers' SMSPs.
#ifndef LA_MBAR_HINT
#define LA_MBAR_HINT 10000000
#endif
__device__ __forceinline__ void la_mbar_wait(u64* bar, u32 parity) {
    const u32 a = la_smem_addr(bar);
    u32 done;
    do {
#if LA_MBAR_HINT
        asm volatile(
            "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2, %3;\nselp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(a), "r"(parity), "r"((u32)LA_MBAR_HINT)
            : "memory");
#else
        asm volatile(
            "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(a), "r"(parity)
            : "memory");
#endif
    } while (!done);
}

// --- TMA: one box of a 4-D tensor (coordinates innermost first) into shared memory; completion
// is signalled as transaction bytes on `bar`.
__device__ __forceinline__ void la_tma_load4(void* dst, const LaTmap* map, u64* bar, int c0, int c1,
                                             int c2, int c3) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, %6}], [%2];\n" ::"r"(
            la_smem_addr(dst)),
        "l"((u64)map), "r"(la_smem_addr(bar)), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
        : "memory");
}

// One box of a 5-D tensor (a patch of a 2-D grid: {64 columns, grid column, grid row, head, batch}).
__device__ __forceinline__ void la_tma_load5(void* dst, const LaTmap* map, u64* bar, int c0, int c1,
                                             int c2, int c3, int c4) {
    asm volatile(
        "cp.async.bulk.tensor.5d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, %6, %7}], [%2];\n" ::"r"(
            la_smem_addr(dst)),
        "l"((u64)map), "r"(la_smem_addr(bar)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(c4)
        : "memory");
}

// --- Bulk copy (TMA unit, no tensor map): `bytes` contiguous bytes into shared memory; completion
// as transaction bytes on `bar`. Addresses and size multiples of 16.
__device__ __forceinline__ void la_bulk_load(void* dst, const void* src, u32 bytes, u64* bar) {
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
            la_smem_addr(dst)),
        "l"(src), "r"(bytes), "r"(la_smem_addr(bar))
        : "memory");
}

// --- Named barriers (ids 1..15; 0 is __syncthreads): `sync` waits until `count` threads have
// arrived (itself included), `arrive` signals without waiting.
__device__ __forceinline__ void la_bar_sync(int id, int count) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
__device__ __forceinline__ void la_bar_arrive(int id, int count) {
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}

// --- Register reallocation between warpgroups (every thread of the warpgroup executes it).
template <int N>
__device__ __forceinline__ void la_regs_dec() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void la_regs_inc() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}

// --- Bulk reduction (TMA unit): dst[0 .. bytes) += src (f32 adds done in L2, asynchronously);
// `bytes` and both addresses multiples of 16. Completion is tracked per thread in bulk groups.
__device__ __forceinline__ void la_bulk_add_f32(float* dst, const float* src, u32 bytes) {
    asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(dst),
                 "r"(la_smem_addr(src)), "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void la_bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// Waits until at most N of this thread's bulk groups have not yet read their shared-memory source.
template <int N>
__device__ __forceinline__ void la_bulk_wait_read() {
    asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
}
// Waits until at most N of this thread's bulk groups are incomplete.
template <int N>
__device__ __forceinline__ void la_bulk_wait() {
    asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(N) : "memory");
}

// --- Cross-block hand-off through a counter in global memory (GPU scope): an acquiring load,
// a releasing store, and the fence that orders the async proxy (bulk copies) against them.
__device__ __forceinline__ int la_ld_acquire(const int* a) {
    int v;
    asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(v) : "l"(a) : "memory");
    return v;
}
__device__ __forceinline__ void la_st_release(int* a, int v) {
    asm volatile("st.release.gpu.global.b32 [%0], %1;\n" ::"l"(a), "r"(v) : "memory");
}
__device__ __forceinline__ void la_nanosleep(u32 ns) { asm volatile("nanosleep.u32 %0;\n" ::"r"(ns)); }
__device__ __forceinline__ void la_fence_proxy_async_global() {
    asm volatile("fence.proxy.async.global;\n" ::: "memory");
}
