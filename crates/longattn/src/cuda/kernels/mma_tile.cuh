// Shared-memory tiles of the mma.sync kernels (attn_fwd.cu, attn_bwd.cu): a tile is [rows][LA_D]
// in 16-byte chunks, the chunk index XOR-swizzled by the row so ldmatrix reads of 8 rows hit
// distinct banks. Needs LA_D (a multiple of 16).
#define LA_CHUNKS (LA_D / 8)
// Swizzle group: the largest power of two <= 8 dividing the chunk count.
#define LA_SWZ ((LA_CHUNKS % 8 == 0) ? 8 : ((LA_CHUNKS % 4 == 0) ? 4 : ((LA_CHUNKS % 2 == 0) ? 2 : 1)))

// Element offset of (row, 16-byte chunk c) in a swizzled [rows][D] tile.
__device__ __forceinline__ int la_sw(int row, int c) {
    return row * LA_D + ((c ^ (row & (LA_SWZ - 1))) << 3);
}

// Asynchronously copies rows row0 .. row0 + ROWS of a [seq][D] slab (row stride `ss` elements)
// into a swizzled tile with the block's THREADS threads; rows at or past `limit` are zero-filled.
template <int ROWS, int THREADS>
__device__ __forceinline__ void la_load_tile(u16* s, const u16* g, i64 ss, int row0, int limit) {
    constexpr int N = ROWS * LA_CHUNKS;
#pragma unroll
    for (int x = threadIdx.x; x < N; x += THREADS) {
        const int r = x / LA_CHUNKS, c = x % LA_CHUNKS;
        const int gr = row0 + r;
        const bool ok = gr < limit;
        la_cp_async16(s + la_sw(r, c), g + (ok ? (i64)gr * ss : 0) + c * 8, ok ? 16 : 0);
    }
}
