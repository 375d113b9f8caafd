// Shared pieces of the linear-attention kernels (linear_fwd.cu, linear_bwd.cu, linear_step.cu).
// Needs common.cuh (la_mma16816, la_ldmatrix_*, la_cp_async16, la_pack2, la_to_f32, la_exp2).
//
// Compile-time constants (set by the host, linear/cuda.rs): LA_F16 (1 = f16, 0 = bf16), LIN_K and
// LIN_V (key / value head dims, 64 or 128), LIN_BV (value columns per block of the forward and the
// dV kernel: 32 or 64), LIN_BK (key rows per block of the dQ / dK kernels: 32).
// Lengths, strides, the scale and the decay are kernel arguments (LinParams).
//
// Chunks: LIN_C = 64 tokens, counted from each sequence's first token (a chunk never crosses a
// sequence boundary; the last one may be short: L = min(64, end - c0) valid rows, the rest of the
// tiles are zero-filled by the loads and masked out of every product).
//
// Decay inside a chunk, in log space: b_i = g_{c0} + ... + g_{c0+i} (inclusive cumulative sum,
// b_i = b_{L-1} for i >= L). Every factor used is exp of a non-positive number:
//   exp(b_i - b_j) (j <= i),  exp(b_i),  exp(b_{L-1} - b_j) (j <= L-1),  exp(b_{L-1}),
// so a per-step log decay of -20 (b down to -1280 in a chunk) underflows to 0 and never overflows.

#define LIN_C 64
// LIN_GLA = 1: the per-key-dimension gate (GLA, decay 3: g [B, T, H, K]) in the forward and the
// forward state pass ("Per-key-dimension gates" below); 0: the scalar decays.
#ifndef LIN_GLA
#define LIN_GLA 0
#endif
// 8 warps a block; every chunked kernel is built for two blocks per SM (<= 128 registers a
// thread). Shared memory a block at K = V = 128 (linear/cuda.rs computes it): forward 104 KiB
// at BV 32 (121 KiB at 64), dV 121 KiB (137 KiB), dQ / dK 101 KiB; two blocks fit in an SM's
// 228 KiB for the forward at BV 32 and for dQ / dK.
// (The forward may be built with 16 warps, LIN_NW set by the host, for whole-state slices: BV = V.)
#ifndef LIN_NW
#define LIN_NW 8
#endif
#define LIN_THREADS (LIN_NW * 32)
// Warp layout of a K x BV state slice (forward, dV, segment passes): LIN_SWR warps along K (16
// rows each), LIN_SWC along the BV columns, LIN_NTS 8-column tiles a warp.
#define LIN_SWR ((LIN_K / 16) < LIN_NW ? (LIN_K / 16) : LIN_NW)
#define LIN_SWC (LIN_NW / LIN_SWR)
#define LIN_NTS (LIN_BV / (8 * LIN_SWC))
static_assert(LIN_K / 16 == LIN_SWR, "one 16-row block of the state per warp row");

// Kernel parameters (one struct for every linear kernel; unused fields are zero).
// Field for field `LinParams` in linear/cuda.rs: the layouts must match byte for byte.
struct LinParams {
    const u16* q;
    const u16* k;
    const u16* v;
    const u16* dout;
    u16* o;
    u16* dq;
    u16* dk;
    u16* dv;
    float* dk_acc;       // [B, T, Hk, K] f32 sums over the query heads of a kv head (GQA)
    float* dv_acc;       // [B, T, Hk, V]
    const float* g;      // log decay: [H] (per head), [B, T, H] (token), [B, T, H, K] (gate)
    const float* s0;     // initial state [seqs, H, K, V] (has_s0)
    float* sfin;         // final state [seqs, H, K, V]; the step's state, updated in place
    const float* dsfin;  // gradient of the final state (has_dsfin)
    float* ds0;          // gradient of the initial state
    float* db;           // [B, T, H] gradient w.r.t. the cumulative log decay (want_db); gate:
                         // [seqs, H, K], the final state's term alone
    const int* cu;       // cu_seqlens [seqs + 1] (has_cu)
    float* seg_f;        // segmented (nseg > 1): state entering each segment [seqs, nseg, H, K, V]
    float* seg_r;        // gradient reaching the state leaving each segment, same shape
    float* seg_g;        // total log decay of each segment [seqs, nseg, H] ([.., H, K]: gate)
    i64 q_s[3], k_s[3], v_s[3], do_s[3], o_s[3], dq_s[3], dk_s[3], dv_s[3];  // (batch, seq, head)
    int B, T, H, Hk;
    int seqs, decay, has_s0, has_cu;  // decay: 0 none, 1 per head, 2 per token, 3 gate
    int has_dsfin, want_db, gqa_acc, seg_len;  // seg_len: tokens a segment (a multiple of 64)
    int nseg, pad0;                             // nseg: segments a sequence (1: not segmented)
    float scale, pad1;
    u16* chunk_f;  // chunk-parallel backward: the state entering every chunk [chunk ids, H, K, V]
    u16* chunk_r;  // and the gradient reaching the state leaving it, same shape (lin_chunk_id)
    float* dg;     // gate: dg [B, T, H, K], written by lin_bwd_chunk (suffix sums inside a chunk)
    float* dg_tot; // gate: [chunk ids, H, K] chunk totals of db, then the carries (lin_gla_dg_carry)
};
static_assert(sizeof(LinParams) == 448, "LinParams layout (linear/cuda.rs)");

__device__ __forceinline__ float lin_exp(float x) { return la_exp2(x * LA_LOG2E); }

// Vector types of our own (no CUDA headers under NVRTC): 8- and 16-byte f32 loads and stores.
struct __align__(8) lin_f2 {
    float x, y;
};
struct __align__(16) lin_f4 {
    float x, y, z, w;
};

// *p += v in global memory, atomically (no return value).
__device__ __forceinline__ void lin_red_add(float* p, float v) {
    asm volatile("red.add.f32 [%0], %1;" ::"l"(p), "f"(v) : "memory");
}

// Token range [t0, t1) and batch row of sequence n (cu_seqlens clamped into [0, T]).
__device__ __forceinline__ void lin_seq(const LinParams& p, int n, int& b, int& t0, int& t1) {
    if (p.has_cu) {
        b = 0;
        t0 = la_imin(la_imax(p.cu[n], 0), p.T);
        t1 = la_imin(la_imax(p.cu[n + 1], t0), p.T);
    } else {
        b = n;
        t0 = 0;
        t1 = p.T;
    }
}

// Segments (issue of parallelism: one block walking a whole sequence leaves the GPU idle when
// seqs x heads x slices is small). A sequence is cut into nseg segments of seg_len tokens (a
// multiple of the chunk, so chunks stay counted from the sequence start); block z of a grid runs
// segment z % nseg of sequence z / nseg. With S_j the state entering segment j, G_j its total
// log decay and A_j the state it would leave from a zero start (lin_state_fwd),
//   S_{j+1} = exp(G_j) S_j + A_j,                 S_0 = initial state;
// with H_j the gradient reaching the state leaving segment j and R_j the gradient its tokens
// alone send to its start (lin_state_rev),
//   H_{j-1} = exp(G_j) H_j + R_j,                 H_last = gradient of the final state;
// lin_seg_scan runs these recurrences (one thread per state element), then every chunked kernel
// starts its segment from S_j (forward, dQ) or H_j (dV, dK).
struct LinSeg {
    int n, seg, b, t0, t1;  // sequence, segment, batch row, the sequence's tokens [t0, t1)
    int a, e;               // the segment's tokens [a, e)
    bool run, first, last;  // run: the segment exists (segment 0 always does, even if empty)
};
__device__ __forceinline__ LinSeg lin_segment(const LinParams& p, int z) {
    LinSeg s;
    s.n = z / p.nseg;
    s.seg = z % p.nseg;
    lin_seq(p, s.n, s.b, s.t0, s.t1);
    if (p.nseg == 1) {
        s.a = s.t0;
        s.e = s.t1;
    } else {
        s.a = la_imin(s.t1, s.t0 + s.seg * p.seg_len);
        s.e = la_imin(s.t1, s.a + p.seg_len);
    }
    s.run = s.seg == 0 || s.a < s.t1;
    s.first = s.seg == 0;
    s.last = s.e == s.t1;
    return s;
}
// Index of the chunk starting at token r0 of sequence n (batch row b) in chunk_f / chunk_r: with
// cu_seqlens, floor(r0 / 64) + n (strictly increasing over chunks and sequences: a sequence's
// chunks start 64 apart, the next sequence starts at or after the last chunk's floor, and n adds
// one; at most ceil(T / 64) + seqs ids); without, b ceil(T / 64) + r0 / 64.
__device__ __forceinline__ i64 lin_chunk_id(const LinParams& p, int n, int b, int r0) {
    if (p.has_cu) return r0 / LIN_C + n;
    return (i64)b * ((p.T + LIN_C - 1) / LIN_C) + r0 / LIN_C;
}

// Offset of the [K, V] state of (segment z, head h) in seg_f / seg_r.
__device__ __forceinline__ i64 lin_seg_state(const LinParams& p, int z, int h) {
    return ((i64)z * p.H + h) * LIN_K * LIN_V;
}

// Swizzled shared-memory tiles [rows][W] of 16-bit elements in 16-byte chunks (W = 32, 64 or
// 128): the chunk index is XORed with a function of the row so that the 8 row addresses of an
// ldmatrix hit distinct banks (any bijection per row is correct; reads and writes share it).
template <int W>
__device__ __forceinline__ int lsw(int row, int c) {
    static_assert(W == 32 || W == 64 || W == 128, "tile width");
    const int x = (W == 32) ? ((row >> 1) & 3) : (row & 7);
    return row * W + ((c ^ x) << 3);
}
// Element offset of (row, col) in such a tile (col even: a 4-byte pair).
template <int W>
__device__ __forceinline__ int lsw_el(int row, int col) {
    return lsw<W>(row, col >> 3) + (col & 7);
}

// Asynchronously copies rows row0 .. row0 + ROWS of a slab (row stride ss elements, W contiguous
// columns from g) into a swizzled [ROWS][W] tile; rows at or past `limit` are zero-filled.
template <int ROWS, int W>
__device__ __forceinline__ void lin_load(u16* s, const u16* g, i64 ss, int row0, int limit) {
    constexpr int CH = W / 8, N = ROWS * CH;
#pragma unroll
    for (int x = threadIdx.x; x < N; x += LIN_THREADS) {
        const int r = x / CH, c = x % CH;
        const int gr = row0 + r;
        const bool ok = gr < limit;
        la_cp_async16(s + lsw<W>(r, c), g + (ok ? (i64)gr * ss : 0) + c * 8, ok ? 16 : 0);
    }
}

// 4-byte asynchronous copy (the decay of one token); bytes = 0 writes zero.
__device__ __forceinline__ void lin_cp_async4(void* dst, const void* src, int bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(la_smem_addr(dst)), "l"(src),
                 "r"(bytes));
}

// The log decays of rows row0 .. row0 + 63 of head h (token decay only) into sg[64]; rows at or
// past `limit` read 0.
__device__ __forceinline__ void lin_load_g(float* sg, const LinParams& p, int b, int h, int row0,
                                           int limit) {
    if (p.decay != 2) return;
    for (int r = threadIdx.x; r < LIN_C; r += LIN_THREADS) {
        const int gr = row0 + r;
        const bool ok = gr < limit;
        lin_cp_async4(sg + r, p.g + (ok ? ((i64)b * p.T + gr) * p.H + h : 0), ok ? 4 : 0);
    }
}

// b (inclusive cumulative log decay of the chunk's L valid rows, held at b_{L-1} past them) into
// sb[64]; run by one warp. sg holds the token decays (decay 2).
__device__ __forceinline__ void lin_chunk_b(float* sb, const float* sg, const LinParams& p, int h,
                                            int L, int lane) {
    float x[2];
#pragma unroll
    for (int u = 0; u < 2; u++) {
        const int i = lane + 32 * u;
        float gi = 0.f;
        if (p.decay == 1) gi = p.g[h];
        else if (p.decay == 2) gi = sg[i];
        x[u] = i < L ? gi : 0.f;
    }
#pragma unroll
    for (int u = 0; u < 2; u++) {
#pragma unroll
        for (int d = 1; d < 32; d <<= 1) {
            const float y = __shfl_up_sync(0xffffffff, x[u], d);
            if (lane >= d) x[u] += y;
        }
    }
    const float tot0 = __shfl_sync(0xffffffff, x[0], 31);
    sb[lane] = x[0];
    sb[lane + 32] = x[1] + tot0;
}

// Row factors of a chunk into sw[64], by the warp that ran lin_chunk_b (sb written):
// tail: w_j = exp(b_{L-1} - b_j), else mul exp(b_j); 0 for j >= L.
__device__ __forceinline__ void lin_chunk_w(float* sw, const float* sb, int L, bool tail, float mul,
                                            int lane) {
    __syncwarp();  // sb from every lane
    const float bl = sb[LIN_C - 1];
#pragma unroll
    for (int u = 0; u < 2; u++) {
        const int i = lane + 32 * u;
        sw[i] = i < L ? mul * lin_exp(tail ? bl - sb[i] : sb[i]) : 0.f;
    }
}

// A pair of 16-bit elements scaled by (w0, w1), rounded back to the storage type.
__device__ __forceinline__ u32 lin_scale2(u32 x, float w0, float w1) {
    return la_pack2(la_to_f32((u16)(x & 0xffff)) * w0, la_to_f32((u16)(x >> 16)) * w1);
}

// ---- Warp-level tensor-core products on swizzled shared-memory tiles ------------------------
// mma.sync m16n8k16 (bf16 / f16 in, f32 accumulate). The accumulator acc[MT][NT][4] of a warp
// covers rows m0 + 16 mt + (g, g + 8) and columns n0 + 8 nt + 2 t4 (+1) with g = lane / 4,
// t4 = lane % 4: acc[mt][nt][0..1] row g, acc[mt][nt][2..3] row g + 8. NT is even; the
// contraction runs over KS steps of 16.

// C[m][n] += sum_k A[m][k] B[n][k]: A stored [m][k] (width WA), B stored [n][k] (width WB).
template <int WA, int WB, int MT, int NT, int KS>
__device__ __forceinline__ void lin_mma_nt(float (&acc)[MT][NT][4], const u16* sA, int m0,
                                           const u16* sB, int n0, int lane) {
#pragma unroll
    for (int kk = 0; kk < KS; kk++) {
        u32 a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
            la_ldmatrix_x4(a[mt], sA + lsw<WA>(m0 + 16 * mt + (lane & 15), kk * 2 + (lane >> 4)));
#pragma unroll
        for (int np = 0; np < NT / 2; np++) {
            u32 bf[4];
            la_ldmatrix_x4(bf, sB + lsw<WB>(n0 + np * 16 + (lane & 7) + ((lane >> 4) << 3),
                                            kk * 2 + ((lane >> 3) & 1)));
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                la_mma16816(acc[mt][2 * np], a[mt], bf);
                la_mma16816(acc[mt][2 * np + 1], a[mt], bf + 2);
            }
        }
    }
}

// C[m][n] += sum_k A[m][k] B[k][n]: A stored [m][k] (width WA), B stored [k][n] (width WB).
template <int WA, int WB, int MT, int NT, int KS>
__device__ __forceinline__ void lin_mma_nn(float (&acc)[MT][NT][4], const u16* sA, int m0,
                                           const u16* sB, int n0, int lane) {
#pragma unroll
    for (int ks = 0; ks < KS; ks++) {
        u32 a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
            la_ldmatrix_x4(a[mt], sA + lsw<WA>(m0 + 16 * mt + (lane & 15), ks * 2 + (lane >> 4)));
#pragma unroll
        for (int dp = 0; dp < NT / 2; dp++) {
            u32 bf[4];
            la_ldmatrix_x4_trans(bf, sB + lsw<WB>(ks * 16 + (lane & 7) + (((lane >> 3) & 1) << 3),
                                                  (n0 >> 3) + dp * 2 + (lane >> 4)));
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                la_mma16816(acc[mt][2 * dp], a[mt], bf);
                la_mma16816(acc[mt][2 * dp + 1], a[mt], bf + 2);
            }
        }
    }
}

// C[m][n] += sum_k A[k][m] B[k][n]: A stored [k][m] (width WA, read transposed), B stored [k][n]
// (width WB). With `sw`, the contraction rows of A are scaled on the fly: sum_k (w_k A[k][m])
// B[k][n], w = sw[0 .. 16 KS) (each product rounded to the storage type, as a row-scaled copy of
// A in shared memory would be; the A fragment of mma m16n8k16 holds k = 2 t4 + (0, 1) in
// registers 0 and 1 and k = 2 t4 + 8 + (0, 1) in registers 2 and 3).
template <int WA, int WB, int MT, int NT, int KS>
__device__ __forceinline__ void lin_mma_tn(float (&acc)[MT][NT][4], const u16* sA, int m0,
                                           const u16* sB, int n0, int lane,
                                           const float* sw = nullptr) {
    const int t4 = lane & 3;
#pragma unroll
    for (int ks = 0; ks < KS; ks++) {
        u32 a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; mt++) {
            la_ldmatrix_x4_trans(a[mt], sA + lsw<WA>(ks * 16 + (lane & 7) + ((lane >> 4) << 3),
                                                     ((m0 + 16 * mt) >> 3) + ((lane >> 3) & 1)));
            if (sw) {
                const lin_f2 wl = *(const lin_f2*)(sw + ks * 16 + 2 * t4);
                const lin_f2 wh = *(const lin_f2*)(sw + ks * 16 + 2 * t4 + 8);
                a[mt][0] = lin_scale2(a[mt][0], wl.x, wl.y);
                a[mt][1] = lin_scale2(a[mt][1], wl.x, wl.y);
                a[mt][2] = lin_scale2(a[mt][2], wh.x, wh.y);
                a[mt][3] = lin_scale2(a[mt][3], wh.x, wh.y);
            }
        }
#pragma unroll
        for (int dp = 0; dp < NT / 2; dp++) {
            u32 bf[4];
            la_ldmatrix_x4_trans(bf, sB + lsw<WB>(ks * 16 + (lane & 7) + (((lane >> 3) & 1) << 3),
                                                  (n0 >> 3) + dp * 2 + (lane >> 4)));
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                la_mma16816(acc[mt][2 * dp], a[mt], bf);
                la_mma16816(acc[mt][2 * dp + 1], a[mt], bf + 2);
            }
        }
    }
}

template <int MT, int NT>
__device__ __forceinline__ void lin_zero(float (&acc)[MT][NT][4]) {
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int nt = 0; nt < NT; nt++) acc[mt][nt][0] = acc[mt][nt][1] = acc[mt][nt][2] = acc[mt][nt][3] = 0.f;
}

template <int MT, int NT>
__device__ __forceinline__ void lin_scale(float (&acc)[MT][NT][4], float s) {
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[mt][nt][e] *= s;
}

// Stores an accumulator (rows m0.., columns n0..) into a swizzled [rows][W] tile, rounded to the
// storage type.
template <int W, int MT, int NT>
__device__ __forceinline__ void lin_store_tile(u16* s, const float (&acc)[MT][NT][4], int m0, int n0,
                                               int lane) {
    const int g = lane >> 2, t4 = lane & 3;
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int hf = 0; hf < 2; hf++) {
                const int r = m0 + 16 * mt + g + 8 * hf, c = n0 + 8 * nt + 2 * t4;
                *(u32*)(s + lsw_el<W>(r, c)) = la_pack2(acc[mt][nt][2 * hf], acc[mt][nt][2 * hf + 1]);
            }
}

// A state block (rows m0.., columns n0..) from / to an f32 matrix in global memory (row length
// `ld`).
template <int MT, int NT>
__device__ __forceinline__ void lin_state_load(float (&acc)[MT][NT][4], const float* s, int ld, int m0,
                                               int n0, int lane) {
    const int g = lane >> 2, t4 = lane & 3;
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int hf = 0; hf < 2; hf++) {
                const int r = m0 + 16 * mt + g + 8 * hf, c = n0 + 8 * nt + 2 * t4;
                const lin_f2 x = *(const lin_f2*)(s + (i64)r * ld + c);
                acc[mt][nt][2 * hf] = x.x;
                acc[mt][nt][2 * hf + 1] = x.y;
            }
}
template <int MT, int NT>
__device__ __forceinline__ void lin_state_store(float* s, const float (&acc)[MT][NT][4], int ld, int m0,
                                                int n0, int lane) {
    const int g = lane >> 2, t4 = lane & 3;
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int hf = 0; hf < 2; hf++) {
                const int r = m0 + 16 * mt + g + 8 * hf, c = n0 + 8 * nt + 2 * t4;
                *(lin_f2*)(s + (i64)r * ld + c) = lin_f2{acc[mt][nt][2 * hf], acc[mt][nt][2 * hf + 1]};
            }
}

// The same block stored in the storage type (the per-chunk states of the chunk-parallel backward).
template <int MT, int NT>
__device__ __forceinline__ void lin_state_store_el(u16* s, const float (&acc)[MT][NT][4], int ld, int m0,
                                                   int n0, int lane) {
    const int g = lane >> 2, t4 = lane & 3;
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int hf = 0; hf < 2; hf++) {
                const int r = m0 + 16 * mt + g + 8 * hf, c = n0 + 8 * nt + 2 * t4;
                *(u32*)(s + (i64)r * ld + c) = la_pack2(acc[mt][nt][2 * hf], acc[mt][nt][2 * hf + 1]);
            }
}

// sum over a state block (rows m0.., columns n0..) of X o acc, X an f32 matrix in global memory
// (row length `ld`), added to *dst by every warp (the final-state term of db).
template <int MT, int NT>
__device__ __forceinline__ void lin_state_dot_add(float* dst, const float* x, const float (&acc)[MT][NT][4],
                                                  int ld, int m0, int n0, int lane) {
    const int g = lane >> 2, t4 = lane & 3;
    float s = 0.f;
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int hf = 0; hf < 2; hf++) {
                const int r = m0 + 16 * mt + g + 8 * hf, c = n0 + 8 * nt + 2 * t4;
                const lin_f2 v = *(const lin_f2*)(x + (i64)r * ld + c);
                s += v.x * acc[mt][nt][2 * hf] + v.y * acc[mt][nt][2 * hf + 1];
            }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
    if (lane == 0) lin_red_add(dst, s);
}

// The decay mask of a chunk applied to a block of a C x C accumulator (rows m0 .. m0 + 15,
// columns n0 .. n0 + 8 NT - 1): X_ij <- scale exp(b_i - b_j) X_ij for j <= i < L, 0 elsewhere;
// stored into the [64][64] tile sP.
template <int NT>
__device__ __forceinline__ void lin_mask_store(u16* sP, float (&acc)[1][NT][4], const float* sb, int m0,
                                               int n0, int L, float scale, int lane) {
    const int g = lane >> 2, t4 = lane & 3;
#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
        const int i = m0 + g + 8 * hf;
        const float bi = sb[i];
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            float x[2];
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int j = n0 + 8 * nt + 2 * t4 + e;
                x[e] = (j <= i && i < L) ? scale * lin_exp(bi - sb[j]) * acc[0][nt][2 * hf + e] : 0.f;
            }
            *(u32*)(sP + lsw_el<64>(i, n0 + 8 * nt + 2 * t4)) = la_pack2(x[0], x[1]);
        }
    }
}

// Rows of a [64][W] tile scaled in place: X_j <- f(j) X_j, where f(j) = mul exp(bref - b_j) (j < L)
// with bref = b_{L-1} when `tail`, f(j) = mul exp(b_j) (j < L) otherwise; rows >= L become 0.
// Reads src, writes dst (both [64][W] swizzled with the same layout). All threads of the block.
template <int W>
__device__ __forceinline__ void lin_rowscale(u16* dst, const u16* src, const float* sb, int L, bool tail,
                                             float mul) {
    const float bl = sb[LIN_C - 1];
    for (int x = threadIdx.x; x < LIN_C * W / 2; x += LIN_THREADS) {
        const int r = x / (W / 2), c = (x % (W / 2)) * 2;
        const int off = lsw_el<W>(r, c);
        const u32 w = *(const u32*)(src + off);
        const float f = r < L ? mul * lin_exp(tail ? bl - sb[r] : sb[r]) : 0.f;
        const float lo = la_to_f32((u16)(w & 0xffff)), hi = la_to_f32((u16)(w >> 16));
        *(u32*)(dst + off) = la_pack2(lo * f, hi * f);
    }
}

// Element (row, col) of a swizzled [rows][W] tile, as f32.
template <int W>
__device__ __forceinline__ float lin_el(const u16* s, int row, int col) {
    return la_to_f32(s[lsw<W>(row, col >> 3) + (col & 7)]);
}

// ---- Per-key-dimension gates (GLA, LIN_GLA = 1) ------------------------------------------------
// The decay of state row k at token t is exp(g_t[k]); inside a chunk, with the inclusive
// cumulative sums B_i[k] = g_{c0}[k] + ... + g_{c0+i}[k] (B_i = B_{L-1} for i >= L):
//   P_ij = scale sum_k q_i[k] k_j[k] exp(B_i[k] - B_j[k])         (j <= i < L, else 0)
//   O    = P V + scale (Q o exp(B)) S
//   S'   = diag(exp(B_{L-1})) S + (K o exp(B_{L-1} - B))^T V
// Q o exp(B) and K o exp(B_{L-1} - B) only hold exponentials of non-positive numbers. P is not a
// masked matrix product (the decay sits inside the sum over k); two ways to form it:
//   fast  P = mask(scale (Q o exp(B)) (K o exp(-B))^T) on the tensor cores, taken when every
//         K o exp(-B) of the chunk stays below LIN_GLA_BIG (exp(-B) grows with the chunk's total
//         decay; the terms kept, j <= i, are each at most |q_i[k] k_j[k]|, so nothing cancels);
//   exact element by element with exp(B_i[k] - B_j[k]) <= 1 (a chunk whose decay is too strong
//         for the fast form: a per-step log decay of -20 gives exp(1280) there).
// The gate tile of a chunk is [64][K] f32 (row stride K, no swizzle: thread k walks column k).
#define LIN_GT (LIN_C * LIN_K)
#if LA_F16
#define LIN_GLA_BIG 16384.f
#else
#define LIN_GLA_BIG 1e30f
#endif
// Largest total log decay of a chunk (any key dim) the fast form takes: the backward multiplies
// by exp(-B) <= e^60 in f32.
#define LIN_GLA_SPAN 60.f

// The gates of rows row0 .. row0 + 63 of head h into sG [64][K] (rows at or past `limit` read 0).
__device__ __forceinline__ void lin_load_gate(float* sG, const LinParams& p, int b, int h, int row0,
                                              int limit) {
    constexpr int CH = LIN_K / 4;  // 16-byte chunks a row
    for (int x = threadIdx.x; x < LIN_C * CH; x += LIN_THREADS) {
        const int r = x / CH, c = x % CH;
        const int gr = row0 + r;
        const bool ok = gr < limit;
        la_cp_async16(sG + r * LIN_K + c * 4, p.g + (ok ? (((i64)b * p.T + gr) * p.H + h) * LIN_K : 0) + c * 4,
                      ok ? 16 : 0);
    }
}

// sG [64][K] of gates -> B (inclusive cumulative sums down each column), in place: each thread
// sums a run of rows of one column, then adds the totals of the runs above it. All threads;
// ends with a block barrier.
__device__ __forceinline__ void lin_gate_cumsum(float* sG) {
    static_assert(LIN_THREADS % LIN_K == 0, "whole columns per thread group");
    constexpr int PARTS = LIN_THREADS / LIN_K, RP = LIN_C / PARTS;
    const int k = threadIdx.x % LIN_K, part = threadIdx.x / LIN_K;
    float s = 0.f;
#pragma unroll
    for (int r = part * RP; r < part * RP + RP; r++) {
        s += sG[r * LIN_K + k];
        sG[r * LIN_K + k] = s;
    }
    __syncthreads();
    float off = 0.f;
    for (int u = 0; u < part; u++) off += sG[(u * RP + RP - 1) * LIN_K + k];
    __syncthreads();  // every run's total read before any is shifted
    if (part > 0) {
#pragma unroll
        for (int r = part * RP; r < part * RP + RP; r++) sG[r * LIN_K + k] += off;
    }
    __syncthreads();
}

// The factors of a chunk (B in sG, L valid rows), all threads:
//   sKt <- K o exp(-B)        (the fast form's keys; returns whether any is >= LIN_GLA_BIG or
//                             not finite, or the chunk's total log decay passes LIN_GLA_SPAN in
//                             some key dim: then P must be formed element by element)
// Barrier at the end (the returned flag is block-uniform).
__device__ __forceinline__ bool lin_gate_keys(u16* sKt, const u16* sK, const float* sG) {
    int big = 0;
    for (int x = threadIdx.x; x < LIN_C * LIN_K / 2; x += LIN_THREADS) {
        const int r = x / (LIN_K / 2), c = (x % (LIN_K / 2)) * 2;
        const int off = lsw_el<LIN_K>(r, c);
        const u32 w = *(const u32*)(sK + off);
        const float k0 = la_to_f32((u16)(w & 0xffff)) * lin_exp(-sG[r * LIN_K + c]);
        const float k1 = la_to_f32((u16)(w >> 16)) * lin_exp(-sG[r * LIN_K + c + 1]);
        big |= !(fabsf(k0) < LIN_GLA_BIG && fabsf(k1) < LIN_GLA_BIG);
        big |= !(sG[(LIN_C - 1) * LIN_K + c] >= -LIN_GLA_SPAN && sG[(LIN_C - 1) * LIN_K + c + 1] >= -LIN_GLA_SPAN);
        *(u32*)(sKt + off) = la_pack2(k0, k1);
    }
    return __syncthreads_or(big);
}

// The exact form: sP <- P_ij = scale sum_k q_i[k] k_j[k] exp(B_i[k] - B_j[k]) for j <= i < L
// (0 elsewhere), from the unscaled Q and K tiles. All threads; no barrier.
__device__ __forceinline__ void lin_gate_exact(u16* sP, const u16* sQ, const u16* sK, const float* sG, int L,
                                               float scale) {
    for (int x = threadIdx.x; x < LIN_C * LIN_C / 2; x += LIN_THREADS) {
        const int i = x / (LIN_C / 2), j0 = (x % (LIN_C / 2)) * 2;
        float a[2] = {0.f, 0.f};
#pragma unroll
        for (int e = 0; e < 2; e++) {
            const int j = j0 + e;
            if (j > i || i >= L) continue;
            float s = 0.f;
            for (int k = 0; k < LIN_K; k++)
                s += lin_el<LIN_K>(sQ, i, k) * lin_el<LIN_K>(sK, j, k) *
                     lin_exp(sG[i * LIN_K + k] - sG[j * LIN_K + k]);
            a[e] = scale * s;
        }
        *(u32*)(sP + lsw_el<LIN_C>(i, j0)) = la_pack2(a[0], a[1]);
    }
}

// dst <- src o F elementwise ([64][K] tiles, same swizzle; dst may be src) with
// F = mul exp(B) (TAIL = false) or mul exp(B_{L-1} - B) (TAIL = true): exponents <= 0, rows past
// L are zero already. All threads; no barrier.
template <bool TAIL>
__device__ __forceinline__ void lin_gate_mul(u16* dst, const u16* src, const float* sG, float mul) {
    const float* bl = sG + (LIN_C - 1) * LIN_K;
    for (int x = threadIdx.x; x < LIN_C * LIN_K / 2; x += LIN_THREADS) {
        const int r = x / (LIN_K / 2), c = (x % (LIN_K / 2)) * 2;
        const int off = lsw_el<LIN_K>(r, c);
        const float b0 = sG[r * LIN_K + c], b1 = sG[r * LIN_K + c + 1];
        const float f0 = mul * lin_exp(TAIL ? bl[c] - b0 : b0), f1 = mul * lin_exp(TAIL ? bl[c + 1] - b1 : b1);
        const u32 w = *(const u32*)(src + off);
        *(u32*)(dst + off) = la_pack2(la_to_f32((u16)(w & 0xffff)) * f0, la_to_f32((u16)(w >> 16)) * f1);
    }
}

// In place: sQ <- Q o exp(B) (when given), sK <- K o exp(B_{L-1} - B).
__device__ __forceinline__ void lin_gate_scale(u16* sQ, u16* sK, const float* sG) {
    if (sQ) lin_gate_mul<false>(sQ, sQ, sG, 1.f);
    lin_gate_mul<true>(sK, sK, sG, 1.f);
}

// In place: sQ <- mul Q o exp(B) (the reverse walks' X). All threads; no barrier.
__device__ __forceinline__ void lin_gate_qscale(u16* sQ, const float* sG, float mul) {
    lin_gate_mul<false>(sQ, sQ, sG, mul);
}

// Exact intra-chunk sums into a gradient fragment (rows m0 + g, m0 + g + 8, columns
// n0 + 8 nt + 2 t4 (+1); rows at or past L left alone), exponents <= 0:
//   TR = false (dQ): acc[i][k] += sum_{j <= i}     A[i][j] X[j][k] exp(B_i[k] - B_j[k])
//   TR = true  (dK): acc[j][k] += sum_{j <= i < L} A[i][j] X[i][k] exp(B_i[k] - B_j[k])
// A [64][64] (dA, masked), X [64][K] (K for dQ, Q for dK), both swizzled.
template <bool TR, int NT>
__device__ __forceinline__ void lin_gate_exact_frag(float (&acc)[1][NT][4], const u16* sA, const u16* sX,
                                                    const float* sG, int m0, int n0, int L, int lane) {
    const int g = lane >> 2, t4 = lane & 3;
#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
        const int r = m0 + g + 8 * hf;
        if (r >= L) continue;
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int col = n0 + 8 * nt + 2 * t4 + e;
                const float br = sG[r * LIN_K + col];
                float s = 0.f;
                if (!TR) {
                    for (int j = 0; j <= r; j++)
                        s += lin_el<LIN_C>(sA, r, j) * lin_el<LIN_K>(sX, j, col) *
                             lin_exp(br - sG[j * LIN_K + col]);
                } else {
                    for (int i = r; i < L; i++)
                        s += lin_el<LIN_C>(sA, i, r) * lin_el<LIN_K>(sX, i, col) *
                             lin_exp(sG[i * LIN_K + col] - br);
                }
                acc[0][nt][2 * hf + e] += s;
            }
    }
}

// sum over a state block's columns of X o acc for each of its rows (rows m0 + g, m0 + g + 8;
// X an f32 matrix with row length ld), added to dst[row] (atomically: other warps and blocks
// hold the other columns).
template <int NT>
__device__ __forceinline__ void lin_state_dot_rows(float* dst, const float* x, const float (&acc)[1][NT][4],
                                                   int ld, int m0, int n0, int lane) {
    const int g = lane >> 2, t4 = lane & 3;
#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
        const int r = m0 + g + 8 * hf;
        float s = 0.f;
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            const int c = n0 + 8 * nt + 2 * t4;
            const lin_f2 v = *(const lin_f2*)(x + (i64)r * ld + c);
            s += v.x * acc[0][nt][2 * hf] + v.y * acc[0][nt][2 * hf + 1];
        }
        s += __shfl_xor_sync(0xffffffff, s, 1);
        s += __shfl_xor_sync(0xffffffff, s, 2);
        if (t4 == 0) lin_red_add(dst + r, s);
    }
}

// Rows of a state block scaled by exp(B_{L-1}[row]) (rows m0 + g, m0 + g + 8 of the warp's block).
template <int NT>
__device__ __forceinline__ void lin_gate_rows(float (&acc)[1][NT][4], const float* sG, int m0, int lane) {
    const float* bl = sG + (LIN_C - 1) * LIN_K;
    const float f0 = lin_exp(bl[m0 + (lane >> 2)]), f1 = lin_exp(bl[m0 + (lane >> 2) + 8]);
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
        acc[0][nt][0] *= f0;
        acc[0][nt][1] *= f0;
        acc[0][nt][2] *= f1;
        acc[0][nt][3] *= f1;
    }
}
