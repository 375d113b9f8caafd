// Linear attention backward, chunked, on the tensor cores. Shared pieces: linear_common.cuh.
//
// Per chunk (notation of linear_fwd.cu; S the state entering the chunk, H the gradient reaching
// the state leaving it, w_j = exp(b_{L-1} - b_j), D the decay mask with scale folded in):
//   dP  = (dO V^T) o D                       P = (Q K^T) o D
//   dQ  = dP K + scale diag(exp(b)) dO S^T
//   dK  = dP^T Q + diag(w) V H^T
//   dV  = P^T dO + diag(w) K H
//   H_prev = exp(b_{L-1}) H + scale (Q o exp(b))^T dO        (H at the sequence end: dS_final)
//   dS_0 = H at the sequence start
//   db_t = q_t . dq_t - k_t . dk_t (+ sum(dS_final o S_final) at the last token),
//   dg_t = sum_{u >= t in the sequence} db_u      (b = cumulative sum of g, token decay only)
// with dk per query head (summed over the query heads of a kv head afterwards).
//
// Two ways to run it (linear/cuda.rs, `BwdPath`):
// Chunk-parallel (the default): two walks (linear_seg.cu, lin_state_{fwd,rev}_mat) store S and H
// of every chunk in the storage type, then lin_bwd_chunk computes every chunk's dQ, dK, dV and db
// at once with P and dP computed once a chunk (2 K V bf16 per chunk and head of scratch).
// Sliced (when those states would not fit the scratch bound): dQ and dK need full rows of S / H
// over V, dV needs full columns over K, so no single slicing of the state serves all three; three
// kernels, each owning a slice of the state that keeps its output complete (no cross-block
// reductions), each recomputing the state it needs (over its segment when the sequence is cut,
// from S_j / H_j of linear_seg.cu):
//   lin_bwd_dq  block (K slice ks of BK rows, h, n), chunks in order: S[ks] (BK x V) forward,
//               dQ[:, ks] and q . dq partial sums of db.
//   lin_bwd_dk  block (ks, h, n), chunks in reverse: H[ks] (BK x V), dK[:, ks], -k . dk.
//   lin_bwd_dv  block (V slice vs of BV columns, h, n), chunks in reverse: H[:, vs] (K x BV),
//               dV[:, vs] and dS_0[:, vs].
// dP and P (C x C) are recomputed by every slice (as the forward recomputes Q K^T).
// lin_bwd_dg turns db into dg (reverse cumulative sums per sequence and head); lin_f32_to_el
// converts the GQA sums of dK / dV to the storage type.

// Stores one 16-row block (rows m0.. of a chunk starting at token c0, L valid) of a gradient
// accumulator acc[1][NT][4] (columns n0 + ..) with row factors f(row): directly in the storage
// type (`el`, strides ss), or added to an f32 [.., W] matrix (`acc32`, row stride ld) when the
// query heads of a kv head all contribute.
template <int NT>
__device__ __forceinline__ void lin_put_grad(const float (&acc)[1][NT][4], u16* el, i64 ss, float* acc32,
                                             i64 ld, int c0, int m0, int n0, int L, int lane) {
    const int g = lane >> 2, t4 = lane & 3;
#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
        const int i = m0 + g + 8 * hf;
        if (i >= L) continue;
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            const int c = n0 + 8 * nt + 2 * t4;
            const float x0 = acc[0][nt][2 * hf], x1 = acc[0][nt][2 * hf + 1];
            if (acc32) {
                float* d = acc32 + (i64)(c0 + i) * ld + c;
                lin_red_add(d, x0);
                lin_red_add(d + 1, x1);
            } else {
                *(u32*)(el + (i64)(c0 + i) * ss + c) = la_pack2(x0, x1);
            }
        }
    }
}

// Stores a dK (DK) or dV block of kv head kh (rows m0 + .., columns n0 + .. of the chunk at
// token c0): summed over the group's query heads in f32 under GQA (dk_acc / dv_acc), else
// directly in the storage type.
template <bool DK, int NT>
__device__ __forceinline__ void lin_put_kv(const float (&acc)[1][NT][4], const LinParams& p, int b, int kh, int c0,
                                           int m0, int n0, int L, int lane) {
    constexpr int W = DK ? LIN_K : LIN_V;
    if (p.gqa_acc) {
        lin_put_grad(acc, nullptr, 0, (DK ? p.dk_acc : p.dv_acc) + ((i64)b * p.T * p.Hk + kh) * W, (i64)p.Hk * W,
                     c0, m0, n0, L, lane);
    } else {
        const i64* st = DK ? p.dk_s : p.dv_s;
        lin_put_grad(acc, (DK ? p.dk : p.dv) + b * st[0] + kh * st[2], st[1], nullptr, 0, c0, m0, n0, L, lane);
    }
}

// sum over the warp's columns n0 .. of X[i][c] * Y[i][c] for rows m0 + g, m0 + g + 8 (Y from a
// swizzled [64][W] tile), added to db[row] (times sign); quad lanes reduce first.
template <int W, int NT>
__device__ __forceinline__ void lin_db_add(const float (&acc)[1][NT][4], const u16* sY, float* db, i64 dstride,
                                           int c0, int m0, int n0, int L, float sign, int lane) {
    const int g = lane >> 2, t4 = lane & 3;
#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
        const int i = m0 + g + 8 * hf;
        float s = 0.f;
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            const u32 w = *(const u32*)(sY + lsw_el<W>(i, n0 + 8 * nt + 2 * t4));
            s += acc[0][nt][2 * hf] * la_to_f32((u16)(w & 0xffff)) + acc[0][nt][2 * hf + 1] * la_to_f32((u16)(w >> 16));
        }
        s += __shfl_xor_sync(0xffffffff, s, 1);
        s += __shfl_xor_sync(0xffffffff, s, 2);
        if (t4 == 0 && i < L) lin_red_add(db + (i64)(c0 + i) * dstride, sign * s);
    }
}

// ---- dV ------------------------------------------------------------------------------------
// Shared memory: two stages of Q [64][K], K [64][K], dO [64][BV] and the decays, P [64][64],
// K o w [64][K], scale Q o exp(b) [64][K], H as the storage type [K][BV], b [64].
#define LIN_DV_STAGE (2 * LIN_C * LIN_K + LIN_C * LIN_BV)
// Warp layouts (8 warps): C x C and C x BV blocks of 16 rows (w % 4) x half the columns (w / 4);
// the K x BV state in blocks of 16 rows (LIN_SWR along K) x BV / LIN_SWC columns.

extern "C" __global__ void __launch_bounds__(LIN_THREADS, 2) lin_bwd_dv(const LinParams p) {
    extern __shared__ __align__(128) u16 lin_smem[];
    if (LIN_GLA) __trap();  // gates take the chunk-parallel path (the host never launches this)
    u16* sP = lin_smem + 2 * LIN_DV_STAGE;
    u16* sKt = sP + LIN_C * LIN_C;
    u16* sQt = sKt + LIN_C * LIN_K;
    u16* sH = sQt + LIN_C * LIN_K;
    float* sg = (float*)(sH + LIN_K * LIN_BV);
    float* sb = sg + 2 * LIN_C;

    const int vs = blockIdx.x, h = blockIdx.y, z = blockIdx.z;
    const LinSeg seg = lin_segment(p, z);
    if (!seg.run) return;
    const int kh = h / (p.H / p.Hk);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int wr = warp & 3, wc = warp >> 2;
    const int v0 = vs * LIN_BV;
    const int b = seg.b, t0 = seg.a, t1 = seg.e;  // this block's segment
    const int nc = (t1 - t0 + LIN_C - 1) / LIN_C;

    const u16* gq = p.q + b * p.q_s[0] + h * p.q_s[2];
    const u16* gk = p.k + b * p.k_s[0] + kh * p.k_s[2];
    const u16* gdo = p.dout + b * p.do_s[0] + h * p.do_s[2] + v0;

    // Chunks in reverse: stage s holds chunk nc - 1 - (step) with step & 1 == s.
#pragma unroll
    for (int st = 0; st < 2; st++) {
        if (st < nc) {
            u16* s = lin_smem + st * LIN_DV_STAGE;
            const int r0 = t0 + (nc - 1 - st) * LIN_C;
            lin_load<LIN_C, LIN_K>(s, gq, p.q_s[1], r0, t1);
            lin_load<LIN_C, LIN_K>(s + LIN_C * LIN_K, gk, p.k_s[1], r0, t1);
            lin_load<LIN_C, LIN_BV>(s + 2 * LIN_C * LIN_K, gdo, p.do_s[1], r0, t1);
            lin_load_g(sg + st * LIN_C, p, b, h, r0, t1);
        }
        la_cp_commit();
    }

    const int sm0 = (warp % LIN_SWR) * 16, sn0 = (warp / LIN_SWR) * (LIN_BV / LIN_SWC);
    float hs[1][LIN_NTS][4];
    const i64 sbase = ((i64)seg.n * p.H + h) * LIN_K * LIN_V;
    if (p.nseg > 1) lin_state_load(hs, p.seg_r + lin_seg_state(p, z, h), LIN_V, sm0, v0 + sn0, lane);
    else if (p.has_dsfin) lin_state_load(hs, p.dsfin + sbase, LIN_V, sm0, v0 + sn0, lane);
    else lin_zero(hs);

    for (int step = 0; step < nc; step++) {
        const int c = nc - 1 - step;
        const int c0 = t0 + c * LIN_C;
        const int L = la_imin(LIN_C, t1 - c0);
        const u16* sQ = lin_smem + (step & 1) * LIN_DV_STAGE;
        const u16* sK = sQ + LIN_C * LIN_K;
        const u16* sdO = sK + LIN_C * LIN_K;
        la_cp_wait<1>();
        __syncthreads();
        if (warp == 0) lin_chunk_b(sb, sg + (step & 1) * LIN_C, p, h, L, lane);
        lin_store_tile<LIN_BV>(sH, hs, sm0, sn0, lane);
        __syncthreads();

        {   // P = scale (Q K^T) o D, rows 16 wr, columns 32 wc
            float a[1][4][4];
            lin_zero(a);
            lin_mma_nt<LIN_K, LIN_K, 1, 4, LIN_K / 16>(a, sQ, 16 * wr, sK, 32 * wc, lane);
            lin_mask_store(sP, a, sb, 16 * wr, 32 * wc, L, p.scale, lane);
        }
        lin_rowscale<LIN_K>(sKt, sK, sb, L, true, 1.f);
        lin_rowscale<LIN_K>(sQt, sQ, sb, L, false, p.scale);
        __syncthreads();

        {   // dV (rows 16 wr, columns (BV / 2) wc) = P^T dO + (K o w) H
            constexpr int ON = LIN_BV / 16;
            const int on0 = wc * (LIN_BV / 2);
            float d[1][ON][4];
            lin_zero(d);
            lin_mma_tn<LIN_C, LIN_BV, 1, ON, LIN_C / 16>(d, sP, 16 * wr, sdO, on0, lane);
            lin_mma_nn<LIN_K, LIN_BV, 1, ON, LIN_K / 16>(d, sKt, 16 * wr, sH, on0, lane);
            lin_put_kv<false>(d, p, b, kh, c0, 16 * wr, v0 + on0, L, lane);
        }
        // H_prev = exp(b_{L-1}) H + (scale Q o exp(b))^T dO
        lin_scale(hs, lin_exp(sb[LIN_C - 1]));
        lin_mma_tn<LIN_K, LIN_BV, 1, LIN_NTS, LIN_C / 16>(hs, sQt, sm0, sdO, sn0, lane);
        __syncthreads();
        if (step + 2 < nc) {
            u16* s = lin_smem + (step & 1) * LIN_DV_STAGE;
            const int r0 = t0 + (c - 2) * LIN_C;
            lin_load<LIN_C, LIN_K>(s, gq, p.q_s[1], r0, t1);
            lin_load<LIN_C, LIN_K>(s + LIN_C * LIN_K, gk, p.k_s[1], r0, t1);
            lin_load<LIN_C, LIN_BV>(s + 2 * LIN_C * LIN_K, gdo, p.do_s[1], r0, t1);
            lin_load_g(sg + (step & 1) * LIN_C, p, b, h, r0, t1);
        }
        la_cp_commit();
    }
    la_cp_wait<0>();
    if (seg.first) lin_state_store(p.ds0 + sbase, hs, LIN_V, sm0, v0 + sn0, lane);
}

// ---- dQ and dK (K slices) --------------------------------------------------------------------
// Shared memory: two stages of X [64][BK] (K slice for dQ, Q slice for dK), Y [64][BK] (Q slice
// for dQ's db, K slice for dK's db), V [64][V], dO [64][V] and the decays; dP [64][64], a row-scaled
// slice [64][BK] (K o w for dQ's state, scale Q o exp(b) for dK's H), the state slice as the
// storage type [BK][V], b [64].
// Warp layouts (8 warps): dP (64 x 64) and dQ / dK (64 x BK) in blocks of 16 rows (w % 4) x half
// the columns (w / 4); the state slice (BK x V, f32 registers) in blocks of 16 rows (w % 2) x V / 4
// columns (w / 2).
#define LIN_KS_STAGE (2 * LIN_C * LIN_BK + 2 * LIN_C * LIN_V)
#define LIN_KNT (LIN_V / 32)
static_assert(LIN_BK == 32, "two 16-row blocks of the state slice");

template <bool DQ>
__device__ __forceinline__ void lin_bwd_kslice(const LinParams& p) {
    extern __shared__ __align__(128) u16 lin_smem[];
    if (LIN_GLA) __trap();  // gates take the chunk-parallel path (the host never launches this)
    u16* sP = lin_smem + 2 * LIN_KS_STAGE;
    u16* sXt = sP + LIN_C * LIN_C;
    u16* sS = sXt + LIN_C * LIN_BK;
    float* sg = (float*)(sS + LIN_BK * LIN_V);
    float* sb = sg + 2 * LIN_C;

    const int ks = blockIdx.x, h = blockIdx.y, z = blockIdx.z;
    const LinSeg seg = lin_segment(p, z);
    if (!seg.run) return;
    const int kh = h / (p.H / p.Hk);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int wr = warp & 3, wc = warp >> 2;
    const int k0 = ks * LIN_BK;
    const int b = seg.b, t0 = seg.a, t1 = seg.e;  // this block's segment
    const int nc = (t1 - t0 + LIN_C - 1) / LIN_C;

    const u16* gq = p.q + b * p.q_s[0] + h * p.q_s[2] + k0;
    const u16* gk = p.k + b * p.k_s[0] + kh * p.k_s[2] + k0;
    const u16* gx = DQ ? gk : gq;
    const u16* gy = DQ ? gq : gk;
    const i64 xs = DQ ? p.k_s[1] : p.q_s[1], ys = DQ ? p.q_s[1] : p.k_s[1];
    const u16* gv = p.v + b * p.v_s[0] + kh * p.v_s[2];
    const u16* gdo = p.dout + b * p.do_s[0] + h * p.do_s[2];

    auto load = [&](int st, int c) {
        u16* s = lin_smem + st * LIN_KS_STAGE;
        const int r0 = t0 + c * LIN_C;
        lin_load<LIN_C, LIN_BK>(s, gx, xs, r0, t1);
        lin_load<LIN_C, LIN_BK>(s + LIN_C * LIN_BK, gy, ys, r0, t1);
        lin_load<LIN_C, LIN_V>(s + 2 * LIN_C * LIN_BK, gv, p.v_s[1], r0, t1);
        lin_load<LIN_C, LIN_V>(s + 2 * LIN_C * LIN_BK + LIN_C * LIN_V, gdo, p.do_s[1], r0, t1);
        lin_load_g(sg + st * LIN_C, p, b, h, r0, t1);
    };
    // dQ walks chunks in order, dK in reverse.
#pragma unroll
    for (int st = 0; st < 2; st++) {
        if (st < nc) load(st, DQ ? st : nc - 1 - st);
        la_cp_commit();
    }

    const int sm0 = (warp & 1) * 16, sn0 = (warp >> 1) * (LIN_V / 4);
    float sacc[1][LIN_KNT][4];
    const i64 sbase = ((i64)seg.n * p.H + h) * LIN_K * LIN_V + (i64)k0 * LIN_V;
    if (p.nseg > 1) {
        const float* s = (DQ ? p.seg_f : p.seg_r) + lin_seg_state(p, z, h) + (i64)k0 * LIN_V;
        lin_state_load(sacc, s, LIN_V, sm0, sn0, lane);
    } else if (DQ ? p.has_s0 : p.has_dsfin) {
        lin_state_load(sacc, (DQ ? p.s0 : p.dsfin) + sbase, LIN_V, sm0, sn0, lane);
    } else {
        lin_zero(sacc);
    }
    float* db = p.db + (i64)b * p.T * p.H + h;

    for (int step = 0; step < nc; step++) {
        const int c = DQ ? step : nc - 1 - step;
        const int c0 = t0 + c * LIN_C;
        const int L = la_imin(LIN_C, t1 - c0);
        const u16* sX = lin_smem + (step & 1) * LIN_KS_STAGE;
        const u16* sY = sX + LIN_C * LIN_BK;
        const u16* sV = sY + LIN_C * LIN_BK;
        const u16* sdO = sV + LIN_C * LIN_V;
        la_cp_wait<1>();
        __syncthreads();
        if (warp == 0) lin_chunk_b(sb, sg + (step & 1) * LIN_C, p, h, L, lane);
        lin_store_tile<LIN_V>(sS, sacc, sm0, sn0, lane);
        __syncthreads();

        {   // dP = (dO V^T) o D, rows 16 wr, columns 32 wc
            float a[1][4][4];
            lin_zero(a);
            lin_mma_nt<LIN_V, LIN_V, 1, 4, LIN_V / 16>(a, sdO, 16 * wr, sV, 32 * wc, lane);
            lin_mask_store(sP, a, sb, 16 * wr, 32 * wc, L, p.scale, lane);
        }
        // dQ: K o w (state update); dK: scale Q o exp(b) (H update).
        lin_rowscale<LIN_BK>(sXt, sX, sb, L, DQ, DQ ? 1.f : p.scale);
        __syncthreads();

        // This warp's block of dQ / dK: rows 16 wr, columns dn0 .. dn0 + 15 of the slice.
        constexpr int DN = LIN_BK / 16;
        const int dn0 = wc * (LIN_BK / 2);
        float d[1][DN][4];
        lin_zero(d);
        if (DQ) {
            // dQ[:, ks] = dP K[:, ks] + scale diag(exp(b)) dO S[ks]^T
            float e[1][DN][4];
            lin_zero(e);
            lin_mma_nn<LIN_C, LIN_BK, 1, DN, LIN_C / 16>(d, sP, 16 * wr, sX, dn0, lane);
            lin_mma_nt<LIN_V, LIN_V, 1, DN, LIN_V / 16>(e, sdO, 16 * wr, sS, dn0, lane);
            const int g = lane >> 2;
#pragma unroll
            for (int hf = 0; hf < 2; hf++) {
                const float f = p.scale * lin_exp(sb[16 * wr + g + 8 * hf]);
#pragma unroll
                for (int nt = 0; nt < DN; nt++) {
                    d[0][nt][2 * hf] += f * e[0][nt][2 * hf];
                    d[0][nt][2 * hf + 1] += f * e[0][nt][2 * hf + 1];
                }
            }
            if (p.want_db) lin_db_add<LIN_BK>(d, sY, db, p.H, c0, 16 * wr, dn0, L, 1.f, lane);
            lin_put_grad(d, p.dq + b * p.dq_s[0] + h * p.dq_s[2], p.dq_s[1], nullptr, 0, c0, 16 * wr,
                         k0 + dn0, L, lane);
            // S[ks] = exp(b_{L-1}) S[ks] + (K[:, ks] o w)^T V
            lin_scale(sacc, lin_exp(sb[LIN_C - 1]));
            lin_mma_tn<LIN_BK, LIN_V, 1, LIN_KNT, LIN_C / 16>(sacc, sXt, sm0, sV, sn0, lane);
        } else {
            // dK[:, ks] rows 16 warp = dP^T Q[:, ks] + diag(w) V H[ks]^T
            float e[1][DN][4];
            lin_zero(e);
            lin_mma_tn<LIN_C, LIN_BK, 1, DN, LIN_C / 16>(d, sP, 16 * wr, sX, dn0, lane);
            lin_mma_nt<LIN_V, LIN_V, 1, DN, LIN_V / 16>(e, sV, 16 * wr, sS, dn0, lane);
            const int g = lane >> 2;
#pragma unroll
            for (int hf = 0; hf < 2; hf++) {
                const int j = 16 * wr + g + 8 * hf;
                const float f = j < L ? lin_exp(sb[LIN_C - 1] - sb[j]) : 0.f;
#pragma unroll
                for (int nt = 0; nt < DN; nt++) {
                    d[0][nt][2 * hf] += f * e[0][nt][2 * hf];
                    d[0][nt][2 * hf + 1] += f * e[0][nt][2 * hf + 1];
                }
            }
            if (p.want_db) lin_db_add<LIN_BK>(d, sY, db, p.H, c0, 16 * wr, dn0, L, -1.f, lane);
            lin_put_kv<true>(d, p, b, kh, c0, 16 * wr, k0 + dn0, L, lane);
            // H[ks] = exp(b_{L-1}) H[ks] + (scale Q[:, ks] o exp(b))^T dO
            lin_scale(sacc, lin_exp(sb[LIN_C - 1]));
            lin_mma_tn<LIN_BK, LIN_V, 1, LIN_KNT, LIN_C / 16>(sacc, sXt, sm0, sdO, sn0, lane);
        }
        __syncthreads();
        if (step + 2 < nc) load(step & 1, DQ ? c + 2 : c - 2);
        la_cp_commit();
    }
    la_cp_wait<0>();
    // The final-state term of db: sum over this slice of dS_final o S_final, at the last token.
    if (DQ && p.want_db && p.has_dsfin && seg.last && t1 > seg.t0) {
        const int g = lane >> 2, t4 = lane & 3;
        float s = 0.f;
#pragma unroll
        for (int mt = 0; mt < 1; mt++)
#pragma unroll
            for (int nt = 0; nt < LIN_KNT; nt++)
#pragma unroll
                for (int hf = 0; hf < 2; hf++) {
                    const int r = sm0 + 16 * mt + g + 8 * hf, cc = sn0 + 8 * nt + 2 * t4;
                    const lin_f2 x = *(const lin_f2*)(p.dsfin + sbase + (i64)r * LIN_V + cc);
                    s += x.x * sacc[mt][nt][2 * hf] + x.y * sacc[mt][nt][2 * hf + 1];
                }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
        if (lane == 0) lin_red_add(db + (i64)(t1 - 1) * p.H, s);
    }
}

extern "C" __global__ void __launch_bounds__(LIN_THREADS, 2) lin_bwd_dq(const LinParams p) {
    lin_bwd_kslice<true>(p);
}
extern "C" __global__ void __launch_bounds__(LIN_THREADS, 2) lin_bwd_dk(const LinParams p) {
    lin_bwd_kslice<false>(p);
}

// ---- Chunk-parallel gradients (lin_bwd_chunk) ----------------------------------------------
// With the state entering every chunk (S, chunk_f) and the gradient reaching the state leaving it
// (H, chunk_r) stored by lin_state_fwd_mat / lin_state_rev_mat (linear_seg.cu), every chunk's
// gradients are independent: block (chunk id, h) computes, with P and dP once,
//   dQ = dP K + scale diag(exp(b)) dO S^T        and db += q . dq
//   dV = P^T dO + diag(w) K H
//   dK = dP^T Q + diag(w) V H^T                  and db -= k . dk
// (the formulas at the top of this file), no walk and no recomputed state: the whole GPU works
// on chunks at once. Shared memory: Q, K [64][K], V, dO [64][V], one state [K][V] (S, then H
// in the same place), P and dP [64][64], the decays and b [64]: 112.5 KiB at K = V = 128, two
// blocks an SM. Warp layouts (8 warps): P / dP in blocks of 16 rows (w % 4) x 32 columns
// (w / 4); the gradients (64 x K or 64 x V) in 16 rows (w % 4) x half the columns (w / 4).
#define LIN_CH_SMEM_EL (2 * LIN_C * LIN_K + 2 * LIN_C * LIN_V + LIN_K * LIN_V + 2 * LIN_C * LIN_C)

// Sequence n, batch row b, tokens [t0, t1) and chunk start r0 of chunk id `id` (lin_chunk_id);
// false when the id belongs to no chunk (the gaps of the varlen numbering).
__device__ __forceinline__ bool lin_chunk_of(const LinParams& p, i64 id, int& n, int& b, int& t0, int& t1,
                                             int& r0) {
    if (!p.has_cu) {
        const int nct = (p.T + LIN_C - 1) / LIN_C;
        n = b = (int)(id / nct);
        t0 = 0;
        t1 = p.T;
        r0 = (int)(id % nct) * LIN_C;
        return n < p.seqs && r0 < t1;
    }
    // The last sequence whose first id floor(t0 / 64) + n is <= id (strictly increasing in n).
    int lo = 0, hi = p.seqs - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        int bb, a, e;
        lin_seq(p, mid, bb, a, e);
        if (a / LIN_C + mid <= id) lo = mid;
        else hi = mid - 1;
    }
    n = lo;
    lin_seq(p, n, b, t0, t1);
    r0 = t0 + (int)(id - (t0 / LIN_C + n)) * LIN_C;
    return id >= t0 / LIN_C + n && r0 < t1;
}

#if !LIN_GLA
extern "C" __global__ void __launch_bounds__(LIN_THREADS, 2) lin_bwd_chunk(const LinParams p) {
    extern __shared__ __align__(128) u16 lin_smem[];
    u16* sQ = lin_smem;
    u16* sK = sQ + LIN_C * LIN_K;
    u16* sV = sK + LIN_C * LIN_K;
    u16* sdO = sV + LIN_C * LIN_V;
    u16* sS = sdO + LIN_C * LIN_V;
    u16* sP = sS + LIN_K * LIN_V;
    u16* sdP = sP + LIN_C * LIN_C;
    float* sg = (float*)(sdP + LIN_C * LIN_C);
    float* sb = sg + LIN_C;

    const i64 id = blockIdx.x;
    const int h = blockIdx.y;
    int n, b, t0, t1, c0;
    if (!lin_chunk_of(p, id, n, b, t0, t1, c0)) return;
    const int kh = h / (p.H / p.Hk);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int wr = warp & 3, wc = warp >> 2;
    const int L = la_imin(LIN_C, t1 - c0);
    const i64 st = (id * p.H + h) * LIN_K * LIN_V;

    lin_load<LIN_C, LIN_K>(sQ, p.q + b * p.q_s[0] + h * p.q_s[2], p.q_s[1], c0, t1);
    lin_load<LIN_C, LIN_K>(sK, p.k + b * p.k_s[0] + kh * p.k_s[2], p.k_s[1], c0, t1);
    lin_load<LIN_C, LIN_V>(sV, p.v + b * p.v_s[0] + kh * p.v_s[2], p.v_s[1], c0, t1);
    lin_load<LIN_C, LIN_V>(sdO, p.dout + b * p.do_s[0] + h * p.do_s[2], p.do_s[1], c0, t1);
    lin_load_g(sg, p, b, h, c0, t1);
    la_cp_commit();
    lin_load<LIN_K, LIN_V>(sS, p.chunk_f + st, LIN_V, 0, LIN_K);
    la_cp_commit();
    la_cp_wait<1>();
    __syncthreads();
    if (warp == 0) lin_chunk_b(sb, sg, p, h, L, lane);
    __syncthreads();
    {   // P = scale (Q K^T) o D and dP = (dO V^T) o D (D with the scale: lin_mask_store)
        float a[1][4][4];
        lin_zero(a);
        lin_mma_nt<LIN_K, LIN_K, 1, 4, LIN_K / 16>(a, sQ, 16 * wr, sK, 32 * wc, lane);
        lin_mask_store(sP, a, sb, 16 * wr, 32 * wc, L, p.scale, lane);
        lin_zero(a);
        lin_mma_nt<LIN_V, LIN_V, 1, 4, LIN_V / 16>(a, sdO, 16 * wr, sV, 32 * wc, lane);
        lin_mask_store(sdP, a, sb, 16 * wr, 32 * wc, L, p.scale, lane);
    }
    la_cp_wait<0>();
    __syncthreads();  // P, dP and S ready

    const int g = lane >> 2;
    float* db = p.db + (i64)b * p.T * p.H + h;
    constexpr int DN = LIN_K / 16, ON = LIN_V / 16;
    const int dn0 = wc * (LIN_K / 2), on0 = wc * (LIN_V / 2);
    // Row factors of this warp's rows 16 wr + g + 8 hf: w_j = exp(b_{L-1} - b_j) (0 past L).
    float wrow[2];
#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
        const int j = 16 * wr + g + 8 * hf;
        wrow[hf] = j < L ? lin_exp(sb[LIN_C - 1] - sb[j]) : 0.f;
    }
    {   // dQ = dP K + scale diag(exp(b)) dO S^T
        float d[1][DN][4], e[1][DN][4];
        lin_zero(d);
        lin_zero(e);
        lin_mma_nn<LIN_C, LIN_K, 1, DN, LIN_C / 16>(d, sdP, 16 * wr, sK, dn0, lane);
        lin_mma_nt<LIN_V, LIN_V, 1, DN, LIN_V / 16>(e, sdO, 16 * wr, sS, dn0, lane);
#pragma unroll
        for (int hf = 0; hf < 2; hf++) {
            const float f = p.scale * lin_exp(sb[16 * wr + g + 8 * hf]);
#pragma unroll
            for (int nt = 0; nt < DN; nt++) {
                d[0][nt][2 * hf] += f * e[0][nt][2 * hf];
                d[0][nt][2 * hf + 1] += f * e[0][nt][2 * hf + 1];
            }
        }
        if (p.want_db) lin_db_add<LIN_K>(d, sQ, db, p.H, c0, 16 * wr, dn0, L, 1.f, lane);
        lin_put_grad(d, p.dq + b * p.dq_s[0] + h * p.dq_s[2], p.dq_s[1], nullptr, 0, c0, 16 * wr, dn0, L,
                     lane);
    }
    __syncthreads();  // every warp is done with S
    lin_load<LIN_K, LIN_V>(sS, p.chunk_r + st, LIN_V, 0, LIN_K);
    la_cp_commit();
    {   // dV = P^T dO + diag(w) K H (P^T dO while H lands)
        float d[1][ON][4], e[1][ON][4];
        lin_zero(d);
        lin_zero(e);
        lin_mma_tn<LIN_C, LIN_V, 1, ON, LIN_C / 16>(d, sP, 16 * wr, sdO, on0, lane);
        la_cp_wait<0>();
        __syncthreads();  // H ready
        lin_mma_nn<LIN_K, LIN_V, 1, ON, LIN_K / 16>(e, sK, 16 * wr, sS, on0, lane);
#pragma unroll
        for (int hf = 0; hf < 2; hf++)
#pragma unroll
            for (int nt = 0; nt < ON; nt++) {
                d[0][nt][2 * hf] += wrow[hf] * e[0][nt][2 * hf];
                d[0][nt][2 * hf + 1] += wrow[hf] * e[0][nt][2 * hf + 1];
            }
        lin_put_kv<false>(d, p, b, kh, c0, 16 * wr, on0, L, lane);
    }
    {   // dK = dP^T Q + diag(w) V H^T
        float d[1][DN][4], e[1][DN][4];
        lin_zero(d);
        lin_zero(e);
        lin_mma_tn<LIN_C, LIN_K, 1, DN, LIN_C / 16>(d, sdP, 16 * wr, sQ, dn0, lane);
        lin_mma_nt<LIN_V, LIN_V, 1, DN, LIN_V / 16>(e, sV, 16 * wr, sS, dn0, lane);
#pragma unroll
        for (int hf = 0; hf < 2; hf++)
#pragma unroll
            for (int nt = 0; nt < DN; nt++) {
                d[0][nt][2 * hf] += wrow[hf] * e[0][nt][2 * hf];
                d[0][nt][2 * hf + 1] += wrow[hf] * e[0][nt][2 * hf + 1];
            }
        if (p.want_db) lin_db_add<LIN_K>(d, sK, db, p.H, c0, 16 * wr, dn0, L, -1.f, lane);
        lin_put_kv<true>(d, p, b, kh, c0, 16 * wr, dn0, L, lane);
    }
}

#else
// The chunk-parallel gradients under per-key-dimension gates (linear_common.cuh "Per-key-
// dimension gates"; B the chunk's cumulative gates, Qt = Q o exp(B), Kt = K o exp(-B),
// Kh = K o exp(B_{L-1} - B), dA = scale mask(dO V^T), S entering and H leaving the chunk):
//   dQ = exp(B) o (dA Kt + scale dO S^T)                    fast form
//      = [sum_j dA_ij k_j o exp(B_i - B_j)] + scale exp(B) o (dO S^T)       exact form
//   dV = P^T dO + Kh H
//   dK = exp(-B) o (dA^T Qt) + exp(B_{L-1} - B) o (V H^T)     fast form
//      = [sum_i dA_ij q_i o exp(B_i - B_j)] + exp(B_{L-1} - B) o (V H^T)    exact form
//   db = q o dq - k o dk per key dim, turned into dg inside the chunk (suffix sums over its rows,
//        through shared memory: dg [B, T, H, K] written in whole rows) and the chunk's total into
//        dg_tot; lin_gla_dg_carry / lin_gla_dg_add then add the later chunks' totals and the
//        final state's term (dg_t = sum_{u >= t} db_u within the sequence)
// with P from the fast or exact form as in the forward; the fast form when lin_gate_keys finds
// every Kt < LIN_GLA_BIG and every chunk total >= -LIN_GLA_SPAN (exp(-B) <= e^60 in f32).
// Shared memory: Q, K, Qt, Kt (Kh after dQ) [64][K], V, dO [64][V], the state [K][V] (S, then
// H), P and dA [64][64], the gates [64][K] f32, 64 zeros (the mask's b): 176.3 KiB at
// K = V = 128, one block an SM.
extern "C" __global__ void __launch_bounds__(LIN_THREADS, 1) lin_bwd_chunk(const LinParams p) {
    extern __shared__ __align__(128) u16 lin_smem[];
    u16* sQ = lin_smem;
    u16* sK = sQ + LIN_C * LIN_K;
    u16* sQt = sK + LIN_C * LIN_K;
    u16* sKt = sQt + LIN_C * LIN_K;
    u16* sV = sKt + LIN_C * LIN_K;
    u16* sdO = sV + LIN_C * LIN_V;
    u16* sS = sdO + LIN_C * LIN_V;
    u16* sP = sS + LIN_K * LIN_V;
    u16* sdP = sP + LIN_C * LIN_C;
    float* sG = (float*)(sdP + LIN_C * LIN_C);
    float* sz = sG + LIN_GT;

    const i64 id = blockIdx.x;
    const int h = blockIdx.y;
    int n, b, t0, t1, c0;
    if (!lin_chunk_of(p, id, n, b, t0, t1, c0)) return;
    const int kh = h / (p.H / p.Hk);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int wr = warp & 3, wc = warp >> 2;
    const int L = la_imin(LIN_C, t1 - c0);
    const i64 st = (id * p.H + h) * LIN_K * LIN_V;

    lin_load<LIN_C, LIN_K>(sQ, p.q + b * p.q_s[0] + h * p.q_s[2], p.q_s[1], c0, t1);
    lin_load<LIN_C, LIN_K>(sK, p.k + b * p.k_s[0] + kh * p.k_s[2], p.k_s[1], c0, t1);
    lin_load<LIN_C, LIN_V>(sV, p.v + b * p.v_s[0] + kh * p.v_s[2], p.v_s[1], c0, t1);
    lin_load<LIN_C, LIN_V>(sdO, p.dout + b * p.do_s[0] + h * p.do_s[2], p.do_s[1], c0, t1);
    lin_load_gate(sG, p, b, h, c0, t1);
    la_cp_commit();
    lin_load<LIN_K, LIN_V>(sS, p.chunk_f + st, LIN_V, 0, LIN_K);
    la_cp_commit();
    la_cp_wait<1>();
    if (threadIdx.x < LIN_C) sz[threadIdx.x] = 0.f;
    __syncthreads();
    lin_gate_cumsum(sG);
    const bool exact = lin_gate_keys(sKt, sK, sG);
    lin_gate_mul<false>(sQt, sQ, sG, 1.f);
    if (exact) lin_gate_exact(sP, sQ, sK, sG, L, p.scale);
    __syncthreads();  // Qt (and the exact P)
    {   // P (fast form) and dA = scale mask(dO V^T)
        float a[1][4][4];
        if (!exact) {
            lin_zero(a);
            lin_mma_nt<LIN_K, LIN_K, 1, 4, LIN_K / 16>(a, sQt, 16 * wr, sKt, 32 * wc, lane);
            lin_mask_store(sP, a, sz, 16 * wr, 32 * wc, L, p.scale, lane);
        }
        lin_zero(a);
        lin_mma_nt<LIN_V, LIN_V, 1, 4, LIN_V / 16>(a, sdO, 16 * wr, sV, 32 * wc, lane);
        lin_mask_store(sdP, a, sz, 16 * wr, 32 * wc, L, p.scale, lane);
    }
    la_cp_wait<0>();
    __syncthreads();  // P, dA and S ready

    const int g = lane >> 2, t4 = lane & 3;
    constexpr int DN = LIN_K / 16, ON = LIN_V / 16;
    float dbv[DN][4];  // q o dq, then - k o dk, of this thread's fragment
    const int dn0 = wc * (LIN_K / 2), on0 = wc * (LIN_V / 2);
    {   // dQ
        float d[1][DN][4], e[1][DN][4];
        lin_zero(d);
        lin_zero(e);
        if (exact) lin_gate_exact_frag<false>(d, sdP, sK, sG, 16 * wr, dn0, L, lane);
        else lin_mma_nn<LIN_C, LIN_K, 1, DN, LIN_C / 16>(d, sdP, 16 * wr, sKt, dn0, lane);
        lin_mma_nt<LIN_V, LIN_V, 1, DN, LIN_V / 16>(e, sdO, 16 * wr, sS, dn0, lane);
#pragma unroll
        for (int hf = 0; hf < 2; hf++) {
            const int i = 16 * wr + g + 8 * hf;
#pragma unroll
            for (int nt = 0; nt < DN; nt++)
#pragma unroll
                for (int x = 0; x < 2; x++) {
                    const int col = dn0 + 8 * nt + 2 * t4 + x;
                    const float f = lin_exp(sG[i * LIN_K + col]);
                    float& v = d[0][nt][2 * hf + x];
                    v = (exact ? v : f * v) + p.scale * f * e[0][nt][2 * hf + x];
                    dbv[nt][2 * hf + x] = i < L ? lin_el<LIN_K>(sQ, i, col) * v : 0.f;
                }
        }
        lin_put_grad(d, p.dq + b * p.dq_s[0] + h * p.dq_s[2], p.dq_s[1], nullptr, 0, c0, 16 * wr, dn0, L,
                     lane);
    }
    __syncthreads();  // every warp is done with S and Kt
    lin_load<LIN_K, LIN_V>(sS, p.chunk_r + st, LIN_V, 0, LIN_K);
    la_cp_commit();
    lin_gate_mul<true>(sKt, sK, sG, 1.f);  // Kh
    la_cp_wait<0>();
    __syncthreads();  // H and Kh ready
    {   // dV = P^T dO + Kh H
        float d[1][ON][4];
        lin_zero(d);
        lin_mma_tn<LIN_C, LIN_V, 1, ON, LIN_C / 16>(d, sP, 16 * wr, sdO, on0, lane);
        lin_mma_nn<LIN_K, LIN_V, 1, ON, LIN_K / 16>(d, sKt, 16 * wr, sS, on0, lane);
        lin_put_kv<false>(d, p, b, kh, c0, 16 * wr, on0, L, lane);
    }
    {   // dK
        float d[1][DN][4], e[1][DN][4];
        lin_zero(d);
        lin_zero(e);
        if (exact) lin_gate_exact_frag<true>(d, sdP, sQ, sG, 16 * wr, dn0, L, lane);
        else lin_mma_tn<LIN_C, LIN_K, 1, DN, LIN_C / 16>(d, sdP, 16 * wr, sQt, dn0, lane);
        lin_mma_nt<LIN_V, LIN_V, 1, DN, LIN_V / 16>(e, sV, 16 * wr, sS, dn0, lane);
        const float* bl = sG + (LIN_C - 1) * LIN_K;
#pragma unroll
        for (int hf = 0; hf < 2; hf++) {
            const int j = 16 * wr + g + 8 * hf;
#pragma unroll
            for (int nt = 0; nt < DN; nt++)
#pragma unroll
                for (int x = 0; x < 2; x++) {
                    const int col = dn0 + 8 * nt + 2 * t4 + x;
                    const float bj = sG[j * LIN_K + col];
                    float& v = d[0][nt][2 * hf + x];
                    v = (exact ? v : lin_exp(-bj) * v) + lin_exp(bl[col] - bj) * e[0][nt][2 * hf + x];
                    if (j < L) dbv[nt][2 * hf + x] -= lin_el<LIN_K>(sK, j, col) * v;
                }
        }
        lin_put_kv<true>(d, p, b, kh, c0, 16 * wr, dn0, L, lane);
    }
    // dg inside the chunk: db [64][K] f32 over the gates' tile, suffix sums down each column.
    __syncthreads();  // every warp is done with the gates
#pragma unroll
    for (int hf = 0; hf < 2; hf++)
#pragma unroll
        for (int nt = 0; nt < DN; nt++)
            *(lin_f2*)(sG + (16 * wr + g + 8 * hf) * LIN_K + dn0 + 8 * nt + 2 * t4) =
                lin_f2{dbv[nt][2 * hf], dbv[nt][2 * hf + 1]};
    __syncthreads();
    {
        constexpr int PARTS = LIN_THREADS / LIN_K, RP = LIN_C / PARTS;
        const int k = threadIdx.x % LIN_K, part = threadIdx.x / LIN_K;
        float sum = 0.f;
#pragma unroll
        for (int r = part * RP + RP - 1; r >= part * RP; r--) {
            sum += sG[r * LIN_K + k];
            sG[r * LIN_K + k] = sum;
        }
        __syncthreads();
        float off = 0.f;
        for (int u = part + 1; u < PARTS; u++) off += sG[u * RP * LIN_K + k];
        __syncthreads();  // every run's total read before any is shifted
        float* dg = p.dg + (((i64)b * p.T + c0) * p.H + h) * LIN_K + k;
#pragma unroll
        for (int r = part * RP; r < part * RP + RP; r++)
            if (r < L) dg[(i64)r * p.H * LIN_K] = sG[r * LIN_K + k] + off;
        if (part == 0) p.dg_tot[(id * p.H + h) * LIN_K + k] = sG[k] + off;
    }
}

// dg carries (gate): thread k of block (h, n) walks sequence n's chunks from the last, turning
// each chunk total in dg_tot into the sum of all later totals plus the final state's term
// (db [seqs, H, K], left there by the forward _mat walk):
//   carry_last = F,   carry_{c-1} = carry_c + total_c.
extern "C" __global__ void lin_gla_dg_carry(const LinParams p) {
    const int k = threadIdx.x, h = blockIdx.x, n = blockIdx.y;
    if (k >= LIN_K) return;
    int b, t0, t1;
    lin_seq(p, n, b, t0, t1);
    const int nc = (t1 - t0 + LIN_C - 1) / LIN_C;
    float carry = p.db[((i64)n * p.H + h) * LIN_K + k];
    constexpr int NB = 8;  // loads of a batch before its stores
    for (int i0 = 0; i0 < nc; i0 += NB) {
        float tot[NB];
        i64 at[NB];
#pragma unroll
        for (int u = 0; u < NB; u++) {
            const int c = nc - 1 - (i0 + u);
            at[u] = c >= 0 ? (lin_chunk_id(p, n, b, t0 + c * LIN_C) * p.H + h) * LIN_K + k : -1;
            tot[u] = at[u] >= 0 ? p.dg_tot[at[u]] : 0.f;
        }
#pragma unroll
        for (int u = 0; u < NB; u++) {
            if (at[u] < 0) break;
            p.dg_tot[at[u]] = carry;
            carry += tot[u];
        }
    }
}

// dg_t += carry of t's chunk: block (chunk id, h), rows of the chunk in whole rows of K.
extern "C" __global__ void lin_gla_dg_add(const LinParams p) {
    const i64 id = blockIdx.x;
    const int h = blockIdx.y;
    int n, b, t0, t1, c0;
    if (!lin_chunk_of(p, id, n, b, t0, t1, c0)) return;
    const int L = la_imin(LIN_C, t1 - c0);
    const float* carry = p.dg_tot + (id * p.H + h) * LIN_K;
    float* dg = p.dg + (((i64)b * p.T + c0) * p.H + h) * LIN_K;
    for (int x = threadIdx.x; x < L * LIN_K; x += blockDim.x) {
        const int r = x / LIN_K, k = x % LIN_K;
        dg[(i64)r * p.H * LIN_K + k] += carry[k];
    }
}
#endif

// dg_t = sum_{u >= t} db_u within each sequence, per head: block (h, n) of LIN_DG_THREADS
// threads, each a contiguous run of tokens (run sums, a block suffix scan of them, then each run
// backwards). dg and db are [B, T, H] f32.
#define LIN_DG_THREADS 1024
extern "C" __global__ void __launch_bounds__(LIN_DG_THREADS) lin_bwd_dg(const LinParams p, float* dg) {
    __shared__ float part[LIN_DG_THREADS];
    const int h = blockIdx.x, n = blockIdx.y, t = threadIdx.x;
    int b, t0, t1;
    lin_seq(p, n, b, t0, t1);
    const int len = t1 - t0;
    const int run = (len + LIN_DG_THREADS - 1) / LIN_DG_THREADS;
    const int r0 = t0 + la_imin(t * run, len), r1 = t0 + la_imin((t + 1) * run, len);
    const float* db = p.db + (i64)b * p.T * p.H + h;
    float* out = dg + (i64)b * p.T * p.H + h;
    float s = 0.f;
#pragma unroll 4
    for (int u = r0; u < r1; u++) s += db[(i64)u * p.H];
    part[t] = s;
    __syncthreads();
    // Inclusive suffix scan (Hillis-Steele): part[t] = sum_{u >= t} run sums.
    for (int d = 1; d < LIN_DG_THREADS; d <<= 1) {
        const float y = t + d < LIN_DG_THREADS ? part[t + d] : 0.f;
        __syncthreads();
        part[t] += y;
        __syncthreads();
    }
    float acc = t + 1 < LIN_DG_THREADS ? part[t + 1] : 0.f;
    for (int u = r1 - 1; u >= r0; u--) {
        acc += db[(i64)u * p.H];
        out[(i64)u * p.H] = acc;
    }
}

// y = x in the storage type (n even), for the GQA sums of dK / dV.
extern "C" __global__ void lin_f32_to_el(const float* x, u16* y, i64 n) {
    for (i64 i = 2 * ((i64)blockIdx.x * blockDim.x + threadIdx.x); i < n; i += 2 * (i64)gridDim.x * blockDim.x)
        *(u32*)(y + i) = la_pack2(x[i], x[i + 1]);
}
