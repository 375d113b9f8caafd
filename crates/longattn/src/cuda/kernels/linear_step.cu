// Linear attention decode step: one token for each of B sequences and H query heads, the state
// [B, H, K, V] (f32) updated in place. Shared pieces: linear_common.cuh (LinParams).
//   S <- diag(a) S + k^T v,   o = scale q S,   a = exp(g) (none: 1; per head; per (b, h);
//   gate: per (b, h, key dim))
// q [B, 1, H, K], k [B, 1, Hk, K], v [B, 1, Hk, V] (strided, head dim contiguous), o [B, 1, H, V].
//
// Memory-bound (one read and one write of the state): block (h, b) of 256 threads streams the
// K x V state once; a thread owns 4 consecutive columns (16-byte vectors, coalesced: a warp covers 512
// contiguous bytes at V = 128) of every (256 / (V / 4))-th row, and the column sums of q S are
// reduced across row groups in shared memory. Ladder (B 64, H 32, 128 x 128, H200): v1 (this one)
// 125.5 us, 2.14 TB/s = 51% of copy; v2 loaded all of a thread's rows before updating any: 154.5
// us, 46% (slower; reverted).
#define LIN_STEP_THREADS 256
#define LIN_C4 (LIN_V / 4)
#define LIN_RG (LIN_STEP_THREADS / LIN_C4)

extern "C" __global__ void __launch_bounds__(LIN_STEP_THREADS) lin_step(const LinParams p) {
    __shared__ float red[LIN_RG][LIN_V];
    __shared__ float sq[LIN_K], sk[LIN_K], sa[LIN_K];
    const int h = blockIdx.x, b = blockIdx.y;
    const int kh = h / (p.H / p.Hk);
    const int t = threadIdx.x, c = t % LIN_C4, rg = t / LIN_C4;
    const u16* q = p.q + b * p.q_s[0] + h * p.q_s[2];
    const u16* k = p.k + b * p.k_s[0] + kh * p.k_s[2];
    const u16* v = p.v + b * p.v_s[0] + kh * p.v_s[2];
    for (int i = t; i < LIN_K; i += LIN_STEP_THREADS) {
        sq[i] = la_to_f32(q[i]);
        sk[i] = la_to_f32(k[i]);
        float gi = 0.f;
        if (p.decay == 1) gi = p.g[h];
        else if (p.decay == 2) gi = p.g[(i64)b * p.H + h];
        else if (p.decay == 3) gi = p.g[((i64)b * p.H + h) * LIN_K + i];
        sa[i] = lin_exp(gi);
    }
    float vv[4];
#pragma unroll
    for (int e = 0; e < 4; e++) vv[e] = la_to_f32(v[4 * c + e]);
    __syncthreads();
    float* S = p.sfin + ((i64)b * p.H + h) * LIN_K * LIN_V;
    float o[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll 4
    for (int i = rg; i < LIN_K; i += LIN_RG) {
        lin_f4* row = (lin_f4*)(S + (i64)i * LIN_V) + c;
        lin_f4 s = *row;
        const float a = sa[i], ki = sk[i], qi = sq[i];
        s.x = a * s.x + ki * vv[0];
        s.y = a * s.y + ki * vv[1];
        s.z = a * s.z + ki * vv[2];
        s.w = a * s.w + ki * vv[3];
        *row = s;
        o[0] += qi * s.x;
        o[1] += qi * s.y;
        o[2] += qi * s.z;
        o[3] += qi * s.w;
    }
#pragma unroll
    for (int e = 0; e < 4; e++) red[rg][4 * c + e] = o[e];
    __syncthreads();
    u16* go = p.o + b * p.o_s[0] + h * p.o_s[2];
    for (int j = 2 * t; j < LIN_V; j += 2 * LIN_STEP_THREADS) {
        float x0 = 0.f, x1 = 0.f;
#pragma unroll
        for (int r = 0; r < LIN_RG; r++) {
            x0 += red[r][j];
            x1 += red[r][j + 1];
        }
        *(u32*)(go + j) = la_pack2(p.scale * x0, p.scale * x1);
    }
}
