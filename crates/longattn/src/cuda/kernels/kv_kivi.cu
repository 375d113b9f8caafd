// KIVI quantized pages on the device: the quantizer and the decode that reads them (launcher and
// the plain reference of this layout: crates/longattn/src/kv/kivi_cuda.rs; the policy and its CPU
// path: crates/longattn/src/kv/kivi.rs). Compiled after common.cuh and decode.cu (LA_KIVI = 1:
// decode.cu gives the parameters, la_block_finish and the merge, not its own decode kernels).
//
// Constants (with decode.cu's LA_F16, LA_D, LA_G, LA_PAGE, LA_SOFTCAP, LA_WARPS, LA_NS):
//   LA_QB   bits per code: 2 or 4
//   LA_QG   the group: tokens per K group (= tokens of one quantized page) and channels per V
//           group; 16, 32 or 64, dividing LA_D (64, 128 or 256) at most 8 times (the V minima
//           of a tile are the 8 rows r of one mma's A, one per channel group)
//
// Quantization (asymmetric min / max, b bits, as kivi.rs): over a group x_1..x_G,
//   s = (max x - min x) / (2^b - 1), lo = min x, both rounded to f16 (the stored values),
//   c_t = clamp(round((x_t - lo) / s), 0, 2^b - 1) (s = 0: c_t = 0), x^_t = lo + s c_t.
// K per channel (channel d has its own (s_d, lo_d) over the page's G tokens), V per token (each
// token's D channels in D / G groups of G channels).
//
// Page layout (one page = G consecutive entries of one (sequence, KV head); bytes; f16 pairs
// have the first element in the low half):
//   [K scales: 4 D][tile 0]...[tile G / 16 - 1],
//   tile = [K codes: 2 D b][V codes: 2 D b][V scales: 32 D / G][V minima: 32 D / G]
//   K scales: 16 bytes per (ks, q4) at (4 ks + q4) 16: the pairs (s_e0, s_e1), (s_e2, s_e3),
//     (lo_e0, lo_e1), (lo_e2, lo_e3) of channels ks 16 + 2 q4 + (e & 1) + 8 (e >> 1): what lane
//     group q4 = lane % 4 multiplies into its B fragments.
//   V scales: 8 bytes per (q4, g) at (q4 D / G + g) 8: (s_e0, s_e1), (s_e2, s_e3) of the tile's
//     tokens 2 q4 + (e & 1) + 8 (e >> 1), channel group g.
//   V minima: 8 bytes per lane L = 4 g + q4 (g < D / G) at L 8: (lo_e0, lo_e1), (lo_e2, lo_e3) of
//     the same tokens: the B fragment of an mma whose column g is channel group g.
//   Codes are in the A-fragment order of mma.m16n8k16 (the decode computes S^T = K Q^T and
//   O^T = V^T P^T: keys and channels are the rows, the query heads the columns): lane L = 4 r +
//   q4 holds, per fragment, registers i = 0..3 of code pairs (rows r + 8 (i & 1), k columns
//   2 q4 + 8 (i >> 1) + {0, 1}). K fragment ks: rows = the tile's keys, k = channels ks 16 + ..;
//   V fragment mt: rows = channels mt 16 + .., k = the tile's keys.
//   A 32-bit word holds Fw = 4 / b fragments: element el of register i of fragment j is the
//   code at bit 16 el + 8 (i & 1) + 4 j + b (i >> 1). `kq_unpack` makes a register an f16 pair by
//   shifting the word by 8 (i & 1) + 4 j, masking the two codes at bits b (i >> 1) (+ 16) and ORing
//   in the exponent of K_i = 2^(10 - b (i >> 1)), whose last mantissa bit weighs 1 there: the pair
//   (K_i + c, K_i + c'), exact, one lop3. Registers 0 / 1 (k columns 2 q4 + {0, 1}) hold K_lo = 1024,
//   registers 2 / 3 (k columns + 8) K_hi = 2^(10 - b), in every fragment, so an mma over codes
//   computes sum_k c_k B_k + sum_k K_k B_k and the decode subtracts the second sum with one more
//   mma whose A is -K (the same B, so the difference is exact up to f32 accumulation).
//   Lane L's NW = D b / 64 words
//   of a tile are stored as chunks of CH = min(16, 4 NW) bytes: word wi at
//   (wi / (CH / 4)) 32 CH + L CH + (wi % (CH / 4)) 4.
#ifndef LA_QB
#define LA_QB 4
#endif
#ifndef LA_QG
#define LA_QG 32
#endif
#define KQ_NW (LA_D * LA_QB / 64)           // code words of one lane and tile (K or V)
#define KQ_CH (KQ_NW >= 4 ? 16 : 4 * KQ_NW)   // bytes of one lane's chunk
#define KQ_CHW (KQ_CH / 4)
#define KQ_FW (4 / LA_QB)                   // fragments per word
#define KQ_R (16 / LA_QB)                   // registers (code pairs) per word
#define KQ_CODES (2 * LA_D * LA_QB)         // bytes of a tile's K (or V) codes
#define KQ_NG (LA_D / LA_QG)                // V channel groups
#define KQ_VS (64 * KQ_NG)                  // bytes of a tile's V scales and minima
#define KQ_TILE (2 * KQ_CODES + KQ_VS)
#define KQ_KS (4 * LA_D)                    // bytes of a page's K scales
#define KQ_PAGE (KQ_KS + (LA_QG / 16) * KQ_TILE)
#ifndef KQ_MINB
#define KQ_MINB 1
#endif
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
// x & m with the f16 exponent e ORed into both halves.
__device__ __forceinline__ u32 kq_lop(u32 x, u32 m, u32 e) {
    u32 y;
    asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(y) : "r"(x), "r"(m), "r"(e));
    return y;
}
// The f16 pair (K_h, K_h), K_0 = 1024 (registers 0, 1), K_1 = 2^(10 - b) (registers 2, 3).
#define KQ_K2(h) (((u32)(25 - LA_QB * (h)) << 10) * 0x10001u)
// The KQ_R registers of a code word in fragment order: register 4 j + i = (K + c, K + c') (the
// layout above).
__device__ __forceinline__ void kq_unpack(u32 w, u32 (&c)[KQ_R]) {
#pragma unroll
    for (int j = 0; j < KQ_FW; j++) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int h = i >> 1;
            c[4 * j + i] = kq_lop(w >> (8 * (i & 1) + 4 * j), KQ_MASK2 << (LA_QB * h), KQ_K2(h));
        }
    }
}
__device__ __forceinline__ u32 kq_hmul2(u32 a, u32 b) {
    u32 y;
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(y) : "r"(a), "r"(b));
    return y;
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
// Dynamic shared memory, 4 G D + 8 D + 8 G (D / G) bytes (kivi_cuda.rs `quant_smem`): the
// entries' K and V (G x D each, storage type), then K's (s, lo) per channel and V's per (token,
// channel group) as f32 (64 KiB of entries at D 256, G 64: more than a static array may take).
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
    extern __shared__ __align__(16) u8 kq_qsmem[];
    u16* sk = (u16*)kq_qsmem;
    u16* sv = sk + LA_QG * LA_D;
    float* ks = (float*)(sv + LA_QG * LA_D);
    float* klo = ks + LA_D;
    float* vs = klo + LA_D;
    float* vlo = vs + LA_QG * KQ_NG;
    const int* tab = p.tables + (i64)row * p.max_pages;
    for (int i = threadIdx.x; i < LA_QG * LA_D / 8; i += blockDim.x) {
        const int t = i / (LA_D / 8), c = i % (LA_D / 8), pos = first + t;
        const i64 off = ((i64)tab[pos / LA_PAGE] * LA_PAGE + pos % LA_PAGE) * LA_D + c * 8;
        *(la_v4*)(sk + t * LA_D + c * 8) = *(const la_v4*)(p.k + off);
        *(la_v4*)(sv + t * LA_D + c * 8) = *(const la_v4*)(p.v + off);
    }
    __syncthreads();
    // (s, lo) rounded to f16 (stored at sp, lp); returns whether both are finite.
    auto scale = [](float mn, float mx, bool nan, float& s, float& lo, u8* sp, u8* lp) {
        const u16 sh = kq_f2h((mx - mn) / (float)KQ_MAXC), lh = kq_f2h(mn);
        s = kq_h2f(sh);
        lo = kq_h2f(lh);
        *(u16*)sp = sh;
        *(u16*)lp = lh;
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
        const int kk = d / 16, rem = d % 16;
        const int e = (rem & 1) + 2 * (rem >= 8), q4 = (rem % 8) / 2;
        u8* sp = page + (4 * kk + q4) * 16 + (e >> 1) * 4 + (e & 1) * 2;
        bad += !scale(mn, mx, nan, ks[d], klo[d], sp, sp + 8);
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
        const int ti = t / 16, tt = t % 16;
        const int e = (tt & 1) + 2 * (tt >= 8), q4 = (tt % 8) / 2;
        u8* vb = page + KQ_KS + ti * KQ_TILE + 2 * KQ_CODES;
        const int half = (e >> 1) * 4 + (e & 1) * 2;
        bad += !scale(mn, mx, nan, vs[i], vlo[i], vb + (q4 * KQ_NG + g) * 8 + half,
                      vb + 32 * KQ_NG + (g * 4 + q4) * 8 + half);
    }
    if (bad) atomicAdd(p.bad, bad);
    __syncthreads();
    // Code words: per tile, lane and word, K then V.
    const int per_tile = 32 * KQ_NW;
    for (int i = threadIdx.x; i < 2 * (LA_QG / 16) * per_tile; i += blockDim.x) {
        const int side = i / ((LA_QG / 16) * per_tile), x = i % ((LA_QG / 16) * per_tile);
        const int ti = x / per_tile, L = (x % per_tile) / KQ_NW, wi = x % KQ_NW;
        const int r = L / 4, q4 = L % 4;
        u32 w = 0;
#pragma unroll
        for (int j = 0; j < KQ_FW; j++) {
            const int f = wi * KQ_FW + j;
#pragma unroll
            for (int reg = 0; reg < 4; reg++) {
#pragma unroll
                for (int el = 0; el < 2; el++) {
                    const int row = r + 8 * (reg & 1), col = 2 * q4 + 8 * (reg >> 1) + el;
                    int c;
                    if (side == 0) {
                        const int key = ti * 16 + row, ch = f * 16 + col;
                        c = kq_code(la_to_f32(sk[key * LA_D + ch]), ks[ch], klo[ch]);
                    } else {
                        const int key = ti * 16 + col, ch = f * 16 + row, g = ch / LA_QG;
                        c = kq_code(la_to_f32(sv[key * LA_D + ch]), vs[key * KQ_NG + g], vlo[key * KQ_NG + g]);
                    }
                    w |= (u32)c << (el * 16 + 8 * (reg & 1) + 4 * j + LA_QB * (reg >> 1));
                }
            }
        }
        *(u32*)(page + KQ_KS + ti * KQ_TILE + side * KQ_CODES + kq_word_at(wi, L)) = w;
    }
}

// ---------------------------------------------------------------------------------------------
// Decode over a quantized head: positions 0 .. ql - 1 are the quantized pages (qtables, qlens),
// ql .. ql + rlen - 1 the full-precision pages of the per-head cache (tables, lens: the
// residual). Same work split, online softmax, finish and merge as decode.cu. The products are
// transposed so that the few query heads of a block are the N columns of mma.m16n8k16 and keys /
// channels fill its 16 rows: S^T = K Q^T (rows = keys), O^T = V^T P^T (rows = channels); P^T
// comes from S^T's accumulators by movmatrix (an 8 x 8 transpose in registers). A warp takes
// whole pages (w, w + W, ...; splits hold whole pages), each one ring stage (cp.async).
// K per channel factors per page:
//     S[h, t] = sum_d q_hd (lo_d + s_d c_td) = sum_d c_td (s_d q_hd) + sum_d lo_d q_hd
// once per page: B_page = s q (f16 products) and the constant lo . q (lo in every row of A); per
// tile of 16 keys: S^T = C_K B_page + constant. With V per token (group g of channels c):
//     sum_t P_ht v^_tc = sum_t c_tc (s_tg P_ht) + sum_t lo_tg P_ht
// B = s_g P^T (f16) per channel group against the V codes, and sum_t lo_tg P_ht for every g at
// once (one mma with the minima as A, row g = group g), accumulated beside O and rescaled with it;
// the minima's sums are added to O's channels after the loop.
// Residual tiles (at most R + G - 1 entries per head) load K / V fragments straight from global
// memory in the storage type.
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

__device__ __forceinline__ u32 kq_trans(u32 x) {
    u32 y;
    asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(y) : "r"(x));
    return y;
}

__device__ __forceinline__ float kq_logit(const LaDecParams& p, float s) {
#if LA_SOFTCAP
    return p.cap_mul * tanhf(s * p.q_scale);
#else
    return s * p.q_scale;
#endif
}

// Online softmax over T tiles' S^T accumulators x (this lane: keys r, r + 8 of heads 2 q4,
// 2 q4 + 1: x[t] = (r, 2q4), (r, 2q4+1), (r+8, 2q4), (r+8, 2q4+1)): updates the heads' m and l
// (this lane's keys only; l is summed over the lanes at the end), writes p, returns alpha.
template <int T>
__device__ __forceinline__ void kq_softmax(const float (&x)[T][4], float (&m)[2], float (&l)[2],
                                           float (&pe)[T][4], float (&alpha)[2]) {
#pragma unroll
    for (int c = 0; c < 2; c++) {
        float mx = m[c];
#pragma unroll
        for (int t = 0; t < T; t++) mx = fmaxf(mx, fmaxf(x[t][c], x[t][c + 2]));
        mx = fmaxf(mx, __shfl_xor_sync(LA_FULL, mx, 4));
        mx = fmaxf(mx, __shfl_xor_sync(LA_FULL, mx, 8));
        mx = fmaxf(mx, __shfl_xor_sync(LA_FULL, mx, 16));
        const float base = mx == -LA_INF ? 0.f : mx;
        alpha[c] = la_exp2(m[c] - base);
        m[c] = mx;
        float sum = 0.f;
#pragma unroll
        for (int t = 0; t < T; t++) {
            pe[t][c] = la_exp2(x[t][c] - base);
            pe[t][c + 2] = la_exp2(x[t][c + 2] - base);
            sum += pe[t][c] + pe[t][c + 2];
        }
        l[c] = l[c] * alpha[c] + sum;
    }
}

extern "C" __global__ void __launch_bounds__(LA_WARPS * 32, KQ_MINB) la_decode_kivi(const LaDecParams p) {
    const int split = blockIdx.x;
    const int kh = blockIdx.y / p.head_chunks, chunk = blockIdx.y % p.head_chunks;
    const int b = blockIdx.z;
    const int h0 = kh * (p.Hq / p.Hk) + chunk * LA_G;
    const int trow = b * p.Hk + kh;
    const int ql = p.qlens[trow], len = ql + p.lens[trow];
    const int j0 = split * p.split_len;
    const int j1 = la_imin(len, j0 + p.split_len);
    const bool direct = p.num_splits == 1;
    if (!direct && j0 >= len && split > 0) return;   // split 0 runs (a -inf partial for len 0)
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int r = lane >> 2, q4 = lane & 3;
    const int ntiles = j1 > j0 ? (j1 - j0 + 15) / 16 : 0;
    // Quantized pages of the split (ql and j0 are multiples of G), then residual tiles.
    const int npages = ql > j0 ? la_imin((j1 - j0 + LA_QG - 1) / LA_QG, (ql - j0) / LA_QG) : 0;

    // q as B fragments (column r = head h0 + r, zero past G): storage type and f16.
    u32 qb[LA_D / 16][2], qh[LA_D / 16][2];
#pragma unroll
    for (int ks = 0; ks < LA_D / 16; ks++) {
        qb[ks][0] = qb[ks][1] = 0u;
        if (r < LA_G) {
            const u16* qr = p.q + ((i64)b * p.Hq + h0 + r) * LA_D + ks * 16 + 2 * q4;
            qb[ks][0] = *(const u32*)qr;
            qb[ks][1] = *(const u32*)(qr + 8);
        }
#pragma unroll
        for (int x = 0; x < 2; x++) {
            float lo, hi;
            la_unpack2(qb[ks][x], lo, hi);
            qh[ks][x] = kq_f16x2(lo, hi);
        }
    }
    // O^T: rows = channels mt 16 + r (+ 8), columns = heads 2 q4, 2 q4 + 1.
    float o[LA_D / 16][4];
#pragma unroll
    for (int n = 0; n < LA_D / 16; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float olo[4] = {0.f, 0.f, 0.f, 0.f};   // sum_t lo P: row = group r, columns = heads 2 q4, 2 q4 + 1
    float m[2] = {-LA_INF, -LA_INF}, l[2] = {0.f, 0.f};

    extern __shared__ __align__(16) u8 kq_ring[];
    u8* ring = kq_ring + (i64)warp * LA_NS * KQ_PAGE;
    const int* qtab = p.qtables + (i64)trow * p.qmax_pages;
    auto issue = [&](int k, int st) {
        if (k < npages) {
            const u8* pg = p.qpages + (i64)qtab[(j0 + LA_QG * k) / LA_QG] * KQ_PAGE;
            u8* dst = ring + st * KQ_PAGE;
#pragma unroll 4
            for (int i = lane; i < KQ_PAGE / 16; i += 32) la_cp_async16(dst + 16 * i, pg + 16 * i, 16);
        }
        la_cp_commit();
    };
    auto rescale = [&](const float (&alpha)[2]) {
        if (__any_sync(LA_FULL, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
            for (int n = 0; n < LA_D / 16; n++) {
                o[n][0] *= alpha[0];
                o[n][1] *= alpha[1];
                o[n][2] *= alpha[0];
                o[n][3] *= alpha[1];
            }
            olo[0] *= alpha[0];
            olo[1] *= alpha[1];
        }
    };
#pragma unroll
    for (int st = 0; st < LA_NS - 1; st++) issue(warp + st * LA_WARPS, st);
    int cur = 0;
    for (int k = warp; k < npages; k += LA_WARPS) {
        issue(k + (LA_NS - 1) * LA_WARPS, (cur + LA_NS - 1) % LA_NS);
        la_cp_wait<LA_NS - 1>();
        __syncwarp();
        const u8* pg = ring + cur * KQ_PAGE;
        // Per page: B = s q and the constant lo . q (the same in every row of cst).
        const u32 nk[4] = {KQ_K2(0) | 0x80008000u, KQ_K2(0) | 0x80008000u, KQ_K2(1) | 0x80008000u,
                           KQ_K2(1) | 0x80008000u};
        u32 kb[LA_D / 16][2];
        float cs[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
        for (int ks = 0; ks < LA_D / 16; ks++) {
            const la_v4 w = *(const la_v4*)(pg + (4 * ks + q4) * 16);
            kb[ks][0] = kq_hmul2(qh[ks][0], w.x);
            kb[ks][1] = kq_hmul2(qh[ks][1], w.y);
            const u32 a[4] = {w.z, w.z, w.w, w.w};
            kq_mma_f16(cs[ks & 1], a, qh[ks]);
            // - sum_k K_k (s q)_k: the codes carry K.
            kq_mma_f16(cs[ks & 1], nk, kb[ks]);
        }
        const float cst[2] = {cs[0][0] + cs[1][0], cs[0][1] + cs[1][1]};
        // S^T of the page's T tiles (two accumulators per tile: shorter mma chains), one
        // softmax step over all of them, then O^T += V^T P^T tile by tile.
        constexpr int T = LA_QG / 16;
        float x[T][4];
#pragma unroll
        for (int t = 0; t < T; t++) {
            u32 kw[KQ_NW];
            kq_load_words(kw, pg + KQ_KS + t * KQ_TILE, lane);
            float sc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
            for (int wi = 0; wi < KQ_NW; wi++) {
                u32 c[KQ_R];
                kq_unpack(kw[wi], c);
#pragma unroll
                for (int j = 0; j < KQ_FW; j++) {
                    const int ks = wi * KQ_FW + j;
                    kq_mma_f16(sc[ks & 1], c + 4 * j, kb[ks]);
                }
            }
#pragma unroll
            for (int e = 0; e < 4; e++) x[t][e] = kq_logit(p, sc[0][e] + sc[1][e] + cst[e & 1]);
        }
        float pe[T][4], alpha[2];
        kq_softmax<T>(x, m, l, pe, alpha);
        rescale(alpha);
#pragma unroll
        for (int t = 0; t < T; t++) {
            const u8* tile = pg + KQ_KS + t * KQ_TILE;
            // P^T as B fragments (keys 2 q4 + {0, 1} | + 8, head r).
            const u32 pb[2] = {kq_trans(kq_f16x2(pe[t][0], pe[t][1])), kq_trans(kq_f16x2(pe[t][2], pe[t][3]))};
            const u8* vsc = tile + 2 * KQ_CODES;
            {
                const uint2 al = r < KQ_NG ? *(const uint2*)(vsc + 32 * KQ_NG + lane * 8) : make_uint2(0u, 0u);
                const u32 a[4] = {al.x, 0u, al.y, 0u};
                kq_mma_f16(olo, a, pb);
            }
            u32 vw[KQ_NW];
            kq_load_words(vw, tile + KQ_CODES, lane);
#pragma unroll
            for (int g = 0; g < KQ_NG; g++) {
                const uint2 sg = *(const uint2*)(vsc + (q4 * KQ_NG + g) * 8);
                const u32 bs[2] = {kq_hmul2(pb[0], sg.x), kq_hmul2(pb[1], sg.y)};
                // - sum_t K_t (s P)_t into row g of the minima's sums (the codes carry K).
                const u32 ng = r == g ? 0x80008000u : 0u;
                const u32 ak[4] = {r == g ? KQ_K2(0) | ng : 0u, 0u, r == g ? KQ_K2(1) | ng : 0u, 0u};
                kq_mma_f16(olo, ak, bs);
#pragma unroll
                for (int mt = g * (LA_QG / 16); mt < (g + 1) * (LA_QG / 16); mt += KQ_FW) {
                    u32 c[KQ_R];
                    kq_unpack(vw[mt / KQ_FW], c);
#pragma unroll
                    for (int j = 0; j < KQ_FW; j++) kq_mma_f16(o[mt + j], c + 4 * j, bs);
                }
            }
        }
        __syncwarp();
        cur = (cur + 1) % LA_NS;
    }
    la_cp_wait<0>();
    // The minima's sums: group g's row is in lane 4 g + q4 (same heads).
#pragma unroll
    for (int g = 0; g < KQ_NG; g++) {
        const float t0 = __shfl_sync(LA_FULL, olo[0], 4 * g + q4);
        const float t1 = __shfl_sync(LA_FULL, olo[1], 4 * g + q4);
#pragma unroll
        for (int mt = g * (LA_QG / 16); mt < (g + 1) * (LA_QG / 16); mt++) {
            o[mt][0] += t0;
            o[mt][1] += t1;
            o[mt][2] += t0;
            o[mt][3] += t1;
        }
    }
    // Residual tiles: position j is entry j - ql of the head's full-precision pages.
    const int* tab = p.tables + (i64)trow * p.max_pages;
    const int kr = npages * (LA_QG / 16);
    for (int k = kr + ((warp - kr) % LA_WARPS + LA_WARPS) % LA_WARPS; k < ntiles; k += LA_WARPS) {
        const int jt = j0 + 16 * k;
        // Rows (keys) r and r + 8 of the tile; columns of V: keys 2 q4 + {0, 1} (+ 8).
        const u16* krow[2];
        const u16* vrow[4];
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int j = jt + r + 8 * h;
            krow[h] = j < j1 ? p.k + la_row(p, tab[(j - ql) / LA_PAGE], b, j - ql, kh, 0) : nullptr;
        }
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int j = jt + 2 * q4 + (e & 1) + 8 * (e >> 1);
            vrow[e] = j < j1 ? p.v + la_row(p, tab[(j - ql) / LA_PAGE], b, j - ql, kh, 0) : nullptr;
        }
        float sc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int ks = 0; ks < LA_D / 16; ks++) {
            u32 a[4];
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const u16* kr_ = krow[i & 1];
                a[i] = kr_ ? *(const u32*)(kr_ + ks * 16 + 2 * q4 + 8 * (i >> 1)) : 0u;
            }
            la_mma16816(sc, a, qb[ks]);
        }
        float x[1][4];
#pragma unroll
        for (int e = 0; e < 4; e++) x[0][e] = krow[e >> 1] ? kq_logit(p, sc[e]) : -LA_INF;
        float pe[1][4], alpha[2];
        kq_softmax<1>(x, m, l, pe, alpha);
        rescale(alpha);
        const u32 pb[2] = {kq_trans(la_pack2(pe[0][0], pe[0][1])), kq_trans(la_pack2(pe[0][2], pe[0][3]))};
#pragma unroll
        for (int mt = 0; mt < LA_D / 16; mt++) {
            // A = V^T: rows = channels mt 16 + r (+ 8), k = keys 2 q4 + {0, 1} (+ 8).
            u32 a[4];
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int ch = mt * 16 + r + 8 * (i & 1);
                const u16* v0 = vrow[2 * (i >> 1)];
                const u16* v1 = vrow[2 * (i >> 1) + 1];
                a[i] = (u32)(v0 ? v0[ch] : (u16)0) | ((u32)(v1 ? v1[ch] : (u16)0) << 16);
            }
            la_mma16816(o[mt], a, pb);
        }
    }
    // l: the sum over this lane's keys -> over all keys (lanes of the same q4).
#pragma unroll
    for (int c = 0; c < 2; c++) {
        l[c] += __shfl_xor_sync(LA_FULL, l[c], 4);
        l[c] += __shfl_xor_sync(LA_FULL, l[c], 8);
        l[c] += __shfl_xor_sync(LA_FULL, l[c], 16);
    }
    __shared__ float s_acc[LA_WARPS][LA_G][LA_D];
    __shared__ float s_m[LA_WARPS][LA_G];
    __shared__ float s_l[LA_WARPS][LA_G];
#pragma unroll
    for (int c = 0; c < 2; c++) {
        const int h = 2 * q4 + c;
        if (h < LA_G) {
#pragma unroll
            for (int mt = 0; mt < LA_D / 16; mt++) {
                s_acc[warp][h][mt * 16 + r] = o[mt][c];
                s_acc[warp][h][mt * 16 + r + 8] = o[mt][c + 2];
            }
            if (r == 0) {
                s_m[warp][h] = m[c];
                s_l[warp][h] = l[c];
            }
        }
    }
    la_block_finish(p, s_acc, s_m, s_l, b, h0, split, direct);
}
#endif  // LA_KIVI
