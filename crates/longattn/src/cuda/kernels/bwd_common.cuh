// Backward pieces shared by the mma.sync kernels (attn_bwd.cu) and the Hopper one-pass kernel
// (attn_bwd_wg.cu): the parameter struct, the logit and its derivative, the Delta / LSE
// preparation and the f32 dQ accumulator's conversion.
//
// With logits y_ij = scale * q_i . k_j (soft-cap: c tanh(q_i . k_j scale / c)), masked -> -inf,
// P_ij = exp(y_ij - LSE_i) (recomputed from the forward's LSE; never stored), and
// Delta_i = sum_d dO_id O_id:
//   dV_j = sum_i P_ij dO_i,   dP_ij = dO_i . v_j,   dS_ij = P_ij (dP_ij - Delta_i) dy/d(q.k),
//   dQ_i = sum_j dS_ij k_j,   dK_j = sum_i dS_ij q_i,
// dy/d(q.k) = scale (soft-cap: scale (1 - tanh^2)).

struct LaBwdParams {
    const u16* q; const u16* k; const u16* v; const u16* o; const u16* dout;
    const float* lse;       // [B, Hq, Sq] natural log (forward output)
    float* lse2;            // [B, Hq, lstride] log2 units (+inf: row with no allowed key or past Sq)
    float* delta;           // [B, Hq, lstride] (0 past Sq)
    u16* dq; u16* dk; u16* dv;
    float* dq_acc;          // one-pass kernel: f32 dQ in 64 x 64 blocks (la_dq_acc_at), summed by
                            // bulk reduce-adds; zero between launches
    i64 q_sb, q_ss, q_sh;   // element strides; q, o, dout, dq share [B, Sq, Hq, D]
    i64 k_sb, k_ss, k_sh;   // k, v, dk, dv share [B, Sk, Hk, D]
    int B, Sq, Sk, Hq, Hk;
    float scale_log2, cap_pre, cap_post, scale;
    const u32* row_off; const u32* row_ent;   // CSR rows: key tile << 1 | partial
    const u32* col_off; const u32* col_ent;   // CSC columns: query tile << 1 | partial
    int sched_batch, sched_heads, q_tiles, k_tiles;
    const int* qdoc; const int* kdoc;
    const unsigned char* blk;
    int blk_tq, blk_tk, blk_qtiles, blk_ktiles, blk_batch, blk_heads;
    int lstride;            // row length of lse2 / delta: Sq rounded up to 128 (aligned tiles)
    int hgroup;             // one-pass kernel's launch order: 0 = key tiles fastest over a 3-D
                            // grid; n > 0 = groups of n (batch, KV head) pairs (la_bwd_block)
    int* dq_sem;            // deterministic one-pass: per (b, h, query tile) the number of
                            // dQ adds done (zeroed by la_bwd_prep)
    const u32* col_rank;    // per column entry: its key tile's position in the query tile's row
    const int* dlo; const int* dhi;  // per (b, i): first / last key of the row's document run
                                     // (interval programs of document masks)
    int mc[LA_MASK_CONSTS]; // the mask program's atom constants (mask/codegen.rs)
};
// Checked against size_of::<LaBwdParams>() on the host (4 bytes of implicit padding before
// row_off, on both sides).
static_assert(sizeof(LaBwdParams) == 448, "LaBwdParams must match cuda/backward.rs");

// Logit in log2 units and d(logit)/d(q.k) / scale for the soft-cap (1 otherwise).
__device__ __forceinline__ float la_logit(const LaBwdParams& p, float raw, float& dcap) {
#if LA_SOFTCAP
    const float t = tanhf(raw * p.cap_pre);
    dcap = 1.f - t * t;
    return p.cap_post * t * p.scale_log2;
#else
    dcap = 1.f;
    return raw * p.scale_log2;
#endif
}

// The schedule column of key tile kt seen by query head h: entries col_ent[c0 .. c1).
__device__ __forceinline__ void la_bwd_col(const LaBwdParams& p, int b, int h, int kt, u32& c0, u32& c1) {
    const int c = ((b % p.sched_batch) * p.sched_heads + (h % p.sched_heads)) * p.k_tiles + kt;
    c0 = p.col_off[c];
    c1 = p.col_off[c + 1];
}
// The work of a dK/dV block (KV head kh, key tile kt): the (query head, column entry) pairs of
// every query head of the group, in a fixed order (head-major). la_bwd_items counts them;
// la_bwd_item returns the t-th (and its index ci in col_ent / col_rank).
__device__ __forceinline__ int la_bwd_items(const LaBwdParams& p, int b, int kh, int kt) {
    const int G = p.Hq / p.Hk;
    int n = 0;
    for (int hh = 0; hh < G; hh++) {
        u32 c0, c1;
        la_bwd_col(p, b, kh * G + hh, kt, c0, c1);
        n += c1 - c0;
    }
    return n;
}
__device__ __forceinline__ void la_bwd_item(const LaBwdParams& p, int b, int kh, int kt, int t, int& h, u32& ent,
                                            u32& ci) {
    const int G = p.Hq / p.Hk;
    for (int hh = 0; hh < G; hh++) {
        u32 c0, c1;
        la_bwd_col(p, b, kh * G + hh, kt, c0, c1);
        if (t < (int)(c1 - c0)) {
            h = kh * G + hh;
            ci = c0 + t;
            ent = p.col_ent[ci];
            return;
        }
        t -= c1 - c0;
    }
}

// The same items walked in order (REV: from the last), one step a call: a column's bounds are
// looked up once per query head instead of per item (la_bwd_col divides twice). begin and next
// leave `ci` at the current item (h = kh * G + hh); call next only while items remain.
struct LaBwdWalk {
    int hh, G;
    u32 ci, c0, c1;
};
__device__ __forceinline__ void la_bwd_walk_col(const LaBwdParams& p, int b, int kh, int kt, LaBwdWalk& w) {
    la_bwd_col(p, b, kh * w.G + w.hh, kt, w.c0, w.c1);
}
template <bool REV>
__device__ __forceinline__ void la_bwd_walk_next(const LaBwdParams& p, int b, int kh, int kt, LaBwdWalk& w) {
    if (REV) {
        if (w.ci > w.c0) {
            w.ci--;
            return;
        }
        do {
            if (--w.hh < 0) return;
            la_bwd_walk_col(p, b, kh, kt, w);
        } while (w.c0 == w.c1);
        w.ci = w.c1 - 1;
    } else {
        if (w.ci + 1 < w.c1) {
            w.ci++;
            return;
        }
        do {
            if (++w.hh >= w.G) return;
            la_bwd_walk_col(p, b, kh, kt, w);
        } while (w.c0 == w.c1);
        w.ci = w.c0;
    }
}
template <bool REV>
__device__ __forceinline__ LaBwdWalk la_bwd_walk_begin(const LaBwdParams& p, int b, int kh, int kt) {
    LaBwdWalk w;
    w.G = p.Hq / p.Hk;
    // Positioned just before the first column's first item (REV: after the last column's last),
    // then one step.
    w.hh = REV ? w.G : -1;
    w.ci = w.c0 = w.c1 = 0;
    la_bwd_walk_next<REV>(p, b, kh, kt, w);
    return w;
}

// The one-pass kernel's block -> (key tile kt, KV head kh, batch b). hgroup 0: the 3-D grid,
// key tiles fastest (the blocks running at once: every key tile of a few heads). hgroup n: a 1-D
// grid over groups of n consecutive (b, kh) pairs (the last group may be smaller); inside a group
// key tiles outermost, the pairs innermost, so the blocks running at once share the group's
// Q, dO and dQ in L2 while the first key tiles (under causal masks the ones with the most query
// tiles) start first and the light ones fill the end. Either way a block's lower key tiles of
// the same (b, kh) come earlier, which the deterministic mode's ordered adds rely on.
__device__ __forceinline__ void la_bwd_block(const LaBwdParams& p, int& kt, int& kh, int& b) {
    if (p.hgroup == 0) {
        kt = blockIdx.x;
        kh = blockIdx.y;
        b = blockIdx.z;
        return;
    }
    const u32 pairs = (u32)p.B * (u32)p.Hk, per_group = (u32)p.hgroup * (u32)p.k_tiles;
    const u32 grp = blockIdx.x / per_group, in = blockIdx.x % per_group;
    const u32 first = grp * (u32)p.hgroup;
    const u32 n = pairs - first < (u32)p.hgroup ? pairs - first : (u32)p.hgroup;
    const u32 pair = first + in % n;
    kt = in / n;
    kh = pair % (u32)p.Hk;
    b = pair / (u32)p.Hk;
}

#if LA_ORDERED
// The deterministic one-pass kernel's counter of the query tile holding row i of (b, h).
__device__ __forceinline__ int* la_dq_sem_at(const LaBwdParams& p, int b, int h, int i) {
    return p.dq_sem + ((i64)b * p.Hq + h) * (p.lstride / LA_BR) + i / LA_BR;
}
#endif

// la_bwd_prep: LA_PREP_TPR threads per (b, i, h) row (the host's `prep_threads`, which also
// sizes the grid: a power of two, >= D / 8), each with 8 elements of O and dO; rows past Sq get
// L2 = +inf, Delta = 0, so tiles that reach past Sq read P = 0. Grid (rows of a batch / rows per
// block, B); a block's rows are consecutive (i, h) pairs, h fastest, which is the memory order
// of contiguous [B, S, H, D] tensors.
#ifndef LA_PREP_TPR
#error "LA_PREP_TPR: threads per row of la_bwd_prep, set by the host (cuda/backward.rs)"
#endif
#if LA_PREP_TPR * 8 < LA_D || LA_PREP_TPR > 32 || (LA_PREP_TPR & (LA_PREP_TPR - 1))
#error "LA_PREP_TPR: a power of two of at most 32 threads, 8 elements each, covering LA_D"
#endif
#define LA_PREP_THREADS 256
extern "C" __global__ void __launch_bounds__(LA_PREP_THREADS) la_bwd_prep(const LaBwdParams p) {
    const u32 r = blockIdx.x * (LA_PREP_THREADS / LA_PREP_TPR) + threadIdx.x / LA_PREP_TPR;  // (i, h) of batch b
    const int lane = threadIdx.x % LA_PREP_TPR;
    const int b = blockIdx.y;
    // Whole blocks only: lstride Hq is a multiple of 128, which the rows per block divide, so
    // no warp is left part-way here (its lanes reach the shuffles below together).
    if (r >= (u32)p.lstride * (u32)p.Hq) return;
    const int h = r % (u32)p.Hq, i = r / (u32)p.Hq;
    const i64 lr = ((i64)b * p.Hq + h) * p.lstride + i;
#if LA_ORDERED
    if (lane == 0 && i % LA_BR == 0) *la_dq_sem_at(p, b, h, i) = 0;
#endif
    // Delta_i = sum_d O_id dO_id: 8 elements a thread (one 16-byte load of each where the rows
    // are 16-byte aligned, which the host's contiguous tensors are), then a sum over the row's
    // threads. Rows past Sq (a warp may hold both kinds) load nothing and sum 0.
    const i64 off = b * p.q_sb + (i64)i * p.q_ss + h * p.q_sh;
    const int d0 = lane * 8;
    float acc = 0.f;
    if (i < p.Sq && d0 < LA_D) {
        const u16* po = p.o + off + d0;
        const u16* pd = p.dout + off + d0;
        u16 ov[8], dv[8];
        if ((((u64)po | (u64)pd) & 15) == 0) {
            *(uint4*)ov = *(const uint4*)po;
            *(uint4*)dv = *(const uint4*)pd;
        } else {
#pragma unroll
            for (int e = 0; e < 8; e++) {
                ov[e] = po[e];
                dv[e] = pd[e];
            }
        }
#pragma unroll
        for (int e = 0; e < 8; e++) acc = fmaf(la_to_f32(ov[e]), la_to_f32(dv[e]), acc);
    }
#pragma unroll
    for (int s = LA_PREP_TPR / 2; s >= 1; s >>= 1) acc += __shfl_xor_sync(0xffffffff, acc, s, LA_PREP_TPR);
    if (lane == 0) {
        p.delta[lr] = acc;
        const float l = i < p.Sq ? p.lse[((i64)b * p.Hq + h) * p.Sq + i] : -LA_INF;
        p.lse2[lr] = l == -LA_INF ? LA_INF : l * LA_LOG2E;
    }
}

// The one-pass kernel's f32 dQ accumulator: per (b, h), blocks of 64 query rows x 64 head-dim
// columns, [B][Hq][lstride / 64][D / 64][4096], each block in the order its warpgroup holds it
// in registers so that staging it in shared memory is conflict-free and one bulk copy moves it:
// float (j * 128 + thread) * 4 + e of a block is the wgmma accumulator element 4 j + e of
// thread = 32 warp + 4 g + t4, i.e. row 16 warp + g + 8 (e / 2), column 8 j + 2 t4 + e % 2.
// Offset of the pair (row i, columns d, d + 1), d even:
__device__ __forceinline__ i64 la_dq_acc_at(const LaBwdParams& p, int b, int h, int i, int d) {
    const i64 blk = ((((i64)b * p.Hq + h) * (p.lstride / 64) + (i >> 6)) * (LA_D / 64) + (d >> 6)) * 4096;
    const int rr = i & 63, cc = d & 63;
    const int thread = (rr >> 4) * 32 + (rr & 7) * 4 + ((cc >> 1) & 3);
    return blk + (((cc >> 3) * 128 + thread) << 2) + ((rr >> 3) & 1) * 2;
}

// dq [B, Sq, Hq, D] (storage type) from the f32 accumulator, which is cleared on the way (zero
// for the next launch); one thread per two elements (a warp writes 64 consecutive elements of a
// row). Two layouts that read dq_acc in its block order instead (16 bytes a thread, then dq
// through shared memory or as 8 rows x 16 bytes a warp store) took 1.4x and 4x as long on H100
// (docs/PERF.md).
extern "C" __global__ void la_bwd_dq_store(const LaBwdParams p) {
    const i64 x = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (x >= (i64)p.B * p.Hq * p.Sq * (LA_D / 2)) return;
    const int d = (int)(x % (LA_D / 2)) * 2;
    const i64 r = x / (LA_D / 2);  // (b, h, i)
    const int i = r % p.Sq;
    const i64 bh = r / p.Sq;
    const int h = bh % p.Hq, b = bh / p.Hq;
    float* src = p.dq_acc + la_dq_acc_at(p, b, h, i, d);
    // dQ = scale sum_j dS_ij K_j: the one-pass kernel accumulates dS without the scale.
    *(u32*)(p.dq + b * p.q_sb + (i64)i * p.q_ss + h * p.q_sh + d) = la_pack2(src[0] * p.scale, src[1] * p.scale);
    src[0] = 0.f;
    src[1] = 0.f;
}
