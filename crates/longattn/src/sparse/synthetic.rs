//! Seeded queries and keys with the structure long-context attention shows, for tests and
//! benchmarks where real captured inputs do not fit (the GPU's 64k-128k runs).
//!
//! Per key head g, with unit-variance Gaussian noise n (entries N(0, 1), D dims):
//! ```text
//!   hub direction u_g (entries N(0, 1)), positional codes r_t (entries N(0, 1), one per position)
//!   k_j = n + a u_g [j < 4 or j a hub]  +  c sum_{o in O} r_{j + o}
//!   q_i = n + a u_g                     +  c r_{p_i}           (p_i = i + Sk - Sq, aligned)
//! ```
//! so the scaled logit q_i . k_j / sqrt(D) gains about a^2 sqrt(D) on the sink keys and on the hub
//! keys (vertical lines: 1 hub per ~1000 keys, at seeded positions) and about c^2 sqrt(D) where
//! p_i - j is one of the offsets O = {0, 1, 2, 3, 64, 1000} (diagonal lines: the local band and
//! two slashes); elsewhere the logits are noise of unit variance. a = 0.6, c = 0.55 (at D = 128:
//! +4.1 and +3.4 nats). Query heads of a group share u_g and the codes.
//!
//! With unit-variance noise a row's softmax is flat: the noise keys hold most of its mass (at
//! 4k, 28% of a row's keys hold 97% of it), and since each row's noise is its own, a query
//! tile's rows share few heavy keys. [`structured_qk_sharp`] is closer to a real model's rows:
//! the queries scaled by [`SHARP`] = 2.7 (noise logits of std 2.7, the bumps 2.7 times higher:
//! 0.5% of a row's keys hold 97% of its mass) and [`SHARED`] = 97% of each query's noise
//! variance smooth along the positions (linear between seeded anchors every 256 rows), so
//! nearby queries weigh the same keys; the diagonals (offsets 64 and 1000) stay each row's own.
//! Measured with the CPU selector (4k / 8k, causal): `columns(gamma=0.9,rows=4,block=128,
//! sink=4,local=64,gathered=1)` keeps 9.7% / 5.0% with mass recall 0.81 / 0.75; with gamma 0.97
//! and `check=0.92` the check sends half the heads (4k) or all (8k) dense. Real rows are still
//! kinder to a sampled-row estimate (SmolLM2 8k: 21% at 0.966, docs/QUALITY.md).
use crate::tensor::{Buffer, DType, Tensor};
use crate::testing::Rng;
use rayon::prelude::*;

const OFFSETS: [usize; 6] = [0, 1, 2, 3, 64, 1000];
const A: f64 = 0.6;
const C: f64 = 0.55;

/// The query scale of [`structured_qk_sharp`]: the std of its rows' noise logits.
pub const SHARP: f64 = 2.7;
/// The share of a query's noise variance that is smooth along the positions (between anchors
/// every 256 rows) in [`structured_qk_sharp`].
pub const SHARED: f64 = 0.97;

/// q `[batch, sq, hq, d]` and k `[batch, sk, hk, d]` in `dtype` (see the module header).
#[allow(clippy::too_many_arguments)]
pub fn structured_qk(
    dtype: DType,
    batch: usize,
    sq: usize,
    sk: usize,
    hq: usize,
    hk: usize,
    d: usize,
    seed: u64,
) -> (Tensor, Tensor) {
    structured_scaled(dtype, (batch, sq, sk, hq, hk, d), seed, (1.0, 0.0))
}

/// [`structured_qk`] with peaked rows whose heavy keys nearby queries share (module header).
#[allow(clippy::too_many_arguments)]
pub fn structured_qk_sharp(
    dtype: DType,
    batch: usize,
    sq: usize,
    sk: usize,
    hq: usize,
    hk: usize,
    d: usize,
    seed: u64,
) -> (Tensor, Tensor) {
    structured_scaled(dtype, (batch, sq, sk, hq, hk, d), seed, (SHARP, SHARED))
}

fn structured_scaled(
    dtype: DType,
    (batch, sq, sk, hq, hk, d): (usize, usize, usize, usize, usize, usize),
    seed: u64,
    (q_scale, share): (f64, f64),
) -> (Tensor, Tensor) {
    let gauss = |n: usize, s: u64| -> Vec<f32> {
        let mut r = Rng::new(s);
        (0..n).map(|_| r.normal() as f32).collect()
    };
    let group = (hq / hk.max(1)).max(1);
    // Per (batch, key head): hub direction, hub flags, positional codes over 0 .. sk + 1000.
    let npos = sk + OFFSETS[OFFSETS.len() - 1] + 1;
    let heads: Vec<(Vec<f32>, Vec<bool>, Vec<f32>)> = (0..batch * hk)
        .into_par_iter()
        .map(|bg| {
            let s = seed.wrapping_mul(1_000_003).wrapping_add(bg as u64 * 7919);
            let u = gauss(d, s ^ 0x5151);
            let mut r = Rng::new(s ^ 0x7777);
            let hub: Vec<bool> = (0..sk).map(|j| j < 4 || r.below(1000) == 0).collect();
            (u, hub, gauss(npos * d, s ^ 0x9999))
        })
        .collect();
    // The queries' smooth noise: seeded anchors every 256 rows per (batch row, query head),
    // `[batch][hq][anchor][d]` (none without a smooth share).
    let n_anchor = sq.div_ceil(256) + 1;
    let anchors: Vec<f64> = if share > 0.0 {
        (0..batch * hq * n_anchor)
            .into_par_iter()
            .flat_map_iter(|x| {
                let (bh, a) = (x / n_anchor, x % n_anchor);
                let (b, h) = (bh / hq, bh % hq);
                let z = ((b * sq.div_ceil(256) + a + 1) * 131 + h) as u64;
                let (s0, zk) = (seed ^ 0x1111, z.wrapping_mul(0x51ED));
                (0..d).map(move |c| Rng::new(s0 ^ zk.wrapping_add(c as u64)).normal())
            })
            .collect()
    } else {
        Vec::new()
    };
    let fill =
        |rows: usize, h_of: &(dyn Fn(usize) -> usize + Sync), nh: usize, key: bool, s0: u64| {
            let mut out = vec![0f32; batch * rows * nh * d];
            out.par_chunks_mut(nh * d)
                .enumerate()
                .for_each(|(bt, row)| {
                    let (b, t) = (bt / rows, bt % rows);
                    let mut r = Rng::new(s0.wrapping_add(bt as u64 * 0x9E37_79B9));
                    for (h, x) in row.chunks_mut(d).enumerate() {
                        let (u, hub, codes) = &heads[b * hk + h_of(h)];
                        for v in x.iter_mut() {
                            *v = r.normal() as f32;
                        }
                        if !key && share > 0.0 {
                            // A smooth part of the row's noise: between seeded anchors every
                            // 256 rows (per batch row and head), so nearby queries weigh the
                            // same keys.
                            let (a, f) = (t / 256, (t % 256) as f64 / 256.0);
                            let at = ((b * hq + h) * n_anchor + a) * d;
                            let (a0, a1) = (&anchors[at..at + d], &anchors[at + d..at + 2 * d]);
                            let norm = ((1.0 - f) * (1.0 - f) + f * f).sqrt();
                            let (wi, ws) = ((1.0 - share).sqrt(), share.sqrt() / norm);
                            for ((v, z0), z1) in x.iter_mut().zip(a0).zip(a1) {
                                let z = (1.0 - f) * z0 + f * z1;
                                *v = (wi * *v as f64 + ws * z) as f32;
                            }
                        }
                        if !key || hub[t] {
                            x.iter_mut()
                                .zip(u)
                                .for_each(|(v, &w)| *v += (A * w as f64) as f32);
                        }
                        let mut code = |p: usize| {
                            let c = &codes[p * d..][..d];
                            x.iter_mut()
                                .zip(c)
                                .for_each(|(v, &w)| *v += (C * w as f64) as f32);
                        };
                        if key {
                            OFFSETS.iter().for_each(|&o| code(t + o));
                        } else if let Some(p) = (t + sk).checked_sub(sq) {
                            code(p);
                        }
                    }
                });
            out
        };
    let mut q = fill(sq, &|h| h / group, hq, false, seed ^ 0x1111);
    q.iter_mut().for_each(|x| *x *= q_scale as f32);
    let k = fill(sk, &|h| h, hk, true, seed ^ 0x2222);
    (
        Tensor {
            data: Buffer::from_f32(dtype, &q),
            shape: vec![batch, sq, hq, d],
        },
        Tensor {
            data: Buffer::from_f32(dtype, &k),
            shape: vec![batch, sk, hk, d],
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The share of a row's keys holding `gamma` of its softmax mass (q_i . k_j / sqrt(D)), mean
    /// over some rows of a causal 4096 x 4096 head.
    fn keys_for_mass(q: &Tensor, k: &Tensor, gamma: f64) -> f64 {
        let (qv, kv) = (q.view("q").unwrap(), k.view("k").unwrap());
        let d = qv.shape[3];
        let rows = [1023, 2047, 3071, 4095];
        let mut share = 0.0;
        for &i in &rows {
            let l: Vec<f64> = (0..=i)
                .map(|j| {
                    (0..d)
                        .map(|c| qv.get(0, i, 0, c) as f64 * kv.get(0, j, 0, c) as f64)
                        .sum::<f64>()
                        / (d as f64).sqrt()
                })
                .collect();
            let m = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let mut p: Vec<f64> = l.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = p.iter().sum();
            p.sort_by(|a, b| b.partial_cmp(a).unwrap());
            let (mut acc, mut kept) = (0.0, 0);
            while acc < gamma * z {
                acc += p[kept];
                kept += 1;
            }
            share += kept as f64 / (i + 1) as f64;
        }
        share / rows.len() as f64
    }

    #[test]
    fn sharp_rows_hold_their_mass_in_few_keys() {
        let (q, k) = structured_qk(DType::F32, 1, 4096, 4096, 1, 1, 128, 5);
        let flat = keys_for_mass(&q, &k, 0.97);
        let (q, k) = structured_qk_sharp(DType::F32, 1, 4096, 4096, 1, 1, 128, 5);
        let sharp = keys_for_mass(&q, &k, 0.97);
        assert!(flat > 0.2, "unit-variance rows: {flat}");
        assert!(sharp < 0.02, "sharp rows: {sharp}");
    }
}
