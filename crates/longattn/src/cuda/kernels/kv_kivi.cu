// KIVI quantized pages on the device: the quantizer and the decode that reads them (launcher and
// the plain reference of this layout: crates/longattn/src/kv/kivi_cuda.rs; the policy and its CPU
// path: crates/longattn/src/kv/kivi.rs). Compiled after common.cuh and decode.cu (LA_KIVI = 1:
// decode.cu gives the parameters, la_block_finish and the merge, not its own decode kernels).
//
// Constants (with decode.cu's LA_F16, LA_D, LA_G, LA_PAGE, LA_SOFTCAP, LA_WARPS, LA_NS):
//   LA_QB   bits per code: 2 or 4
//   LA_QG   the group: tokens per K group (= tokens of one quantized page) and channels per V
//           group; 16, 32 or 64, dividing LA_D (64 or 128)
//
// Quantization (asymmetric min / max, b bits, as kivi.rs): over a group x_1..x_G,
//   s = (max x - min x) / (2^b - 1), lo = min x, both rounded to f16 (the stored values),
//   c_t = clamp(round((x_t - lo) / s), 0, 2^b - 1) (s = 0: c_t = 0), x^_t = lo + s c_t.
// K per channel (channel d has its own (s_d, lo_d) over the page's G tokens), V per token (each
// token's D channels in D / G groups of G channels).
//
// Page layout (one page = the G oldest-first tokens of one (sequence, KV head); bytes):
//   [K scales: 4 D][tile 0]...[tile G / 16 - 1],  tile = [K codes: 2 D b][V codes: 2 D b][V scales: 64 D / G]
//   K scales: word (q4 D / 16 + ks) 4 + e = (s, lo) as an f16 pair (s in the low half) of channel
//     ks 16 + 2 q4 + (e & 1) + 8 (e >> 1): the channels lane group q4 = lane % 4 reads.
//   V scales: word (q4 4 + e) (D / G) + g = (s, lo) of the tile's token 2 q4 + (e & 1) + 8 (e >> 1),
//     channel group g.
//   Codes are in the B-fragment order of mma.m16n8k16: lane L holds, per fragment, 4 codes
//   e = 0..3 at (k = 2 (L % 4) + (e & 1) + 8 (e >> 1), n = L / 4). K fragment f = 2 ks + nb: k =
//   channel ks 16 + .., n = key nb 8 + ..; V fragment f = np: k = key, n = channel np 8 + ...
//   A 32-bit word holds F = 8 / b fragments: fragment j's code e at bit (e & 1) 16 + b (2 j + (e >> 1)),
//   so `(w >> b r) & mask` with mask = (2^b - 1) at bits 0 and 16, OR 0x6400 in each half, is the
//   f16 pair (1024 + code, 1024 + code'): B register r (r = 2 j: e 0, 1; r = 2 j + 1: e 2, 3) after
//   subtracting 1024 (exact). Lane L's NW = D b / 64 words of a tile are stored as chunks of
//   CH = min(16, 4 NW) bytes: word wi at (wi / (CH / 4)) 32 CH + L CH + (wi % (CH / 4)) 4.
#ifndef LA_QB
#define LA_QB 4
#endif
#ifndef LA_QG
#define LA_QG 32
#endif
#define KQ_NW (LA_D * LA_QB / 64)           // code words of one lane and tile (K or V)
#define KQ_CH (KQ_NW >= 4 ? 16 : 4 * KQ_NW)   // bytes of one lane's chunk
#define KQ_CHW (KQ_CH / 4)
#define KQ_F (8 / LA_QB)                    // fragments per word
#define KQ_CODES (2 * LA_D * LA_QB)         // bytes of a tile's K (or V) codes
#define KQ_NG (LA_D / LA_QG)                // V channel groups
#define KQ_VS (64 * KQ_NG)                  // bytes of a tile's V scales
#define KQ_TILE (2 * KQ_CODES + KQ_VS)
#define KQ_KS (4 * LA_D)                    // bytes of a page's K scales
#define KQ_PAGE (KQ_KS + (LA_QG / 16) * KQ_TILE)
#define KQ_STAGE (KQ_KS + KQ_TILE)          // one ring stage: the page's K scales and one tile
#define KQ_MAXC ((1 << LA_QB) - 1)
#define KQ_MASK2 (((1u << LA_QB) - 1u) * 0x10001u)

typedef unsigned char u8;

__device__ __forceinline__ u32 kq_f16x2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
__device__ __forceinline__ float kq_h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ u16 kq_f2h(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
// B register r of a word: the f16 pair of codes (exact small integers).
__device__ __forceinline__ u32 kq_codes2(u32 w, int r) {
    const u32 y = ((w >> (LA_QB * r)) & KQ_MASK2) | 0x64006400u;
    u32 z;
    asm("sub.f16x2 %0, %1, %2;" : "=r"(z) : "r"(y), "r"(0x64006400u));
    return z;
}
__device__ __forceinline__ void kq_mma_f16(float* c, const u32* a, const u32* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
// Byte offset of lane L's code word wi inside a tile's K (or V) codes.
__device__ __forceinline__ int kq_word_at(int wi, int L) {
    return (wi / KQ_CHW) * 32 * KQ_CH + L * KQ_CH + (wi % KQ_CHW) * 4;
}
__device__ __forceinline__ int kq_code(float x, float s, float lo) {
    if (s == 0.f) return 0;
    return (int)fminf(fmaxf(roundf((x - lo) / s), 0.f), (float)KQ_MAXC);
}

// ---------------------------------------------------------------------------------------------
// Quantizer: one block per job (table row, first position, destination page) quantizes the G
// entries at positions first .. first + G - 1 of the row's full-precision pages into the page.
// Groups whose s or lo is not finite in f16 (|x| beyond 65504, NaN or inf in the input) count
// into *bad (the host then refuses the call and keeps the cache as it was).
struct LaKiviParams {
    const u16* k;        // pages of one KV head [num_pages, P, D]
    const u16* v;
    const int* tables;   // [rows, max_pages]
    const int* jobs;     // [njobs, 3]
    u8* qpages;          // [num_qpages, KQ_PAGE]
    int* bad;
    int max_pages, njobs;
};

extern "C" __global__ void __launch_bounds__(256) la_kivi_quant(const LaKiviParams p) {
    const int job = blockIdx.x;
    const int row = p.jobs[3 * job], first = p.jobs[3 * job + 1];
    u8* page = p.qpages + (i64)p.jobs[3 * job + 2] * KQ_PAGE;
    __shared__ u16 sk[LA_QG * LA_D], sv[LA_QG * LA_D];
    __shared__ float ks[LA_D], klo[LA_D], vs[LA_QG * KQ_NG], vlo[LA_QG * KQ_NG];
    const int* tab = p.tables + (i64)row * p.max_pages;
    for (int i = threadIdx.x; i < LA_QG * LA_D / 8; i += blockDim.x) {
        const int t = i / (LA_D / 8), c = i % (LA_D / 8), pos = first + t;
        const i64 off = ((i64)tab[pos / LA_PAGE] * LA_PAGE + pos % LA_PAGE) * LA_D + c * 8;
        *(la_v4*)(sk + t * LA_D + c * 8) = *(const la_v4*)(p.k + off);
        *(la_v4*)(sv + t * LA_D + c * 8) = *(const la_v4*)(p.v + off);
    }
    __syncthreads();
    // (s, lo) -> rounded to f16; returns whether both are finite.
    auto scale = [](float mn, float mx, bool nan, float& s, float& lo, u32& word) {
        const u16 sh = kq_f2h((mx - mn) / (float)KQ_MAXC), lh = kq_f2h(mn);
        s = kq_h2f(sh);
        lo = kq_h2f(lh);
        word = (u32)sh | ((u32)lh << 16);
        return !nan && isfinite(s) && isfinite(lo);
    };
    int bad = 0;
    for (int d = threadIdx.x; d < LA_D; d += blockDim.x) {
        float mn = LA_INF, mx = -LA_INF;
        bool nan = false;
        for (int t = 0; t < LA_QG; t++) {
            const float x = la_to_f32(sk[t * LA_D + d]);
            nan |= !isfinite(x);
            mn = fminf(mn, x);
            mx = fmaxf(mx, x);
        }
        u32 w;
        bad += !scale(mn, mx, nan, ks[d], klo[d], w);
        const int kk = d / 16, rem = d % 16;
        const int e = (rem & 1) + 2 * (rem >= 8), q4 = (rem % 8) / 2;
        *(u32*)(page + ((q4 * (LA_D / 16) + kk) * 4 + e) * 4) = w;
    }
    for (int i = threadIdx.x; i < LA_QG * KQ_NG; i += blockDim.x) {
        const int t = i / KQ_NG, g = i % KQ_NG;
        float mn = LA_INF, mx = -LA_INF;
        bool nan = false;
        for (int c = 0; c < LA_QG; c++) {
            const float x = la_to_f32(sv[t * LA_D + g * LA_QG + c]);
            nan |= !isfinite(x);
            mn = fminf(mn, x);
            mx = fmaxf(mx, x);
        }
        u32 w;
        bad += !scale(mn, mx, nan, vs[i], vlo[i], w);
        const int ti = t / 16, tt = t % 16;
        const int e = (tt & 1) + 2 * (tt >= 8), q4 = (tt % 8) / 2;
        *(u32*)(page + KQ_KS + ti * KQ_TILE + 2 * KQ_CODES + ((q4 * 4 + e) * KQ_NG + g) * 4) = w;
    }
    if (bad) atomicAdd(p.bad, bad);
    __syncthreads();
    // Code words: per tile, lane and word, K then V.
    const int per_tile = 32 * KQ_NW;
    for (int i = threadIdx.x; i < 2 * (LA_QG / 16) * per_tile; i += blockDim.x) {
        const int side = i / ((LA_QG / 16) * per_tile), x = i % ((LA_QG / 16) * per_tile);
        const int ti = x / per_tile, L = (x % per_tile) / KQ_NW, wi = x % KQ_NW;
        u32 w = 0;
#pragma unroll
        for (int j = 0; j < KQ_F; j++) {
            const int f = wi * KQ_F + j;
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int kidx = 2 * (L % 4) + (e & 1) + 8 * (e >> 1), n = L / 4;
                int c;
                if (side == 0) {
                    const int ch = (f / 2) * 16 + kidx, key = ti * 16 + (f % 2) * 8 + n;
                    c = kq_code(la_to_f32(sk[key * LA_D + ch]), ks[ch], klo[ch]);
                } else {
                    const int key = ti * 16 + kidx, ch = f * 8 + n, g = ch / LA_QG;
                    c = kq_code(la_to_f32(sv[key * LA_D + ch]), vs[key * KQ_NG + g], vlo[key * KQ_NG + g]);
                }
                w |= (u32)c << ((e & 1) * 16 + LA_QB * (2 * j + (e >> 1)));
            }
        }
        *(u32*)(page + KQ_KS + ti * KQ_TILE + side * KQ_CODES + kq_word_at(wi, L)) = w;
    }
}

// ---------------------------------------------------------------------------------------------
// Decode over a quantized head: positions 0 .. ql - 1 are the quantized pages (qtables, qlens),
// ql .. ql + rlen - 1 the full-precision pages of the per-head cache (tables, lens: the
// residual). Same work split, online softmax, finish and merge as decode.cu's tensor-core kernel.
// Per quantized tile of 16 keys (K per channel factors per page):
//     S[h, t] = sum_d q_hd (lo_d + s_d c_td) = sum_d q_hd lo_d + sum_d (q_hd s_d) c_td
// A = q s (f16, rows = heads), B = the codes (f16 integers), plus the constant per head. With P
// the tile's probabilities and V per token (group g of channels c):
//     sum_t P_ht v^_tc = sum_t P_ht lo_tg + sum_t (P_ht s_tg) c_tc
// A = P s_g (f16) per channel group against the V codes; the lo terms accumulate per (head,
// group) in f32 beside O (rescaled with it) and are added to O's channels after the loop.
// Residual tiles (at most R + G - 1 entries per head) load their K / V fragments straight from
// global memory in the storage type.
#if LA_KIVI
__device__ __forceinline__ void kq_load_words(u32 (&w)[KQ_NW], const u8* base, int lane) {
#pragma unroll
    for (int c = 0; c < KQ_NW / KQ_CHW; c++) {
        const u8* src = base + c * 32 * KQ_CH + lane * KQ_CH;
#if KQ_CHW == 4
        const la_v4 x = *(const la_v4*)src;
        w[c * 4] = x.x, w[c * 4 + 1] = x.y, w[c * 4 + 2] = x.z, w[c * 4 + 3] = x.w;
#elif KQ_CHW == 2
        const uint2 x = *(const uint2*)src;
        w[c * 2] = x.x, w[c * 2 + 1] = x.y;
#else
        w[c] = *(const u32*)src;
#endif
    }
}

// Online softmax over the tile's logits x (this lane's keys of row r): m, l, the rescale of the
// accumulators (alpha) and p.
__device__ __forceinline__ float kq_softmax(float (&x)[4], float& m, float& l, float (&pe)[4]) {
    float mx = m;
#pragma unroll
    for (int e = 0; e < 4; e++) mx = fmaxf(mx, x[e]);
    mx = fmaxf(mx, __shfl_xor_sync(LA_FULL, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(LA_FULL, mx, 2));
    const float base = mx == -LA_INF ? 0.f : mx;
    const float alpha = la_exp2(m - base);
    m = mx;
#pragma unroll
    for (int e = 0; e < 4; e++) pe[e] = la_exp2(x[e] - base);
    l = l * alpha + (pe[0] + pe[1]) + (pe[2] + pe[3]);
    return alpha;
}

__device__ __forceinline__ float kq_logit(const LaDecParams& p, float s) {
#if LA_SOFTCAP
    return p.cap_mul * tanhf(s * p.q_scale);
#else
    return s * p.q_scale;
#endif
}

extern "C" __global__ void __launch_bounds__(LA_WARPS * 32) la_decode_kivi(const LaDecParams p) {
    const int split = blockIdx.x;
    const int kh = blockIdx.y / p.head_chunks, chunk = blockIdx.y % p.head_chunks;
    const int b = blockIdx.z;
    const int h0 = kh * (p.Hq / p.Hk) + chunk * LA_G;
    const int trow = b * p.Hk + kh;
    const int ql = p.qlens[trow], len = ql + p.lens[trow];
    const int j0 = split * p.split_len;
    const int j1 = la_imin(len, j0 + p.split_len);
    const bool direct = p.num_splits == 1;
    if (!direct && j0 >= len) return;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int r = lane >> 2, q4 = lane & 3;
    const int ntiles = j1 > j0 ? (j1 - j0 + 15) / 16 : 0;
    // Tiles 0 .. nq - 1 of the split are quantized (ql and j0 are multiples of 16).
    const int nq = ql > j0 ? la_imin(ntiles, (ql - j0) / 16) : 0;

    // q of row r: f32 for the quantized tiles, storage-type A fragments for the residual.
    u32 qa[LA_D / 16][2];
    float qf[LA_D / 16][4];
#pragma unroll
    for (int ks = 0; ks < LA_D / 16; ks++) {
        qa[ks][0] = qa[ks][1] = 0u;
        if (r < LA_G) {
            const u16* qr = p.q + ((i64)b * p.Hq + h0 + r) * LA_D + ks * 16 + 2 * q4;
            qa[ks][0] = *(const u32*)qr;
            qa[ks][1] = *(const u32*)(qr + 8);
        }
        la_unpack2(qa[ks][0], qf[ks][0], qf[ks][1]);
        la_unpack2(qa[ks][1], qf[ks][2], qf[ks][3]);
    }
    float o[LA_D / 8][4];
#pragma unroll
    for (int n = 0; n < LA_D / 8; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float lo_acc[KQ_NG];
#pragma unroll
    for (int g = 0; g < KQ_NG; g++) lo_acc[g] = 0.f;
    float m = -LA_INF, l = 0.f;

    extern __shared__ __align__(16) u8 kq_ring[];
    u8* ring = kq_ring + (i64)warp * LA_NS * KQ_STAGE;
    const int* qtab = p.qtables + (i64)trow * p.qmax_pages;
    auto issue = [&](int k, int st) {
        if (k < nq) {
            const int js = j0 + 16 * k;
            const u8* pg = p.qpages + (i64)qtab[js / LA_QG] * KQ_PAGE;
            const u8* tile = pg + KQ_KS + ((js % LA_QG) / 16) * KQ_TILE;
            u8* dst = ring + st * KQ_STAGE;
            for (int i = lane; i < KQ_KS / 16; i += 32) la_cp_async16(dst + 16 * i, pg + 16 * i, 16);
            for (int i = lane; i < KQ_TILE / 16; i += 32)
                la_cp_async16(dst + KQ_KS + 16 * i, tile + 16 * i, 16);
        }
        la_cp_commit();
    };
#pragma unroll
    for (int st = 0; st < LA_NS - 1; st++) issue(warp + st * LA_WARPS, st);
    int cur = 0;
    for (int k = warp; k < nq; k += LA_WARPS) {
        issue(k + (LA_NS - 1) * LA_WARPS, (cur + LA_NS - 1) % LA_NS);
        la_cp_wait<LA_NS - 1>();
        __syncwarp();
        const u8* st = ring + cur * KQ_STAGE;
        // S = (q s) C_K + sum_d q lo.
        u32 kw[KQ_NW];
        kq_load_words(kw, st + KQ_KS, lane);
        float sc[2][4];
#pragma unroll
        for (int nb = 0; nb < 2; nb++) sc[nb][0] = sc[nb][1] = sc[nb][2] = sc[nb][3] = 0.f;
        float cst = 0.f;
#pragma unroll
        for (int ks = 0; ks < LA_D / 16; ks++) {
            const la_v4 sl = *(const la_v4*)(st + (q4 * (LA_D / 16) + ks) * 16);
            const u32 wd[4] = {sl.x, sl.y, sl.z, sl.w};
            float s[4];
#pragma unroll
            for (int e = 0; e < 4; e++) {
                s[e] = kq_h2f((u16)(wd[e] & 0xffffu));
                cst = fmaf(qf[ks][e], kq_h2f((u16)(wd[e] >> 16)), cst);
            }
            const u32 a[4] = {kq_f16x2(qf[ks][0] * s[0], qf[ks][1] * s[1]), 0u,
                              kq_f16x2(qf[ks][2] * s[2], qf[ks][3] * s[3]), 0u};
#pragma unroll
            for (int nb = 0; nb < 2; nb++) {
                const int f = 2 * ks + nb, wi = f / KQ_F, j = f % KQ_F;
                const u32 bq[2] = {kq_codes2(kw[wi], 2 * j), kq_codes2(kw[wi], 2 * j + 1)};
                kq_mma_f16(sc[nb], a, bq);
            }
        }
        cst += __shfl_xor_sync(LA_FULL, cst, 1);
        cst += __shfl_xor_sync(LA_FULL, cst, 2);
        float x[4] = {kq_logit(p, sc[0][0] + cst), kq_logit(p, sc[0][1] + cst),
                      kq_logit(p, sc[1][0] + cst), kq_logit(p, sc[1][1] + cst)};
        float pe[4];
        const float alpha = kq_softmax(x, m, l, pe);
#pragma unroll
        for (int n = 0; n < LA_D / 8; n++) {
            o[n][0] *= alpha;
            o[n][1] *= alpha;
        }
        // O += (P s_g) C_V per channel group; lo terms beside.
        u32 vw[KQ_NW];
        kq_load_words(vw, st + KQ_KS + KQ_CODES, lane);
        const u32* vsc = (const u32*)(st + KQ_KS + 2 * KQ_CODES);
#pragma unroll
        for (int g = 0; g < KQ_NG; g++) {
            float s[4];
            float lsum = 0.f;
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const u32 wd = vsc[(q4 * 4 + e) * KQ_NG + g];
                s[e] = kq_h2f((u16)(wd & 0xffffu));
                lsum = fmaf(pe[e], kq_h2f((u16)(wd >> 16)), lsum);
            }
            lo_acc[g] = lo_acc[g] * alpha + lsum;
            const u32 a[4] = {kq_f16x2(pe[0] * s[0], pe[1] * s[1]), 0u, kq_f16x2(pe[2] * s[2], pe[3] * s[3]),
                              0u};
#pragma unroll
            for (int np = g * (LA_QG / 8); np < (g + 1) * (LA_QG / 8); np++) {
                const int wi = np / KQ_F, j = np % KQ_F;
                const u32 bq[2] = {kq_codes2(vw[wi], 2 * j), kq_codes2(vw[wi], 2 * j + 1)};
                kq_mma_f16(o[np], a, bq);
            }
        }
        __syncwarp();
        cur = (cur + 1) % LA_NS;
    }
    la_cp_wait<0>();
    // The lo terms: the quad's keys summed, added to every channel of their group.
#pragma unroll
    for (int g = 0; g < KQ_NG; g++) {
        float t = lo_acc[g];
        t += __shfl_xor_sync(LA_FULL, t, 1);
        t += __shfl_xor_sync(LA_FULL, t, 2);
#pragma unroll
        for (int np = g * (LA_QG / 8); np < (g + 1) * (LA_QG / 8); np++) {
            o[np][0] += t;
            o[np][1] += t;
        }
    }
    // Residual tiles: position j is entry j - ql of the head's full-precision pages.
    const int* tab = p.tables + (i64)trow * p.max_pages;
    for (int k = nq + ((warp - nq) % LA_WARPS + LA_WARPS) % LA_WARPS; k < ntiles; k += LA_WARPS) {
        const int jt = j0 + 16 * k;
        float sc[2][4];
#pragma unroll
        for (int nb = 0; nb < 2; nb++) {
            sc[nb][0] = sc[nb][1] = sc[nb][2] = sc[nb][3] = 0.f;
            const int j = jt + nb * 8 + r;
            const bool in = j < j1;
            const u16* row = p.k + (in ? la_row(p, tab[(j - ql) / LA_PAGE], b, j - ql, kh, 0) : 0);
#pragma unroll
            for (int ks = 0; ks < LA_D / 16; ks++) {
                const u32 bk[2] = {in ? *(const u32*)(row + ks * 16 + 2 * q4) : 0u,
                                   in ? *(const u32*)(row + ks * 16 + 2 * q4 + 8) : 0u};
                const u32 a[4] = {qa[ks][0], 0u, qa[ks][1], 0u};
                la_mma16816(sc[nb], a, bk);
            }
        }
        float x[4];
        const u16* vrow[4];
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int j = jt + (e >> 1) * 8 + 2 * q4 + (e & 1);
            x[e] = j < j1 ? kq_logit(p, sc[e >> 1][e & 1]) : -LA_INF;
            vrow[e] = j < j1 ? p.v + la_row(p, tab[(j - ql) / LA_PAGE], b, j - ql, kh, 0) : nullptr;
        }
        float pe[4];
        const float alpha = kq_softmax(x, m, l, pe);
        const u32 pa[4] = {la_pack2(pe[0], pe[1]), 0u, la_pack2(pe[2], pe[3]), 0u};
#pragma unroll
        for (int n = 0; n < LA_D / 8; n++) {
            o[n][0] *= alpha;
            o[n][1] *= alpha;
            // B = V rows of keys 2 q4 + {0, 1} (and + 8) at channel n 8 + r.
            const int ch = n * 8 + r;
            u16 vv[4];
#pragma unroll
            for (int e = 0; e < 4; e++) vv[e] = vrow[e] ? vrow[e][ch] : (u16)0;
            const u32 bv[2] = {(u32)vv[0] | ((u32)vv[1] << 16), (u32)vv[2] | ((u32)vv[3] << 16)};
            la_mma16816(o[n], pa, bv);
        }
    }
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
#endif  // LA_KIVI
