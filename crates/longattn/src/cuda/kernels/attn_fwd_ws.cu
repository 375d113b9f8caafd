// Fused attention forward on Hopper, warp-specialized (sm_90a): the FlashAttention-3 recipe on
// longattn's block schedule.
//
// Same contract, schedule walk, masking and online softmax as attn_fwd_wg.cu; what changes is who
// waits for whom:
//   - warpgroup 0 is the producer: one thread walks the schedule row and issues TMA box copies
//     (Q once, then K and V of every listed key tile) into a two-stage ring; each stage has a
//     "full" mbarrier (the TMA's bytes landed) and an "empty" one (every consumer warp is done
//     with it). It gives its registers away (setmaxnreg) to the consumers.
//   - warpgroups 1 .. LA_NWG are consumers, 64 query rows each (BR = 64 LA_NWG), with the
//     wgmma fragments of attn_fwd_wg.cu. Per key tile n they
//         issue  S_n = Q K_n^T            (async)
//         issue  O  += P_{n-1} V_{n-1}     (async, P from registers)
//         wait for S_n; mask, online softmax -> P_n (the previous P V still runs)
//         wait for the P V; rescale O by exp2(m_old - m_new)
//     so the exponentials of tile n overlap the tensor cores' P V of tile n - 1 (intra-warpgroup
//     overlap), and the consumers take turns issuing their matrix products (ping-pong on named
//     barriers 1 .. LA_NWG), so one warpgroup's softmax overlaps another's products.
// Q has two stages too (LA_QST; one at D 256, where two would not fit shared memory, given back
// early: LA_Q_EARLY), so the next item's Q lands while the current item runs.
// Shared-memory tiles use the 128-byte swizzle of attn_fwd_wg.cu, which is what the TMA writes
// with CU_TENSOR_MAP_SWIZZLE_128B and a box of 64 columns: a [R][D] tile is D / 64 boxes of
// [R][64], each 1024-byte aligned. Rows past Sq / Sk arrive as zeros (TMA out-of-bounds fill).
//
// Blocks are persistent (one or two per SM, LA_MINB): each walks its list of work items (query
// tile, batch, head), built on the host for L2 reuse and balance (ws_work_list in forward.rs), so
// the producer loads the next item's Q, K and V while the consumers still finish (softmax tail,
// output stores) the current one.
//
// Patch order (LA_PATCH = 1, 2-D neighborhoods; mask/patch.rs, tile_tokens.cuh): the producer
// loads a query or key tile as one 5-D box of the grid (PH rows of PW tokens, the tile's rows in
// patch order); the mask is the plan's bit table (LA_MASK_BITS), the stores go to la_qtok's tokens.
//
// Skip-softmax (LA_SKIP = 1; BLASST, AttnParams::skip_below = lambda): after S_n (n >= 1) each
// consumer warp votes (one __all_sync) whether every one of its 16 rows has nothing allowed in
// the tile, lies past Sq, or has a reference maximum m with every allowed logit below it by more
// than -log2 lambda (2^(y - m) < lambda); a row with no reference yet (m = -inf) or a NaN logit
// votes no. A warp that votes yes drops the tile for its rows: no exponentials, zero P, m and l
// as they were. The votes go to shared memory (a byte per warp, two slots by tile parity); at the
// next tile's ping-pong barrier, which all four warps of the warpgroup must reach, each reads the
// four and issues P_n V_n (a warpgroup-wide wgmma) unless all four dropped the tile (after the last
// tile, and with one consumer warpgroup, a named barrier 8 + c of the warpgroup does the same).
// No extra barrier per tile with two or more consumers. The dropped tile's V is still loaded (the
// producer runs ahead of the decision) and its stages released as usual. With the `fused`
// softmax m is the row's running maximum, as in the CPU forward's rule; `lazy` (a reference that
// may lag by up to LA_SLACK) makes the test stricter, never looser. Counters {tiles tested, P V
// dropped} per warpgroup go to skip_stats once per block.
//
// Pooled attention map (LA_MAP = 1; crate::AttnMap, SeerAttention's training target): with
// p_ij = 2^(y_ij - L_i) (log2 units, L_i the row's final log-sum-exp)
//     mass[qb, kb] = 1/|qb| sum_{i in qb} sum_{j in kb} p_ij,   max[qb, kb] = max p_ij
// over blocks of map_block rows and keys (a multiple of 64). L_i is known only after the row's
// last tile, so per tile a consumer keeps, for each row and 64-key group x of the tile, from the
// softmax's own p~_ij = 2^(y_ij - u_i) (u_i the row's reference when the tile ran)
//     A = u_i + log2 sum_{j in x} p~_ij,   B = u_i + log2 max_{j in x} p~_ij
// in a scratch region of its own (la_map_tile: a few adds and shuffles per tile, no exponential);
// after the epilogue has written the LSE, the warpgroup reads its rows' L_i back and adds
// sum_i 2^(A - L_i) / |qb| and max_i 2^(B - L_i) into the map (la_map_pool: one exponential per
// row and group, atomics at L2, so the mass's summation order over warpgroups is not fixed).
// Since 2^(A - L_i) = sum_{j in x} 2^(y_ij - L_i) exactly, the map is the forward's own
// probabilities; a tile skip-softmax drops counts 0.
//
// Gathered keys (LA_GATHER = 1; sparse/gather.rs): an entry with bit 31 set is not a key tile
// but chunk x = (entry >> 1) & (2^30 - 1) of the key list w.gkeys: the keys gkeys[x BC ..
// x BC + BC), in any order, each allowed for every row of the query tile (entry bit 0 clear) or
// to be tested per element with the mask program (bit 0 set; the list's padding, INT_MAX, is
// then masked as a key past Sk). The producer warpgroup splits in two sides of 64 threads, one
// for K and one for V, each on its own ring of stages: a side copies the chunk's rows 16 bytes a
// thread (cp.async, rows past Sk as zeros) into the layout the TMA writes, and each thread's
// copies count on the stage's "full" barrier (cp.async.mbarrier.arrive adds a pending arrival
// at once and completes it when they land; the side's first thread's own arrival, after a named
// barrier of the 64, is the one the barrier expects). Every thread of a side waits for every
// stage of its ring, the TMA tiles' too (a parity wait tells only one phase from the next), and
// the side's first thread issues its TMA tiles. Those writes are the generic
// proxy's, the tensor cores read through the async proxy: consumers fence the two after each
// wait for a stage. From there a chunk is a tile like any other.
//
// Compile-time constants: LA_F16, LA_D (64, 128 or 256), LA_BC (64 or 128), LA_NWG (consumer
// warpgroups: 1..3), LA_MINB, LA_SOFTCAP, LA_SKIP, LA_MAP, LA_GATHER, and the mask program la_mask.
//
// D 256 (two consumers, 64-key tiles): O takes 128 registers a thread, P V is one m64n256k16
// product per 16 keys; shared memory holds one Q stage (64 KiB) and two of K and V (32 KiB each).
// Other head dims (multiples of 16) run padded to the next of 64 / 128 / 256 (LA_DO: the tensor's
// head dim): the TMA fills the columns past it with zeros, which add nothing to Q K^T and give
// zero columns of O, which the epilogue does not write.

#ifndef LA_BR
#define LA_BR (LA_NWG * 64)
#endif
#ifndef LA_SKIP
#define LA_SKIP 0
#endif
// LA_SKIP_LATE (opt-in, LONGATTN_CUDA_SKIP_VOTES=late): the votes on tile n - 1 are read after
// S_n is issued rather than before, taking the shared-memory read and its shuffle off the path
// to the tensor cores.
#ifndef LA_SKIP_LATE
#define LA_SKIP_LATE 0
#endif
#if LA_D == 256 && LA_SKIP
// D 256 reads the votes late: read early, they spill 40 bytes (ptxas, 240 registers).
#undef LA_SKIP_LATE
#define LA_SKIP_LATE 1
#endif
#define LA_THREADS ((LA_NWG + 1) * 128)
#if LA_D != 64 && LA_D != 128 && LA_D != 256
#error "attn_fwd_ws.cu: LA_D must be 64, 128 or 256"
#endif
#if LA_D == 256 && (LA_BC != 64 || LA_NWG != 2)
#error "attn_fwd_ws.cu: D 256 takes two consumers and 64-key tiles (registers, shared memory)"
#endif
#define LA_QST (LA_D == 256 ? 1 : 2)  // Q stages
// LA_O_STAGE (1: the host's default up to D 128; LONGATTN_CUDA_FWD_OSTAGE=0 gives 0; two Q
// stages only): the epilogue writes O / l through the item's Q stage (la_ws_store_staged)
// instead of from registers (la_wg_store: a warp store puts 16 bytes in each of 8 rows), and the
// stage goes back to the producer after it (H100: D 128 +0.3% to +5.8%, docs/PERF.md).
#ifndef LA_O_STAGE
#define LA_O_STAGE 0
#endif
#if LA_O_STAGE && LA_QST != 2
#error "LA_O_STAGE: the staging is the item's Q stage, which one Q stage gives back early"
#endif
// With one Q stage a consumer warp gives it back once the item's last S = Q K^T is in registers,
// so the next item's Q loads during the last P V and the epilogue; with two it goes back after
// the item's last P V.
#define LA_Q_EARLY (LA_QST == 1)
// Stage and use count of the n-th item's Q (n >= 0; bit operations with two stages).
#define LA_QSTAGE(n) (LA_QST == 1 ? 0 : (n) & 1)
#define LA_QUSE(n) (LA_QST == 1 ? (n) : (n) >> 1)
// Register split (65536 per SM, one block per SM): consumers get what the producer gives up.
#if LA_NWG == 3
#define LA_REG_MMA 160
#define LA_REG_LOAD 32
#elif LA_NWG == 1 && LA_MINB == 2
// Two blocks of 256 threads per SM: 32768 registers each.
#define LA_REG_MMA 232
#define LA_REG_LOAD 24
#else
#define LA_REG_MMA 240
#define LA_REG_LOAD 24
#endif
// The gathered-key variant (LA_GATHER): the producer warpgroup's walk with its copies, unrolled
// four steps (la_ws_gather), takes 48 registers; the consumers give up 16 (two consumers: 128 x
// 48 + 256 x 224 = 63488 a block) or 24 (one consumer, two blocks per SM: 128 x 48 + 128 x 208
// = 32768 a block). At D 256 the consumers need 232 (O alone is 128), so the producers keep 40
// and copy one step at a time. Three consumers (D 64) are not taken with it (the host plans two).
#if LA_GATHER
#if LA_NWG == 3
#error "LA_GATHER: three consumer warpgroups leave the producers too few registers"
#endif
#undef LA_REG_MMA
#undef LA_REG_LOAD
#if LA_D == 256
#define LA_REG_MMA 232
#define LA_REG_LOAD 40
#define LA_GATHER_UNROLL 1
#elif LA_NWG == 1 && LA_MINB == 2
#define LA_REG_MMA 208
#define LA_REG_LOAD 48
#else
#define LA_REG_MMA 224
#define LA_REG_LOAD 48
#endif
#endif

#if LA_BC == 64
#define la_wg_ss_bc la_wg_ss_n64
#else
#define la_wg_ss_bc la_wg_ss_n128
#endif

// TMA descriptors of q, k, v ([B, S, H, D] as 4-D boxes {64 columns, rows, 1 head, 1 batch}) and
// the parameters every forward kernel takes.
struct LaWsParams {
    LaTmap tq, tk, tv;
    LaFwdParams p;
    // The blocks' work lists (cuda/forward.rs, ws_work_list): work[x] .. work[x + 1] are block
    // x's entries in work[grid + 1 ..], each an item (b Hq + h) q_tiles + qt, in the order run.
    const u32* work;
    // Skip-softmax (LA_SKIP): counters {tiles tested, tiles dropped} (null: not counted) and the
    // threshold log2 lambda.
    unsigned long long* skip_stats;
    float skip_log2;
    // Pooled attention map (LA_MAP): the per-row scratch (per block and consumer, map_cap slots
    // of 64 rows of (A, B)), the maps [B, Hq, map_qb, map_kb] (zeroed by the host), the block.
    float2* map_scratch;
    float* map_mass;
    float* map_max;
    int map_block, map_qb, map_kb, map_cap;
    // Gathered keys (LA_GATHER): the chunks' key lists, LA_BC keys a chunk.
    const u32* gkeys;
};
static_assert(sizeof(LaWsParams) == 896, "LaWsParams must match cuda/forward.rs");

#ifndef LA_MAP
#define LA_MAP 0
#endif
#ifndef LA_GATHER
#define LA_GATHER 0
#endif
#if LA_GATHER && (LA_MAP || LA_PATCH || LA_MASK_BITS)
#error "LA_GATHER: chunks are not key tiles (no map slots, no patch order, no bit-table tile)"
#endif
#define LA_GATHERED(e) (LA_GATHER && ((e) >> 31))
#ifndef LA_GATHER_WAIT
#define LA_GATHER_WAIT 0
#endif
// Timing diagnostic (results wrong): 1 the chunks' copies left out, 2 issued but not waited for.
#ifndef LA_GATHER_DIAG
#define LA_GATHER_DIAG 0
#endif
#define LA_CHUNK(e) ((e) >> 1 & 0x3fffffffu)
#if LA_MAP && LA_PATCH
#error "LA_MAP: the map pools rows and keys in row order"
#endif
#define LA_MAP_NG (LA_BC / 64)   // 64-key groups of a key tile
// Timing experiments only (LONGATTN_CUDA_MAP_PARTS; the map is wrong without both): bit 0 the
// per-tile statistics, bit 1 the pool.
#ifndef LA_MAP_PARTS
#define LA_MAP_PARTS 3
#endif

// Tile n's (A, B) of this thread's rows g and g + 8 for each 64-key group (header), from the
// softmax step's own per-thread group sums of p~ (gs) and group maxima of s (gm: c s is the logit
// in log2 units, so B is the group's largest logit itself); `live` false (a tile skip-softmax
// dropped): (-inf, -inf). slot = the consumer's region plus n LA_MAP_NG 64 + 16 warp.
__device__ __forceinline__ void la_map_tile(float2* slot, const float* gm, const float* gs, float c, float m0,
                                            float m1, bool live, int lane) {
    if (!(LA_MAP_PARTS & 1)) return;
    const int g = lane >> 2, t4 = lane & 3;
    const float u0 = m0 == -LA_INF ? 0.f : m0, u1 = m1 == -LA_INF ? 0.f : m1;
#pragma unroll
    for (int x = 0; x < LA_MAP_NG; x++) {
        float s0 = gs[x], s1 = gs[LA_MAP_NG + x], x0 = gm[x], x1 = gm[LA_MAP_NG + x];
#pragma unroll
        for (int o = 1; o <= 2; o <<= 1) {
            s0 += __shfl_xor_sync(0xffffffff, s0, o);
            s1 += __shfl_xor_sync(0xffffffff, s1, o);
            x0 = fmaxf(x0, __shfl_xor_sync(0xffffffff, x0, o));
            x1 = fmaxf(x1, __shfl_xor_sync(0xffffffff, x1, o));
        }
        if (t4 == 0) {
            float2* d = slot + x * 64 + g;
            d[0] = live ? make_float2(u0 + __log2f(s0), x0 * c) : make_float2(-LA_INF, -LA_INF);
            d[8] = live ? make_float2(u1 + __log2f(s1), x1 * c) : make_float2(-LA_INF, -LA_INF);
        }
    }
}
#if LA_MAP && LA_WG_NG != LA_MAP_NG
#error "LA_MAP: the softmax step's groups (wg_softmax.cuh) must be the map's"
#endif

// After the epilogue of an item with nt > 0 tiles (header): the warpgroup's 64 rows (first
// row row0 = qt BR + 64 c) from its region into the map. Warp w takes the slots w, w + 4, ...;
// lane l rows l and l + 32. Rows past Sq and rows without keys (L = -inf) add nothing. Barrier
// 12 + c brackets it: the LSE and every slot are in before the reads, and the reads are done
// before the next item writes the region again.
__device__ __forceinline__ void la_map_pool(const LaWsParams& w, const float2* region, int nt, u32 e0, int b, int h,
                                            int row0, int c, int warp, int lane) {
    const LaFwdParams& p = w.p;
    if (!(LA_MAP_PARTS & 2)) return;
    __threadfence_block();
    la_bar_sync(12 + c, 128);
    float L[2];
#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
        const int i = row0 + lane + 32 * hf;
        const float lse = i < p.Sq ? p.lse[((i64)b * p.Hq + h) * p.Sq + i] : -LA_INF;
        L[hf] = lse * LA_LOG2E;   // -inf: the row adds nothing
    }
    const int qb = row0 / w.map_block;
    const float inv_rows = 1.f / (float)la_imin(w.map_block, p.Sq - qb * w.map_block);
    const int ns = nt * LA_MAP_NG;
    // U slots a warp at a time, every load issued before the first use (the loads are
    // L2 round trips; one at a time they were most of the map's cost).
    constexpr int U = LA_NWG == 3 ? 4 : 8;   // (three consumers: 160 registers a thread)
    for (int x0 = warp; x0 < ns; x0 += 4 * U) {
        float2 v[U][2];
        u32 ent[U];
#pragma unroll
        for (int k = 0; k < U; k++) {
            const int x = x0 + 4 * k;
            v[k][0] = v[k][1] = make_float2(-LA_INF, -LA_INF);
            ent[k] = 0;
            if (x < ns) {
                v[k][0] = region[x * 64 + lane];
                v[k][1] = region[x * 64 + lane + 32];
                ent[k] = p.sched_ent[e0 + x / LA_MAP_NG];
            }
        }
#pragma unroll
        for (int k = 0; k < U; k++) {
            const int x = x0 + 4 * k;
            float sum = 0.f, mx = 0.f;
#pragma unroll
            for (int hf = 0; hf < 2; hf++) {
                if (L[hf] != -LA_INF) {
                    sum += la_exp2(v[k][hf].x - L[hf]);
                    mx = fmaxf(mx, la_exp2(v[k][hf].y - L[hf]));
                }
            }
#pragma unroll
            for (int o = 16; o >= 1; o >>= 1) {
                sum += __shfl_xor_sync(0xffffffff, sum, o);
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, o));
            }
            const int key = (int)(ent[k] >> 1) * LA_BC + 64 * (x % LA_MAP_NG);
            if (lane == 0 && x < ns && key < p.Sk) {
                const i64 at = (((i64)b * p.Hq + h) * w.map_qb + qb) * w.map_kb + key / w.map_block;
                if (sum > 0.f) atomicAdd(w.map_mass + at, sum * inv_rows);
                if (mx > 0.f) atomicMax((int*)(w.map_max + at), __float_as_int(mx));   // p >= 0: int order
            }
        }
    }
    la_bar_sync(12 + c, 128);
}

// LA_DESC_ADD (1: the host's default; LONGATTN_CUDA_FWD_DESC=address gives 0): each product's
// operand descriptors are the buffer's descriptor plus an offset (la_desc_add, one add) instead of
// being formed from the address per wgmma, and the warpgroup index is read warp-uniformly so that
// offsets depending on it stay in uniform registers (H100: +1% to +6%, docs/PERF.md).
#ifndef LA_DESC_ADD
#define LA_DESC_ADD 0
#endif

#if LA_O_STAGE
// Epilogue through shared memory: O / l of this warp's 16 rows (tile rows r0 .. r0 + 15,
// r0 = 64 c + 16 warp) through the rows' slice of the item's Q stage (free: every Q K^T of the
// item has completed) by la_warp_store_rows (16-byte stores of whole rows: four rows of 128 bytes
// a warp store at D 64, two of 256 at D 128), and their LSE (la_wg_row_lse). Rows past Sq and
// columns past LA_DO are not written. The caller fences the generic accesses before handing the
// stage back.
template <typename P>
__device__ __forceinline__ void la_ws_store_staged(const P& p, const float* o, float l0, float l1, float m0, float m1,
                                                   int b, int h, int qt, int r0, u16* sQ, int lane) {
    const int g = lane >> 2, t4 = lane & 3;
    float inv[2];
    la_wg_row_lse(p, l0, l1, m0, m1, b, h, [&](int hf) { return la_qtok(qt, r0 + g + 8 * hf); }, t4, inv);
    u16* go = p.o + b * p.o_sb + h * p.o_sh;
    la_warp_store_rows<LA_BR>(o, inv, sQ, r0, lane, go, p.o_ss, [&](int row) { return la_qtok(qt, r0 + row); }, p.Sq,
                              LA_DO);
}
#endif

// S = Q K^T for this warpgroup's 64 rows (issued, not waited for).
__device__ __forceinline__ void la_ws_qk(float* s, const u16* sQ, const u16* sK, int c) {
#if LA_DESC_ADD
    const u64 dq = la_wg_desc(sQ, 16, 1024), dk = la_wg_desc(sK, 16, 1024);
#endif
#pragma unroll
    for (int kk = 0; kk < LA_D / 16; kk++) {
#if LA_DESC_ADD
        const int qo = (kk >> 2) * LA_BR * 64 + c * 64 * 64 + (kk & 3) * 16;
        const int ko = (kk >> 2) * LA_BC * 64 + (kk & 3) * 16;
        la_wg_ss_bc(s, la_desc_add(dq, qo), la_desc_add(dk, ko), kk > 0);
#else
        const u64 da = la_wg_desc(sQ + (kk >> 2) * LA_BR * 64 + c * 64 * 64 + (kk & 3) * 16, 16, 1024);
        const u64 db = la_wg_desc(sK + (kk >> 2) * LA_BC * 64 + (kk & 3) * 16, 16, 1024);
        la_wg_ss_bc(s, da, db, kk > 0);
#endif
    }
}

// O += P V, 16 keys a step (issued, not waited for). V is the N-major operand: 8-key groups 1024
// bytes apart, 64-column blocks BC x 128 bytes apart.
__device__ __forceinline__ void la_ws_pv(float* o, const u32 (*pf)[4], const u16* sV) {
#if LA_DESC_ADD
    const u64 dv = la_wg_desc(sV, LA_BC * 128, 1024);
#pragma unroll
    for (int ks = 0; ks < LA_BC / 16; ks++) la_wg_rs_d(o, pf[ks], la_desc_add(dv, ks * 16 * 64));
#else
#pragma unroll
    for (int ks = 0; ks < LA_BC / 16; ks++) la_wg_rs_d(o, pf[ks], la_wg_desc(sV + ks * 16 * 64, LA_BC * 128, 1024));
#endif
}

// Skip-softmax's vote of this thread's rows (g, g + 8) on a tile with row maxima mx (log2
// units, NaN if a logit is NaN) against references m and threshold t = log2 lambda; rows past Sq
// (pad) always agree.
__device__ __forceinline__ bool la_skip_rows(float mx0, float mx1, float m0, float m1, float t, bool pad0,
                                             bool pad1) {
    const bool r0 = pad0 || mx0 == -LA_INF || (m0 != -LA_INF && mx0 < m0 + t);
    const bool r1 = pad1 || mx1 == -LA_INF || (m1 != -LA_INF && mx1 < m1 + t);
    return r0 && r1;
}

// Whether all four warps' votes in `slot` (a byte each) are yes. Every thread reads the same
// word; read back through a shuffle from lane 0 the compiler knows it is warp-uniform, so a wgmma
// under it stays asynchronous (a branch on a value ptxas cannot prove uniform serializes every
// wgmma of the kernel: C7519).
__device__ __forceinline__ bool la_votes_all(const u32* slot) {
    const u32 w = *(const volatile u32*)slot;
    return __shfl_sync(0xffffffffu, w, 0) == 0x01010101u;
}

// A zero P (a warp's dropped tile, when the warpgroup's P V still runs).
__device__ __forceinline__ void la_wg_zero(u32 (*pf)[4]) {
#pragma unroll
    for (int j = 0; j < LA_BC / 16; j++) pf[j][0] = pf[j][1] = pf[j][2] = pf[j][3] = 0u;
}

// In patch order the host builds the bit table whenever there are Partial tiles (the element
// program below takes row-order tokens); Full tiles need no mask (patch tiles cover the grid).
#if !LA_PATCH
#define LA_QPH 1
#define LA_QPW LA_BR
#define LA_KPH 1
#define LA_KPW LA_BC
#endif
// 64 columns (from c0) of tile t (R rows) of a head: rows t R .. t R + R - 1 (a 4-D box of the
// row map), or in patch order the t-th PH x PW patch of the grid (a 5-D box of the patch map,
// which lands as PH rows of PW tokens: tile row r is la_patch_tok(t, r)).
template <int R, int PH, int PW>
__device__ __forceinline__ void la_ws_tma_tile(u16* dst, const LaTmap* map, u64* bar, int c0, int t, int h, int b) {
#if LA_PATCH
    constexpr int per = LA_PW / PW;
    la_tma_load5(dst, map, bar, c0, (t % per) * PW, (t / per) * PH, h, b);
#else
    la_tma_load4(dst, map, bar, c0, t * R, h, b);
#endif
}

// Work item t = (b Hq + h) q_tiles + qt. Which block runs it, and when, is the host's list
// (ws_work_list): heads in groups whose keys and values fit L2, each group's query tiles
// heaviest first, every item to the block with the least work so far.
__device__ __forceinline__ void la_ws_item(const LaFwdParams& p, u32 t, int& qt, int& h, int& b) {
    qt = (int)(t % (u32)p.q_tiles);
    const int bh = (int)(t / (u32)p.q_tiles);
    h = bh % p.Hq;
    b = bh / p.Hq;
}

#if LA_MASK_BITS
// Rows rl and rl + 8 of a Partial tile's mask bits (entry e; mask_bits.cu), shifted so that bit
// 8 (jj & 3) + c of word jj / 4 is key 8 jj + 2 t4 + c (c = 0, 1) of this thread's fragment.
// Loaded before the wait for S, so the loads overlap the tensor cores.
__device__ __forceinline__ void la_ws_bits(const LaFwdParams& p, u32 e, bool partial, int rl, int t4, u32* w) {
    if (!partial) return;
    const u32* t = p.mbits + (i64)p.mbix[e] * (LA_BR * LA_BC / 32) + rl * (LA_BC / 32);
#pragma unroll
    for (int x = 0; x < LA_BC / 32; x++) {
        w[x] = t[x] >> (2 * t4);
        w[LA_BC / 32 + x] = t[8 * (LA_BC / 32) + x] >> (2 * t4);
    }
}
#endif

// Logits in log2 units (or, with the fused softmax, raw: it applies the scale), soft-capped.
__device__ __forceinline__ void la_ws_scale(float* s, const LaFwdParams& p) {
#pragma unroll
    for (int x = 0; x < LA_BC / 2; x++) {
        float y = s[x];
#if LA_SOFTCAP
        y = p.cap_post * tanhf(y * p.cap_pre);
#endif
#if LA_FUSED_SCALE
        s[x] = y;  // the softmax applies the scale (wg_softmax.cuh)
#else
        s[x] = y * p.scale_log2;
#endif
    }
}

// Logits in log2 units with soft-cap and mask (Partial tiles and keys past Sk) applied in place.
// Element x of the accumulator: row `rowbase + 8 ((x >> 1) & 1)`, key `k0 + 8 (x >> 2) + 2 t4 + (x & 1)`.
// The mask is evaluated in a mostly rolled loop into one bit per element, then applied: an
// unrolled mask program (BC / 2 copies of it) made the main loop too large for the instruction
// cache (ncu, causal D 64: 2.9 of 8 cycles per instruction waiting for fetch; causal 16k D 64
// went from 283 to 438 TFLOP/s without it).
__device__ __forceinline__ void la_ws_logits(float* s, const LaFwdParams& p, int b, int h, int rowbase, int t4,
                                             int k0, bool partial, const u32* mw) {
    (void)mw;
    la_ws_scale(s, p);
#if LA_MASK_INTERVAL
    // Masks that allow one interval of keys per row: two bounds per row, two compares per
    // element (the unrolled compares are small enough for the instruction cache).
    if (partial || k0 + LA_BC > p.Sk) {
        int lo[2], hi[2];
#pragma unroll
        for (int r = 0; r < 2; r++) {
            const int i = rowbase + 8 * r;
            lo[r] = 0;
            hi[r] = p.Sk - 1;
            if (partial) {
                int a, z;
                la_mask_interval(p, b, h, i, a, z);
                lo[r] = la_imax(a, 0);
                hi[r] = la_imin(z, hi[r]);
            }
            if (i >= p.Sq) hi[r] = -1;
        }
#pragma unroll
        for (int x = 0; x < LA_BC / 2; x++) {
            const int j = k0 + (x >> 2) * 8 + 2 * t4 + (x & 1);
            const int r = (x >> 1) & 1;
            if (j < lo[r] || j > hi[r]) s[x] = -LA_INF;
        }
    }
#elif LA_MASK_BITS
    // Partial tiles: the bits la_ws_bits loaded (0 past Sq and Sk); Full tiles at the end: Sk.
    if (partial) {
#pragma unroll
        for (int x = 0; x < LA_BC / 2; x++) {
            const u32 w = mw[((x >> 1) & 1) * (LA_BC / 32) + (x >> 4)];
            if (!((w >> (8 * ((x >> 2) & 3) + (x & 1))) & 1)) s[x] = -LA_INF;
        }
    } else if (k0 + LA_BC > p.Sk) {
#pragma unroll
        for (int x = 0; x < LA_BC / 2; x++)
            if (k0 + (x >> 2) * 8 + 2 * t4 + (x & 1) >= p.Sk) s[x] = -LA_INF;
    }
#else
    if (partial || k0 + LA_BC > p.Sk) {
        // One n8 block (2 keys x 2 rows) per step: the row parts of the mask program stay
        // loop-invariant (hoisted), four independent evaluations per step.
        u64 bits = 0;
#pragma unroll 2
        for (int jb = 0; jb < LA_BC / 8; jb++) {
            u32 nib = 0;
#pragma unroll
            for (int v = 0; v < 4; v++) {
                const int j = k0 + jb * 8 + 2 * t4 + (v & 1);
                const int i = rowbase + ((v >> 1) << 3);
                bool ok = i < p.Sq && j < p.Sk;  // rows past Sq: never written, and the mask program may read per-row ids
                if (partial && ok) ok = la_mask(p, b, h, i, j);
                nib |= (u32)ok << v;
            }
            bits |= (u64)nib << (4 * jb);
        }
#pragma unroll
        for (int x = 0; x < LA_BC / 2; x++)
            if (!((bits >> x) & 1)) s[x] = -LA_INF;
    }
#endif
}

#if LA_GATHER
// The logits of gathered chunk gk (its LA_BC keys): scaled as any tile's; a partial chunk's
// elements tested one by one with the mask program on their keys (rows past Sq and keys at or
// past Sk, the list's padding among them, masked), a whole one's left as they are (every key
// allowed for every row of the query tile: sparse/gather.rs built it so). Element x: row
// rowbase + 8 ((x >> 1) & 1), key gk[8 (x >> 2) + 2 t4 + (x & 1)].
__device__ __forceinline__ void la_ws_logits_gather(float* s, const LaFwdParams& p, int b, int h, int rowbase, int t4,
                                                    const u32* gk, bool partial) {
    la_ws_scale(s, p);
    if (!partial) return;
    u64 bits = 0;
#pragma unroll 2
    for (int jb = 0; jb < LA_BC / 8; jb++) {
        const uint2 kk = *(const uint2*)(gk + jb * 8 + 2 * t4);
        u32 nib = 0;
#pragma unroll
        for (int v = 0; v < 4; v++) {
            const int j = (int)((v & 1) ? kk.y : kk.x);
            const int i = rowbase + ((v >> 1) << 3);
            bool ok = i < p.Sq && j < p.Sk;
            if (ok) ok = la_mask(p, b, h, i, j);
            nib |= (u32)ok << v;
        }
        bits |= (u64)nib << (4 * jb);
    }
#pragma unroll
    for (int x = 0; x < LA_BC / 2; x++)
        if (!((bits >> x) & 1)) s[x] = -LA_INF;
}

// Gathered chunk: key rows j_r (r < LA_BC; at or past Sk, and columns past LA_DO: zeros) of a
// [Sk][D] slab (row stride ss elements) into a [LA_BC][D] tile in the TMA's layout (la_sw128),
// by one side of the producer warpgroup (64 threads: K or V). Warp w of the side copies rows
// w BC / 2 .. (w + 1) BC / 2 - 1, lane l holding the keys of rows w BC / 2 + l (jl0) and
// w BC / 2 + 32 + l (jl1, BC 128); a step copies 32 / (D / 8) whole rows, each lane the same
// 16-byte piece c of its row, the row's key by a shuffle. What a lane's copies share (its
// piece's offsets in the row and in shared memory) is computed once, and the steps are unrolled
// so that their shuffles and address arithmetic overlap: one lane's copies are a chain of
// dependent steps, and with one producer warp per scheduler that chain's latency, not the
// copies' bytes, set a chunk's time (DIAG 2 below issued the copies without waiting for them
// and was as slow; docs/PERF.md). Then this thread's copies count on `bar`: one pending arrival
// added now, completed when they have landed.
#ifndef LA_GATHER_UNROLL
#define LA_GATHER_UNROLL 4  // (1 at D 256: registers, above)
#endif
__device__ __forceinline__ void la_ws_gather(u16* dst, const u16* src, i64 ss, int jl0, int jl1, int Sk, u64* bar) {
#if LA_GATHER_ROWS4
    // (LONGATTN_CUDA_GATHER_ROWS=4, experiment.) A step copies 4 rows, 8 lanes a row: lane l
    // takes 16-byte piece l mod 8 of each of the row's D / 64 column blocks, so one shuffle (the
    // row's key) and one address serve D / 64 copies.
    constexpr int RW = LA_BC / 2, NB = LA_D / 64;
    const int lane = threadIdx.x & 31, w = (threadIdx.x >> 5) & 1;
    const int c = lane & 7, rs = lane >> 3;
    const u16* gsrc = src + c * 8;
    const u32 sblk = la_smem_addr(dst) + (u32)(w * RW * 128);
#if LA_GATHER_DIAG != 1
#pragma unroll LA_GATHER_UNROLL
    for (int st = 0; st < RW / 4; st++) {
        const int r = st * 4 + rs;
        const int j = __shfl_sync(0xffffffffu, st * 4 < 32 ? jl0 : jl1, r & 31);
        const bool ok = j < Sk;
        const u16* g = gsrc + (ok ? (i64)j * ss : 0);
        const u32 sa = sblk + (u32)r * 128 + (((u32)c ^ (u32)(r & 7)) << 4);
#pragma unroll
        for (int cb = 0; cb < NB; cb++) {
            // (Columns past the tensor's head dim: zeros, as the TMA fills them.)
            const bool in = ok && cb * 64 + c * 8 < LA_DO;
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(sa + cb * LA_BC * 128),
                         "l"(in ? g + cb * 64 : src), "r"(in ? 16 : 0));
        }
    }
#endif
#else
    constexpr int RW = LA_BC / 2, PR = LA_D / 8, RPS = 32 / PR;
    const int lane = threadIdx.x & 31, w = (threadIdx.x >> 5) & 1;
    const int c = lane % PR, rs = lane / PR;
    // (Columns past the tensor's head dim: zeros, as the TMA fills them.)
    const bool cok = c * 8 < LA_DO;
    const u16* gsrc = src + c * 8;
    // Row r of the warp is tile row w RW + r (RW a multiple of 8: the same swizzle phase r & 7).
    const u32 sblk = la_smem_addr(dst) + (u32)((c >> 3) * LA_BC * 128 + w * RW * 128);
    const u32 piece = (u32)(c & 7);
#if LA_GATHER_DIAG != 1
#pragma unroll LA_GATHER_UNROLL
    for (int st = 0; st < RW / RPS; st++) {
        const int r = st * RPS + rs;
        const int j = __shfl_sync(0xffffffffu, st * RPS < 32 ? jl0 : jl1, r & 31);
        const bool ok = cok && j < Sk;
        const u32 sa = sblk + (u32)r * 128 + ((piece ^ (u32)(r & 7)) << 4);
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(sa),
                     "l"(gsrc + (ok ? (i64)j * ss : 0)), "r"(ok ? 16 : 0));
    }
#endif
#endif
#if LA_GATHER_WAIT || LA_GATHER_DIAG
    (void)bar;
#else
    asm volatile("cp.async.mbarrier.arrive.shared::cta.b64 [%0];\n" ::"r"(la_smem_addr(bar)) : "memory");
#endif
}

// After the 64 threads of a side have run la_ws_gather into the stage of `bar`: a named barrier
// of the 64 (`id`; each thread's pending arrival is on the barrier), then the side's first
// thread's arrival, the one the barrier expects. LA_GATHER_WAIT (diagnostic): each thread first
// waits for its copies and fences the proxies itself.
__device__ __forceinline__ void la_ws_handover(u64* bar, int id, bool lead) {
#if LA_GATHER_WAIT
    asm volatile("cp.async.wait_all;\n" ::: "memory");
    la_fence_async_smem();
#endif
    la_bar_sync(id, 64);
    if (lead) la_mbar_arrive(bar);
}
// A consumer after its wait for a stage: the chunk's rows, written through the generic proxy,
// become visible to its tensor-core reads (async proxy). TMA stages need none; every stage gets
// it in this variant.
#define LA_GATHER_FENCE() la_fence_async_smem()
#else
#define LA_GATHER_FENCE() ((void)0)
#endif

// The logits of schedule entry `ent`: a key tile (la_ws_logits) or a gathered chunk.
__device__ __forceinline__ void la_ws_logits_ent(float* s, const LaWsParams& w, int b, int h, int rowbase, int t4,
                                                 u32 ent, const u32* mw) {
#if LA_GATHER
    if (LA_GATHERED(ent)) {
        la_ws_logits_gather(s, w.p, b, h, rowbase, t4, w.gkeys + (i64)LA_CHUNK(ent) * LA_BC, ent & 1);
        return;
    }
#endif
    la_ws_logits(s, w.p, b, h, rowbase, t4, (int)(ent >> 1) * LA_BC, ent & 1, mw);
}

extern "C" __global__ void __launch_bounds__(LA_THREADS, LA_MINB) la_attn_fwd_ws(const __grid_constant__ LaWsParams w) {
    const LaFwdParams& p = w.p;
    extern __shared__ __align__(1024) u16 la_smem_ws[];
    const u32 mis = la_smem_addr(la_smem_ws) & 1023;
    u16* sQ0 = la_smem_ws + (mis ? (1024 - mis) / 2 : 0);  // stage sq: sQ0 + sq * BR * D
    u16* sK0 = sQ0 + LA_QST * LA_BR * LA_D;  // stage st: sK0 + st * BC * D
    u16* sV0 = sK0 + 2 * LA_BC * LA_D;  // stage st: sV0 + st * BC * D
    u64* bars = (u64*)(sV0 + 2 * LA_BC * LA_D);
    u64* full_q = bars;       // [2]
    u64* empty_q = bars + 2;  // [2]
    u64* full_k = bars + 4;   // [2]
    u64* full_v = bars + 6;   // [2]
    u64* empty_k = bars + 8;  // [2]
    u64* empty_v = bars + 10; // [2]
#if LA_SKIP
    u32* votes = (u32*)(bars + 12);  // [LA_NWG][2] skip-softmax votes, a byte per warp (in the
                                     // 32 bytes behind the barriers; see TileCfg::smem)
#endif
    constexpr u32 TILE_BYTES = LA_BC * LA_D * 2;
#if LA_DESC_ADD
    const int wg = __shfl_sync(0xffffffff, threadIdx.x >> 7, 0);  // warp-uniform for the compiler
#else
    const int wg = threadIdx.x >> 7;
#endif

    if (threadIdx.x == 0) {
#pragma unroll
        for (int st = 0; st < 2; st++) {
            la_mbar_init(full_q + st, 1);
            la_mbar_init(empty_q + st, 4 * LA_NWG);  // one arrival per consumer warp
            la_mbar_init(full_k + st, 1);
            la_mbar_init(full_v + st, 1);
            la_mbar_init(empty_k + st, 4 * LA_NWG);
            la_mbar_init(empty_v + st, 4 * LA_NWG);
        }
        la_mbar_fence_init();
    }
    __syncthreads();

    // Persistent blocks: block x runs the items of its work list in order. Producer and consumers
    // walk the same items, so their ring positions agree: `nq` counts items with work (Q stage
    // LA_QSTAGE(nq), its LA_QUSE(nq)-th use), `nkv` key tiles (K/V stage nkv & 1); the u-th use
    // of a stage waits for parity u & 1.
    const u32 i0 = w.work[blockIdx.x], i1 = w.work[blockIdx.x + 1];
    const u32* list = w.work + gridDim.x + 1;

    if (wg == 0) {
        // Producer: one thread issues every TMA copy. A wait for an "empty" barrier with parity
        // (use & 1) ^ 1 passes at once on a stage's first use.
        la_regs_dec<LA_REG_LOAD>();
#if LA_GATHER
        // Every thread of the warpgroup walks the items: thread 0 issues Q's TMA copies, the K
        // and V sides their tiles and chunks (below).
        const bool lead = threadIdx.x == 0;
#else
        if (threadIdx.x != 0) return;
        constexpr bool lead = true;
#endif
        int nq = 0, nkv = 0;
        for (u32 i = i0; i < i1; i++) {
            int qt, h, b;
            la_ws_item(p, list[i], qt, h, b);
            const int kh = h / (p.Hq / p.Hk);
            const int srow = ((b % p.sched_batch) * p.sched_heads + (h % p.sched_heads)) * p.q_tiles + qt;
            const u32 e0 = p.sched_off[srow];
            const int nt = (int)(p.sched_off[srow + 1] - e0);
            if (nt == 0) continue;
            const int sq = LA_QSTAGE(nq);
            if (lead) {
                la_mbar_wait(empty_q + sq, (LA_QUSE(nq) & 1) ^ 1);
                la_mbar_expect(full_q + sq, LA_BR * LA_D * 2);
#pragma unroll
                for (int cb = 0; cb < LA_D / 64; cb++)
                    la_ws_tma_tile<LA_BR, LA_QPH, LA_QPW>(sQ0 + sq * LA_BR * LA_D + cb * LA_BR * 64, &w.tq, full_q + sq, cb * 64, qt, h, b);
            }
            nq++;
            for (int n = 0; n < nt; n++, nkv++) {
                const int st = nkv & 1;
                const u32 par = ((nkv >> 1) & 1) ^ 1;
                const u32 ent = p.sched_ent[e0 + n];
                const int kt = (int)(ent >> 1);
                u16* sK = sK0 + st * LA_BC * LA_D;
                u16* sV = sV0 + st * LA_BC * LA_D;
#if LA_GATHER
                // Threads 0-63 bring K, 64-127 V, each side on its own ring: it waits for
                // every stage of it (a wait is for the parity of the phase before, which
                // tells one phase from the next only: a thread that skipped a tile's wait
                // could pass a later wait two phases early and overwrite a stage still
                // being read); its first thread issues the TMA tiles and hands the chunks
                // over (named barrier 15 for K, 11 for V).
                const bool kside = threadIdx.x < 64, slead = (threadIdx.x & 63) == 0;
                u64* eb = kside ? empty_k + st : empty_v + st;
                u64* fb = kside ? full_k + st : full_v + st;
                u16* dst = kside ? sK : sV;
                if (LA_GATHERED(ent)) {
                    // The keys first, so that their loads overlap the wait.
                    const u32* gk = w.gkeys + (i64)LA_CHUNK(ent) * LA_BC + ((threadIdx.x >> 5) & 1) * (LA_BC / 2) +
                                    (threadIdx.x & 31);
                    const int jl0 = (int)gk[0], jl1 = LA_BC / 2 > 32 ? (int)gk[32] : 0;
                    const u16* src = kside ? p.k + b * p.k_sb + kh * p.k_sh : p.v + b * p.v_sb + kh * p.v_sh;
                    la_mbar_wait(eb, par);
                    la_ws_gather(dst, src, kside ? p.k_ss : p.v_ss, jl0, jl1, p.Sk, fb);
                    la_ws_handover(fb, kside ? 15 : 11, slead);
                } else {
                    la_mbar_wait(eb, par);
                    if (slead) {
                        la_mbar_expect(fb, TILE_BYTES);
#pragma unroll
                        for (int cb = 0; cb < LA_D / 64; cb++)
                            la_ws_tma_tile<LA_BC, LA_KPH, LA_KPW>(dst + cb * LA_BC * 64, kside ? &w.tk : &w.tv, fb, cb * 64, kt, kh, b);
                    }
                }
#else
                // Thread 0 alone: K's tile, then V's.
                la_mbar_wait(empty_k + st, par);
                la_mbar_expect(full_k + st, TILE_BYTES);
#pragma unroll
                for (int cb = 0; cb < LA_D / 64; cb++)
                    la_ws_tma_tile<LA_BC, LA_KPH, LA_KPW>(sK + cb * LA_BC * 64, &w.tk, full_k + st, cb * 64, kt, kh, b);
                la_mbar_wait(empty_v + st, par);
                la_mbar_expect(full_v + st, TILE_BYTES);
#pragma unroll
                for (int cb = 0; cb < LA_D / 64; cb++)
                    la_ws_tma_tile<LA_BC, LA_KPH, LA_KPW>(sV + cb * LA_BC * 64, &w.tv, full_v + st, cb * 64, kt, kh, b);
#endif
            }
        }
        return;
    }

    // Consumers.
    la_regs_inc<LA_REG_MMA>();
    const int c = wg - 1;
    const int warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
    const int g = lane >> 2, t4 = lane & 3;
    // Ping-pong: consumer c issues its products after consumer c - 1 (cyclically); the last one
    // lets consumer 0 go first, and consumer 0 takes the last one's final arrival at the end.
    if (LA_NWG > 1 && c == LA_NWG - 1) la_bar_arrive(1, 256);
    int nq = 0, nkv = 0;
#if LA_SKIP
    u32 tested = 0, dropped = 0;
#endif

    for (u32 i = i0; i < i1; i++) {
        int qt, h, b;
        la_ws_item(p, list[i], qt, h, b);
        const int srow = ((b % p.sched_batch) * p.sched_heads + (h % p.sched_heads)) * p.q_tiles + qt;
        const u32 e0 = p.sched_off[srow];
        const int nt = (int)(p.sched_off[srow + 1] - e0);
        const int rowbase = qt * LA_BR + c * 64 + warp * 16 + g;
#if LA_SKIP
        const bool pad0 = la_qtok(qt, rowbase - qt * LA_BR) >= p.Sq;
        const bool pad1 = la_qtok(qt, rowbase - qt * LA_BR + 8) >= p.Sq;
#endif

        float o[LA_D / 2];
#pragma unroll
        for (int i = 0; i < LA_D / 2; i++) o[i] = 0.f;
        float m0 = -LA_INF, m1 = -LA_INF, l0 = 0.f, l1 = 0.f;
#if LA_MAP
        float2* const map_region = w.map_scratch + (i64)(blockIdx.x * LA_NWG + c) * w.map_cap * 64;
#endif

        if (nt > 0) {
            float s[LA_BC / 2];
            u32 pf[LA_BC / 16][4];
            float a0, a1;
            const int sq = LA_QSTAGE(nq);
            const u16* sQ = sQ0 + sq * LA_BR * LA_D;
            la_mbar_wait(full_q + sq, LA_QUSE(nq) & 1);

            // Tile 0: S_0, softmax -> P_0.
            {
                const int st = nkv & 1;
                la_mbar_wait(full_k + st, (nkv >> 1) & 1);
                LA_GATHER_FENCE();
                la_wg_fence();
                la_ws_qk(s, sQ, sK0 + st * LA_BC * LA_D, c);
                la_wg_commit();
                const u32 ent = p.sched_ent[e0];
                u32 mw[LA_BC / 16];
#if LA_MASK_BITS
                la_ws_bits(p, e0, ent & 1, rowbase - qt * LA_BR, t4, mw);
#endif
                la_wg_wait0();
                la_fence_regs<LA_BC / 2>(s);
                if (lane == 0) {
                    la_mbar_arrive(empty_k + st);
                    if (LA_Q_EARLY && nt == 1) la_mbar_arrive(empty_q + sq);  // the last Q K^T is done
                }
                la_ws_logits_ent(s, w, b, h, rowbase, t4, ent, mw);
#if LA_MAP
                float mg[2 * LA_MAP_NG], sg[2 * LA_MAP_NG];
                la_wg_softmax(s, LA_SM_SCALE(p), m0, m1, l0, l1, a0, a1, mg, sg);
                la_map_tile(map_region + warp * 16, mg, sg, LA_SM_SCALE(p), m0, m1, true, lane);
#else
                la_wg_softmax(s, LA_SM_SCALE(p), m0, m1, l0, l1, a0, a1);
#endif
                la_wg_pack(pf, s);
            }

            // Whether P_{n-1} V_{n-1} is issued (skip-softmax drops it when every warp of the
            // warpgroup dropped tile n - 1; tile 0 is never tested).
            bool pv_due = true;
            for (int n = 1; n < nt; n++) {
                const int j = nkv + n;  // ring position of tile n; tile n - 1 sits at j - 1
                const int st = j & 1, sp = st ^ 1;
                la_mbar_wait(full_k + st, (j >> 1) & 1);
                LA_GATHER_FENCE();
                if (LA_NWG > 1) la_bar_sync(1 + c, 256);
#if LA_SKIP
                if (LA_NWG == 1) la_bar_sync(8 + c, 128);
                // Every warp of this warpgroup voted on tile n - 1 before reaching the barrier (the
                // slot is written again only after the next one, which every warp of the
                // warpgroup must reach first).
                if (!LA_SKIP_LATE && n > 1) {
                    pv_due = !la_votes_all(votes + 2 * c + ((n - 1) & 1));
                    tested++;
                    dropped += !pv_due;
                }
#endif
                la_wg_fence();
                la_ws_qk(s, sQ, sK0 + st * LA_BC * LA_D, c);
                la_wg_commit();
#if LA_SKIP
                if (LA_SKIP_LATE && n > 1) {
                    pv_due = !la_votes_all(votes + 2 * c + ((n - 1) & 1));
                    tested++;
                    dropped += !pv_due;
                }
#endif
                // V_{n-1} must have landed before its stage goes back, issued or not. A dropped
                // P_{n-1} V_{n-1} commits a group of one m64n8k16 product into scratch registers
                // instead: a group that may be empty makes ptxas close it with a wgmma of its own
                // after the branch, on both paths, and the wait for S_n below then waits for P V
                // as well (8-9% of the forward when nothing is dropped). With three consumers
                // (D 64) the two paths spill, so that tile keeps the single commit.
                la_mbar_wait(full_v + sp, ((j - 1) >> 1) & 1);
                LA_GATHER_FENCE();
#if LA_SKIP && LA_NWG == 3
                if (pv_due) la_ws_pv(o, pf, sV0 + sp * LA_BC * LA_D);
                la_wg_commit();
#elif LA_SKIP
                if (pv_due) {
                    la_ws_pv(o, pf, sV0 + sp * LA_BC * LA_D);
                    la_wg_commit();
                } else {
                    // Never read (ptxas turns the product into its own empty one). With LA_Q_EARLY
                    // its operands are V_{n-1}'s stage, which goes back only after the wait for
                    // this group (Q's may go back before).
                    float z[4];
                    const u16* sVp = sV0 + sp * LA_BC * LA_D;
                    la_wg_ss_n8(z, la_wg_desc(LA_Q_EARLY ? sVp : sQ, 16, 1024),
                                la_wg_desc(LA_Q_EARLY ? sVp : sV0, 16, 1024), 0);
                    la_wg_commit();
                }
#else
                la_ws_pv(o, pf, sV0 + sp * LA_BC * LA_D);
                la_wg_commit();
#endif
                if (LA_NWG > 1) la_bar_arrive(1 + (c + 1) % LA_NWG, 256);
                const u32 ent = p.sched_ent[e0 + n];
                u32 mw[LA_BC / 16];
#if LA_MASK_BITS
                la_ws_bits(p, e0 + n, ent & 1, rowbase - qt * LA_BR, t4, mw);
#endif

                la_wg_wait1();  // S_n is ready; P_{n-1} V_{n-1} may still run
                la_fence_regs<LA_BC / 2>(s);
                if (lane == 0) {
                    la_mbar_arrive(empty_k + st);
                    if (LA_Q_EARLY && n == nt - 1) la_mbar_arrive(empty_q + sq);  // the last Q K^T is done
                }
                la_ws_logits_ent(s, w, b, h, rowbase, t4, ent, mw);
#if LA_MAP
                float mg[2 * LA_MAP_NG], sg[2 * LA_MAP_NG];
#define LA_MAP_MG , mg
#define LA_MAP_SG , sg
#else
#define LA_MAP_MG
#define LA_MAP_SG
#endif
#if LA_SKIP
                float mx0, mx1;
                la_wg_rowmax(s, LA_SM_SCALE(p), mx0, mx1, la_fmax_nan LA_MAP_MG);
                const bool drop = __all_sync(0xffffffffu, la_skip_rows(mx0, mx1, m0, m1, w.skip_log2, pad0, pad1));
                if (lane == 0) ((volatile unsigned char*)(votes + 2 * c + (n & 1)))[warp] = drop ? 1 : 0;
                const bool up = !drop && la_wg_softmax_from(s, LA_SM_SCALE(p), mx0, mx1, m0, m1, l0, l1, a0, a1 LA_MAP_SG);
#else
                const bool up = la_wg_softmax(s, LA_SM_SCALE(p), m0, m1, l0, l1, a0, a1 LA_MAP_MG LA_MAP_SG);
#endif
#undef LA_MAP_MG
#undef LA_MAP_SG
#if LA_MAP && LA_SKIP
                la_map_tile(map_region + (n * LA_MAP_NG * 64 + warp * 16), mg, sg, LA_SM_SCALE(p), m0, m1, !drop, lane);
#elif LA_MAP
                la_map_tile(map_region + (n * LA_MAP_NG * 64 + warp * 16), mg, sg, LA_SM_SCALE(p), m0, m1, true, lane);
#endif

                la_wg_wait0();  // P_{n-1} V_{n-1} is done: O and the P registers are free
                la_fence_regs<LA_D / 2>(o);
                if (lane == 0) la_mbar_arrive(empty_v + sp);
                if (up) la_wg_rescale(o, a0, a1);
#if LA_SKIP
                if (drop)
                    la_wg_zero(pf);
                else
#endif
                    la_wg_pack(pf, s);
            }
#if LA_SKIP
            if (nt > 1) {
                la_bar_sync(8 + c, 128);  // the votes on the last tile are in
                pv_due = !la_votes_all(votes + 2 * c + ((nt - 1) & 1));
                tested++;
                dropped += !pv_due;
            }
#endif

            // The last tile's P V; then its V stage (and Q's, unless given back early) goes back
            // to the producer.
            const int jl = nkv + nt - 1, sl = jl & 1;
            la_mbar_wait(full_v + sl, (jl >> 1) & 1);
            LA_GATHER_FENCE();
            la_wg_fence();
            if (pv_due) la_ws_pv(o, pf, sV0 + sl * LA_BC * LA_D);
            la_wg_commit();
            la_wg_wait0();
            la_fence_regs<LA_D / 2>(o);
            if (lane == 0) {
                la_mbar_arrive(empty_v + sl);
                if (!LA_Q_EARLY && !LA_O_STAGE) la_mbar_arrive(empty_q + sq);
            }
            nq++;
            nkv += nt;
#if LA_O_STAGE
            // Epilogue through the Q stage, which then goes back: each thread's generic accesses
            // to it are ordered before the TMA's refill, then one arrival per warp.
            la_ws_store_staged(p, o, l0, l1, m0, m1, b, h, qt, c * 64 + warp * 16, (u16*)sQ, lane);
            la_fence_async_smem();
            __syncwarp();
            if (lane == 0) la_mbar_arrive(empty_q + sq);
#if LA_MAP
            la_map_pool(w, map_region, nt, e0, b, h, qt * LA_BR + c * 64, c, warp, lane);
#endif
            continue;
#endif
        }

        // Epilogue: O / l and the LSE; rows past Sq are not written; rows with no allowed key get
        // 0 and -inf.
        const int rl = rowbase - qt * LA_BR;
        la_wg_store(p, o, l0, l1, m0, m1, b, h, la_qtok(qt, rl), la_qtok(qt, rl + 8), t4);
#if LA_MAP
        if (nt > 0) la_map_pool(w, map_region, nt, e0, b, h, qt * LA_BR + c * 64, c, warp, lane);
#endif
    }
    if (LA_NWG > 1 && c == 0) la_bar_sync(1, 256);
#if LA_SKIP
    if (w.skip_stats != nullptr && warp == 0 && lane == 0 && tested > 0) {
        atomicAdd(w.skip_stats, (unsigned long long)tested);
        atomicAdd(w.skip_stats + 1, (unsigned long long)dropped);
    }
#endif
}
