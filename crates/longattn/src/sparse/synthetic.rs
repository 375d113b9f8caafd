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
use crate::tensor::{Buffer, DType, Tensor};
use crate::testing::Rng;
use rayon::prelude::*;

const OFFSETS: [usize; 6] = [0, 1, 2, 3, 64, 1000];
const A: f64 = 0.6;
const C: f64 = 0.55;

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
    let q = fill(sq, &|h| h / group, hq, false, seed ^ 0x1111);
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
