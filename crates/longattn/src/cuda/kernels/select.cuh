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

// The least and largest of one value per thread over the block, into every thread's lo / hi
// (ws: 32 words of shared memory).
__device__ __forceinline__ void la_block_minmax(u32& lo, u32& hi, u32* ws) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o >= 1; o >>= 1) {
        lo = min(lo, __shfl_xor_sync(0xffffffffu, lo, o));
        hi = max(hi, __shfl_xor_sync(0xffffffffu, hi, o));
    }
    __syncthreads();
    if (lane == 0) ws[w] = lo;
    __syncthreads();
    lo = ws[0];
    for (int i = 1; i < nw; i++) lo = min(lo, ws[i]);
    __syncthreads();
    if (lane == 0) ws[w] = hi;
    __syncthreads();
    hi = ws[0];
    for (int i = 1; i < nw; i++) hi = max(hi, ws[i]);
    __syncthreads();
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
// (leading digits are shared by most keys: one address would serialise the warp's adds); a warp
// none of whose keys is taken (most warps of a late pass) skips the match. Called by every lane
// of the warp.
__device__ __forceinline__ void la_hist_add(bool in, u32 bin, u32* hist) {
    if (__ballot_sync(0xffffffffu, in) == 0u) return;
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

// la_radix_nth_by over keys known to lie in [lo, hi] (lo <= hi: the block's least and largest),
// stopping early. The digits above the highest bit where lo and hi differ are lo's (every key
// shares them), so the first pass takes the 8 bits from that one down (passes of 8 bits, the
// last one clamped to bit 0, overlapping digits already chosen, which its histogram agrees
// with); and once the bin a pass picks holds exactly the keys still wanted, every key of it
// is in the top n whatever its lower digits, so the passes stop. Returns the chosen digits
// `prefix` under `mask` (contiguous top bits): the keys with (k & mask) > prefix are the top
// n - need, and `need` of those with (k & mask) == prefix complete it (all of them when the
// passes stopped early; with mask = ~0 they equal the n-th largest key).
template <typename F>
__device__ __forceinline__ u32 la_radix_top_in(u32 n, u32 lo, u32 hi, F fill, u32* hist, u32* pick,
                                               u32& need, u32& mask) {
    if (lo == hi) {   // one value: every key ties
        need = n;
        mask = 0xffffffffu;
        return lo;
    }
    const int top = 31 - __clz(lo ^ hi);
    mask = top == 31 ? 0u : ~((2u << top) - 1u);
    u32 prefix = lo & mask, rem = n;
    for (int shift = la_imax(top - 7, 0);; shift = la_imax(shift - 8, 0)) {
        for (int t = threadIdx.x; t < 256; t += blockDim.x) hist[t] = 0;
        __syncthreads();
        fill(shift, mask, prefix);
        __syncthreads();
        if (threadIdx.x < 32) la_hist_pick(hist, rem, pick);
        __syncthreads();
        prefix |= pick[0] << shift;
        mask |= 255u << shift;
        rem = pick[1];
        const bool whole = hist[pick[0]] == rem;   // the bin's keys are exactly those wanted
        __syncthreads();
        if (whole || shift == 0) break;
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
