// Fused attention forward on Hopper's warpgroup MMA (wgmma, sm_90a).
//
// Same contract, schedule walk, masking and online softmax as attn_fwd.cu (the mma.sync kernel,
// which serves other GPUs and head dims); what changes is who multiplies:
//   S = Q K^T : wgmma m64 n(BC) k16, A = Q and B = K both read by the tensor cores straight from
//               shared memory (K-major operands), one instruction per 16 of the head dim;
//   O += P V  : wgmma m64 n(D) k16, A = P from registers (the S accumulators rounded to
//               bf16/f16: their layout is the A-fragment layout), B = V from shared memory
//               (N-major operand: V's rows are keys, the tensor cores transpose).
// A block is LA_NWG warpgroups of 128 threads, each owning 64 query rows (warp w of a warpgroup:
// rows 16 w + g and + 8, as in the mma.sync kernel), so BR = 64 LA_NWG.
//
// Compile-time constants: LA_F16, LA_D (64 or 128), LA_BC (64 or 128), LA_NWG, LA_SOFTCAP, and
// the mask program la_mask.
//
// Patch order (LA_PATCH = 1, 2-D neighborhoods on a grid LA_PW tokens wide; mask/patch.rs): the
// schedule's query tile t is the t-th LA_QPH x LA_QPW patch of the grid and key tile t the t-th
// LA_KPH x LA_KPW patch; tile row r is token la_qtok(t, r) / la_ktok(t, r). Loads, the mask and
// the stores go through these tokens (la_qtok / la_ktok, tile_tokens.cuh); nothing else changes.
//
// Mask bit table (LA_MASK_BITS = 1, programs that are heavy per element: 2-D neighborhoods,
// documents whose keys are not runs; mask_bits.cu): a Partial tile's element mask is one bit of
// the plan's table instead of a run of la_mask. Each thread loads the words of its two rows
// while the tensor cores compute S.
//
// Shared memory: 128-byte-swizzle layout, the one the tensor cores read: a tile of R rows x D is
// stored as D / 64 column blocks of [R][64] (128-byte rows); the 16-byte chunk c of row r sits at
// chunk position c ^ (r mod 8). Every block starts 1024-byte aligned (8 rows x 128 bytes, the
// swizzle atom). Descriptors: K-major (Q, K): stride between 8-row groups 1024 bytes; the k-th
// 16-column step starts 32 k bytes into the atom row. N-major (V): stride between 8-key groups
// 1024 bytes, between 64-column blocks R x 128 bytes.
// Q, and two stages of K and V, as in attn_fwd.cu: tile t + 1 lands while tile t is computed.

#define LA_THREADS (LA_NWG * 128)
#define LA_BR (LA_NWG * 64)

#if LA_BC == 64
#define la_wg_ss_bc la_wg_ss_n64
#else
#define la_wg_ss_bc la_wg_ss_n128
#endif

extern "C" __global__ void __launch_bounds__(LA_THREADS, LA_MINB) la_attn_fwd_wg(const LaFwdParams p) {
    extern __shared__ __align__(1024) u16 la_smem_wg[];
    // The swizzle atoms need 1024-byte alignment in the shared window (the host adds 1 KiB).
    const u32 mis = la_smem_addr(la_smem_wg) & 1023;
    u16* sQ = la_smem_wg + (mis ? (1024 - mis) / 2 : 0);
    u16* sK0 = sQ + LA_BR * LA_D;
    u16* sV0 = sK0 + LA_BC * LA_D;
    constexpr int STAGE = 2 * LA_BC * LA_D;

#if LA_QFIRST
    // Grid (query tiles, heads, batch): the blocks running together are the query tiles of a few
    // heads, which share their keys and values in L2.
    const int qt = gridDim.x - 1 - blockIdx.x;
    const int h = blockIdx.y, b = blockIdx.z;
#else
    const int qt = gridDim.z - 1 - blockIdx.z;
    const int h = blockIdx.x, b = blockIdx.y;
#endif
    const int kh = h / (p.Hq / p.Hk);
    const int wg = threadIdx.x >> 7;
    const int warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int srow = ((b % p.sched_batch) * p.sched_heads + (h % p.sched_heads)) * p.q_tiles + qt;
    const u32 e0 = p.sched_off[srow], e1 = p.sched_off[srow + 1];

    const u16* gq = p.q + b * p.q_sb + h * p.q_sh;
    const u16* gk = p.k + b * p.k_sb + kh * p.k_sh;
    const u16* gv = p.v + b * p.v_sb + kh * p.v_sh;

    la_load_tile128<LA_BR, LA_THREADS>(sQ, gq, p.q_ss, [=](int r) { return la_qtok(qt, r); }, p.Sq);
    auto load_kv = [&](u16* sK, u16* sV, u32 ent) {
        const int kt = (int)(ent >> 1);
        la_load_tile128<LA_BC, LA_THREADS>(sK, gk, p.k_ss, [=](int r) { return la_ktok(kt, r); }, p.Sk);
        la_load_tile128<LA_BC, LA_THREADS>(sV, gv, p.v_ss, [=](int r) { return la_ktok(kt, r); }, p.Sk);
    };
#pragma unroll
    for (int st = 0; st < 2; st++) {
        if (e0 + st < e1) load_kv(sK0 + st * STAGE, sV0 + st * STAGE, p.sched_ent[e0 + st]);
        la_cp_commit();
    }

    // Accumulators, flat: n8 block j holds elements 4 j .. 4 j + 3 (rows g, g, g + 8, g + 8).
    float o[LA_D / 2];
#pragma unroll
    for (int i = 0; i < LA_D / 2; i++) o[i] = 0.f;
    float m0 = -LA_INF, m1 = -LA_INF, l0 = 0.f, l1 = 0.f;
    const int rloc = wg * 64 + warp * 16 + g;  // this thread's tile rows: rloc, rloc + 8
    const int i0 = la_qtok(qt, rloc), i1 = la_qtok(qt, rloc + 8);

    for (u32 e = e0; e < e1; e++) {
        const u32 ent = p.sched_ent[e];
        const bool partial = ent & 1;
        const int kt = (int)(ent >> 1), k0 = kt * LA_BC;
        const u16* sK = sK0 + ((e - e0) & 1) * STAGE;
        const u16* sV = sV0 + ((e - e0) & 1) * STAGE;
#if LA_MASK_BITS
        // A Partial tile with no allowed key in this warpgroup's 64 rows is skipped by it (the
        // warpgroup's bit of the tile's group word). Else rows rloc and rloc + 8 of the tile's
        // bits, shifted so that bit 8 (jj & 3) + c of word jj / 4 is key 8 jj + 2 t4 + c
        // (c = 0, 1) of this thread's fragment.
        bool live = true;
        u32 mb0[LA_BC / 32], mb1[LA_BC / 32];
        if (partial) {
            const u32 u = p.mbix[e];
            live = (p.mgrp[u] >> wg) & 1;
            const u32* t = p.mbits + (i64)u * (LA_BR * LA_BC / 32);
#pragma unroll
            for (int w = 0; w < LA_BC / 32; w++) {
                mb0[w] = live ? t[rloc * (LA_BC / 32) + w] >> (2 * t4) : 0;
                mb1[w] = live ? t[(rloc + 8) * (LA_BC / 32) + w] >> (2 * t4) : 0;
            }
        }
#else
        const bool live = true;
#endif
        la_cp_wait<1>();
        la_fence_async_smem();  // cp.async writes -> visible to the tensor cores' reads
        __syncthreads();

        if (live) {
            // S = Q K^T (this warpgroup's 64 rows x BC keys).
            float s[LA_BC / 2];
            la_wg_fence();
#pragma unroll
            for (int kk = 0; kk < LA_D / 16; kk++) {
                const u64 da = la_wg_desc(sQ + (kk >> 2) * LA_BR * 64 + wg * 64 * 64 + (kk & 3) * 16, 16, 1024);
                const u64 db = la_wg_desc(sK + (kk >> 2) * LA_BC * 64 + (kk & 3) * 16, 16, 1024);
                la_wg_ss_bc(s, da, db, kk > 0);
            }
            la_wg_commit();
            la_wg_wait0();
            la_fence_regs<LA_BC / 2>(s);  // the results exist only after the wait

            // Logits in log2 units; soft-cap; mask (Partial tiles and keys past Sk).
            const bool edge = k0 + LA_BC > p.Sk;
#pragma unroll
            for (int x = 0; x < LA_BC / 2; x++) {
                float y = s[x];
#if LA_SOFTCAP
                y = p.cap_post * tanhf(y * p.cap_pre);
#endif
#if !LA_FUSED_SCALE
                y *= p.scale_log2;  // else the softmax applies it (wg_softmax.cuh)
#endif
                if (partial || edge) {
                    const int j = la_ktok(kt, (x >> 2) * 8 + 2 * t4 + (x & 1));
                    const int i = (x >> 1) & 1 ? i1 : i0;
                    bool ok;
#if LA_MASK_BITS
                    if (partial) {  // the table has 0 past Sq and Sk
                        const u32 w = (x >> 1) & 1 ? mb1[x >> 4] : mb0[x >> 4];
                        ok = (w >> (8 * ((x >> 2) & 3) + (x & 1))) & 1;
                    } else {
                        ok = i < p.Sq && j < p.Sk;
                    }
#else
                    ok = i < p.Sq && j < p.Sk;  // rows past Sq: never written, and the mask program may read per-row ids
                    if (partial && ok) ok = la_mask(p, b, h, i, j);
#endif
                    if (!ok) y = -LA_INF;
                }
                s[x] = y;
            }

            // Online softmax (wg_softmax.cuh): P into s, O rescaled by 2^(m_old - m_new).
            float a0, a1;
            if (la_wg_softmax(s, LA_SM_SCALE(p), m0, m1, l0, l1, a0, a1)) la_wg_rescale(o, a0, a1);
            u32 pf[LA_BC / 16][4];
            la_wg_pack(pf, s);

            // O += P V: 16 keys a step; V's 8-key groups are 1024 bytes apart, its 64-column blocks
            // BC x 128 bytes apart.
            la_fence_regs<LA_D / 2>(o);
            la_wg_fence();
#pragma unroll
            for (int ks = 0; ks < LA_BC / 16; ks++) {
                const u64 db = la_wg_desc(sV + ks * 16 * 64, LA_BC * 128, 1024);
                la_wg_rs_d(o, pf[ks], db);
            }
            la_wg_commit();
            la_wg_wait0();
            la_fence_regs<LA_D / 2>(o);
        }

        __syncthreads();  // every warpgroup is done with this stage: refill it with tile e + 2
        if (e + 2 < e1) load_kv((u16*)sK, (u16*)sV, p.sched_ent[e + 2]);
        la_cp_commit();
    }

    // Epilogue: O / l and the LSE; rows past Sq are not written.
    la_wg_store(p, o, l0, l1, m0, m1, b, h, i0, i1, t4);
}
