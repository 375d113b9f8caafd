// The online-softmax step of the Hopper forward kernels (attn_fwd_wg.cu, attn_fwd_ws.cu) on one
// warpgroup's wgmma accumulator fragment of S (64 rows x LA_BC keys; this thread: rows g and
// g + 8), and the packing of P into the A fragments of the P V product. Needs LA_BC.

// Online softmax step on one tile (rows g: elements 4 j, 4 j + 1; g + 8: 4 j + 2, 4 j + 3). The
// logits are y_j = c s_j in log2 units: with LA_FUSED_SCALE (no soft-cap, scale > 0) s holds the raw
// dot products and c = scale log2 e is applied here, one FFMA per element (the row maximum is
// taken over s: c > 0 keeps the order); otherwise the caller formed y (soft-cap, scale <= 0) and
// c = 1, which the compiler folds away.
//   m_t = c max_j s_j;  p_j = 2^(c s_j - m),  l' = a l + sum_j p_j,  O' = a O
// with m the row's reference: it is raised to max(m, m_t) only when some row of the warp would
// see logits more than LA_SLACK = 8 above it (a = 2^(m_old - m_new)); otherwise a = 1 and the
// caller skips the rescale of O. Every p_j stays <= 2^8, and l and O stay consistent with the
// same m, so the result O / l and LSE = (m + log2 l) ln 2 are exact for any choice of m (the
// first tile with an allowed key always sets m). A row with no allowed key so far keeps
// m = -inf and uses 0 as its reference, so p = 0 and nothing becomes NaN.
// Writes p into s, updates m and l, sets the factors a, and returns whether they are not all 1
// (the same answer for every lane of the warp).
#define LA_SLACK 8.f
#ifndef LA_LAZY
#define LA_LAZY 1  // 0: the reference follows every rise of the maximum (a rescale per rise)
#endif
#if LA_FUSED_SCALE
#define LA_SM_SCALE(p) ((p).scale_log2)
#else
#define LA_SM_SCALE(p) 1.f
#endif
// The tile's row maxima m_t = c max_j s_j of rows g and g + 8 (the 4 lanes of a row agree).
// `fmax` is the comparison: fmaxf (a NaN never wins) or la_fmax_nan (a NaN wins: skip-softmax
// must see it). For the pooled map (attn_fwd_ws.cu LA_MAP) the maxima are taken per 64-key group
// (LA_WG_NG of them; otherwise one group, the tile) and then over the groups; `gm`, when given,
// receives this thread's group maxima of s before the quad's shuffles: gm[x] row g,
// gm[LA_WG_NG + x] row g + 8.
#ifndef LA_MAP
#define LA_MAP 0
#endif
#if LA_MAP
#define LA_WG_NG (LA_BC / 64)   // the pooled map's 64-key groups
#else
#define LA_WG_NG 1              // one group: the whole tile
#endif
#define LA_WG_JG (LA_BC / 8 / LA_WG_NG)   // fragment columns of 8 keys a group
template <typename F>
__device__ __forceinline__ void la_wg_rowmax(const float* s, float c, float& mx0, float& mx1, F fmax,
                                             float* gm = nullptr) {
    mx0 = -LA_INF;
    mx1 = -LA_INF;
#pragma unroll
    for (int x = 0; x < LA_WG_NG; x++) {
        float g0 = -LA_INF, g1 = -LA_INF;
#pragma unroll
        for (int j = LA_WG_JG * x; j < LA_WG_JG * (x + 1); j++) {
            g0 = fmax(g0, fmax(s[4 * j], s[4 * j + 1]));
            g1 = fmax(g1, fmax(s[4 * j + 2], s[4 * j + 3]));
        }
        if (gm) {
            gm[x] = g0;
            gm[LA_WG_NG + x] = g1;
        }
        mx0 = fmax(mx0, g0);
        mx1 = fmax(mx1, g1);
    }
    mx0 = fmax(mx0, __shfl_xor_sync(0xffffffff, mx0, 1));
    mx0 = fmax(mx0, __shfl_xor_sync(0xffffffff, mx0, 2));
    mx1 = fmax(mx1, __shfl_xor_sync(0xffffffff, mx1, 1));
    mx1 = fmax(mx1, __shfl_xor_sync(0xffffffff, mx1, 2));
    mx0 *= c;
    mx1 *= c;
}

// max that returns NaN when either operand is NaN (PTX max.NaN, sm_80+).
__device__ __forceinline__ float la_fmax_nan(float a, float b) {
    float r;
    asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

// The step of la_wg_softmax with the tile's row maxima already taken (la_wg_rowmax). The row
// sums are taken per group of la_wg_rowmax and then over the groups; `gs`, when given, receives
// this thread's group sums of p before the quad's shuffles (as `gm` of la_wg_rowmax).
__device__ __forceinline__ bool la_wg_softmax_from(float* s, float c, float mx0, float mx1, float& m0, float& m1,
                                                   float& l0, float& l1, float& a0, float& a1,
                                                   float* gs = nullptr) {
    const bool up = !LA_LAZY || __any_sync(0xffffffff, mx0 > m0 + LA_SLACK || mx1 > m1 + LA_SLACK);
    a0 = a1 = 1.f;
    if (up) {
        const float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);
        a0 = la_exp2(m0 - (n0 == -LA_INF ? 0.f : n0));
        a1 = la_exp2(m1 - (n1 == -LA_INF ? 0.f : n1));
        m0 = n0;
        m1 = n1;
    }
    const float u0 = m0 == -LA_INF ? 0.f : m0, u1 = m1 == -LA_INF ? 0.f : m1;
    float r0 = 0.f, r1 = 0.f;
#pragma unroll
    for (int x = 0; x < LA_WG_NG; x++) {
        float q0 = 0.f, q1 = 0.f;
#pragma unroll
        for (int j = LA_WG_JG * x; j < LA_WG_JG * (x + 1); j++) {
            s[4 * j] = la_exp2(fmaf(s[4 * j], c, -u0));
            s[4 * j + 1] = la_exp2(fmaf(s[4 * j + 1], c, -u0));
            s[4 * j + 2] = la_exp2(fmaf(s[4 * j + 2], c, -u1));
            s[4 * j + 3] = la_exp2(fmaf(s[4 * j + 3], c, -u1));
            q0 += s[4 * j] + s[4 * j + 1];
            q1 += s[4 * j + 2] + s[4 * j + 3];
        }
        if (gs) {
            gs[x] = q0;
            gs[LA_WG_NG + x] = q1;
        }
        r0 += q0;
        r1 += q1;
    }
    l0 = l0 * a0 + r0;
    l1 = l1 * a1 + r1;
    return up;
}

__device__ __forceinline__ bool la_wg_softmax(float* s, float c, float& m0, float& m1, float& l0, float& l1,
                                              float& a0, float& a1, float* gm = nullptr, float* gs = nullptr) {
    float mx0, mx1;
    la_wg_rowmax(s, c, mx0, mx1, [](float a, float b) { return fmaxf(a, b); }, gm);
    return la_wg_softmax_from(s, c, mx0, mx1, m0, m1, l0, l1, a0, a1, gs);
}

// O *= a per row (the rescale that goes with la_wg_softmax's factors).
__device__ __forceinline__ void la_wg_rescale(float* o, float a0, float a1) {
#pragma unroll
    for (int x = 0; x < LA_D / 8; x++) {
        o[4 * x] *= a0;
        o[4 * x + 1] *= a0;
        o[4 * x + 2] *= a1;
        o[4 * x + 3] *= a1;
    }
}

// P as the A fragments of the P V product (bf16/f16 pairs; the accumulator layout is the
// fragment layout).
__device__ __forceinline__ void la_wg_pack(u32 (*pf)[4], const float* s) {
#pragma unroll
    for (int j = 0; j < LA_BC / 8; j++) {
        pf[j >> 1][(j & 1) * 2 + 0] = la_pack2(s[4 * j], s[4 * j + 1]);
        pf[j >> 1][(j & 1) * 2 + 1] = la_pack2(s[4 * j + 2], s[4 * j + 3]);
    }
}
