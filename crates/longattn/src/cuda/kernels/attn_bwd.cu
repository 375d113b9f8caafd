// Attention backward on the tensor cores (mma.sync m16n8k16), atomic-free and deterministic.
//
// The math and la_bwd_prep (Delta and LSE in log2 units per row; a row with no allowed key gets
// +inf, so every P of it is 2^(-inf) = 0) are in bwd_common.cuh. Two kernels here:
//   la_bwd_dq   : block (head, batch, 64-row query tile) walks its schedule row (as the forward)
//                 and accumulates dQ of its rows in registers;
//   la_bwd_dkdv : block (KV head, batch, 64-key tile) walks its schedule column for every query
//                 head of the group (GQA: dK, dV summed over the group) and accumulates dK, dV.
// Each output element is written once by one thread after a fixed-order sum: bit-identical run
// to run. Compile-time constants: LA_F16, LA_D (a multiple of 16, <= 256), LA_SOFTCAP, la_mask.
//
// Above D 128 the accumulators (16 x D per warp and gradient) would not fit the registers: a block
// then owns the output columns [c0, min(c0 + LA_DO, D)) of its tile (LA_NH = 2 blocks per tile,
// blockIdx.z = batch * LA_NH + half; LA_DO = D / 2 rounded up to 16) and recomputes S and dP over
// the full D, and K/V (Q/dO) are single-buffered so the tiles fit 128 KiB of shared memory.

// LA_CHUNKS, la_sw, la_load_tile: mma_tile.cuh (prepended by the host).
#define LA_T 64          // query rows and keys per tile (4 warps x 16)
#define LA_THREADS 128
#define LA_DO (LA_D > 128 ? (LA_D / 2 + 15) / 16 * 16 : LA_D)  // gradient columns per block
#define LA_NH (LA_D > 128 ? 2 : 1)                            // blocks per tile
#define LA_NST (LA_D > 128 ? 1 : 2)      // stages of the streamed tiles

// Rows row0 .. row0 + 64 of a [seq][D] slab into a swizzled tile.
__device__ __forceinline__ void la_load64(u16* s, const u16* g, i64 ss, int row0, int limit) {
    la_load_tile<LA_T, LA_THREADS>(s, g, ss, row0, limit);
}
// Acc[16 x 64] (+)= A[16 x D] (rows of sA at a0, ldmatrix) x B^T where B is [64][D] in sB:
// the "Q K^T" shape. Acc is the mma C layout, 8 n-blocks.
__device__ __forceinline__ void la_mm_abt(float (*acc)[4], const u16* sA, int a0, const u16* sB, int lane) {
#pragma unroll
    for (int kk = 0; kk < LA_D / 16; kk++) {
        u32 a[4];
        la_ldmatrix_x4(a, sA + la_sw(a0 + (lane & 15), kk * 2 + (lane >> 4)));
#pragma unroll
        for (int np = 0; np < LA_T / 16; np++) {
            u32 b[4];
            la_ldmatrix_x4(b, sB + la_sw(np * 16 + (lane & 7) + ((lane >> 4) << 3), kk * 2 + ((lane >> 3) & 1)));
            la_mma16816(acc[2 * np], a, b);
            la_mma16816(acc[2 * np + 1], a, b + 2);
        }
    }
}
// Acc[16 x LA_DO] += A[16 x 64] (registers, bf16/f16 A fragments) x B[:, c0 .. c0 + LA_DO) where
// B is [64][D] in sB: the "P V" shape.
__device__ __forceinline__ void la_mm_ab(float (*acc)[4], const u32 (*a)[4], const u16* sB, int c0, int lane) {
#pragma unroll
    for (int ks = 0; ks < LA_T / 16; ks++) {
#pragma unroll
        for (int dp = 0; dp < LA_DO / 16; dp++) {
            if (LA_NH > 1 && c0 + dp * 16 >= LA_D) continue;  // the second half may be narrower
            u32 b[4];
            la_ldmatrix_x4_trans(
                b, sB + la_sw(ks * 16 + (lane & 7) + (((lane >> 3) & 1) << 3), (c0 >> 3) + dp * 2 + (lane >> 4)));
            la_mma16816(acc[2 * dp], a[ks], b);
            la_mma16816(acc[2 * dp + 1], a[ks], b + 2);
        }
    }
}
// C fragments of n-blocks 2k, 2k+1 -> A fragment k (rounded to the storage type).
__device__ __forceinline__ void la_c_to_a(const float (*c)[4], u32 (*a)[4]) {
#pragma unroll
    for (int nt = 0; nt < LA_T / 8; nt++) {
        a[nt >> 1][(nt & 1) * 2 + 0] = la_pack2(c[nt][0], c[nt][1]);
        a[nt >> 1][(nt & 1) * 2 + 1] = la_pack2(c[nt][2], c[nt][3]);
    }
}

extern "C" __global__ void __launch_bounds__(LA_THREADS) la_bwd_dq(const LaBwdParams p) {
    extern __shared__ __align__(128) u16 la_smem[];
    u16* sQ = la_smem;
    u16* sdO = sQ + LA_T * LA_D;
    u16* sK = sdO + LA_T * LA_D;     // LA_NST stages of K and V
    u16* sV = sK + LA_T * LA_D;
    constexpr int STAGE = 2 * LA_T * LA_D;
    // Query tiles fastest (the blocks running together share K/V in L2), the last (under a causal
    // mask the longest row) first.
    const int qt = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z / LA_NH;
    const int c0 = (blockIdx.z % LA_NH) * LA_DO;
    const int kh = h / (p.Hq / p.Hk);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
    const int q0 = qt * LA_T;
    const int srow = ((b % p.sched_batch) * p.sched_heads + (h % p.sched_heads)) * p.q_tiles + qt;
    const u32 e0 = p.row_off[srow], e1 = p.row_off[srow + 1];
    const i64 qoff = b * p.q_sb + h * p.q_sh, koff = b * p.k_sb + kh * p.k_sh;

    la_load64(sQ, p.q + qoff, p.q_ss, q0, p.Sq);
    la_load64(sdO, p.dout + qoff, p.q_ss, q0, p.Sq);
#pragma unroll
    for (int st = 0; st < LA_NST; st++) {
        if (e0 + st < e1) {
            const int k0 = (int)(p.row_ent[e0 + st] >> 1) * LA_T;
            la_load64(sK + st * STAGE, p.k + koff, p.k_ss, k0, p.Sk);
            la_load64(sV + st * STAGE, p.v + koff, p.k_ss, k0, p.Sk);
        }
        la_cp_commit();
    }
    const int r0 = q0 + warp * 16 + g;
    const i64 lrow = ((i64)b * p.Hq + h) * p.lstride;
    const float L0 = r0 < p.Sq ? p.lse2[lrow + r0] : LA_INF, L1 = r0 + 8 < p.Sq ? p.lse2[lrow + r0 + 8] : LA_INF;
    const float D0 = r0 < p.Sq ? p.delta[lrow + r0] : 0.f, D1 = r0 + 8 < p.Sq ? p.delta[lrow + r0 + 8] : 0.f;
    float dq[LA_DO / 8][4];
#pragma unroll
    for (int i = 0; i < LA_DO / 8; i++) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;

    for (u32 e = e0; e < e1; e++) {
        const u32 ent = p.row_ent[e];
        const bool partial = ent & 1;
        const int k0 = (int)(ent >> 1) * LA_T;
        const u16* cK = sK + ((e - e0) % LA_NST) * STAGE;
        const u16* cV = sV + ((e - e0) % LA_NST) * STAGE;
        la_cp_wait<LA_NST - 1>();
        __syncthreads();
        float s[LA_T / 8][4], dp[LA_T / 8][4];
#pragma unroll
        for (int i = 0; i < LA_T / 8; i++)
#pragma unroll
            for (int r = 0; r < 4; r++) s[i][r] = dp[i][r] = 0.f;
        la_mm_abt(s, sQ, warp * 16, cK, lane);     // S = Q K^T
        la_mm_abt(dp, sdO, warp * 16, cV, lane);   // dP = dO V^T
        const bool edge = k0 + LA_T > p.Sk;
#pragma unroll
        for (int nt = 0; nt < LA_T / 8; nt++) {
#pragma unroll
            for (int e2 = 0; e2 < 4; e2++) {
                float dcap;
                float y = la_logit(p, s[nt][e2], dcap);
                const int j = k0 + nt * 8 + 2 * t4 + (e2 & 1);
                const int i = r0 + ((e2 >> 1) << 3);
                if (partial || edge) {
                    bool ok = i < p.Sq && j < p.Sk;  // rows past Sq: never written, and the mask program may read per-row ids
                    if (partial && ok) ok = la_mask(p, b, h, i, j);
                    if (!ok) y = -LA_INF;
                }
                const float pr = la_exp2(y - ((e2 >> 1) ? L1 : L0));
                s[nt][e2] = pr * (dp[nt][e2] - ((e2 >> 1) ? D1 : D0)) * dcap * p.scale;  // dS
            }
        }
        u32 ds[LA_T / 16][4];
        la_c_to_a(s, ds);
        la_mm_ab(dq, ds, cK, c0, lane);            // dQ[:, c0 ..] += dS K[:, c0 ..]
        __syncthreads();
        if (e + LA_NST < e1) {
            const int k2 = (int)(p.row_ent[e + LA_NST] >> 1) * LA_T;
            la_load64((u16*)cK, p.k + koff, p.k_ss, k2, p.Sk);
            la_load64((u16*)cV, p.v + koff, p.k_ss, k2, p.Sk);
        }
        la_cp_commit();
    }
#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
        const int r = r0 + 8 * hf;
        if (r < p.Sq) {
            u32* dst = (u32*)(p.dq + qoff + (i64)r * p.q_ss + c0);
#pragma unroll
            for (int i = 0; i < LA_DO / 8; i++)
                if (LA_NH == 1 || c0 + i * 8 < LA_D) dst[i * 4 + t4] = la_pack2(dq[i][2 * hf], dq[i][2 * hf + 1]);
        }
    }
}

extern "C" __global__ void __launch_bounds__(LA_THREADS) la_bwd_dkdv(const LaBwdParams p) {
    extern __shared__ __align__(128) u16 la_smem[];
    u16* sK = la_smem;
    u16* sV = sK + LA_T * LA_D;
    u16* sQ = sV + LA_T * LA_D;      // LA_NST stages of Q and dO
    u16* sdO = sQ + LA_T * LA_D;
    constexpr int STAGE = 2 * LA_T * LA_D;
    __shared__ float sL[LA_NST][LA_T], sD[LA_NST][LA_T];
    // Key tiles fastest (the blocks running together share Q/dO in L2), the first (under a causal
    // mask the longest column) first.
    const int kt = blockIdx.x, kh = blockIdx.y, b = blockIdx.z / LA_NH;
    const int c0 = (blockIdx.z % LA_NH) * LA_DO;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
    const int k0 = kt * LA_T;
    const i64 koff = b * p.k_sb + kh * p.k_sh;
    la_load64(sK, p.k + koff, p.k_ss, k0, p.Sk);
    la_load64(sV, p.v + koff, p.k_ss, k0, p.Sk);
    la_cp_commit();

    // The (query head, schedule column entry) pairs of this block: bwd_common.cuh.
    const int n_items = la_bwd_items(p, b, kh, kt);
    auto item = [&](int t, int& h, u32& ent) {
        u32 ci;
        la_bwd_item(p, b, kh, kt, t, h, ent, ci);
    };
    auto load_item = [&](int t, int st) {
        int h;
        u32 ent;
        item(t, h, ent);
        const int q0 = (int)(ent >> 1) * LA_T;
        const i64 qoff = b * p.q_sb + h * p.q_sh;
        la_load64(sQ + st * STAGE, p.q + qoff, p.q_ss, q0, p.Sq);
        la_load64(sdO + st * STAGE, p.dout + qoff, p.q_ss, q0, p.Sq);
        for (int x = threadIdx.x; x < LA_T; x += LA_THREADS) {
            const int i = q0 + x;
            const i64 r = ((i64)b * p.Hq + h) * p.lstride + i;
            sL[st][x] = i < p.Sq ? p.lse2[r] : LA_INF;
            sD[st][x] = i < p.Sq ? p.delta[r] : 0.f;
        }
    };
#pragma unroll
    for (int st = 0; st < LA_NST; st++) {
        if (st < n_items) load_item(st, st);
        la_cp_commit();
    }
    float dk[LA_DO / 8][4], dv[LA_DO / 8][4];
#pragma unroll
    for (int i = 0; i < LA_DO / 8; i++)
#pragma unroll
        for (int r = 0; r < 4; r++) dk[i][r] = dv[i][r] = 0.f;
    const int j0 = k0 + warp * 16 + g;  // this thread's keys: j0, j0 + 8

    for (int t = 0; t < n_items; t++) {
        const int st = t % LA_NST;
        int h;
        u32 ent;
        item(t, h, ent);
        const bool partial = ent & 1;
        const int q0 = (int)(ent >> 1) * LA_T;
        const u16* cQ = sQ + st * STAGE;
        const u16* cdO = sdO + st * STAGE;
        la_cp_wait<LA_NST - 1>();
        __syncthreads();
        float s[LA_T / 8][4], dp[LA_T / 8][4];
#pragma unroll
        for (int i = 0; i < LA_T / 8; i++)
#pragma unroll
            for (int r = 0; r < 4; r++) s[i][r] = dp[i][r] = 0.f;
        la_mm_abt(s, sK, warp * 16, cQ, lane);    // S^T = K Q^T
        la_mm_abt(dp, sV, warp * 16, cdO, lane);  // dP^T = V dO^T
        const bool edge = q0 + LA_T > p.Sq || k0 + LA_T > p.Sk;
        u32 pa[LA_T / 16][4];
#pragma unroll
        for (int nt = 0; nt < LA_T / 8; nt++) {
#pragma unroll
            for (int e2 = 0; e2 < 4; e2++) {
                float dcap;
                float y = la_logit(p, s[nt][e2], dcap);
                const int ic = nt * 8 + 2 * t4 + (e2 & 1);  // query column within the tile
                const int i = q0 + ic;
                const int j = j0 + ((e2 >> 1) << 3);
                if (partial || edge) {
                    bool ok = i < p.Sq && j < p.Sk;
                    if (partial && ok) ok = la_mask(p, b, h, i, j);
                    if (!ok) y = -LA_INF;
                }
                const float pr = la_exp2(y - sL[st][ic]);
                dp[nt][e2] = pr * (dp[nt][e2] - sD[st][ic]) * dcap * p.scale;  // dS^T
                s[nt][e2] = pr;                                                  // P^T
            }
        }
        la_c_to_a(s, pa);
        la_mm_ab(dv, pa, cdO, c0, lane);   // dV[:, c0 ..] += P^T dO[:, c0 ..]
        la_c_to_a(dp, pa);
        la_mm_ab(dk, pa, cQ, c0, lane);    // dK[:, c0 ..] += dS^T Q[:, c0 ..]
        __syncthreads();
        if (t + LA_NST < n_items) load_item(t + LA_NST, st);
        la_cp_commit();
    }
#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
        const int j = j0 + 8 * hf;
        if (j < p.Sk) {
            u32* dstk = (u32*)(p.dk + koff + (i64)j * p.k_ss + c0);
            u32* dstv = (u32*)(p.dv + koff + (i64)j * p.k_ss + c0);
#pragma unroll
            for (int i = 0; i < LA_DO / 8; i++) {
                if (LA_NH > 1 && c0 + i * 8 >= LA_D) continue;
                dstk[i * 4 + t4] = la_pack2(dk[i][2 * hf], dk[i][2 * hf + 1]);
                dstv[i * 4 + t4] = la_pack2(dv[i][2 * hf], dv[i][2 * hf + 1]);
            }
        }
    }
}
