#include <random>
std::mt19937_64 rng(99);
float nrm() { std::normal_distribution<float> d; return d(rng); }
int main(int argc, char** argv) {
    const int B = 3, H = 4, Hk = 2, K = LIN_K, V = LIN_V;
    int decay = atoi(argv[1]);
    // strided q: head stride K + 8
    const int qhs = K + 8;
    std::vector<u16> q(B * H * qhs), k(B * Hk * K), v(B * Hk * V), o(B * H * V, 0x7fc1);
    for (auto& e : q) e = f2el(nrm());
    for (auto& e : k) e = f2el(nrm());
    for (auto& e : v) e = f2el(nrm());
    std::vector<float> g(decay == 1 ? H : decay == 2 ? B * H : B * H * K);
    for (auto& e : g) e = -fabsf(nrm());
    std::vector<float> S((size_t)B * H * K * V);
    for (auto& e : S) e = nrm();
    std::vector<double> rs(S.begin(), S.end()), ro(B * H * V, 0);
    float scale = 0.3f;
    for (int b = 0; b < B; b++) for (int h = 0; h < H; h++) {
        int kh = h / (H / Hk);
        for (int i = 0; i < K; i++) {
            double gi = decay == 0 ? 0 : decay == 1 ? g[h] : decay == 2 ? g[b * H + h] : g[(b * H + h) * K + i];
            double a = exp(gi), ki = la_to_f32(k[(b * Hk + kh) * K + i]), qi = la_to_f32(q[(b * H + h) * qhs + i]);
            for (int j = 0; j < V; j++) {
                double& s = rs[(((size_t)b * H + h) * K + i) * V + j];
                s = a * s + ki * la_to_f32(v[(b * Hk + kh) * V + j]);
                ro[(b * H + h) * V + j] += scale * qi * s;
            }
        }
    }
    LinParams p; memset(&p, 0, sizeof p);
    p.q = q.data(); p.k = k.data(); p.v = v.data(); p.o = o.data(); p.g = g.data(); p.sfin = S.data();
    i64 qs[3] = {H * qhs, H * qhs, qhs}, ks[3] = {Hk * K, Hk * K, K}, vs[3] = {Hk * V, Hk * V, V}, os[3] = {H * V, H * V, V};
    memcpy(p.q_s, qs, 24); memcpy(p.k_s, ks, 24); memcpy(p.v_s, vs, 24); memcpy(p.o_s, os, 24);
    p.B = B; p.T = 1; p.H = H; p.Hk = Hk; p.seqs = B; p.decay = decay; p.scale = scale;
    emu_launch([&] { lin_step(p); }, H, B, 1, 256);
    double eo = 0, mo = 0, es = 0, ms = 0;
    for (size_t i = 0; i < ro.size(); i++) { eo = std::max(eo, fabs(la_to_f32(o[i]) - ro[i])); mo = std::max(mo, fabs(ro[i])); }
    for (size_t i = 0; i < rs.size(); i++) { es = std::max(es, fabs(S[i] - rs[i])); ms = std::max(ms, fabs(rs[i])); }
    printf("step decay %d: out %.3e state %.3e\n", decay, eo / mo, es / ms);
}
