//! AMX path (Intel Advanced Matrix Extensions) for bf16 inputs: both products on the tile unit.
//!
//! `tdpbf16ps` multiplies a 16 x 32 bf16 tile by a 32 x 16 bf16 tile (stored as 16 rows of 16
//! (even, odd) pairs) into a 16 x 16 f32 tile: 8192 multiply-adds per instruction. The packed
//! layouts of the bf16 path are exactly AMX's operand layouts:
//! - S = Q K^T: A = Q rows `[16][32 dims]` (row stride Dp), B = K^T pairs `[16 pairs][16 keys][2]`
//!   (row stride 64 keys);
//! - O += P V: A = P rows `[16][32 keys]` bf16, B = V pairs `[16 key pairs][16 dims][2]`.
//!
//! Blocking: 2 x 2 accumulator tiles (tmm0-3: 32 rows x 32 columns), A in tmm4-5, B in tmm6-7.
//! D and Dv are padded to multiples of 32 (DIM_ALIGN, DV_ALIGN). The softmax step is the AVX-512
//! BF16 one; P V lands in a scratch tile and is merged as O = alpha O + PV with AVX-512.
//!
//! Linux hands out the tile state only on request (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), made once
//! per process by [`available`].
use super::avx512bf16::softmax_impl;
use super::{Logits, Micro, BQ, NC};
use std::arch::asm;
use std::arch::x86_64::*;
use std::cell::RefCell;
use std::sync::OnceLock;

pub struct Amx;

/// CPUID says AMX-TILE + AMX-BF16 (+ AVX-512 BF16 for the softmax) and the kernel grants the
/// tile data state to this process.
pub fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        if !(is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")) {
            return false;
        }
        // SAFETY: cpuid leaf 7 exists on every CPU with AVX-512.
        let edx = __cpuid_count(7, 0).edx;
        let (amx_bf16, amx_tile) = (edx >> 22 & 1 == 1, edx >> 24 & 1 == 1);
        if !(amx_bf16 && amx_tile) {
            return false;
        }
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a plain system call with integer arguments.
        unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            ) == 0
        }
    })
}

/// Palette 1, all eight tiles 16 rows x 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

static CONFIG: TileConfig = {
    let mut c = [0u8; 64];
    c[0] = 1;
    let mut t = 0;
    while t < 8 {
        c[16 + 2 * t] = 64;
        c[48 + t] = 16;
        t += 1;
    }
    TileConfig(c)
};

thread_local! {
    /// P V of one chunk, `[BQ][dvp]` f32, before it is merged into O.
    static PV_TILE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// C(2x2 tiles at c, row stride `ldc` bytes) = sum over `steps` of A(2 row tiles) x B(2 col tiles).
/// A tiles start at `a` and `a + a16` bytes (row stride `lda`), advancing `a_step` bytes per step;
/// B tiles at `b` and `b + b16` (row stride `ldb`), advancing `b_step`.
///
/// SAFETY: the caller has loaded `CONFIG` on this thread and every addressed row lies inside its
/// buffer (16 rows of 64 bytes per tile).
#[allow(clippy::too_many_arguments)]
#[inline]
unsafe fn gemm_2x2(
    a: *const u8,
    a16: usize,
    lda: usize,
    a_step: usize,
    b: *const u8,
    b16: usize,
    ldb: usize,
    b_step: usize,
    steps: usize,
    c: *mut u8,
    ldc: usize,
) {
    asm!(
        "tilezero tmm0",
        "tilezero tmm1",
        "tilezero tmm2",
        "tilezero tmm3"
    );
    for s in 0..steps {
        let (pa, pb) = (a.add(s * a_step), b.add(s * b_step));
        asm!(
            "tileloadd tmm4, [{a0} + {lda}*1]",
            "tileloadd tmm5, [{a1} + {lda}*1]",
            "tileloadd tmm6, [{b0} + {ldb}*1]",
            "tileloadd tmm7, [{b1} + {ldb}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            a0 = in(reg) pa,
            a1 = in(reg) pa.add(a16),
            b0 = in(reg) pb,
            b1 = in(reg) pb.add(b16),
            lda = in(reg) lda,
            ldb = in(reg) ldb,
            options(nostack, readonly),
        );
    }
    asm!(
        "tilestored [{c0} + {ldc}*1], tmm0",
        "tilestored [{c1} + {ldc}*1], tmm1",
        "tilestored [{c2} + {ldc}*1], tmm2",
        "tilestored [{c3} + {ldc}*1], tmm3",
        c0 = in(reg) c,
        c1 = in(reg) c.add(64),
        c2 = in(reg) c.add(16 * ldc),
        c3 = in(reg) c.add(16 * ldc + 64),
        ldc = in(reg) ldc,
        options(nostack),
    );
}

/// The 1 x 2 variant (16 rows) for short query tiles (decode).
#[allow(clippy::too_many_arguments)]
#[inline]
unsafe fn gemm_1x2(
    a: *const u8,
    lda: usize,
    a_step: usize,
    b: *const u8,
    b16: usize,
    ldb: usize,
    b_step: usize,
    steps: usize,
    c: *mut u8,
    ldc: usize,
) {
    asm!("tilezero tmm0", "tilezero tmm1");
    for s in 0..steps {
        let (pa, pb) = (a.add(s * a_step), b.add(s * b_step));
        asm!(
            "tileloadd tmm4, [{a0} + {lda}*1]",
            "tileloadd tmm6, [{b0} + {ldb}*1]",
            "tileloadd tmm7, [{b1} + {ldb}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            a0 = in(reg) pa,
            b0 = in(reg) pb,
            b1 = in(reg) pb.add(b16),
            lda = in(reg) lda,
            ldb = in(reg) ldb,
            options(nostack, readonly),
        );
    }
    asm!(
        "tilestored [{c0} + {ldc}*1], tmm0",
        "tilestored [{c1} + {ldc}*1], tmm1",
        c0 = in(reg) c,
        c1 = in(reg) c.add(64),
        ldc = in(reg) ldc,
        options(nostack),
    );
}

/// Runs `C[rows][ncols] = A[rows][k] B[k][ncols]` in 32-column blocks; rows are taken in blocks of
/// 32 (16 for the last block when at most 16 rows remain). The operand pointers of block
/// (row r0, column x0) are given by the closures in bytes.
#[allow(clippy::too_many_arguments)]
#[inline]
unsafe fn blocked(
    rows: usize,
    ncols: usize,
    steps: usize,
    a_at: impl Fn(usize) -> *const u8,
    lda: usize,
    a_step: usize,
    b_at: impl Fn(usize) -> *const u8,
    ldb: usize,
    b_step: usize,
    c_at: impl Fn(usize, usize) -> *mut u8,
    ldc: usize,
) {
    let mut r0 = 0;
    while r0 < rows {
        for x0 in (0..ncols).step_by(32) {
            if rows - r0 > 16 {
                gemm_2x2(
                    a_at(r0),
                    16 * lda,
                    lda,
                    a_step,
                    b_at(x0),
                    64,
                    ldb,
                    b_step,
                    steps,
                    c_at(r0, x0),
                    ldc,
                );
            } else {
                gemm_1x2(
                    a_at(r0),
                    lda,
                    a_step,
                    b_at(x0),
                    64,
                    ldb,
                    b_step,
                    steps,
                    c_at(r0, x0),
                    ldc,
                );
            }
        }
        r0 += 32;
    }
}

#[target_feature(enable = "avx512f")]
unsafe fn merge(rows: usize, dv: usize, dvp: usize, tile: &[f32], alpha: &[f32], o: &mut [f32]) {
    // O = alpha O + PV, row by row.
    for (r, &ar) in alpha.iter().enumerate().take(rows) {
        let a = _mm512_set1_ps(ar);
        for x0 in (0..dv).step_by(16) {
            let n = (dv - x0).min(16);
            let k: u16 = if n == 16 { 0xFFFF } else { (1u16 << n) - 1 };
            let op = o.as_mut_ptr().add(r * dv + x0);
            let t = _mm512_maskz_loadu_ps(k, tile.as_ptr().add(r * dvp + x0));
            let v = _mm512_fmadd_ps(a, _mm512_maskz_loadu_ps(k, op), t);
            _mm512_mask_storeu_ps(op, k, v);
        }
    }
}

// SAFETY: `Amx` is only constructed after [`available`] returned true; `begin` loads the tile
// configuration on the thread of each task before any tile instruction. The driver sizes Q, S and
// P for BQ = 64 rows whatever `rows` is, so whole 16-row tiles stay inside the buffers (rows past
// `rows` compute values nobody reads), and K^T / V chunks are NC = 64 keys of Dp / Dvp (multiples
// of 32) packed dims.
impl Micro for Amx {
    type P = u16;
    const PAIRS: bool = true;
    const DIM_ALIGN: usize = 32;
    const DV_ALIGN: usize = 32;
    const NAME: &'static str = "amx";

    fn begin(&self) {
        unsafe { asm!("ldtilecfg [{0}]", in(reg) CONFIG.0.as_ptr(), options(nostack, readonly)) };
    }

    fn qk(&self, q: &[u16], rows: usize, dq: usize, kt: &[u16], s: &mut [f32]) {
        assert!(
            q.len() >= BQ * dq
                && kt.len() >= dq * NC
                && s.len() >= BQ * NC
                && dq.is_multiple_of(32)
        );
        let (qp, kp, sp) = (
            q.as_ptr() as *const u8,
            kt.as_ptr() as *const u8,
            s.as_mut_ptr() as *mut u8,
        );
        // A: Q rows (2 * dq bytes apart), 32 dims = 64 bytes per step.
        // B: K^T pair rows (NC * 4 bytes apart), 16 pair rows = 16 * NC * 4 bytes per step.
        unsafe {
            blocked(
                rows,
                NC,
                dq / 32,
                |r0| qp.add(r0 * dq * 2),
                dq * 2,
                64,
                |x0| kp.add(x0 * 4),
                NC * 4,
                16 * NC * 4,
                |r0, x0| sp.add((r0 * NC + x0) * 4),
                NC * 4,
            )
        }
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
        p: &mut [u16],
    ) {
        assert!(s.len() >= rows * NC && p.len() >= rows * NC && mask.len() >= rows);
        unsafe { softmax_impl(s, rows, mask, logits, m, l, alpha, p) }
    }

    fn pv(
        &self,
        p: &[u16],
        rows: usize,
        _keys: usize,
        vt: &[u16],
        dv: usize,
        alpha: &[f32],
        o: &mut [f32],
    ) {
        let dvp = dv.div_ceil(32) * 32;
        assert!(p.len() >= BQ * NC && vt.len() >= NC * dvp && o.len() >= rows * dv);
        PV_TILE.with(|t| {
            let mut tile = t.borrow_mut();
            if tile.len() < BQ * dvp {
                tile.resize(BQ * dvp, 0.0);
            }
            let (pp, vp, tp) = (
                p.as_ptr() as *const u8,
                vt.as_ptr() as *const u8,
                tile.as_mut_ptr() as *mut u8,
            );
            // A: P rows (NC * 2 bytes apart), 32 keys = 64 bytes per step.
            // B: V pair rows (dvp * 4 bytes apart), 16 pair rows per step. All 64 keys are used:
            // p is 0 past the chunk's valid keys and V is 0 past Sk.
            unsafe {
                blocked(
                    rows,
                    dvp,
                    NC / 32,
                    |r0| pp.add(r0 * NC * 2),
                    NC * 2,
                    64,
                    |x0| vp.add(x0 * 4),
                    dvp * 4,
                    16 * dvp * 4,
                    |r0, x0| tp.add((r0 * dvp + x0) * 4),
                    dvp * 4,
                );
                merge(rows, dv, dvp, &tile, alpha, o);
            }
        });
    }
}
