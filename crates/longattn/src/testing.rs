//! Shared test support (used by the test suites, the benchmark's correctness check and the CLI):
//! the awkward sizes, seeded random inputs, the tolerances, brute-force schedules.
use crate::error::Result;
use crate::mask::{BlockSchedule, RowMask, TileEntry, TileKind};
use crate::reference::RefOutput;
use crate::tensor::{Buffer, DType, Tensor};

/// Sequence lengths every path is tested on: below, at and above tile boundaries.
pub const AWKWARD_SIZES: &[usize] = &[1, 7, 63, 65, 113, 1023, 4224];

/// Tolerance of the attention output, relative to max |out| of the oracle, for inputs stored in
/// `dtype` (the oracle reads the same stored values, so only the computation's rounding counts):
/// four units of roundoff of the storage format (the output is rounded to it, bf16 kernels round
/// P to it), and never below 2e-5 (f32 accumulation over thousands of keys, exp2 polynomial).
pub fn out_tolerance(dtype: DType) -> f64 {
    (4.0 * dtype.eps()).max(2e-5)
}

/// Tolerance of each gradient (dQ, dK, dV), relative to max |grad| of the oracle, for inputs stored
/// in `dtype`. The gradients are rounded to the storage format, the bf16 path rounds P and dS to
/// bf16 before its products, and Delta = dO . O reads the forward's output rounded to the storage
/// format: four units of roundoff of the format, never below 2e-5 (f32 accumulation of products
/// that cancel: dS = P (dP - Delta) sums to 0 over a row). Measured on the test suite: at most
/// 1.3 units (bf16, AMX) and 2.5e-6 (f32).
pub fn grad_tolerance(dtype: DType) -> f64 {
    (4.0 * dtype.eps()).max(2e-5)
}

/// Largest error of a gradient against the oracle, relative to max |oracle| or `floor` when that is
/// larger (NaN counts as inf). dQ and dK vanish identically where rows see a single key (the
/// softmax of one logit has no gradient): compare them with dV's scale as the floor.
pub fn compare_grad(got: &Tensor, reference: &[f64], floor: f64) -> f64 {
    let got = got.data.to_f32_vec();
    assert_eq!(got.len(), reference.len(), "gradient sizes differ");
    let scale = reference
        .iter()
        .fold(floor, |a, &x| a.max(x.abs()))
        .max(1e-30);
    let mut e = 0.0f64;
    for (&g, &r) in got.iter().zip(reference) {
        let d = (g as f64 - r).abs();
        e = e.max(if d.is_nan() { f64::INFINITY } else { d });
    }
    e / scale
}

/// Absolute tolerance of the LSE (kept in f32 whatever the input dtype).
pub const LSE_TOLERANCE: f64 = 1e-4;

/// SplitMix64: a tiny seeded generator so library code and tests share one input recipe.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize % n.max(1)
    }
}

/// A seeded random tensor: normal values times `std`, rounded into `dtype`. Never zeros.
pub fn random_tensor(dtype: DType, shape: &[usize], std: f64, seed: u64) -> Tensor {
    let mut rng = Rng::new(seed);
    let n: usize = shape.iter().product();
    let vals: Vec<f32> = (0..n).map(|_| (rng.normal() * std) as f32).collect();
    Tensor {
        data: Buffer::from_f32(dtype, &vals),
        shape: shape.to_vec(),
    }
}

/// Largest errors of a result against the oracle: (max |out - ref| / max |ref|, max |lse - ref|).
/// Rows where the oracle's LSE is -inf must have LSE -inf and output 0 (else the error is inf).
pub fn compare(out: &Tensor, lse: &[f32], reference: &RefOutput) -> (f64, f64) {
    let got = out.data.to_f32_vec();
    let scale = reference
        .out
        .iter()
        .fold(0.0f64, |a, &x| a.max(x.abs()))
        .max(1e-30);
    let mut e_out = 0.0f64;
    for (&g, &r) in got.iter().zip(&reference.out) {
        let e = (g as f64 - r).abs();
        e_out = e_out.max(if e.is_nan() { f64::INFINITY } else { e });
    }
    let mut e_lse = 0.0f64;
    for (&g, &r) in lse.iter().zip(&reference.lse) {
        let e = if r == f64::NEG_INFINITY {
            if g == f32::NEG_INFINITY {
                0.0
            } else {
                f64::INFINITY
            }
        } else {
            (g as f64 - r).abs()
        };
        e_lse = e_lse.max(if e.is_nan() { f64::INFINITY } else { e });
    }
    (e_out / scale, e_lse)
}

/// An element mask given by a predicate `f(b, i, j)` (tests: an independent definition of a mask).
pub struct FnMask<F>(pub F);

impl<F: Fn(usize, usize, usize) -> bool + Sync> RowMask for FnMask<F> {
    fn row_bits(&self, b: usize, _h: usize, i: usize, j0: usize, out: &mut [u64]) {
        for (w, word) in out.iter_mut().enumerate() {
            *word = 0;
            for t in 0..64 {
                if (self.0)(b, i, j0 + 64 * w + t) {
                    *word |= 1 << t;
                }
            }
        }
    }
}

/// Brute-force schedule from a predicate (tests only: costs Sq x Sk evaluations).
/// `f` must return false for j >= sk.
pub fn brute_force_schedule(
    tile_q: usize,
    tile_k: usize,
    batch: usize,
    sq: usize,
    sk: usize,
    f: &dyn Fn(usize, usize, usize) -> bool,
) -> Result<BlockSchedule> {
    let mut s = BlockSchedule::empty(tile_q, tile_k, sq, sk, batch, 1)?;
    for b in 0..batch {
        for qt in 0..s.q_tiles {
            let (q0, q1) = s.q_range(qt);
            let mut row = Vec::new();
            for kt in 0..s.k_tiles {
                let (k0, k1) = s.k_range(kt);
                let n = (q0..q1)
                    .flat_map(|i| (k0..k1).map(move |j| (i, j)))
                    .filter(|&(i, j)| f(b, i, j))
                    .count();
                if n > 0 {
                    let kind = if n == (q1 - q0) * (k1 - k0) {
                        TileKind::Full
                    } else {
                        TileKind::Partial
                    };
                    row.push(TileEntry {
                        k_tile: kt as u32,
                        kind,
                    });
                }
            }
            s.push_row(&row)?;
        }
    }
    s.finish()
}
