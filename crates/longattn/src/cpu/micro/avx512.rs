//! AVX-512 f32 path: 16-lane FMA micro-kernels, vectorized exp2 (polynomial + `vscalefps`).
//!
//! Register blocking: `qk` keeps a 6 x 64 block of S in 24 zmm accumulators (per dim: 4 loads of
//! K^T, 6 broadcasts of Q, 24 FMAs); `pv` keeps a 6 x 64 block of O (per key: 4 loads of V, 6
//! broadcasts of P, 24 FMAs).
use super::{
    check_pv, check_qk, check_softmax, update_max, Logits, Micro, LAZY_SUM, LDP, LDS, LOG2E, MAXW,
    NC,
};
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

/// 2^x for any x (-inf gives 0, NaN stays NaN, x >= 128 gives inf) for the forward softmax:
/// 2^x = 2^floor(x) 2^f with f = x - floor(x) in [0, 1) from one `vreducepsdq` (which gives
/// f = 0 at +-inf); 2^f by a degree-5 polynomial fitted for relative error on [0, 1) (max 1.5e-7
/// in f32 arithmetic); `vscalefps` multiplies by 2^floor(x) itself. No clamp, no rounding step:
/// one instruction fewer than [`exp2_ps`] and exact 0 for masked (-inf) arguments.
#[inline]
#[target_feature(enable = "avx512f,avx512dq")]
pub(crate) fn exp2_floor_ps(x: __m512) -> __m512 {
    let f = _mm512_reduce_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(x);
    let mut p = _mm512_set1_ps(1.877_576_7E-3);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(8.989_341E-3));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.582_631_8E-2));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.401_536_1E-1));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931_531E-1));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.999_999_4E-1));
    _mm512_scalef_ps(p, x)
}

/// 2^x as [`exp2_floor_ps`] with a degree-4 polynomial on [0, 1) (max relative error 2.7e-6),
/// for the bf16 paths where p is rounded to bf16 (2^-9) before P V anyway.
#[inline]
#[target_feature(enable = "avx512f,avx512dq")]
pub(crate) fn exp2_floor_ps_bf16(x: __m512) -> __m512 {
    let f = _mm512_reduce_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(x);
    let mut p = _mm512_set1_ps(1.353_416_8E-2);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.201_146_4E-2));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.414_427_5E-1));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.930_038_3E-1));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.000_002_6));
    _mm512_scalef_ps(p, x)
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

/// The 16-lane mask of vector `z` of a row (lanes 16 z .. 16 z + 16 of its mask words).
#[inline(always)]
fn lane_mask(bits: &[u64], z: usize) -> u16 {
    (bits[z / 4] >> (16 * (z % 4))) as u16
}

/// Defines the online-softmax step over all rows of a group, storing p with
/// `$store2(out, z, p_z, p_{z+1})` (two vectors at a time: the bf16 store packs them into one).
///
/// Per row of `w` chunks (4 w zmm of logits), in base-2 units:
/// - one pass, when the row has a running max m: p_c = 2^(x_c - m) on allowed lanes, 0
///   elsewhere; kept (alpha = 1, l' = l + sum p) when sum p <= [`LAZY_SUM`] (so every p is far
///   from overflow: p is only ever scaled relative to m, and out = O / l, LSE = ln 2 (m + log2 l)
///   hold for any m). Above it (a logit more than ~24 above m; or inf / NaN) the row is redone:
/// - two passes: m_x = max over allowed lanes; (m', alpha) = update_max(m, m_x);
///   p_c = 2^(x_c - m'); l' = alpha l + sum p.
///
/// Without soft-cap (and scale > 0) the max is taken over the raw dot products and the scale is
/// folded into one FMA: x_c - m' = s_c (scale log2 e) - m'. Rows whose mask words are all ones
/// (Full tiles) skip the lane masks.
macro_rules! softmax_rows_fn {
    ($name:ident, $row_p:ident, $features:literal, $psize:literal, $store2:ident, $exp2:ident) => {
        /// p of one row against the offset `mv` (x_c - m, m in base-2 units), 0 on masked lanes
        /// unless `all`; returns sum p.
        #[allow(clippy::too_many_arguments)]
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn $row_p(
            sr: *const f32,
            pr: *mut u8,
            bits: &[u64],
            lanes: usize,
            lg: &Logits,
            fused: bool,
            mv: __m512,
            all: bool,
        ) -> f32 {
            let c2v = _mm512_set1_ps(lg.scale * LOG2E);
            let (mut sum0, mut sum1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            for z in (0..lanes).step_by(2) {
                let mut p = [_mm512_setzero_ps(); 2];
                for (h, ph) in p.iter_mut().enumerate() {
                    let x = load_x(sr, z + h, fused, lg);
                    let arg = if fused {
                        _mm512_fmsub_ps(x, c2v, mv)
                    } else {
                        _mm512_sub_ps(x, mv)
                    };
                    let e = $exp2(arg);
                    *ph = if all {
                        e
                    } else {
                        _mm512_maskz_mov_ps(lane_mask(bits, z + h), e)
                    };
                }
                sum0 = _mm512_add_ps(sum0, p[0]);
                sum1 = _mm512_add_ps(sum1, p[1]);
                $store2(pr, z, p[0], p[1]);
            }
            _mm512_reduce_add_ps(_mm512_add_ps(sum0, sum1))
        }

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
            let lanes = 4 * w;
            for r in 0..rows {
                let (sr, bits) = (s.as_ptr().add(r * LDS), &mask[r * MAXW..r * MAXW + w]);
                let pr = out.add(r * LDP * $psize);
                let all = bits.iter().all(|&b| b == u64::MAX);
                if m[r] > f32::NEG_INFINITY {
                    // One pass against the running max (false for NaN m: two passes).
                    let sum = $row_p(sr, pr, bits, lanes, lg, fused, _mm512_set1_ps(m[r]), all);
                    if sum <= LAZY_SUM {
                        alpha[r] = 1.0;
                        l[r] += sum;
                        continue;
                    }
                }
                let mut mxv = _mm512_set1_ps(f32::NEG_INFINITY);
                for z in 0..lanes {
                    let km = lane_mask(bits, z);
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
                        let x = load_x(sr, z, fused, lg);
                        nan |= _mm512_mask_cmp_ps_mask::<_CMP_UNORD_Q>(lane_mask(bits, z), x, x);
                    }
                    if nan != 0 {
                        mx = f32::NAN;
                    }
                }
                let (m_new, a) = update_max(m[r], mx);
                alpha[r] = a;
                if m_new == f32::NEG_INFINITY {
                    for z in (0..lanes).step_by(2) {
                        $store2(pr, z, _mm512_setzero_ps(), _mm512_setzero_ps());
                    }
                    continue;
                }
                let sum = $row_p(sr, pr, bits, lanes, lg, fused, _mm512_set1_ps(m_new), all);
                l[r] = l[r] * a + sum;
                m[r] = m_new;
            }
        }
    };
}

/// Stores p vectors `z`, `z + 1` of a row as f32.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn store2_f32(out: *mut u8, z: usize, p0: __m512, p1: __m512) {
    _mm512_storeu_ps((out as *mut f32).add(16 * z), p0);
    _mm512_storeu_ps((out as *mut f32).add(16 * z + 16), p1);
}

/// Stores p vectors `z`, `z + 1` of a row as 32 bf16 (round to nearest even) in one store.
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn store2_bf16(out: *mut u8, z: usize, p0: __m512, p1: __m512) {
    // The second operand fills the low half.
    let h = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(p1, p0));
    _mm512_storeu_si512((out as *mut __m256i).add(z) as *mut _, h);
}

softmax_rows_fn!(
    softmax_rows_f32,
    row_p_f32,
    "avx512f,avx512dq",
    4,
    store2_f32,
    exp2_floor_ps
);
softmax_rows_fn!(
    softmax_rows_bf16,
    row_p_bf16,
    "avx512f,avx512dq,avx512bf16",
    2,
    store2_bf16,
    exp2_floor_ps_bf16
);

/// The epilogue of one output row in bf16: `dst[x] = bf16(src[x] * scale)`, round to nearest
/// even, NaN kept (quiet), 16 at a time (the plain `Element::from_f32_scaled` ran 4 at a time:
/// ~9% of a 1k-token forward). `vcvtneps2bf16` flushes results below 2^-126 to 0.
///
/// SAFETY: AVX-512F and AVX-512 BF16 are available.
#[target_feature(enable = "avx512f,avx512bf16")]
pub(crate) unsafe fn scale_to_bf16(src: &[f32], scale: f32, dst: &mut [u16]) {
    assert_eq!(src.len(), dst.len());
    let (n, sv) = (src.len(), _mm512_set1_ps(scale));
    let mut x = 0;
    while x + 16 <= n {
        let v = _mm512_mul_ps(_mm512_loadu_ps(src.as_ptr().add(x)), sv);
        let h = std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(v));
        _mm256_storeu_si256(dst.as_mut_ptr().add(x) as *mut __m256i, h);
        x += 16;
    }
    for (d, &s) in dst[x..].iter_mut().zip(&src[x..]) {
        *d = half::bf16::from_f32(s * scale).to_bits();
    }
}

/// The epilogue of one output row in f32: `dst[x] = src[x] * scale`, 16 at a time.
///
/// SAFETY: AVX-512F is available.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn scale_f32(src: &[f32], scale: f32, dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len());
    let (n, sv) = (src.len(), _mm512_set1_ps(scale));
    let mut x = 0;
    while x + 16 <= n {
        let v = _mm512_mul_ps(_mm512_loadu_ps(src.as_ptr().add(x)), sv);
        _mm512_storeu_ps(dst.as_mut_ptr().add(x), v);
        x += 16;
    }
    for (d, &s) in dst[x..].iter_mut().zip(&src[x..]) {
        *d = s * scale;
    }
}

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
    let ch = chunk_ptrs(vt);
    let (p, a, o) = (p.as_ptr(), alpha.as_ptr(), o.as_mut_ptr());
    // Column slabs outermost: the group's V panel of one slab (w x 64 keys x 64 columns) stays
    // in L1 while every row block streams over it.
    for x0 in (0..dv).step_by(64) {
        by_row_blocks!(
            rows,
            r,
            pv_block(p.add(r * LDP), LDP, &ch, dv, x0, a.add(r), o.add(r * dv))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// 2^x of 16 lanes through `f`, checked against f64: relative error at most `tol` where 2^x
    /// is a normal f32, absolute 2^-126 tol below it, and the special values exact.
    fn check_exp2(f: unsafe fn(__m512) -> __m512, tol: f64) {
        let mut xs: Vec<f32> = (-2_600_000..=1_270_000).map(|i| i as f32 * 1e-4).collect();
        xs.extend([
            -1e-30,
            1e-30,
            -0.0,
            0.0,
            0.5,
            -0.5,
            0.999_999_9,
            -0.999_999_9,
        ]);
        xs.extend([127.9, -125.99, -126.0, -149.0, -150.0, -1e6]);
        let mut worst = 0.0f64;
        for c in xs.chunks(16) {
            let mut a = [0f32; 16];
            a[..c.len()].copy_from_slice(c);
            let mut y = [0f32; 16];
            // SAFETY: the caller checked the CPU features.
            unsafe { _mm512_storeu_ps(y.as_mut_ptr(), f(_mm512_loadu_ps(a.as_ptr()))) };
            for (&x, &got) in a.iter().zip(&y).take(c.len()) {
                let want = (x as f64).exp2();
                let err = if want >= f32::MIN_POSITIVE as f64 {
                    (got as f64 / want - 1.0).abs()
                } else {
                    (got as f64 - want).abs() / f32::MIN_POSITIVE as f64
                };
                assert!(err <= tol, "2^{x}: got {got:e}, want {want:e}");
                worst = worst.max(err);
            }
        }
        // -inf (masked lanes) gives 0 exactly, +inf and overflow give inf (2^128 may round to
        // f32::MAX), NaN stays NaN.
        let sp = [f32::NEG_INFINITY, f32::INFINITY, 128.0, 200.0, f32::NAN];
        let mut a = [0f32; 16];
        a[..5].copy_from_slice(&sp);
        let mut y = [0f32; 16];
        unsafe { _mm512_storeu_ps(y.as_mut_ptr(), f(_mm512_loadu_ps(a.as_ptr()))) };
        assert_eq!(y[0], 0.0);
        assert!(y[1] == f32::INFINITY && y[3] == f32::INFINITY && y[2] >= f32::MAX);
        assert!(y[4].is_nan());
        assert!(worst > 0.0);
    }

    /// The SIMD epilogue rounds like `half::bf16::from_f32` (nearest even, quiet NaN, inf), except
    /// that results below 2^-126 flush to 0; lengths that are not a multiple of 16 too.
    #[test]
    fn epilogue_bf16_rounds_like_half() {
        if !(have() && is_x86_feature_detected!("avx512bf16")) {
            return;
        }
        let mut src: Vec<f32> = (0..1000)
            .map(|i| ((i as f32) * 0.731).sin() * 3.0)
            .collect();
        // Ties (exactly halfway between two bf16 values), NaN, inf, overflow after scaling.
        src.extend([
            f32::from_bits(0x3F80_8000),
            f32::from_bits(0x3F81_8000),
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            3e38,
        ]);
        for len in [src.len(), 37, 16, 5] {
            for scale in [1.0f32, 0.37, 2.0] {
                let mut got = vec![0u16; len];
                unsafe { scale_to_bf16(&src[..len], scale, &mut got) };
                for (i, (&g, &x)) in got.iter().zip(&src).enumerate() {
                    let y = x * scale;
                    let want = half::bf16::from_f32(y);
                    if want.is_nan() {
                        assert!(half::bf16::from_bits(g).is_nan(), "{i}: NaN");
                    } else if y.abs() >= f32::MIN_POSITIVE {
                        assert_eq!(g, want.to_bits(), "{i}: {y}");
                    }
                }
                let mut f = vec![0f32; len];
                unsafe { scale_f32(&src[..len], scale, &mut f) };
                for (&g, &x) in f.iter().zip(&src) {
                    assert!(g.to_bits() == (x * scale).to_bits() || (g.is_nan() && x.is_nan()));
                }
            }
        }
    }

    fn have() -> bool {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512dq")
    }

    #[test]
    fn exp2_floor_f32_relative_error_below_2e_7() {
        if have() {
            check_exp2(|x| unsafe { exp2_floor_ps(x) }, 2e-7);
        }
    }

    #[test]
    fn exp2_floor_bf16_relative_error_below_3e_6() {
        // p is rounded to bf16 (relative 2^-9 = 2e-3) right after; l keeps the f32 value, whose
        // error (3e-6) is far inside the LSE tolerance.
        if have() {
            check_exp2(|x| unsafe { exp2_floor_ps_bf16(x) }, 3e-6);
        }
    }
}
