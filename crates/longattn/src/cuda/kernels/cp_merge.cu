// The ring's LSE merge on the GPU (crates/longattn/src/cp/loopback.rs; its host twin is the
// loopback's `merge_host`, and the CPU schemes' `cp::block::merge_rows`).
// Needs common.cuh and LA_F16 (the storage type of the partial output).
//
// A block's partial result (o_part in the storage type, lse_part f32) is merged into a rank's
// running result (o_acc, lse_acc, f32), per (batch, head, row):
//   M = max(lse_acc, lse_part),   lse = M + ln(exp(lse_acc - M) + exp(lse_part - M))
//   o_acc <- exp(lse_acc - lse) o_acc + exp(lse_part - lse) o_part
// which is lse = ln(sum_i exp(lse_i)), o = sum_i exp(lse_i - lse) o_i over the blocks merged so
// far. A partial row with no key (lse_part = -inf) leaves the running row as it is; the running
// result starts at (0, -inf), so its first block is taken as it is (weight exp(-inf) = 0 on the
// start).
//
// Layouts: o_acc [B, rows, H, D] with the block's rows at row0 .. row0 + len; lse_acc [B, H, rows];
// o_part [B, len, H, D]; lse_part [B, H, len]. One warp per (b, h, i), lanes over D.
extern "C" __global__ void __launch_bounds__(128) la_cp_merge(
    float* __restrict__ o_acc, float* __restrict__ lse_acc, const u16* __restrict__ o_part,
    const float* __restrict__ lse_part, int batch, int heads, int rows, int row0, int len, int d) {
    const i64 w = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (w >= (i64)batch * heads * len) return;
    const int i = (int)(w % len);
    const int h = (int)((w / len) % heads);
    const int b = (int)(w / ((i64)len * heads));
    const float lp = lse_part[((i64)b * heads + h) * len + i];
    if (lp == -LA_INF) return;
    float* la = lse_acc + ((i64)b * heads + h) * rows + row0 + i;
    const float l0 = *la;
    const float m = fmaxf(l0, lp);
    const float e0 = expf(l0 - m), e1 = expf(lp - m);  // l0 = -inf: e0 = 0
    const float s = e0 + e1;
    const float w0 = e0 / s, w1 = e1 / s;
    float* oa = o_acc + (((i64)b * rows + row0 + i) * heads + h) * d;
    const u16* op = o_part + (((i64)b * len + i) * heads + h) * d;
    for (int c = lane; c < d; c += 32) oa[c] = w0 * oa[c] + w1 * la_to_f32(op[c]);
    __syncwarp();  // every lane has read l0 before it is replaced
    if (lane == 0) *la = m + logf(s);
}
