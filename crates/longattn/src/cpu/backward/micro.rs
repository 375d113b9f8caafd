//! Micro-kernels of the backward pass: one product shape and one elementwise step.
//!
//! The backward works key-major: for a chunk of 64 keys and a block of 64 query rows,
//! `St = K Q^T` and `dPt = V dO^T` are `[64 keys][64 queries]`, so every product of the step has
//! its A operand in rows of the reduction dimension and no tile is ever transposed:
//!
//! | product | A `[m][k]` | B `[k][n]` | C |
//! |---|---|---|---|
//! | St = K Q^T | K rows `[keys][D]` | Q^T `[D][queries]` | f32, fresh |
//! | dPt = V dO^T | V rows `[keys][Dv]` | dO^T `[Dv][queries]` | f32, fresh |
//! | dV += Pt dO | Pt `[keys][queries]` | dO `[queries][Dv]` | f32 accumulator |
//! | dK += dSt Q | dSt `[keys][queries]` | Q `[queries][D]` | f32 accumulator |
//! | dQ^T += K^T dS^T... | K^T `[D][keys]` | dSt `[keys][queries]` | f32 `[D][queries]` |
//!
//! (the last one is dQ^T = K^T dS^T, i.e. dQ = dS K, kept transposed until the end).
//!
//! Layouts: A is row-major (`a[r * lda + kk]`); B is `[k / KP][ldb][KP]` (KP = 1 for f32,
//! KP = 2 for the bf16 pair layout of `tdpbf16ps`: the two k of a pair adjacent); C is f32
//! row-major (`c[r * ldc + x]`).
use super::super::micro::{Logits, LOG2E};
use bytemuck::Pod;

/// One instruction-set path of the backward pass. `P` is the packed operand type.
pub trait BwdMicro: Sync + Send {
    type P: Copy + Default + Send + Sync + 'static + Pod + super::super::micro::FromF32;
    /// k-pairing of B operands (1: f32; 2: bf16 pairs).
    const KP: usize;
    /// D, Dv (and every n and k of a product) are padded to a multiple of this.
    const ALIGN: usize;
    const NAME: &'static str;

    /// Called on the thread of each task before its first product (AMX: tile configuration).
    fn begin(&self) {}

    /// `C[r][x] (+)= sum_kk A[r][kk] B[kk][x]` for r < m, x < n (`acc`: add to C, else overwrite).
    /// Buffers hold whole 16-row tiles of A and C (the AMX path computes 16 rows at a time).
    #[allow(clippy::too_many_arguments)]
    fn mm(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: &[Self::P],
        lda: usize,
        b: &[Self::P],
        ldb: usize,
        c: &mut [f32],
        ldc: usize,
        acc: bool,
    );

    /// The elementwise step of one (64-key chunk, 64-query block), see [`scores_scalar`].
    fn scores(
        &self,
        e: &mut ScoreArgs,
        pt: &mut [Self::P],
        dst: &mut [Self::P],
        dsp: &mut [Self::P],
    );
}

/// Inputs of the elementwise step; rows are the 64 keys of a chunk, columns the 64 queries of a
/// block (both padded with masked entries).
pub struct ScoreArgs<'a> {
    /// Raw dot products k_r . q_c, `[64][64]`.
    pub st: &'a [f32],
    /// dO_c . v_r, `[64][64]`.
    pub dpt: &'a [f32],
    /// Bit c of `mask[r]`: (key r, query c) attends.
    pub mask: &'a [u64; 64],
    /// LSE_c log2 e per query column (natural-log LSE of the forward, in base 2).
    pub lse2: &'a [f32; 64],
    /// Delta_c = dO_c . O_c.
    pub delta: &'a [f32; 64],
    pub logits: Logits,
    /// Output: the column sums of p are added here (sum_j P_ij = 1 checks the LSE).
    pub psum: &'a mut [f32; 64],
}

/// The scalar definition of the elementwise step, for allowed (r, c) (everything else is 0):
///   u = scale st, x = u (or c tanh(u / c) with soft-cap), in base 2: x2 = x log2 e;
///   p = 2^(x2 - LSE2_c)                               (the forward's probability)
///   ds = p (dpt - Delta_c) scale (1 - tanh^2(u / c))  (d loss / d raw dot, soft-cap factor
///                                                      only with soft-cap)
/// writes `pt[r][c] = p`, `dst[r][c] = ds`, and `dsp` = ds in the B pair layout
/// `[r / KP][64][KP]` when KP = 2, and adds sum_r p to `psum[c]`.
pub fn scores_scalar<P: super::super::micro::FromF32>(
    e: &mut ScoreArgs,
    kp: usize,
    pt: &mut [P],
    dst: &mut [P],
    dsp: &mut [P],
) {
    let scale = e.logits.scale;
    for r in 0..64 {
        for c in 0..64 {
            let (mut p, mut ds) = (0.0f32, 0.0f32);
            if e.mask[r] >> c & 1 == 1 {
                let s = e.st[r * 64 + c];
                let (x2, dfac) = match e.logits.softcap {
                    None => (s * scale * LOG2E, scale),
                    Some(cap) => {
                        let t = (s * scale / cap).tanh();
                        (cap * LOG2E * t, scale * (1.0 - t * t))
                    }
                };
                p = (x2 - e.lse2[c]).exp2();
                e.psum[c] += p;
                ds = p * (e.dpt[r * 64 + c] - e.delta[c]) * dfac;
            }
            pt[r * 64 + c] = P::from_f32(p);
            dst[r * 64 + c] = P::from_f32(ds);
            if kp == 2 {
                dsp[((r / 2) * 64 + c) * 2 + r % 2] = P::from_f32(ds);
            }
        }
    }
}

/// Plain loops (the reference path, and the fallback without AVX-512).
pub struct ScalarBwd;

impl BwdMicro for ScalarBwd {
    type P = f32;
    const KP: usize = 1;
    const ALIGN: usize = 1;
    const NAME: &'static str = "scalar";

    fn mm(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: &[f32],
        lda: usize,
        b: &[f32],
        ldb: usize,
        c: &mut [f32],
        ldc: usize,
        acc: bool,
    ) {
        for r in 0..m {
            let crow = &mut c[r * ldc..r * ldc + n];
            if !acc {
                crow.fill(0.0);
            }
            for kk in 0..k {
                let av = a[r * lda + kk];
                for (cx, &bx) in crow.iter_mut().zip(&b[kk * ldb..kk * ldb + n]) {
                    *cx += av * bx;
                }
            }
        }
    }

    fn scores(&self, e: &mut ScoreArgs, pt: &mut [f32], dst: &mut [f32], dsp: &mut [f32]) {
        scores_scalar(e, 1, pt, dst, dsp)
    }
}

#[cfg(target_arch = "x86_64")]
pub use x86::{AmxBwd, Avx512Bwd};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::super::micro::amx::{blocked, Gemm, CONFIG};
    use super::super::super::micro::avx512::{exp2_ps, exp2_ps_bf16, logits_ps};
    use super::super::super::micro::LOG2E;
    use super::{BwdMicro, ScoreArgs};
    use std::arch::asm;
    use std::arch::x86_64::*;

    /// AVX-512 f32 FMA path: C blocks of R x 16 NZ in registers (up to 6 x 64: 24 accumulators;
    /// per k: NZ loads of B, R broadcasts of A, R NZ FMAs).
    pub struct Avx512Bwd;

    #[inline]
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn mm_block<const R: usize, const NZ: usize>(
        a: *const f32,
        lda: usize,
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
        k: usize,
        acc: bool,
    ) {
        let mut s = [[_mm512_setzero_ps(); NZ]; R];
        if acc {
            for (r, sr) in s.iter_mut().enumerate() {
                for (z, v) in sr.iter_mut().enumerate() {
                    *v = _mm512_loadu_ps(c.add(r * ldc + 16 * z));
                }
            }
        }
        for kk in 0..k {
            let bp = b.add(kk * ldb);
            let mut bv = [_mm512_setzero_ps(); NZ];
            for (z, v) in bv.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(bp.add(16 * z));
            }
            for (r, sr) in s.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*a.add(r * lda + kk));
                for z in 0..NZ {
                    sr[z] = _mm512_fmadd_ps(av, bv[z], sr[z]);
                }
            }
        }
        for (r, sr) in s.iter().enumerate() {
            for (z, v) in sr.iter().enumerate() {
                _mm512_storeu_ps(c.add(r * ldc + 16 * z), *v);
            }
        }
    }

    /// All rows for one column block of 16 NZ columns: blocks of 6 rows, then the rest.
    #[inline]
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn mm_rows<const NZ: usize>(
        m: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
        k: usize,
        acc: bool,
    ) {
        let mut r = 0;
        while r < m {
            let (ar, cr) = (a.add(r * lda), c.add(r * ldc));
            match m - r {
                1 => mm_block::<1, NZ>(ar, lda, b, ldb, cr, ldc, k, acc),
                2 => mm_block::<2, NZ>(ar, lda, b, ldb, cr, ldc, k, acc),
                3 => mm_block::<3, NZ>(ar, lda, b, ldb, cr, ldc, k, acc),
                4 => mm_block::<4, NZ>(ar, lda, b, ldb, cr, ldc, k, acc),
                5 => mm_block::<5, NZ>(ar, lda, b, ldb, cr, ldc, k, acc),
                _ => mm_block::<6, NZ>(ar, lda, b, ldb, cr, ldc, k, acc),
            }
            r += 6;
        }
    }

    /// bf16 bits (round to nearest even) of 16 f32, in the low half of each 32-bit lane.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn bf16_lanes(x: __m512) -> __m512i {
        let b = _mm512_castps_si512(x);
        let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(1));
        let r = _mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7fff)), lsb);
        _mm512_srli_epi32::<16>(r)
    }

    /// The AVX-512 elementwise step (the math of [`super::scores_scalar`]), 16 queries per
    /// vector. `BF16`: p and ds are stored as bf16 (`pt`, `dst` rows of 64 u16) and ds also in the
    /// pair layout (`dsp[(r / 2) * 64 + c] = (ds[r even], ds[r odd])`, 32 bits each).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn scores_avx512<const BF16: bool>(
        e: &mut ScoreArgs,
        pt: *mut u8,
        dst: *mut u8,
        dsp: *mut u8,
    ) {
        let lg = e.logits;
        let lg = &lg;
        let scale = _mm512_set1_ps(lg.scale);
        let mut psum = [_mm512_setzero_ps(); 4];
        let zero = _mm512_setzero_ps();
        let mut prev = [_mm512_setzero_si512(); 4];
        for r in 0..64 {
            let bits = e.mask[r];
            for z in 0..4 {
                let k = (bits >> (16 * z)) as u16;
                let (p, ds) = if k == 0 {
                    (zero, zero)
                } else {
                    let s = _mm512_loadu_ps(e.st.as_ptr().add(r * 64 + 16 * z));
                    let x2 = logits_ps(s, lg);
                    let l2 = _mm512_loadu_ps(e.lse2.as_ptr().add(16 * z));
                    let y = _mm512_sub_ps(x2, l2);
                    let p = if BF16 { exp2_ps_bf16(y) } else { exp2_ps(y) };
                    let p = _mm512_maskz_mov_ps(k, p);
                    psum[z] = _mm512_add_ps(psum[z], p);
                    // dfac = scale (1 - t^2), t = x2 / (c log2 e); scale without soft-cap.
                    let dfac = match lg.softcap {
                        None => scale,
                        Some(cap) => {
                            let t = _mm512_mul_ps(x2, _mm512_set1_ps(1.0 / (cap * LOG2E)));
                            _mm512_mul_ps(scale, _mm512_fnmadd_ps(t, t, _mm512_set1_ps(1.0)))
                        }
                    };
                    let dp = _mm512_loadu_ps(e.dpt.as_ptr().add(r * 64 + 16 * z));
                    let dl = _mm512_loadu_ps(e.delta.as_ptr().add(16 * z));
                    let ds = _mm512_mul_ps(_mm512_mul_ps(p, _mm512_sub_ps(dp, dl)), dfac);
                    (p, ds)
                };
                let at = r * 64 + 16 * z;
                if BF16 {
                    let (pb, db) = (bf16_lanes(p), bf16_lanes(ds));
                    _mm256_storeu_si256(pt.add(2 * at) as *mut __m256i, _mm512_cvtepi32_epi16(pb));
                    _mm256_storeu_si256(dst.add(2 * at) as *mut __m256i, _mm512_cvtepi32_epi16(db));
                    if r % 2 == 0 {
                        prev[z] = db;
                    } else {
                        // (even row, odd row) pairs of query columns 16 z .. 16 z + 16.
                        let pair = _mm512_or_si512(prev[z], _mm512_slli_epi32::<16>(db));
                        _mm512_storeu_si512(dsp.add(4 * ((r / 2) * 64 + 16 * z)) as *mut _, pair);
                    }
                } else {
                    _mm512_storeu_ps(pt.add(4 * at) as *mut f32, p);
                    _mm512_storeu_ps(dst.add(4 * at) as *mut f32, ds);
                }
            }
        }
        for (z, ps) in psum.iter().enumerate() {
            let at = e.psum.as_mut_ptr().add(16 * z);
            _mm512_storeu_ps(at, _mm512_add_ps(_mm512_loadu_ps(at), *ps));
        }
    }

    // SAFETY: constructed only when AVX-512F is available (checked by the
    // dispatcher); `mm` bounds are checked before the unsafe call.
    impl BwdMicro for Avx512Bwd {
        type P = f32;
        const KP: usize = 1;
        const ALIGN: usize = 16;
        const NAME: &'static str = "avx512";

        fn mm(
            &self,
            m: usize,
            n: usize,
            k: usize,
            a: &[f32],
            lda: usize,
            b: &[f32],
            ldb: usize,
            c: &mut [f32],
            ldc: usize,
            acc: bool,
        ) {
            assert!(n.is_multiple_of(16) && m >= 1 && k >= 1);
            assert!(a.len() >= (m - 1) * lda + k && b.len() >= (k - 1) * ldb + n);
            assert!(c.len() >= (m - 1) * ldc + n);
            let (a, b, c) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
            unsafe {
                for x0 in (0..n).step_by(64) {
                    let (bx, cx) = (b.add(x0), c.add(x0));
                    match (n - x0) / 16 {
                        1 => mm_rows::<1>(m, a, lda, bx, ldb, cx, ldc, k, acc),
                        2 => mm_rows::<2>(m, a, lda, bx, ldb, cx, ldc, k, acc),
                        3 => mm_rows::<3>(m, a, lda, bx, ldb, cx, ldc, k, acc),
                        _ => mm_rows::<4>(m, a, lda, bx, ldb, cx, ldc, k, acc),
                    }
                }
            }
        }

        fn scores(&self, e: &mut ScoreArgs, pt: &mut [f32], dst: &mut [f32], _dsp: &mut [f32]) {
            assert!(e.st.len() >= 4096 && e.dpt.len() >= 4096 && pt.len() >= 4096);
            assert!(dst.len() >= 4096);
            unsafe {
                scores_avx512::<false>(
                    e,
                    pt.as_mut_ptr() as *mut u8,
                    dst.as_mut_ptr() as *mut u8,
                    std::ptr::null_mut(),
                )
            }
        }
    }

    /// AMX path for bf16 inputs: every product on the tile unit (`micro::amx::blocked`: 2 x 2
    /// accumulator tiles, operand loads pipelined one step ahead); P and dS rounded to bf16.
    pub struct AmxBwd;

    // SAFETY: constructed only when `micro::amx::available()`; `begin` loads the tile config on
    // the task's thread. Every operand buffer holds whole 16-row tiles (the driver sizes them for
    // 64 rows or the padded dims, multiples of 32), checked below.
    impl BwdMicro for AmxBwd {
        type P = u16;
        const KP: usize = 2;
        const ALIGN: usize = 32;
        const NAME: &'static str = "amx";

        fn begin(&self) {
            unsafe {
                asm!("ldtilecfg [{0}]", in(reg) CONFIG.0.as_ptr(), options(nostack, readonly))
            };
        }

        fn mm(
            &self,
            m: usize,
            n: usize,
            k: usize,
            a: &[u16],
            lda: usize,
            b: &[u16],
            ldb: usize,
            c: &mut [f32],
            ldc: usize,
            acc: bool,
        ) {
            let mt = m.div_ceil(16) * 16;
            assert!(n.is_multiple_of(32) && k.is_multiple_of(32) && m >= 1);
            assert!(a.len() >= (mt - 1) * lda + k && b.len() >= k * ldb);
            assert!(c.len() >= (mt - 1) * ldc + n);
            // A: rows 2 lda bytes apart, 32 k (64 bytes) per step. B: pair rows [k/2][ldb][2],
            // 4 ldb bytes apart, 16 pair rows per step.
            let g = Gemm {
                a: a.as_ptr() as *const u8,
                lda: 2 * lda,
                a_step: 64,
                b: &[b.as_ptr() as *const u8],
                ldb: 4 * ldb,
                b_step: 16 * 4 * ldb,
                steps: k / 32,
                c: c.as_mut_ptr() as *mut u8,
                ldc: 4 * ldc,
            };
            unsafe { blocked(&g, m, n, acc) }
        }

        fn scores(&self, e: &mut ScoreArgs, pt: &mut [u16], dst: &mut [u16], dsp: &mut [u16]) {
            assert!(e.st.len() >= 4096 && e.dpt.len() >= 4096 && pt.len() >= 4096);
            assert!(dst.len() >= 4096 && dsp.len() >= 4096);
            unsafe {
                scores_avx512::<true>(
                    e,
                    pt.as_mut_ptr() as *mut u8,
                    dst.as_mut_ptr() as *mut u8,
                    dsp.as_mut_ptr() as *mut u8,
                )
            }
        }
    }
}
