// KV-cache helpers: append of new K/V rows into their page slots, and a device-side fill of
// pseudo-random values (benchmark inputs without a host round trip). Element-type agnostic
// except la_fill (LA_F16 picks the format). No CUDA headers: see common.cuh.

struct alignas(16) la_a4 {
    u32 x, y, z, w;
};

struct LaAppendParams {
    const u16* k_new;   // [n, Hk, D] contiguous
    const u16* v_new;
    u16* k_pages;       // [slots, Hk, D] (paged: slot = page * P + offset; contiguous: b * cap + j)
    u16* v_pages;
    const i64* slots;   // [n]
    i64 n;
    i64 row_chunks;     // Hk * D / 8: 16-byte chunks per token row
};

// Row t of k_new / v_new goes to row slots[t] of the pool; one thread per 16-byte chunk.
extern "C" __global__ void __launch_bounds__(256) la_kv_append(const LaAppendParams p) {
    const i64 total = p.n * p.row_chunks;
    for (i64 x = (i64)blockIdx.x * 256 + threadIdx.x; x < total; x += (i64)gridDim.x * 256) {
        const i64 t = x / p.row_chunks, c = x % p.row_chunks;
        const i64 dst = p.slots[t] * p.row_chunks + c;
        ((la_a4*)p.k_pages)[dst] = ((const la_a4*)p.k_new)[x];
        ((la_a4*)p.v_pages)[dst] = ((const la_a4*)p.v_new)[x];
    }
}

// Compaction of a cache: row src[t] of the pool moves to row dst[t] (rows of row_chunks 16-byte
// chunks; the destinations are fresh pages, never a source of the same call).
struct LaMoveParams {
    u16* k_pages;
    u16* v_pages;
    const i64* src;     // [n]
    const i64* dst;     // [n]
    i64 n;
    i64 row_chunks;
};

extern "C" __global__ void __launch_bounds__(256) la_kv_move(const LaMoveParams p) {
    const i64 total = p.n * p.row_chunks;
    for (i64 x = (i64)blockIdx.x * 256 + threadIdx.x; x < total; x += (i64)gridDim.x * 256) {
        const i64 t = x / p.row_chunks, c = x % p.row_chunks;
        const i64 s = p.src[t] * p.row_chunks + c, d = p.dst[t] * p.row_chunks + c;
        ((la_a4*)p.k_pages)[d] = ((const la_a4*)p.k_pages)[s];
        ((la_a4*)p.v_pages)[d] = ((const la_a4*)p.v_pages)[s];
    }
}

// x[i] = a value uniform in [-1, 1) from a hash of (seed, i), rounded to the storage format.
extern "C" __global__ void __launch_bounds__(256) la_fill(u16* x, i64 n, u32 seed) {
    for (i64 i = (i64)blockIdx.x * 256 + threadIdx.x; i < n; i += (i64)gridDim.x * 256) {
        u32 h = (u32)i * 0x9E3779B1u ^ (u32)(i >> 32) * 0x85EBCA77u ^ seed * 0xC2B2AE3Du;
        h ^= h >> 15;
        h *= 0x2C1B3C6Du;
        h ^= h >> 12;
        h *= 0x297A2D39u;
        h ^= h >> 15;
        const float f = (float)(h >> 8) * (2.0f / 16777216.0f) - 1.0f;
        x[i] = (u16)(la_pack2(f, 0.f) & 0xffffu);
    }
}
