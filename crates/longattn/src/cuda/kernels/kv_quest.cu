// Quest page selection on the device (kv/cuda.rs; the CPU policy is kv/quest.rs, whose rule these
// kernels apply per KV head with the group's bounds reduced). The cache is ragged per head: pages
// of one KV head [num_pages, P, D], one block table and length per table row r = b Hk + kh.
//
// Per page of a row: the element-wise minimum and maximum of its keys (meta, storage dtype:
// min and max of stored values are stored values). A query q scores the page by the upper bound
//     u(q, page) = sum_d max(q_d min_d, q_d max_d)  >=  q . k  for every key k of the page
// and the row's score is the group's reduction over its G query heads: max, sum or mean of u.
// The decode at position t = len - 1 attends the page being filled (cur = t / P) and the
// n - 1 pages of largest score among pages 0 .. cur - 1, n = max(1, ceil(ceil(budget (t + 1)) / P))
// (ties: the newer page first); n > cur: every page. The kernels write the selected physical pages
// as a block table (ascending logical order, the page being filled last) and the length covered
// ((n - 1) P + the entries of the last page), so the unchanged decode kernel (decode.cu, per-head
// tables) attends exactly the selected keys.
//
// Kernels (the caller's stream, no host synchronisation):
//   la_quest_bounds  per (group of pages, row): meta of every page, or of the last page only
//                    (after an append)
//   la_quest_score   per (group of pages, row): the reduced bound of pages 0 .. cur - 1
//   la_quest_select  per row: radix select of the (n - 1)-th largest score (on the register
//                    path from the keys' first differing bit, stopping at an exact bin), then
//                    one ordered pass writing the table (rows of reg_min < n <= reg_keys <= 8192
//                    candidates from registers, others from shared or global memory)
// Needs: common.cuh, select.cuh, LA_D (multiple of 8), LA_PAGE, LA_F16.

struct LaQuestParams {
    const u16* q;        // [B, Hq, D]
    const u16* k;        // pages [num_pages, P, D]
    u16* meta;           // [num_pages, 2, D]: min, then max
    const int* tables;   // [rows, max_pages]
    const int* lens;     // [rows]
    float* score;        // [rows, score_stride]
    int* sel_tables;     // [rows, sel_pages]
    int* sel_lens;       // [rows]
    double budget;       // fraction of the positions attended, (0, 1]
    int B, Hq, Hk, max_pages;
    int sel_pages, tail_only, reduce, score_stride;   // reduce: 0 max, 1 sum, 2 mean
    int smem_keys;        // rows of at most smem_keys candidates keep their keys in shared memory
    int reg_keys;         // rows of at most reg_keys candidates (<= 1024 LQ_KPT) hold them in registers
    int reg_min;          // ... when they have more than reg_min
};

#define LQ_LPP (LA_D / 8)        // lanes per page (16 bytes each)
#define LQ_KPT 8                 // candidates a thread of la_quest_select holds in registers
#define LQ_PPB (256 / LQ_LPP)    // lane groups (pages at a time) per block of 256 threads
#ifndef LQ_SPP
#define LQ_SPP 3                 // pages each lane group of la_quest_score scores
#endif
#ifndef LQ_PREFIX
#define LQ_PREFIX 1              // register select: from the keys' first differing bit, early stop
#endif

struct alignas(16) lq_v4 {
    u32 x, y, z, w;
};

__device__ __forceinline__ void lq_unpack8(const lq_v4& w, float* f) {
    const u32 a[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        f[2 * i] = la_to_f32((u16)(a[i] & 0xffffu));
        f[2 * i + 1] = la_to_f32((u16)(a[i] >> 16));
    }
}

__device__ __forceinline__ lq_v4 lq_pack8(const float* f) {
    lq_v4 w;
    w.x = la_pack2(f[0], f[1]);
    w.y = la_pack2(f[2], f[3]);
    w.z = la_pack2(f[4], f[5]);
    w.w = la_pack2(f[6], f[7]);
    return w;
}

// Pages a decode at position len - 1 attends (module comment): max(1, ceil(ceil(budget len) / P)).
__device__ __forceinline__ int lq_pages_for(const LaQuestParams& p, int len) {
    const long long tokens = (long long)ceil(p.budget * (double)len);
    const long long n = (tokens + LA_PAGE - 1) / LA_PAGE;
    return n < 1 ? 1 : (int)n;
}

extern "C" __global__ void __launch_bounds__(256) la_quest_bounds(const LaQuestParams p) {
    const int r = blockIdx.y;
    const int len = p.lens[r];
    const int np = (len + LA_PAGE - 1) / LA_PAGE;
    const int sub = threadIdx.x % LQ_LPP;
    int i;
    if (p.tail_only) {   // the last page: one lane group of block 0
        if (blockIdx.x > 0 || threadIdx.x >= LQ_LPP) return;
        i = np - 1;
    } else {
        i = blockIdx.x * LQ_PPB + threadIdx.x / LQ_LPP;
    }
    if (i < 0 || i >= np) return;
    const int page = p.tables[(i64)r * p.max_pages + i];
    const int n = la_imin(LA_PAGE, len - i * LA_PAGE);
    float mn[8], mx[8];
    const u16* src = p.k + (i64)page * LA_PAGE * LA_D + sub * 8;
    lq_unpack8(*(const lq_v4*)src, mn);
#pragma unroll
    for (int e = 0; e < 8; e++) mx[e] = mn[e];
    for (int t = 1; t < n; t++) {
        float f[8];
        lq_unpack8(*(const lq_v4*)(src + (i64)t * LA_D), f);
#pragma unroll
        for (int e = 0; e < 8; e++) {
            mn[e] = fminf(mn[e], f[e]);
            mx[e] = fmaxf(mx[e], f[e]);
        }
    }
    u16* dst = p.meta + (i64)page * 2 * LA_D + sub * 8;
    *(lq_v4*)dst = lq_pack8(mn);
    *(lq_v4*)(dst + LA_D) = lq_pack8(mx);
}

// Each lane group scores LQ_SPP pages (block: LQ_PPB LQ_SPP consecutive pages, group g the pages
// g, g + LQ_PPB, ...): every table and bound load is issued before the first product, and the
// query rows are read once per group for all of them.
extern "C" __global__ void __launch_bounds__(256) la_quest_score(const LaQuestParams p) {
    const int r = blockIdx.y;
    const int b = r / p.Hk, kh = r % p.Hk, G = p.Hq / p.Hk;
    const int len = p.lens[r];
    const int cur = len > 0 ? (len - 1) / LA_PAGE : 0;   // candidates: pages 0 .. cur - 1
    const int i0 = blockIdx.x * (LQ_PPB * LQ_SPP) + threadIdx.x / LQ_LPP;
    if (blockIdx.x * (LQ_PPB * LQ_SPP) >= cur) return;   // the whole block past the candidates
    const int sub = threadIdx.x % LQ_LPP;
    // Every lane stays for the shuffles; lanes past the candidates read nothing, write nothing.
    int page[LQ_SPP];
#pragma unroll
    for (int k = 0; k < LQ_SPP; k++) {
        const int i = i0 + k * LQ_PPB;
        page[k] = i < cur ? p.tables[(i64)r * p.max_pages + i] : -1;
    }
    lq_v4 wmn[LQ_SPP], wmx[LQ_SPP];
#pragma unroll
    for (int k = 0; k < LQ_SPP; k++) {
        wmn[k] = wmx[k] = lq_v4{0u, 0u, 0u, 0u};
        if (page[k] >= 0) {
            const u16* m = p.meta + (i64)page[k] * 2 * LA_D + sub * 8;
            wmn[k] = *(const lq_v4*)m;
            wmx[k] = *(const lq_v4*)(m + LA_D);
        }
    }
    float mn[LQ_SPP][8], mx[LQ_SPP][8], red[LQ_SPP];
#pragma unroll
    for (int k = 0; k < LQ_SPP; k++) {
        lq_unpack8(wmn[k], mn[k]);
        lq_unpack8(wmx[k], mx[k]);
        red[k] = p.reduce == 0 ? -LA_INF : 0.f;
    }
    for (int g = 0; g < G; g++) {
        float q[8];
        lq_unpack8(*(const lq_v4*)(p.q + ((i64)b * p.Hq + kh * G + g) * LA_D + sub * 8), q);
#pragma unroll
        for (int k = 0; k < LQ_SPP; k++) {
            float u = 0.f;
#pragma unroll
            for (int e = 0; e < 8; e++) u += fmaxf(q[e] * mn[k][e], q[e] * mx[k][e]);
#pragma unroll
            for (int off = LQ_LPP / 2; off >= 1; off >>= 1) u += __shfl_xor_sync(0xffffffffu, u, off, LQ_LPP);
            red[k] = p.reduce == 0 ? fmaxf(red[k], u) : red[k] + u;
        }
    }
#pragma unroll
    for (int k = 0; k < LQ_SPP; k++) {
        if (p.reduce == 2) red[k] /= (float)G;
        if (page[k] >= 0 && sub == 0) p.score[(i64)r * p.score_stride + i0 + k * LQ_PPB] = red[k];
    }
}

// The keep rule of la_quest_select for page j (above: key > T, tied: key == T), ab / tb the pages
// above / tied before it, skip = ties - need: its table entry into its slot when kept.
__device__ __forceinline__ void lq_keep(int* out, const int* tab, int j, bool above, bool tied, u32 ab,
                                        u32 tb, u32 skip) {
    if (above || (tied && tb >= skip)) out[ab + (tb > skip ? tb - skip : 0u)] = tab[j];
}

extern "C" __global__ void __launch_bounds__(1024) la_quest_select(const LaQuestParams p) {
    __shared__ u32 ws[32];
    __shared__ u32 hist[256];
    __shared__ u32 pick[2];
    const int r = blockIdx.x;
    const int len = p.lens[r];
    const int* tab = p.tables + (i64)r * p.max_pages;
    int* out = p.sel_tables + (i64)r * p.sel_pages;
    if (len <= 0) {
        if (threadIdx.x == 0) p.sel_lens[r] = 0;
        return;
    }
    const int cur = (len - 1) / LA_PAGE;
    const int n = lq_pages_for(p, len);
    if (n > cur) {   // every page
        for (int i = threadIdx.x; i <= cur; i += blockDim.x) out[i] = tab[i];
        if (threadIdx.x == 0) p.sel_lens[r] = len;
        return;
    }
    const float* x = p.score + (i64)r * p.score_stride;
    // The n - 1 pages of largest score among 0 .. cur - 1 (n > 1): T the (n - 1)-th largest order
    // key; pages with key > T are kept, and of the pages with key == T (tied at the cut) the
    // `need` newest. The ordered passes carry two running counts, above (key > T) and tied (key
    // == T), packed in one scan (low / high 16 bits): tied page of rank t (0-based, by index) is
    // kept when t >= ties - need, and a kept page's slot is above_before + max(0, tied_before -
    // (ties - need)) (lq_keep).
    if (n > 1 && cur > p.reg_min && cur <= p.reg_keys) {
        // Rows of up to 1024 LQ_KPT candidates: thread t holds the order keys of pages
        // t LQ_KPT .. t LQ_KPT + LQ_KPT - 1 in registers, so the ordered pass is one scan (a row
        // counts at most 8192 of each).
        const int j0 = threadIdx.x * LQ_KPT;
        u32 u[LQ_KPT];
#pragma unroll
        for (int i = 0; i < LQ_KPT; i++) u[i] = j0 + i < cur ? la_order_key(x[j0 + i]) : 0u;
        u32 need, cm = 0xffffffffu;   // the cut: keys with (u & cm) > T above, == T tied
        const auto fill = [&](int shift, u32 mask, u32 prefix) {
#pragma unroll
            for (int i = 0; i < LQ_KPT; i++)
                la_hist_add(j0 + i < cur && (u[i] & mask) == prefix, (u[i] >> shift) & 255u, hist);
        };
#if LQ_PREFIX
        // From the highest bit where the row's keys differ, stopping at the first bin that
        // holds exactly the keys still wanted (la_radix_top_in): two passes instead of four on
        // rows of 8192 pages.
        u32 lo = 0xffffffffu, hi = 0u;
#pragma unroll
        for (int i = 0; i < LQ_KPT; i++) {
            if (j0 + i < cur) {
                lo = min(lo, u[i]);
                hi = max(hi, u[i]);
            }
        }
        la_block_minmax(lo, hi, ws);
        const u32 T = la_radix_top_in((u32)(n - 1), lo, hi, fill, hist, pick, need, cm);
#else
        const u32 T = la_radix_nth_by((u32)(n - 1), fill, hist, pick, need);
#endif
        u32 a = 0, t = 0;
#pragma unroll
        for (int i = 0; i < LQ_KPT; i++) {
            a += j0 + i < cur && (u[i] & cm) > T;
            t += j0 + i < cur && (u[i] & cm) == T;
        }
        u32 tot;
        const u32 ex = la_block_scan(a | (t << 16), ws, tot);
        const u32 skip = (tot >> 16) - need;
        u32 ab = ex & 0xffffu, tb = ex >> 16;
#pragma unroll
        for (int i = 0; i < LQ_KPT; i++) {
            const bool in = j0 + i < cur, above = in && (u[i] & cm) > T, tied = in && (u[i] & cm) == T;
            lq_keep(out, tab, j0 + i, above, tied, ab, tb, skip);
            ab += above;
            tb += tied;
        }
    } else if (n > 1) {
        // Longer rows: the order keys, read once into shared memory when they fit (every pass
        // below reads them); one scan per 1024 candidates (a chunk counts at most 1024 of each).
        extern __shared__ u32 lq_keys[];
        const bool in_smem = cur <= p.smem_keys;
        if (in_smem) {
            for (int j = threadIdx.x; j < cur; j += blockDim.x) lq_keys[j] = la_order_key(x[j]);
            __syncthreads();
        }
        auto key = [&](int j) -> u32 { return in_smem ? lq_keys[j] : la_order_key(x[j]); };
        u32 need;
        const u32 T = la_radix_nth(cur, (u32)(n - 1), [&](int j, u32& u) { u = key(j); return true; },
                                   hist, pick, need);
        u32 c = 0;
        for (int j = threadIdx.x; j < cur; j += blockDim.x) c += key(j) == T;
        const u32 skip = la_block_sum(c, ws) - need;
        u32 above0 = 0, tied0 = 0;
        for (int jb = 0; jb < cur; jb += blockDim.x) {
            const int j = jb + threadIdx.x;
            const u32 kj = j < cur ? key(j) : 0u;
            const bool a = j < cur && kj > T, t = j < cur && kj == T;
            u32 tot;
            const u32 ex = la_block_scan((u32)a | ((u32)t << 16), ws, tot);
            lq_keep(out, tab, j, a, t, above0 + (ex & 0xffffu), tied0 + (ex >> 16), skip);
            above0 += tot & 0xffffu;
            tied0 += tot >> 16;
        }
    }
    if (threadIdx.x == 0) {
        out[n - 1] = tab[cur];
        p.sel_lens[r] = (n - 1) * LA_PAGE + (len - cur * LA_PAGE);
    }
}
