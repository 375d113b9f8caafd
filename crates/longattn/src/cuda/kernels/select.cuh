// Block-wide scan and top-n selection shared by the selection kernels (sparse_vs.cu: columns and
// diagonals; kv_quest.cu: pages). Needs common.cuh. Every function is called by all threads of
// the block (barriers inside).

// Exclusive scan of one value per thread over the block (at most 1024 threads, a multiple of 32);
// returns the block total in `total`. ws: 32 words of shared memory.
__device__ __forceinline__ u32 la_block_scan(u32 x, u32* ws, u32& total) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    u32 v = x;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const u32 y = __shfl_up_sync(0xffffffffu, v, o);
        if (lane >= o) v += y;
    }
    __syncthreads();
    if (lane == 31) ws[w] = v;
    __syncthreads();
    if (w == 0) {
        u32 s = lane < (int)(blockDim.x >> 5) ? ws[lane] : 0;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const u32 y = __shfl_up_sync(0xffffffffu, s, o);
            if (lane >= o) s += y;
        }
        ws[lane] = s;   // inclusive over warps
    }
    __syncthreads();
    total = ws[(blockDim.x >> 5) - 1];
    const u32 before = w > 0 ? ws[w - 1] : 0;
    return before + v - x;
}

__device__ __forceinline__ u32 la_block_sum(u32 x, u32* ws) {
    u32 total;
    la_block_scan(x, ws, total);
    return total;
}

// f32 -> u32 whose unsigned order is the total order of the floats (-inf < ... < -0 < +0 < ...
// < +inf): flip every bit of a negative, the sign bit of a positive.
__device__ __forceinline__ u32 la_order_key(float f) {
    const u32 b = __float_as_uint(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// One key's count into a radix pass's shared histogram (`in`: the key is taken and matches the
// digits chosen so far; `bin` its digit). The lanes of a warp that fall into one bin add once
// (leading digits are shared by most keys: one address would serialise the warp's adds). Called
// by every lane of the warp.
__device__ __forceinline__ void la_hist_add(bool in, u32 bin, u32* hist) {
    const u32 peers = __match_any_sync(0xffffffffu, in ? bin : 256u);
    if (in && (int)(threadIdx.x % 32) == __ffs(peers) - 1) atomicAdd(&hist[bin], __popc(peers));
}

// Of a 256-bin histogram (bins in key order), the bin that holds the rem-th largest key
// (1-based, counting from the top bin down): pick[0] = the bin, pick[1] = how many of its keys
// complete the top rem (the keys of the bins above are rem - pick[1]). Run by warp 0 (the
// caller brackets it with barriers).
__device__ __forceinline__ void la_hist_pick(const u32* hist, u32 rem, u32* pick) {
    // Lane l sums bins 255 - 8 l - 7 .. 255 - 8 l (the top bins first); the first lane whose
    // running total reaches rem walks its 8 bins.
    const int lane = threadIdx.x & 31;
    u32 s = 0;
#pragma unroll
    for (int t = 0; t < 8; t++) s += hist[255 - 8 * lane - t];
    u32 inc = s;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const u32 y = __shfl_up_sync(0xffffffffu, inc, o);
        if (lane >= o) inc += y;
    }
    const u32 hit = __ballot_sync(0xffffffffu, inc >= rem);
    const int first = hit ? __ffs(hit) - 1 : 31;
    if (lane == first) {
        u32 cum = inc - s;
        int dgt = 255 - 8 * lane - 7;
        for (int t = 0; t < 8; t++) {
            const int b = 255 - 8 * lane - t;
            if (cum + hist[b] >= rem) { dgt = b; break; }
            cum += hist[b];
        }
        pick[0] = (u32)dgt;
        pick[1] = rem - cum;
    }
}

// The n-th largest of a set of keys by radix select: four passes of 8-bit digits, each a shared
// histogram of the keys that match the digits chosen so far, filled by
// fill(shift, mask, prefix) (every thread adds its keys k with (k & mask) == prefix to bin
// (k >> shift) & 255 through la_hist_add). Returns T and sets `need` to how many keys equal to T
// complete the top n (the keys > T are n - need). hist: 256 words, pick: 2 words of shared memory.
template <typename F>
__device__ __forceinline__ u32 la_radix_nth_by(u32 n, F fill, u32* hist, u32* pick, u32& need) {
    u32 prefix = 0, mask = 0, rem = n;   // rem: keys still to take at or below the prefix
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int t = threadIdx.x; t < 256; t += blockDim.x) hist[t] = 0;
        __syncthreads();
        fill(shift, mask, prefix);
        __syncthreads();
        if (threadIdx.x < 32) la_hist_pick(hist, rem, pick);
        __syncthreads();
        prefix |= pick[0] << shift;
        mask |= 255u << shift;
        rem = pick[1];
        __syncthreads();
    }
    need = rem;
    return prefix;
}

// The n-th largest key (1 <= n <= count of keys taken) among key(j) for j < N where take(j)
// (la_radix_nth_by over the block's strided indices; whole warps iterate).
template <typename K>
__device__ __forceinline__ u32 la_radix_nth(int N, u32 n, K key, u32* hist, u32* pick, u32& need) {
    return la_radix_nth_by(
        n,
        [&](int shift, u32 mask, u32 prefix) {
            for (int jb = 0; jb < N; jb += blockDim.x) {
                const int j = jb + threadIdx.x;
                u32 u = 0;
                const bool in = j < N && key(j, u) && (u & mask) == prefix;
                la_hist_add(in, (u >> shift) & 255u, hist);
            }
        },
        hist, pick, need);
}
