// Query-tile columns (`columns`) on the device, in the gathered form (sparse/columns.rs holds the
// plain reference, `columns::reference`, whose semantics these kernels reproduce step by step;
// f32 here, f64 there: keys at a bin's edge may fall on either side).
//
// Per (batch row b, query head h, query tile qt of LA_BR rows, part = its rows r0 .. r1 - 1):
//   sampled rows  i_s = r0 + floor((s + 1) (r1 - r0) / R) - 1, s < R (R = `rows`; repeats and
//                 values below r0 dropped: CPU `sampled_rows`), n of them
//   s_ij = softcap(scale q_i . k_j) in log2 units; A_i the allowed keys (the mask's candidate
//   tiles: Full every key, Partial the mask program)
//   LSE_i = log2 sum_{j in A_i} 2^s_ij                       (cl_hist's first pass; -inf: A_i empty)
//   m_j   = 1/n sum_{i sampled, A_i not empty} 2^(s_ij - LSE_i)   (the part's mean softmax)
//   bin(m) = clamp(floor(16 (log2 m + 24)), 0, CL_NBIN - 1) for m > 0 (2^(1/16) steps; masses
//            below 2^-24 share bin 0)
//   cut B = the largest bin with sum_{j: bin(m_j) >= B} m_j >= gamma sum_j m_j   (cl_hist's second
//   pass: shared-memory float adds, so a total's rounding, not its terms, varies from run to run;
//   the pass also stores each candidate key's code, 2 + bin(m_j), 1 for no mass, 0 for a key
//   outside the candidates, when ClParams::bins is set)
//   kept keys: m_j > 0 and bin(m_j) >= B, and the sinks j < sink in candidate tiles; not those
//   in the band tiles (cl_emit_stored from the codes, or cl_emit computing the probabilities a
//   third time; ascending, at most the row's capacity)
//   band tiles: the candidate key tiles meeting [p_r0 - (local - 1), p_(r1-1)] (p_i = i + Sk - Sq;
//   none when local = 0), computed whole
// A row keeping more than half its candidate keys (`lim`) runs every candidate tile whole
// instead (a gathered chunk costs about twice a tile). The check (check > 0): over the last query
// tile's rows i with A_i not empty, t = mean_i sum_{j computed for i} 2^(s_ij - LSE_i) (cl_check_lse
// and cl_check, over key chunks of CL_CHUNK keys);
// t < check: every row of (b, h) runs every candidate tile whole. Then cl_lower writes the
// forward's rows (count, sp_scan, write): the kept band tiles (`k_tile << 1 | partial`) then the
// chunks (`LA_GATHERED | chunk << 1 | tested`, LA_BC keys each from gkeys; tested when a Partial
// candidate tile lies within the chunk's key range or the chunk is padded).
//
// A block takes T = CL_T tiles' sampled rows (64 / R tiles, at most 64 rows), row t R + s of the
// block = sampled row s of tile qt0 + t, over keys [0, the tiles' last candidate key) in
// sub-tiles of 64 keys (sp_vs's 64 x 64 tensor-core logits, rows from a table; the candidate
// kinds from a shared-memory window of CL_KW key tiles, the next sub-tile's keys loaded into
// registers during the current one's products).
// CL_INT8 = 1 (`columns(int8=1)`): cl_hist's two passes take the sampled rows' logits from
// sparse_lowbit.cu's int8 queries and keys (its quantizers run first), x_ij = qs_i sk_G(j)
// sum_c qq_ic kq_jc + q_i . mu (mma.sync m16n8k32 s8 x s8 -> s32), then softcap and scale as
// s_ij: lowbit's estimate; the key lists come from the stored codes (the recomputing cl_emit
// is not taken) and the check stays on the exact logits.
// Needs: common.cuh, fwd_params.cuh, the mask program, select.cuh, sparse_vs.cu (tiles, logits
// fragment layout, candidate kinds), sparse_lowbit.cu (LbParams, lb_mma; LB_D32), LA_D, LA_BR,
// LA_BC (a multiple of 64), LA_SOFTCAP, LA_F16, CL_INT8,
// CL_R, CL_CHAINS (1 or 2: accumulator chains of the products), LA_GATHERED_BIT and LA_PAD
// (sparse/gather.rs's GATHERED and PAD).

#define CL_T (64 / CL_R)      // query tiles per block
#define CL_NBIN 384           // mass bins: 16 per octave over [2^-24, 1]
#define CL_KW 32              // key tiles per window of candidate kinds in shared memory
#define CL_CHUNK (LA_BC * CL_KW)   // keys per block of the check (a whole number of windows)
// The mass pass sums a tile's sampled rows in registers (shuffles within the m16n8 fragment)
// when they lie in one 8-row half of a warp's rows: CL_R 1, 2, 4 or 8.
#define CL_REG (CL_R == 1 || CL_R == 2 || CL_R == 4 || CL_R == 8)

struct ClParams {
    float* lse;        // [BH q_tiles][CL_R] sampled rows' LSE (log2; -inf: none)
    int* cut;          // [BH q_tiles] cut bin (-1: no mass)
    u32* nkeys;        // [BH q_tiles] keys kept (may exceed the capacity: then the row is whole)
    u32* gkeys;        // key lists, row r's from kbase[r] (a multiple of LA_BC)
    const u32* kbase;  // [BH q_tiles] (u32 offsets into gkeys)
    const u32* lim;    // [BH q_tiles] most keys the row gathers (half its candidate keys)
    const u32* cap;    // [BH q_tiles] capacity of the row's list (lim rounded up to LA_BC)
    float* chk;        // [BH][halves][nchunk][2] the check's (mass sum, rows) per block
    u32* cnt;          // [BH q_tiles] entries per forward row
    u32* off;          // [BH q_tiles + 1]
    u32* ent;          // the forward's entries
    u16* bins;         // null, or per row the keys' codes (cl_hist writes, cl_emit_stored reads):
                       // 0 not a candidate, 1 candidate with no mass, 2 + bin(m_j)
    const u64* bbase;  // [BH q_tiles + 1] where row r's codes start (multiples of 64 codes)
    float* chkp;       // the check's partial (max, sum) per (bh, half, chunk, row): [.. ][64][2]
    float gamma, check;
    int sink, local;
    int vec;           // q / k rows 16-byte aligned (vector loads)
    int nchunk;        // the check's key chunks (CL_CHUNK keys each)
};

struct ClSmem {
    u16 q[64 * SP_LD];
    u16 k[SP_SUB * SP_LD];
    int row[64];           // block row -> query row (-1: none)
    float lse[64];
    float p[64][65];       // probabilities of a sub-tile (cl_hist, cl_emit, cl_check)
    unsigned char kwin[64][CL_KW];  // per block tile: candidate kinds of key tiles kw0 ..
    u32 kcur[64], kstop[64];        // per block tile: its schedule row's window start, end
    int cnt[64];           // per block tile: its sampled rows
    int kw0;               // first key tile of the window
    int kend;              // keys the block's tiles reach
    float qs[64], qmu[64]; // CL_INT8: the rows' int8 scale and q . mu (sparse_lowbit.cu's)
};

// Registers holding the next 64 key rows (vector loads issued before the current sub-tile's
// products, stored to shared memory after them): the load's latency behind the tensor cores.
struct ClPre {
    uint4 w[(64 * (LA_D / 8) + 255) / 256];
};

__device__ __forceinline__ void cl_fetch(const LaFwdParams& p, bool vec, ClPre& pre, int b, int g, int j0) {
    if (!vec) return;
    constexpr int W = LA_D / 8;
#pragma unroll
    for (int u = 0; u < (64 * W + 255) / 256; u++) {
        const int x = threadIdx.x + 256 * u, r = x / W, c = x % W;
        pre.w[u] = make_uint4(0, 0, 0, 0);
        if (x < 64 * W && j0 + r < p.Sk) pre.w[u] = reinterpret_cast<const uint4*>(sp_k_row(p, b, g, j0 + r))[c];
    }
}

// The key sub-tile [j0, j0 + 64) into sm.k: from the registers cl_fetch filled (vector
// loads), or loaded here (rows not 16-byte aligned). Callers synchronise around it.
__device__ __forceinline__ void cl_store(const LaFwdParams& p, bool vec, const ClPre& pre, u16* dst, int b, int g, int j0) {
    if (vec) {
        constexpr int W = LA_D / 8;
#pragma unroll
        for (int u = 0; u < (64 * W + 255) / 256; u++) {
            const int x = threadIdx.x + 256 * u, r = x / W, c = x % W;
            if (x < 64 * W) *reinterpret_cast<uint4*>(dst + r * SP_LD + 8 * c) = pre.w[u];
        }
    } else {
        sp_load_tile(dst, min(SP_SUB, p.Sk - j0), false, [&](int r) { return sp_k_row(p, b, g, j0 + r); });
    }
}

// The int8 keys (sparse_lowbit.cu's kq: [b g][64-key group][64][LB_D32] bytes) of the sub-tile
// [j0, j0 + 64), one group, into registers (cl_fetch8) and from them into `dst` at rows of
// LB_LD bytes (cl_store8), the int8 twin of cl_fetch / cl_store.
__device__ __forceinline__ void cl_fetch8(const LbParams& lb, ClPre& pre, i64 bg, int j0) {
    constexpr int W = LB_D32 / 16;
    const uint4* src = reinterpret_cast<const uint4*>(lb.kq + (bg * lb.kgroups * 64 + j0) * LB_D32);
#pragma unroll
    for (int u = 0; u < (64 * W + 255) / 256; u++) {
        const int x = threadIdx.x + 256 * u;
        pre.w[u] = x < 64 * W ? src[x] : make_uint4(0, 0, 0, 0);
    }
}

__device__ __forceinline__ void cl_store8(const ClPre& pre, unsigned char* dst) {
    constexpr int W = LB_D32 / 16;
#pragma unroll
    for (int u = 0; u < (64 * W + 255) / 256; u++) {
        const int x = threadIdx.x + 256 * u;
        if (x < 64 * W) *reinterpret_cast<uint4*>(dst + (x / W) * LB_LD + 16 * (x % W)) = pre.w[u];
    }
}

// Sampled row s of the part [r0, r1): the CPU's sampled_rows (ascending, deduplicated, the
// values <= r0 dropped), -1 when this s is a repeat or dropped.
__device__ __forceinline__ int cl_sampled(int r0, int r1, int s) {
    const int v = r0 + (int)(((i64)(s + 1) * (r1 - r0)) / CL_R);
    const int prev = s == 0 ? r0 : r0 + (int)(((i64)s * (r1 - r0)) / CL_R);
    return (v > r0 && v != prev) ? v - 1 : -1;
}

// Block set-up: the row table for tiles qt0 .. qt0 + CL_T - 1 (the check: rows r0 .. r0 + 63 of
// one tile, `check_r0` >= 0), the queries, and the last candidate key of the tiles.
__device__ void cl_setup(const LaFwdParams& p, const ClParams& cp, ClSmem& sm, int b, int h, int qt0, int check_r0) {
    if (threadIdx.x < 64) {
        const int r = threadIdx.x;
        int i = -1;
        if (check_r0 >= 0) {
            i = check_r0 + r < p.Sq ? check_r0 + r : -1;
        } else {
            const int qt = qt0 + r / CL_R;
            if (r < CL_T * CL_R && qt < p.q_tiles)
                i = cl_sampled(qt * LA_BR, min(p.Sq, qt * LA_BR + LA_BR), r % CL_R);
        }
        sm.row[r] = i;
    }
    __syncthreads();
    if (threadIdx.x < 64) {
        int n = 0;
        if (check_r0 < 0)
            for (int x = 0; x < CL_R; x++) n += threadIdx.x < CL_T && sm.row[threadIdx.x * CL_R + x] >= 0;
        sm.cnt[threadIdx.x] = n;
    }
    if (threadIdx.x == 0) {
        int kend = 0;
        const int t1 = check_r0 >= 0 ? 1 : CL_T;
        for (int t = 0; t < t1; t++) {
            const int qt = check_r0 >= 0 ? check_r0 / LA_BR : qt0 + t;
            if (qt >= p.q_tiles) break;
            const int srow = ((b % p.sched_batch) * p.sched_heads + (h % p.sched_heads)) * p.q_tiles + qt;
            const u32 e0 = p.sched_off[srow], e1 = p.sched_off[srow + 1];
            if (e1 > e0) kend = max(kend, min(p.Sk, (int)(p.sched_ent[e1 - 1] >> 1) * LA_BC + LA_BC));
        }
        sm.kend = kend;
    }
    __syncthreads();
    sp_load_tile(sm.q, 64, cp.vec != 0, [&](int r) {
        const int i = sm.row[r];
        return sp_q_row(p, b, h, i < 0 ? 0 : i);
    });
}

// The block's rows in int8 (sparse_lowbit.cu's qq, qs, qmu) over sm.q (rows of LB_LD bytes),
// after cl_setup; rows without a query zero.
__device__ void cl_setup8(const LaFwdParams& p, const LbParams& lb, ClSmem& sm, int bh) {
    __syncthreads();
    unsigned char* q8 = reinterpret_cast<unsigned char*>(sm.q);
    constexpr int W = LB_D32 / 16;
    for (int x = threadIdx.x; x < 64 * W; x += blockDim.x) {
        const int r = x / W, i = sm.row[r];
        uint4 v = make_uint4(0, 0, 0, 0);
        if (i >= 0) v = reinterpret_cast<const uint4*>(lb.qq + ((i64)bh * p.Sq + i) * LB_D32)[x % W];
        *reinterpret_cast<uint4*>(q8 + r * LB_LD + 16 * (x % W)) = v;
    }
    if (threadIdx.x < 64) {
        const int i = sm.row[threadIdx.x];
        sm.qs[threadIdx.x] = i >= 0 ? lb.qs[(i64)bh * p.Sq + i] : 0.f;
        sm.qmu[threadIdx.x] = i >= 0 ? lb.qmu[(i64)bh * p.Sq + i] : 0.f;
    }
    __syncthreads();
}

// The candidate kinds of key tiles kt0 .. kt0 + CL_KW - 1 for the block's tiles (row r's tile:
// r / CL_R, or the check's one tile, t = 0) into sm.kwin: per tile one binary search for the
// window's first entry, then the window's entries read side by side (a row's entries ascend
// by key tile, so the window's are among the CL_KW from there).
__device__ void cl_window(const LaFwdParams& p, ClSmem& sm, int b, int h, int qt0, int check_qt, int kt0) {
    const int nt = check_qt >= 0 ? 1 : CL_T;
    __syncthreads();
    for (int x = threadIdx.x; x < nt * CL_KW; x += blockDim.x) sm.kwin[x / CL_KW][x % CL_KW] = 0;
    if (threadIdx.x < nt) {
        const int qt = check_qt >= 0 ? check_qt : qt0 + threadIdx.x;
        u32 lo = 0, hi = 0;
        if (qt < p.q_tiles) {
            const int srow = ((b % p.sched_batch) * p.sched_heads + (h % p.sched_heads)) * p.q_tiles + qt;
            lo = p.sched_off[srow];
            hi = p.sched_off[srow + 1];
            u32 a = lo, z = hi;   // first entry with key tile >= kt0
            while (a < z) {
                const u32 m = (a + z) >> 1;
                if ((int)(p.sched_ent[m] >> 1) < kt0) a = m + 1; else z = m;
            }
            lo = a;
        }
        sm.kcur[threadIdx.x] = lo;
        sm.kstop[threadIdx.x] = hi;
    }
    if (threadIdx.x == 0) sm.kw0 = kt0;
    __syncthreads();
    for (int x = threadIdx.x; x < nt * CL_KW; x += blockDim.x) {
        const int t = x / CL_KW;
        const u32 at = sm.kcur[t] + (u32)(x % CL_KW);
        if (at < sm.kstop[t]) {
            const u32 e = p.sched_ent[at];
            const int kt = (int)(e >> 1) - kt0;
            if (kt < CL_KW) sm.kwin[t][kt] = (unsigned char)(1 + (e & 1));
        }
    }
    __syncthreads();
}

// Refill the kinds' window where sub-tile j0 starts one (every CL_KW key tiles).
__device__ __forceinline__ void cl_kinds(const LaFwdParams& p, ClSmem& sm, int b, int h, int qt0, int check_qt, int j0) {
    if (j0 % (LA_BC * CL_KW) == 0) cl_window(p, sm, b, h, qt0, check_qt, j0 / LA_BC);
}

// Raw logits x (q . k, or the int8 estimate) of the block's rows x keys [j0, j0 + 64) to log2
// units in place: softcap(x) scale_log2, -inf where the pair is not allowed or there is no row.
// A thread's two rows (elements 0, 1 and 2, 3) each lie in one tile, and the 64 keys in one
// key tile (LA_BC a multiple of 64): one candidate kind per row, read once; only Partial kinds
// and the last sub-tile test element by element.
__device__ __forceinline__ void cl_mask_scale(const LaFwdParams& p, const ClSmem& sm, int b, int h, int j0, bool check,
                                              float s[4][4]) {
    int ri[2], kd[2];
#pragma unroll
    for (int hr = 0; hr < 2; hr++) {
        const int r = sp_frag_row(2 * hr);
        ri[hr] = sm.row[r];
        kd[hr] = ri[hr] >= 0 ? sm.kwin[check ? 0 : r / CL_R][j0 / LA_BC - sm.kw0] : 0;
    }
    const bool each = kd[0] == 2 || kd[1] == 2 || j0 + SP_SUB > p.Sk;
#pragma unroll
    for (int nb = 0; nb < 4; nb++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            bool ok = kd[e / 2] == 1;
            if (each) {
                const int j = j0 + sp_frag_key(nb, e);
                ok = j < p.Sk && (ok || (kd[e / 2] == 2 && la_mask(p, b, h, ri[e / 2], j)));
            }
            float x = s[nb][e];
#if LA_SOFTCAP
            x = p.cap_post * tanhf(x * p.cap_pre);
#endif
            s[nb][e] = ok ? x * p.scale_log2 : -LA_INF;
        }
}

// Logits of the block's 64 rows x keys [j0, j0 + 64) (log2 units; -inf where not allowed or no
// row), in sp_logits' fragment layout. `check`: every row is of the block's one tile.
// `pre` holds keys [j0, j0 + 64) (cl_fetch) and is refilled with the next sub-tile's.
__device__ void cl_logits(const LaFwdParams& p, bool vec, ClSmem& sm, ClPre& pre, int b, int h, int g, int j0, bool check, float s[4][4]) {
    __syncthreads();
    cl_store(p, vec, pre, sm.k, b, g, j0);
    __syncthreads();
    if (j0 + SP_SUB < sm.kend) cl_fetch(p, vec, pre, b, g, j0 + SP_SUB);
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
    for (int nb = 0; nb < 4; nb++)
#pragma unroll
        for (int e = 0; e < 4; e++) s[nb][e] = 0.f;
    const u16* qa = sm.q + (16 * (w % 4) + lane % 16) * SP_LD + (lane / 16) * 8;
    const u16* kb = sm.k + (32 * (w / 4) + (lane & 7) + ((lane >> 4) << 3)) * SP_LD + ((lane >> 3) & 1) * 8;
#if CL_CHAINS == 2
    // Two chains: the even 16-wide steps of the head dimension into s, the odd into s2.
    float s2[4][4];
#pragma unroll
    for (int nb = 0; nb < 4; nb++)
#pragma unroll
        for (int e = 0; e < 4; e++) s2[nb][e] = 0.f;
#endif
#pragma unroll
    for (int k0 = 0; k0 < LA_D; k0 += 16) {
        u32 a[4], b0[4], b1[4];
        la_ldmatrix_x4(a, qa + k0);
        la_ldmatrix_x4(b0, kb + k0);
        la_ldmatrix_x4(b1, kb + 16 * SP_LD + k0);
#if CL_CHAINS == 2
        float(*acc)[4] = (k0 / 16) % 2 ? s2 : s;
#else
        float(*acc)[4] = s;
#endif
        la_mma16816(acc[0], a, b0);
        la_mma16816(acc[1], a, b0 + 2);
        la_mma16816(acc[2], a, b1);
        la_mma16816(acc[3], a, b1 + 2);
    }
#if CL_CHAINS == 2
#pragma unroll
    for (int nb = 0; nb < 4; nb++)
#pragma unroll
        for (int e = 0; e < 4; e++) s[nb][e] += s2[nb][e];
#endif
    cl_mask_scale(p, sm, b, h, j0, check, s);
}

// cl_logits from the int8 rows and keys (sparse_lowbit.cu's quantization; `bg` = b Hk + g):
// the s8 x s8 -> s32 products (mma.sync m16n8k32), then x = qs_i sk_G acc + q_i . mu, as
// lowbit's estimate, masked, soft-capped and scaled by cl_mask_scale. `pre` holds the sub-tile's
// int8 keys (cl_fetch8) and is refilled with the next's.
__device__ void cl_logits8(const LaFwdParams& p, const LbParams& lb, ClSmem& sm, ClPre& pre, int b, int h, i64 bg,
                           int j0, float s[4][4]) {
    __syncthreads();
    cl_store8(pre, reinterpret_cast<unsigned char*>(sm.k));
    __syncthreads();
    if (j0 + SP_SUB < sm.kend) cl_fetch8(lb, pre, bg, j0 + SP_SUB);
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
    int acc[4][4];
#pragma unroll
    for (int nb = 0; nb < 4; nb++)
#pragma unroll
        for (int e = 0; e < 4; e++) acc[nb][e] = 0;
    const unsigned char* qa = reinterpret_cast<const unsigned char*>(sm.q) + (16 * (w % 4) + lane % 16) * LB_LD + (lane / 16) * 16;
    const unsigned char* kb = reinterpret_cast<const unsigned char*>(sm.k) +
                              (32 * (w / 4) + (lane & 7) + ((lane >> 4) << 3)) * LB_LD + ((lane >> 3) & 1) * 16;
#pragma unroll
    for (int k0 = 0; k0 < LB_D32; k0 += 32) {
        u32 a[4], b0[4], b1[4];
        la_ldmatrix_x4(a, qa + k0);
        la_ldmatrix_x4(b0, kb + k0);
        la_ldmatrix_x4(b1, kb + 16 * LB_LD + k0);
        lb_mma(acc[0], a, b0);
        lb_mma(acc[1], a, b0 + 2);
        lb_mma(acc[2], a, b1);
        lb_mma(acc[3], a, b1 + 2);
    }
    const float skg = lb.ks[bg * lb.kgroups + j0 / 64];
#pragma unroll
    for (int nb = 0; nb < 4; nb++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int r = sp_frag_row(e);
            s[nb][e] = fmaf(sm.qs[r] * skg, (float)acc[nb][e], sm.qmu[r]);
        }
    cl_mask_scale(p, sm, b, h, j0, false, s);
}
// Each block row's LSE over keys [jb, je) (jb a multiple of CL_CHUNK) into sm.lse, or with
// `part` its (max, sum), max(s) and sum 2^(s - max) in log2 units, into part[row][2].
// With `lb` (cl_hist under CL_INT8) the logits are cl_logits8's.
__device__ void cl_row_lse(const LaFwdParams& p, bool vec, ClSmem& sm, int b, int h, int g, int qt0, int check_qt, int jb, int je, float* part,
                           const LbParams* lb) {
    float m[2] = {-LA_INF, -LA_INF}, z[2] = {0.f, 0.f};
    const i64 bg = (i64)b * p.Hk + g;
    ClPre pre;
    if (lb != nullptr) cl_fetch8(*lb, pre, bg, jb); else cl_fetch(p, vec, pre, b, g, jb);
    for (int j0 = jb; j0 < je; j0 += SP_SUB) {
        cl_kinds(p, sm, b, h, qt0, check_qt, j0);
        float s[4][4];
        if (lb != nullptr) cl_logits8(p, *lb, sm, pre, b, h, bg, j0, s);
        else cl_logits(p, vec, sm, pre, b, h, g, j0, check_qt >= 0, s);
#pragma unroll
        for (int hr = 0; hr < 2; hr++) {
            float mx = -LA_INF;
#pragma unroll
            for (int nb = 0; nb < 4; nb++) mx = fmaxf(mx, fmaxf(s[nb][2 * hr], s[nb][2 * hr + 1]));
            float zz = 0.f;
            if (mx != -LA_INF) {
#pragma unroll
                for (int nb = 0; nb < 4; nb++)
                    zz += la_exp2(s[nb][2 * hr] - mx) + la_exp2(s[nb][2 * hr + 1] - mx);
            }
            sp_merge(m[hr], z[hr], mx, zz);
        }
    }
#pragma unroll
    for (int hr = 0; hr < 2; hr++)
#pragma unroll
        for (int o = 1; o <= 2; o <<= 1)
            sp_merge(m[hr], z[hr], __shfl_xor_sync(0xffffffffu, m[hr], o), __shfl_xor_sync(0xffffffffu, z[hr], o));
    // The two warps of a row band (w, w + 4) through shared memory (sm.p as scratch).
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane % 4 == 0) {
#pragma unroll
        for (int hr = 0; hr < 2; hr++) {
            const int r = sp_frag_row(2 * hr);
            sm.p[r][(w / 4) * 2] = m[hr];
            sm.p[r][(w / 4) * 2 + 1] = z[hr];
        }
    }
    __syncthreads();
    if (threadIdx.x < 64) {
        const int r = threadIdx.x;
        float mm = sm.p[r][0], zz = sm.p[r][1];
        sp_merge(mm, zz, sm.p[r][2], sm.p[r][3]);
        if (part != nullptr) {
            part[2 * r] = mm;
            part[2 * r + 1] = zz;
        } else {
            sm.lse[r] = mm == -LA_INF ? -LA_INF : mm + __log2f(zz);
        }
    }
    __syncthreads();
}

// The probabilities of keys [j0, j0 + 64) into sm.p[row][key] (0 where not allowed).
// With `lb` the logits are cl_logits8's (cl_hist under CL_INT8).
__device__ void cl_probs(const LaFwdParams& p, bool vec, ClSmem& sm, ClPre& pre, int b, int h, int g, int qt0, int check_qt, int j0,
                         const LbParams* lb) {
    cl_kinds(p, sm, b, h, qt0, check_qt, j0);
    float s[4][4];
    if (lb != nullptr) cl_logits8(p, *lb, sm, pre, b, h, (i64)b * p.Hk + g, j0, s);
    else cl_logits(p, vec, sm, pre, b, h, g, j0, check_qt >= 0, s);
#pragma unroll
    for (int nb = 0; nb < 4; nb++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int r = sp_frag_row(e);
            const float l = sm.lse[r], x = s[nb][e];
            sm.p[r][sp_frag_key(nb, e)] = (x == -LA_INF || l == -LA_INF) ? 0.f : la_exp2(x - l);
        }
    __syncthreads();
}

__device__ __forceinline__ int cl_bin(float m) {
    return max(0, min(CL_NBIN - 1, (int)floorf(16.f * (log2f(m) + 24.f))));
}

// One key of a tile in the mass pass: m = the sum of its n sampled rows' probabilities; its
// mean m / n into the tile's bins `hb`, and its code (0 not a candidate, 1 no mass, 2 + bin).
__device__ __forceinline__ int cl_mass(float m, int n, int kind, float* hb) {
    if (n > 0 && m > 0.f) {
        m /= (float)n;
        const int bn = cl_bin(m);
        atomicAdd(&hb[bn], m);
        return kind != 0 ? 2 + bn : 0;
    }
    return kind != 0;
}

// The band's key tiles of query tile qt: [kt0, kt1] (kt0 > kt1: none).
__device__ __forceinline__ void cl_band(const LaFwdParams& p, int local, int qt, int& kt0, int& kt1) {
    const i64 p0 = (i64)qt * LA_BR + p.Sk - p.Sq, p1 = (i64)min(p.Sq, qt * LA_BR + LA_BR) - 1 + p.Sk - p.Sq;
    const i64 lo = max(p0 - (local - 1), (i64)0), hi = min(p1, (i64)p.Sk - 1);
    if (local <= 0 || lo > hi) {
        kt0 = 1;
        kt1 = 0;
    } else {
        kt0 = (int)(lo / LA_BC);
        kt1 = (int)(hi / LA_BC);
    }
}

// Mean softmax m_j of each of the block's tiles, its bins, and the cut bin per tile.
// CL_INT8: the sampled rows' logits from sparse_lowbit.cu's int8 rows and keys (`lb`, written
// by its quantizers before this kernel), lowbit's estimate; otherwise `lb` is not read.
extern "C" __global__ void __launch_bounds__(256) cl_hist(const LaFwdParams p, const ClParams cp, const LbParams lb) {
    extern __shared__ __align__(16) unsigned char cl_smem[];
    ClSmem& sm = *reinterpret_cast<ClSmem*>(cl_smem);
    float* hist = reinterpret_cast<float*>(cl_smem + sizeof(ClSmem));   // [CL_T][CL_NBIN]
    const int bh = blockIdx.y, b = bh / p.Hq, h = bh % p.Hq, g = h / (p.Hq / p.Hk);
    // The longest tiles (the most keys under a causal mask) first: a shorter tail.
    const int qt0 = (gridDim.x - 1 - blockIdx.x) * CL_T;
    cl_setup(p, cp, sm, b, h, qt0, -1);
    for (int x = threadIdx.x; x < CL_T * CL_NBIN; x += blockDim.x) hist[x] = 0.f;
#if CL_INT8
    cl_setup8(p, lb, sm, bh);
    const LbParams* lbp = &lb;
#else
    const LbParams* lbp = nullptr;
#endif
    const i64 bg = (i64)b * p.Hk + g;
    cl_row_lse(p, cp.vec != 0, sm, b, h, g, qt0, -1, 0, sm.kend, nullptr, lbp);
    if (threadIdx.x < 64) {
        const int r = threadIdx.x, qt = qt0 + r / CL_R;
        if (r < CL_T * CL_R && qt < p.q_tiles) cp.lse[((i64)bh * p.q_tiles + qt) * CL_R + r % CL_R] = sm.lse[r];
    }
    ClPre pre;
    if (lbp != nullptr) cl_fetch8(lb, pre, bg, 0); else cl_fetch(p, cp.vec != 0, pre, b, g, 0);
    for (int j0 = 0; j0 < sm.kend; j0 += SP_SUB) {
#if CL_REG
        // p_ij in registers, summed over each tile's sampled rows by shuffles (its rows are the
        // lanes whose lane / 4 differ in the low log2 CL_R bits), then those lanes bin
        // m_j = sum / n, each for its share of the keys, two keys' codes per store.
        cl_kinds(p, sm, b, h, qt0, -1, j0);
        float sv[4][4];
        if (lbp != nullptr) cl_logits8(p, lb, sm, pre, b, h, bg, j0, sv);
        else cl_logits(p, cp.vec != 0, sm, pre, b, h, g, j0, false, sv);
        const int lane = threadIdx.x % 32, ktw = j0 / LA_BC - sm.kw0;
        float lr[2];
#pragma unroll
        for (int hr = 0; hr < 2; hr++) lr[hr] = sm.lse[sp_frag_row(2 * hr)];
#pragma unroll
        for (int nb = 0; nb < 4; nb++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const float l = lr[e / 2], x = sv[nb][e];
                sv[nb][e] = (x == -LA_INF || l == -LA_INF) ? 0.f : la_exp2(x - l);
            }
#pragma unroll
        for (int o = 4; o < 4 * CL_R; o <<= 1)
#pragma unroll
            for (int nb = 0; nb < 4; nb++)
#pragma unroll
                for (int e = 0; e < 4; e++) sv[nb][e] += __shfl_xor_sync(0xffffffffu, sv[nb][e], o);
        // Every lane of a tile's CL_R row lanes now holds the sums; they share the binning: a
        // thread's 8 key pairs (nb, hr), pair q = u CL_R + c to the lane with (lane / 4) % CL_R
        // = c, so each bins 8 / CL_R pairs (two adjacent keys, one 4-byte code store).
        const int c = (lane / 4) % CL_R;
#pragma unroll
        for (int u = 0; u < 8 / CL_R; u++) {
            float v0 = 0.f, v1 = 0.f;
            int q = 0;
#pragma unroll
            for (int cc = 0; cc < CL_R; cc++)
                if (cc == c) {
                    q = u * CL_R + cc;
                    v0 = sv[q / 2][2 * (q % 2)];
                    v1 = sv[q / 2][2 * (q % 2) + 1];
                }
            const int nb = q / 2, hr = q % 2;
            const int t = sp_frag_row(2 * hr) / CL_R, qt = qt0 + t;
            if (qt >= p.q_tiles) continue;
            const int n = sm.cnt[t], kind = sm.kwin[t][ktw];
            const i64 row = (i64)bh * p.q_tiles + qt;
            const int key0 = sp_frag_key(nb, 2 * hr);
            u32 codes = 0;
#pragma unroll
            for (int e1 = 0; e1 < 2; e1++) {
                int code = cl_mass(e1 ? v1 : v0, n, kind, hist + t * CL_NBIN);
                if (j0 + key0 + e1 >= p.Sk) code = 0;
                codes |= (u32)code << (16 * e1);
            }
            if (cp.bins != nullptr) {
                const u64 b0 = cp.bbase[row], len = cp.bbase[row + 1] - b0;
                if ((u64)(j0 + key0) < len) *reinterpret_cast<u32*>(cp.bins + b0 + j0 + key0) = codes;
            }
        }
#else
        cl_probs(p, cp.vec != 0, sm, pre, b, h, g, qt0, -1, j0, lbp);
        for (int x = threadIdx.x; x < CL_T * 64; x += blockDim.x) {
            const int t = x / 64, c = x % 64;
            float m = 0.f;
            const int n = sm.cnt[t], kind = sm.kwin[t][j0 / LA_BC - sm.kw0];
            for (int s = 0; s < CL_R; s++) m += sm.p[t * CL_R + s][c];
            const int code = cl_mass(m, n, kind, hist + t * CL_NBIN);
            const int qt = qt0 + t;
            if (cp.bins != nullptr && qt < p.q_tiles) {
                const i64 row = (i64)bh * p.q_tiles + qt;
                const u64 b0 = cp.bbase[row];
                if ((u64)(j0 + c) < cp.bbase[row + 1] - b0) cp.bins[b0 + j0 + c] = (u16)(j0 + c < p.Sk ? code : 0);
            }
        }
        __syncthreads();
#endif
    }
    __syncthreads();
    // Cut per tile: the largest B with the mass of bins >= B at least gamma of the total.
    if (threadIdx.x < CL_T && qt0 + (int)threadIdx.x < p.q_tiles) {
        const float* hb = hist + threadIdx.x * CL_NBIN;
        float tot = 0.f;
        for (int x = 0; x < CL_NBIN; x++) tot += hb[x];
        int cut = -1;
        if (tot > 0.f) {
            float acc = 0.f;
            for (cut = CL_NBIN - 1; cut > 0; cut--) {
                acc += hb[cut];
                if (acc >= cp.gamma * tot) break;
            }
        }
        cp.cut[(i64)bh * p.q_tiles + qt0 + threadIdx.x] = cut;
    }
}

// The kept keys of each of the block's tiles, ascending, into the row's list (at most its
// capacity; the count whole), the list padded with LA_PAD to a multiple of LA_BC.
extern "C" __global__ void __launch_bounds__(256) cl_emit(const LaFwdParams p, const ClParams cp) {
    extern __shared__ __align__(16) unsigned char cl_smem[];
    ClSmem& sm = *reinterpret_cast<ClSmem*>(cl_smem);
    u32* cnt = reinterpret_cast<u32*>(cl_smem + sizeof(ClSmem));   // [CL_T] keys so far
    const int bh = blockIdx.y, b = bh / p.Hq, h = bh % p.Hq, g = h / (p.Hq / p.Hk);
    const int qt0 = (gridDim.x - 1 - blockIdx.x) * CL_T;
    cl_setup(p, cp, sm, b, h, qt0, -1);
    if (threadIdx.x < 64) {
        const int r = threadIdx.x, qt = qt0 + r / CL_R;
        sm.lse[r] = (r < CL_T * CL_R && qt < p.q_tiles) ? cp.lse[((i64)bh * p.q_tiles + qt) * CL_R + r % CL_R] : -LA_INF;
    }
    if (threadIdx.x < CL_T) cnt[threadIdx.x] = 0;
    __syncthreads();
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
    ClPre pre;
    cl_fetch(p, cp.vec != 0, pre, b, g, 0);
    for (int j0 = 0; j0 < sm.kend; j0 += SP_SUB) {
        cl_probs(p, cp.vec != 0, sm, pre, b, h, g, qt0, -1, j0, nullptr);
        // Warp w takes tiles w, w + 8, ...: lanes over the 64 keys in two halves.
        for (int t = w; t < CL_T; t += 8) {
            const int qt = qt0 + t;
            if (qt >= p.q_tiles) break;
            const i64 row = (i64)bh * p.q_tiles + qt;
            const int cut = cp.cut[row];
            int bk0, bk1;
            cl_band(p, cp.local, qt, bk0, bk1);
            const int n = sm.cnt[t];
            u32 c = cnt[t];
            const u32 capr = cp.cap[row];
            const u32 base = cp.kbase[row];
            for (int half = 0; half < 2; half++) {
                const int x = half * 32 + lane, j = j0 + x, kt = j / LA_BC;
                bool k = false;
                if (j < p.Sk && !(kt >= bk0 && kt <= bk1) && sm.kwin[t][j0 / LA_BC - sm.kw0] != 0) {
                    float m = 0.f;
                    for (int s = 0; s < CL_R; s++) m += sm.p[t * CL_R + s][x];
                    k = j < cp.sink || (n > 0 && m > 0.f && cut >= 0 && cl_bin(m / (float)n) >= cut);
                }
                const u32 bal = __ballot_sync(0xffffffffu, k);
                const u32 at = c + __popc(bal & ((1u << lane) - 1));
                if (k && at < capr) cp.gkeys[base + at] = (u32)j;
                c += __popc(bal);
            }
            if (lane == 0) cnt[t] = c;
            __syncwarp();
        }
        __syncthreads();
    }
    // Counts, and the padding of the last chunk.
    for (int t = w; t < CL_T; t += 8) {
        const int qt = qt0 + t;
        if (qt >= p.q_tiles) break;
        const i64 row = (i64)bh * p.q_tiles + qt;
        const u32 c = cnt[t], capr = cp.cap[row];
        if (lane == 0) cp.nkeys[row] = c;
        if (c <= capr)
            for (u32 x = c + lane; x < min(capr, (c + LA_BC - 1) / LA_BC * LA_BC); x += 32) cp.gkeys[cp.kbase[row] + x] = LA_PAD;
    }
}

// cl_emit from the codes cl_hist stored (cp.bins): the same keys as cl_emit without a third
// pass over Q K^T. One warp per row (b h, qt), 8 rows a block; lane l reads codes 8 l .. 8 l + 7
// of each 256-key step (one 16-byte load) and the warp's prefix sum of the kept counts places
// them ascending.
extern "C" __global__ void __launch_bounds__(256) cl_emit_stored(const LaFwdParams p, const ClParams cp) {
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int qt = blockIdx.x * 8 + w, bh = blockIdx.y;
    if (qt >= p.q_tiles) return;
    const i64 row = (i64)bh * p.q_tiles + qt;
    const int cut = cp.cut[row];
    int bk0, bk1;
    cl_band(p, cp.local, qt, bk0, bk1);
    const u64 b0 = cp.bbase[row];
    const int len = (int)(cp.bbase[row + 1] - b0);
    const u32 capr = cp.cap[row], base = cp.kbase[row];
    u32 c = 0;
    // Four 256-key steps' loads issued together (1 KB a warp each), then placed in order.
    for (int j00 = 0; j00 < len; j00 += 4 * 256) {
        uint4 raw[4];
#pragma unroll
        for (int st = 0; st < 4; st++) {
            const int j = j00 + 256 * st + 8 * lane;
            raw[st] = j < len ? *reinterpret_cast<const uint4*>(cp.bins + b0 + j) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int st = 0; st < 4; st++) {
            const int j = j00 + 256 * st + 8 * lane;
            const u16* code = reinterpret_cast<const u16*>(&raw[st]);
            u32 keep = 0;
#pragma unroll
            for (int e = 0; e < 8; e++) {
                const int jj = j + e, kt = jj / LA_BC, x = code[e];
                const bool k = x != 0 && !(kt >= bk0 && kt <= bk1) && (jj < cp.sink || (x >= 2 && cut >= 0 && x - 2 >= cut));
                keep |= (u32)k << e;
            }
            const u32 n = __popc(keep);
            u32 incl = n;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const u32 y = __shfl_up_sync(0xffffffffu, incl, o);
                if (lane >= o) incl += y;
            }
            u32 at = c + incl - n;
#pragma unroll
            for (int e = 0; e < 8; e++)
                if (keep >> e & 1) {
                    if (at < capr) cp.gkeys[base + at] = (u32)(j + e);
                    at++;
                }
            c += __shfl_sync(0xffffffffu, incl, 31);
        }
    }
    if (lane == 0) cp.nkeys[row] = c;
    if (c <= capr)
        for (u32 x = c + lane; x < min(capr, (c + LA_BC - 1) / LA_BC * LA_BC); x += 32) cp.gkeys[base + x] = LA_PAD;
}

// The check over the last query tile's rows r0 = qt BR + 64 blockIdx.x .. r0 + 63 (a half),
// split over key chunks c = blockIdx.y of CL_CHUNK keys for parallelism: cl_check_lse writes
// each chunk's (max, sum) of the rows' logits; cl_check merges them into the rows' LSE,
//   LSE_i = M + log2 sum_c z_c 2^(m_c - M),  M = max_c m_c,
// and sums over its chunk the mass on the pairs the forward computes, t_i = sum_j 2^(s_ij -
// LSE_i), into chk (the block's sum over rows with allowed keys, and their count); cl_lower adds
// the blocks' sums in a fixed order.
__device__ __forceinline__ i64 cl_check_slot(const ClParams& cp, int bh) {
    return ((i64)bh * gridDim.x + blockIdx.x) * cp.nchunk + blockIdx.y;
}

extern "C" __global__ void __launch_bounds__(256) cl_check_lse(const LaFwdParams p, const ClParams cp) {
    extern __shared__ __align__(16) unsigned char cl_smem[];
    ClSmem& sm = *reinterpret_cast<ClSmem*>(cl_smem);
    const int bh = blockIdx.z, b = bh / p.Hq, h = bh % p.Hq, g = h / (p.Hq / p.Hk);
    const int qt = p.q_tiles - 1, r0 = qt * LA_BR + 64 * blockIdx.x;
    if (r0 >= p.Sq) return;
    cl_setup(p, cp, sm, b, h, 0, r0);
    const int jb = blockIdx.y * CL_CHUNK, je = min(sm.kend, jb + CL_CHUNK);
    float* part = cp.chkp + cl_check_slot(cp, bh) * 128;
    cl_row_lse(p, cp.vec != 0, sm, b, h, g, -1, qt, jb, je, part, nullptr);
}

extern "C" __global__ void __launch_bounds__(256) cl_check(const LaFwdParams p, const ClParams cp) {
    extern __shared__ __align__(16) unsigned char cl_smem[];
    ClSmem& sm = *reinterpret_cast<ClSmem*>(cl_smem);
    unsigned char* kf = reinterpret_cast<unsigned char*>(cl_smem + sizeof(ClSmem));   // [64] kept flags
    __shared__ u32 cursor;
    const int bh = blockIdx.z, b = bh / p.Hq, h = bh % p.Hq, g = h / (p.Hq / p.Hk);
    const int qt = p.q_tiles - 1, r0 = qt * LA_BR + 64 * blockIdx.x;
    if (r0 >= p.Sq) return;
    const i64 row = (i64)bh * p.q_tiles + qt;
    const u32 nk = cp.nkeys[row];
    const bool whole = nk > cp.lim[row];
    cl_setup(p, cp, sm, b, h, 0, r0);
    const int jb = blockIdx.y * CL_CHUNK, je = min(sm.kend, jb + CL_CHUNK);
    // The rows' LSE from every chunk's (max, sum).
    if (threadIdx.x < 64) {
        const int r = threadIdx.x;
        const float* part = cp.chkp + (cl_check_slot(cp, bh) - blockIdx.y) * 128;
        float mm = -LA_INF, zz = 0.f;
        for (int c = 0; c < cp.nchunk; c++) sp_merge(mm, zz, part[c * 128 + 2 * r], part[c * 128 + 2 * r + 1]);
        sm.lse[r] = mm == -LA_INF ? -LA_INF : mm + __log2f(zz);
    }
    int bk0, bk1;
    cl_band(p, cp.local, qt, bk0, bk1);
    if (threadIdx.x == 0) {
        // The kept list is ascending: the first of its keys at or past jb.
        const u32* lk = cp.gkeys + cp.kbase[row];
        u32 a = 0, z = whole ? 0 : nk;
        while (a < z) {
            const u32 m = (a + z) >> 1;
            if (lk[m] < (u32)jb) a = m + 1; else z = m;
        }
        cursor = a;
    }
    __syncthreads();
    // Per row (threads 0..63): the mass on computed pairs.
    float t = 0.f;
    ClPre pre;
    cl_fetch(p, cp.vec != 0, pre, b, g, jb);
    for (int j0 = jb; j0 < je; j0 += SP_SUB) {
        cl_probs(p, cp.vec != 0, sm, pre, b, h, g, -1, qt, j0, nullptr);
        if (threadIdx.x < 64) kf[threadIdx.x] = whole || (j0 + (int)threadIdx.x) / LA_BC >= bk0 && (j0 + (int)threadIdx.x) / LA_BC <= bk1;
        __syncthreads();
        if (threadIdx.x == 0 && !whole) {
            // Its keys in [j0, j0 + 64) follow the cursor.
            u32 c = cursor;
            const u32* lk = cp.gkeys + cp.kbase[row];
            while (c < nk && lk[c] < (u32)(j0 + 64)) {
                if (lk[c] >= (u32)j0) kf[lk[c] - j0] = 1;
                c++;
            }
            cursor = c;
        }
        __syncthreads();
        if (threadIdx.x < 64)
            for (int x = 0; x < 64; x++) t += kf[x] ? sm.p[threadIdx.x][x] : 0.f;
        __syncthreads();
    }
    __shared__ float red[2][64];
    if (threadIdx.x < 64) {
        const bool ok = sm.row[threadIdx.x] >= 0 && sm.lse[threadIdx.x] != -LA_INF;
        red[0][threadIdx.x] = ok ? t : 0.f;
        red[1][threadIdx.x] = ok ? 1.f : 0.f;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        float a = 0.f, n = 0.f;
        for (int x = 0; x < 64; x++) {
            a += red[0][x];
            n += red[1][x];
        }
        const i64 at = cl_check_slot(cp, bh);
        cp.chk[2 * at] = a;
        cp.chk[2 * at + 1] = n;
    }
}

// The forward's row (b h, qt): `write` = 0 counts its entries into cnt, 1 stores them at off.
// Whole (every candidate tile): the check failed for (b, h) or the row keeps more than lim keys.
extern "C" __global__ void __launch_bounds__(128) cl_lower(const LaFwdParams p, const ClParams cp, int write) {
    __shared__ u32 ws[32];
    __shared__ int part[32];
    __shared__ int npart;
    const int qt = blockIdx.x, bh = blockIdx.y, b = bh / p.Hq, h = bh % p.Hq;
    const i64 row = (i64)bh * p.q_tiles + qt;
    const int srow = ((b % p.sched_batch) * p.sched_heads + (h % p.sched_heads)) * p.q_tiles + qt;
    const u32 e0 = p.sched_off[srow], ne = p.sched_off[srow + 1] - e0;
    const u32 nk = cp.nkeys[row];
    bool whole = nk > cp.lim[row];
    if (cp.check > 0.f) {
        // The check's blocks (halves x chunks), in order; each chunk counts the half's rows.
        float a = 0.f, n = 0.f;
        const int halves = (LA_BR + 63) / 64;
        for (int x = 0; x < halves * cp.nchunk; x++) {
            const float* c = cp.chk + 2 * ((i64)bh * halves * cp.nchunk + x);
            a += c[0];
            if (x % cp.nchunk == 0) n += c[1];
        }
        whole = whole || (n > 0.f && a / n < cp.check);
    }
    int bk0, bk1;
    cl_band(p, cp.local, qt, bk0, bk1);
    if (threadIdx.x == 0) npart = 0;
    __syncthreads();
    u32 base = write ? cp.off[row] : 0, total = 0;
    for (u32 x0 = 0; x0 < ne; x0 += blockDim.x) {
        const u32 x = x0 + threadIdx.x;
        bool keep = false;
        u32 e = 0;
        if (x < ne) {
            e = p.sched_ent[e0 + x];
            const int kt = (int)(e >> 1);
            keep = whole || (kt >= bk0 && kt <= bk1);
            // Partial candidate tiles outside the band: the chunks' test below.
            if (!whole && !keep && (e & 1)) {
                const int at = atomicAdd(&npart, 1);
                if (at < 32) part[at] = kt;
            }
        }
        u32 tot;
        const u32 at = la_block_scan(keep, ws, tot);
        if (write && keep) cp.ent[base + at] = e;
        base += tot;
        total += tot;
    }
    __syncthreads();
    if (!whole) {
        const u32 nch = (nk + LA_BC - 1) / LA_BC;
        const u32 kb = cp.kbase[row];
        const u32* lk = cp.gkeys + kb;
        if (write) {
            for (u32 c = threadIdx.x; c < nch; c += blockDim.x) {
                const u32 a = lk[c * LA_BC], z = lk[min(nk, c * LA_BC + LA_BC) - 1];
                bool tested = (c + 1) * LA_BC > nk || npart > 32;
                for (int x = 0; x < min(npart, 32) && !tested; x++) {
                    const u32 k0 = (u32)part[x] * LA_BC;
                    tested = k0 <= z && a < k0 + LA_BC;
                }
                cp.ent[base + c] = LA_GATHERED_BIT | ((kb / LA_BC + c) << 1) | (u32)tested;
            }
        }
        total += nch;
    }
    if (!write && threadIdx.x == 0) cp.cnt[row] = total;
}
