// Press scores on the device (kv/score_cuda.rs; the CPU rule and its reference are kv/score.rs):
// the weighted column sums of one chunk of queries over a per-head paged cache, folded into the
// running score of every cached entry.
//
// With P_h[i, e] = exp(s_h(i, e) - lse_h(i)) the probability of query row i (of Sq, the latest
// positions of the sequence) of query head h on entry e, s = scale q.k (soft-capped when asked)
// and lse the attention's own LSE (read, never recomputed):
//     c_h[e] = sum_i w_i P_h[i, e]           (rows with w_i = 0 or lse = -inf add nothing)
//     c[e]   = R_h c_h[e]                    R over the G query heads of the KV head: max, sum,
//                                            mean
//     score[e] = decay score[e] + c[e]       (entries past the last fold hold 0: see the host)
// The kind sets decay and w for Sq rows: H2O decay 1, w_i = 1; A2SF(f) decay f^Sq, w_i =
// f^(Sq - 1 - i); TOVA decay 0, w_i = [i = Sq - 1]; SnapKV(W) decay 0, w_i = [i >= Sq - W].
// Causal (the chunk is the last Sq entries of every row): entry e is seen by row i iff
// e <= len - Sq + i; otherwise every entry by every row.
//
// Work: block (kblocks key blocks of 64 entries, table row r = b Hk + kh), 4 warps of 16 entries
// of a key block. A key block's keys go to shared memory (cp.async, 16 bytes a thread); a warp
// holds its 16 entries as the A operand of m16n8k16 products for the whole head dim (rows =
// entries). The query rows the block needs (every head's, from the first that can see its first
// keys, in groups of 8 of one head) go to shared memory rows_cap at a time with their weights
// and LSE, shared by the 4 warps; per group of 8 rows a warp forms S^T = K Q^T (B fragments by
// ldmatrix from the rows), then adds w_i 2^(x - lse_i log2 e) into one sum per entry (x the
// logit in log2 units). The four lanes of a quad share an entry: their sums meet by two shuffles
// per query head.
// When every row fits the buffer (a decode step, a window: the host then gives a block several
// key blocks) the rows are staged once per block, and the next key block's keys are copied while
// the current one is multiplied (the warps hold its keys in registers once read, so one key
// buffer serves); otherwise (kblocks = 1) the rows pass through the buffer in chunks.
// Needs: common.cuh, LA_D (multiple of 32, <= 256), LA_PAGE, LA_F16, LA_SOFTCAP.

struct LaScoreParams {
    const u16* q;        // [B, Sq, Hq, D] with element strides q_sb, q_ss, q_sh
    const u16* k;        // pages of one KV head [num_pages, P, D]
    const float* lse;    // [B, Hq, Sq] natural log
    const int* tables;   // [rows, max_pages]
    const int* lens;     // [rows]
    float* score;        // [rows, cap]
    i64 q_sb, q_ss, q_sh;
    int B, Sq, Hq, Hk, max_pages, cap;
    int causal, reduce, kind, window;   // reduce: 0 max, 1 sum, 2 mean; kind: 0 H2O, 1 A2SF,
                                        // 2 TOVA, 3 SnapKV (window rows)
    float f;                            // A2SF forgetting factor
    float q_scale;                      // scale log2 e, or scale / c with soft-cap
    float cap_mul;                      // c log2 e (soft-cap)
    int kblocks;                        // 64-entry key blocks per thread block (module comment)
    int rows_cap;                       // query rows the shared buffer holds: 64, 128 or 256
    int pad;
};

#define LS_KSTEPS (LA_D / 16)

// Weight of query row i of Sq (module comment); decay is f^Sq, 1 or 0.
__device__ __forceinline__ float ls_weight(const LaScoreParams& p, int i) {
    switch (p.kind) {
    case 1: return powf(p.f, (float)(p.Sq - 1 - i));
    case 2: return i == p.Sq - 1 ? 1.f : 0.f;
    case 3: return i >= p.Sq - p.window ? 1.f : 0.f;
    default: return 1.f;
    }
}

// The first row whose weight can be non-zero.
__device__ __forceinline__ int ls_first_row(const LaScoreParams& p) {
    switch (p.kind) {
    case 2: return p.Sq - 1;
    case 3: return la_imax(0, p.Sq - p.window);
    default: return 0;
    }
}

// Shared memory (dynamic): one key block of 64 keys and rows_cap query rows, rows padded to D + 8
// elements (the 8 rows an ldmatrix reads fall in distinct banks), then the rows' weights and LSE
// (log2 units).
#define LS_LDS (LA_D + 8)

extern "C" __global__ void __launch_bounds__(128) la_kv_score(const LaScoreParams p) {
    extern __shared__ __align__(16) u16 ls_smem[];
    const int R = p.rows_cap;
    u16* ks = ls_smem;                       // [64][LS_LDS] keys
    u16* qs = ls_smem + 64 * LS_LDS;         // [R][LS_LDS] query rows
    float* wl = (float*)(qs + R * LS_LDS);   // [R] weights
    float* l2s = wl + R;                     // [R] lse log2 e (+inf: the row adds nothing)
    const int r = blockIdx.y;
    const int b = r / p.Hk, kh = r % p.Hk, G = p.Hq / p.Hk;
    const int len = p.lens[r];
    const int kfirst = blockIdx.x * p.kblocks * 64;   // the block's first entry
    if (kfirst >= len) return;
    const int kend = la_imin(len, kfirst + p.kblocks * 64);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g8 = lane >> 2, c4 = lane & 3, mi = lane >> 3;
    // Rows that can see an entry of the block / of a warp: causal, i >= e - (len - Sq).
    const int off = len - p.Sq;   // entry e is seen by row i iff e <= off + i (causal)
    const int first = ls_first_row(p);
    const int blo = p.causal ? la_imax(first, kfirst - off) : first;
    // The rows the block reads: per query head rows hb .. hb + nh - 1 (hb = blo rounded down to
    // 8, nh a multiple of 8, rows past Sq weigh 0), the heads one after another: N = G nh rows,
    // staged R at a time. A group of 8 staged rows belongs to one head. Later key blocks of the
    // block are seen by a subset of these rows (causal: fewer), skipped per group below.
    const int hb = blo & ~7;
    const int nh = hb < p.Sq ? ((p.Sq - hb + 7) & ~7) : 0;
    const int N = G * nh;
    const bool resident = N <= R;   // every row staged once for all key blocks
    auto stage_rows = [&](int f0) {
        // Only rows f < N are copied: the products read no row past N (a multiple of 8).
        for (int c = threadIdx.x; c < la_imin(R, N - f0) * (LA_D / 8); c += 128) {
            const int row = c / (LA_D / 8), col = c % (LA_D / 8);
            const int f = f0 + row;
            const int gi = f / la_imax(nh, 1), i = hb + f % la_imax(nh, 1);
            const bool in = i < p.Sq;
            const u16* src = in ? p.q + (i64)b * p.q_sb + (i64)(kh * G + gi) * p.q_sh + (i64)i * p.q_ss + col * 8 : p.q;
            la_cp_async16(qs + row * LS_LDS + col * 8, src, in ? 16 : 0);
        }
        for (int t = threadIdx.x; t < R; t += 128) {
            const int f = f0 + t;
            const int gi = f / la_imax(nh, 1), i = hb + f % la_imax(nh, 1);
            float w = 0.f, l2 = LA_INF;
            if (f < N && i < p.Sq) {
                const float l = p.lse[((i64)b * p.Hq + kh * G + gi) * p.Sq + i];
                w = ls_weight(p, i);
                if (w != 0.f && l != -LA_INF) l2 = l * LA_LOG2E;
                else w = 0.f;
            }
            wl[t] = w;
            l2s[t] = l2;
        }
    };
    // One key block's keys into shared memory (16 bytes a thread and step; zeros past len).
    auto stage_keys = [&](int kb0) {
        for (int c = threadIdx.x; c < 64 * (LA_D / 8); c += 128) {
            const int row = c / (LA_D / 8), col = c % (LA_D / 8);
            const int e = kb0 + row;
            const u16* src = p.k;
            if (e < len) {
                const int page = p.tables[(i64)r * p.max_pages + e / LA_PAGE];
                src = p.k + ((i64)page * LA_PAGE + e % LA_PAGE) * LA_D + col * 8;
            }
            la_cp_async16(ks + row * LS_LDS + col * 8, src, e < len ? 16 : 0);
        }
    };
    // The first key block's keys with the first rows in the same wait.
    stage_keys(kfirst);
    if (N > 0) stage_rows(0);
    la_cp_commit();
    const float decay = p.kind == 1 ? powf(p.f, (float)p.Sq) : (p.kind == 0 ? 1.f : 0.f);
    for (int kb0 = kfirst; kb0 < kend; kb0 += 64) {
        la_cp_wait<0>();
        __syncthreads();
        const int e0 = kb0 + warp * 16;   // this warp's first entry
        const int wlo = p.causal ? la_imax(first, e0 - off) : first;
        const bool live = e0 < len;
        // A fragments of the warp's 16 entries (rows) for the whole head dim, by ldmatrix x4:
        // matrix mi = rows 8 (mi & 1) .., dims 8 (mi >> 1) .. of k-step t.
        u32 a[LS_KSTEPS][4];
#pragma unroll
        for (int t = 0; t < LS_KSTEPS; t++)
            la_ldmatrix_x4(a[t], ks + (warp * 16 + (mi & 1) * 8 + (lane & 7)) * LS_LDS + t * 16 + (mi >> 1) * 8);
        if (resident && kb0 + 64 < kend) {   // the next key block's keys, under this one's work
            __syncthreads();                  // every warp holds its keys
            stage_keys(kb0 + 64);
            la_cp_commit();
        }
        // Per-head sums (each head's finished sum meets its quad and enters the reduction when
        // the next head starts; probabilities are >= 0, so the maximum starts at 0 as on the CPU).
        float red[2] = {0.f, 0.f};
        float sum[2] = {0.f, 0.f};
        int cur_gi = 0;
        auto flush = [&]() {
#pragma unroll
            for (int hh = 0; hh < 2; hh++) {
                sum[hh] += __shfl_xor_sync(0xffffffffu, sum[hh], 1);
                sum[hh] += __shfl_xor_sync(0xffffffffu, sum[hh], 2);
                red[hh] = p.reduce == 0 ? fmaxf(red[hh], sum[hh]) : red[hh] + sum[hh];
                sum[hh] = 0.f;
            }
        };
        for (int f0 = 0; f0 < N; f0 += R) {
            if (f0 > 0) {   // chunked rows (kblocks = 1): the next chunk
                __syncthreads();   // the previous chunk is read
                stage_rows(f0);
                la_cp_commit();
                la_cp_wait<0>();
                __syncthreads();
            }
            if (!live) continue;
            for (int t8 = 0; t8 < la_imin(R, N - f0); t8 += 8) {
                const int f = f0 + t8;
                const int gi = f / nh, i0 = hb + f % nh;
                if (i0 + 7 < wlo) continue;   // no row of the group sees this warp's entries
                if (gi != cur_gi) {
                    flush();
                    cur_gi = gi;
                }
                // S^T tile: entries x query rows i0 .. i0 + 7 (B fragments by ldmatrix x4: two
                // k-steps a call). Two accumulator chains (even and odd k-steps), added at the
                // end: half the dependent products.
                float c[4] = {0.f, 0.f, 0.f, 0.f}, c2[4] = {0.f, 0.f, 0.f, 0.f};
                const u16* qt = qs + (t8 + (lane & 7)) * LS_LDS + (mi >> 1) * 16 + (mi & 1) * 8;
#pragma unroll
                for (int t = 0; t < LS_KSTEPS; t += 2) {
                    u32 bq[4];
                    la_ldmatrix_x4(bq, qt + t * 16);
                    la_mma16816(c, a[t], bq);
                    la_mma16816(c2, a[t + 1], bq + 2);
                }
#pragma unroll
                for (int x = 0; x < 4; x++) c[x] += c2[x];
                // c[2 hh + x]: entry e0 + g8 + 8 hh, query row i0 + 2 c4 + x.
#pragma unroll
                for (int x = 0; x < 2; x++) {
                    const int rl = t8 + 2 * c4 + x, i = i0 + 2 * c4 + x;
                    const float w = wl[rl], l2 = l2s[rl];
#pragma unroll
                    for (int hh = 0; hh < 2; hh++) {
                        const int e = e0 + g8 + 8 * hh;
                        if (w == 0.f || e >= len || (p.causal && e > off + i)) continue;
#if LA_SOFTCAP
                        const float s = p.cap_mul * tanhf(c[2 * hh + x] * p.q_scale);
#else
                        const float s = c[2 * hh + x] * p.q_scale;
#endif
                        sum[hh] += w * la_exp2(s - l2);
                    }
                }
            }
        }
        flush();
        if (live && c4 == 0) {
#pragma unroll
            for (int hh = 0; hh < 2; hh++) {
                const int e = e0 + g8 + 8 * hh;
                if (e >= len) continue;
                float cval = red[hh];
                if (p.reduce == 2) cval /= (float)G;
                float* dst = p.score + (i64)r * p.cap + e;
                *dst = decay == 0.f ? cval : decay * *dst + cval;
            }
        }
    }
}

// The rows' offsets for the prefill-sized fold (kv_score_wg.cu), in log2 units and padded to
// sq_pad rows per (batch, query head): l2[(b Hq + h) sq_pad + i] = lse log2 e - log2 w_i, so that
// w_i 2^(x - lse log2 e) = 2^(x - l2); +inf where the row adds nothing (i >= Sq, w_i = 0,
// lse = -inf: a row that sees no entry).
extern "C" __global__ void __launch_bounds__(256) la_kv_score_l2(const LaScoreParams p, float* l2, int sq_pad) {
    const i64 n = (i64)p.B * p.Hq * sq_pad;
    for (i64 x = (i64)blockIdx.x * blockDim.x + threadIdx.x; x < n; x += (i64)gridDim.x * blockDim.x) {
        const int i = (int)(x % sq_pad);
        float v = LA_INF;
        if (i < p.Sq) {
            const float l = p.lse[(x / sq_pad) * p.Sq + i];
            const float w = ls_weight(p, i);
            if (w != 0.f && l != -LA_INF) v = l * LA_LOG2E - log2f(w);
        }
        l2[x] = v;
    }
}
