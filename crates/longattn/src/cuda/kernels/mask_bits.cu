// The bit table of a mask's Partial tiles, built once per plan: kernels that read it (LA_MASK_BITS)
// test one bit per element of a Partial tile instead of running the mask program (la_mask) there.
//
// Layout: Partial tile u (the u-th Partial entry of the schedule, in entry order; the plan's
// `mbix[e]` maps schedule entry e to u) holds LA_BR rows of LA_BC / 32 words; bit t of word w of
// row r is 1 iff key la_ktok(kt, 32 w + t) is allowed for query la_qtok(qt, r), and 0 for rows
// past Sq and keys past Sk:
//   bits[u][r][w] = OR_t [i < Sq && j < Sk && la_mask(p, b, h, i, j)] << t,
//   i = la_qtok(qt, r), j = la_ktok(kt, 32 w + t).
// grp[u] has bit g set when rows 64 g .. 64 g + 63 of tile u allow some key (a warpgroup whose
// rows allow none skips the tile); zero on entry.
// One block per Partial tile; tiles[2 u] = its schedule row ((b * sched_heads + h) * q_tiles +
// qt, b and h the schedule's own batch row and head), tiles[2 u + 1] = its key tile kt.
extern "C" __global__ void la_mask_bits(const LaFwdParams p, const u32* __restrict__ tiles,
                                        u32* __restrict__ bits, u32* __restrict__ grp) {
    constexpr int W = LA_BC / 32;
    const int srow = (int)tiles[2 * blockIdx.x], kt = (int)tiles[2 * blockIdx.x + 1];
    const int qt = srow % p.q_tiles, bh = srow / p.q_tiles;
    const int h = bh % p.sched_heads, b = bh / p.sched_heads;
    u32* out = bits + (i64)blockIdx.x * (LA_BR * W);
    for (int x = threadIdx.x; x < LA_BR * W; x += blockDim.x) {
        const int r = x / W, w = x % W;
        const int i = la_qtok(qt, r);
        u32 word = 0;
        if (i < p.Sq) {
            for (int t = 0; t < 32; t++) {
                const int j = la_ktok(kt, 32 * w + t);
                if (j < p.Sk && la_mask(p, b, h, i, j)) word |= 1u << t;
            }
        }
        out[x] = word;
        if (word) atomicOr(&grp[blockIdx.x], 1u << (r / 64));
    }
}
