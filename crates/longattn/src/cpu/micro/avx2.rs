//! AVX2 + FMA f32 path (8 lanes) for x86 CPUs without AVX-512.
//!
//! Register blocking: 6 rows x 16 columns (12 ymm accumulators) for both `qk` and `pv`.
use super::avx512::{chunk_ptrs, Chunks};
use super::{
    check_pv, check_qk, check_softmax, update_max, Logits, Micro, LDP, LDS, LOG2E, MAXW, NC,
};
use std::arch::x86_64::*;

pub struct Avx2;

/// 2^x for x <= 8 (below -126 gives 2^-126): the degree-5 polynomial of `avx512::exp2_ps` on
/// the fraction, exponent bits built directly.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn exp2_ps(x: __m256) -> __m256 {
    let x = _mm256_max_ps(x, _mm256_set1_ps(-126.0));
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
    let f = _mm256_sub_ps(x, n);
    let mut p = _mm256_set1_ps(1.326_697E-3);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.675_46E-3));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550_742_6E-2));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402_212_2E-1));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931_469_5E-1));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.000_000_1));
    let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    ));
    _mm256_mul_ps(p, _mm256_castsi256_ps(e))
}

/// tanh(y) = sign(y) (e - 1) / (e + 1), e = 2^(2 |y| log2 e) computed as 1 / 2^-t.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn tanh_ps(y: __m256) -> __m256 {
    let sign = _mm256_and_ps(y, _mm256_set1_ps(-0.0));
    let a = _mm256_andnot_ps(_mm256_set1_ps(-0.0), y);
    let t = _mm256_min_ps(
        _mm256_mul_ps(a, _mm256_set1_ps(2.0 * LOG2E)),
        _mm256_set1_ps(60.0),
    );
    let e = _mm256_div_ps(
        _mm256_set1_ps(1.0),
        exp2_ps(_mm256_sub_ps(_mm256_setzero_ps(), t)),
    );
    let r = _mm256_div_ps(
        _mm256_sub_ps(e, _mm256_set1_ps(1.0)),
        _mm256_add_ps(e, _mm256_set1_ps(1.0)),
    );
    _mm256_or_ps(r, sign)
}

#[inline]
#[target_feature(enable = "avx2,fma")]
fn hmax(v: __m256) -> f32 {
    let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_max_ss(m, _mm_shuffle_ps::<1>(m, m));
    _mm_cvtss_f32(m)
}

#[inline]
#[target_feature(enable = "avx2,fma")]
fn hsum(v: __m256) -> f32 {
    let m = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let m = _mm_add_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_add_ss(m, _mm_shuffle_ps::<1>(m, m));
    _mm_cvtss_f32(m)
}

/// All-ones lanes where bit z of `byte` is set.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn lane_mask(byte: u64) -> __m256 {
    let sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    let b = _mm256_set1_epi32((byte & 0xFF) as i32);
    _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(b, sel), sel))
}

/// All-ones lanes for the first `n` (0..=8) lanes.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn first_lanes(n: usize) -> __m256i {
    let idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), idx)
}

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn qk_block<const R: usize>(
    q: *const f32,
    dq: usize,
    kt: *const f32,
    s: *mut f32,
    lds: usize,
) {
    for c0 in (0..NC).step_by(16) {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for d in 0..dq {
            let k = kt.add(d * NC + c0);
            let kv = [_mm256_loadu_ps(k), _mm256_loadu_ps(k.add(8))];
            for (r, accr) in acc.iter_mut().enumerate() {
                let qb = _mm256_set1_ps(*q.add(r * dq + d));
                accr[0] = _mm256_fmadd_ps(qb, kv[0], accr[0]);
                accr[1] = _mm256_fmadd_ps(qb, kv[1], accr[1]);
            }
        }
        for (r, accr) in acc.iter().enumerate() {
            _mm256_storeu_ps(s.add(r * lds + c0), accr[0]);
            _mm256_storeu_ps(s.add(r * lds + c0 + 8), accr[1]);
        }
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn qk_impl(q: &[f32], rows: usize, dq: usize, kt: &[f32], s: &mut [f32], lds: usize) {
    let (q, kt, s) = (q.as_ptr(), kt.as_ptr(), s.as_mut_ptr());
    by_row_blocks!(
        rows,
        r,
        qk_block(q.add(r * dq), dq, kt, s.add(r * lds), lds)
    );
}

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn load_x(s: *const f32, z: usize, lg: &Logits) -> __m256 {
    let sv = _mm256_loadu_ps(s.add(8 * z));
    match lg.softcap {
        None => _mm256_mul_ps(sv, _mm256_set1_ps(lg.scale * LOG2E)),
        Some(c) => _mm256_mul_ps(
            tanh_ps(_mm256_mul_ps(sv, _mm256_set1_ps(lg.scale / c))),
            _mm256_set1_ps(c * LOG2E),
        ),
    }
}

/// The online-softmax step, two passes per row of `w` chunks (8 w ymm):
/// pass 1: m_x = max over allowed lanes, (m', alpha) = update_max(m, m_x);
/// pass 2: p = 2^(x - m') on allowed lanes, 0 elsewhere; l' = alpha l + sum p.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_impl(
    s: &[f32],
    rows: usize,
    w: usize,
    mask: &[u64],
    lg: &Logits,
    m: &mut [f32],
    l: &mut [f32],
    alpha: &mut [f32],
    p: &mut [f32],
) {
    let lanes = 8 * w;
    let ninf = _mm256_set1_ps(f32::NEG_INFINITY);
    for r in 0..rows {
        let sr = s.as_ptr().add(r * LDS);
        let pr = p.as_mut_ptr().add(r * LDP);
        let bits = &mask[r * MAXW..r * MAXW + w];
        let mut mx = ninf;
        let mut nan = 0;
        for z in 0..lanes {
            let k = lane_mask(bits[z / 8] >> (8 * (z % 8)));
            let x = _mm256_blendv_ps(ninf, load_x(sr, z, lg), k);
            mx = _mm256_max_ps(mx, x);
            // NaN logits (NaN/Inf inputs) poison the row instead of being dropped by `max`.
            nan |= _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_UNORD_Q>(x, x));
        }
        let (m_new, a) = update_max(m[r], if nan != 0 { f32::NAN } else { hmax(mx) });
        alpha[r] = a;
        if m_new == f32::NEG_INFINITY {
            for z in 0..lanes {
                _mm256_storeu_ps(pr.add(8 * z), _mm256_setzero_ps());
            }
            continue;
        }
        let mv = _mm256_set1_ps(m_new);
        let mut sum = _mm256_setzero_ps();
        for z in 0..lanes {
            let k = lane_mask(bits[z / 8] >> (8 * (z % 8)));
            let x = _mm256_blendv_ps(ninf, load_x(sr, z, lg), k);
            let pz = _mm256_and_ps(exp2_ps(_mm256_sub_ps(x, mv)), k);
            sum = _mm256_add_ps(sum, pz);
            _mm256_storeu_ps(pr.add(8 * z), pz);
        }
        l[r] = l[r] * a + hsum(sum);
        m[r] = m_new;
    }
}

#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn pv_block<const R: usize>(
    p: *const f32,
    width: usize,
    vt: &Chunks<f32>,
    dv: usize,
    x0: usize,
    alpha: *const f32,
    o: *mut f32,
) {
    let km = [
        first_lanes(dv - x0),
        first_lanes((dv - x0).saturating_sub(8)),
    ];
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    for (r, accr) in acc.iter_mut().enumerate() {
        let a = _mm256_set1_ps(*alpha.add(r));
        for z in 0..2 {
            let ov = _mm256_maskload_ps(o.add(r * dv + x0 + 8 * z), km[z]);
            accr[z] = _mm256_mul_ps(a, ov);
        }
    }
    for g in 0..vt.1 {
        for c in 0..NC {
            let v = vt.0[g].add(c * dv + x0);
            let vv = [
                _mm256_maskload_ps(v, km[0]),
                _mm256_maskload_ps(v.add(8), km[1]),
            ];
            for (r, accr) in acc.iter_mut().enumerate() {
                let pb = _mm256_set1_ps(*p.add(r * width + g * NC + c));
                accr[0] = _mm256_fmadd_ps(pb, vv[0], accr[0]);
                accr[1] = _mm256_fmadd_ps(pb, vv[1], accr[1]);
            }
        }
    }
    for (r, accr) in acc.iter().enumerate() {
        for z in 0..2 {
            _mm256_maskstore_ps(o.add(r * dv + x0 + 8 * z), km[z], accr[z]);
        }
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn pv_impl(p: &[f32], rows: usize, vt: &[&[f32]], dv: usize, alpha: &[f32], o: &mut [f32]) {
    let ch = chunk_ptrs(vt);
    let (p, a, o) = (p.as_ptr(), alpha.as_ptr(), o.as_mut_ptr());
    for x0 in (0..dv).step_by(16) {
        by_row_blocks!(
            rows,
            r,
            pv_block(p.add(r * LDP), LDP, &ch, dv, x0, a.add(r), o.add(r * dv))
        );
    }
}

// SAFETY: `Avx2` is only constructed after `is_x86_feature_detected!` confirms avx2 and fma; the
// asserts check the slice lengths against what the kernels address.
impl Micro for Avx2 {
    type P = f32;
    const PAIRS: bool = false;
    const GROUP: usize = 2;
    const DIM_ALIGN: usize = 1;
    const DV_ALIGN: usize = 1;
    const NAME: &'static str = "avx2";

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
        unsafe { softmax_impl(s, rows, w, mask, logits, m, l, alpha, p) }
    }

    fn pv(&self, p: &[f32], rows: usize, vt: &[&[f32]], dv: usize, alpha: &[f32], o: &mut [f32]) {
        check_pv(p, rows, vt, dv, o);
        unsafe { pv_impl(p, rows, vt, dv, alpha, o) }
    }
}
