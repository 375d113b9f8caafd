//! AVX-512 f32 path: 16-lane FMA micro-kernels, vectorized exp2 (polynomial + `vscalefps`).
//!
//! Register blocking: `qk` keeps a 6 x 64 block of S in 24 zmm accumulators (per dim: 4 loads of
//! K^T, 6 broadcasts of Q, 24 FMAs); `pv` keeps a 6 x 64 block of O (per key: 4 loads of V, 6
//! broadcasts of P, 24 FMAs).
use super::{check_pv, check_qk, check_softmax, update_max, Logits, Micro, LOG2E, MAXW, NC};
use std::arch::x86_64::*;

pub struct Avx512;

/// 2^x for x <= 8 (inputs below -126 give 2^-126): x = n + f, |f| <= 1/2, 2^f by a degree-5
/// polynomial fitted for relative error on [-1/2, 1/2] (max 8e-8), scaled by 2^n with `vscalefps`.
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) fn exp2_ps(x: __m512) -> __m512 {
    let x = _mm512_max_ps(x, _mm512_set1_ps(-126.0));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
    let f = _mm512_sub_ps(x, n);
    let mut p = _mm512_set1_ps(1.326_697E-3);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.675_46E-3));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550_742_6E-2));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402_212_2E-1));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931_469_5E-1));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.000_000_1));
    _mm512_scalef_ps(p, n)
}

/// 2^x as [`exp2_ps`] with a degree-4 polynomial (max relative error 2.7e-6), for the bf16 paths
/// where p is rounded to bf16 (2^-9) before P V anyway.
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) fn exp2_ps_bf16(x: __m512) -> __m512 {
    let x = _mm512_max_ps(x, _mm512_set1_ps(-126.0));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
    let f = _mm512_sub_ps(x, n);
    let mut p = _mm512_set1_ps(9.560_51E-3);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.591_704E-2));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402_498_1E-1));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931_22E-1));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.999_992E-1));
    _mm512_scalef_ps(p, n)
}

/// tanh(y) = sign(y) (e - 1) / (e + 1) with e = 2^(2 |y| log2 e), |y| clamped so e stays finite.
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) fn tanh_ps(y: __m512) -> __m512 {
    let a = _mm512_abs_ps(y);
    let t = _mm512_min_ps(
        _mm512_mul_ps(a, _mm512_set1_ps(2.0 * LOG2E)),
        _mm512_set1_ps(60.0),
    );
    // exp2 of a non-negative t: 2^t = 1 / 2^-t keeps the polynomial on its tested side.
    let e = _mm512_div_ps(
        _mm512_set1_ps(1.0),
        exp2_ps(_mm512_sub_ps(_mm512_setzero_ps(), t)),
    );
    let r = _mm512_div_ps(
        _mm512_sub_ps(e, _mm512_set1_ps(1.0)),
        _mm512_add_ps(e, _mm512_set1_ps(1.0)),
    );
    let neg = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(y, _mm512_setzero_ps());
    _mm512_mask_sub_ps(r, neg, _mm512_setzero_ps(), r)
}

/// Base-2 logits of 16 raw dot products (see [`Logits::base2`]).
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) fn logits_ps(s: __m512, lg: &Logits) -> __m512 {
    match lg.softcap {
        None => _mm512_mul_ps(s, _mm512_set1_ps(lg.scale * LOG2E)),
        Some(c) => {
            let y = _mm512_mul_ps(s, _mm512_set1_ps(lg.scale / c));
            _mm512_mul_ps(tanh_ps(y), _mm512_set1_ps(c * LOG2E))
        }
    }
}

#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn load_x(s: *const f32, z: usize, fused: bool, lg: &Logits) -> __m512 {
    let sv = _mm512_loadu_ps(s.add(16 * z));
    if fused {
        sv
    } else {
        logits_ps(sv, lg)
    }
}

/// Defines the online-softmax step over all rows of a group, storing p with `$store(out, z, p)`.
///
/// Per row of `w` chunks (4 w zmm of logits):
/// pass 1: m_x = max over allowed lanes; (m', alpha) = update_max(m, m_x);
/// pass 2: p_c = 2^(x_c - m') on allowed lanes, 0 elsewhere; l' = alpha l + sum p.
/// Without soft-cap (and scale > 0) the max is taken over the raw dot products and the scale is
/// folded into one FMA: x_c - m' = s_c (scale log2 e) - m'.
macro_rules! softmax_rows_fn {
    ($name:ident, $features:literal, $psize:literal, $store:ident, $exp2:ident) => {
        #[allow(clippy::too_many_arguments)]
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $name(
            s: &[f32],
            rows: usize,
            w: usize,
            mask: &[u64],
            lg: &Logits,
            m: &mut [f32],
            l: &mut [f32],
            alpha: &mut [f32],
            out: *mut u8,
        ) {
            let fused = lg.softcap.is_none() && lg.scale > 0.0;
            let c2 = lg.scale * LOG2E;
            let (width, lanes) = (w * NC, 4 * w);
            for r in 0..rows {
                let (sr, bits) = (s.as_ptr().add(r * width), &mask[r * MAXW..r * MAXW + w]);
                let pr = out.add(r * width * $psize);
                let mut mxv = _mm512_set1_ps(f32::NEG_INFINITY);
                for z in 0..lanes {
                    let km = (bits[z / 4] >> (16 * (z % 4))) as u16;
                    mxv = _mm512_mask_max_ps(mxv, km, mxv, load_x(sr, z, fused, lg));
                }
                let mut mx = _mm512_reduce_max_ps(mxv);
                if fused {
                    mx *= c2;
                }
                if mx == f32::NEG_INFINITY {
                    // `max` drops NaN: a row whose allowed logits are all NaN (NaN/Inf inputs)
                    // would look empty. NaN among finite logits needs no check: its p is NaN and
                    // poisons l and O below.
                    let mut nan = 0u16;
                    for z in 0..lanes {
                        let km = (bits[z / 4] >> (16 * (z % 4))) as u16;
                        let x = load_x(sr, z, fused, lg);
                        nan |= _mm512_mask_cmp_ps_mask::<_CMP_UNORD_Q>(km, x, x);
                    }
                    if nan != 0 {
                        mx = f32::NAN;
                    }
                }
                let (m_new, a) = update_max(m[r], mx);
                alpha[r] = a;
                if m_new == f32::NEG_INFINITY {
                    for z in 0..lanes {
                        $store(pr, z, _mm512_setzero_ps());
                    }
                    continue;
                }
                let (mv, c2v) = (_mm512_set1_ps(m_new), _mm512_set1_ps(c2));
                let mut sum = _mm512_setzero_ps();
                for z in 0..lanes {
                    let km = (bits[z / 4] >> (16 * (z % 4))) as u16;
                    let x = load_x(sr, z, fused, lg);
                    let arg = if fused {
                        _mm512_fmsub_ps(x, c2v, mv)
                    } else {
                        _mm512_sub_ps(x, mv)
                    };
                    let p = _mm512_maskz_mov_ps(km, $exp2(arg));
                    sum = _mm512_add_ps(sum, p);
                    $store(pr, z, p);
                }
                l[r] = l[r] * a + _mm512_reduce_add_ps(sum);
                m[r] = m_new;
            }
        }
    };
}

#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn store_f32(out: *mut u8, z: usize, p: __m512) {
    _mm512_storeu_ps((out as *mut f32).add(16 * z), p);
}

#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn store_bf16(out: *mut u8, z: usize, p: __m512) {
    let h = std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(p));
    _mm256_storeu_si256((out as *mut __m256i).add(z), h);
}

softmax_rows_fn!(softmax_rows_f32, "avx512f", 4, store_f32, exp2_ps);
softmax_rows_fn!(
    softmax_rows_bf16,
    "avx512f,avx512bf16",
    2,
    store_bf16,
    exp2_ps_bf16
);

#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn qk_block<const R: usize>(
    q: *const f32,
    dq: usize,
    kt: *const f32,
    s: *mut f32,
    lds: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); 4]; R];
    for d in 0..dq {
        let k = kt.add(d * NC);
        let kv = [
            _mm512_loadu_ps(k),
            _mm512_loadu_ps(k.add(16)),
            _mm512_loadu_ps(k.add(32)),
            _mm512_loadu_ps(k.add(48)),
        ];
        for (r, accr) in acc.iter_mut().enumerate() {
            let qb = _mm512_set1_ps(*q.add(r * dq + d));
            for z in 0..4 {
                accr[z] = _mm512_fmadd_ps(qb, kv[z], accr[z]);
            }
        }
    }
    for (r, accr) in acc.iter().enumerate() {
        for (z, a) in accr.iter().enumerate() {
            _mm512_storeu_ps(s.add(r * lds + 16 * z), *a);
        }
    }
}

#[target_feature(enable = "avx512f")]
unsafe fn qk_impl(q: &[f32], rows: usize, dq: usize, kt: &[f32], s: &mut [f32], lds: usize) {
    let (q, kt, s) = (q.as_ptr(), kt.as_ptr(), s.as_mut_ptr());
    by_row_blocks!(
        rows,
        r,
        qk_block(q.add(r * dq), dq, kt, s.add(r * lds), lds)
    );
}

/// Lane masks of the 4 zmm covering columns x0 .. x0 + 64 of a row of `dv` columns.
#[inline]
pub(crate) fn col_masks(x0: usize, dv: usize) -> [u16; 4] {
    let mut km = [0u16; 4];
    for (z, k) in km.iter_mut().enumerate() {
        let start = x0 + 16 * z;
        let n = dv.saturating_sub(start).min(16);
        *k = if n == 16 { 0xFFFF } else { (1u16 << n) - 1 };
    }
    km
}

/// Up to MAXW chunk pointers of a group.
pub(crate) type Chunks<T> = ([*const T; MAXW], usize);

pub(crate) fn chunk_ptrs<T>(vt: &[&[T]]) -> Chunks<T> {
    let mut p = [std::ptr::null(); MAXW];
    for (d, v) in p.iter_mut().zip(vt) {
        *d = v.as_ptr();
    }
    (p, vt.len())
}

/// O block (R rows x 64 columns from x0): alpha O + sum over the group's chunks and keys of
/// p v; accumulators stay in registers across the whole group.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn pv_block<const R: usize>(
    p: *const f32,
    width: usize,
    vt: &Chunks<f32>,
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
    // A full 64-column slab (the common case) takes plain loads; a ragged last slab masks them.
    let full = km == [0xFFFF; 4];
    for g in 0..vt.1 {
        for c in 0..NC {
            let v = vt.0[g].add(c * dv + x0);
            let vv = if full {
                [
                    _mm512_loadu_ps(v),
                    _mm512_loadu_ps(v.add(16)),
                    _mm512_loadu_ps(v.add(32)),
                    _mm512_loadu_ps(v.add(48)),
                ]
            } else {
                [
                    _mm512_maskz_loadu_ps(km[0], v),
                    _mm512_maskz_loadu_ps(km[1], v.add(16)),
                    _mm512_maskz_loadu_ps(km[2], v.add(32)),
                    _mm512_maskz_loadu_ps(km[3], v.add(48)),
                ]
            };
            for (r, accr) in acc.iter_mut().enumerate() {
                let pb = _mm512_set1_ps(*p.add(r * width + g * NC + c));
                for z in 0..4 {
                    accr[z] = _mm512_fmadd_ps(pb, vv[z], accr[z]);
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

#[target_feature(enable = "avx512f")]
unsafe fn pv_impl(p: &[f32], rows: usize, vt: &[&[f32]], dv: usize, alpha: &[f32], o: &mut [f32]) {
    let (ch, width) = (chunk_ptrs(vt), vt.len() * NC);
    let (p, a, o) = (p.as_ptr(), alpha.as_ptr(), o.as_mut_ptr());
    // Column slabs outermost: the group's V panel of one slab (w x 64 keys x 64 columns) stays
    // in L1 while every row block streams over it.
    for x0 in (0..dv).step_by(64) {
        by_row_blocks!(
            rows,
            r,
            pv_block(
                p.add(r * width),
                width,
                &ch,
                dv,
                x0,
                a.add(r),
                o.add(r * dv)
            )
        );
    }
}

// SAFETY (all methods): `Avx512` is only constructed by the dispatcher after
// `is_x86_feature_detected!("avx512f")`; the `check_*` calls assert the slice lengths the
// kernels address.
impl Micro for Avx512 {
    type P = f32;
    const PAIRS: bool = false;
    const GROUP: usize = 2;
    const DIM_ALIGN: usize = 1;
    const DV_ALIGN: usize = 1;
    const NAME: &'static str = "avx512";

    fn qk(&self, q: &[f32], rows: usize, dq: usize, kt: &[f32], s: &mut [f32], lds: usize) {
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
        p: &mut [f32],
    ) {
        check_softmax(s, rows, w, mask, p);
        unsafe {
            softmax_rows_f32(
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

    fn pv(&self, p: &[f32], rows: usize, vt: &[&[f32]], dv: usize, alpha: &[f32], o: &mut [f32]) {
        check_pv(p, rows, vt, dv, o);
        unsafe { pv_impl(p, rows, vt, dv, alpha, o) }
    }
}
