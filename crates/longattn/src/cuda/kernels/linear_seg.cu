// Segments of a long sequence run in parallel (linear_common.cuh, "Segments"): the state each
// segment would produce on its own, then a scan over segments. Shared pieces: linear_common.cuh.
//
// lin_state_fwd   block (V slice vs, head h, segment z), chunks in order, from S = 0:
//                   S <- exp(b_{L-1}) S + (K o w)^T V,   w_j = exp(b_{L-1} - b_j) (j < L)
//                 leaves A_j (columns vs) in seg_f and G_j = sum of the segment's log decays in
//                 seg_g. The last segment of a sequence has no successor and is skipped.
// lin_state_rev   the same in reverse over (Q, dO), from H = 0:
//                   H <- exp(b_{L-1}) H + scale (Q o exp(b))^T dO
//                 leaves R_j in seg_r (the first segment is skipped).
// lin_seg_scan    one thread per (state element, head, sequence):
//                   forward  S_0 = s0 (or 0),     S_{j+1} = exp(G_j) S_j + A_j
//                   reverse  H_last = dS_final (or 0), H_{j-1} = exp(G_j) H_j + R_j
//                 overwriting A_j / R_j with S_j / H_j (each read before it is written).
//
// lin_state_fwd_mat / lin_state_rev_mat (the chunk-parallel backward, lin_bwd_chunk): the same
//                 walks over every segment, starting from the true state (S_j / H_j after the
//                 scan, or s0 / dS_final / 0 when uncut), storing the state entering (forward)
//                 or the gradient leaving (reverse) every chunk, in the storage type, into
//                 chunk_f / chunk_r before the chunk's update. The forward walk adds the final
//                 state's term of db (sum dS_final o S_final, at the last token); the reverse
//                 one leaves dS_0 at the first segment.
//
// Per chunk and block: K x BV x 64 multiply-adds (no Q K^T, no output), so these passes cost a
// fraction of the chunked kernels they feed; the row factors of X are applied to its fragments
// in registers (lin_mma_tn). Shared memory: two stages of X [64][K] and Y [64][BV] with the
// chunk's decays, b [64], the row factors [64]; the _mat walks add a [K][BV] staging tile.

//
// LIN_GLA (per-key-dimension gates): two more stages of gates [64][K] f32 (B in place, after the
// staging tile of the _mat walks); per chunk X = K -> K o exp(B_{L-1} - B) (forward) or
// X = Q -> scale Q o exp(B) (reverse) in place, S <- diag(exp(B_{L-1})) S + X^T Y, and G_j per
// state row k in seg_g [z, H, K]; the scan reads G_j of its element's row. The forward _mat
// walk leaves the final state's term of db per key dim in db [seqs, H, K].

#define LIN_SEG_STAGE (LIN_C * LIN_K + LIN_C * LIN_BV)

template <bool REV, bool MAT>
__device__ __forceinline__ void lin_state_pass(const LinParams& p) {
    extern __shared__ __align__(128) u16 lin_smem[];
    float* sg = (float*)(lin_smem + 2 * LIN_SEG_STAGE);  // two stages of 64 decays
    float* sb = sg + 2 * LIN_C;
    float* sw = sb + LIN_C;
    u16* stile = (u16*)(sw + LIN_C);  // MAT: the state as the storage type [K][BV] (16-byte aligned)
#if LIN_GLA
    float* sGate = (float*)(stile + (MAT ? LIN_K * LIN_BV : 0));  // two stages of gates [64][K]
#endif

    const int vs = blockIdx.x, h = blockIdx.y, z = blockIdx.z;
    const LinSeg seg = lin_segment(p, z);
    if (!seg.run || (!MAT && (REV ? seg.first : seg.last))) return;
    const int kh = h / (p.H / p.Hk);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int v0 = vs * LIN_BV;
    const int b = seg.b, t0 = seg.a, t1 = seg.e;
    const int nc = (t1 - t0 + LIN_C - 1) / LIN_C;

    // Forward: X = K, Y = V (kv head); reverse: X = Q, Y = dO (query head).
    const u16* gx = REV ? p.q + b * p.q_s[0] + h * p.q_s[2] : p.k + b * p.k_s[0] + kh * p.k_s[2];
    const u16* gy = REV ? p.dout + b * p.do_s[0] + h * p.do_s[2] + v0 : p.v + b * p.v_s[0] + kh * p.v_s[2] + v0;
    const i64 xs = REV ? p.q_s[1] : p.k_s[1], ys = REV ? p.do_s[1] : p.v_s[1];
    auto load = [&](int st, int c) {
        u16* s = lin_smem + st * LIN_SEG_STAGE;
        const int r0 = t0 + c * LIN_C;
        lin_load<LIN_C, LIN_K>(s, gx, xs, r0, t1);
        lin_load<LIN_C, LIN_BV>(s + LIN_C * LIN_K, gy, ys, r0, t1);
        lin_load_g(sg + st * LIN_C, p, b, h, r0, t1);
#if LIN_GLA
        lin_load_gate(sGate + st * LIN_GT, p, b, h, r0, t1);
#endif
    };
#pragma unroll
    for (int st = 0; st < 2; st++) {
        if (st < nc) load(st, REV ? nc - 1 - st : st);
        la_cp_commit();
    }

    const int sm0 = (warp % LIN_SWR) * 16, sn0 = (warp / LIN_SWR) * (LIN_BV / LIN_SWC);
    float acc[1][LIN_NTS][4];
    const i64 sbase = ((i64)seg.n * p.H + h) * LIN_K * LIN_V;
    if (MAT && p.nseg > 1)
        lin_state_load(acc, (REV ? p.seg_r : p.seg_f) + lin_seg_state(p, z, h), LIN_V, sm0, v0 + sn0, lane);
    else if (MAT && (REV ? p.has_dsfin : p.has_s0))
        lin_state_load(acc, (REV ? p.dsfin : p.s0) + sbase, LIN_V, sm0, v0 + sn0, lane);
    else
        lin_zero(acc);
    float gsum = 0.f;  // G_j (thread 0 of warp 0)
#if LIN_GLA
    float grow[2] = {0.f, 0.f};  // G_j of state rows sm0 + g, sm0 + g + 8
#endif
    for (int step = 0; step < nc; step++) {
        const int c = REV ? nc - 1 - step : step;
        const int L = la_imin(LIN_C, t1 - (t0 + c * LIN_C));
        const u16* sX = lin_smem + (step & 1) * LIN_SEG_STAGE;
        const u16* sY = sX + LIN_C * LIN_K;
        la_cp_wait<1>();
        __syncthreads();  // chunk landed
        if (warp == 0) {
            lin_chunk_b(sb, sg + (step & 1) * LIN_C, p, h, L, lane);
            lin_chunk_w(sw, sb, L, !REV, REV ? p.scale : 1.f, lane);
        }
        __syncthreads();  // b and the row factors (w, or scale exp(b)) ready
        auto store_mat = [&]() {
            // Through a swizzled [K][BV] tile in shared memory, so that the rows leave in 16-byte
            // stores (the fragments alone would store 4 bytes at a time).
            const i64 id = lin_chunk_id(p, seg.n, b, t0 + c * LIN_C);
            u16* dst = (REV ? p.chunk_r : p.chunk_f) + (id * p.H + h) * LIN_K * LIN_V + v0;
            lin_store_tile<LIN_BV>(stile, acc, sm0, sn0, lane);
            __syncthreads();
            for (int x = threadIdx.x; x < LIN_K * (LIN_BV / 8); x += LIN_THREADS) {
                const int r = x / (LIN_BV / 8), cc = x % (LIN_BV / 8);
                *(lin_f4*)(dst + (i64)r * LIN_V + cc * 8) = *(const lin_f4*)(stile + lsw<LIN_BV>(r, cc));
            }
        };
#if LIN_GLA
        {
            // Forward: S <- diag(exp(B_{L-1})) S + (K o exp(B_{L-1} - B))^T V;
            // reverse: H <- diag(exp(B_{L-1})) H + (scale Q o exp(B))^T dO.
            float* sG = sGate + (step & 1) * LIN_GT;
            lin_gate_cumsum(sG);
            if (REV) lin_gate_qscale((u16*)sX, sG, p.scale);
            else lin_gate_scale(nullptr, (u16*)sX, sG);
            __syncthreads();  // X scaled
            if (MAT) store_mat();
            lin_gate_rows(acc, sG, sm0, lane);
            grow[0] += sG[(LIN_C - 1) * LIN_K + sm0 + (lane >> 2)];
            grow[1] += sG[(LIN_C - 1) * LIN_K + sm0 + (lane >> 2) + 8];
            lin_mma_tn<LIN_K, LIN_BV, 1, LIN_NTS, LIN_C / 16>(acc, sX, sm0, sY, sn0, lane);
            __syncthreads();  // every warp is done with this stage and the gates
            if (step + 2 < nc) load(step & 1, REV ? c - 2 : c + 2);
            la_cp_commit();
            continue;
        }
#endif
        if (MAT) store_mat();
        const float bl = sb[LIN_C - 1];
        gsum += bl;
        lin_scale(acc, lin_exp(bl));
        lin_mma_tn<LIN_K, LIN_BV, 1, LIN_NTS, LIN_C / 16>(acc, sX, sm0, sY, sn0, lane, sw);
        __syncthreads();  // every warp is done with this stage, b and the factors
        if (step + 2 < nc) load(step & 1, REV ? c - 2 : c + 2);
        la_cp_commit();
    }
    la_cp_wait<0>();
    if (MAT) {
        if (REV && seg.first) lin_state_store(p.ds0 + sbase, acc, LIN_V, sm0, v0 + sn0, lane);
        // S_final . dS_final, the final state's term of db_{t1 - 1} (b = cumulative log decay).
        if (!REV && seg.last && p.want_db && p.has_dsfin && seg.t1 > seg.t0) {
#if LIN_GLA
            // Per key dim (db [B, T, H, K]): sum over v of dS_final[k][v] S_final[k][v].
            lin_state_dot_rows(p.db + ((i64)seg.n * p.H + h) * LIN_K, p.dsfin + sbase, acc, LIN_V, sm0,
                               v0 + sn0, lane);
#else
            lin_state_dot_add(p.db + ((i64)b * p.T + seg.t1 - 1) * p.H + h, p.dsfin + sbase, acc, LIN_V,
                              sm0, v0 + sn0, lane);
#endif
        }
        return;
    }
    float* out = (REV ? p.seg_r : p.seg_f) + lin_seg_state(p, z, h);
    lin_state_store(out, acc, LIN_V, sm0, v0 + sn0, lane);
#if LIN_GLA
    if (vs == 0 && sn0 == 0 && (lane & 3) == 0) {
        p.seg_g[((i64)z * p.H + h) * LIN_K + sm0 + (lane >> 2)] = grow[0];
        p.seg_g[((i64)z * p.H + h) * LIN_K + sm0 + (lane >> 2) + 8] = grow[1];
    }
#else
    if (vs == 0 && threadIdx.x == 0) p.seg_g[(i64)z * p.H + h] = gsum;
#endif
}

extern "C" __global__ void __launch_bounds__(LIN_THREADS, 2) lin_state_fwd(const LinParams p) {
    lin_state_pass<false, false>(p);
}
extern "C" __global__ void __launch_bounds__(LIN_THREADS, 2) lin_state_rev(const LinParams p) {
    lin_state_pass<true, false>(p);
}
extern "C" __global__ void __launch_bounds__(LIN_THREADS, 2) lin_state_fwd_mat(const LinParams p) {
    lin_state_pass<false, true>(p);
}
extern "C" __global__ void __launch_bounds__(LIN_THREADS, 2) lin_state_rev_mat(const LinParams p) {
    lin_state_pass<true, true>(p);
}

// Grid (ceil(K V / 256), H, seqs) of 256 threads; `rev` picks the direction.
extern "C" __global__ void __launch_bounds__(256) lin_seg_scan(const LinParams p, int rev) {
    const int e = blockIdx.x * 256 + threadIdx.x, h = blockIdx.y, n = blockIdx.z;
    if (e >= LIN_K * LIN_V) return;
    int b, t0, t1;
    lin_seq(p, n, b, t0, t1);
    // Segments this sequence has (at least one, even when empty).
    const int ns = la_imax(1, (t1 - t0 + p.seg_len - 1) / p.seg_len);
    const i64 base = (i64)n * p.nseg;
    float* buf = rev ? p.seg_r : p.seg_f;
    auto at = [&](int j) -> float& { return buf[((base + j) * p.H + h) * LIN_K * LIN_V + e]; };
    const i64 sidx = ((i64)n * p.H + h) * LIN_K * LIN_V + e;
    // Batches of 8 segments: every load of a batch before its stores (the loads of one thread
    // would otherwise wait for each other behind the stores to the same buffer).
    constexpr int NB = 8;
    float s = rev ? (p.has_dsfin ? p.dsfin[sidx] : 0.f) : (p.has_s0 ? p.s0[sidx] : 0.f);
    for (int i0 = 0; i0 < ns; i0 += NB) {
        float a[NB], f[NB];
#pragma unroll
        for (int u = 0; u < NB; u++) {
            const int j = rev ? ns - 1 - (i0 + u) : i0 + u;  // segment, in scan order
            // A_j / R_j exist for every segment but the last (forward) / first (reverse).
            const bool has = i0 + u < ns && (rev ? j > 0 : j + 1 < ns);
            a[u] = has ? at(j) : 0.f;
            // G_j: per head, or per state row (e / V) under gates.
            f[u] = has ? lin_exp(LIN_GLA ? p.seg_g[((base + j) * p.H + h) * LIN_K + e / LIN_V]
                                         : p.seg_g[(base + j) * p.H + h])
                       : 0.f;
        }
#pragma unroll
        for (int u = 0; u < NB; u++) {
            if (i0 + u >= ns) break;
            at(rev ? ns - 1 - (i0 + u) : i0 + u) = s;
            s = f[u] * s + a[u];
        }
    }
}
