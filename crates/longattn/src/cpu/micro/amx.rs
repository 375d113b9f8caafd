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
//! BF16 one; O lives in memory as `[BQ][dvp]` f32 and is the C operand of P V: loaded into the
//! tiles, accumulated, stored back. With lazy rescaling (`micro::TAU`) alpha is almost always 1,
//! so O is rarely touched outside the tile unit.
//!
//! Linux hands out the tile state only on request (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), made once
//! per process by [`available`].
use super::avx512::softmax_rows_bf16;
use super::{check_softmax, Logits, Micro, BQ, LDP, MAXW, NC};
use std::arch::asm;
use std::arch::x86_64::*;
use std::sync::OnceLock;

pub struct Amx;

/// CPUID says AMX-TILE + AMX-BF16 (+ AVX-512 BF16 for the softmax) and the kernel grants the
/// tile data state to this process.
pub fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        if !(is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512dq")
            && is_x86_feature_detected!("avx512bf16"))
        {
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
pub(crate) struct TileConfig(pub(crate) [u8; 64]);

pub(crate) static CONFIG: TileConfig = {
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

/// Loads the C tiles `tmm0..tmm0+n` (n = 2 or 4: a 1 x 2 or 2 x 2 block at `c`, row stride `ldc`
/// bytes) from memory when `acc`, else zeroes them.
///
/// SAFETY (all tile helpers): the caller has loaded `CONFIG` on this thread and every addressed
/// row lies inside its buffer (16 rows of 64 bytes per tile).
#[inline]
unsafe fn c_start(two_rows: bool, c: *const u8, ldc: usize, acc: bool) {
    match (acc, two_rows) {
        (false, true) => asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3"
        ),
        (false, false) => asm!("tilezero tmm0", "tilezero tmm1"),
        (true, true) => asm!(
            "tileloadd tmm0, [{c0} + {ldc}*1]",
            "tileloadd tmm1, [{c1} + {ldc}*1]",
            "tileloadd tmm2, [{c2} + {ldc}*1]",
            "tileloadd tmm3, [{c3} + {ldc}*1]",
            c0 = in(reg) c,
            c1 = in(reg) c.add(64),
            c2 = in(reg) c.add(16 * ldc),
            c3 = in(reg) c.add(16 * ldc + 64),
            ldc = in(reg) ldc,
            options(nostack, readonly),
        ),
        (true, false) => asm!(
            "tileloadd tmm0, [{c0} + {ldc}*1]",
            "tileloadd tmm1, [{c1} + {ldc}*1]",
            c0 = in(reg) c,
            c1 = in(reg) c.add(64),
            ldc = in(reg) ldc,
            options(nostack, readonly),
        ),
    }
}

/// Stores the C tiles of [`c_start`] back to memory.
#[inline]
unsafe fn c_store(two_rows: bool, c: *mut u8, ldc: usize) {
    if two_rows {
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
    } else {
        asm!(
            "tilestored [{c0} + {ldc}*1], tmm0",
            "tilestored [{c1} + {ldc}*1], tmm1",
            c0 = in(reg) c,
            c1 = in(reg) c.add(64),
            ldc = in(reg) ldc,
            options(nostack),
        );
    }
}

/// Loads the operands of one reduction step: A rows `a`, `a + 16 lda` into tmm4/tmm5 (tmm4 only
/// when `two_rows` is false), B columns `b`, `b + 64 bytes` into tmm6/tmm7.
#[inline]
unsafe fn ab_load(two_rows: bool, a: *const u8, lda: usize, b: *const u8, ldb: usize) {
    if two_rows {
        asm!(
            "tileloadd tmm4, [{a0} + {lda}*1]",
            "tileloadd tmm6, [{b0} + {ldb}*1]",
            "tileloadd tmm7, [{b1} + {ldb}*1]",
            "tileloadd tmm5, [{a1} + {lda}*1]",
            a0 = in(reg) a,
            a1 = in(reg) a.add(16 * lda),
            b0 = in(reg) b,
            b1 = in(reg) b.add(64),
            lda = in(reg) lda,
            ldb = in(reg) ldb,
            options(nostack, readonly),
        );
    } else {
        asm!(
            "tileloadd tmm4, [{a0} + {lda}*1]",
            "tileloadd tmm6, [{b0} + {ldb}*1]",
            "tileloadd tmm7, [{b1} + {ldb}*1]",
            a0 = in(reg) a,
            b0 = in(reg) b,
            b1 = in(reg) b.add(64),
            lda = in(reg) lda,
            ldb = in(reg) ldb,
            options(nostack, readonly),
        );
    }
}

/// The operands of the next reduction step: A rows at `a` (and `a + 16 lda` when `two_rows`),
/// B columns at `b`, `b + 64 bytes`.
#[derive(Clone, Copy)]
struct Next {
    a: *const u8,
    b: *const u8,
    two_rows: bool,
}

/// One reduction step on the loaded operands, C(2 x 2) += A x B (C(1 x 2) when not `two_rows`),
/// with the NEXT step's operands loaded into each register right after its last use in this step
/// (software pipelining: tile registers are not renamed, so a load must wait for the products
/// reading the register; issuing it early overlaps it with the remaining products). The next
/// step may belong to the next C block (whose row count may differ). Without `next`, the last
/// step of the last block.
#[inline]
unsafe fn ab_step(two_rows: bool, next: Option<Next>, lda: usize, ldb: usize) {
    let Some(n) = next else {
        if two_rows {
            asm!(
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
            );
        } else {
            asm!("tdpbf16ps tmm0, tmm4, tmm6", "tdpbf16ps tmm1, tmm4, tmm7");
        }
        return;
    };
    // a1 is only read when the next block has two row tiles (it may lie past A otherwise).
    let (a0, a1, b0, b1) = (n.a, n.a.wrapping_add(16 * lda), n.b, n.b.add(64));
    match (two_rows, n.two_rows) {
        (true, true) => asm!(
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tileloadd tmm4, [{a0} + {lda}*1]",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tileloadd tmm6, [{b0} + {ldb}*1]",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "tileloadd tmm7, [{b1} + {ldb}*1]",
            "tileloadd tmm5, [{a1} + {lda}*1]",
            a0 = in(reg) a0, a1 = in(reg) a1, b0 = in(reg) b0, b1 = in(reg) b1,
            lda = in(reg) lda, ldb = in(reg) ldb,
            options(nostack, readonly),
        ),
        (true, false) => asm!(
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tileloadd tmm4, [{a0} + {lda}*1]",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tileloadd tmm6, [{b0} + {ldb}*1]",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "tileloadd tmm7, [{b1} + {ldb}*1]",
            a0 = in(reg) a0, b0 = in(reg) b0, b1 = in(reg) b1,
            lda = in(reg) lda, ldb = in(reg) ldb,
            options(nostack, readonly),
        ),
        (false, true) => asm!(
            "tileloadd tmm5, [{a1} + {lda}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tileloadd tmm4, [{a0} + {lda}*1]",
            "tileloadd tmm6, [{b0} + {ldb}*1]",
            "tileloadd tmm7, [{b1} + {ldb}*1]",
            a0 = in(reg) a0, a1 = in(reg) a1, b0 = in(reg) b0, b1 = in(reg) b1,
            lda = in(reg) lda, ldb = in(reg) ldb,
            options(nostack, readonly),
        ),
        (false, false) => asm!(
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tileloadd tmm4, [{a0} + {lda}*1]",
            "tileloadd tmm6, [{b0} + {ldb}*1]",
            "tileloadd tmm7, [{b1} + {ldb}*1]",
            a0 = in(reg) a0, b0 = in(reg) b0, b1 = in(reg) b1,
            lda = in(reg) lda, ldb = in(reg) ldb,
            options(nostack, readonly),
        ),
    }
}

/// Byte geometry of one blocked product C[rows][ncols] (+)= A[rows][k] B[k][ncols]:
/// A row r at `a + r lda`, advancing `a_step` per 32-deep step; B is split into `b.len()` pieces
/// (the chunks of a group) of `steps` steps each: step s of piece g, column block x0 at
/// `b[g] + 4 x0 + s b_step`; C element (r, x0) at `c + r ldc + 4 x0`.
pub(crate) struct Gemm<'a> {
    pub(crate) a: *const u8,
    pub(crate) lda: usize,
    pub(crate) a_step: usize,
    pub(crate) b: &'a [*const u8],
    pub(crate) ldb: usize,
    pub(crate) b_step: usize,
    pub(crate) steps: usize,
    pub(crate) c: *mut u8,
    pub(crate) ldc: usize,
}

/// Rows in blocks of 32 (16 for a last block of at most 16 rows), columns in blocks of 32; each
/// C block stays in the tiles for the whole reduction (all steps of all pieces). The operand
/// loads are software-pipelined one step ahead (`ab_step`), across blocks too: the last step of
/// a block loads the first operands of the next one before its C tiles are stored, so the loads
/// overlap the products and the stores instead of waiting behind them (a D = 128 `qk` block is
/// only 4 steps).
#[inline]
pub(crate) unsafe fn blocked(g: &Gemm, rows: usize, ncols: usize, acc: bool) {
    let total = g.b.len() * g.steps;
    // Operand addresses of global step t (piece t / steps, step t % steps) of block (r0, x0).
    let at = |r0: usize, x0: usize, t: usize| Next {
        a: g.a.add(r0 * g.lda + t * g.a_step),
        b: g.b[t / g.steps].add(4 * x0 + (t % g.steps) * g.b_step),
        two_rows: rows - r0 > 16,
    };
    let c_at = |r0: usize, x0: usize| g.c.add(r0 * g.ldc + 4 * x0);
    let (mut r0, mut x0) = (0, 0);
    let first = at(0, 0, 0);
    c_start(first.two_rows, c_at(0, 0), g.ldc, acc);
    ab_load(first.two_rows, first.a, g.lda, first.b, g.ldb);
    loop {
        let two = rows - r0 > 16;
        let next_block = if x0 + 32 < ncols {
            Some((r0, x0 + 32))
        } else if r0 + 32 < rows {
            Some((r0 + 32, 0))
        } else {
            None
        };
        for t in 0..total {
            let next = if t + 1 < total {
                Some(at(r0, x0, t + 1))
            } else {
                next_block.map(|(r, x)| at(r, x, 0))
            };
            ab_step(two, next, g.lda, g.ldb);
        }
        c_store(two, c_at(r0, x0), g.ldc);
        let Some((r, x)) = next_block else { break };
        (r0, x0) = (r, x);
        c_start(rows - r0 > 16, c_at(r0, x0), g.ldc, acc);
    }
}

/// O rows whose alpha is not 1 are rescaled in place (lazy rescaling makes this rare).
#[target_feature(enable = "avx512f")]
unsafe fn rescale(rows: usize, dvp: usize, alpha: &[f32], o: &mut [f32]) {
    for (r, &a) in alpha.iter().enumerate().take(rows) {
        if a != 1.0 {
            let av = _mm512_set1_ps(a);
            for x0 in (0..dvp).step_by(16) {
                let op = o.as_mut_ptr().add(r * dvp + x0);
                _mm512_storeu_ps(op, _mm512_mul_ps(av, _mm512_loadu_ps(op)));
            }
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
    const GROUP: usize = 4;
    const DIM_ALIGN: usize = 32;
    const DV_ALIGN: usize = 32;
    const NAME: &'static str = "amx";

    fn begin(&self) {
        unsafe { asm!("ldtilecfg [{0}]", in(reg) CONFIG.0.as_ptr(), options(nostack, readonly)) };
    }

    fn qk(&self, q: &[u16], rows: usize, dq: usize, kt: &[u16], s: &mut [f32], lds: usize) {
        assert!(q.len() >= BQ * dq && kt.len() >= dq * NC && s.len() >= (BQ - 1) * lds + NC);
        assert!(dq.is_multiple_of(32));
        // A: Q rows (2 dq bytes apart), 32 dims = 64 bytes per step.
        // B: K^T pair rows (4 NC bytes apart), 16 pair rows per step.
        let g = Gemm {
            a: q.as_ptr() as *const u8,
            lda: 2 * dq,
            a_step: 64,
            b: &[kt.as_ptr() as *const u8],
            ldb: 4 * NC,
            b_step: 16 * 4 * NC,
            steps: dq / 32,
            c: s.as_mut_ptr() as *mut u8,
            ldc: 4 * lds,
        };
        unsafe { blocked(&g, rows, NC, false) }
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
        let dvp = dv.div_ceil(32) * 32;
        let w = vt.len();
        assert!(w <= MAXW && p.len() >= BQ * LDP && o.len() >= BQ * dvp);
        assert!(vt.iter().all(|v| v.len() >= NC * dvp));
        let mut b = [std::ptr::null(); MAXW];
        for (d, v) in b.iter_mut().zip(vt) {
            *d = v.as_ptr() as *const u8;
        }
        // O = alpha O, then O += P V on the tiles (C loaded from and stored to O).
        // A: P rows (2 LDP bytes apart), 32 keys = 64 bytes per step.
        // B: per chunk, V pair rows (4 dvp bytes apart), 16 pair rows per step, 2 steps. All 64
        // keys of a chunk are used: p is 0 past its valid keys and V is 0 past Sk.
        let g = Gemm {
            a: p.as_ptr() as *const u8,
            lda: 2 * LDP,
            a_step: 64,
            b: &b[..w],
            ldb: 4 * dvp,
            b_step: 16 * 4 * dvp,
            steps: NC / 32,
            c: o.as_mut_ptr() as *mut u8,
            ldc: 4 * dvp,
        };
        unsafe {
            rescale(rows, dvp, alpha, o);
            blocked(&g, rows, dvp, true);
        }
    }
}
