//! The f64 oracle: plain, obviously correct masked attention.
//!
//! For every (b, h, i): s_j = softcap(scale * q_i . k_j) for allowed j, LSE = log sum_j exp(s_j),
//! out = sum_j exp(s_j - LSE) v_j. A row with no allowed key has out = 0 and LSE = -inf.
//! Query head h reads key/value head h / (Hq / Hk) (GQA/MQA).
mod backward;
pub use backward::{attention_backward_f64, attention_backward_f64_rows, RefGrads};

use crate::attention::{validate, AttnParams};
use crate::error::Result;
use crate::tensor::TensorView;

/// Oracle output in f64: `out` is `[B, Sq, Hq, Dv]`, `lse` is `[B, Hq, Sq]`.
#[derive(Clone, Debug)]
pub struct RefOutput {
    pub out: Vec<f64>,
    pub lse: Vec<f64>,
    pub shape: [usize; 4],
}

/// The logits of row (b, h, i): s_j = softcap(scale q_i . k_j) for allowed j, -inf elsewhere
/// (into `s`, length Sk); returns their maximum (-inf for an empty row).
#[allow(clippy::too_many_arguments)]
fn row_logits(
    q: &TensorView,
    k: &TensorView,
    params: &AttnParams,
    allowed: &dyn Fn(usize, usize, usize, usize) -> bool,
    (b, h, hk, i): (usize, usize, usize, usize),
    scale: f64,
    d: usize,
    s: &mut [f64],
) -> f64 {
    let mut m = f64::NEG_INFINITY;
    for (j, sj) in s.iter_mut().enumerate() {
        *sj = f64::NEG_INFINITY;
        if !allowed(b, h, i, j) {
            continue;
        }
        let mut dot = 0.0f64;
        for x in 0..d {
            dot += q.get(b, i, h, x) as f64 * k.get(b, j, hk, x) as f64;
        }
        let mut logit = scale * dot;
        if let Some(c) = params.softcap {
            let c = c as f64;
            logit = c * (logit / c).tanh();
        }
        *sj = logit;
        m = m.max(logit);
    }
    m
}

/// The block-pooled probabilities of [`crate::AttnMap`] straight from the definition (f64,
/// every pair): `(mass, max)`, each `[B, Hq, ceil(Sq / block), ceil(Sk / block)]`.
pub fn attention_map_f64(
    q: &TensorView,
    k: &TensorView,
    v: &TensorView,
    params: &AttnParams,
    allowed: &dyn Fn(usize, usize, usize, usize) -> bool,
    block: usize,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let dims = validate("reference::attention_map_f64", q, k, v)?;
    let scale = params.scale_for(dims.d) as f64;
    let (b_n, sq, sk, hq) = (dims.batch, dims.sq, dims.sk, dims.hq);
    let group = dims.hq / dims.hk;
    let (nq, nk) = (sq.div_ceil(block), sk.div_ceil(block));
    let mut mass = vec![0.0f64; b_n * hq * nq * nk];
    let mut max = vec![0.0f64; b_n * hq * nq * nk];
    let mut s = vec![0.0f64; sk];
    for b in 0..b_n {
        for h in 0..hq {
            for i in 0..sq {
                let m = row_logits(
                    q,
                    k,
                    params,
                    allowed,
                    (b, h, h / group, i),
                    scale,
                    dims.d,
                    &mut s,
                );
                if m == f64::NEG_INFINITY {
                    continue;
                }
                let lse = m + s.iter().map(|&x| (x - m).exp()).sum::<f64>().ln();
                let rows = block.min(sq - i / block * block) as f64;
                let base = ((b * hq + h) * nq + i / block) * nk;
                for (j, &sj) in s.iter().enumerate() {
                    let p = (sj - lse).exp();
                    mass[base + j / block] += p / rows;
                    max[base + j / block] = max[base + j / block].max(p);
                }
            }
        }
    }
    Ok((mass, max))
}

/// `allowed(b, h, i, j)` decides each pair; pass `|_, _, _, _| true` for full attention.
pub fn attention_f64(
    q: &TensorView,
    k: &TensorView,
    v: &TensorView,
    params: &AttnParams,
    allowed: &dyn Fn(usize, usize, usize, usize) -> bool,
) -> Result<RefOutput> {
    let dims = validate("reference::attention_f64", q, k, v)?;
    let scale = params.scale_for(dims.d) as f64;
    let (b_n, sq, sk, hq, d, dv) = (dims.batch, dims.sq, dims.sk, dims.hq, dims.d, dims.dv);
    let group = dims.hq / dims.hk;
    let mut out = vec![0.0f64; b_n * sq * hq * dv];
    let mut lse = vec![f64::NEG_INFINITY; b_n * hq * sq];
    let mut s = vec![0.0f64; sk];
    for b in 0..b_n {
        for h in 0..hq {
            let hk = h / group;
            for i in 0..sq {
                let m = row_logits(q, k, params, allowed, (b, h, hk, i), scale, d, &mut s);
                if m == f64::NEG_INFINITY {
                    continue; // fully masked row: out stays 0, LSE stays -inf
                }
                let sum: f64 = s.iter().map(|&x| (x - m).exp()).sum();
                let l = m + sum.ln();
                lse[(b * hq + h) * sq + i] = l;
                let o = &mut out[((b * sq + i) * hq + h) * dv..][..dv];
                for (j, &sj) in s.iter().enumerate() {
                    if sj == f64::NEG_INFINITY {
                        continue;
                    }
                    let p = (sj - l).exp();
                    for (x, ox) in o.iter_mut().enumerate() {
                        *ox += p * v.get(b, j, hk, x) as f64;
                    }
                }
            }
        }
    }
    Ok(RefOutput {
        out,
        lse,
        shape: [b_n, sq, hq, dv],
    })
}
