// Vertical-slash selection on the device (sparse/cuda.rs; the CPU estimator is
// sparse/estimate.rs `vertical_slash`, whose semantics these kernels reproduce step for step).
//
// For one (batch row b, query head h), with the last L = min(last, Sq) query rows
// i = first .. Sq - 1 (first = Sq - L) and the allowed keys A_i of row i under the caller's mask:
//   s_ij = softcap(scale q_i . k_j)                     (log2 units below: s * log2 e)
//   p_ij = exp(s_ij - LSE_i),  LSE_i = log sum_{j in A_i} exp(s_ij)   (rows with A_i empty: 0)
//   column mass  c_j = sum_i p_ij                        [Sk]
//   diagonal mass d[i + Sk - 1 - j] += p_ij             [Sq + Sk - 1]  (o = p_i - j at o + Sq - 1)
// Kept: the `v` heaviest columns and the `s` heaviest diagonals among those with mass > 0 (ties
// by the lower index), the columns j < sink and the diagonals 0 <= o < local. A candidate tile
// (query tile qt, key tile kt) of the mask's schedule is kept when a kept column lies in
// [k0, k1) or a kept diagonal crosses it: o in [p0 - (k1 - 1), p1 - k0] with p0 / p1 the aligned
// positions of its first / last row. The kept tiles keep their kind (Full / Partial).
//
// Kernels, all on the caller's stream, no host synchronisation:
//   sp_vs_stats   per (key chunk of SP_KC, b h): each row's max and sum of 2^s over the chunk
//   sp_vs_lse     per b h: each row's log2-sum-exp over the chunks
//   sp_vs_mass    per (key chunk, b h): p over the chunk and a halo of L - 1 keys; the chunk's
//                 column masses and the diagonals whose first row meets the chunk (shared-memory
//                 adds: the f32 sums' order, not their terms, varies from run to run)
//   sp_vs_select  per (b h, columns | diagonals): the n-th largest mass by radix select on the
//                 f32 bits, and where ties straddle the cut the last tied index kept
//   sp_vs_flags   per (segment of SP_SEG lines, b h, kind): kept flags (forced lines included),
//   sp_vs_prefix  their prefix counts in the segment, then the earlier segments' totals added
//   sp_coarsen    per (query tile, b h), twice: count the kept candidate entries, then (after
//   sp_scan       the exclusive scan of the counts) write them in order: the CSR schedule the
//                 attention kernels read (`k_tile << 1 | partial`).
// Needs: common.cuh, fwd_params.cuh (LaFwdParams: sizes, strides, logit constants, the mask's
// schedule and constants), the mask program (la_mask), LA_D, LA_BR, LA_BC, LA_SOFTCAP, LA_F16.

#ifndef SP_L
#define SP_L 64      // most last rows
#endif
#define SP_KC 256    // keys per chunk (one per thread in sp_vs_mass)
#define SP_SUB 64    // keys per logits sub-tile
#define SP_LD (LA_D + 8)   // row length (16-bit words) of the q / k tiles: ldmatrix rows hit
                           // distinct banks

struct SpParams {
    float* stats;    // [BH][nchunks][SP_L][2]: (max, sum 2^(s - max)) per row and chunk
    float* lse;      // [BH][SP_L]: log2 sum 2^s (-inf: no allowed key)
    float* col;      // [BH][Sk]
    float* diag;     // [BH][Sq + Sk - 1]
    u32* cp;         // [BH][Sk + 1]: exclusive prefix counts of the kept columns
    u32* dp;         // [BH][Sq + Sk]: of the kept diagonals
    u32* cnt;        // [BH q_tiles]: kept entries per row of the schedule
    u32* off;        // [BH q_tiles + 1]
    u32* ent;        // kept entries (CSR)
    int* thr;        // [BH][2][2]: per (b h, line kind) the n-th largest bits T and the last index
                     // of the lines equal to T that are kept (-1: none)
    u32* seg;        // [BH][2][nseg]: kept lines per segment of SP_SEG
    const unsigned char* flag;   // null: keep by lines; else [copies][ncand] kept flags
                                 // (sparse_lowbit.cu), copy = the (b, h) copy of the mask's row
    int last, nchunks, nv, ns;
    int sink, local, k_tiles, vec;   // vec: q / k rows 16-byte aligned (vector loads)
    int nseg, ncand;                 // ncand: entries of the mask's schedule
};

#define SP_SEG 4096   // lines per block of the flag / prefix kernels (4 per thread)

// Kind of candidate tile (qt, kt) for (b, h): 0 absent, 1 Full, 2 Partial (binary search in
// the mask's CSR row; rows are sorted by key tile).
__device__ __forceinline__ int sp_cand_kind(const LaFwdParams& p, int b, int h, int qt, int kt) {
    const int srow = ((b % p.sched_batch) * p.sched_heads + (h % p.sched_heads)) * p.q_tiles + qt;
    int lo = (int)p.sched_off[srow], hi = (int)p.sched_off[srow + 1] - 1;
    while (lo <= hi) {
        const int m = (lo + hi) >> 1;
        const u32 e = p.sched_ent[m];
        const int t = (int)(e >> 1);
        if (t == kt) return 1 + (int)(e & 1);
        if (t < kt) lo = m + 1; else hi = m - 1;
    }
    return 0;
}

// Shared memory of the logits kernels: the last rows' queries and a key sub-tile (storage
// type, padded rows), the candidate kinds of the tiles the block touches, the cross-warp
// (max, sum) of the stats kernel; sp_vs_mass adds p behind it.
struct SpSmem {
    u16 q[SP_L * SP_LD];
    u16 k[SP_SUB * SP_LD];
    unsigned char kind[4][(SP_KC + SP_L) / 16 + 4];
    float red[2][SP_L][2];
};

__device__ __forceinline__ const u16* sp_q_row(const LaFwdParams& p, int b, int h, int i) {
    return p.q + b * p.q_sb + (i64)i * p.q_ss + h * p.q_sh;
}
__device__ __forceinline__ const u16* sp_k_row(const LaFwdParams& p, int b, int g, int j) {
    return p.k + b * p.k_sb + (i64)j * p.k_ss + g * p.k_sh;
}

// Rows [0, 64) of a tile: row r from `src(r)` when r < n, zeros after; 16-byte copies when the
// rows are aligned, else element by element.
template <typename F>
__device__ __forceinline__ void sp_load_tile(u16* dst, int n, bool vec, F src) {
    if (vec) {
        constexpr int W = LA_D / 8;   // 16-byte words per row
        for (int x = threadIdx.x; x < 64 * W; x += blockDim.x) {
            const int r = x / W, c = x % W;
            uint4 w = make_uint4(0, 0, 0, 0);
            if (r < n) w = reinterpret_cast<const uint4*>(src(r))[c];
            *reinterpret_cast<uint4*>(dst + r * SP_LD + 8 * c) = w;
        }
    } else {
        for (int x = threadIdx.x; x < 64 * LA_D; x += blockDim.x) {
            const int r = x / LA_D, c = x % LA_D;
            dst[r * SP_LD + c] = r < n ? src(r)[c] : (u16)0;
        }
    }
}

// Loads the last rows' queries and the kinds of the candidate tiles over keys [j0, j0 + n).
__device__ void sp_load_rows(const LaFwdParams& p, const SpParams& sp, SpSmem& sm, int b, int h,
                             int first, int nrows, int j0, int n) {
    sp_load_tile(sm.q, nrows, sp.vec != 0, [&](int r) { return sp_q_row(p, b, h, first + r); });
    const int qt0 = first / LA_BR, qt1 = (first + nrows - 1) / LA_BR;
    const int kt0 = j0 / LA_BC, kt1 = (j0 + n - 1) / LA_BC;
    for (int x = threadIdx.x; x < 4 * ((SP_KC + SP_L) / 16 + 4); x += blockDim.x) {
        const int a = x / ((SP_KC + SP_L) / 16 + 4), t = x % ((SP_KC + SP_L) / 16 + 4);
        const int qt = qt0 + a, kt = kt0 + t;
        sm.kind[a][t] = (nrows > 0 && qt <= qt1 && kt <= kt1 && kt < sp.k_tiles)
                            ? (unsigned char)sp_cand_kind(p, b, h, qt, kt) : 0;
    }
}

// Element e (0..3) of n8 block nb of this thread's accumulators: its row (of the 64) and key
// (of the 64) in the m16n8 fragment layout; warp w covers rows 16 (w % 4) .. + 15 and keys
// 32 (w / 4) .. + 31.
__device__ __forceinline__ int sp_frag_row(int e) {
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
    return 16 * (w % 4) + lane / 4 + (e >= 2 ? 8 : 0);
}
__device__ __forceinline__ int sp_frag_key(int nb, int e) {
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
    return 32 * (w / 4) + 8 * nb + 2 * (lane % 4) + (e & 1);
}

// Logits of the block's 64 rows x 64 keys [j0, j0 + 64) in log2 units on the tensor cores
// (S = Q K^T, mma.sync m16n8k16, f32 accumulation; 8 warps of 16 rows x 32 keys): s[nb][e] at
// (sp_frag_row(e), sp_frag_key(nb, e)); -inf where the pair is not allowed, the row is not a
// last row or the key is past Sk.
__device__ void sp_logits(const LaFwdParams& p, const SpParams& sp, SpSmem& sm, int b, int h,
                          int g, int first, int nrows, int jbase, int j0, float s[4][4]) {
    __syncthreads();
    sp_load_tile(sm.k, min(SP_SUB, p.Sk - j0), sp.vec != 0,
                 [&](int r) { return sp_k_row(p, b, g, j0 + r); });
    __syncthreads();
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
    for (int nb = 0; nb < 4; nb++)
#pragma unroll
        for (int e = 0; e < 4; e++) s[nb][e] = 0.f;
    const u16* qa = sm.q + (16 * (w % 4) + lane % 16) * SP_LD + (lane / 16) * 8;
    const u16* kb = sm.k + (32 * (w / 4) + (lane & 7) + ((lane >> 4) << 3)) * SP_LD + ((lane >> 3) & 1) * 8;
#pragma unroll
    for (int k0 = 0; k0 < LA_D; k0 += 16) {
        u32 a[4], b0[4], b1[4];
        la_ldmatrix_x4(a, qa + k0);
        la_ldmatrix_x4(b0, kb + k0);              // keys +0 .. 15
        la_ldmatrix_x4(b1, kb + 16 * SP_LD + k0); // keys +16 .. 31
        la_mma16816(s[0], a, b0);
        la_mma16816(s[1], a, b0 + 2);
        la_mma16816(s[2], a, b1);
        la_mma16816(s[3], a, b1 + 2);
    }
    const int qt0 = first / LA_BR, kt0 = jbase / LA_BC;
#pragma unroll
    for (int nb = 0; nb < 4; nb++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int r = sp_frag_row(e), i = first + r, j = j0 + sp_frag_key(nb, e);
            bool ok = r < nrows && j < p.Sk;
            if (ok) {
                const int kind = sm.kind[i / LA_BR - qt0][j / LA_BC - kt0];
                ok = kind == 1 || (kind == 2 && la_mask(p, b, h, i, j));
            }
            float x = s[nb][e];
#if LA_SOFTCAP
            x = p.cap_post * tanhf(x * p.cap_pre);
#endif
            s[nb][e] = ok ? x * p.scale_log2 : -LA_INF;
        }
}

// Merge of two (max, sum of 2^(s - max)) pairs: m = max(m1, m2), z = z1 2^(m1 - m) + z2 2^(m2 - m).
__device__ __forceinline__ void sp_merge(float& m, float& z, float m2, float z2) {
    const float mn = fmaxf(m, m2);
    if (mn != -LA_INF) {
        z = z * la_exp2(m - mn) + z2 * la_exp2(m2 - mn);
        m = mn;
    }
}

extern "C" __global__ void __launch_bounds__(256) sp_vs_stats(const LaFwdParams p, const SpParams sp) {
    extern __shared__ __align__(16) unsigned char sp_smem[];
    SpSmem& sm = *reinterpret_cast<SpSmem*>(sp_smem);
    const int bh = blockIdx.y, b = bh / p.Hq, h = bh % p.Hq, g = h / (p.Hq / p.Hk);
    const int nrows = min(sp.last, p.Sq), first = p.Sq - nrows;
    const int j0 = blockIdx.x * SP_KC;
    sp_load_rows(p, sp, sm, b, h, first, nrows, j0, min(SP_KC, p.Sk - j0));
    // This thread's two rows (e < 2: row R0, e >= 2: R0 + 8).
    float m[2] = {-LA_INF, -LA_INF}, z[2] = {0.f, 0.f};
    for (int js = j0; js < min(j0 + SP_KC, p.Sk); js += SP_SUB) {
        float s[4][4];
        sp_logits(p, sp, sm, b, h, g, first, nrows, j0, js, s);
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
    // The quad's four lanes share rows, then the two warps of a row band (w, w + 4).
#pragma unroll
    for (int hr = 0; hr < 2; hr++)
#pragma unroll
        for (int o = 1; o <= 2; o <<= 1)
            sp_merge(m[hr], z[hr], __shfl_xor_sync(0xffffffffu, m[hr], o),
                     __shfl_xor_sync(0xffffffffu, z[hr], o));
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane % 4 == 0) {
#pragma unroll
        for (int hr = 0; hr < 2; hr++) {
            const int r = sp_frag_row(2 * hr);
            sm.red[w / 4][r][0] = m[hr];
            sm.red[w / 4][r][1] = z[hr];
        }
    }
    __syncthreads();
    if (threadIdx.x < SP_L) {
        const int r = threadIdx.x;
        float mm = sm.red[0][r][0], zz = sm.red[0][r][1];
        sp_merge(mm, zz, sm.red[1][r][0], sm.red[1][r][1]);
        float* st = sp.stats + ((i64)bh * sp.nchunks + blockIdx.x) * SP_L * 2;
        st[r * 2] = mm;
        st[r * 2 + 1] = zz;
    }
}

// One thread per last row: LSE_i (log2) = M + log2 Z over the chunks' (m, z) pairs.
extern "C" __global__ void sp_vs_lse(const LaFwdParams p, const SpParams sp) {
    const int bh = blockIdx.x, r = threadIdx.x;
    if (r >= SP_L) return;
    const float* st = sp.stats + (i64)bh * sp.nchunks * SP_L * 2;
    float m = -LA_INF, z = 0.f;
    for (int c = 0; c < sp.nchunks; c++) {
        const float m2 = st[(c * SP_L + r) * 2], z2 = st[(c * SP_L + r) * 2 + 1];
        const float mn = fmaxf(m, m2);
        if (mn != -LA_INF) {
            z = z * la_exp2(m - mn) + z2 * la_exp2(m2 - mn);
            m = mn;
        }
    }
    sp.lse[bh * SP_L + r] = m == -LA_INF ? -LA_INF : m + __log2f(z);
}

// p over keys [j0, j0 + SP_KC + L - 1), summed on the fly: column j0 + t (t < SP_KC) over the
// rows; the diagonal whose row `first` meets key j0 + u (u in [0, SP_KC), and in chunk 0 also
// the diagonals whose first rows fall before key 0: u = -(L - 1) .. -1) over p[r][u + r].
// Each (row, key) adds into the one line it owns here: columns by a warp's 16 rows first
// (shuffles), then shared-memory adds; diagonals by shared-memory adds (u = key - row).
extern "C" __global__ void __launch_bounds__(256) sp_vs_mass(const LaFwdParams p, const SpParams sp) {
    extern __shared__ __align__(16) unsigned char sp_smem[];
    SpSmem& sm = *reinterpret_cast<SpSmem*>(sp_smem);
    float* colm = reinterpret_cast<float*>(sp_smem + sizeof(SpSmem));   // [SP_KC]
    float* diagm = colm + SP_KC;                                         // [SP_L + SP_KC], u + SP_L
    const int bh = blockIdx.y, b = bh / p.Hq, h = bh % p.Hq, g = h / (p.Hq / p.Hk);
    const int nrows = min(sp.last, p.Sq), first = p.Sq - nrows;
    const int j0 = blockIdx.x * SP_KC;
    const int span = min(SP_KC + nrows - 1, p.Sk - j0);
    const int umin = blockIdx.x == 0 ? -(nrows - 1) : 0;
    sp_load_rows(p, sp, sm, b, h, first, nrows, j0, span);
    for (int x = threadIdx.x; x < 2 * SP_KC + SP_L; x += blockDim.x) colm[x] = 0.f;
    const float lse0 = sp.lse[bh * SP_L + sp_frag_row(0)];
    const float lse1 = sp.lse[bh * SP_L + sp_frag_row(2)];
    for (int js = j0; js < j0 + span; js += SP_SUB) {
        float s[4][4];
        sp_logits(p, sp, sm, b, h, g, first, nrows, j0, js, s);
#pragma unroll
        for (int nb = 0; nb < 4; nb++) {
            float c2[2];
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const float x = s[nb][e], l = e < 2 ? lse0 : lse1;
                s[nb][e] = (x == -LA_INF || l == -LA_INF) ? 0.f : la_exp2(x - l);
            }
            // Column partials of this lane's two rows, then over the warp's 16 rows (lanes
            // that differ in lane / 4).
            c2[0] = s[nb][0] + s[nb][2];
            c2[1] = s[nb][1] + s[nb][3];
#pragma unroll
            for (int o = 4; o <= 16; o <<= 1) {
                c2[0] += __shfl_xor_sync(0xffffffffu, c2[0], o);
                c2[1] += __shfl_xor_sync(0xffffffffu, c2[1], o);
            }
            const int jj = js - j0 + sp_frag_key(nb, 0);   // even key of this lane's pair
            if ((threadIdx.x % 32) < 4) {
                if (jj < SP_KC) atomicAdd(&colm[jj], c2[0]);
                if (jj + 1 < SP_KC) atomicAdd(&colm[jj + 1], c2[1]);
            }
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int u = js - j0 + sp_frag_key(nb, e) - sp_frag_row(e);
                if (s[nb][e] != 0.f && u >= umin && u < SP_KC) atomicAdd(&diagm[u + SP_L], s[nb][e]);
            }
        }
    }
    __syncthreads();
    const int t = threadIdx.x;
    if (j0 + t < p.Sk) sp.col[(i64)bh * p.Sk + j0 + t] = colm[t];
    const i64 nd = (i64)p.Sq + p.Sk - 1;
    for (int u = umin + t; u < SP_KC; u += blockDim.x) {
        const int jf = j0 + u;   // key of the diagonal in row `first`
        if (jf >= p.Sk) break;
        sp.diag[(i64)bh * nd + (first + p.Sk - 1 - jf)] = diagm[u + SP_L];
    }
}

// The top-n lines among those with mass > 0 (by mass, ties by the lower index), as (T, cut):
// the lines kept are those with bits > T and those equal to T up to index `cut`.
// blockIdx.y: 0 columns, 1 diagonals. The n-th largest value T comes from a radix select on the
// f32 bits (monotone for x >= 0): four passes of 8-bit digits, each a shared histogram of the
// values that match the digits chosen so far.
extern "C" __global__ void __launch_bounds__(1024) sp_vs_select(const LaFwdParams p, const SpParams sp) {
    __shared__ u32 ws[32];
    __shared__ u32 hist[256];
    __shared__ u32 pick[2];
    const int bh = blockIdx.x, diag = blockIdx.y;
    const i64 nd = (i64)p.Sq + p.Sk - 1;
    const int N = diag ? (int)nd : p.Sk;
    const float* x = diag ? sp.diag + (i64)bh * nd : sp.col + (i64)bh * p.Sk;
    const u32 n = (u32)(diag ? sp.ns : sp.nv);
    u32 pos = 0;
    for (int j = threadIdx.x; j < N; j += blockDim.x) pos += __float_as_uint(x[j]) != 0u;
    pos = la_block_sum(pos, ws);
    u32 T, need;
    if (n == 0) {
        T = 0xffffffffu;   // nothing above it
        need = 0;
    } else if (pos <= n) {
        T = 1u;            // every line with mass
        need = n;
    } else {
        // Masses are >= 0: their f32 bits are in value order already.
        T = la_radix_nth(N, n, [&](int j, u32& u) { u = __float_as_uint(x[j]); return u != 0u; },
                         hist, pick, need);
    }
    // Lines equal to T: all kept when they are at most `need`, else the lowest-index `need`
    // (an ordered pass, only then: ties at the cut).
    int cut = -1;
    if (T != 0xffffffffu) {
        u32 eqc = 0;
        for (int j = threadIdx.x; j < N; j += blockDim.x) eqc += __float_as_uint(x[j]) == T;
        eqc = la_block_sum(eqc, ws);
        if (eqc <= need) {
            cut = N;
        } else if (need > 0) {
            u32 before = 0;
            for (int jb = 0; jb < N && before < need; jb += blockDim.x) {
                const int j = jb + threadIdx.x;
                const bool f = j < N && __float_as_uint(x[j]) == T;
                u32 tot;
                const u32 r = before + la_block_scan(f, ws, tot);
                if (f && r == need - 1) pick[0] = (u32)j;
                before += tot;
            }
            __syncthreads();
            cut = (int)pick[0];
        }
    }
    if (threadIdx.x == 0) {
        int* t = sp.thr + (bh * 2 + diag) * 2;
        t[0] = (int)T;
        t[1] = cut;
    }
}

// The kept flags of lines [SP_SEG s, SP_SEG (s + 1)) of (b h, kind): prefix counts inside the
// segment into out[j + 1], the segment's total into seg. Kept: bits > T, bits = T up to the
// cut index, and the forced lines.
extern "C" __global__ void __launch_bounds__(1024) sp_vs_flags(const LaFwdParams p, const SpParams sp) {
    __shared__ u32 ws[32];
    const int s = blockIdx.x, bh = blockIdx.y, diag = blockIdx.z;
    const i64 nd = (i64)p.Sq + p.Sk - 1;
    const int N = diag ? (int)nd : p.Sk;
    const float* x = diag ? sp.diag + (i64)bh * nd : sp.col + (i64)bh * p.Sk;
    u32* out = diag ? sp.dp + (i64)bh * (nd + 1) : sp.cp + (i64)bh * (p.Sk + 1);
    const int f0 = diag ? p.Sq - 1 : 0;
    const int f1 = diag ? (int)min((i64)p.Sq - 1 + sp.local, nd) : min(sp.sink, p.Sk);
    const int* t = sp.thr + (bh * 2 + diag) * 2;
    const u32 T = (u32)t[0];
    const int cut = t[1];
    const int j0 = s * SP_SEG + 4 * threadIdx.x;
    u32 f[4], c = 0;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const int j = j0 + i;
        f[i] = 0;
        if (j < N) {
            const u32 u = __float_as_uint(x[j]);
            f[i] = (u != 0u && (u > T || (u == T && j <= cut))) || (j >= f0 && j < f1);
        }
        c += f[i];
    }
    u32 tot;
    u32 run = la_block_scan(c, ws, tot);
#pragma unroll
    for (int i = 0; i < 4; i++) {
        run += f[i];
        if (j0 + i < N) out[j0 + i + 1] = run;
    }
    if (threadIdx.x == 0) sp.seg[(bh * 2 + diag) * sp.nseg + s] = tot;
}

// Adds the kept lines of the earlier segments to a segment's prefix counts (out[0] = 0).
extern "C" __global__ void __launch_bounds__(1024) sp_vs_prefix(const LaFwdParams p, const SpParams sp) {
    __shared__ u32 off;
    const int s = blockIdx.x, bh = blockIdx.y, diag = blockIdx.z;
    const i64 nd = (i64)p.Sq + p.Sk - 1;
    const int N = diag ? (int)nd : p.Sk;
    u32* out = diag ? sp.dp + (i64)bh * (nd + 1) : sp.cp + (i64)bh * (p.Sk + 1);
    if (threadIdx.x == 0) {
        u32 o = 0;
        const u32* g = sp.seg + (bh * 2 + diag) * sp.nseg;
        for (int i = 0; i < s; i++) o += g[i];
        off = o;
        if (s == 0) out[0] = 0;
    }
    __syncthreads();
    if (off == 0) return;
    for (int j = s * SP_SEG + threadIdx.x; j < min(N, (s + 1) * SP_SEG); j += blockDim.x) out[j + 1] += off;
}

// The candidate entries of schedule row (b h, qt) that a kept column or diagonal crosses (or,
// with sp.flag, that the flags keep): write = 0 counts them into cnt, write = 1 stores them (in order) at off[row].
extern "C" __global__ void __launch_bounds__(128) sp_coarsen(const LaFwdParams p, const SpParams sp, int write) {
    __shared__ u32 ws[32];
    const int qt = blockIdx.x, bh = blockIdx.y, b = bh / p.Hq, h = bh % p.Hq;
    const int row = bh * p.q_tiles + qt;
    const int srow = ((b % p.sched_batch) * p.sched_heads + (h % p.sched_heads)) * p.q_tiles + qt;
    const u32 e0 = p.sched_off[srow], ne = p.sched_off[srow + 1] - e0;
    const i64 nd = (i64)p.Sq + p.Sk - 1;
    const u32* cp = sp.cp + (i64)bh * (p.Sk + 1);
    const u32* dp = sp.dp + (i64)bh * (nd + 1);
    const int q0 = qt * LA_BR, q1 = min(p.Sq, q0 + LA_BR);
    const i64 p0 = (i64)q0 + p.Sk - p.Sq, p1 = (i64)q1 - 1 + p.Sk - p.Sq;
    u32 base = write ? sp.off[row] : 0, total = 0;
    for (u32 x0 = 0; x0 < ne; x0 += blockDim.x) {
        const u32 x = x0 + threadIdx.x;
        bool keep = false;
        u32 ent = 0;
        if (x < ne) {
            ent = p.sched_ent[e0 + x];
            const int kt = (int)(ent >> 1);
            const int k0 = kt * LA_BC, k1 = min(p.Sk, k0 + LA_BC);
            const i64 lo = max(p0 - (k1 - 1) + p.Sq - 1, (i64)0);
            const i64 hi = min(p1 - k0 + p.Sq - 1, nd - 1);
            if (sp.flag) {
                const int copy = (b / p.sched_batch) * (p.Hq / p.sched_heads) + h / p.sched_heads;
                keep = sp.flag[(i64)copy * sp.ncand + e0 + x] != 0;
            } else {
                keep = cp[k1] > cp[k0] || (lo <= hi && dp[hi + 1] > dp[lo]);
            }
        }
        u32 tot;
        const u32 at = la_block_scan(keep, ws, tot);
        if (write && keep) sp.ent[base + at] = ent;
        base += tot;
        total += tot;
    }
    if (!write && threadIdx.x == 0) sp.cnt[row] = total;
}

// off[r] = sum of cnt[0 .. r) for every schedule row, off[rows] = the total (one block).
extern "C" __global__ void __launch_bounds__(1024) sp_scan(const SpParams sp, int rows) {
    __shared__ u32 ws[32];
    const int per = (rows + blockDim.x - 1) / blockDim.x;
    const int a0 = min(rows, (int)threadIdx.x * per), a1 = min(rows, a0 + per);
    u32 s = 0;
    for (int r = a0; r < a1; r++) s += sp.cnt[r];
    u32 tot;
    u32 run = la_block_scan(s, ws, tot);
    for (int r = a0; r < a1; r++) {
        sp.off[r] = run;
        run += sp.cnt[r];
    }
    if (threadIdx.x == 0) sp.off[rows] = tot;
}
