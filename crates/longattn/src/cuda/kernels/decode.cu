// Paged KV-cache decode: one query token per sequence against its cached keys, split over key
// ranges, merged by LSE. The CPU twin (same split, same merge) is crates/longattn/src/kv/decode.rs.
//
// Compile-time constants (set by the host in cuda/decode.rs):
//   LA_F16     1 = f16, 0 = bf16 (q, pages and output)
//   LA_D       head dim: 32, 64, 128 or 256 (LA_D / 8 lanes hold one token's row)
//   LA_G       query heads per block (a divisor of the group Hq / Hk, <= 8)
//   LA_PAGE    tokens per page (16..256); 0 = contiguous cache [B, seq_cap, Hk, D]
//   LA_SOFTCAP 1 = x -> c tanh(x / c)
//   LA_WARPS   warps per block
//   LA_U       tokens each lane group loads per iteration (loads in flight)
//   LA_NS      0: K/V go straight to registers; >= 2: a ring of LA_NS stages in shared memory
//              filled by cp.async (each lane copies, then reads back, its own 16-byte pieces:
//              no block barrier), LA_NS - 1 iterations of loads in flight
//   LA_MMA     1 = the tensor-core kernel (below; D <= 128, LA_NS >= 2), 0 = lane groups
//   LA_MERGE_ONLY 1 = only la_decode_merge (needs LA_F16 and LA_D; one module per dtype and D)
//   LA_KIVI    1 = neither decode kernel (kv_kivi.cu follows with its own, over quantized pages)
//   LA_SCORE   1 = the tensor-core kernel also folds press scores (LaDecParams' score fields), of
//              kind LA_SCORE_KIND (0 H2O, 1 A2SF, 2 TOVA) reduced over the group by
//              LA_SCORE_REDUCE (0 max, 1 sum, 2 mean)
//
// Tables at run time (`head_tables`): 0 = one block table and length per sequence, pages
// [num_pages, P, Hk, D]; 1 = one per (sequence, KV head) (a compressed, ragged cache: table row
// b Hk + kh, pages of one KV head [num_pages, P, D]). Everything below reads "the table row of
// (b, kh)" for "sequence b"; the split and the merge are the same.
//
// Work: block (split x, KV head kh and head chunk, sequence b) attends the LA_G query heads
// h0 .. h0 + LA_G (all reading KV head kh: each K/V row is loaded once for all of them, GQA
// packing) over keys x * split_len .. min((x + 1) * split_len, len). A warp is 32 / (D / 8) lane
// groups; a group holds one token: each lane 16 bytes (8 elements) of its K and V rows, loaded
// with ld.global.nc.v4 (LA_U tokens per group in flight). Per iteration and head, each group runs
// the online softmax over its tokens (logits x in log2 units, pre-scaled q):
//     m' = max(m, max_u x_u),  p_u = 2^(x_u - m'),  l' = 2^(m - m') l + sum_u p_u,
//     acc' = 2^(m - m') acc + sum_u p_u v_u
// and at the end the groups' and warps' states are merged (the same rule with two states).
// With one split the block writes the final o = acc / l (storage dtype) and lse = ln2 (m + log2 l);
// with several it writes f32 partials to the workspace and la_decode_merge combines them.

struct LaDecParams {
    const u16* q;          // [B, Hq, D]
    const u16* k;          // paged: [num_pages, P, Hk, D]; contiguous: [B, seq_cap, Hk, D]
    const u16* v;
    const int* tables;     // [B, max_pages] (paged), [B, Hk, max_pages] with head_tables
    const int* lens;       // [B], [B, Hk] with head_tables
    u16* o;                // [B, Hq, D]
    float* lse;            // [B, Hq]
    float* o_part;         // [B * Hq, num_splits, D]   (num_splits > 1)
    float* lse_part;       // [B * Hq, num_splits]
    i64 seq_cap;           // contiguous: token slots per sequence
    int B, Hq, Hk, max_pages;
    int num_splits, split_len, head_chunks, head_tables;
    float q_scale;         // scale log2 e, or scale / c with soft-cap
    float cap_mul;         // c log2 e (soft-cap)
    // KIVI (kv_kivi.cu): quantized pages before the full-precision ones; null otherwise
    const unsigned char* qpages;   // [num_qpages, page bytes]
    const int* qtables;            // [B, Hk, qmax_pages]
    const int* qlens;              // [B, Hk] quantized entries (a row's length is qlens + lens)
    int qmax_pages, qpad;
    // Split merge fused into the decode kernel: a ticket per (sequence, KV head, head chunk)
    // [B, Hk, head_chunks], zero between launches (the merging block resets its own); null: the
    // separate la_decode_merge kernel merges.
    int* tickets;
    // Press scores folded inside the tensor-core kernel (LA_SCORE, kv/score_cuda.rs): the
    // previous step's query q_prev [B, Hq, D] and LSE lse_prev [B, Hq] (natural log) give
    // P_prev[h, j] = exp(s(q_prev_h, k_j) - lse_prev_h) for the keys it saw, j < len -
    // score_prev_new, reduced over the group into c[j] (LA_SCORE_REDUCE: 0 max, 1 sum, 2 mean),
    // and score[j] = decay score[j] + c[j] (LA_SCORE_KIND: 0 H2O decay 1, 1 A2SF decay score_f,
    // 2 TOVA decay 0) for row trow of score [rows, score_cap]. score null: no fold this launch.
    const u16* q_prev;
    const float* lse_prev;
    float* score;
    int score_cap, score_prev_new;
    float score_f;
    int score_pad;
};
#ifndef LA_SCORE
#define LA_SCORE 0
#endif
// LA_SCORE_RED (H2O; the host's default, `LONGATTN_CUDA_DECODE_FOLD_RED=0` for the copy): the
// fold adds c to score[j] with a reduction at L2 (red.global.add.f32, one request a tile's 16
// keys) instead of copying the old scores in with the tile and storing old + c (two). Each key
// has one writer, so the sum is the same f32 old + c, except that the reduction flushes
// subnormals to zero: sums and maxima of the group's 2^x (ex2.approx: 0 or normal) never are, the
// mean's c = v / G can be (an error below 2^-126).
#ifndef LA_SCORE_RED
#define LA_SCORE_RED 0
#endif
// The fold reads the old scores (H2O without LA_SCORE_RED, A2SF; TOVA overwrites them).
#define LA_SCORE_READS (LA_SCORE && (LA_SCORE_KIND == 1 || (LA_SCORE_KIND == 0 && !LA_SCORE_RED)))
// The fold's kind and group reduction are compile-time constants of an LA_SCORE variant: no
// run-time branch or select on them in the tile loop.
#if LA_SCORE && (!defined(LA_SCORE_KIND) || !defined(LA_SCORE_REDUCE))
#error "LA_SCORE needs LA_SCORE_KIND (0 H2O, 1 A2SF, 2 TOVA) and LA_SCORE_REDUCE (0 max, 1 sum, 2 mean)"
#endif

#define LA_LPT (LA_D / 8)             // lanes per token
#define LA_TPW (32 / LA_LPT)          // tokens per warp and load step
#define LA_STEP (LA_WARPS * LA_TPW)   // tokens per block and load step
#define LA_ITER (LA_STEP * LA_U)      // tokens per block iteration
#define LA_FULL 0xffffffffu

struct alignas(16) la_v4 {
    u32 x, y, z, w;
};

// 16-byte read-only load that does not allocate in L1 (each byte of K/V is read once).
__device__ __forceinline__ la_v4 la_ldg16(const u16* p) {
    la_v4 r;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
        : "l"(p));
    return r;
}


// Packed pair of the storage type -> two f32 (lo = low half).
__device__ __forceinline__ void la_unpack2(u32 w, float& lo, float& hi) {
#if LA_F16
    lo = la_to_f32((u16)(w & 0xffffu));
    hi = la_to_f32((u16)(w >> 16));
#else
    lo = __uint_as_float(w << 16);
    hi = __uint_as_float(w & 0xffff0000u);
#endif
}

__device__ __forceinline__ void la_unpack8(const la_v4& w, float* f) {
    la_unpack2(w.x, f[0], f[1]);
    la_unpack2(w.y, f[2], f[3]);
    la_unpack2(w.z, f[4], f[5]);
    la_unpack2(w.w, f[6], f[7]);
}

// Element offset of the K/V row of (sequence b, position j, KV head kh), at this lane's 8 elements
// (pages of one KV head with head_tables: kh's rows are the page's only rows).
__device__ __forceinline__ i64 la_row(const LaDecParams& p, int page, int b, int j, int kh, int sub) {
#if LA_PAGE
    if (p.head_tables) return ((i64)page * LA_PAGE + (j % LA_PAGE)) * LA_D + sub * 8;
    return (((i64)page * LA_PAGE + (j % LA_PAGE)) * p.Hk + kh) * LA_D + sub * 8;
#else
    return (((i64)b * p.seq_cap + j) * p.Hk + kh) * LA_D + sub * 8;
#endif
}

// Merge of the splits of one output row (b, h) by one warp. With the partials (o_i, lse_i) of
// the splits that hold keys, i < n = ceil(len / split_len), over disjoint key ranges:
//     lse = log sum_i exp(lse_i) = M + log sum_i exp(lse_i - M),   M = max_i lse_i,
//     o   = sum_i exp(lse_i - lse) o_i
// (relative to M, so no exp overflows). Split 0 always writes a partial (-inf for length 0);
// only -inf partials: o = 0, lse = -inf. The partials are read through L2 (ld.cg): with the fused merge other blocks wrote them.
#ifndef LA_MAX_SPLITS
#define LA_MAX_SPLITS 128   // kv::decode::MAX_SPLITS (set by the host)
#endif
__device__ __forceinline__ void la_merge_row(const LaDecParams& p, int row, int lane, float* w) {
    const int b = row / p.Hq, kh = (row % p.Hq) / (p.Hq / p.Hk);
    const int trow = p.head_tables ? b * p.Hk + kh : b;
    const int len = p.lens[trow] + (p.qlens ? p.qlens[trow] : 0);
    const int n = la_imin(p.num_splits, la_imax(1, (len + p.split_len - 1) / p.split_len));
    const float* lp = p.lse_part + (i64)row * p.num_splits;
    // The partial LSEs are read once (one L2 round trip: lane l holds splits l, l + 32, ..).
    constexpr int NL = (LA_MAX_SPLITS + 31) / 32;
    float ls[NL];
#pragma unroll
    for (int k = 0; k < NL; k++) ls[k] = lane + 32 * k < n ? __ldcg(lp + lane + 32 * k) : -LA_INF;
    float mx = -LA_INF;
#pragma unroll
    for (int k = 0; k < NL; k++) mx = fmaxf(mx, ls[k]);
#pragma unroll
    for (int off = 16; off >= 1; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(LA_FULL, mx, off));
    const float base = mx == -LA_INF ? 0.f : mx;
    float sum = 0.f;
#pragma unroll
    for (int k = 0; k < NL; k++) sum += la_exp2((ls[k] - base) * LA_LOG2E);
#pragma unroll
    for (int off = 16; off >= 1; off >>= 1) sum += __shfl_xor_sync(LA_FULL, sum, off);
    const float lse = sum > 0.f ? base + logf(sum) : -LA_INF;
    // Weights w_i = exp(lse_i - lse) in shared memory, then each lane accumulates its LA_D / 32
    // contiguous elements over the splits: every split's row is one coalesced load per warp and
    // the loop is unrolled so that several splits' loads are in flight (a loop over splits per
    // element waits on one L2 round trip per split and element).
#pragma unroll
    for (int k = 0; k < NL; k++)
        if (lane + 32 * k < n) w[lane + 32 * k] = sum > 0.f ? la_exp2((ls[k] - lse) * LA_LOG2E) : 0.f;
    __syncwarp();
    constexpr int PER = LA_D / 32;
    float acc[PER];
#pragma unroll
    for (int e = 0; e < PER; e++) acc[e] = 0.f;
    const float* op = p.o_part + (i64)row * p.num_splits * LA_D + lane * PER;
#pragma unroll 4
    for (int i = 0; i < n; i++) {
        const float wi = w[i];
#pragma unroll
        for (int e = 0; e < PER; e++) acc[e] = fmaf(wi, __ldcg(op + (i64)i * LA_D + e), acc[e]);
    }
    u16* dst = p.o + (i64)row * LA_D + lane * PER;
#pragma unroll
    for (int e = 0; e < PER; e++) dst[e] = (u16)(la_pack2(acc[e], 0.f) & 0xffffu);
    if (lane == 0) p.lse[row] = lse;
    __syncwarp();
}

#if !LA_MERGE_ONLY
// Physical pages of this lane group's tokens jn + u LA_STEP + tok of an iteration (0 past j1 and
// for the contiguous cache).
__device__ __forceinline__ void la_pages(int* pg, const int* tab, int jn, int j1, int tok) {
#pragma unroll
    for (int u = 0; u < LA_U; u++) {
        const int j = jn + u * LA_STEP + tok;
#if LA_PAGE
        pg[u] = j < j1 ? tab[j / LA_PAGE] : 0;
#else
        (void)tab;
        pg[u] = 0;
#endif
    }
}

// The block's warps hold partial states (s_m, s_l, s_acc: log2-unit max, sum and unnormalised
// accumulator per head): merge them (m = max_w m_w, L = sum_w 2^(m_w - m) l_w, o likewise) and
// write o = acc / L and lse = ln2 (m + log2 L), or the split's f32 partials.
__device__ __forceinline__ void la_block_finish(const LaDecParams& p, float (&s_acc)[LA_WARPS][LA_G][LA_D],
                                                float (&s_m)[LA_WARPS][LA_G], float (&s_l)[LA_WARPS][LA_G],
                                                int b, int h0, int split, bool direct) {
    __syncthreads();
    // Each thread finishes pairs of output elements (g, d), (g, d + 1).
    for (int xi = threadIdx.x; xi < LA_G * LA_D / 2; xi += LA_WARPS * 32) {
        const int g = xi / (LA_D / 2), d = (xi % (LA_D / 2)) * 2;
        float mx = -LA_INF;
#pragma unroll
        for (int w = 0; w < LA_WARPS; w++) mx = fmaxf(mx, s_m[w][g]);
        const float base = mx == -LA_INF ? 0.f : mx;
        float L = 0.f, o0 = 0.f, o1 = 0.f;
#pragma unroll
        for (int w = 0; w < LA_WARPS; w++) {
            const float a = la_exp2(s_m[w][g] - base);
            L += s_l[w][g] * a;
            o0 += s_acc[w][g][d] * a;
            o1 += s_acc[w][g][d + 1] * a;
        }
        const float inv = L > 0.f ? 1.f / L : 0.f;
        const float lse = L > 0.f ? (mx + __log2f(L)) * LA_LN2 : -LA_INF;
        const i64 row = (i64)b * p.Hq + h0 + g;
        if (direct) {
            *(u32*)(p.o + row * LA_D + d) = la_pack2(o0 * inv, o1 * inv);
            if (d == 0) p.lse[row] = lse;
        } else {
            float* dst = p.o_part + (row * p.num_splits + split) * LA_D + d;
            dst[0] = o0 * inv;
            dst[1] = o1 * inv;
            if (d == 0) p.lse_part[row * p.num_splits + split] = lse;
        }
    }
    // Fused merge: the last of the row's splits to finish (a ticket per grid row (y, z)) merges
    // them, after every block's partials are visible (fence, then the ticket).
    if (!direct && p.tickets) {
        __shared__ int s_last;
        __threadfence();
        __syncthreads();
        if (threadIdx.x == 0) {
            const int trow = p.head_tables ? b * p.Hk + h0 / (p.Hq / p.Hk) : b;
            const int len = p.lens[trow] + (p.qlens ? p.qlens[trow] : 0);
            const int n = la_imin(p.num_splits, la_imax(1, (len + p.split_len - 1) / p.split_len));
            int* t = p.tickets + (i64)blockIdx.z * gridDim.y + blockIdx.y;
            s_last = atomicAdd(t, 1) == n - 1;
            if (s_last) *t = 0;
        }
        __syncthreads();
        if (s_last) {
            __threadfence();
            __shared__ float s_w[LA_WARPS][LA_MAX_SPLITS];
            const int warp = threadIdx.x >> 5;
            for (int g = warp; g < LA_G; g += LA_WARPS)
                la_merge_row(p, b * p.Hq + h0 + g, threadIdx.x & 31, s_w[warp]);
        }
    }
}

#ifndef LA_KIVI
#define LA_KIVI 0
#endif
#if !LA_MMA && !LA_KIVI
extern "C" __global__ void __launch_bounds__(LA_WARPS * 32) la_decode(const LaDecParams p) {
    const int split = blockIdx.x;
    const int kh = blockIdx.y / p.head_chunks, chunk = blockIdx.y % p.head_chunks;
    const int b = blockIdx.z;
    const int h0 = kh * (p.Hq / p.Hk) + chunk * LA_G;
    const int trow = p.head_tables ? b * p.Hk + kh : b;   // table row of (b, kh)
    const int len = p.lens[trow];
    const int j0 = split * p.split_len;
    const int j1 = la_imin(len, j0 + p.split_len);
    const bool direct = p.num_splits == 1;
    // The merge reads only the splits that hold keys; with one split the block always writes
    // (a sequence of length 0 gets o = 0, lse = -inf).
    if (!direct && j0 >= len && split > 0) return;   // split 0 runs (a -inf partial for len 0)

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int grp = lane / LA_LPT, sub = lane % LA_LPT;
    const int tok = warp * LA_TPW + grp;  // this group's token within a load step

    // q: this lane's 8 elements of each head, f32, pre-scaled.
    float q[LA_G][8];
#pragma unroll
    for (int g = 0; g < LA_G; g++) {
        la_unpack8(la_ldg16(p.q + ((i64)b * p.Hq + h0 + g) * LA_D + sub * 8), q[g]);
#pragma unroll
        for (int e = 0; e < 8; e++) q[g][e] *= p.q_scale;
    }
    float m[LA_G], l[LA_G], acc[LA_G][8];
#pragma unroll
    for (int g = 0; g < LA_G; g++) {
        m[g] = -LA_INF;
        l[g] = 0.f;
#pragma unroll
        for (int e = 0; e < 8; e++) acc[g][e] = 0.f;
    }

    const int* tab = p.tables + (i64)trow * p.max_pages;
    // Pages of this iteration's tokens, read one iteration ahead (the table read is off the
    // critical path of the K/V loads).
    int pg[LA_U];
    la_pages(pg, tab, j0, j1, tok);

#if LA_NS
    // Ring slot of (stage, K or V, token u) for this thread: [LA_NS][2][LA_U][threads] x 16 bytes.
    extern __shared__ la_v4 la_ring[];
    auto slot = [&](int st, int kv, int u) -> la_v4* {
        return la_ring + ((st * 2 + kv) * LA_U + u) * (LA_WARPS * 32) + threadIdx.x;
    };
    // Issues the copies of the iteration at jn into stage st (pages from pg), then reads the
    // pages of the iteration after it; one commit group per iteration (empty past j1).
    auto issue = [&](int jn, int st) {
        if (jn < j1) {
#pragma unroll
            for (int u = 0; u < LA_U; u++) {
                const int j = jn + u * LA_STEP + tok;
                const bool in = j < j1;
                const i64 r = in ? la_row(p, pg[u], b, j, kh, sub) : 0;
                la_cp_async16(slot(st, 0, u), p.k + r, in ? 16 : 0);
                la_cp_async16(slot(st, 1, u), p.v + r, in ? 16 : 0);
            }
            la_pages(pg, tab, jn + LA_ITER, j1, tok);
        }
        la_cp_commit();
    };
#pragma unroll
    for (int st = 0; st < LA_NS - 1; st++) issue(j0 + st * LA_ITER, st);
    int cur = 0;
#endif

    for (int jb = j0; jb < j1; jb += LA_ITER) {
#if LA_NS
        // Refill the stage computed last iteration (its reads are done), wait for this one.
        issue(jb + (LA_NS - 1) * LA_ITER, (cur + LA_NS - 1) % LA_NS);
        la_cp_wait<LA_NS - 1>();
#define LA_KW(u) (*slot(cur, 0, u))
#define LA_VW(u) (*slot(cur, 1, u))
#else
        la_v4 kw[LA_U], vw[LA_U];
#pragma unroll
        for (int u = 0; u < LA_U; u++) {
            const int j = jb + u * LA_STEP + tok;
            if (j < j1) {
                const i64 r = la_row(p, pg[u], b, j, kh, sub);
                kw[u] = la_ldg16(p.k + r);
                vw[u] = la_ldg16(p.v + r);
            } else {
                kw[u].x = kw[u].y = kw[u].z = kw[u].w = 0u;
                vw[u].x = vw[u].y = vw[u].z = vw[u].w = 0u;
            }
        }
        la_pages(pg, tab, jb + LA_ITER, j1, tok);
#define LA_KW(u) kw[u]
#define LA_VW(u) vw[u]
#endif

        // x[u][g] = q_g . k_u: partial dot over this lane's 8 elements, summed over the group.
        float x[LA_U][LA_G];
#pragma unroll
        for (int u = 0; u < LA_U; u++) {
            float kf[8];
            la_unpack8(LA_KW(u), kf);
#pragma unroll
            for (int g = 0; g < LA_G; g++) {
                float s = 0.f;
#pragma unroll
                for (int e = 0; e < 8; e++) s = fmaf(q[g][e], kf[e], s);
                x[u][g] = s;
            }
        }
#pragma unroll
        for (int off = LA_LPT / 2; off >= 1; off >>= 1) {
#pragma unroll
            for (int u = 0; u < LA_U; u++) {
#pragma unroll
                for (int g = 0; g < LA_G; g++) x[u][g] += __shfl_xor_sync(LA_FULL, x[u][g], off);
            }
        }
#pragma unroll
        for (int u = 0; u < LA_U; u++) {
            const bool ok = jb + u * LA_STEP + tok < j1;
#pragma unroll
            for (int g = 0; g < LA_G; g++) {
                float s = x[u][g];
#if LA_SOFTCAP
                s = p.cap_mul * tanhf(s);
#endif
                x[u][g] = ok ? s : -LA_INF;
            }
        }

        // Online softmax per head (the group's own running state).
        float pu[LA_U][LA_G];
#pragma unroll
        for (int g = 0; g < LA_G; g++) {
            float mx = m[g];
#pragma unroll
            for (int u = 0; u < LA_U; u++) mx = fmaxf(mx, x[u][g]);
            // Nothing seen yet: subtract 0 so that 2^(-inf) = 0, never NaN.
            const float base = mx == -LA_INF ? 0.f : mx;
            const float alpha = la_exp2(m[g] - base);
            m[g] = mx;
            l[g] *= alpha;
#pragma unroll
            for (int e = 0; e < 8; e++) acc[g][e] *= alpha;
#pragma unroll
            for (int u = 0; u < LA_U; u++) {
                pu[u][g] = la_exp2(x[u][g] - base);
                l[g] += pu[u][g];
            }
        }
#pragma unroll
        for (int u = 0; u < LA_U; u++) {
            float vf[8];
            la_unpack8(LA_VW(u), vf);
#pragma unroll
            for (int g = 0; g < LA_G; g++) {
#pragma unroll
                for (int e = 0; e < 8; e++) acc[g][e] = fmaf(pu[u][g], vf[e], acc[g][e]);
            }
        }
#if LA_NS
        cur = (cur + 1) % LA_NS;
#endif
    }
#undef LA_KW
#undef LA_VW

    // Merge the groups of the warp (butterfly over the group index): two states (m, l, acc) and
    // (m2, l2, acc2) give m' = max(m, m2), l' = 2^(m - m') l + 2^(m2 - m') l2, acc likewise.
#pragma unroll
    for (int off = LA_LPT; off < 32; off <<= 1) {
#pragma unroll
        for (int g = 0; g < LA_G; g++) {
            const float m2 = __shfl_xor_sync(LA_FULL, m[g], off);
            const float l2 = __shfl_xor_sync(LA_FULL, l[g], off);
            const float mx = fmaxf(m[g], m2);
            const float base = mx == -LA_INF ? 0.f : mx;
            const float a = la_exp2(m[g] - base), a2 = la_exp2(m2 - base);
            m[g] = mx;
            l[g] = l[g] * a + l2 * a2;
#pragma unroll
            for (int e = 0; e < 8; e++) {
                const float o2 = __shfl_xor_sync(LA_FULL, acc[g][e], off);
                acc[g][e] = acc[g][e] * a + o2 * a2;
            }
        }
    }

    // Merge the warps through shared memory, then write (same rule).
    __shared__ float s_acc[LA_WARPS][LA_G][LA_D];
    __shared__ float s_m[LA_WARPS][LA_G];
    __shared__ float s_l[LA_WARPS][LA_G];
    if (lane < LA_LPT) {
#pragma unroll
        for (int g = 0; g < LA_G; g++) {
#pragma unroll
            for (int e = 0; e < 8; e++) s_acc[warp][g][lane * 8 + e] = acc[g][e];
            if (lane == 0) {
                s_m[warp][g] = m[g];
                s_l[warp][g] = l[g];
            }
        }
    }
    la_block_finish(p, s_acc, s_m, s_l, b, h0, split, direct);
}
#else  // LA_MMA
// Tensor-core decode (LA_MMA = 1; D 32 / 64 / 128, LA_NS >= 2 stages): the same work split, the
// same online softmax and the same finish, with the products on mma.sync m16n8k16. The G query
// heads of the block are the rows of A (rows G .. 15 are zero): per tile of 16 keys of one warp,
//     S[16 x 16] = Q[16 x D] K_tile^T        (f32; B fragments of K by ldmatrix, rows = keys)
//     x = S q_scale (log2 units; soft-cap c log2 e tanh(S scale / c)), -inf past j1
//     m' = max(m, max_keys x),  P = 2^(x - m'),  l' = 2^(m - m') l + sum P,
//     O' = 2^(m - m') O + P V_tile           (P rounded to the storage type as the A operand)
// Each warp owns a ring of LA_NS tiles [K | V][16 keys][D + 8] in shared memory filled by
// cp.async (the padding puts the 8 rows an ldmatrix reads in distinct banks); a warp walks the
// tiles w, w + W, w + 2W, ... of its block's key range, so warps never wait for each other until
// the finish. With splits of a multiple of 16 keys (the planned ones: a page's multiple) a tile
// never crosses a page, so one table read gives its page.
#define LM_LDS (LA_D + 8)            // row length of a ring tile (16-bit words)
#ifndef LA_L2PF
#define LA_L2PF 0
#endif
// 16-byte global -> shared copy with an L2 prefetch hint of LA_L2PF bytes (0: none): a tile row
// is 2 D bytes read by D / 8 lanes at once, and the hint lets L2 fetch it from DRAM whole.
__device__ __forceinline__ void lm_cp16(void* dst, const void* src, int bytes) {
#if LA_L2PF == 256
    asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;\n" ::"r"(la_smem_addr(dst)), "l"(src), "r"(bytes));
#elif LA_L2PF == 128
    asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;\n" ::"r"(la_smem_addr(dst)), "l"(src), "r"(bytes));
#else
    la_cp_async16(dst, src, bytes);
#endif
}
#define LM_TILE (16 * LM_LDS)        // one K or V tile
// LA_PAGE_AHEAD (1, opt-in: LONGATTN_CUDA_DECODE_PAGE_AHEAD=1; paged caches with splits of a
// multiple of 16 keys): the page of the next tile a warp copies is read from the block table one
// copy ahead, so a tile's cp.async addresses never wait on the table's load (without it each
// copy of a tile first waits one L2 round trip for its page number).
#ifndef LA_PAGE_AHEAD
#define LA_PAGE_AHEAD 0
#endif
// 4-byte global -> shared copy (cp.async, through L1).
__device__ __forceinline__ void lm_cp4(void* dst, const void* src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(la_smem_addr(dst)), "l"(src));
}
#if !LA_KIVI
extern "C" __global__ void __launch_bounds__(LA_WARPS * 32) la_decode(const LaDecParams p) {
    const int split = blockIdx.x;
    const int kh = blockIdx.y / p.head_chunks, chunk = blockIdx.y % p.head_chunks;
    const int b = blockIdx.z;
    const int h0 = kh * (p.Hq / p.Hk) + chunk * LA_G;
    const int trow = p.head_tables ? b * p.Hk + kh : b;
    const int len = p.lens[trow];
    const int j0 = split * p.split_len;
    const int j1 = la_imin(len, j0 + p.split_len);
    const bool direct = p.num_splits == 1;
    if (!direct && j0 >= len && split > 0) return;   // split 0 runs (a -inf partial for len 0)
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int r = lane >> 2, q4 = lane & 3;   // fragment row (head) and column pair
    const int* tab = p.tables + (i64)trow * p.max_pages;
    const int ntiles = j1 > j0 ? (j1 - j0 + 15) / 16 : 0;

    // Q as A fragments (rows = heads; rows >= G and the +8 rows are zero), unscaled.
    u32 qa[LA_D / 16][2];
#pragma unroll
    for (int ks = 0; ks < LA_D / 16; ks++) {
        qa[ks][0] = qa[ks][1] = 0u;
        if (r < LA_G) {
            const u16* qr = p.q + ((i64)b * p.Hq + h0 + r) * LA_D + ks * 16 + 2 * q4;
            qa[ks][0] = *(const u32*)qr;
            qa[ks][1] = *(const u32*)(qr + 8);
        }
    }
#if LA_SCORE
    // The previous step's query as rows 8 .. 15 of A (row 8 + r: head h0 + r), its LSE in log2
    // units (+inf where no fold: every P_prev is then 0). Rows 8 .. 15 are zero otherwise, so the
    // fold costs no extra product.
    const bool fold = p.score != nullptr;
    u32 qp[LA_D / 16][2];
    float lp2 = LA_INF;
#pragma unroll
    for (int ks = 0; ks < LA_D / 16; ks++) {
        qp[ks][0] = qp[ks][1] = 0u;
        if (fold && r < LA_G) {
            const u16* qr = p.q_prev + ((i64)b * p.Hq + h0 + r) * LA_D + ks * 16 + 2 * q4;
            qp[ks][0] = *(const u32*)qr;
            qp[ks][1] = *(const u32*)(qr + 8);
        }
    }
    if (fold && r < LA_G) {
        const float lp = p.lse_prev[(i64)b * p.Hq + h0 + r];
        lp2 = lp == -LA_INF ? LA_INF : lp * LA_LOG2E;
    }
    // After the reduction over the heads (below) lane (r, q4), r < 4, folds key sc_jl of each
    // tile (loop-invariant) if the previous step saw it (j < len - score_prev_new) and this
    // split holds it (j < j1): key jt + sc_jl with jt < sc_lim (jt >= 0: never without a fold,
    // nor on lanes r >= 4).
    const int sc_e = 2 * (r & 1) + ((r >> 1) & 1);
    const int sc_jl = (sc_e >> 1) * 8 + 2 * q4 + (sc_e & 1);
    const int jlim = la_imin(j1, len - p.score_prev_new);
    const int sc_lim = fold && r < 4 && jlim > sc_jl ? jlim - sc_jl : 0;
    float* const srow = fold ? p.score + (i64)trow * p.score_cap + sc_jl : nullptr;
#endif
    float o[LA_D / 8][4];
#pragma unroll
    for (int n = 0; n < LA_D / 8; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float m = -LA_INF, l = 0.f;

    extern __shared__ u16 lm_ring[];
    u16* ring = lm_ring + (i64)warp * LA_NS * 2 * LM_TILE;
#if LA_SCORE_READS
    // The scores of each ring stage's 16 keys, copied with its K / V (the fold's read of them
    // never waits on memory): lane r < 4 (lane < 16) copies the score of the key it folds,
    // srow[js] (rows of score_cap floats, a multiple of 16: inside the row), into the padding
    // of K tile row `lane` (elements D .. D + 1, which no ldmatrix reads), and reads it back
    // itself (lanes l and l + 8 share a bank: spreading them cost 15 instructions a tile in
    // address arithmetic). TOVA overwrites the scores without reading them.
    const int sc_slot = lane * LM_LDS + LA_D;
#endif
#if LA_PAGE && LA_PAGE_AHEAD
    // The page of the next tile this warp copies (tiles are copied in order, LA_WARPS apart).
    int page_ahead = p.split_len % 16 == 0 && warp < ntiles ? tab[(j0 + 16 * warp) / LA_PAGE] : 0;
#endif
    // Copies tile k (keys j0 + 16 k ..) of this warp into stage st; one commit group per call.
    auto issue = [&](int k, int st) {
        if (k < ntiles) {
            const int js = j0 + 16 * k;
#if LA_PAGE
            // Splits of a multiple of 16 keys: the tile lies in one page (one table read); a
            // forced split length that is not (a caller's split_len) reads each row's page.
            const bool one_page = p.split_len % 16 == 0;
#if LA_PAGE_AHEAD
            const int page0 = page_ahead;
            if (one_page) {
                const int kn = k + LA_WARPS;
                page_ahead = kn < ntiles ? tab[(j0 + 16 * kn) / LA_PAGE] : 0;
            }
#else
            const int page0 = one_page ? tab[js / LA_PAGE] : 0;
#endif
#endif
            u16* kd = ring + st * 2 * LM_TILE;
#pragma unroll
            for (int i = 0; i < LA_D / 16; i++) {
                const int c = lane + 32 * i, row = c / (LA_D / 8), col = c % (LA_D / 8);
                const int j = js + row;
                const bool in = j < j1;
#if LA_PAGE
                const int page = one_page ? page0 : (in ? tab[j / LA_PAGE] : 0);
#else
                const int page = 0;
#endif
                const i64 off = in ? la_row(p, page, b, j, kh, col) : 0;
                lm_cp16(kd + row * LM_LDS + col * 8, p.k + off, in ? 16 : 0);
                lm_cp16(kd + LM_TILE + row * LM_LDS + col * 8, p.v + off, in ? 16 : 0);
            }
#if LA_SCORE_READS
            if (fold && lane < 16) lm_cp4(kd + sc_slot, srow + js);
#endif
        }
        la_cp_commit();
    };
#pragma unroll
    for (int st = 0; st < LA_NS - 1; st++) issue(warp + st * LA_WARPS, st);
    int cur = 0;
    for (int k = warp; k < ntiles; k += LA_WARPS) {
        issue(k + (LA_NS - 1) * LA_WARPS, (cur + LA_NS - 1) % LA_NS);
        la_cp_wait<LA_NS - 1>();
        __syncwarp();
        const u16* kt = ring + cur * 2 * LM_TILE;
        const u16* vt = kt + LM_TILE;
        // S = Q K^T: two n-blocks of 8 keys; ldmatrix x4 gives the B fragments of two k-steps.
        float sc[2][4];
#pragma unroll
        for (int nb = 0; nb < 2; nb++) {
            sc[nb][0] = sc[nb][1] = sc[nb][2] = sc[nb][3] = 0.f;
#pragma unroll
            for (int kp = 0; kp < LA_D / 32; kp++) {
                const int mi = lane >> 3;
                u32 bf[4];
                la_ldmatrix_x4(bf, kt + (nb * 8 + (lane & 7)) * LM_LDS + (2 * kp + (mi >> 1)) * 16 + (mi & 1) * 8);
#if LA_SCORE
                const u32 a0[4] = {qa[2 * kp][0], qp[2 * kp][0], qa[2 * kp][1], qp[2 * kp][1]};
                const u32 a1[4] = {qa[2 * kp + 1][0], qp[2 * kp + 1][0], qa[2 * kp + 1][1], qp[2 * kp + 1][1]};
#else
                const u32 a0[4] = {qa[2 * kp][0], 0u, qa[2 * kp][1], 0u};
                const u32 a1[4] = {qa[2 * kp + 1][0], 0u, qa[2 * kp + 1][1], 0u};
#endif
                la_mma16816(sc[nb], a0, bf);
                la_mma16816(sc[nb], a1, bf + 2);
            }
        }
        // Logits of this lane's row r: keys 2 q4 + {0, 1} and 8 + 2 q4 + {0, 1}.
        const int jt = j0 + 16 * k;
        float x[4] = {sc[0][0], sc[0][1], sc[1][0], sc[1][1]};
        float mx = m;
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int j = jt + (e >> 1) * 8 + 2 * q4 + (e & 1);
#if LA_SOFTCAP
            float s = p.cap_mul * tanhf(x[e] * p.q_scale);
#else
            float s = x[e] * p.q_scale;
#endif
            x[e] = j < j1 ? s : -LA_INF;
            mx = fmaxf(mx, x[e]);
        }
        mx = fmaxf(mx, __shfl_xor_sync(LA_FULL, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(LA_FULL, mx, 2));
#if LA_SCORE
        {
            // P_prev of head h0 + r on this lane's keys (rows 8 + r of S), reduced over the
            // block's heads (the 8 lanes of equal q4, r = 0..7) by a reduce-scatter: at the
            // partner xor 4 a lane keeps two of its four keys and adds the partner's two, at xor
            // 8 one of them, at xor 16 the last head pair: 4 shuffles, and lanes r and r ^ 4
            // end with key e = 2 (r & 1) + ((r >> 1) & 1) reduced over the 8 heads. Without a
            // fold this launch (no branch per tile) every P_prev is 0 and nothing is stored.
            // Keys past the bound are not masked: the reduction never mixes keys and only keys
            // within it are stored.
            float pp[4];
#pragma unroll
            for (int e = 0; e < 4; e++) {
#if LA_SOFTCAP
                const float s = p.cap_mul * tanhf(sc[e >> 1][2 + (e & 1)] * p.q_scale);
#else
                const float s = sc[e >> 1][2 + (e & 1)] * p.q_scale;
#endif
                pp[e] = la_exp2(s - lp2);
            }
            auto op = [](float a, float b2) { return LA_SCORE_REDUCE == 0 ? fmaxf(a, b2) : a + b2; };
            const bool h1 = r & 1, h2 = (r >> 1) & 1;
            const float k0 = op(h1 ? pp[2] : pp[0], __shfl_xor_sync(LA_FULL, h1 ? pp[0] : pp[2], 4));
            const float k1 = op(h1 ? pp[3] : pp[1], __shfl_xor_sync(LA_FULL, h1 ? pp[1] : pp[3], 4));
            float v = op(h2 ? k1 : k0, __shfl_xor_sync(LA_FULL, h2 ? k0 : k1, 8));
            v = op(v, __shfl_xor_sync(LA_FULL, v, 16));
            if (jt < sc_lim) {
                // c = v / G for the mean (v (1 / G), rounded), then H2O old + c, A2SF
                // fma(f, old, c), TOVA c: explicit roundings, no contraction across them.
                const float c = LA_SCORE_REDUCE == 2 ? __fmul_rn(v, 1.f / LA_G) : v;
#if LA_SCORE_KIND == 0 && LA_SCORE_RED
                atomicAdd(srow + jt, c);   // red.global.add.f32 at L2: old + c, rounded once
#elif LA_SCORE_KIND == 0
                srow[jt] = __fadd_rn(*(const float*)(kt + sc_slot), c);
#elif LA_SCORE_KIND == 1
                srow[jt] = __fmaf_rn(p.score_f, *(const float*)(kt + sc_slot), c);
#else
                srow[jt] = c;
#endif
            }
        }
#endif
        const float base = mx == -LA_INF ? 0.f : mx;
        const float alpha = la_exp2(m - base);
        m = mx;
        float pe[4];
#pragma unroll
        for (int e = 0; e < 4; e++) pe[e] = la_exp2(x[e] - base);
        l = l * alpha + (pe[0] + pe[1]) + (pe[2] + pe[3]);
#pragma unroll
        for (int n = 0; n < LA_D / 8; n++) {
            o[n][0] *= alpha;
            o[n][1] *= alpha;
        }
        // O += P V: A = P (row r; keys 0..7 | 8..15), B fragments of V by ldmatrix.trans.
        const u32 pa[4] = {la_pack2(pe[0], pe[1]), 0u, la_pack2(pe[2], pe[3]), 0u};
#pragma unroll
        for (int np = 0; np < LA_D / 16; np++) {
            const int mi = lane >> 3;
            u32 bf[4];
            la_ldmatrix_x4_trans(bf, vt + ((mi & 1) * 8 + (lane & 7)) * LM_LDS + (2 * np + (mi >> 1)) * 8);
            la_mma16816(o[2 * np], pa, bf);
            la_mma16816(o[2 * np + 1], pa, bf + 2);
        }
        __syncwarp();
        cur = (cur + 1) % LA_NS;
    }
    la_cp_wait<0>();
    // The 4 lanes of a row hold disjoint keys' sums: add them.
    l += __shfl_xor_sync(LA_FULL, l, 1);
    l += __shfl_xor_sync(LA_FULL, l, 2);
    __shared__ float s_acc[LA_WARPS][LA_G][LA_D];
    __shared__ float s_m[LA_WARPS][LA_G];
    __shared__ float s_l[LA_WARPS][LA_G];
    if (r < LA_G) {
#pragma unroll
        for (int n = 0; n < LA_D / 8; n++) {
            s_acc[warp][r][n * 8 + 2 * q4] = o[n][0];
            s_acc[warp][r][n * 8 + 2 * q4 + 1] = o[n][1];
        }
        if (q4 == 0) {
            s_m[warp][r] = m;
            s_l[warp][r] = l;
        }
    }
    la_block_finish(p, s_acc, s_m, s_l, b, h0, split, direct);
}
#endif  // !LA_KIVI
#endif  // LA_MMA

#endif  // !LA_MERGE_ONLY

// The separate merge kernel: one warp per row.
#define LA_MERGE_ROWS 4
extern "C" __global__ void __launch_bounds__(LA_MERGE_ROWS * 32) la_decode_merge(const LaDecParams p) {
    const int row = blockIdx.x * LA_MERGE_ROWS + (threadIdx.x >> 5);
    if (row >= p.B * p.Hq) return;
    __shared__ float s_w[LA_MERGE_ROWS][LA_MAX_SPLITS];
    la_merge_row(p, row, threadIdx.x & 31, s_w[threadIdx.x >> 5]);
}
