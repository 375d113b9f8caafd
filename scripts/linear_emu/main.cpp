// Test driver: random problem, kernels on the emulator, f64 recurrence as the reference.
#include <random>
std::mt19937_64 rng(1234);
float nrm() { std::normal_distribution<float> d; return d(rng); }
float uni() { std::uniform_real_distribution<float> d; return d(rng); }

struct Prob {
    int B, T, H, Hk, K, V, decay; // decay 0 none 1 head 2 token 3 gate (per key dim)
    std::vector<int> cu; // empty: no varlen
    bool s0, dsf;
    float gmin;
};

int main(int argc, char** argv) {
    Prob P;
    P.B = atoi(argv[1]); P.T = atoi(argv[2]); P.H = atoi(argv[3]); P.Hk = atoi(argv[4]);
    P.K = LIN_K; P.V = LIN_V; P.decay = atoi(argv[5]); P.s0 = atoi(argv[6]); P.dsf = P.s0;
    P.gmin = atof(argv[7]);
    for (int i = 8; i < argc; i++) P.cu.push_back(atoi(argv[i]));
    const int B = P.B, T = P.T, H = P.H, Hk = P.Hk, K = P.K, V = P.V;
    const int seqs = P.cu.empty() ? B : (int)P.cu.size() - 1;
    // Strided q: rows padded by 8 (head stride K + 8).
    const int qhs = K + 8;
    std::vector<u16> q((size_t)B * T * H * qhs, 0x7fc1), k((size_t)B * T * Hk * K), v((size_t)B * T * Hk * V), dout((size_t)B * T * H * V);
    auto fill = [&](std::vector<u16>& x) { for (auto& e : x) e = f2el(nrm()); };
    for (auto& e : q) e = f2el(nrm());
    fill(k); fill(v); fill(dout);
    auto Q = [&](int b, int t, int h, int i) { return (double)la_to_f32(q[(((size_t)b * T + t) * H + h) * qhs + i]); };
    auto Kf = [&](int b, int t, int h, int i) { return (double)la_to_f32(k[(((size_t)b * T + t) * Hk + h) * K + i]); };
    auto Vf = [&](int b, int t, int h, int i) { return (double)la_to_f32(v[(((size_t)b * T + t) * Hk + h) * V + i]); };
    auto DO = [&](int b, int t, int h, int i) { return (double)la_to_f32(dout[(((size_t)b * T + t) * H + h) * V + i]); };
    std::vector<float> g;
    if (P.decay == 1) for (int h = 0; h < H; h++) g.push_back(-0.3f * uni());
    // EMU_CONST_G=1: every token decays by exactly gmin.
    if (P.decay == 2) for (int i = 0; i < B * T * H; i++) g.push_back(getenv("EMU_CONST_G") ? P.gmin : P.gmin * uni());
    // Gates: EMU_GATE_MIX=1 makes every 4th dimension decay by gmin exactly (strong) and the rest
    // by gmin * uni() / 50 (weak), so chunks of both forms occur.
    if (P.decay == 3)
        for (int i = 0; i < B * T * H * K; i++)
            g.push_back(getenv("EMU_GATE_MIX") ? (i % 4 == 0 ? P.gmin : P.gmin * uni() / 50) : P.gmin * uni());
    auto G = [&](int b, int t, int h) -> double { return P.decay == 0 || P.decay == 3 ? 0 : P.decay == 1 ? g[h] : g[((size_t)b * T + t) * H + h]; };
    auto GK = [&](int b, int t, int h, int i) -> double { return P.decay == 3 ? g[(((size_t)b * T + t) * H + h) * K + i] : G(b, t, h); };
    const size_t SL = (size_t)seqs * H * K * V;
    std::vector<float> s0(SL), dsf(SL);
    for (auto& e : s0) e = nrm();
    for (auto& e : dsf) e = nrm();
    float scale = 1.0f / sqrtf((float)K);

    // ---- reference
    std::vector<double> ro((size_t)B * T * H * V, 0), rfin(SL), rdq((size_t)B * T * H * K, 0), rdk((size_t)B * T * Hk * K, 0),
        rdv((size_t)B * T * Hk * V, 0), rdg((size_t)B * T * H * (P.decay == 3 ? K : 1), 0), rd0(SL);
    for (int n = 0; n < seqs; n++) {
        int b = P.cu.empty() ? n : 0, t0 = P.cu.empty() ? 0 : P.cu[n], t1 = P.cu.empty() ? T : P.cu[n + 1];
        for (int h = 0; h < H; h++) {
            int kh = h / (H / Hk);
            std::vector<std::vector<double>> st;
            std::vector<double> S(K * V, 0);
            if (P.s0) for (int i = 0; i < K * V; i++) S[i] = s0[((size_t)n * H + h) * K * V + i];
            st.push_back(S);
            for (int t = t0; t < t1; t++) {
                for (int i = 0; i < K; i++) {
                    double a = exp(GK(b, t, h, i));
                    for (int j = 0; j < V; j++) S[i * V + j] = a * S[i * V + j] + Kf(b, t, kh, i) * Vf(b, t, kh, j);
                }
                for (int j = 0; j < V; j++) { double o = 0; for (int i = 0; i < K; i++) o += scale * Q(b, t, h, i) * S[i * V + j]; ro[(((size_t)b * T + t) * H + h) * V + j] = o; }
                st.push_back(S);
            }
            for (int i = 0; i < K * V; i++) rfin[((size_t)n * H + h) * K * V + i] = S[i];
            std::vector<double> Gm(K * V, 0);
            if (P.dsf) for (int i = 0; i < K * V; i++) Gm[i] = dsf[((size_t)n * H + h) * K * V + i];
            for (int t = t1 - 1; t >= t0; t--) {
                auto& St = st[t - t0 + 1]; auto& Sp = st[t - t0];
                for (int i = 0; i < K; i++) for (int j = 0; j < V; j++) Gm[i * V + j] += scale * Q(b, t, h, i) * DO(b, t, h, j);
                for (int i = 0; i < K; i++) {
                    double aq = 0, ak = 0, accg = 0;
                    for (int j = 0; j < V; j++) { aq += DO(b, t, h, j) * St[i * V + j]; ak += Vf(b, t, kh, j) * Gm[i * V + j]; accg += Gm[i * V + j] * Sp[i * V + j]; }
                    rdq[(((size_t)b * T + t) * H + h) * K + i] += scale * aq;
                    rdk[(((size_t)b * T + t) * Hk + kh) * K + i] += ak;
                    // dL/dg_t[i] = a_t[i] sum_j dS_t[i][j] S_{t-1}[i][j] (summed over i for a scalar decay)
                    const double ai = exp(GK(b, t, h, i));
                    if (P.decay == 3) rdg[(((size_t)b * T + t) * H + h) * K + i] += ai * accg;
                    else rdg[((size_t)b * T + t) * H + h] += ai * accg;
                }
                for (int j = 0; j < V; j++) { double acc = 0; for (int i = 0; i < K; i++) acc += Kf(b, t, kh, i) * Gm[i * V + j]; rdv[(((size_t)b * T + t) * Hk + kh) * V + j] += acc; }
                for (int i = 0; i < K; i++) { const double ai = exp(GK(b, t, h, i)); for (int j = 0; j < V; j++) Gm[i * V + j] *= ai; }
            }
            for (int i = 0; i < K * V; i++) rd0[((size_t)n * H + h) * K * V + i] = Gm[i];
        }
    }

    // ---- kernels
    std::vector<u16> o((size_t)B * T * H * V, 0x7fc1), dq((size_t)B * T * H * K, 0x7fc1), dk((size_t)B * T * Hk * K, 0x7fc1), dv((size_t)B * T * Hk * V, 0x7fc1);
    const int GW = P.decay == 3 ? K : 1;  // db / dg per key dim under gates
    std::vector<float> fin(SL, NAN), ds0(SL, NAN), db((size_t)B * T * H * GW, 0), dgo((size_t)B * T * H * GW, NAN);
    if (P.decay == 3) printf("gate: %s\n", LIN_GLA ? "GLA build" : "NOT a GLA build (expect garbage)");
    std::vector<float> dka((size_t)B * T * Hk * K, 0), dva((size_t)B * T * Hk * V, 0);
    LinParams p;
    memset(&p, 0, sizeof p);
    p.q = q.data(); p.k = k.data(); p.v = v.data(); p.dout = dout.data();
    p.o = o.data(); p.dq = dq.data(); p.dk = dk.data(); p.dv = dv.data();
    p.dk_acc = dka.data(); p.dv_acc = dva.data();
    p.g = g.data(); p.s0 = s0.data(); p.sfin = fin.data(); p.dsfin = dsf.data(); p.ds0 = ds0.data(); p.db = db.data();
    p.cu = P.cu.data();
    i64 qs[3] = {(i64)T * H * qhs, (i64)H * qhs, qhs}, ks[3] = {(i64)T * Hk * K, (i64)Hk * K, K}, vs[3] = {(i64)T * Hk * V, (i64)Hk * V, V},
        hs[3] = {(i64)T * H * V, (i64)H * V, V}, hq[3] = {(i64)T * H * K, (i64)H * K, K};
    memcpy(p.q_s, qs, 24); memcpy(p.k_s, ks, 24); memcpy(p.v_s, vs, 24); memcpy(p.do_s, hs, 24); memcpy(p.o_s, hs, 24);
    memcpy(p.dq_s, hq, 24); memcpy(p.dk_s, ks, 24); memcpy(p.dv_s, vs, 24);
    p.B = B; p.T = T; p.H = H; p.Hk = Hk; p.seqs = seqs; p.decay = P.decay; p.has_s0 = P.s0; p.has_cu = !P.cu.empty();
    p.has_dsfin = P.dsf; p.want_db = P.decay >= 2; p.gqa_acc = H != Hk; p.scale = scale;
    p.nseg = 1;
    // Segments: EMU_SEG tokens each (the host's choice on the GPU); the buffers start as NaN so
    // that a read of anything the passes did not write shows.
    const int seg_len = getenv("EMU_SEG") ? atoi(getenv("EMU_SEG")) : 0;
    const int nseg = seg_len > 0 ? std::max(1, (T + seg_len - 1) / seg_len) : 1;
    std::vector<float> segf((size_t)seqs * nseg * H * K * V, NAN), segr(segf.size(), NAN), segg((size_t)seqs * nseg * H * K, NAN);
    p.seg_len = seg_len; p.nseg = nseg;
    p.seg_f = segf.data(); p.seg_r = segr.data(); p.seg_g = segg.data();
    const int zs = seqs * nseg;
    if (nseg > 1) {
        printf("segments: %d of %d tokens\n", nseg, seg_len);
        emu_launch([&] { lin_state_fwd(p); }, V / LIN_BV, H, zs, LIN_THREADS);
        emu_launch([&] { lin_seg_scan(p, 0); }, (K * V + 255) / 256, H, seqs, 256);
    }
    emu_launch([&] { lin_fwd(p); }, V / LIN_BV, H, zs, LIN_THREADS);
#if LIN_NW == 8
    {
    if (nseg > 1) {
        emu_launch([&] { lin_state_rev(p); }, V / LIN_BV, H, zs, LIN_THREADS);
        emu_launch([&] { lin_seg_scan(p, 1); }, (K * V + 255) / 256, H, seqs, 256);
    }
    // EMU_BWD=slice: the sliced kernels; else the chunk-parallel path (per-chunk states, NaN
    // before the walks so that a chunk state read before it is written shows).
    const bool sliced = getenv("EMU_BWD") && !strcmp(getenv("EMU_BWD"), "slice") && P.decay != 3;
    const int nct = (T + LIN_C - 1) / LIN_C;
    const size_t ids = p.has_cu ? (size_t)nct + seqs : (size_t)B * nct;
    std::vector<u16> chf(ids * H * K * V, 0x7fc1), chr(chf.size(), 0x7fc1);
    p.chunk_f = chf.data(); p.chunk_r = chr.data();
    std::vector<float> dgtot(ids * H * K, NAN);
    p.dg = dgo.data(); p.dg_tot = dgtot.data();
    if (P.decay == 3) { db.assign((size_t)seqs * H * K, 0.f); p.db = db.data(); }  // the final state's term
    if (sliced) {
        printf("backward: sliced\n");
        emu_launch([&] { lin_bwd_dv(p); }, V / LIN_BV, H, zs, LIN_THREADS);
        emu_launch([&] { lin_bwd_dq(p); }, K / LIN_BK, H, zs, LIN_THREADS);
        emu_launch([&] { lin_bwd_dk(p); }, K / LIN_BK, H, zs, LIN_THREADS);
    } else {
        printf("backward: chunk-parallel, %zu chunk ids\n", ids);
        emu_launch([&] { lin_state_fwd_mat(p); }, V / LIN_BV, H, zs, LIN_THREADS);
        emu_launch([&] { lin_state_rev_mat(p); }, V / LIN_BV, H, zs, LIN_THREADS);
        emu_launch([&] { lin_bwd_chunk(p); }, (int)ids, H, 1, LIN_THREADS);
    }
    if (P.decay == 2) emu_launch([&] { lin_bwd_dg(p, dgo.data()); }, H, seqs, 1, LIN_DG_THREADS);
#if LIN_GLA
    if (P.decay == 3 && !sliced) {  // dg inside each chunk (lin_bwd_chunk), then the carries
        emu_launch([&] { lin_gla_dg_carry(p); }, H, seqs, 1, K);
        emu_launch([&] { lin_gla_dg_add(p); }, (int)ids, H, 1, LIN_THREADS);
    }
#endif
    }
#endif
    if (H != Hk) {
        for (size_t i = 0; i < dk.size(); i += 2) *(u32*)&dk[i] = la_pack2(dka[i], dka[i + 1]);
        for (size_t i = 0; i < dv.size(); i += 2) *(u32*)&dv[i] = la_pack2(dva[i], dva[i + 1]);
    }
    // Tokens of no sequence (varlen gaps do not exist: cu ends at T) — all written.
    auto cmp = [&](const char* name, auto get, const std::vector<double>& ref) {
        double mx = 1e-30, e = 0;
        for (size_t i = 0; i < ref.size(); i++) mx = std::max(mx, fabs(ref[i]));
        size_t worst = 0;
        for (size_t i = 0; i < ref.size(); i++) { double d = fabs((double)get(i) - ref[i]); if (!(d <= e)) { e = std::isnan(d) ? INFINITY : d; worst = i; } }
        printf("%-6s rel err %.3e (max|ref| %.3e, worst at %zu: got %.5f want %.5f)\n", name, e / mx, mx, worst, (double)get(worst), ref[worst]);
        return e / mx;
    };
    double w = 0;
    w = std::max(w, cmp("out", [&](size_t i) { return la_to_f32(o[i]); }, ro));
    w = std::max(w, cmp("fin", [&](size_t i) { return fin[i]; }, rfin));
#if LIN_NW == 8
    {
    w = std::max(w, cmp("dq", [&](size_t i) { return la_to_f32(dq[i]); }, rdq));
    w = std::max(w, cmp("dk", [&](size_t i) { return la_to_f32(dk[i]); }, rdk));
    w = std::max(w, cmp("dv", [&](size_t i) { return la_to_f32(dv[i]); }, rdv));
    w = std::max(w, cmp("ds0", [&](size_t i) { return ds0[i]; }, rd0));
    if (P.decay >= 2) {
        // dg relative to max |dg| or the largest per-token |q . dq| + |k . dk| (the selftest's scale).
        double fl = 0;
        for (int b = 0; b < B; b++) for (int t = 0; t < T; t++) for (int h = 0; h < H; h++) {
            int kh = h / (H / Hk); double sq = 0, sk = 0;
            for (int i = 0; i < K; i++) { sq += fabs(Q(b, t, h, i) * rdq[(((size_t)b * T + t) * H + h) * K + i]); sk += fabs(Kf(b, t, kh, i) * rdk[(((size_t)b * T + t) * Hk + kh) * K + i]); }
            fl = std::max(fl, sq + sk);
        }
        fl /= 1024;
        double mx = fl, e = 0;
        for (size_t i = 0; i < rdg.size(); i++) { mx = std::max(mx, fabs(rdg[i])); e = std::max(e, fabs((double)dgo[i] - rdg[i])); }
        printf("dg     rel err %.3e against max(max|dg|, per-token (|q.dq|+|k.dk|) / 1024 = %.3e) (selftest: /3)\n", e / mx, fl);
        w = std::max(w, e / mx / 3);
    }
    }
#else
    printf("backward left out (built for 8 warps)\n");
#endif
    printf("WORST %.3e\n", w);
    return 0;
}
