//! Micro-kernels: the three inner steps of one (query tile, key group) update. A group is up to
//! [`MAXW`] chunks of [`NC`] = 64 keys (not necessarily adjacent: each chunk is packed on its own),
//! processed together so the softmax statistics and the P V reduction run over up to 256 keys.
//!
//! 1. `qk`: S = Q K^T for up to [`BQ`] query rows and one chunk (called once per chunk of a group);
//! 2. `softmax`: the online-softmax step on the group's S (scale, soft-cap, mask, running max/sum, P);
//! 3. `pv`: O = alpha * O + P V over the group's chunks.
//!
//! Every instruction-set path implements [`Micro`]; `scalar` is the plain reference the SIMD paths
//! are tested against, and the fallback on CPUs without AVX2.
//!
//! Packed layouts (one chunk of NC = 64 keys; keys past the end of the sequence are zero):
//! - f32 family: Q `[rows][D]`, K^T `[D][64]`, V `[64][Dv]`, P `[rows][64]`, all f32;
//! - bf16 family (`vdpbf16ps`): Q `[rows][Dp]` bf16 with Dp = D rounded up to even, K^T
//!   `[Dp/2][64][2]` (the two dims of a pair adjacent), V `[32][Dv][2]` (the two keys of a pair
//!   adjacent), P `[rows][64]` bf16. A 32-bit load of Q or P is then one (even, odd) pair.
/// Calls `$block::<R>(args)` for the row blocks of a tile: blocks of 6 rows, the last one
/// with the 1..=6 rows left (each block size is its own register-blocked instantiation). `$r` is
/// bound to the block's first row inside `args`.
macro_rules! by_row_blocks {
    ($rows:expr, $r:ident, $block:ident($($arg:expr),* $(,)?)) => {{
        let rows = $rows;
        let mut $r = 0;
        while $r < rows {
            match rows - $r {
                1 => $block::<1>($($arg),*),
                2 => $block::<2>($($arg),*),
                3 => $block::<3>($($arg),*),
                4 => $block::<4>($($arg),*),
                5 => $block::<5>($($arg),*),
                _ => $block::<6>($($arg),*),
            }
            $r += 6;
        }
    }};
}

#[cfg(target_arch = "x86_64")]
pub mod amx;
#[cfg(target_arch = "x86_64")]
pub mod avx2;
#[cfg(target_arch = "x86_64")]
pub mod avx512;
#[cfg(target_arch = "x86_64")]
pub mod avx512bf16;
use crate::tensor::{DType, Element};

pub mod scalar;

/// Keys per chunk: one u64 of mask bits, four AVX-512 registers of f32.
pub const NC: usize = 64;
/// Query rows per tile.
pub const BQ: usize = 64;
/// Most chunks in one group (S and P rows are up to MAXW * NC = 256 long).
pub const MAXW: usize = 4;

/// Row stride of the S scratch (f32 logits), in elements: a group's MAXW * NC columns plus one
/// cache line. With a 1 KiB stride the 16 rows of a tile fall into 4 of the 64 L1 sets, and a
/// chunk's S (64 rows x 4 lines) does not fit them: AMX `qk` ran 1.3x slower (1635 vs 1267
/// cycles per 64 x 64 x 128 product on this machine).
pub const LDS: usize = MAXW * NC + 16;
/// Row stride of the P scratch, in elements (one cache line more than MAXW * NC bf16, for the
/// same reason as [`LDS`]).
pub const LDP: usize = MAXW * NC + 32;

/// log2(e): the kernels work in base 2 (exp2 is cheaper than exp).
pub const LOG2E: f32 = std::f32::consts::LOG2_E;

/// Lazy rescaling threshold in base-2 units. The running max m is raised only when a chunk's
/// max logit exceeds it by more than TAU; otherwise m stays and alpha = 1 (O needs no rescale).
/// Then p = 2^(x - m) <= 2^TAU = 256: no overflow in f32 or bf16, and out = O / l and
/// LSE = ln 2 (m + log2 l) are unchanged whichever m is used.
pub const TAU: f32 = 8.0;

/// One-pass softmax steps keep the running max m while the group's sum of p = 2^(x - m) stays at
/// or below this (so every p <= 2^24: far from overflow in f32 and bf16, and O, l stay finite);
/// above it (or inf / NaN) the row is redone with its max ([`update_max`]). Larger than any sum
/// the two-pass rule allows (256 keys x 2^TAU), so a redo never loops.
pub const LAZY_SUM: f32 = 16_777_216.0;
const _: () = assert!(LAZY_SUM > (MAXW * NC) as f32 * 256.0);

/// The running-max update of one row: returns (m', alpha = 2^(m - m')). A row with no allowed
/// key so far keeps m = -inf and alpha = 1; a NaN max poisons the row (m' = NaN).
#[inline]
pub fn update_max(m: f32, mx: f32) -> (f32, f32) {
    if mx <= m + TAU {
        (m, 1.0)
    } else if mx.is_nan() {
        (f32::NAN, f32::NAN)
    } else {
        (mx, (m - mx).exp2())
    }
}

/// What the softmax step applies to the raw dot products s = q . k.
#[derive(Clone, Copy, Debug)]
pub struct Logits {
    /// q.k multiplier (1/sqrt(D) by default).
    pub scale: f32,
    /// Soft-cap c: x = c * tanh(scale * s / c).
    pub softcap: Option<f32>,
}

impl Logits {
    /// The base-2 logit of one raw dot product (the scalar definition every path follows).
    #[inline]
    pub fn base2(&self, s: f32) -> f32 {
        match self.softcap {
            None => s * (self.scale * LOG2E),
            Some(c) => (c * LOG2E) * (s * self.scale / c).tanh(),
        }
    }
}

/// The packed element types: f32 itself, or u16 holding bf16 bits.
pub trait FromF32: Copy + Sized {
    /// The input dtype whose bits are this type's bits (packing is then a copy).
    const COPY_FROM: Option<DType>;
    fn from_f32(x: f32) -> Self;
    /// The value as f32 (exact: bf16 widens).
    fn to_f32(self) -> f32;
    /// `dst[i] = from_f32(src[i])`, a plain copy when `T` is `COPY_FROM`.
    #[inline]
    fn convert_slice<T: Element>(src: &[T], dst: &mut [Self])
    where
        Self: bytemuck::Pod,
    {
        if Self::COPY_FROM == Some(T::DTYPE) {
            dst.copy_from_slice(bytemuck::cast_slice(src));
        } else {
            for (o, &x) in dst.iter_mut().zip(src) {
                *o = Self::from_f32(x.to_f32());
            }
        }
    }
}
impl FromF32 for f32 {
    const COPY_FROM: Option<DType> = Some(DType::F32);
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}
impl FromF32 for u16 {
    const COPY_FROM: Option<DType> = Some(DType::BF16);
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        half::bf16::from_f32(x).to_bits()
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self as u32) << 16)
    }
}

/// The slice lengths the SIMD `qk` addresses: rows x dq of Q, dq x NC of K^T, rows of S at stride
/// `lds`. Checked before each unsafe call, so a driver bug panics instead of reading out of bounds.
pub(crate) fn check_qk<P>(q: &[P], rows: usize, dq: usize, kt: &[P], s: &[f32], lds: usize) {
    assert!(q.len() >= rows * dq && kt.len() >= dq * NC && s.len() >= (rows - 1) * lds + NC);
}

/// The slice lengths the SIMD `softmax` addresses: rows x w NC of S and P (rows [`LDS`] / [`LDP`]
/// apart), rows x MAXW mask words.
pub(crate) fn check_softmax<P>(s: &[f32], rows: usize, w: usize, mask: &[u64], p: &[P]) {
    assert!(w <= MAXW && rows >= 1);
    assert!(s.len() >= (rows - 1) * LDS + w * NC && p.len() >= (rows - 1) * LDP + w * NC);
    assert!(mask.len() >= rows * MAXW);
}

/// The slice lengths the SIMD `pv` addresses: rows x (chunks x NC) of P (rows [`LDP`] apart),
/// NC x dv of each V chunk, rows x dv of O.
pub(crate) fn check_pv<P>(p: &[P], rows: usize, vt: &[&[P]], dv: usize, o: &[f32]) {
    assert!(vt.len() <= MAXW && rows >= 1 && o.len() >= rows * dv);
    assert!(p.len() >= (rows - 1) * LDP + vt.len() * NC);
    assert!(vt.iter().all(|v| v.len() >= NC * dv));
}

/// One instruction-set path. `P` is the packed element (f32, or u16 holding bf16 bits).
pub trait Micro: Sync + Send {
    type P: Copy + Default + Send + Sync + 'static + FromF32 + bytemuck::Pod;
    /// True for the bf16-pair layouts.
    const PAIRS: bool;
    /// Chunks per group (<= MAXW): deeper groups amortize the softmax bookkeeping and lengthen
    /// the P V reduction, but grow the V working set (GROUP x 64 keys x Dv).
    const GROUP: usize;
    /// Packed Q rows / K^T rows are D rounded up to a multiple of this (zeros past D).
    const DIM_ALIGN: usize;
    /// Packed V rows are Dv rounded up to a multiple of this (zeros past Dv).
    const DV_ALIGN: usize;
    const NAME: &'static str;

    /// Called by each task before its first micro-kernel call, on the thread that runs it
    /// (AMX loads its tile configuration here).
    fn begin(&self) {}

    /// `s[r * lds + c] = sum_d q[r][d] * kt[d][c]` for `r < rows`, all `c < NC`.
    /// `dq` is the packed row length of q (D, or Dp for pairs).
    fn qk(&self, q: &[Self::P], rows: usize, dq: usize, kt: &[Self::P], s: &mut [f32], lds: usize);

    /// Online softmax step for `rows` rows of a group of `w` chunks (S and P rows are `w * NC`
    /// long, [`LDS`] and [`LDP`] elements apart; the row's mask words are
    /// `mask[r * MAXW .. r * MAXW + w]`), in base-2 units:
    /// x_c = logits.base2(s_c) where bit c of the row's mask is set, else -inf;
    /// a row with a running max m may first try one pass: p_c = 2^(x_c - m), kept (m' = m,
    /// alpha = 1, l' = l + sum_c p_c) when sum_c p_c <= [`LAZY_SUM`]; otherwise (and for rows
    /// without m) (m', alpha) = [`update_max`](m, max_c x_c); p_c = 2^(x_c - m');
    /// l' = alpha l + sum_c p_c. Rows that have seen no allowed key yet (m' = -inf) keep
    /// m = -inf, l = 0, alpha = 1, p = 0.
    #[allow(clippy::too_many_arguments)]
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
        p: &mut [Self::P],
    );

    /// `o[r][x] = alpha[r] o[r][x] + sum_g sum_{c < NC} p[r][g NC + c] vt[g][c][x]` for `r < rows`,
    /// `x < dv`, over the `vt.len()` chunks of the group (p rows are `vt.len() * NC` long and
    /// [`LDP`] apart; p is 0
    /// and V is 0 on padding keys). Rows of each `vt[g]` and of `o` are dvp = `dv` rounded up to
    /// `DV_ALIGN` long, and `o` holds BQ rows.
    #[allow(clippy::too_many_arguments)]
    fn pv(
        &self,
        p: &[Self::P],
        rows: usize,
        vt: &[&[Self::P]],
        dv: usize,
        alpha: &[f32],
        o: &mut [f32],
    );
}
