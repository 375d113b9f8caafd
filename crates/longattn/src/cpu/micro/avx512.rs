//! AVX-512 f32 path: 16-lane FMA micro-kernels, vectorized exp2 (polynomial + `vscalefps`).
//!
//! Register blocking: `qk` keeps a 6 x 64 block of S in 24 zmm accumulators (per dim: 4 loads of
//! K^T, 6 broadcasts of Q, 24 FMAs); `pv` keeps a 6 x 64 block of O (per key: 4 loads of V, 6
//! broadcasts of P, 24 FMAs).
use super::{update_max, Logits, Micro, LOG2E, NC};
use std::arch::x86_64::*;

pub struct Avx512;

/// Rows per register block.
const MR: usize = 6;

/// 2^x for x <= 0 (inputs below -126 give 2^-126): x = n + f, |f| <= 1/2, 2^f by a degree-6
/// polynomial (relative error ~2e-7), then scaled by 2^n with `vscalefps`.
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) fn exp2_ps(x: __m512) -> __m512 {
    let x = _mm512_max_ps(x, _mm512_set1_ps(-126.0));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
    let f = _mm512_sub_ps(x, n);
    let mut p = _mm512_set1_ps(1.535_336_2E-4);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339_887_4E-3));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618_437E-3));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550_332_5E-2));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402_264_8E-1));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931_472E-1));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0));
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

/// The online-softmax step for one row of 64 logits; returns the 4 zmm of p (masked lanes 0),
/// or None when the row has seen no allowed key yet. Shared by the f32, bf16 and AMX paths.
///
/// (m', alpha) = update_max(m, max_c x_c); p_c = 2^(x_c - m'); l' = alpha l + sum p.
/// Without soft-cap (and scale > 0) the max is taken over the raw dot products and the scale is
/// folded into one FMA: x_c - m' = s_c * (scale log2 e) - m'.
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn softmax_row(
    s: *const f32,
    bits: u64,
    lg: &Logits,
    m: &mut f32,
    l: &mut f32,
    alpha: &mut f32,
) -> Option<[__m512; 4]> {
    let fused = lg.softcap.is_none() && lg.scale > 0.0;
    let c2 = _mm512_set1_ps(lg.scale * LOG2E);
    let mut x = [_mm512_setzero_ps(); 4];
    let mut km = [0u16; 4];
    let mut mxv = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut nan = 0u16;
    for z in 0..4 {
        km[z] = (bits >> (16 * z)) as u16;
        let sv = _mm512_loadu_ps(s.add(16 * z));
        x[z] = if fused { sv } else { logits_ps(sv, lg) };
        mxv = _mm512_mask_max_ps(mxv, km[z], mxv, x[z]);
        // NaN logits (NaN/Inf inputs) poison the row instead of being dropped by `max`.
        nan |= _mm512_mask_cmp_ps_mask::<_CMP_UNORD_Q>(km[z], x[z], x[z]);
    }
    let mut mx = _mm512_reduce_max_ps(mxv);
    if fused {
        mx *= lg.scale * LOG2E;
    }
    if nan != 0 {
        mx = f32::NAN;
    }
    let (m_new, a) = update_max(*m, mx);
    *alpha = a;
    if m_new == f32::NEG_INFINITY {
        return None;
    }
    let mv = _mm512_set1_ps(m_new);
    let mut p = [_mm512_setzero_ps(); 4];
    let mut sum = _mm512_setzero_ps();
    for z in 0..4 {
        let arg = if fused {
            _mm512_fmsub_ps(x[z], c2, mv)
        } else {
            _mm512_sub_ps(x[z], mv)
        };
        p[z] = _mm512_maskz_mov_ps(km[z], exp2_ps(arg));
        sum = _mm512_add_ps(sum, p[z]);
    }
    *l = *l * a + _mm512_reduce_add_ps(sum);
    *m = m_new;
    Some(p)
}

#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn qk_block<const R: usize>(q: *const f32, dq: usize, kt: *const f32, s: *mut f32) {
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
            _mm512_storeu_ps(s.add(r * NC + 16 * z), *a);
        }
    }
}

#[target_feature(enable = "avx512f")]
unsafe fn qk_impl(q: &[f32], rows: usize, dq: usize, kt: &[f32], s: &mut [f32]) {
    let mut r = 0;
    while r < rows {
        let (qp, sp) = (q.as_ptr().add(r * dq), s.as_mut_ptr().add(r * NC));
        match rows - r {
            1 => qk_block::<1>(qp, dq, kt.as_ptr(), sp),
            2 => qk_block::<2>(qp, dq, kt.as_ptr(), sp),
            3 => qk_block::<3>(qp, dq, kt.as_ptr(), sp),
            4 => qk_block::<4>(qp, dq, kt.as_ptr(), sp),
            5 => qk_block::<5>(qp, dq, kt.as_ptr(), sp),
            _ => qk_block::<MR>(qp, dq, kt.as_ptr(), sp),
        }
        r += MR;
    }
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

#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn pv_block<const R: usize>(
    p: *const f32,
    keys: usize,
    vt: *const f32,
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
    for c in 0..keys {
        let v = vt.add(c * dv + x0);
        let vv = [
            _mm512_maskz_loadu_ps(km[0], v),
            _mm512_maskz_loadu_ps(km[1], v.add(16)),
            _mm512_maskz_loadu_ps(km[2], v.add(32)),
            _mm512_maskz_loadu_ps(km[3], v.add(48)),
        ];
        for (r, accr) in acc.iter_mut().enumerate() {
            let pb = _mm512_set1_ps(*p.add(r * NC + c));
            for z in 0..4 {
                accr[z] = _mm512_fmadd_ps(pb, vv[z], accr[z]);
            }
        }
    }
    for (r, accr) in acc.iter().enumerate() {
        for (z, a) in accr.iter().enumerate() {
            _mm512_mask_storeu_ps(o.add(r * dv + x0 + 16 * z), km[z], *a);
        }
    }
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
unsafe fn pv_impl(
    p: &[f32],
    rows: usize,
    keys: usize,
    vt: &[f32],
    dv: usize,
    alpha: &[f32],
    o: &mut [f32],
) {
    let mut r = 0;
    while r < rows {
        let (pp, ap, op) = (
            p.as_ptr().add(r * NC),
            alpha.as_ptr().add(r),
            o.as_mut_ptr().add(r * dv),
        );
        for x0 in (0..dv).step_by(64) {
            match rows - r {
                1 => pv_block::<1>(pp, keys, vt.as_ptr(), dv, x0, ap, op),
                2 => pv_block::<2>(pp, keys, vt.as_ptr(), dv, x0, ap, op),
                3 => pv_block::<3>(pp, keys, vt.as_ptr(), dv, x0, ap, op),
                4 => pv_block::<4>(pp, keys, vt.as_ptr(), dv, x0, ap, op),
                5 => pv_block::<5>(pp, keys, vt.as_ptr(), dv, x0, ap, op),
                _ => pv_block::<MR>(pp, keys, vt.as_ptr(), dv, x0, ap, op),
            }
        }
        r += MR;
    }
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_impl(
    s: &[f32],
    rows: usize,
    mask: &[u64],
    lg: &Logits,
    m: &mut [f32],
    l: &mut [f32],
    alpha: &mut [f32],
    p: &mut [f32],
) {
    for r in 0..rows {
        let pr = p.as_mut_ptr().add(r * NC);
        let pz = softmax_row(
            s.as_ptr().add(r * NC),
            mask[r],
            lg,
            &mut m[r],
            &mut l[r],
            &mut alpha[r],
        )
        .unwrap_or([_mm512_setzero_ps(); 4]);
        for (z, pv) in pz.iter().enumerate() {
            _mm512_storeu_ps(pr.add(16 * z), *pv);
        }
    }
}

// SAFETY (all three methods): `Avx512` is only constructed by the dispatcher after
// `is_x86_feature_detected!("avx512f")`; the slices hold at least rows x NC (S, P), rows x dq (Q),
// dq x NC (K^T), keys x dv (V) and rows x dv (O) elements, as the driver allocates them.
impl Micro for Avx512 {
    type P = f32;
    const PAIRS: bool = false;
    const DIM_ALIGN: usize = 1;
    const DV_ALIGN: usize = 1;
    const NAME: &'static str = "avx512";

    fn qk(&self, q: &[f32], rows: usize, dq: usize, kt: &[f32], s: &mut [f32]) {
        debug_assert!(q.len() >= rows * dq && kt.len() >= dq * NC && s.len() >= rows * NC);
        unsafe { qk_impl(q, rows, dq, kt, s) }
    }

    fn softmax(
        &self,
        s: &[f32],
        rows: usize,
        mask: &[u64],
        logits: &Logits,
        m: &mut [f32],
        l: &mut [f32],
        alpha: &mut [f32],
        p: &mut [f32],
    ) {
        debug_assert!(s.len() >= rows * NC && p.len() >= rows * NC && mask.len() >= rows);
        unsafe { softmax_impl(s, rows, mask, logits, m, l, alpha, p) }
    }

    fn pv(
        &self,
        p: &[f32],
        rows: usize,
        keys: usize,
        vt: &[f32],
        dv: usize,
        alpha: &[f32],
        o: &mut [f32],
    ) {
        debug_assert!(p.len() >= rows * NC && vt.len() >= keys * dv && o.len() >= rows * dv);
        unsafe { pv_impl(p, rows, keys, vt, dv, alpha, o) }
    }
}
