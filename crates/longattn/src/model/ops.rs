//! Dense building blocks of the model forward (f32, batch 1, row-major `[tokens, features]`).
//! Backend-agnostic in the sense that each is a plain function of slices; a GPU backend supplies
//! its own versions of the same list.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// A weight matrix `[out][in]` row-major (the layout of a GGUF 2-D tensor with dims `[in, out]`).
#[derive(Clone, Debug)]
pub struct Mat {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Mat {
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Mat {
        debug_assert_eq!(data.len(), rows * cols);
        Mat { rows, cols, data }
    }
    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
}

static MATMUL_NANOS: AtomicU64 = AtomicU64::new(0);
static MATMUL_FLOPS: AtomicU64 = AtomicU64::new(0);

/// Wall time (s) and FLOPs (2 n k m per call) spent in [`matmul_t`] since the last reset, for
/// reporting matmul GFLOP/s.
pub fn matmul_stats() -> (f64, f64) {
    (
        MATMUL_NANOS.load(Ordering::Relaxed) as f64 * 1e-9,
        MATMUL_FLOPS.load(Ordering::Relaxed) as f64,
    )
}
pub fn reset_matmul_stats() {
    MATMUL_NANOS.store(0, Ordering::Relaxed);
    MATMUL_FLOPS.store(0, Ordering::Relaxed);
}

/// y `[n, W.rows]` = x `[n, W.cols]` W^T, through the `gemm` crate (run-time SIMD dispatch,
/// threads from the current rayon pool).
pub fn matmul_t(x: &[f32], n: usize, w: &Mat, y: &mut [f32]) {
    let t0 = Instant::now();
    let (k, m) = (w.cols, w.rows);
    let threads = rayon::current_num_threads();
    let par = if threads > 1 && n * k * m >= 1 << 16 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    crate::cpu::gemm::gemm_abt_par(y, x, &w.data, (n, m, k), par);
    MATMUL_NANOS.fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
    MATMUL_FLOPS.fetch_add(2 * (n * k * m) as u64, Ordering::Relaxed);
}

/// RMSNorm of each `dim`-long row in place: x <- x / sqrt(mean(x^2) + eps) * w.
pub fn rms_norm(x: &mut [f32], w: &[f32], eps: f32) {
    let dim = w.len();
    for row in x.chunks_exact_mut(dim) {
        let ms = row.iter().map(|&a| (a as f64) * (a as f64)).sum::<f64>() / dim as f64;
        let r = (1.0 / (ms + eps as f64).sqrt()) as f32;
        for (a, &g) in row.iter_mut().zip(w) {
            *a *= r * g;
        }
    }
}

/// Rotate-half RoPE (GPT-NeoX / HF layout) on `[n, heads, d]` rows at positions pos0 ..:
/// for pair i < d/2, theta = pos * base^(-2i/d),
///   (x_i, x_{i+d/2}) <- (x_i cos theta - x_{i+d/2} sin theta, x_i sin theta + x_{i+d/2} cos theta).
pub fn rope(x: &mut [f32], heads: usize, d: usize, pos0: usize, base: f32) {
    let half = d / 2;
    let inv: Vec<f64> = (0..half)
        .map(|i| (base as f64).powf(-2.0 * i as f64 / d as f64))
        .collect();
    let mut cs = vec![(0.0f32, 0.0f32); half];
    for (t, tok) in x.chunks_exact_mut(heads * d).enumerate() {
        let pos = (pos0 + t) as f64;
        for (c, &f) in cs.iter_mut().zip(&inv) {
            let (s, co) = (pos * f).sin_cos();
            *c = (co as f32, s as f32);
        }
        for h in tok.chunks_exact_mut(d) {
            let (a, b) = h.split_at_mut(half);
            for ((x0, x1), &(c, s)) in a.iter_mut().zip(b.iter_mut()).zip(&cs) {
                let (u, v) = (*x0, *x1);
                *x0 = u * c - v * s;
                *x1 = u * s + v * c;
            }
        }
    }
}

/// Undoes llama.cpp's Q/K row permutation of one projection `[heads * d][in]`: the converter
/// stored HF row (h, t, i) (t in {0,1} the half, i < d/2) at row (h, i, t), i.e.
/// reshape(heads, 2, d/2, in) -> swap axes 1,2. The inverse reads GGUF row h*d + 2i + t into HF
/// row h*d + t*d/2 + i.
pub fn unpermute_rows(w: &Mat, heads: usize) -> Mat {
    let d = w.rows / heads;
    let half = d / 2;
    let mut out = vec![0.0f32; w.data.len()];
    for h in 0..heads {
        for t in 0..2 {
            for i in 0..half {
                let src = h * d + 2 * i + t;
                let dst = h * d + t * half + i;
                out[dst * w.cols..(dst + 1) * w.cols].copy_from_slice(w.row(src));
            }
        }
    }
    Mat::new(w.rows, w.cols, out)
}

/// SiLU: x sigmoid(x).
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
pub fn gelu_tanh(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // sqrt(2/pi)
    0.5 * x * (1.0 + (C * (x + 0.044715 * x * x * x)).tanh())
}

/// Log-softmax at one index: logit[t] - log sum_j exp(logit[j]) (f64 accumulation). Returns the
/// negative log-likelihood of `t`.
pub fn nll(logits: &[f32], t: usize) -> f64 {
    let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let s: f64 = logits.iter().map(|&z| (z as f64 - m).exp()).sum();
    m + s.ln() - logits[t] as f64
}

/// KL(p || q) of the softmax distributions of two logit rows, in nats (f64 accumulation):
/// sum_j p_j (a_j - b_j) - lse(a) + lse(b), with p = softmax(a). Two identical rows give exactly 0.
pub fn kl(a: &[f32], b: &[f32]) -> f64 {
    debug_assert_eq!(a.len(), b.len());
    let lse = |x: &[f32]| {
        let m = x.iter().fold(f32::NEG_INFINITY, |u, &v| u.max(v)) as f64;
        m + x.iter().map(|&z| (z as f64 - m).exp()).sum::<f64>().ln()
    };
    let (la, lb) = (lse(a), lse(b));
    let cross: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - la).exp() * (x as f64 - y as f64))
        .sum();
    cross - la + lb
}

/// Index of the largest logit (first on ties).
pub fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    for (i, &z) in logits.iter().enumerate() {
        if z > logits[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Rng;

    #[test]
    fn matmul_matches_plain_loops_on_awkward_sizes() {
        let mut rng = Rng::new(3);
        for &(n, k, m) in &[(1, 7, 5), (3, 64, 1), (17, 576, 192), (65, 33, 129)] {
            let x: Vec<f32> = (0..n * k).map(|_| rng.normal() as f32).collect();
            let w = Mat::new(m, k, (0..m * k).map(|_| rng.normal() as f32).collect());
            let mut y = vec![0.0f32; n * m];
            matmul_t(&x, n, &w, &mut y);
            for i in 0..n {
                for j in 0..m {
                    let r: f64 = (0..k)
                        .map(|t| x[i * k + t] as f64 * w.data[j * k + t] as f64)
                        .sum();
                    assert!((y[i * m + j] as f64 - r).abs() < 1e-4 * (k as f64).sqrt());
                }
            }
        }
    }

    #[test]
    fn kl_matches_the_definition_and_is_zero_on_equal_rows() {
        let mut rng = Rng::new(5);
        for &n in &[1usize, 2, 7, 1000] {
            let a: Vec<f32> = (0..n).map(|_| 3.0 * rng.normal() as f32).collect();
            let b: Vec<f32> = (0..n).map(|_| 3.0 * rng.normal() as f32).collect();
            assert_eq!(kl(&a, &a), 0.0);
            let soft = |x: &[f32]| {
                let s: f64 = x.iter().map(|&z| (z as f64).exp()).sum();
                x.iter()
                    .map(|&z| (z as f64).exp() / s)
                    .collect::<Vec<f64>>()
            };
            let (p, q) = (soft(&a), soft(&b));
            let r: f64 = p.iter().zip(&q).map(|(p, q)| p * (p / q).ln()).sum();
            assert!(
                (kl(&a, &b) - r).abs() < 1e-9 * r.max(1.0),
                "{n}: {} vs {r}",
                kl(&a, &b)
            );
            // Invariant to a shift of either row.
            let a2: Vec<f32> = a.iter().map(|x| x + 100.0).collect();
            assert!((kl(&a2, &b) - r).abs() < 1e-4 * r.max(1.0));
        }
    }

    #[test]
    fn unpermute_inverts_the_llama_cpp_permutation() {
        // The converter's permutation: GGUF row (h, i, t) = HF row (h, t, i).
        let (heads, d, cols) = (3, 8, 2);
        let hf = Mat::new(
            heads * d,
            cols,
            (0..heads * d * cols).map(|x| x as f32).collect(),
        );
        let mut g = vec![0.0f32; hf.data.len()];
        for h in 0..heads {
            for t in 0..2 {
                for i in 0..d / 2 {
                    let (src, dst) = (h * d + t * d / 2 + i, h * d + 2 * i + t);
                    g[dst * cols..(dst + 1) * cols].copy_from_slice(hf.row(src));
                }
            }
        }
        let back = unpermute_rows(&Mat::new(heads * d, cols, g), heads);
        assert_eq!(back.data, hf.data);
    }

    #[test]
    fn rope_rotates_pairs_and_keeps_relative_dot_products() {
        // q.k after RoPE depends only on the position difference.
        let (d, base) = (16, 10000.0);
        let mut rng = Rng::new(9);
        let q: Vec<f32> = (0..d).map(|_| rng.normal() as f32).collect();
        let k: Vec<f32> = (0..d).map(|_| rng.normal() as f32).collect();
        let dot_at = |pq: usize, pk: usize| {
            let (mut a, mut b) = (q.clone(), k.clone());
            rope(&mut a, 1, d, pq, base);
            rope(&mut b, 1, d, pk, base);
            a.iter().zip(&b).map(|(x, y)| x * y).sum::<f32>()
        };
        assert!((dot_at(5, 2) - dot_at(105, 102)).abs() < 1e-3);
        let (mut a, n0) = (q.clone(), q.iter().map(|x| x * x).sum::<f32>());
        rope(&mut a, 1, d, 37, base);
        assert!((a.iter().map(|x| x * x).sum::<f32>() - n0).abs() < 1e-3 * n0);
    }

    #[test]
    fn nll_is_log_softmax() {
        let l = [1.0f32, 2.0, 3.0];
        let z: f64 = l.iter().map(|&x| (x as f64).exp()).sum();
        assert!((nll(&l, 0) - (z.ln() - 1.0)).abs() < 1e-12);
        assert_eq!(argmax(&l), 2);
    }
}
