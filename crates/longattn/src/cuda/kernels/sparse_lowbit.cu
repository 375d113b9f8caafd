// Low-bit selection on the device (`lowbit`, sparse/cuda.rs; the math and the CPU estimator are
// sparse/lowbit.rs, whose rule these kernels reproduce in f32).
//
// For one (batch row b, key head g) and query head h of its group, the whole batch row one
// document (the device refuses document ids):
//   mu    = mean_j k_j                                     (f32 sums per chunk, then over chunks)
//   kq_j  = rne((k_j - mu) / sk_G), sk_G = max_{j in G, c} |k_jc - mu_c| / 127, G = j / 64
//   qq_i  = rne(q_i / sq_i),        sq_i = max_c |q_ic| / 127
//   e_ij  = softcap(sq_i sk_G(j) sum_c qq_ic kq_jc + q_i . mu) * scale * log2 e   (log2 units)
//   m_i   = max e_ij over row i's allowed sinks (j < sink) and band (0 <= p_i - j < local)
//   kept: a candidate tile holding an allowed sink / band pair, or with
//         max_{i, j allowed} (e_ij - m_i) >= log2 tau (+inf when m_i = -inf)
// The maximum over j of e_ij within one 64-key group is taken on the int32 products (the scale
// sq_i sk_G > 0, and softcap is monotone), so a row converts once per group.
//
// Kernels, all on the caller's stream, no host synchronisation:
//   sp_lb_mean_part  per (key chunk of LB_KC, b g): channel sums of the chunk
//   sp_lb_mean       per b g: mu from the chunks' sums
//   sp_lb_quant_k    per (64-key group, b g): kq (rows past Sk zero) and sk_G
//   sp_lb_quant_q    per (8 rows, b h): qq, sq_i and q_i . mu
//   sp_lb_score      per (query tile, b h): every candidate's flag (int8 MMA m16n8k32)
//   then sp_coarsen (flags mode) and sp_scan of sparse_vs.cu write the CSR schedule.
// Needs sparse_vs.cu before it (SpParams, sp_cand_kind, sp_frag_row / sp_frag_key, the
// LaFwdParams helpers) and LB_D32: the head dim rounded up to 32 (int8 k-steps).

#define LB_KC 512            // keys per chunk of the mean
#define LB_LD (LB_D32 + 16)  // bytes per row of the int8 tiles in shared memory: ldmatrix rows
                             // of 16 bytes hit distinct banks

struct LbParams {
    float* mu_part;          // [BHk][nkc][LA_D]
    float* mu;               // [BHk][LA_D]
    signed char* kq;         // [BHk][kgroups * 64][LB_D32]
    float* ks;               // [BHk][kgroups]
    signed char* qq;         // [BHq][Sq][LB_D32]
    float* qs;               // [BHq][Sq]
    float* qmu;              // [BHq][Sq]
    unsigned char* flag;     // [copies][ncand]: kept flag per candidate entry
    float log2_tau;
    int sink, local, nkc, kgroups, ncand;
};

__device__ __forceinline__ void lb_mma(int* c, const u32* a, const u32* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ int lb_q8(float x, float s) {
    if (s == 0.f) return 0;
    const int v = __float2int_rn(__fdiv_rn(x, s));
    return max(-127, min(127, v));
}

extern "C" __global__ void __launch_bounds__(128) sp_lb_mean_part(const LaFwdParams p, const LbParams lb) {
    const int bg = blockIdx.y, b = bg / p.Hk, g = bg % p.Hk;
    const int j0 = blockIdx.x * LB_KC, j1 = min(p.Sk, j0 + LB_KC);
    for (int c = threadIdx.x; c < LA_D; c += blockDim.x) {
        float s = 0.f;
        for (int j = j0; j < j1; j++) s += la_to_f32(sp_k_row(p, b, g, j)[c]);
        lb.mu_part[((i64)bg * lb.nkc + blockIdx.x) * LA_D + c] = s;
    }
}

extern "C" __global__ void __launch_bounds__(128) sp_lb_mean(const LaFwdParams p, const LbParams lb) {
    const int bg = blockIdx.x;
    for (int c = threadIdx.x; c < LA_D; c += blockDim.x) {
        float s = 0.f;
        for (int x = 0; x < lb.nkc; x++) s += lb.mu_part[((i64)bg * lb.nkc + x) * LA_D + c];
        lb.mu[(i64)bg * LA_D + c] = s / (float)p.Sk;
    }
}

// Block-wide maximum of non-negative floats (blockDim.x = 256).
__device__ __forceinline__ float lb_block_max(float v, float* ws) {
#pragma unroll
    for (int o = 16; o >= 1; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();
    if ((threadIdx.x & 31) == 0) ws[threadIdx.x >> 5] = v;
    __syncthreads();
    float m = 0.f;
    for (int w = 0; w < (int)(blockDim.x >> 5); w++) m = fmaxf(m, ws[w]);
    return m;
}

extern "C" __global__ void __launch_bounds__(256) sp_lb_quant_k(const LaFwdParams p, const LbParams lb) {
    __shared__ float ws[8];
    const int bg = blockIdx.y, b = bg / p.Hk, g = bg % p.Hk;
    const int j0 = blockIdx.x * 64;
    const float* mu = lb.mu + (i64)bg * LA_D;
    float amax = 0.f;
    for (int x = threadIdx.x; x < 64 * LA_D; x += blockDim.x) {
        const int j = j0 + x / LA_D, c = x % LA_D;
        if (j < p.Sk) amax = fmaxf(amax, fabsf(la_to_f32(sp_k_row(p, b, g, j)[c]) - mu[c]));
    }
    const float s = lb_block_max(amax, ws) / 127.f;
    signed char* out = lb.kq + ((i64)bg * lb.kgroups * 64 + j0) * LB_D32;
    for (int x = threadIdx.x; x < 64 * LB_D32; x += blockDim.x) {
        const int j = j0 + x / LB_D32, c = x % LB_D32;
        int v = 0;
        if (j < p.Sk && c < LA_D) v = lb_q8(la_to_f32(sp_k_row(p, b, g, j)[c]) - mu[c], s);
        out[x] = (signed char)v;
    }
    if (threadIdx.x == 0) lb.ks[(i64)bg * lb.kgroups + blockIdx.x] = s;
}

// One warp per query row.
extern "C" __global__ void __launch_bounds__(256) sp_lb_quant_q(const LaFwdParams p, const LbParams lb) {
    const int bh = blockIdx.y, b = bh / p.Hq, h = bh % p.Hq, g = h / (p.Hq / p.Hk);
    const int i = blockIdx.x * 8 + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (i >= p.Sq) return;
    const u16* q = sp_q_row(p, b, h, i);
    const float* mu = lb.mu + ((i64)b * p.Hk + g) * LA_D;
    float amax = 0.f, dot = 0.f;
    for (int c = lane; c < LA_D; c += 32) {
        const float x = la_to_f32(q[c]);
        amax = fmaxf(amax, fabsf(x));
        dot = fmaf(x, mu[c], dot);
    }
#pragma unroll
    for (int o = 16; o >= 1; o >>= 1) {
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
        dot += __shfl_xor_sync(0xffffffffu, dot, o);
    }
    const float s = amax / 127.f;
    signed char* out = lb.qq + ((i64)bh * p.Sq + i) * LB_D32;
    for (int c = lane; c < LB_D32; c += 32) out[c] = (signed char)(c < LA_D ? lb_q8(la_to_f32(q[c]), s) : 0);
    if (lane == 0) {
        lb.qs[(i64)bh * p.Sq + i] = s;
        lb.qmu[(i64)bh * p.Sq + i] = dot;
    }
}

#define LB_WIN ((LA_BR + 63) / 64)   // 64-row windows of a query tile
#define LB_NONE (-2147483647 - 1)   // no allowed pair yet
#ifndef LB_WARPS
#define LB_WARPS 8                  // warps of sp_lb_score (each owns its candidates)
#endif
#ifndef LB_STAGES
#define LB_STAGES 1                 // key groups in flight per warp (1: fetch after scoring)
#endif
#ifndef LB_MINB
#define LB_MINB 2                   // blocks per SM the registers are capped for
#endif

// sp_lb_score's shared memory: the tile's int8 queries (every warp reads them), a ring of
// LB_STAGES 64-key groups per warp (cp.async), per-row scale, q . mu and reference maximum, and
// the warps' partial reference maxima.
struct LbSmem {
    unsigned char q[LB_WIN * 64 * LB_LD];
    unsigned char ring[LB_WARPS][LB_STAGES][64 * LB_LD];
    float qs[LB_WIN * 64], qmu[LB_WIN * 64], m[LB_WIN * 64];
    float mw[LB_WARPS][LB_WIN * 64];
};

// e (log2 units) of row r of the tile from a product `acc` with the key group's scale `skg`.
__device__ __forceinline__ float lb_logit(const LaFwdParams& p, const LbSmem& sm, int r, float skg, int acc) {
    float x = fmaf(sm.qs[r] * skg, (float)acc, sm.qmu[r]);
#if LA_SOFTCAP
    x = p.cap_post * tanhf(x * p.cap_pre);
#endif
    return x * p.scale_log2;
}

// Queues the copy of key group `grp` of (b g) into `dst` (this warp's lanes; one commit group).
__device__ __forceinline__ void lb_fetch(const LbParams& lb, unsigned char* dst, i64 bg, int grp) {
    constexpr int W = LB_D32 / 16;
    const signed char* src = lb.kq + ((bg * lb.kgroups + grp) * 64) * LB_D32;
    for (int x = threadIdx.x % 32; x < 64 * W; x += 32)
        la_cp_async16(dst + (x / W) * LB_LD + 16 * (x % W), src + 16 * x, 16);
    la_cp_commit();
}

// One warp's int32 products of window `win` (64 rows) with keys [32 half, 32 half + 32) of the
// group in `kb`: acc[mb][nb][e] at row 16 mb + lane / 4 + 8 (e >= 2), key 32 half + 8 nb +
// 2 (lane % 4) + (e & 1) (mma.sync m16n8k32, s8 x s8 -> s32).
__device__ __forceinline__ void lb_products(const LbSmem& sm, const unsigned char* kb, int win, int half,
                                            int acc[4][4][4]) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int mb = 0; mb < 4; mb++)
#pragma unroll
        for (int nb = 0; nb < 4; nb++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[mb][nb][e] = 0;
    const unsigned char* qa = sm.q + (win * 64 + lane % 16) * LB_LD + (lane / 16) * 16;
    const unsigned char* kp = kb + (32 * half + (lane & 7) + ((lane >> 4) << 3)) * LB_LD + ((lane >> 3) & 1) * 16;
#pragma unroll
    for (int k0 = 0; k0 < LB_D32; k0 += 32) {
        u32 b0[4], b1[4];
        la_ldmatrix_x4(b0, kp + k0);               // keys +0 .. 15
        la_ldmatrix_x4(b1, kp + 16 * LB_LD + k0);  // keys +16 .. 31
#pragma unroll
        for (int mb = 0; mb < 4; mb++) {
            u32 a[4];
            la_ldmatrix_x4(a, qa + mb * 16 * LB_LD + k0);
            lb_mma(acc[mb][0], a, b0);
            lb_mma(acc[mb][1], a, b0 + 2);
            lb_mma(acc[mb][2], a, b1);
            lb_mma(acc[mb][3], a, b1 + 2);
        }
    }
}

// Whether (i, j) is allowed in a tile of kind `kind` (1 Full, 2 Partial).
__device__ __forceinline__ bool lb_allowed(const LaFwdParams& p, int kind, int b, int h, int i, int j) {
    return kind == 1 || (kind == 2 && la_mask(p, b, h, i, j));
}

// Block: one (query tile, b h), LB_WARPS warps. First the rows' reference maxima m_i over the
// sink and band groups (split over the warps), then every candidate of the row's schedule, the
// candidates dealt to the warps in turn; a warp streams its candidates' key groups through its
// own ring (LB_STAGES deep) and writes each candidate's flag. No block-wide step after the first.
extern "C" __global__ void __launch_bounds__(LB_WARPS * 32, LB_MINB) sp_lb_score(const LaFwdParams p, const SpParams sp, const LbParams lb) {
    extern __shared__ __align__(16) unsigned char lb_smem[];
    LbSmem& sm = *reinterpret_cast<LbSmem*>(lb_smem);
    // Behind it, the kind of every key tile in this row of the mask's schedule (0 absent).
    unsigned char* kinds = lb_smem + sizeof(LbSmem);
    const int qt = blockIdx.x, bh = blockIdx.y, b = bh / p.Hq, h = bh % p.Hq, g = h / (p.Hq / p.Hk);
    const i64 bg = (i64)b * p.Hk + g;
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int q0 = qt * LA_BR, q1 = min(p.Sq, q0 + LA_BR);
    const int nwin = (q1 - q0 + 63) / 64;
    const int srow = ((b % p.sched_batch) * p.sched_heads + (h % p.sched_heads)) * p.q_tiles + qt;
    const u32 e0 = p.sched_off[srow], ne = p.sched_off[srow + 1] - e0;
    for (int t = threadIdx.x; t < sp.k_tiles; t += blockDim.x) kinds[t] = 0;
    __syncthreads();
    for (u32 x = threadIdx.x; x < ne; x += blockDim.x) {
        const u32 ent = p.sched_ent[e0 + x];
        kinds[ent >> 1] = (unsigned char)(1 + (ent & 1));
    }
    // Queries of the tile, their scales and q . mu; rows past the tile are zero.
    {
        constexpr int W = LB_D32 / 16;
        const uint4* src = reinterpret_cast<const uint4*>(lb.qq + ((i64)bh * p.Sq + q0) * LB_D32);
        for (int x = threadIdx.x; x < LB_WIN * 64 * W; x += blockDim.x) {
            const int r = x / W;
            uint4 v = make_uint4(0, 0, 0, 0);
            if (q0 + r < q1) v = src[x];
            *reinterpret_cast<uint4*>(sm.q + r * LB_LD + 16 * (x % W)) = v;
        }
        for (int r = threadIdx.x; r < LB_WIN * 64; r += blockDim.x) {
            const bool in = q0 + r < q1;
            sm.qs[r] = in ? lb.qs[(i64)bh * p.Sq + q0 + r] : 0.f;
            sm.qmu[r] = in ? lb.qmu[(i64)bh * p.Sq + q0 + r] : 0.f;
            for (int y = 0; y < LB_WARPS; y++) sm.mw[y][r] = -LA_INF;
        }
    }
    __syncthreads();
    const int off = p.Sk - p.Sq;   // p_i = i + off
    // The reference keys of the tile's rows: the sinks [0, sink) and the band
    // [p_q0 - local + 1, p_(q1-1)], in 64-key groups: gs1 + 1 sink groups (0 ..= gs1), then the
    // band's groups gb0 ..= gb1 not among them.
    const int sink_end = min(p.Sk, lb.sink);
    const int band_lo = max(0, q0 + off - lb.local + 1), band_hi = min(p.Sk - 1, q1 - 1 + off);
    const int gs1 = sink_end > 0 ? (sink_end - 1) / 64 : -1;
    const int gb1 = (lb.local > 0 && band_lo <= band_hi) ? band_hi / 64 : -1;
    const int gb0 = max(band_lo / 64, gs1 + 1);
    const int nref = (gs1 + 1) + max(0, gb1 - gb0 + 1);
    unsigned char* ring0 = sm.ring[w][0];
    unsigned char* ring1 = sm.ring[w][LB_STAGES - 1];
    for (int t = w; t < nref; t += LB_WARPS) {
        const int grp = t <= gs1 ? t : gb0 + (t - gs1 - 1);
        lb_fetch(lb, ring0, bg, grp);
        la_cp_wait<0>();
        __syncwarp();
        const float skg = lb.ks[bg * lb.kgroups + grp];
        for (int win = 0; win < nwin; win++)
            for (int half = 0; half < 2; half++) {
                int acc[4][4][4];
                lb_products(sm, ring0, win, half, acc);
#pragma unroll
                for (int mb = 0; mb < 4; mb++)
#pragma unroll
                    for (int hr = 0; hr < 2; hr++) {
                        const int r = win * 64 + 16 * mb + lane / 4 + 8 * hr, i = q0 + r;
                        float mx = -LA_INF;
                        if (i < q1) {
#pragma unroll
                            for (int nb = 0; nb < 4; nb++)
#pragma unroll
                                for (int c = 0; c < 2; c++) {
                                    const int j = grp * 64 + 32 * half + 8 * nb + 2 * (lane % 4) + c;
                                    const int o = i + off - j;
                                    if (j >= p.Sk || !(j < lb.sink || (o >= 0 && o < lb.local))) continue;
                                    if (!lb_allowed(p, kinds[j / LA_BC], b, h, i, j)) continue;
                                    mx = fmaxf(mx, lb_logit(p, sm, r, skg, acc[mb][nb][2 * hr + c]));
                                }
                        }
                        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                        if (lane % 4 == 0 && i < q1) sm.mw[w][r] = fmaxf(sm.mw[w][r], mx);
                    }
            }
        __syncwarp();
    }
    __syncthreads();
    for (int r = threadIdx.x; r < LB_WIN * 64; r += blockDim.x) {
        float m = -LA_INF;
        for (int y = 0; y < LB_WARPS; y++) m = fmaxf(m, sm.mw[y][r]);
        sm.m[r] = m;
    }
    __syncthreads();
    // The candidates: warp w takes entries w, w + LB_WARPS, ...; its items (entry, group) in
    // order, the next item's group fetched after the current one is scored (with two stages:
    // while it is).
    const int copy = (b / p.sched_batch) * (p.Hq / p.sched_heads) + h / p.sched_heads;
    // The item after (x, grp): the next group of entry x, else the first of entry x + LB_WARPS.
    auto first_grp = [&](u32 x) { return (int)(p.sched_ent[e0 + x] >> 1) * LA_BC / 64; };
    u32 x = w;
    if (x >= ne) return;
    int grp = first_grp(x);
    lb_fetch(lb, ring0, bg, grp);
    int stage = 0;
    float best = -LA_INF;
    int forced = 0;
    while (true) {
        const u32 ent = p.sched_ent[e0 + x];
        const int kt = (int)(ent >> 1), kind = 1 + (int)(ent & 1);
        const int k0 = kt * LA_BC, k1 = min(p.Sk, k0 + LA_BC);
        // The next item (with two stages fetched now, into the other stage).
        const bool last_of_entry = grp == (k1 - 1) / 64;
        u32 nx = last_of_entry ? x + LB_WARPS : x;
        int ngrp = last_of_entry ? (nx < ne ? first_grp(nx) : -1) : grp + 1;
        if (LB_STAGES == 2 && ngrp >= 0) {
            lb_fetch(lb, stage ? ring0 : ring1, bg, ngrp);
            la_cp_wait<1>();
        } else {
            la_cp_wait<0>();
        }
        __syncwarp();
        const unsigned char* kb = stage ? ring1 : ring0;
        const float skg = lb.ks[bg * lb.kgroups + grp];
        const int gj0 = grp * 64;
        for (int win = 0; win < nwin; win++) {
            const int i0 = q0 + win * 64, i1 = min(q1, i0 + 64);
            // The group meets no sink and no band key of the window's rows, lies inside the
            // tile and the tile is Full: the rows' maxima straight from the products.
            const bool ref = gj0 < lb.sink
                || (lb.local > 0 && gj0 <= i1 - 1 + off && gj0 + 63 >= i0 + off - lb.local + 1);
            const bool fast = kind == 1 && !ref && gj0 >= k0 && gj0 + 64 <= k1;
            // The rows' largest products over the group's 64 keys (both halves), then one
            // conversion per row.
            int amax[4][2];
#pragma unroll
            for (int mb = 0; mb < 4; mb++) amax[mb][0] = amax[mb][1] = LB_NONE;
            for (int half = 0; half < 2; half++) {
                int acc[4][4][4];
                lb_products(sm, kb, win, half, acc);
#pragma unroll
                for (int mb = 0; mb < 4; mb++)
#pragma unroll
                    for (int hr = 0; hr < 2; hr++) {
                        if (fast) {
#pragma unroll
                            for (int nb = 0; nb < 4; nb++)
                                amax[mb][hr] = max(amax[mb][hr], max(acc[mb][nb][2 * hr], acc[mb][nb][2 * hr + 1]));
                        } else {
                            const int i = i0 + 16 * mb + lane / 4 + 8 * hr;
#pragma unroll
                            for (int nb = 0; nb < 4; nb++)
#pragma unroll
                                for (int c = 0; c < 2; c++) {
                                    const int j = gj0 + 32 * half + 8 * nb + 2 * (lane % 4) + c;
                                    if (i >= q1 || j < k0 || j >= k1 || !lb_allowed(p, kind, b, h, i, j)) continue;
                                    const int o = i + off - j;
                                    forced |= (j < lb.sink || (o >= 0 && o < lb.local));
                                    amax[mb][hr] = max(amax[mb][hr], acc[mb][nb][2 * hr + c]);
                                }
                        }
                    }
            }
#pragma unroll
            for (int mb = 0; mb < 4; mb++)
#pragma unroll
                for (int hr = 0; hr < 2; hr++) {
                    const int r = win * 64 + 16 * mb + lane / 4 + 8 * hr;
                    if (q0 + r >= q1 || amax[mb][hr] == LB_NONE) continue;
                    const float m = sm.m[r];
                    best = fmaxf(best, m == -LA_INF ? LA_INF : lb_logit(p, sm, r, skg, amax[mb][hr]) - m);
                }
        }
        __syncwarp();   // this stage is refilled two items on (one, with one stage)
        if (LB_STAGES == 1 && ngrp >= 0) lb_fetch(lb, ring0, bg, ngrp);
        if (last_of_entry) {
#pragma unroll
            for (int o = 16; o >= 1; o >>= 1) {
                best = fmaxf(best, __shfl_xor_sync(0xffffffffu, best, o));
                forced |= __shfl_xor_sync(0xffffffffu, forced, o);
            }
            if (lane == 0) lb.flag[(i64)copy * lb.ncand + e0 + x] = (unsigned char)(forced || best >= lb.log2_tau);
            best = -LA_INF;
            forced = 0;
        }
        if (ngrp < 0) break;
        x = nx;
        grp = ngrp;
        stage ^= (LB_STAGES == 2);
    }
}
