// Fused attention forward on the tensor cores (mma.sync m16n8k16, any NVIDIA GPU from sm_80).
//
// Compile-time constants (one variant per combination, set by the host in cuda/forward.rs):
//   LA_F16     1 = f16 inputs, 0 = bf16
//   LA_D       head dim (a multiple of 16, <= 256); V has the same head dim
//   LA_BR      query rows per block, LA_BC keys per tile, LA_WARPS warps, LA_MT = LA_BR / (16 LA_WARPS)
//              blocks of 16 rows per warp (2: each K/V fragment read from shared memory feeds two MMAs)
//   LA_QREGS   1 = keep the warp's Q fragments in registers
//   LA_SOFTCAP 1 = s -> c tanh(s / c) before masking
// and the mask program `la_mask(p, b, h, i, j)` generated from the mask expression.
//
// Work: block (query head h, batch b, query tile qt) walks its row of the block schedule
// (CSR: offsets per (b, h, qt), entries = key tile << 1 | partial). Full tiles skip the mask,
// Partial tiles evaluate la_mask per element, unlisted tiles are never loaded. A warp owns 16 LA_MT
// query rows; per key tile it computes S = Q K^T (16 x BC), the online softmax
//     m' = max(m, rowmax(S)),  P = 2^(S - m'),  l' = 2^(m - m') l + rowsum(P),
//     O' = 2^(m - m') O + P V
// (logits pre-multiplied by scale * log2 e), and at the end O / l and LSE = ln2 (m + log2 l).
// A row with no allowed key ends with l = 0: output 0, LSE = -inf.
//
// Shared memory: Q [BR][D] and two stages of K [BC][D] + V [BC][D], rows of 16-byte chunks with
// the chunk index XOR-swizzled by the row so ldmatrix reads of 8 rows hit distinct banks. Tile
// t + 1 is in flight (cp.async) while tile t is computed.

// LaFwdParams: fwd_params.cuh (prepended by the host).

// LA_CHUNKS, la_sw, la_load_tile: mma_tile.cuh (prepended by the host).
#define LA_THREADS (LA_WARPS * 32)

extern "C" __global__ void __launch_bounds__(LA_THREADS, LA_MINB) la_attn_fwd(const LaFwdParams p) {
    extern __shared__ __align__(128) u16 la_smem[];
    u16* sQ = la_smem;
    // Two stages of K and V: tile t computes from stage t & 1 while tile t + 1 lands in the other.
    u16* sK0 = sQ + LA_BR * LA_D;
    u16* sV0 = sK0 + LA_BC * LA_D;
    constexpr int STAGE = 2 * LA_BC * LA_D;

    // Grid (head, batch, query tile), dispatched x fastest: every head's late query tiles (the
    // heaviest under causal-like masks) go first, light ones fill the last wave.
    const int qt = gridDim.z - 1 - blockIdx.z;
    const int h = blockIdx.x, b = blockIdx.y;
    const int kh = h / (p.Hq / p.Hk);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int q0 = qt * LA_BR;
    const int srow = ((b % p.sched_batch) * p.sched_heads + (h % p.sched_heads)) * p.q_tiles + qt;
    const u32 e0 = p.sched_off[srow], e1 = p.sched_off[srow + 1];

    const u16* gq = p.q + b * p.q_sb + h * p.q_sh;
    const u16* gk = p.k + b * p.k_sb + kh * p.k_sh;
    const u16* gv = p.v + b * p.v_sb + kh * p.v_sh;

    // Commit groups: G0 = Q + tile e0, then one group per later tile (empty past the row's end),
    // so before tile t "all but the newest group complete" (wait_group 1) means tile t landed.
    la_load_tile<LA_BR, LA_THREADS>(sQ, gq, p.q_ss, q0, p.Sq);
#pragma unroll
    for (int st = 0; st < 2; st++) {
        if (e0 + st < e1) {
            const int k0 = (int)(p.sched_ent[e0 + st] >> 1) * LA_BC;
            la_load_tile<LA_BC, LA_THREADS>(sK0 + st * STAGE, gk, p.k_ss, k0, p.Sk);
            la_load_tile<LA_BC, LA_THREADS>(sV0 + st * STAGE, gv, p.v_ss, k0, p.Sk);
        }
        la_cp_commit();
    }

    // This warp's rows: LA_MT blocks of 16, rows wrow + 16 mt + g and + 8.
    const int wrow = warp * 16 * LA_MT;
    float o[LA_MT][LA_D / 8][4];
    float m[LA_MT][2], l[LA_MT][2];
#pragma unroll
    for (int mt = 0; mt < LA_MT; mt++) {
#pragma unroll
        for (int i = 0; i < LA_D / 8; i++) o[mt][i][0] = o[mt][i][1] = o[mt][i][2] = o[mt][i][3] = 0.f;
        m[mt][0] = m[mt][1] = -LA_INF;
        l[mt][0] = l[mt][1] = 0.f;
    }

#if LA_QREGS
    u32 qf[LA_MT][LA_D / 16][4];
    la_cp_wait<1>();  // G0: Q (and tile e0)
    __syncthreads();
#pragma unroll
    for (int mt = 0; mt < LA_MT; mt++)
#pragma unroll
        for (int kk = 0; kk < LA_D / 16; kk++)
            la_ldmatrix_x4(qf[mt][kk], sQ + la_sw(wrow + 16 * mt + (lane & 15), kk * 2 + (lane >> 4)));
#endif

    for (u32 e = e0; e < e1; e++) {
        const u32 ent = p.sched_ent[e];
        const int kt = ent >> 1;
        const bool partial = ent & 1;
        const int k0 = kt * LA_BC;
        const u16* sK = sK0 + ((e - e0) & 1) * STAGE;
        const u16* sV = sV0 + ((e - e0) & 1) * STAGE;
        la_cp_wait<1>();
        __syncthreads();  // this tile's K and V have landed

        // S = Q K^T for 16 LA_MT rows x BC keys; each K fragment feeds LA_MT MMAs.
        float s[LA_MT][LA_BC / 8][4];
#pragma unroll
        for (int mt = 0; mt < LA_MT; mt++)
#pragma unroll
            for (int i = 0; i < LA_BC / 8; i++) s[mt][i][0] = s[mt][i][1] = s[mt][i][2] = s[mt][i][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < LA_D / 16; kk++) {
            u32 a[LA_MT][4];
#pragma unroll
            for (int mt = 0; mt < LA_MT; mt++) {
#if LA_QREGS
#pragma unroll
                for (int r = 0; r < 4; r++) a[mt][r] = qf[mt][kk][r];
#else
                la_ldmatrix_x4(a[mt], sQ + la_sw(wrow + 16 * mt + (lane & 15), kk * 2 + (lane >> 4)));
#endif
            }
#pragma unroll
            for (int np = 0; np < LA_BC / 16; np++) {
                u32 bk[4];
                la_ldmatrix_x4(bk, sK + la_sw(np * 16 + (lane & 7) + ((lane >> 4) << 3),
                                              kk * 2 + ((lane >> 3) & 1)));
#pragma unroll
                for (int mt = 0; mt < LA_MT; mt++) {
                    la_mma16816(s[mt][2 * np], a[mt], bk);
                    la_mma16816(s[mt][2 * np + 1], a[mt], bk + 2);
                }
            }
        }

        // Logits in log2 units; soft-cap; mask (Partial tiles and keys past Sk).
        const bool edge = k0 + LA_BC > p.Sk;
        u32 pf[LA_MT][LA_BC / 16][4];
#pragma unroll
        for (int mt = 0; mt < LA_MT; mt++) {
            const int i0 = q0 + wrow + 16 * mt + g;
#pragma unroll
            for (int nt = 0; nt < LA_BC / 8; nt++) {
#pragma unroll
                for (int e2 = 0; e2 < 4; e2++) {
                    float x = s[mt][nt][e2];
#if LA_SOFTCAP
                    x = p.cap_post * tanhf(x * p.cap_pre);
#endif
                    x *= p.scale_log2;
                    if (partial || edge) {
                        const int j = k0 + nt * 8 + 2 * t4 + (e2 & 1);
                        const int i = i0 + ((e2 >> 1) << 3);
                        bool ok = i < p.Sq && j < p.Sk;  // rows past Sq: never written, and the mask program may read per-row ids
                        if (partial && ok) ok = la_mask(p, b, h, i, j);
                        if (!ok) x = -LA_INF;
                    }
                    s[mt][nt][e2] = x;
                }
            }

            // Online softmax: rows g (elements 0, 1) and g + 8 (elements 2, 3).
            float mx0 = m[mt][0], mx1 = m[mt][1];
#pragma unroll
            for (int nt = 0; nt < LA_BC / 8; nt++) {
                mx0 = fmaxf(mx0, fmaxf(s[mt][nt][0], s[mt][nt][1]));
                mx1 = fmaxf(mx1, fmaxf(s[mt][nt][2], s[mt][nt][3]));
            }
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffff, mx0, 1));
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffff, mx0, 2));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffff, mx1, 1));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffff, mx1, 2));
            // A row with nothing allowed so far keeps m = -inf; subtract 0 so 2^(-inf) = 0.
            const float u0 = mx0 == -LA_INF ? 0.f : mx0, u1 = mx1 == -LA_INF ? 0.f : mx1;
            const float a0 = la_exp2(m[mt][0] - u0), a1 = la_exp2(m[mt][1] - u1);
            m[mt][0] = mx0;
            m[mt][1] = mx1;
            l[mt][0] *= a0;
            l[mt][1] *= a1;
#pragma unroll
            for (int i = 0; i < LA_D / 8; i++) {
                o[mt][i][0] *= a0; o[mt][i][1] *= a0;
                o[mt][i][2] *= a1; o[mt][i][3] *= a1;
            }
#pragma unroll
            for (int nt = 0; nt < LA_BC / 8; nt++) {
                const float p0 = la_exp2(s[mt][nt][0] - u0), p1 = la_exp2(s[mt][nt][1] - u0);
                const float p2 = la_exp2(s[mt][nt][2] - u1), p3 = la_exp2(s[mt][nt][3] - u1);
                l[mt][0] += p0 + p1;
                l[mt][1] += p2 + p3;
                // C fragments of n-tiles 2k, 2k+1 are the A fragment of k-step k.
                pf[mt][nt >> 1][(nt & 1) * 2 + 0] = la_pack2(p0, p1);
                pf[mt][nt >> 1][(nt & 1) * 2 + 1] = la_pack2(p2, p3);
            }
        }

        // O += P V; each V fragment feeds LA_MT MMAs.
#pragma unroll
        for (int ks = 0; ks < LA_BC / 16; ks++) {
#pragma unroll
            for (int dp = 0; dp < LA_D / 16; dp++) {
                u32 bv[4];
                la_ldmatrix_x4_trans(bv, sV + la_sw(ks * 16 + (lane & 7) + (((lane >> 3) & 1) << 3),
                                                    dp * 2 + (lane >> 4)));
#pragma unroll
                for (int mt = 0; mt < LA_MT; mt++) {
                    la_mma16816(o[mt][2 * dp], pf[mt][ks], bv);
                    la_mma16816(o[mt][2 * dp + 1], pf[mt][ks], bv + 2);
                }
            }
        }
        __syncthreads();  // every warp is done with this stage: refill it with tile e + 2
        if (e + 2 < e1) {
            const int k2 = (int)(p.sched_ent[e + 2] >> 1) * LA_BC;
            la_load_tile<LA_BC, LA_THREADS>((u16*)sK, gk, p.k_ss, k2, p.Sk);
            la_load_tile<LA_BC, LA_THREADS>((u16*)sV, gv, p.v_ss, k2, p.Sk);
        }
        la_cp_commit();
    }

    // Epilogue: O / l and the LSE; rows past Sq are not written.
    u16* go = p.o + b * p.o_sb + h * p.o_sh;
#pragma unroll
    for (int mt = 0; mt < LA_MT; mt++) {
#pragma unroll
        for (int hf = 0; hf < 2; hf++) {
            float lsum = l[mt][hf];
            lsum += __shfl_xor_sync(0xffffffff, lsum, 1);
            lsum += __shfl_xor_sync(0xffffffff, lsum, 2);
            const float inv = lsum > 0.f ? 1.f / lsum : 0.f;
            const int r = q0 + wrow + 16 * mt + g + 8 * hf;
            if (r < p.Sq) {
                u32* dst = (u32*)(go + (i64)r * p.o_ss);
#pragma unroll
                for (int i = 0; i < LA_D / 8; i++)
                    dst[i * 4 + t4] = la_pack2(o[mt][i][2 * hf] * inv, o[mt][i][2 * hf + 1] * inv);
                if (t4 == 0)
                    p.lse[((i64)b * p.Hq + h) * p.Sq + r] =
                        lsum > 0.f ? (m[mt][hf] + __log2f(lsum)) * LA_LN2 : -LA_INF;
            }
        }
    }
}
