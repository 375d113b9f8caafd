//! The f64 gradient oracle: the analytic backward of [`attention_f64`](super::attention_f64).
//!
//! Per (b, h, i), with u_j = scale q_i . k_j, s_j = softcap(u_j) = c tanh(u_j / c) (or u_j),
//! for allowed j only:
//!   p_j = exp(s_j - LSE_i),  o_i = sum_j p_j v_j                       (the forward)
//!   dV_j += p_j dO_i                                                    (summed over i and over
//!                                                                        the query heads of a group)
//!   dP_j = dO_i . v_j,  Delta_i = sum_j p_j dP_j  (= dO_i . o_i)
//!   dS_j = p_j (dP_j - Delta_i)                                         (softmax backward)
//!   dU_j = dS_j (1 - tanh^2(u_j / c))                                   (soft-cap; dU = dS without)
//!   dQ_i += scale dU_j k_j,  dK_j += scale dU_j q_i.
//! A row with no allowed key contributes nothing (its gradient is 0).
use crate::attention::{validate, AttnParams};
use crate::error::{Error, Result};
use crate::tensor::TensorView;

/// Oracle gradients in f64, contiguous: `dq` `[B, Sq, Hq, D]`, `dk` `[B, Sk, Hk, D]`,
/// `dv` `[B, Sk, Hk, Dv]`.
#[derive(Clone, Debug)]
pub struct RefGrads {
    pub dq: Vec<f64>,
    pub dk: Vec<f64>,
    pub dv: Vec<f64>,
}

/// Gradients of `sum(out * dout)` with respect to q, k and v; `dout` is `[B, Sq, Hq, Dv]`.
/// `allowed(b, h, i, j)` decides each pair, as in [`attention_f64`](super::attention_f64).
pub fn attention_backward_f64(
    q: &TensorView,
    k: &TensorView,
    v: &TensorView,
    dout: &TensorView,
    params: &AttnParams,
    allowed: &dyn Fn(usize, usize, usize, usize) -> bool,
) -> Result<RefGrads> {
    attention_backward_f64_rows(q, k, v, dout, params, allowed, &|_, _, _| true)
}

/// [`attention_backward_f64`] restricted to the query rows `(b, h, i)` that `rows` selects: their
/// dQ is exact; dK and dV hold only those rows' contributions. Spot checks of long sequences
/// cost (selected rows) x Sk instead of B Hq Sq Sk.
pub fn attention_backward_f64_rows(
    q: &TensorView,
    k: &TensorView,
    v: &TensorView,
    dout: &TensorView,
    params: &AttnParams,
    allowed: &dyn Fn(usize, usize, usize, usize) -> bool,
    rows: &dyn Fn(usize, usize, usize) -> bool,
) -> Result<RefGrads> {
    let dims = validate("reference::attention_backward_f64", q, k, v)?;
    let (bn, sq, sk, hq, hk, d, dv) = (
        dims.batch, dims.sq, dims.sk, dims.hq, dims.hk, dims.d, dims.dv,
    );
    if dout.shape != [bn, sq, hq, dv] {
        return Err(Error::Shape {
            op: "reference::attention_backward_f64",
            tensor: "do".into(),
            got: dout.shape.to_vec(),
            expected: format!("{:?} (the shape of out)", [bn, sq, hq, dv]),
        });
    }
    let scale = params.scale_for(d) as f64;
    let cap = params.softcap.map(|c| c as f64);
    let group = hq / hk;
    let mut dq = vec![0.0f64; bn * sq * hq * d];
    let mut dk = vec![0.0f64; bn * sk * hk * d];
    let mut dvv = vec![0.0f64; bn * sk * hk * dv];
    // Per row: (j, u_j, s_j) of the allowed keys.
    let mut row: Vec<(usize, f64, f64)> = Vec::with_capacity(sk);
    for b in 0..bn {
        for h in 0..hq {
            let g = h / group;
            for i in 0..sq {
                if !rows(b, h, i) {
                    continue;
                }
                row.clear();
                for j in 0..sk {
                    if !allowed(b, h, i, j) {
                        continue;
                    }
                    let dot: f64 = (0..d)
                        .map(|x| q.get(b, i, h, x) as f64 * k.get(b, j, g, x) as f64)
                        .sum();
                    let u = scale * dot;
                    let s = match cap {
                        Some(c) => c * (u / c).tanh(),
                        None => u,
                    };
                    row.push((j, u, s));
                }
                if row.is_empty() {
                    continue; // fully masked row: no gradient
                }
                let m = row.iter().fold(f64::NEG_INFINITY, |a, r| a.max(r.2));
                let lse = m + row.iter().map(|r| (r.2 - m).exp()).sum::<f64>().ln();
                let dorow: Vec<f64> = (0..dv).map(|x| dout.get(b, i, h, x) as f64).collect();
                // p_j and dP_j, then Delta = sum p dP.
                let pd: Vec<(f64, f64)> = row
                    .iter()
                    .map(|&(j, _, s)| {
                        let dp: f64 = (0..dv).map(|x| dorow[x] * v.get(b, j, g, x) as f64).sum();
                        ((s - lse).exp(), dp)
                    })
                    .collect();
                let delta: f64 = pd.iter().map(|&(p, dp)| p * dp).sum();
                for (&(j, u, _), &(p, dp)) in row.iter().zip(&pd) {
                    for (x, &o) in dorow.iter().enumerate() {
                        dvv[((b * sk + j) * hk + g) * dv + x] += p * o;
                    }
                    let mut du = p * (dp - delta);
                    if let Some(c) = cap {
                        let t = (u / c).tanh();
                        du *= 1.0 - t * t;
                    }
                    let w = scale * du;
                    for x in 0..d {
                        dq[((b * sq + i) * hq + h) * d + x] += w * k.get(b, j, g, x) as f64;
                        dk[((b * sk + j) * hk + g) * d + x] += w * q.get(b, i, h, x) as f64;
                    }
                }
            }
        }
    }
    Ok(RefGrads { dq, dk, dv: dvv })
}
