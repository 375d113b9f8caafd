// Attention backward in one pass on Hopper (sm_90a), warp-specialized: the fast mode, and with
// LA_ORDERED the deterministic one.
//
// The math is in bwd_common.cuh (la_bwd_prep runs first: Delta and L2 = LSE log2 e per row,
// padded to lstride). Block = (key tile of LA_BC = 64 LA_NWG keys, KV head, batch), LA_NWG + 1
// warpgroups:
//   - warpgroup 0 is the producer: one thread issues TMA copies of K and V (once) and, per work
//     item (query head of the group, query tile of LA_BR rows from the schedule column), of Q,
//     dO (tensor maps, 128-byte swizzle) and the tile's L2 and Delta (bulk copies) into a
//     two-stage ring: "full" mbarriers count the bytes, "empty" ones the consumer warps done
//     with a stage. It gives its registers to the consumers (setmaxnreg).
//   - consumer warpgroup c owns keys 64 c .. 64 c + 63 of the tile (the M rows of its transposed
//     products) and never waits for the other consumer: per item
//       S^T  = K Q^T                   wgmma ss m64 n(BR): A = K, B = Q, both K-major
//       dP^T = V dO^T                  same with V, dO
//       P^T  = 2^(S^T scale_log2 - L2),  dS^T = P^T (dP^T - Delta) dcap      (registers; the
//                                      softmax scale is left to the stores: dK here, dQ in
//                                      la_bwd_dq_store)
//       dV  += P^T dO                  wgmma rs m64 n(D): A = P^T from registers (the
//                                      accumulator layout is the A-fragment layout), B = dO
//                                      N-major
//       dK  += dS^T Q                  same with dS^T and Q
//       dQ  += dS K (its 64 keys)      dS^T goes to the warpgroup's rows of a [key][query] tile
//                                      in shared memory; two 64 x 64 blocks of the BR x D
//                                      partial (BR 64: head-dim columns 0 / 64; BR 128: query
//                                      rows 0 / 64), wgmma sst m64 n64 with A = dS read M-major
//                                      (transposed) and B = K read N-major. Each block is
//                                      staged in register order and added to dq_acc (f32,
//                                      la_dq_acc_at) by one 16 KiB bulk reduce-add of the TMA
//                                      unit (issued by a producer warp with LA_DQ_WARP, the
//                                      host's default), in whatever order blocks and
//                                      warpgroups get there (LA_ORDERED: in a fixed order,
//                                      see the producer).
// la_bwd_dq_store converts dq_acc afterwards.
//
// LA_DQ_MERGE (1): the dQ partial is formed over the whole key tile instead of each consumer's
// 64 keys, half of it per consumer: after both consumers' dS^T rows are in (a named barrier of
// the two warpgroups), consumer c multiplies block c of dQ (BR 64: head-dim columns 64 c ..;
// BR 128: query rows 64 c ..) over all LA_BC keys and adds that one 16 KiB block, so dq_acc
// receives half the bytes and half the bulk adds. dS^T then has two stages (item t in stage
// t & 1): a consumer writes stage t & 1 again only after the barrier of item t + 1, which the
// other consumer reaches only after its item-t product has read the stage.
//
// Compile-time constants: LA_F16, LA_D (64 or 128), LA_NWG (2), LA_BR (64 or 128; BR x D is two
// 64 x 64 blocks), LA_SOFTCAP, LA_ORDERED (0 / 1), LA_DQ_MERGE (0 / 1), LA_BWD_SPLITWAIT (0 / 1:
// S^T and dP^T in two commit groups, P^T formed while dP^T runs; opt-in), LA_BWD_DKLAST (0 / 1: dK
// issued after the merged dQ product, running while dQ is staged and added; the host's default),
// LA_DQ_RED (0 / 1: dQ added from registers; opt-in), LA_DQ_WARP (0 / 1: dQ added by producer
// warps; the host's default, implied by LA_ORDERED), LA_KNOCK (timing experiments), the mask
// program la_mask (and la_mask_interval where LA_MASK_INTERVAL). Shared-memory layout: the
// 128-byte-swizzle tiles of wgmma.cuh (la_sw128), which the TMA writes with a box of 64
// columns.

#define LA_THREADS ((LA_NWG + 1) * 128)
#define LA_BC (LA_NWG * 64)
#define LA_DQ_ROWSPLIT (LA_BR == 128)  // dQ blocks split the query rows (else the columns)
#ifndef LA_DQ_MERGE
#define LA_DQ_MERGE 0
#endif
#if LA_DQ_MERGE && LA_NWG != 2
#error "LA_DQ_MERGE: one dQ block per consumer needs two consumers"
#endif
#ifndef LA_BWD_SPLITWAIT
#define LA_BWD_SPLITWAIT 0
#endif
#if LA_BWD_SPLITWAIT && LA_SOFTCAP
#error "LA_BWD_SPLITWAIT: no soft-cap (its derivative per element would need a third array)"
#endif
#ifndef LA_BWD_DKLAST
#define LA_BWD_DKLAST 0
#endif
#if LA_BWD_DKLAST && !LA_DQ_MERGE
#error "LA_BWD_DKLAST: one merged dQ block per consumer"
#endif
// Timing experiments only (LONGATTN_CUDA_BWD_KNOCK, results are wrong; fast mode only: the
// deterministic mode's reducers wait for every staged partial): bit 1 drops the dQ bulk adds, 2
// the whole dQ product, staging and adds, 4 the exponentials and the mask (P^T = S^T,
// dS^T = dP^T), 16 the merged dQ's barrier of the two consumers.
#if !defined(LA_KNOCK) || LA_ORDERED
#undef LA_KNOCK
#define LA_KNOCK 0
#endif
// LA_DQ_RED (1, opt-in: LONGATTN_CUDA_BWD_DQ_ADD=red): each thread adds its dQ registers to dq_acc
// with vector reductions (red.global.add.v4.f32, 16 bytes a thread, coalesced: dq_acc's blocks are
// in register order) instead of staging them in shared memory for a bulk reduce-add, which
// needs a proxy fence and a barrier of the warpgroup per item. Fast mode only.
#ifndef LA_DQ_RED
#define LA_DQ_RED 0
#endif
#if LA_DQ_RED && LA_ORDERED
#error "LA_DQ_RED: the deterministic mode orders whole-block adds"
#endif
// LA_DQ_WARP (1: the host's default in fast mode, LONGATTN_CUDA_BWD_DQ_ADD=bulk turns it off;
// always with LA_ORDERED):
// warp 1 + c of the producer warpgroup adds consumer c's staged dQ partials (the deterministic
// mode's reducers, which add in a fixed order). A consumer hands its staging over with one
// arrival per warp (no barrier of the warpgroup, no bulk issue of its own) and waits only when
// it stages the next item's partial, until the adder has read the previous one.
#ifndef LA_DQ_WARP
#define LA_DQ_WARP 0
#endif
#if LA_ORDERED
#undef LA_DQ_WARP
#define LA_DQ_WARP 1
#endif
#if LA_DQ_WARP && LA_DQ_RED
#error "LA_DQ_WARP: the staged partials are added by bulk copies"
#endif
// LA_BWD_L2PRE (n, opt-in: LONGATTN_CUDA_BWD_L2PRE=n): the L2 values of the first n column
// groups (8 queries each) are read from the stage into registers before the wait for S^T and
// dP^T, so the first exponentials do not wait on shared-memory loads after it. At most 8 groups
// at BR 64 (all of them), 4 at BR 128 (8 held over the wait spill there).
#ifndef LA_BWD_L2PRE
#define LA_BWD_L2PRE 0
#endif
#define LA_L2PRE_MAX (LA_BR == 128 ? 4 : 8)
#define LA_L2PRE (LA_BWD_L2PRE < LA_L2PRE_MAX ? LA_BWD_L2PRE : LA_L2PRE_MAX)
// LA_ARRIVE_ALL (opt-in: LONGATTN_CUDA_BWD_ARRIVE=all): every consumer thread hands a Q / dO
// stage back to the producer with its own arrival (128 per warpgroup) instead of lane 0 after a
// warp barrier (4 per warpgroup). Both are correct; compute-sanitizer racecheck follows only the
// first (scripts/gpu/racecheck_repro.cu reproduces its report of the second).
#ifndef LA_ARRIVE_ALL
#define LA_ARRIVE_ALL 0
#endif
#define LA_DS_STAGES (1 + LA_DQ_MERGE)
#define LA_STG_BLOCKS (2 - LA_DQ_MERGE)  // 64 x 64 f32 dQ blocks staged per consumer
// Register split (65536 per SM, one block): consumers get what the producer gives up (the
// producer walks the item list and forms TMA coordinates: 40 registers).
#if LA_BWD_SPLITWAIT
// S^T and dP^T live at once with P^T forming: 232 registers made ptxas serialize the wgmma.
#define LA_REG_MMA 240
#define LA_REG_LOAD 24
#else
#define LA_REG_MMA 232
#define LA_REG_LOAD 40
#endif

#if LA_BR == 64
#define la_wg_ss_br la_wg_ss_n64
#else
#define la_wg_ss_br la_wg_ss_n128
#endif

// dst[0..4) += v[0..4) in global memory, one vector reduction (no value returned).
__device__ __forceinline__ void la_red_add4(float* dst, const float* v) {
    asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(dst), "f"(v[0]), "f"(v[1]), "f"(v[2]),
                 "f"(v[3])
                 : "memory");
}
// 16-byte shared-memory store of four floats (one instruction; la_lds2 in wgmma.cuh loads two).
__device__ __forceinline__ void la_sts4(float* a, const float* v) {
    asm volatile("st.shared.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"r"(la_smem_addr(a)), "f"(v[0]), "f"(v[1]),
                 "f"(v[2]), "f"(v[3])
                 : "memory");
}

// Adds the staged dQ partial of query tile q0 of head h to dq_acc: one 16 KiB bulk reduce-add
// per 64 x 64 block staged in register order at stg (both blocks; LA_DQ_MERGE: block c only),
// committed as one bulk group.
__device__ __forceinline__ void la_dq_add_tile(const LaBwdParams& p, int b, int h, int q0, int c, const float* stg) {
#pragma unroll
    for (int x = 0; x < LA_STG_BLOCKS; x++) {
        const int blk = LA_DQ_MERGE ? c : x;
        const int qr0 = LA_DQ_ROWSPLIT ? 64 * blk : 0, dc0 = LA_DQ_ROWSPLIT ? 0 : 64 * blk;
        la_bulk_add_f32(p.dq_acc + la_dq_acc_at(p, b, h, q0 + qr0, dc0), stg + x * 4096, 4096 * 4);
    }
    la_bulk_commit();
}

// Which of this thread's S^T elements count, for item (query tile q0, Partial or not): bit x is
// element x = 4 jn + e2 (query q0 + 8 jn + 2 t4 + (e2 & 1), key kr + 8 (e2 >> 1)); 0 past Sq /
// Sk and, in Partial tiles, where the mask is false. Evaluated in a rolled loop over jn (the
// caller issues it while the tensor cores run S^T and dP^T): BR / 2 inlined copies of the mask
// program in the unrolled element loop made the kernel large for the instruction cache, as they
// did in the forward (attn_fwd_ws.cu). Interval masks (LA_MASK_INTERVAL: one run of keys per
// query row) test two bounds per query instead of running the program per element.
__device__ __forceinline__ u64 la_bwd_keep(const LaBwdParams& p, int b, int h, int q0, int kr, int t4, bool partial) {
    u64 keep = 0;
#pragma unroll 1
    for (int jn = 0; jn < LA_BR / 8; jn++) {
        u32 nib = 0;
#pragma unroll
        for (int c = 0; c < 2; c++) {
            const int i = q0 + jn * 8 + 2 * t4 + c;
            if (i >= p.Sq) continue;  // rows past Sq: the mask program may read per-row ids
#if LA_MASK_INTERVAL
            int lo = 0, hi = p.Sk - 1;
            if (partial) {
                int a, z;
                la_mask_interval(p, b, h, i, a, z);
                lo = la_imax(a, lo);
                hi = la_imin(z, hi);
            }
#pragma unroll
            for (int r = 0; r < 2; r++) {
                const int j = kr + 8 * r;
                nib |= (u32)(j >= lo && j <= hi) << (2 * r + c);
            }
#else
#pragma unroll
            for (int r = 0; r < 2; r++) {
                const int j = kr + 8 * r;
                bool ok = j < p.Sk;
                if (partial && ok) ok = la_mask(p, b, h, i, j);
                nib |= (u32)ok << (2 * r + c);
            }
#endif
        }
        keep |= (u64)nib << (4 * jn);
    }
    return keep;
}

// dS^T -> the [key][query] tile in shared memory, 16 queries (kq) a store: d holds the 8 x 8
// blocks (rows krow, query chunk 2 kq), (krow + 8, 2 kq), (krow, 2 kq + 1), (krow + 8, 2 kq + 1)
// of this warp's 16 keys (krow = 64 c + 16 warp + g).
__device__ __forceinline__ void la_bwd_store_ds(u16* sdS, int c, int warp, int lane, int kq, const u32* d) {
    const int srow = c * 64 + warp * 16 + (lane & 7) + (lane & 8);
    la_stsm4(sdS + la_sw128<LA_BC>(srow, 2 * kq + (lane >> 4)), d);
}

// P^T for query columns 8 jn + 2 t4, + 1 (elements 4 jn .. 4 jn + 3; element x: query column
// 8 (x / 4) + 2 t4 + (x & 1), key row + 8 ((x / 2) & 1)) in place of S^T, with L2 from the stage:
// P^T = 2^(S^T scale_log2 - L2), one FFMA and one exponential an element; MASKED: 0 where the
// element's bit in keep is 0. Soft-cap: 2^(cap tanh(S^T / cap) scale_log2 - L2), and dP^T - Delta
// takes the cap's derivative 1 - tanh^2 here (dS^T is then P^T times it).
template <bool MASKED>
__device__ __forceinline__ void la_bwd_p(const LaBwdParams& p, float* s, float* dp, const float* cL, const float* cD,
                                         const la_f2* l2pre, u64 keep, int t4, int jn) {
    const la_f2 l2 = jn < LA_L2PRE ? l2pre[jn] : la_lds2(cL + jn * 8 + 2 * t4);
#if LA_SOFTCAP
    const la_f2 dl = la_lds2(cD + jn * 8 + 2 * t4);
#else
    (void)dp;
    (void)cD;
#endif
#pragma unroll
    for (int e2 = 0; e2 < 4; e2++) {
        const int x = 4 * jn + e2;
        const float l = (e2 & 1) ? l2.y : l2.x;
#if LA_SOFTCAP
        float dcap;
        float y = la_logit(p, s[x], dcap) - l;
        dp[x] = (dp[x] - ((e2 & 1) ? dl.y : dl.x)) * dcap;
#else
        float y = fmaf(s[x], p.scale_log2, -l);
#endif
        if (MASKED && !((keep >> x) & 1)) y = -LA_INF;
#if LA_KNOCK & 4
        (void)y;
#else
        s[x] = la_exp2(y);
#endif
    }
}

// P^T and dS^T of one item from the accumulators s (S^T) and dp (dP^T), packed to bf16 / f16
// pairs as they go (pf for dV, df for dK), dS^T also to the [key][query] tile for dQ (16
// queries a store). dS^T = P^T (dP^T - Delta), without the softmax scale: dK and dQ take it once
// at their stores. MASKED (a uniform branch of the caller: items with masked elements): P^T = 0
// where keep's bit is 0. LA_BWD_SPLITWAIT: P^T is formed first, then the wait for dP^T.
template <bool MASKED>
__device__ __forceinline__ void la_bwd_pds(const LaBwdParams& p, float* s, float* dp, const float* cL,
                                           const float* cD, const la_f2* l2pre, u64 keep, int t4, u32 (*pf)[4],
                                           u32 (*df)[4], u16* sdS, int c, int warp, int lane) {
#if LA_BWD_SPLITWAIT
#pragma unroll
    for (int jn = 0; jn < LA_BR / 8; jn++) la_bwd_p<MASKED>(p, s, dp, cL, cD, l2pre, keep, t4, jn);
    la_wg_wait0();  // dP^T is in
    la_fence_regs<LA_BR / 2>(dp);
#endif
#pragma unroll
    for (int jn = 0; jn < LA_BR / 8; jn++) {
#if !LA_BWD_SPLITWAIT
        la_bwd_p<MASKED>(p, s, dp, cL, cD, l2pre, keep, t4, jn);
#endif
        pf[jn >> 1][(jn & 1) * 2 + 0] = la_pack2(s[4 * jn], s[4 * jn + 1]);
        pf[jn >> 1][(jn & 1) * 2 + 1] = la_pack2(s[4 * jn + 2], s[4 * jn + 3]);
#if !LA_SOFTCAP
        const la_f2 dl = la_lds2(cD + jn * 8 + 2 * t4);
#endif
        float ds[4];
#pragma unroll
        for (int e2 = 0; e2 < 4; e2++) {
            const int x = 4 * jn + e2;
#if LA_KNOCK & 4
            ds[e2] = dp[x];
#elif LA_SOFTCAP
            ds[e2] = s[x] * dp[x];
#else
            ds[e2] = s[x] * (dp[x] - ((e2 & 1) ? dl.y : dl.x));
#endif
        }
        df[jn >> 1][(jn & 1) * 2 + 0] = la_pack2(ds[0], ds[1]);
        df[jn >> 1][(jn & 1) * 2 + 1] = la_pack2(ds[2], ds[3]);
        if (jn & 1) la_bwd_store_ds(sdS, c, warp, lane, jn >> 1, df[jn >> 1]);
    }
}

// TMA descriptors of q, k, v, dO ([B, S, H, D] as boxes {64 columns, rows, 1 head, 1 batch}) and
// the backward parameters.
struct LaBwdWsParams {
    LaTmap tq, tk, tv, tdo;
    LaBwdParams p;
};
static_assert(sizeof(LaBwdWsParams) == 960, "LaBwdWsParams must match cuda/backward.rs");

// Hands a Q / dO stage back to the producer once this thread's (LA_ARRIVE_ALL) or this warp's
// reads of it (products, L2, Delta) are done: the warp barrier orders the other lanes' loads
// before lane 0's arrival.
__device__ __forceinline__ void la_bwd_release(u64* empty, int lane) {
#if LA_ARRIVE_ALL
    (void)lane;
    la_mbar_arrive(empty);
#else
    __syncwarp();
    if (lane == 0) la_mbar_arrive(empty);
#endif
}

// dK += dS^T Q as its own commit group (dS^T from registers, Q N-major: qn, the stage's
// descriptor): the dK-last order issues it after the dQ product.
__device__ __forceinline__ void la_bwd_dk(float* dk, const u32 (*df)[4], u64 qn) {
    la_wg_fence();
#pragma unroll
    for (int kq = 0; kq < LA_BR / 16; kq++) la_wg_rs_d(dk, df[kq], la_desc_add(qn, kq * 16 * 64));
    la_wg_commit();
}

#if LA_BWD_SPLITWAIT
// acc = A B^T for this warpgroup's 64 keys x BR queries: A = K or V (rows = keys), B = Q or dO,
// both K-major, as descriptors of the buffers' starts (issued, not waited for).
__device__ __forceinline__ void la_bwd_kt(float* acc, u64 a, u64 bq, int c) {
#pragma unroll
    for (int kk = 0; kk < LA_D / 16; kk++) {
        const int ka = (kk >> 2) * LA_BC * 64 + c * 64 * 64 + (kk & 3) * 16;
        const int kb = (kk >> 2) * LA_BR * 64 + (kk & 3) * 16;
        la_wg_ss_br(acc, la_desc_add(a, ka), la_desc_add(bq, kb), kk > 0);
    }
}
#endif

extern "C" __global__ void __launch_bounds__(LA_THREADS, 1) la_bwd_wg(const __grid_constant__ LaBwdWsParams w) {
    const LaBwdParams& p = w.p;
    extern __shared__ __align__(1024) u16 la_smem_bw[];
    // The swizzle atoms need 1024-byte alignment in the shared window (the host adds 1 KiB).
    const u32 mis = la_smem_addr(la_smem_bw) & 1023;
    u16* sK = la_smem_bw + (mis ? (1024 - mis) / 2 : 0);
    u16* sV = sK + LA_BC * LA_D;
    u16* sQ0 = sV + LA_BC * LA_D;          // stage st: sQ0 + st * BR * D
    u16* sdO0 = sQ0 + 2 * LA_BR * LA_D;    // stage st: sdO0 + st * BR * D
    // dS^T [BC keys][BR queries] (LA_DS_STAGES stages); consumer c writes its keys' rows.
    u16* sdS0 = sdO0 + 2 * LA_BR * LA_D;
    float* sStg = (float*)(sdS0 + LA_DS_STAGES * LA_BC * LA_BR);  // consumer c: its staged dQ blocks
    float* sLD0 = sStg + LA_NWG * LA_STG_BLOCKS * 4096;            // stage st: L2 [BR], then Delta [BR]
    u64* bars = (u64*)(sLD0 + 2 * 2 * LA_BR);
    u64* full_kv = bars;       // [1]
    u64* full_q = bars + 1;    // [2]: Q, dO, L2, Delta of a stage landed
    u64* empty_q = bars + 3;   // [2]: every consumer warp is done with the stage
    u64* stg_full = bars + 5;  // [LA_NWG] (LA_DQ_WARP): consumer c's dQ partial is staged
    u64* stg_free = bars + 5 + LA_NWG;  // [LA_NWG]: its adds are done, the staging is free
    // The blocks running together walk the same heads' query tiles, so Q, dO and the dQ
    // accumulator's blocks are shared in L2 rather than fetched once per block (la_bwd_block).
    int kt, kh, b;
    la_bwd_block(p, kt, kh, b);
    // Warp-uniform as far as the compiler knows (lane 0's value): operand offsets that depend on
    // the warpgroup stay in uniform registers, next to the wgmma descriptors.
    const int wg = __shfl_sync(0xffffffff, threadIdx.x >> 7, 0);
    const int k0 = kt * LA_BC;
    const i64 koff = b * p.k_sb + kh * p.k_sh;

    if (threadIdx.x == 0) {
        la_mbar_init(full_kv, 1);
#pragma unroll
        for (int st = 0; st < 2; st++) {
            la_mbar_init(full_q + st, 1);
            la_mbar_init(empty_q + st, (LA_ARRIVE_ALL ? 128 : 4) * LA_NWG);  // la_bwd_release
        }
#pragma unroll
        for (int cc = 0; cc < LA_NWG; cc++) {
            la_mbar_init(stg_full + cc, 4);  // one arrival per consumer warp
            la_mbar_init(stg_free + cc, 1);
        }
        la_mbar_fence_init();
    }
    __syncthreads();

    // The (query head, schedule column entry) pairs of this block (bwd_common.cuh). Producer and
    // consumers walk the same list, so item t sits in stage t & 1; its (t >> 1)-th use of the
    // stage waits for parity (t >> 1) & 1. The deterministic mode walks it backwards (last query
    // tile first): under causal and banded masks every block then reaches a query tile in
    // key-tile order, the order of its adds, instead of waiting for the blocks before it.
    // Each role walks the list with its own cursor (la_bwd_walk_*: one step an item).
    const int n_items = la_bwd_items(p, b, kh, kt);
    auto walk_begin = [&]() { return la_bwd_walk_begin<LA_ORDERED>(p, b, kh, kt); };
    auto walk_next = [&](LaBwdWalk& wk) { la_bwd_walk_next<LA_ORDERED>(p, b, kh, kt, wk); };

    if (wg == 0) {
        // Producer: one thread issues every copy. A wait for an "empty" barrier with parity
        // ((t >> 1) & 1) ^ 1 passes at once on a stage's first use.
        la_regs_dec<LA_REG_LOAD>();
#if LA_DQ_WARP
        // Warp 1 + c adds consumer c's staged dQ partials. Deterministic mode: in a fixed order,
        // per dQ tile by (rank of this key tile in the tile's row, consumer), handed on by a
        // counter in global memory (wait for the count to reach ours, add, wait until the adds
        // are complete, count on). A block only waits on blocks of lower key tiles, launched
        // before it, so the chain always progresses. The consumers go on computing meanwhile.
        const int rw = (threadIdx.x >> 5) - 1;
        // LA_KNOCK & 2 (no dQ at all): the consumers stage nothing, so the adders must not wait
        // for partials (they waited forever: that knock hung until the call's timeout).
        if (rw >= 0 && rw < LA_NWG && (LA_KNOCK & 2)) return;
        if (rw >= 0 && rw < LA_NWG && (threadIdx.x & 31) == 0) {
            const float* stg = sStg + rw * LA_STG_BLOCKS * 4096;
            LaBwdWalk wk = walk_begin();
            for (int t = 0; t < n_items; t++) {
                if (t > 0) walk_next(wk);
                const int h = kh * wk.G + wk.hh;
                const u32 ci = wk.ci, ent = p.col_ent[ci];
                const int q0 = (int)(ent >> 1) * LA_BR;
                la_mbar_wait(stg_full + rw, t & 1);
#if LA_ORDERED
                int* sem = la_dq_sem_at(p, b, h, q0);
                const int want = 2 * (int)p.col_rank[ci] + rw;
                while (la_ld_acquire(sem) != want) la_nanosleep(32);
                la_fence_proxy_async_global();  // the adds are ordered after the acquire
                la_dq_add_tile(p, b, h, q0, rw, stg);
                la_bulk_wait<0>();              // the adds are performed
                la_fence_proxy_async_global();  // ... and ordered before the release
                la_st_release(sem, want + 1);
#else
                (void)ci;
#if !(LA_KNOCK & 1)
                la_dq_add_tile(p, b, h, q0, rw, stg);
#endif
                la_bulk_wait_read<0>();  // the staging is read: the consumer may refill it
#endif
                la_mbar_arrive(stg_free + rw);
            }
            la_bulk_wait<0>();
            return;
        }
#endif
        if (threadIdx.x != 0 || n_items == 0) return;
        la_mbar_expect(full_kv, 2 * LA_BC * LA_D * 2);
#pragma unroll
        for (int cb = 0; cb < LA_D / 64; cb++) {
            la_tma_load4(sK + cb * LA_BC * 64, &w.tk, full_kv, cb * 64, k0, kh, b);
            la_tma_load4(sV + cb * LA_BC * 64, &w.tv, full_kv, cb * 64, k0, kh, b);
        }
        LaBwdWalk wk = walk_begin();
        for (int t = 0; t < n_items; t++) {
            const int st = t & 1;
            if (t > 0) walk_next(wk);
            const int h = kh * wk.G + wk.hh;
            const u32 ent = p.col_ent[wk.ci];
            const int q0 = (int)(ent >> 1) * LA_BR;
            la_mbar_wait(empty_q + st, ((t >> 1) & 1) ^ 1);
            // The consumers read L2 / Delta with ordinary loads (generic proxy); order those
            // reads before the bulk copies (async proxy) that refill the stage.
            la_fence_async_smem();
            la_mbar_expect(full_q + st, 2 * LA_BR * LA_D * 2 + 2 * LA_BR * 4);
#pragma unroll
            for (int cb = 0; cb < LA_D / 64; cb++) {
                la_tma_load4(sQ0 + st * LA_BR * LA_D + cb * LA_BR * 64, &w.tq, full_q + st, cb * 64, q0, h, b);
                la_tma_load4(sdO0 + st * LA_BR * LA_D + cb * LA_BR * 64, &w.tdo, full_q + st, cb * 64, q0, h, b);
            }
            const i64 lr = ((i64)b * p.Hq + h) * p.lstride + q0;
            la_bulk_load(sLD0 + st * 2 * LA_BR, p.lse2 + lr, LA_BR * 4, full_q + st);
            la_bulk_load(sLD0 + st * 2 * LA_BR + LA_BR, p.delta + lr, LA_BR * 4, full_q + st);
        }
        return;
    }

    // Consumers.
    la_regs_inc<LA_REG_MMA>();
    const int c = wg - 1;
    const int warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
    const int g = lane >> 2, t4 = lane & 3, tw = threadIdx.x & 127;
    const int krow = c * 64 + warp * 16 + g;  // this thread's keys in the tile: krow, krow + 8
    float* stg = sStg + c * LA_STG_BLOCKS * 4096;
    // Matrix descriptors of the operands at their buffers' starts (stage 0); a product's operand
    // is its base plus an offset (la_desc_add). K-major B of S^T / dP^T: q, o; N-major B of dK /
    // dV: qn, on; dQ: A = dS^T read M-major, B = K N-major.
    const u64 dsc_k = la_wg_desc(sK, 16, 1024), dsc_v = la_wg_desc(sV, 16, 1024);
    const u64 dsc_q = la_wg_desc(sQ0, 16, 1024), dsc_o = la_wg_desc(sdO0, 16, 1024);
    const u64 dsc_qn = la_wg_desc(sQ0, LA_BR * 128, 1024), dsc_on = la_wg_desc(sdO0, LA_BR * 128, 1024);
    const u64 dsc_ds = la_wg_desc(sdS0, LA_BC * 128, 1024), dsc_kn = la_wg_desc(sK, LA_BC * 128, 1024);

    // Accumulators, flat: n8 block j holds elements 4 j .. 4 j + 3 (rows g, g, g + 8, g + 8).
    float dk[LA_D / 2], dv[LA_D / 2];
#pragma unroll
    for (int x = 0; x < LA_D / 2; x++) dk[x] = dv[x] = 0.f;
    if (n_items > 0) la_mbar_wait(full_kv, 0);

    // The item list lives in global memory: item t + 1 is looked up while item t runs, so the
    // loads' latency stays off the path to the mask bits and the dQ add.
    LaBwdWalk wk = walk_begin();
    int h_next = kh * wk.G + wk.hh;
    u32 ent_next = n_items > 0 ? p.col_ent[wk.ci] : 0;
    for (int t = 0; t < n_items; t++) {
        const int st = t & 1;
        const int h = h_next;
        const u32 ent = ent_next;
        if (t + 1 < n_items) {
            walk_next(wk);
            h_next = kh * wk.G + wk.hh;
            ent_next = p.col_ent[wk.ci];
        }
        const bool partial = ent & 1;
        const int q0 = (int)(ent >> 1) * LA_BR;
        const int qoff = st * LA_BR * LA_D;  // stage st of Q and dO, in elements
        const int soff = LA_DQ_MERGE ? st * LA_BC * LA_BR : 0;  // its dS^T tile
        const float* cL = sLD0 + st * 2 * LA_BR;
        const float* cD = cL + LA_BR;
        u16* sdS = sdS0 + soff;
        la_mbar_wait(full_q + st, (t >> 1) & 1);

        // S^T = K Q^T and dP^T = V dO^T (this warpgroup's 64 keys x BR queries). LA_BWD_SPLITWAIT:
        // dP^T as a second commit group, P^T formed while the tensor cores still multiply it.
        float s[LA_BR / 2], dp[LA_BR / 2];
        la_wg_fence();
#if LA_BWD_SPLITWAIT
        la_bwd_kt(s, dsc_k, la_desc_add(dsc_q, qoff), c);
        la_wg_commit();
        la_bwd_kt(dp, dsc_v, la_desc_add(dsc_o, qoff), c);
#else
#pragma unroll
        for (int kk = 0; kk < LA_D / 16; kk++) {
            const int ka = (kk >> 2) * LA_BC * 64 + c * 64 * 64 + (kk & 3) * 16;
            const int kb = (kk >> 2) * LA_BR * 64 + (kk & 3) * 16;
            la_wg_ss_br(s, la_desc_add(dsc_k, ka), la_desc_add(dsc_q, qoff + kb), kk > 0);
            la_wg_ss_br(dp, la_desc_add(dsc_v, ka), la_desc_add(dsc_o, qoff + kb), kk > 0);
        }
#endif
        la_wg_commit();
        // Keys past Sk or query rows past Sq in the tile: masked explicitly (the padded L2 and
        // Delta would give 0 there as well); the bits are formed while the products run.
        const bool masked = partial || k0 + LA_BC > p.Sk || q0 + LA_BR > p.Sq;
        const u64 keep = masked ? la_bwd_keep(p, b, h, q0, k0 + krow, t4, partial) : 0;
        la_f2 l2pre[LA_L2PRE > 0 ? LA_L2PRE : 1];
#pragma unroll
        for (int jn = 0; jn < LA_L2PRE; jn++) l2pre[jn] = la_lds2(cL + jn * 8 + 2 * t4);
#if LA_BWD_SPLITWAIT
        la_wg_wait1();  // S^T is in; dP^T may still run
#else
        la_wg_wait0();
        la_fence_regs<LA_BR / 2>(dp);
#endif
        la_fence_regs<LA_BR / 2>(s);
        u32 pf[LA_BR / 16][4], df[LA_BR / 16][4];
        if (masked)
            la_bwd_pds<true>(p, s, dp, cL, cD, l2pre, keep, t4, pf, df, sdS, c, warp, lane);
        else
            la_bwd_pds<false>(p, s, dp, cL, cD, l2pre, keep, t4, pf, df, sdS, c, warp, lane);

        // dV += P^T dO, dK += dS^T Q: 16 queries a step; Q's and dO's 8-row groups are 1024
        // bytes apart, their 64-column blocks BR x 128 bytes apart. LA_BWD_DKLAST: dK is issued
        // after the dQ product instead, so that it runs while dQ is staged and added.
        la_fence_regs<LA_D / 2>(dv);
        la_fence_regs<LA_D / 2>(dk);
        la_wg_fence();
#pragma unroll
        for (int kq = 0; kq < LA_BR / 16; kq++) {
            la_wg_rs_d(dv, pf[kq], la_desc_add(dsc_on, qoff + kq * 16 * 64));
#if !LA_BWD_DKLAST
            la_wg_rs_d(dk, df[kq], la_desc_add(dsc_qn, qoff + kq * 16 * 64));
#endif
        }
        la_wg_commit();
#if LA_KNOCK & 2
        if (LA_BWD_DKLAST) la_bwd_dk(dk, df, la_desc_add(dsc_qn, qoff));
        la_wg_wait0();
        la_fence_regs<LA_D / 2>(dv);
        la_fence_regs<LA_D / 2>(dk);
        la_bwd_release(empty_q + st, lane);
        continue;
#endif

        // dQ partial over this warpgroup's 64 keys, two 64 x 64 blocks, 16 keys a step. The
        // staging buffers are free once the previous item's reductions have read them
        // (LA_DQ_WARP: each thread waits for that just before it stages).
        la_fence_async_smem();  // dS^T stores -> visible to the tensor cores
#if !LA_DQ_RED && !LA_DQ_WARP
        if (tw == 0) la_bulk_wait_read<0>();
#endif
#if LA_DQ_MERGE && !(LA_KNOCK & 16)
        la_bar_sync(1 + LA_NWG, 128 * LA_NWG);  // both consumers' dS^T rows are in; staging is free
#else
        la_bar_sync(1 + c, 128);  // the warpgroup's dS^T rows are in; staging is free
#endif
#pragma unroll
        for (int x = 0; x < LA_STG_BLOCKS; x++) {
            // Block blk of dQ over keys kb0 .. kb0 + LA_DQ_KEYS - 1 of the tile.
            const int blk = LA_DQ_MERGE ? c : x;
            const int qr0 = LA_DQ_ROWSPLIT ? 64 * blk : 0, dc0 = LA_DQ_ROWSPLIT ? 0 : 64 * blk;
            constexpr int LA_DQ_KEYS = LA_DQ_MERGE ? LA_BC : 64;
            const int kb0 = LA_DQ_MERGE ? 0 : c * 64;
            float dq[32];
            la_wg_fence();
#pragma unroll
            for (int ks = 0; ks < LA_DQ_KEYS / 16; ks++) {
                const int kr = (kb0 + ks * 16) * 64;
                const u64 da = la_desc_add(dsc_ds, soff + (qr0 >> 6) * LA_BC * 64 + kr);
                const u64 db = la_desc_add(dsc_kn, (dc0 >> 6) * LA_BC * 64 + kr);
                la_wg_sst_n64(dq, da, db, ks > 0);
            }
            la_wg_commit();
#if LA_BWD_DKLAST
            la_bwd_dk(dk, df, la_desc_add(dsc_qn, qoff));
            la_wg_wait1();  // dV and dQ are in; dK may still run
            la_fence_regs<32>(dq);
            la_fence_regs<LA_D / 2>(dv);
#else
            la_wg_wait0();
            la_fence_regs<32>(dq);
            if (x == 0) {
                la_fence_regs<LA_D / 2>(dv);
                la_fence_regs<LA_D / 2>(dk);
                // Every read of stage st (products, L2, Delta) is done: back to the producer.
                // compute-sanitizer racecheck does not follow the warp barrier of the default
                // hand-back and reports the refill racing the L2 / Delta loads (it reports the
                // same for scripts/gpu/racecheck_repro.cu, and nothing once every thread arrives
                // itself: LA_ARRIVE_ALL).
                la_bwd_release(empty_q + st, lane);
            }
#endif
#if LA_DQ_RED && !(LA_KNOCK & 1)
            float* acc = p.dq_acc + la_dq_acc_at(p, b, h, q0 + qr0, dc0);
#pragma unroll
            for (int j = 0; j < 8; j++) la_red_add4(acc + (j * 128 + tw) * 4, dq + 4 * j);
#elif !LA_DQ_RED
#if LA_DQ_WARP
            if (x == 0 && t > 0) la_mbar_wait(stg_free + c, (t - 1) & 1);  // the adder has read it
#endif
#pragma unroll
            for (int j = 0; j < 8; j++) la_sts4(stg + x * 4096 + (j * 128 + tw) * 4, dq + 4 * j);
#endif
        }
#if !LA_DQ_WARP && !LA_DQ_RED
        la_fence_async_smem();  // staging stores -> visible to the bulk copies
        la_bar_sync(1 + c, 128);
#if !(LA_KNOCK & 1)
        if (tw == 0) la_dq_add_tile(p, b, h, q0, c, stg);
#endif
#endif
#if LA_BWD_DKLAST
        la_wg_wait0();  // dK is in: every read of stage st is done
        la_fence_regs<LA_D / 2>(dk);
#endif
#if LA_DQ_WARP
        // Hand the staged partial to the adder: each thread's stores made visible to the bulk
        // copies, then one arrival per warp (the warp barrier orders the lanes' stores first).
        // With dK last this comes after dK's wait, so the stores complete under that product
        // rather than stalling the fence (Nsight Compute: ~5% of the samples there before).
        la_fence_async_smem();
        __syncwarp();
        if (lane == 0) la_mbar_arrive(stg_full + c);
#endif
#if LA_BWD_DKLAST
        la_bwd_release(empty_q + st, lane);  // stage st back to the producer
#endif
    }
    if (tw == 0) la_bulk_wait<0>();  // shared memory outlives the reductions

    // dK (times the softmax scale) and dV of this warp's 16 keys, written as whole rows through
    // shared memory (la_warp_store_rows): dK through the Q stages, dV through the dO stages (each
    // holds the tile's LA_BC x D 16-bit values), free once both consumers' last products are in
    // (the barrier). Keys past Sk are not written.
    la_bar_sync(1 + LA_NWG, 128 * LA_NWG);
    const int r0 = c * 64 + warp * 16;
    const float dk_mul[2] = {p.scale, p.scale}, dv_mul[2] = {1.f, 1.f};
    auto key = [&](int row) { return k0 + r0 + row; };
    la_warp_store_rows<LA_BC>(dk, dk_mul, sQ0, r0, lane, p.dk + koff, p.k_ss, key, p.Sk, LA_D);
    la_warp_store_rows<LA_BC>(dv, dv_mul, sdO0, r0, lane, p.dv + koff, p.k_ss, key, p.Sk, LA_D);
}
