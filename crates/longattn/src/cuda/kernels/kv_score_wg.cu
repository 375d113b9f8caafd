// Press scores of a prefill-sized chunk on Hopper (sm_90a), warp-specialized: the fold of
// kv_score.cu (the same sums, added in another order) shaped like the backward's key-tile
// pass, for chunks whose weighted rows are many (H2O's and A2SF's full accumulation over a
// prompt).
//
// With l2_h[i] = lse_h(i) log2 e - log2 w_i (la_kv_score_l2, +inf where row i adds nothing) and
// x_h(i, e) the logit in log2 units (scale log2 e q.k, or c log2 e tanh(scale q.k / c)):
//     c_h[e]   = sum_i 2^(x_h(i, e) - l2_h[i])        = sum_i w_i P_h[i, e]
//     c[e]     = R_h c_h[e]                            R: max, sum or mean over the G heads
//     score[e] = decay score[e] + c[e]
// Causal: entry e is seen by row i iff e <= len - Sq + i (the chunk is each row's last Sq
// entries); rows before `first` weigh 0 and are not visited.
//
// Block = (tile of LC_BC = 128 entries, table row r = b Hk + kh), 3 warpgroups:
//   - warpgroup 0, the producer: one thread streams the items (query head of the group, then
//     query tile of LC_BR rows, from the first tile that sees the block's entries) through an
//     LC_ST-stage ring: Q by TMA (128-byte swizzle, rows past Sq read as zeros) and the tile's l2
//     by a bulk copy; "full" mbarriers count the bytes, "empty" ones the consumer warps done.
//   - consumer warpgroup c owns entries 64 c .. 64 c + 63 of the tile as the A operand of
//     S^T = K Q^T (wgmma m64 n(LC_BR), A from registers: the entries' keys are read from their
//     pages once, B = Q K-major) and keeps, per thread, the running sums of its two entries.
//     Items go in pairs: the second's product runs while the first's exponentials are formed,
//     so the tensor cores and the exponentials overlap within a warpgroup as well as across
//     the two.
// Compile-time constants: LA_F16, LA_D (64, 128, 256), LA_PAGE, LA_SOFTCAP, LC_BR (128; 64 at
// D 256), LC_ST (stages), LC_PIPE (items per turn of the consumers' loop: 2, or 4 where the
// third and fourth products are issued as the first two are consumed, so that only the last
// item of a turn has its exponentials formed with no product of its warpgroup running),
// LC_UNSWITCH (1: the causal mask's test only in items that cross the diagonal; 0: in every
// item, per element).

#define LC_BC 128
#ifndef LC_PIPE
#define LC_PIPE 2
#endif
#ifndef LC_UNSWITCH
#define LC_UNSWITCH 1
#endif
// A compile-time bool as a type (the masked / unmasked sums of an item).
template <bool B>
struct la_bool_c {
    static constexpr bool value = B;
};
#define LC_THREADS 384
#define LC_KS (LA_D / 16)
// Register split after setmaxnreg (ptxas compiles the kernel within 168 a thread, the
// launch bound's share; the consumers need about 160: two 64-float accumulators and the A
// fragments).
#define LC_REG_MMA 232
#define LC_REG_LOAD 40
#if LC_BR == 64
#define la_wg_rsk_br la_wg_rsk_n64
#else
#define la_wg_rsk_br la_wg_rsk_n128
#endif

struct LaColArgs {
    const u16* k;          // pages of one KV head [num_pages, LA_PAGE, D]
    const float* l2;       // [B, Hq, sq_pad] (la_kv_score_l2)
    const int* tables;     // [rows, max_pages]
    const int* lens;       // [rows]
    float* score;          // [rows, cap]
    int Sq, Hq, Hk, max_pages, cap, sq_pad, causal, reduce, first;  // reduce: 0 max, 1 sum, 2 mean
    float decay, q_scale, cap_mul;  // q_scale: scale log2 e, or scale / c with soft-cap
};

// The TMA descriptor of q ([B, Sq, Hq, D] as boxes {64 columns, LC_BR rows, 1 head, 1 batch}).
struct LaColWs {
    LaTmap tq;
    LaColArgs p;
};
static_assert(sizeof(LaColWs) == 256, "LaColWs must match kv/score_cuda.rs");

extern "C" __global__ void __launch_bounds__(LC_THREADS, 1) la_kv_colscore(const __grid_constant__ LaColWs w) {
    const LaColArgs& p = w.p;
    const int r = blockIdx.y;
    const int len = p.lens[r];
    const int k0 = blockIdx.x * LC_BC;
    if (k0 >= len) return;
    extern __shared__ __align__(1024) u16 lc_smem[];
    // The swizzle atoms need 1024-byte alignment in the shared window (the host adds 1 KiB).
    const u32 mis = la_smem_addr(lc_smem) & 1023;
    u16* sQ = lc_smem + (mis ? (1024 - mis) / 2 : 0);   // stage st: sQ + st BR D
    float* sL = (float*)(sQ + LC_ST * LC_BR * LA_D);    // stage st: sL + st BR
    u64* full = (u64*)(sL + LC_ST * LC_BR);             // [LC_ST]
    u64* empty = full + LC_ST;                          // [LC_ST]
    const int b = r / p.Hk, kh = r % p.Hk, G = p.Hq / p.Hk;
    const int off = len - p.Sq;  // entry e is seen by row i iff e <= off + i (causal)
    // Items: per query head of the group, the query tiles from the first row that sees an entry
    // of the tile (and has weight) to the last.
    const int qlo = p.causal ? la_imax(p.first, k0 - off) : p.first;
    const int qt0 = qlo / LC_BR, nqt = p.sq_pad / LC_BR;
    const int per = la_imax(nqt - qt0, 0);
    const int n_items = G * per;
    const int wg = threadIdx.x >> 7;

    if (threadIdx.x == 0) {
#pragma unroll
        for (int st = 0; st < LC_ST; st++) {
            la_mbar_init(full + st, 1);
            la_mbar_init(empty + st, 8);  // one arrival per consumer warp
        }
        la_mbar_fence_init();
    }
    __syncthreads();

    if (wg == 0) {
        // Producer: item t sits in stage t % LC_ST; its (t / LC_ST)-th use of the stage. A wait
        // for an "empty" phase of parity ((t / LC_ST) & 1) ^ 1 passes at once on a first use.
        la_regs_dec<LC_REG_LOAD>();
        if (threadIdx.x != 0) return;
        for (int t = 0; t < n_items; t++) {
            const int st = t % LC_ST;
            const int h = kh * G + t / per, q0 = (qt0 + t % per) * LC_BR;
            la_mbar_wait(empty + st, ((t / LC_ST) & 1) ^ 1);
            // The consumers read l2 with ordinary loads (generic proxy): order those reads
            // before the bulk copies (async proxy) that refill the stage.
            la_fence_async_smem();
            la_mbar_expect(full + st, LC_BR * LA_D * 2 + LC_BR * 4);
#pragma unroll
            for (int cb = 0; cb < LA_D / 64; cb++)
                la_tma_load4(sQ + st * LC_BR * LA_D + cb * LC_BR * 64, &w.tq, full + st, cb * 64, q0, h, b);
            la_bulk_load(sL + st * LC_BR, p.l2 + ((i64)b * p.Hq + h) * p.sq_pad + q0, LC_BR * 4, full + st);
        }
        return;
    }

    // Consumers.
    la_regs_inc<LC_REG_MMA>();
    const int c = wg - 1;
    const int warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
    const int g = lane >> 2, t4 = lane & 3;
    // This thread's entries: ek[0] and ek[1] = ek[0] + 8 (accumulator rows g and g + 8).
    const int ek0 = k0 + c * 64 + warp * 16 + g;
    const int ek[2] = {ek0, ek0 + 8};
    // A fragments of the warpgroup's 64 entries for the whole head dim (the mma.sync A layout:
    // per k-step of 16 dims, {row g, row g + 8} x {dims 2 t4, 2 t4 + 8}), read from the pages
    // once; entries past len are zeros (and never written).
    u32 a[LC_KS][4];
#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
        const u32* kr = nullptr;
        if (ek[hf] < len) {
            const int page = p.tables[(i64)r * p.max_pages + ek[hf] / LA_PAGE];
            kr = (const u32*)(p.k + ((i64)page * LA_PAGE + ek[hf] % LA_PAGE) * LA_D);
        }
#pragma unroll
        for (int kk = 0; kk < LC_KS; kk++) {
            a[kk][hf] = kr ? kr[kk * 8 + t4] : 0u;
            a[kk][2 + hf] = kr ? kr[kk * 8 + 4 + t4] : 0u;
        }
    }

    // acc[e2]: this head's sum for entry ek[e2 >> 1] over the query columns of parity e2 & 1
    // (four chains); red: the reduction over the heads finished so far.
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    float red[2] = {0.f, 0.f};
    auto quad_sum = [&](int hf) {
        float x = acc[2 * hf] + acc[2 * hf + 1];
        x += __shfl_xor_sync(0xffffffffu, x, 1);
        x += __shfl_xor_sync(0xffffffffu, x, 2);
        acc[2 * hf] = acc[2 * hf + 1] = 0.f;
        return x;
    };
    // S^T of item t into s (issued and committed, not waited for; past the last item, of
    // whatever stage t % LC_ST holds).
    auto issue = [&](float* s, int t) {
        const int st = t % LC_ST;
        if (t < n_items) la_mbar_wait(full + st, (t / LC_ST) & 1);
        const u16* cQ = sQ + st * LC_BR * LA_D;
        la_wg_fence();
#pragma unroll
        for (int kk = 0; kk < LC_KS; kk++)
            la_wg_rsk_br(s, a[kk], la_wg_desc(cQ + (kk >> 2) * LC_BR * 64 + (kk & 3) * 16, 16, 1024), kk > 0);
        la_wg_commit();
    };
    // Item t's probabilities from its S^T (element x: query column 8 (x / 4) + 2 t4 + (x & 1),
    // entry ek[(x / 2) & 1]) into the sums; then stage t goes back to the producer.
    auto consume = [&](float* s, int t) {
        const int st = t % LC_ST;
        const int q0 = (qt0 + t % per) * LC_BR;
        const float* cL = sL + st * LC_BR;
        // Entries past the row's last visible one for some column of the tile: masked per element
        // (column i is masked for entry e iff i < e - off: lim0 / lim1 below, relative to the
        // tile and the thread's first column).
        const bool mask = p.causal && k0 + c * 64 + 63 > off + q0;
        const int lim0 = ek[0] - off - q0 - 2 * t4, lim1 = lim0 + 8;
        // The sums, with the per-element mask test only in items that cross the diagonal
        // (LC_UNSWITCH: one branch per item, so the other items' loop is the exponential and
        // the add alone; the loop is bound by issued instructions).
        auto sums = [&](auto masked) {
#pragma unroll
            for (int jn = 0; jn < LC_BR / 8; jn++) {
                const la_f2 l2 = la_lds2(cL + jn * 8 + 2 * t4);
#pragma unroll
                for (int e2 = 0; e2 < 4; e2++) {
                    const int x = 4 * jn + e2;
                    const float l = (e2 & 1) ? l2.y : l2.x;
#if LA_SOFTCAP
                    float pr = la_exp2(p.cap_mul * tanhf(s[x] * p.q_scale) - l);
#else
                    float pr = la_exp2(fmaf(s[x], p.q_scale, -l));
#endif
                    if (decltype(masked)::value && mask && jn * 8 + (e2 & 1) < ((e2 & 2) ? lim1 : lim0))
                        pr = 0.f;
                    acc[e2] += pr;
                }
            }
        };
#if LC_UNSWITCH
        if (mask)
            sums(la_bool_c<true>{});
        else
            sums(la_bool_c<false>{});
#else
        sums(la_bool_c<true>{});   // the former: the test in every item's elements (A / B runs)
#endif
        // Every read of the stage (the product, l2) is done: back to the producer. The warp
        // barrier orders the other lanes' l2 loads before lane 0's arrival.
        __syncwarp();
        if (lane == 0) la_mbar_arrive(empty + st);
        // The maximum over the heads takes each head's finished sums.
        if (p.reduce == 0 && (t + 1) % per == 0) {
#pragma unroll
            for (int hf = 0; hf < 2; hf++) red[hf] = fmaxf(red[hf], quad_sum(hf));
        }
    };

    // Items in pairs: both products issued, the first consumed while the second runs (a product
    // still running across the loop's back edge made ptxas serialize every wgmma). The pair's
    // second product past the last item multiplies whatever its stage holds, unwaited, and is
    // discarded (no branch around a wgmma).
    // With LC_PIPE 4 the turn holds four items in the two accumulators: each product but the
    // last is consumed while the next one runs, and nothing runs across the back edge.
    for (int t = 0; t < n_items; t += LC_PIPE) {
        float sa[LC_BR / 2], sb[LC_BR / 2];
        issue(sa, t);
        issue(sb, t + 1);
        la_wg_wait1();
        la_fence_regs<LC_BR / 2>(sa);
        consume(sa, t);
#if LC_PIPE == 4
        issue(sa, t + 2);
        la_wg_wait1();
        la_fence_regs<LC_BR / 2>(sb);
        if (t + 1 < n_items) consume(sb, t + 1);
        issue(sb, t + 3);
        la_wg_wait1();
        la_fence_regs<LC_BR / 2>(sa);
        if (t + 2 < n_items) consume(sa, t + 2);
        la_wg_wait0();
        la_fence_regs<LC_BR / 2>(sb);
        if (t + 3 < n_items) consume(sb, t + 3);
#else
        la_wg_wait0();
        la_fence_regs<LC_BR / 2>(sb);
        if (t + 1 < n_items) consume(sb, t + 1);
#endif
    }
    if (p.reduce != 0) {
#pragma unroll
        for (int hf = 0; hf < 2; hf++) red[hf] = quad_sum(hf);
    }
    if (t4 != 0) return;
#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
        if (ek[hf] >= len) continue;
        const float cval = p.reduce == 2 ? red[hf] / (float)G : red[hf];
        float* dst = p.score + (i64)r * p.cap + ek[hf];
        *dst = p.decay == 0.f ? cval : p.decay * *dst + cval;
    }
}
