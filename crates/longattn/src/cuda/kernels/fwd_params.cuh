// Parameters of the forward kernels; field for field `LaFwdParams` in cuda/forward.rs.
struct LaFwdParams {
    const u16* q; const u16* k; const u16* v; u16* o; float* lse;
    i64 q_sb, q_ss, q_sh;   // element strides of q (batch, seq, head); head dim contiguous
    i64 k_sb, k_ss, k_sh;
    i64 v_sb, v_ss, v_sh;
    i64 o_sb, o_ss, o_sh;
    int B, Sq, Sk, Hq, Hk;
    float scale_log2;       // scale * log2 e (no soft-cap) or log2 e (soft-cap)
    float cap_pre;          // scale / c (soft-cap)
    float cap_post;         // c (soft-cap)
    const u32* sched_off; const u32* sched_ent;
    int sched_batch, sched_heads, q_tiles, pad0;
    const int* qdoc; const int* kdoc;   // document ids [B * Sq], [B * Sk] (document masks)
    const unsigned char* blk;           // explicit block mask (block-mask programs)
    int blk_tq, blk_tk, blk_qtiles, blk_ktiles, blk_batch, blk_heads;
    const int* dlo; const int* dhi;     // per (b, i): first / last key of the row's document run
                                        // (interval mask programs; documents as contiguous runs)
    const u32* mbits; const u32* mbix;  // Partial tiles' mask bits, entry -> table tile (mask_bits.cu)
    const u32* mgrp;                    // per table tile: 64-row groups with an allowed key
    int mc[LA_MASK_CONSTS];             // the mask program's atom constants (mask/codegen.rs)
};
// 288 bytes of pointers, strides and ints (no implicit padding) + 128 of mask constants; checked
// against size_of::<LaFwdParams>() on the host.
static_assert(sizeof(LaFwdParams) == 416, "LaFwdParams must match cuda/forward.rs");
