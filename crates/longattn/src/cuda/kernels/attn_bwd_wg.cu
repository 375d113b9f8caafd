// Attention backward in one pass on Hopper's warpgroup MMA (wgmma, sm_90a): the fast mode.
//
// The math is in bwd_common.cuh (la_bwd_prep runs first: Delta, LSE in log2 units, dq_acc = 0).
// Block = (KV head, batch, key tile of LA_BC = 64 LA_NWG keys); warpgroup w owns keys
// 64 w .. 64 w + 63 of the tile (the M rows of its transposed products). The block walks its
// schedule column for every query head of the group (GQA: dK, dV summed over the group) in
// query tiles of LA_BR rows; per tile (L2 = LSE log2 e, one row per query i):
//   S^T  = K Q^T                     wgmma ss m64 n(BR): A = K, B = Q, both K-major
//   dP^T = V dO^T                    same with V, dO
//   P^T  = 2^(S^T scale_log2 - L2),  dS^T = P^T (dP^T - Delta) dcap scale    (registers)
//   dV  += P^T dO                    wgmma rs m64 n(D): A = P^T from registers (the accumulator
//                                    layout is the A-fragment layout), B = dO N-major
//   dK  += dS^T Q                    same with dS^T and Q
//   dQ  += dS K                      dS^T goes to shared memory as [key][query]; wgmma sst m64 n64:
//                                    A = dS read M-major (transposed), B = K read N-major. Each
//                                    warpgroup takes a 64 x 64 block of the BR x D result
//                                    (BR 64: head-dim columns 64 w..; BR 128: query rows 64 w..)
//                                    and adds it to dq_acc (f32, la_dq_acc_at): staged in
//                                    shared memory (two buffers), one 16 KiB bulk reduce-add
//                                    by the TMA unit, in whatever order blocks get there.
// la_bwd_dq_store converts dq_acc afterwards. Two stages of Q, dO (and their L2, Delta) in
// shared memory: tile t + 1 lands while tile t is computed.
//
// Compile-time constants: LA_F16, LA_D (64 or 128), LA_NWG (2), LA_BR (64 or 128; BR x D must
// split into LA_NWG blocks of 64 x 64), LA_SOFTCAP, the mask program la_mask. Shared-memory
// layout: the 128-byte-swizzle tiles of wgmma.cuh (la_sw128, la_load_tile128).

#define LA_THREADS (LA_NWG * 128)
#define LA_BC (LA_NWG * 64)
#define LA_DQ_ROWSPLIT (LA_BR == 64 * LA_NWG)  // dQ blocks split the query rows (else the columns)

struct la_f2 {
    float x, y;
};
// 8-byte shared-memory load of two floats, 16-byte store of four (one instruction each).
__device__ __forceinline__ la_f2 la_lds2(const float* a) {
    la_f2 r;
    asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n" : "=f"(r.x), "=f"(r.y) : "r"(la_smem_addr(a)));
    return r;
}
__device__ __forceinline__ void la_sts4(float* a, const float* v) {
    asm volatile("st.shared.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"r"(la_smem_addr(a)), "f"(v[0]), "f"(v[1]),
                 "f"(v[2]), "f"(v[3])
                 : "memory");
}

#if LA_BR == 64
#define la_wg_ss_br la_wg_ss_n64
#else
#define la_wg_ss_br la_wg_ss_n128
#endif

extern "C" __global__ void __launch_bounds__(LA_THREADS, 1) la_bwd_wg(const LaBwdParams p) {
    extern __shared__ __align__(1024) u16 la_smem_bw[];
    // The swizzle atoms need 1024-byte alignment in the shared window (the host adds 1 KiB).
    const u32 mis = la_smem_addr(la_smem_bw) & 1023;
    u16* sK = la_smem_bw + (mis ? (1024 - mis) / 2 : 0);
    u16* sV = sK + LA_BC * LA_D;
    u16* sQ0 = sV + LA_BC * LA_D;       // two stages of Q and dO
    u16* sdO0 = sQ0 + 2 * LA_BR * LA_D;
    u16* sdS = sdO0 + 2 * LA_BR * LA_D;  // [BC keys][BR queries]
    float* sStg = (float*)(sdS + LA_BC * LA_BR) + (int)(threadIdx.x >> 7) * 2 * 4096;  // 2 dQ blocks
    constexpr int STAGE = LA_BR * LA_D;
    __shared__ __align__(8) float sL[2][LA_BR], sDl[2][LA_BR];

    const int kt = blockIdx.z, kh = blockIdx.x, b = blockIdx.y;
    const int wg = threadIdx.x >> 7;
    const int warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int k0 = kt * LA_BC;
    const i64 koff = b * p.k_sb + kh * p.k_sh;
    la_load_tile128<LA_BC, LA_THREADS>(sK, p.k + koff, p.k_ss, k0, p.Sk);
    la_load_tile128<LA_BC, LA_THREADS>(sV, p.v + koff, p.k_ss, k0, p.Sk);
    la_cp_commit();

    // The (query head, schedule column entry) pairs of this block: bwd_common.cuh.
    const int n_items = la_bwd_items(p, b, kh, kt);
    auto item = [&](int t, int& h, u32& ent) { la_bwd_item(p, b, kh, kt, t, h, ent); };
    auto load_item = [&](int t, int st) {
        int h;
        u32 ent;
        item(t, h, ent);
        const int q0 = (int)(ent >> 1) * LA_BR;
        const i64 qoff = b * p.q_sb + h * p.q_sh;
        la_load_tile128<LA_BR, LA_THREADS>(sQ0 + st * STAGE, p.q + qoff, p.q_ss, q0, p.Sq);
        la_load_tile128<LA_BR, LA_THREADS>(sdO0 + st * STAGE, p.dout + qoff, p.q_ss, q0, p.Sq);
        for (int x = threadIdx.x; x < LA_BR; x += LA_THREADS) {
            const int i = q0 + x;
            const i64 r = ((i64)b * p.Hq + h) * p.Sq + i;
            sL[st][x] = i < p.Sq ? p.lse2[r] : LA_INF;  // rows past Sq: P = 0
            sDl[st][x] = i < p.Sq ? p.delta[r] : 0.f;
        }
    };
#pragma unroll
    for (int st = 0; st < 2; st++) {
        if (st < n_items) load_item(st, st);
        la_cp_commit();
    }

    // Accumulators, flat: n8 block j holds elements 4 j .. 4 j + 3 (rows g, g, g + 8, g + 8).
    float dk[LA_D / 2], dv[LA_D / 2];
#pragma unroll
    for (int x = 0; x < LA_D / 2; x++) dk[x] = dv[x] = 0.f;
    const int krow = wg * 64 + warp * 16 + g;  // this thread's keys in the tile: krow, krow + 8

    for (int t = 0; t < n_items; t++) {
        const int st = t & 1;
        int h;
        u32 ent;
        item(t, h, ent);
        const bool partial = ent & 1;
        const int q0 = (int)(ent >> 1) * LA_BR;
        const u16* cQ = sQ0 + st * STAGE;
        const u16* cdO = sdO0 + st * STAGE;
        la_cp_wait<1>();
        la_fence_async_smem();  // cp.async writes -> visible to the tensor cores' reads
        __syncthreads();

        // S^T = K Q^T and dP^T = V dO^T (this warpgroup's 64 keys x BR queries).
        float s[LA_BR / 2], dp[LA_BR / 2];
        la_wg_fence();
#pragma unroll
        for (int kk = 0; kk < LA_D / 16; kk++) {
            const int ka = (kk >> 2) * LA_BC * 64 + wg * 64 * 64 + (kk & 3) * 16;
            const int kb = (kk >> 2) * LA_BR * 64 + (kk & 3) * 16;
            la_wg_ss_br(s, la_wg_desc(sK + ka, 16, 1024), la_wg_desc(cQ + kb, 16, 1024), kk > 0);
            la_wg_ss_br(dp, la_wg_desc(sV + ka, 16, 1024), la_wg_desc(cdO + kb, 16, 1024), kk > 0);
        }
        la_wg_commit();
        la_wg_wait0();
        la_fence_regs<LA_BR / 2>(s);
        la_fence_regs<LA_BR / 2>(dp);

        // P^T and dS^T (element x: query column 8 (x / 4) + 2 t4 + (x & 1), key row + 8 ((x / 2) & 1)).
        const bool edge = k0 + LA_BC > p.Sk;
        u32 pf[LA_BR / 16][4], df[LA_BR / 16][4];
#pragma unroll
        for (int jn = 0; jn < LA_BR / 8; jn++) {
            float pr[4], ds[4];
            // L2 and Delta of query columns 8 jn + 2 t4 and + 1.
            const la_f2 l2 = la_lds2(&sL[st][jn * 8 + 2 * t4]);
            const la_f2 dl = la_lds2(&sDl[st][jn * 8 + 2 * t4]);
#pragma unroll
            for (int e2 = 0; e2 < 4; e2++) {
                const int x = 4 * jn + e2;
                const int ic = jn * 8 + 2 * t4 + (e2 & 1);
                float dcap;
                float y = la_logit(p, s[x], dcap);
                if (partial || edge) {
                    const int i = q0 + ic, j = k0 + krow + ((e2 >> 1) << 3);
                    bool ok = i < p.Sq && j < p.Sk;  // rows past Sq: the mask program may read per-row ids
                    if (partial && ok) ok = la_mask(p, b, h, i, j);
                    if (!ok) y = -LA_INF;
                }
                pr[e2] = la_exp2(y - ((e2 & 1) ? l2.y : l2.x));
                ds[e2] = pr[e2] * (dp[x] - ((e2 & 1) ? dl.y : dl.x)) * dcap * p.scale;
            }
            pf[jn >> 1][(jn & 1) * 2 + 0] = la_pack2(pr[0], pr[1]);
            pf[jn >> 1][(jn & 1) * 2 + 1] = la_pack2(pr[2], pr[3]);
            const u32 d01 = la_pack2(ds[0], ds[1]), d23 = la_pack2(ds[2], ds[3]);
            df[jn >> 1][(jn & 1) * 2 + 0] = d01;
            df[jn >> 1][(jn & 1) * 2 + 1] = d23;
            // dS^T rows krow, krow + 8, query columns 8 jn + 2 t4, + 1 -> [key][query] tile.
            *(u32*)(sdS + la_sw128<LA_BC>(krow, jn) + 2 * t4) = d01;
            *(u32*)(sdS + la_sw128<LA_BC>(krow + 8, jn) + 2 * t4) = d23;
        }

        // dV += P^T dO, dK += dS^T Q: 16 queries a step; Q's and dO's 8-row groups are 1024
        // bytes apart, their 64-column blocks BR x 128 bytes apart.
        la_fence_regs<LA_D / 2>(dv);
        la_fence_regs<LA_D / 2>(dk);
        la_wg_fence();
#pragma unroll
        for (int kq = 0; kq < LA_BR / 16; kq++) {
            la_wg_rs_d(dv, pf[kq], la_wg_desc(cdO + kq * 16 * 64, LA_BR * 128, 1024));
            la_wg_rs_d(dk, df[kq], la_wg_desc(cQ + kq * 16 * 64, LA_BR * 128, 1024));
        }
        la_wg_commit();

        // dQ block (64 x 64) of this warpgroup = dS K over the BC keys of the tile, 16 a step.
        la_fence_async_smem();  // dS^T stores -> visible to the tensor cores
        __syncthreads();        // both warpgroups' dS^T are in
        const int qr0 = LA_DQ_ROWSPLIT ? wg * 64 : 0, dc0 = LA_DQ_ROWSPLIT ? 0 : wg * 64;
        float dq[32];
        la_wg_fence();
#pragma unroll
        for (int ks = 0; ks < LA_BC / 16; ks++) {
            const u64 da = la_wg_desc(sdS + (qr0 >> 6) * LA_BC * 64 + ks * 16 * 64, LA_BC * 128, 1024);
            const u64 db = la_wg_desc(sK + (dc0 >> 6) * LA_BC * 64 + ks * 16 * 64, LA_BC * 128, 1024);
            la_wg_sst_n64(dq, da, db, ks > 0);
        }
        la_wg_commit();
        la_wg_wait0();
        la_fence_regs<32>(dq);
        la_fence_regs<LA_D / 2>(dv);
        la_fence_regs<LA_D / 2>(dk);

        // Stage the block in accumulator order (buffer t & 1; the reduction that last read it,
        // issued at t - 2, is done: see below), then one bulk reduce-add of 16 KiB.
        float* stg = sStg + (t & 1) * 4096;
        const int tw = threadIdx.x & 127;
#pragma unroll
        for (int j = 0; j < 8; j++) la_sts4(stg + (j * 128 + tw) * 4, dq + 4 * j);
        la_fence_async_smem();  // staging stores -> visible to the bulk copy
        la_bar_sync(1 + wg, 128);
        if (tw == 0) {
            la_bulk_add_f32(p.dq_acc + la_dq_acc_at(p, b, h, q0 + qr0, dc0), stg, 4096 * 4);
            la_bulk_commit();
        }
        if (tw == 0) la_bulk_wait_read<1>();  // the reduction of tile t - 1 has read its buffer

        __syncthreads();  // every warpgroup is done with stage st and dS^T: refill with item t + 2
        if (t + 2 < n_items) load_item(t + 2, st);
        la_cp_commit();
    }

    if ((threadIdx.x & 127) == 0) la_bulk_wait<0>();  // shared memory outlives the reductions
    // dK, dV of this thread's keys krow, krow + 8; keys past Sk are not written.
#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
        const int j = k0 + krow + 8 * hf;
        if (j < p.Sk) {
            u32* dstk = (u32*)(p.dk + koff + (i64)j * p.k_ss);
            u32* dstv = (u32*)(p.dv + koff + (i64)j * p.k_ss);
#pragma unroll
            for (int x = 0; x < LA_D / 8; x++) {
                dstk[x * 4 + t4] = la_pack2(dk[4 * x + 2 * hf], dk[4 * x + 2 * hf + 1]);
                dstv[x * 4 + t4] = la_pack2(dv[4 * x + 2 * hf], dv[4 * x + 2 * hf + 1]);
            }
        }
    }
}
