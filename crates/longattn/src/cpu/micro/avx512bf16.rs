//! AVX-512 BF16 path: `vdpbf16ps` dot products of (even, odd) pairs, f32 accumulation.
//!
//! One `vdpbf16ps` does 16 lanes x 2 products. Q and K are bf16 already (no rounding beyond the
//! input's); P is rounded to bf16 before the P V product, as the GPU flash kernels do; the
//! softmax statistics (m, l) and O stay f32.
use super::avx512::{chunk_ptrs, col_masks, softmax_rows_bf16, Chunks};
use super::{check_pv, check_qk, check_softmax, Logits, Micro, LDP, NC};
use std::arch::x86_64::*;

pub struct Avx512Bf16;

#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
fn dot2(acc: __m512, a: __m512i, b: __m512i) -> __m512 {
    // SAFETY: __m512i and __m512bh are both 512-bit vectors; this reinterprets the bits.
    unsafe {
        _mm512_dpbf16_ps(
            acc,
            std::mem::transmute::<__m512i, __m512bh>(a),
            std::mem::transmute::<__m512i, __m512bh>(b),
        )
    }
}

/// S block: per dim pair (2d, 2d+1), 4 loads of 16 keys x 2 dims, R broadcasts of Q's pair.
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn qk_block<const R: usize>(
    q: *const u32,
    dq2: usize,
    kt: *const u32,
    s: *mut f32,
    lds: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); 4]; R];
    for d2 in 0..dq2 {
        let k = kt.add(d2 * NC);
        let kv = [
            _mm512_loadu_si512(k as *const _),
            _mm512_loadu_si512(k.add(16) as *const _),
            _mm512_loadu_si512(k.add(32) as *const _),
            _mm512_loadu_si512(k.add(48) as *const _),
        ];
        for (r, accr) in acc.iter_mut().enumerate() {
            let qb = _mm512_set1_epi32(*q.add(r * dq2 + d2) as i32);
            for z in 0..4 {
                accr[z] = dot2(accr[z], qb, kv[z]);
            }
        }
    }
    for (r, accr) in acc.iter().enumerate() {
        for (z, a) in accr.iter().enumerate() {
            _mm512_storeu_ps(s.add(r * lds + 16 * z), *a);
        }
    }
}

#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn qk_impl(q: &[u16], rows: usize, dq: usize, kt: &[u16], s: &mut [f32], lds: usize) {
    let dq2 = dq / 2;
    let (q, kt, s) = (
        q.as_ptr() as *const u32,
        kt.as_ptr() as *const u32,
        s.as_mut_ptr(),
    );
    by_row_blocks!(
        rows,
        r,
        qk_block(q.add(r * dq2), dq2, kt, s.add(r * lds), lds)
    );
}

/// O block: per key pair (2c, 2c+1) of every chunk of the group, 4 loads of 16 dims x 2 keys,
/// R broadcasts of P's pair; the accumulators stay in registers across the group.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pv_block<const R: usize>(
    p: *const u32,
    width2: usize,
    vt: &Chunks<u16>,
    dv: usize,
    x0: usize,
    alpha: *const f32,
    o: *mut f32,
) {
    let km = col_masks(x0, dv);
    let mut acc = [[_mm512_setzero_ps(); 4]; R];
    for (r, accr) in acc.iter_mut().enumerate() {
        let a = _mm512_set1_ps(*alpha.add(r));
        for z in 0..4 {
            let ov = _mm512_maskz_loadu_ps(km[z], o.add(r * dv + x0 + 16 * z));
            accr[z] = _mm512_mul_ps(a, ov);
        }
    }
    for g in 0..vt.1 {
        let vg = vt.0[g] as *const u32;
        for c2 in 0..NC / 2 {
            let v = vg.add(c2 * dv + x0) as *const i32;
            let vv = [
                _mm512_maskz_loadu_epi32(km[0], v),
                _mm512_maskz_loadu_epi32(km[1], v.add(16)),
                _mm512_maskz_loadu_epi32(km[2], v.add(32)),
                _mm512_maskz_loadu_epi32(km[3], v.add(48)),
            ];
            for (r, accr) in acc.iter_mut().enumerate() {
                let pb = _mm512_set1_epi32(*p.add(r * width2 + g * NC / 2 + c2) as i32);
                for z in 0..4 {
                    accr[z] = dot2(accr[z], pb, vv[z]);
                }
            }
        }
    }
    for (r, accr) in acc.iter().enumerate() {
        for (z, a) in accr.iter().enumerate() {
            _mm512_mask_storeu_ps(o.add(r * dv + x0 + 16 * z), km[z], *a);
        }
    }
}

#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pv_impl(p: &[u16], rows: usize, vt: &[&[u16]], dv: usize, alpha: &[f32], o: &mut [f32]) {
    // P rows as u32 (bf16 key pairs), LDP / 2 pairs apart.
    let (ch, width2) = (chunk_ptrs(vt), LDP / 2);
    let (p, a, o) = (p.as_ptr() as *const u32, alpha.as_ptr(), o.as_mut_ptr());
    // Column slabs outermost: the group's V panel of one slab stays in L1 across row blocks.
    for x0 in (0..dv).step_by(64) {
        by_row_blocks!(
            rows,
            r,
            pv_block(
                p.add(r * width2),
                width2,
                &ch,
                dv,
                x0,
                a.add(r),
                o.add(r * dv)
            )
        );
    }
}

// SAFETY: `Avx512Bf16` is only constructed after `is_x86_feature_detected!` confirms avx512f and
// avx512bf16; the driver allocates the pair layouts with even Dp (module docs of `micro`), so
// every 32-bit load of a pair stays inside its slice; the asserts check the slice lengths.
impl Micro for Avx512Bf16 {
    type P = u16;
    const PAIRS: bool = true;
    const GROUP: usize = 4;
    const DIM_ALIGN: usize = 2;
    const DV_ALIGN: usize = 1;
    const NAME: &'static str = "avx512bf16";

    fn qk(&self, q: &[u16], rows: usize, dq: usize, kt: &[u16], s: &mut [f32], lds: usize) {
        assert!(dq.is_multiple_of(2));
        check_qk(q, rows, dq, kt, s, lds);
        unsafe { qk_impl(q, rows, dq, kt, s, lds) }
    }

    fn softmax(
        &self,
        s: &[f32],
        rows: usize,
        w: usize,
        mask: &[u64],
        logits: &Logits,
        m: &mut [f32],
        l: &mut [f32],
        alpha: &mut [f32],
        p: &mut [u16],
    ) {
        check_softmax(s, rows, w, mask, p);
        unsafe {
            softmax_rows_bf16(
                s,
                rows,
                w,
                mask,
                logits,
                m,
                l,
                alpha,
                p.as_mut_ptr() as *mut u8,
            )
        }
    }

    fn pv(&self, p: &[u16], rows: usize, vt: &[&[u16]], dv: usize, alpha: &[f32], o: &mut [f32]) {
        check_pv(p, rows, vt, dv, o);
        unsafe { pv_impl(p, rows, vt, dv, alpha, o) }
    }
}
