// The online-softmax step of the Hopper forward kernels (attn_fwd_wg.cu, attn_fwd_ws.cu) on one
// warpgroup's wgmma accumulator fragment of S (64 rows x LA_BC keys; this thread: rows g and
// g + 8), and the packing of P into the A fragments of the P V product. Needs LA_BC.

// Online softmax step on logits s (rows g: elements 4 j, 4 j + 1; g + 8: 4 j + 2, 4 j + 3):
//   m' = max(m, max_j s_j),  a = 2^(m - m'),  p_j = 2^(s_j - m'),  l' = a l + sum_j p_j.
// Writes p into s, updates m and l, returns the factors a (a row with no allowed key so far keeps
// m = -inf and uses 0 as its reference, so p = 0 and nothing becomes NaN).
__device__ __forceinline__ void la_wg_softmax(float* s, float& m0, float& m1, float& l0, float& l1, float& a0,
                                              float& a1) {
    float mx0 = m0, mx1 = m1;
#pragma unroll
    for (int j = 0; j < LA_BC / 8; j++) {
        mx0 = fmaxf(mx0, fmaxf(s[4 * j], s[4 * j + 1]));
        mx1 = fmaxf(mx1, fmaxf(s[4 * j + 2], s[4 * j + 3]));
    }
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffff, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffff, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffff, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffff, mx1, 2));
    const float u0 = mx0 == -LA_INF ? 0.f : mx0, u1 = mx1 == -LA_INF ? 0.f : mx1;
    a0 = la_exp2(m0 - u0);
    a1 = la_exp2(m1 - u1);
    m0 = mx0;
    m1 = mx1;
    float r0 = 0.f, r1 = 0.f;
#pragma unroll
    for (int j = 0; j < LA_BC / 8; j++) {
        s[4 * j] = la_exp2(s[4 * j] - u0);
        s[4 * j + 1] = la_exp2(s[4 * j + 1] - u0);
        s[4 * j + 2] = la_exp2(s[4 * j + 2] - u1);
        s[4 * j + 3] = la_exp2(s[4 * j + 3] - u1);
        r0 += s[4 * j] + s[4 * j + 1];
        r1 += s[4 * j + 2] + s[4 * j + 3];
    }
    l0 = l0 * a0 + r0;
    l1 = l1 * a1 + r1;
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
