// Linear attention forward, chunked, on the tensor cores (mma.sync m16n8k16, f32 accumulation).
// Shared pieces and the parameter struct: linear_common.cuh (prepended by the host).
//
// Per sequence and query head h (kv head h / (H / Hk)), per chunk of C = 64 tokens with state
// S (K x V, f32) entering it, valid rows L, b the within-chunk cumulative log decay:
//   P   = scale * (Q K^T) o D,          D_ij = exp(b_i - b_j) for j <= i < L, else 0
//   O   = P V + scale * diag(exp(b)) Q S
//   S' = exp(b_{L-1}) S + (K o w)^T V,  w_j = exp(b_{L-1} - b_j) for j < L, else 0
// (o: elementwise, rows of K scaled by w).
//
// Work: block (V slice vs, head h, segment z) of 8 warps owns the state columns vs * BV .. + BV
// for its segment of a sequence (S slice K x BV in registers, f32; the whole sequence when it is
// not segmented, else starting from S_j of linear_seg.cu) and walks its chunks in order; every
// slice recomputes Q K^T (cheap next to the loads; no cross-block traffic, no states in global
// memory). Per chunk and block: 64 x 64 x K (Q K^T) + 64 x BV x 64 (P V) + 64 x BV x K (Q S) +
// K x BV x 64 (state) multiply-adds on the tensor cores.
// LIN_NW = 8 or 16 warps: P (64 x 64) and O (64 x BV) in blocks of 16 rows (w % 4) x a quarter
// of the columns (w / 4, LIN_NW / 4 column blocks); the state (K x BV) in blocks of 16 rows x
// BV / LIN_SWC columns (LIN_SWR blocks of rows). 16 warps with BV = V = 128 compute Q K^T and
// the decay mask once per chunk and head (one block a head, one a SM: 137 KiB of shared memory).
// Shared memory: two stages of Q [64][K], K [64][K], V [64][BV] and the chunk's decays (chunk
// c + 1 lands while chunk c is computed), P [64][64], S as the storage type [K][BV], b [64],
// w [64] (applied to K's fragments in registers: lin_mma_tn). Three block barriers per chunk.
//
// LIN_GLA (the per-key-dimension gate, linear_common.cuh "Per-key-dimension gates"; 16 warps,
// BV = V): two more stages of the chunk's gates [64][K] f32 (turned into B in place) and a
// [64][K] tile of K o exp(-B); per chunk Q -> Q o exp(B) and K -> K o exp(B_{L-1} - B) in place,
// P from the fast or the exact form, the output's row factor scale alone and the state's rows
// scaled by exp(B_{L-1}[k]).

#define LIN_STAGE_U16 (2 * LIN_C * LIN_K + LIN_C * LIN_BV)
#define LIN_FCB (LIN_NW / 4)           // column blocks of P and O
#define LIN_PN (LIN_C / LIN_FCB)       // P columns a warp
#define LIN_ON (LIN_BV / LIN_FCB)      // O columns a warp
static_assert(LIN_NW == 8 || LIN_NW == 16, "8 or 16 warps");
static_assert(LIN_ON % 16 == 0, "O columns a warp: a multiple of 16");

extern "C" __global__ void __launch_bounds__(LIN_THREADS, LIN_NW == 8 ? 2 : 1) lin_fwd(const LinParams p) {
    extern __shared__ __align__(128) u16 lin_smem[];
    u16* sP = lin_smem + 2 * LIN_STAGE_U16;
    u16* sS = sP + LIN_C * LIN_C;
    float* sg = (float*)(sS + LIN_K * LIN_BV);  // two stages of 64 decays
    float* sb = sg + 2 * LIN_C;
    float* sw = sb + LIN_C;  // w_j = exp(b_{L-1} - b_j) (j < L), the rows of K in the update
#if LIN_GLA
    float* sGate = sw + LIN_C;                // two stages of gates [64][K]
    u16* sKt = (u16*)(sGate + 2 * LIN_GT);    // K o exp(-B) [64][K]
#endif

    const int vs = blockIdx.x, h = blockIdx.y, z = blockIdx.z;
    const LinSeg seg = lin_segment(p, z);
    if (!seg.run) return;
    const int kh = h / (p.H / p.Hk);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int wr = warp & 3, wc = warp >> 2;  // P / O: rows 16 wr, column block wc
    const int v0 = vs * LIN_BV;
    // This block's tokens [t0, t1): the segment (chunks aligned with the sequence's).
    const int b = seg.b, t0 = seg.a, t1 = seg.e;
    const int nc = (t1 - t0 + LIN_C - 1) / LIN_C;

    const u16* gq = p.q + b * p.q_s[0] + h * p.q_s[2];
    const u16* gk = p.k + b * p.k_s[0] + kh * p.k_s[2];
#if LIN_GLA
    auto load_gate = [&](int st, int r0) { lin_load_gate(sGate + st * LIN_GT, p, b, h, r0, t1); };
#else
    auto load_gate = [&](int, int) {};
#endif
    const u16* gv = p.v + b * p.v_s[0] + kh * p.v_s[2] + v0;

    // Commit groups: one per chunk (empty past the end), so "all but the newest complete"
    // (wait_group 1) at the top of chunk c means chunk c landed.
#pragma unroll
    for (int st = 0; st < 2; st++) {
        if (st < nc) {
            u16* s = lin_smem + st * LIN_STAGE_U16;
            const int r0 = t0 + st * LIN_C;
            lin_load<LIN_C, LIN_K>(s, gq, p.q_s[1], r0, t1);
            lin_load<LIN_C, LIN_K>(s + LIN_C * LIN_K, gk, p.k_s[1], r0, t1);
            lin_load<LIN_C, LIN_BV>(s + 2 * LIN_C * LIN_K, gv, p.v_s[1], r0, t1);
            lin_load_g(sg + st * LIN_C, p, b, h, r0, t1);
            load_gate(st, r0);
        }
        la_cp_commit();
    }

    // State slice: rows sm0 .. sm0 + 15, columns sn0 .. sn0 + BV / LIN_SWC - 1 of the slice.
    const int sm0 = (warp % LIN_SWR) * 16, sn0 = (warp / LIN_SWR) * (LIN_BV / LIN_SWC);
    float st[1][LIN_NTS][4];
    const i64 sbase = ((i64)seg.n * p.H + h) * LIN_K * LIN_V;
    if (p.nseg > 1) lin_state_load(st, p.seg_f + lin_seg_state(p, z, h), LIN_V, sm0, v0 + sn0, lane);
    else if (p.has_s0) lin_state_load(st, p.s0 + sbase, LIN_V, sm0, v0 + sn0, lane);
    else lin_zero(st);

    for (int c = 0; c < nc; c++) {
        const int c0 = t0 + c * LIN_C;
        const int L = la_imin(LIN_C, t1 - c0);
        u16* sQ = lin_smem + (c & 1) * LIN_STAGE_U16;
        u16* sK = sQ + LIN_C * LIN_K;
        const u16* sV = sK + LIN_C * LIN_K;
        la_cp_wait<1>();
        __syncthreads();  // chunk c landed (all threads' copies)
#if LIN_GLA
        float* sG = sGate + (c & 1) * LIN_GT;
        lin_gate_cumsum(sG);
        const bool exact = lin_gate_keys(sKt, sK, sG);
        if (exact) lin_gate_exact(sP, sQ, sK, sG, L, p.scale);
        __syncthreads();  // the exact form read Q and K unscaled
        lin_gate_scale(sQ, sK, sG);
#endif
        if (warp == 0) {
            lin_chunk_b(sb, sg + (c & 1) * LIN_C, p, h, L, lane);
            lin_chunk_w(sw, sb, L, true, 1.f, lane);
        }
        // S -> storage type for Q S (the old state: the update below only touches registers).
        lin_store_tile<LIN_BV>(sS, st, sm0, sn0, lane);
        __syncthreads();  // b ready

#if LIN_GLA
        if (!exact) {  // P = mask(scale (Q o exp(B)) (K o exp(-B))^T)  (b = 0: the mask alone)
            float a[1][LIN_PN / 8][4];
            lin_zero(a);
            lin_mma_nt<LIN_K, LIN_K, 1, LIN_PN / 8, LIN_K / 16>(a, sQ, 16 * wr, sKt, LIN_PN * wc, lane);
            lin_mask_store(sP, a, sb, 16 * wr, LIN_PN * wc, L, p.scale, lane);
        }
#else
        {   // P = scale (Q K^T) o D, rows 16 wr, columns LIN_PN wc
            float a[1][LIN_PN / 8][4];
            lin_zero(a);
            lin_mma_nt<LIN_K, LIN_K, 1, LIN_PN / 8, LIN_K / 16>(a, sQ, 16 * wr, sK, LIN_PN * wc, lane);
            lin_mask_store(sP, a, sb, 16 * wr, LIN_PN * wc, L, p.scale, lane);
        }
#endif
        __syncthreads();  // P, S ready

        {   // O = P V + scale diag(exp(b)) Q S, rows 16 wr, columns LIN_ON wc
            constexpr int ON = LIN_ON / 8;
            const int on0 = wc * LIN_ON;
            float o[1][ON][4], oi[1][ON][4];
            lin_zero(o);
            lin_zero(oi);
            lin_mma_nn<LIN_C, LIN_BV, 1, ON, LIN_C / 16>(o, sP, 16 * wr, sV, on0, lane);
            lin_mma_nn<LIN_K, LIN_BV, 1, ON, LIN_K / 16>(oi, sQ, 16 * wr, sS, on0, lane);
            u16* go = p.o + b * p.o_s[0] + h * p.o_s[2] + v0 + on0;
#pragma unroll
            for (int hf = 0; hf < 2; hf++) {
                const int i = 16 * wr + g + 8 * hf;
                const float f = p.scale * lin_exp(sb[i]);
                if (i < L) {
                    u16* row = go + (i64)(c0 + i) * p.o_s[1];
#pragma unroll
                    for (int nt = 0; nt < ON; nt++)
                        *(u32*)(row + 8 * nt + 2 * t4) =
                            la_pack2(o[0][nt][2 * hf] + f * oi[0][nt][2 * hf],
                                     o[0][nt][2 * hf + 1] + f * oi[0][nt][2 * hf + 1]);
                }
            }
        }
#if LIN_GLA
        // S' = diag(exp(B_{L-1})) S + (K o exp(B_{L-1} - B))^T V  (sK scaled above)
        lin_gate_rows(st, sG, sm0, lane);
        lin_mma_tn<LIN_K, LIN_BV, 1, LIN_NTS, LIN_C / 16>(st, sK, sm0, sV, sn0, lane);
#else
        // S' = exp(b_{L-1}) S + (K o w)^T V
        lin_scale(st, lin_exp(sb[LIN_C - 1]));
        lin_mma_tn<LIN_K, LIN_BV, 1, LIN_NTS, LIN_C / 16>(st, sK, sm0, sV, sn0, lane, sw);
#endif
        __syncthreads();  // every warp is done with this stage, P, S, b and w
        if (c + 2 < nc) {
            u16* s = lin_smem + (c & 1) * LIN_STAGE_U16;
            const int r0 = t0 + (c + 2) * LIN_C;
            lin_load<LIN_C, LIN_K>(s, gq, p.q_s[1], r0, t1);
            lin_load<LIN_C, LIN_K>(s + LIN_C * LIN_K, gk, p.k_s[1], r0, t1);
            lin_load<LIN_C, LIN_BV>(s + 2 * LIN_C * LIN_K, gv, p.v_s[1], r0, t1);
            lin_load_g(sg + (c & 1) * LIN_C, p, b, h, r0, t1);
            load_gate(c & 1, r0);
        }
        la_cp_commit();
    }
    la_cp_wait<0>();
    if (seg.last) lin_state_store(p.sfin + sbase, st, LIN_V, sm0, v0 + sn0, lane);
}
