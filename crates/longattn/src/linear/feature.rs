//! Feature maps `phi` and output normalisations around the core, forward and backward (f32).
//!
//! Feature maps act on each `D`-long row of q `[B, T, H, D]` and k `[B, T, Hk, D]`:
//! - identity: `phi(x) = x` (`F = D`);
//! - elu: `phi(x) = elu(x) + 1` = `x + 1` for `x > 0`, `e^x` otherwise (`F = D`);
//! - taylor (BASED): `phi(x) = [1, x / d^{1/4}, vec(x ⊗ x) / (sqrt(2) sqrt(d))]` (`F = 1 + D + D^2`,
//!   the outer product row-major: entry `1 + D + i D + j` is `x_i x_j`), so that
//!   `phi(q) . phi(k) = 1 + s + s^2 / 2` with `s = q . k / sqrt(d)`: the second-order Taylor
//!   expansion of `exp(s)`. The `1/sqrt(d)` of the exponent is inside the map, so the core's
//!   default scale with this map is 1;
//! - hedgehog: learned weights `W [Hk, D, Fh]` (one map per key/value head, shared by the query heads
//!   of its group so that q and k features of one group live in one space):
//!   `z = x W[head]`, `phi(x) = [softmax(z), softmax(-z)]` (`F = 2 Fh`).
//!
//! Normalisations act on the core's output rows:
//! - denominator (`normalized`): `out_t = (phi(q_t) S_t) / (phi(q_t) . z_t)` with
//!   `z_t = a_t z_{t-1} + phi(k_t)`. longattn runs the same core with a ones column appended to v
//!   (`v' = [v, 1]`, `V + 1` columns): column `V` of the state is `z` and column `V` of the output is
//!   the denominator, so one kernel computes both (and the state carries `z` as its last column).
//!   No epsilon is added: with positive feature maps (elu, taylor, hedgehog) the denominator is
//!   positive; with the identity map it can vanish, which is the caller's choice.
//! - rms (`norm`, TransNormer): `out_t = o_t / sqrt(mean_j o_t[j]^2 + RMS_EPS)`, no learned weight.
use crate::error::{Error, Result};
use crate::tensor::TensorView;
use rayon::prelude::*;

/// Epsilon of the RMS normalisation (inside the square root).
pub const RMS_EPS: f32 = 1e-6;

/// A feature map (see the module header).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FeatureMap {
    Identity,
    Elu,
    Taylor,
    Hedgehog,
}

impl FeatureMap {
    pub fn name(self) -> &'static str {
        match self {
            FeatureMap::Identity => "identity",
            FeatureMap::Elu => "elu",
            FeatureMap::Taylor => "taylor",
            FeatureMap::Hedgehog => "hedgehog",
        }
    }
    /// Feature dimension for input head dim `d` (`fh`: the Hedgehog weights' output width).
    pub fn dim(self, d: usize, fh: usize) -> usize {
        match self {
            FeatureMap::Identity | FeatureMap::Elu => d,
            FeatureMap::Taylor => 1 + d + d * d,
            FeatureMap::Hedgehog => 2 * fh,
        }
    }
}

/// Hedgehog weights `W [heads, d, f]`, contiguous f32.
#[derive(Clone, Copy, Debug)]
pub struct Hedgehog<'a> {
    pub w: &'a [f32],
    pub heads: usize,
    pub d: usize,
    pub f: usize,
}

/// Applies `map` to every row of `x [B, T, Hx, D]`: returns `[B, T, Hx, F]` contiguous f32.
/// Row head `hx` uses Hedgehog weight head `hx / group`.
pub fn forward(
    map: FeatureMap,
    x: &TensorView,
    hh: Option<&Hedgehog>,
    group: usize,
) -> Result<Vec<f32>> {
    let [b, t, hx, d] = x.shape;
    let fh = hh.map_or(0, |w| w.f);
    let f = map.dim(d, fh);
    if map == FeatureMap::Hedgehog && hh.is_none() {
        return Err(missing_weights("linear feature map"));
    }
    let mut out = vec![0.0f32; b * t * hx * f];
    // One task per token (all its heads), in parallel.
    out.par_chunks_mut(hx * f).enumerate().for_each_init(
        || (vec![0.0f32; d], vec![0.0f32; fh]),
        |(row, z), (n, block)| {
            let (ib, it) = (n / t, n % t);
            for ih in 0..hx {
                for (i, r) in row.iter_mut().enumerate() {
                    *r = x.get(ib, it, ih, i);
                }
                let o = &mut block[ih * f..][..f];
                match map {
                    FeatureMap::Identity => o.copy_from_slice(row),
                    FeatureMap::Elu => {
                        for (y, &x) in o.iter_mut().zip(row.iter()) {
                            *y = if x > 0.0 { x + 1.0 } else { x.exp() };
                        }
                    }
                    FeatureMap::Taylor => {
                        let (c1, c2) = taylor_coefs(d);
                        o[0] = 1.0;
                        for i in 0..d {
                            o[1 + i] = row[i] * c1;
                            for j in 0..d {
                                o[1 + d + i * d + j] = row[i] * row[j] * c2;
                            }
                        }
                    }
                    FeatureMap::Hedgehog => {
                        if let Some(w) = hh {
                            hedgehog_logits(w, ih / group, row, z);
                            softmax(z, 1.0, &mut o[..fh]);
                            softmax(z, -1.0, &mut o[fh..]);
                        }
                    }
                }
            }
        },
    );
    Ok(out)
}

fn missing_weights(op: &'static str) -> Error {
    Error::Param {
        op,
        msg: "the hedgehog feature map needs its weights `hedgehog` [Hk, D, F]".into(),
    }
}

/// `(1 / d^{1/4}, 1 / (sqrt(2) sqrt(d)))`.
fn taylor_coefs(d: usize) -> (f32, f32) {
    let d = d as f64;
    (
        (1.0 / d.powf(0.25)) as f32,
        (1.0 / (2.0f64.sqrt() * d.sqrt())) as f32,
    )
}

fn hedgehog_logits(w: &Hedgehog, head: usize, x: &[f32], z: &mut [f32]) {
    let wh = &w.w[head * w.d * w.f..][..w.d * w.f];
    z.fill(0.0);
    for (i, &xi) in x.iter().enumerate() {
        for (zj, &wij) in z.iter_mut().zip(&wh[i * w.f..][..w.f]) {
            *zj += xi * wij;
        }
    }
}

/// `out = softmax(sign * z)`.
fn softmax(z: &[f32], sign: f32, out: &mut [f32]) {
    let m = z.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(sign * x));
    let mut s = 0.0f32;
    for (o, &x) in out.iter_mut().zip(z) {
        *o = (sign * x - m).exp();
        s += *o;
    }
    for o in out.iter_mut() {
        *o /= s;
    }
}

/// Backward of [`forward`]: `dphi [B, T, Hx, F]` -> `dx [B, T, Hx, D]`; the Hedgehog weight gradient
/// `[heads, D, Fh]` is accumulated into `dw` when given.
pub fn backward(
    map: FeatureMap,
    x: &TensorView,
    hh: Option<&Hedgehog>,
    group: usize,
    dphi: &[f32],
    dw: Option<&mut [f32]>,
) -> Result<Vec<f32>> {
    let [b, t, hx, d] = x.shape;
    let fh = hh.map_or(0, |w| w.f);
    let f = map.dim(d, fh);
    if map == FeatureMap::Hedgehog && hh.is_none() {
        return Err(missing_weights("linear feature map backward"));
    }
    let want_dw = dw.is_some() && map == FeatureMap::Hedgehog;
    let mut dx = vec![0.0f32; b * t * hx * d];
    // Blocks of TOKENS tokens in parallel; each block sums its own Hedgehog weight gradient, and
    // the blocks' sums are added in order afterwards.
    const TOKENS: usize = 64;
    let partial: Vec<Option<Vec<f32>>> = dx
        .par_chunks_mut(TOKENS * hx * d)
        .enumerate()
        .map(|(blk, chunk)| {
            let mut row = vec![0.0f32; d];
            let (mut z, mut p, mut m, mut dz) = (
                vec![0.0f32; fh],
                vec![0.0f32; fh],
                vec![0.0f32; fh],
                vec![0.0f32; fh],
            );
            let mut local = want_dw.then(|| vec![0.0f32; hh.map_or(0, |w| w.w.len())]);
            for (r, o) in chunk.chunks_exact_mut(d).enumerate() {
                let n = blk * TOKENS * hx + r;
                let (ib, it, ih) = (n / (t * hx), n / hx % t, n % hx);
                for (i, v) in row.iter_mut().enumerate() {
                    *v = x.get(ib, it, ih, i);
                }
                let g = &dphi[n * f..][..f];
                match map {
                    FeatureMap::Identity => o.copy_from_slice(g),
                    FeatureMap::Elu => {
                        for ((y, &x), &gi) in o.iter_mut().zip(&row).zip(g) {
                            *y = if x > 0.0 { gi } else { gi * x.exp() };
                        }
                    }
                    FeatureMap::Taylor => {
                        // d/dx_i of sum_jk G_jk x_j x_k c2 = c2 sum_k (G_ik + G_ki) x_k
                        let (c1, c2) = taylor_coefs(d);
                        for i in 0..d {
                            let mut acc = g[1 + i] * c1;
                            for k in 0..d {
                                acc += c2 * (g[1 + d + i * d + k] + g[1 + d + k * d + i]) * row[k];
                            }
                            o[i] = acc;
                        }
                    }
                    FeatureMap::Hedgehog => {
                        let Some(w) = hh else { continue };
                        let head = ih / group;
                        hedgehog_logits(w, head, &row, &mut z);
                        softmax(&z, 1.0, &mut p);
                        softmax(&z, -1.0, &mut m);
                        // phi = [p, m], p = softmax(z), m = softmax(-z):
                        // dz = p ⊙ (dp - p.dp) - m ⊙ (dm - m.dm)
                        let (gp, gm) = g.split_at(fh);
                        let pd: f32 = p.iter().zip(gp).map(|(a, b)| a * b).sum();
                        let md: f32 = m.iter().zip(gm).map(|(a, b)| a * b).sum();
                        for j in 0..fh {
                            dz[j] = p[j] * (gp[j] - pd) - m[j] * (gm[j] - md);
                        }
                        let wh = &w.w[head * d * fh..][..d * fh];
                        for i in 0..d {
                            o[i] = wh[i * fh..][..fh].iter().zip(&dz).map(|(a, b)| a * b).sum();
                        }
                        if let Some(dwl) = local.as_deref_mut() {
                            let dwh = &mut dwl[head * d * fh..][..d * fh];
                            for i in 0..d {
                                for j in 0..fh {
                                    dwh[i * fh + j] += row[i] * dz[j];
                                }
                            }
                        }
                    }
                }
            }
            local
        })
        .collect();
    if let Some(dw) = dw {
        for part in partial.into_iter().flatten() {
            for (a, b) in dw.iter_mut().zip(part) {
                *a += b;
            }
        }
    }
    Ok(dx)
}

/// Denominator normalisation of rows `o [n, V + 1]` -> `[n, V]`: `o[..V] / o[V]`.
pub fn normalize(o: &[f32], vd: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; o.len() / (vd + 1) * vd];
    out.par_chunks_mut(vd)
        .zip(o.par_chunks(vd + 1))
        .for_each(|(y, row)| {
            let den = row[vd];
            for (a, x) in y.iter_mut().zip(row) {
                *a = x / den;
            }
        });
    out
}

/// Backward of [`normalize`]: with `y = n / den`, `dn = dy / den`, `dden = -(dy . y) / den`.
pub fn normalize_backward(o: &[f32], vd: usize, dy: &[f32]) -> Vec<f32> {
    let mut d = vec![0.0f32; o.len()];
    d.par_chunks_mut(vd + 1)
        .zip(o.par_chunks(vd + 1).zip(dy.par_chunks(vd)))
        .for_each(|(dr, (row, g))| {
            let den = row[vd];
            let mut dot = 0.0f32;
            for j in 0..vd {
                dr[j] = g[j] / den;
                dot += g[j] * row[j] / den;
            }
            dr[vd] = -dot / den;
        });
    d
}

/// RMS normalisation of rows `o [n, V]` (see the module header).
pub fn rms(o: &[f32], vd: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; o.len()];
    out.par_chunks_mut(vd)
        .zip(o.par_chunks(vd))
        .for_each(|(y, row)| {
            let r = rms_factor(row);
            for (a, x) in y.iter_mut().zip(row) {
                *a = x * r;
            }
        });
    out
}

fn rms_factor(row: &[f32]) -> f32 {
    let ms = row.iter().map(|&x| x as f64 * x as f64).sum::<f64>() / row.len() as f64;
    (1.0 / (ms + RMS_EPS as f64).sqrt()) as f32
}

/// Backward of [`rms`]: with `y = o r`, `r = (mean(o^2) + eps)^{-1/2}`:
/// `do = r (dy - y (dy . y) / V)`.
pub fn rms_backward(o: &[f32], vd: usize, dy: &[f32]) -> Vec<f32> {
    let mut d = vec![0.0f32; o.len()];
    d.par_chunks_mut(vd)
        .zip(o.par_chunks(vd).zip(dy.par_chunks(vd)))
        .for_each(|(dr, (row, g))| {
            let r = rms_factor(row);
            let dot: f32 = row.iter().zip(g).map(|(x, gy)| x * r * gy).sum();
            for j in 0..vd {
                dr[j] = r * (g[j] - row[j] * r * dot / vd as f32);
            }
        });
    d
}
