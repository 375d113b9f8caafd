//! The f64 oracle of the core recurrence, step by step (no chunking), forward and backward.
//!
//! Forward, per sequence and query head (kv head `hk = h / (H / Hk)`):
//!   `S_t = diag(a_t) S_{t-1} + k_t^T v_t`, `o_t = scale * q_t S_t`, `a_t = exp(g_t)`.
//! Backward (back-propagation through the steps, `G_t` the gradient reaching `S_t`):
//!   `G_T = dS_final + scale * q_T^T do_T`, `G_{t-1} = diag(a_t) G_t + scale * q_{t-1}^T do_{t-1}`,
//!   `dq_t = scale * do_t S_t^T`, `dk_t = v_t G_t^T` (summed over the query heads of a kv head),
//!   `dv_t = k_t G_t`, `dg_t[i] = a_t[i] * sum_j G_t[i, j] S_{t-1}[i, j]` (summed over i for a
//!   scalar gate), `dS_0 = diag(a_1) G_1`.
use super::{Core, CoreDims, Decay};
use crate::error::Result;

/// Oracle forward: `out [B, T, H, V]` and the final state `[seqs, H, K, V]`, in f64.
#[derive(Clone, Debug)]
pub struct RefLinear {
    pub out: Vec<f64>,
    pub state: Vec<f64>,
    pub dims: CoreDims,
}

/// Oracle gradients in f64, shaped like their inputs (`dg` like the decay it differentiates;
/// `None` for [`Decay::None`] and [`Decay::PerHead`], whose decay is a constant).
#[derive(Clone, Debug)]
pub struct RefLinearGrads {
    pub dq: Vec<f64>,
    pub dk: Vec<f64>,
    pub dv: Vec<f64>,
    pub dg: Option<Vec<f64>>,
    pub d_initial_state: Vec<f64>,
}

/// Runs the recurrence of one (sequence, head); `visit(t, S_{t-1}, S_t)` sees every step.
fn run_head(
    c: &Core,
    d: &CoreDims,
    (b, t0, t1, n): (usize, usize, usize, usize),
    h: usize,
    mut visit: impl FnMut(usize, &[f64], &[f64]),
) -> Vec<f64> {
    let (kd, vd) = (d.k, d.v);
    let hk = h / (d.h / d.hk);
    let mut s = vec![0.0f64; kd * vd];
    if let Some(s0) = c.initial_state {
        let base = (n * d.h + h) * kd * vd;
        for (x, y) in s.iter_mut().zip(&s0[base..base + kd * vd]) {
            *x = *y as f64;
        }
    }
    let mut prev = s.clone();
    for t in t0..t1 {
        prev.copy_from_slice(&s);
        for i in 0..kd {
            let a = (c.log_decay(d, b, t, h, i) as f64).exp();
            let ki = c.k.get(b, t, hk, i) as f64;
            for j in 0..vd {
                s[i * vd + j] = a * s[i * vd + j] + ki * c.v.get(b, t, hk, j) as f64;
            }
        }
        visit(t, &prev, &s);
    }
    s
}

/// The forward oracle.
pub fn forward_f64(c: &Core) -> Result<RefLinear> {
    let d = c.validate("linear::reference::forward_f64")?;
    let (kd, vd) = (d.k, d.v);
    let scale = c.scale as f64;
    let mut out = vec![0.0f64; d.batch * d.t * d.h * vd];
    let mut state = vec![0.0f64; d.state_len()];
    for seq in d.sequences(c.cu_seqlens) {
        let (b, _, _, n) = seq;
        for h in 0..d.h {
            let fin = run_head(c, &d, seq, h, |t, _, s| {
                let o = &mut out[((b * d.t + t) * d.h + h) * vd..][..vd];
                for i in 0..kd {
                    let qi = scale * c.q.get(b, t, h, i) as f64;
                    for j in 0..vd {
                        o[j] += qi * s[i * vd + j];
                    }
                }
            });
            state[(n * d.h + h) * kd * vd..][..kd * vd].copy_from_slice(&fin);
        }
    }
    Ok(RefLinear {
        out,
        state,
        dims: d,
    })
}

/// The backward oracle: `dout [B, T, H, V]` (f64) and optionally the gradient of the final state
/// `[seqs, H, K, V]`.
pub fn backward_f64(c: &Core, dout: &[f64], d_state: Option<&[f64]>) -> Result<RefLinearGrads> {
    let d = c.validate("linear::reference::backward_f64")?;
    let (kd, vd) = (d.k, d.v);
    let scale = c.scale as f64;
    assert_eq!(dout.len(), d.batch * d.t * d.h * vd, "dout length");
    let mut dq = vec![0.0f64; d.batch * d.t * d.h * kd];
    let mut dk = vec![0.0f64; d.batch * d.t * d.hk * kd];
    let mut dv = vec![0.0f64; d.batch * d.t * d.hk * vd];
    let mut dg = match c.decay {
        Decay::Token(g) | Decay::Gate(g) => Some(vec![0.0f64; g.len()]),
        _ => None,
    };
    let mut d0 = vec![0.0f64; d.state_len()];
    for seq in d.sequences(c.cu_seqlens) {
        let (b, t0, t1, n) = seq;
        for h in 0..d.h {
            let hk = h / (d.h / d.hk);
            // Keep every state S_{t0-1} .. S_{t1-1} (the oracle favours clarity over memory).
            let mut states: Vec<Vec<f64>> = Vec::with_capacity(t1 - t0 + 1);
            run_head(c, &d, seq, h, |t, prev, s| {
                if t == t0 {
                    states.push(prev.to_vec());
                }
                states.push(s.to_vec());
            });
            let mut g = vec![0.0f64; kd * vd];
            if let Some(ds) = d_state {
                let base = (n * d.h + h) * kd * vd;
                g.copy_from_slice(&ds[base..base + kd * vd]);
            }
            for t in (t0..t1).rev() {
                let s_t = &states[t - t0 + 1];
                let s_prev = &states[t - t0];
                let o = &dout[((b * d.t + t) * d.h + h) * vd..][..vd];
                // G_t += scale * q_t^T do_t
                for i in 0..kd {
                    let qi = scale * c.q.get(b, t, h, i) as f64;
                    for j in 0..vd {
                        g[i * vd + j] += qi * o[j];
                    }
                }
                for i in 0..kd {
                    let mut acc_q = 0.0;
                    let mut acc_k = 0.0;
                    let mut acc_g = 0.0;
                    for j in 0..vd {
                        acc_q += o[j] * s_t[i * vd + j];
                        acc_k += c.v.get(b, t, hk, j) as f64 * g[i * vd + j];
                        acc_g += g[i * vd + j] * s_prev[i * vd + j];
                    }
                    dq[((b * d.t + t) * d.h + h) * kd + i] += scale * acc_q;
                    dk[((b * d.t + t) * d.hk + hk) * kd + i] += acc_k;
                    let a = (c.log_decay(&d, b, t, h, i) as f64).exp();
                    match (&mut dg, c.decay) {
                        (Some(dg), Decay::Token(_)) => dg[(b * d.t + t) * d.h + h] += a * acc_g,
                        (Some(dg), Decay::Gate(_)) => {
                            dg[((b * d.t + t) * d.h + h) * kd + i] += a * acc_g
                        }
                        _ => {}
                    }
                }
                for j in 0..vd {
                    let mut acc = 0.0;
                    for i in 0..kd {
                        acc += c.k.get(b, t, hk, i) as f64 * g[i * vd + j];
                    }
                    dv[((b * d.t + t) * d.hk + hk) * vd + j] += acc;
                }
                // G_{t-1} = diag(a_t) G_t (the q term of step t-1 is added on the next pass)
                for i in 0..kd {
                    let a = (c.log_decay(&d, b, t, h, i) as f64).exp();
                    for j in 0..vd {
                        g[i * vd + j] *= a;
                    }
                }
            }
            d0[(n * d.h + h) * kd * vd..][..kd * vd].copy_from_slice(&g);
        }
    }
    Ok(RefLinearGrads {
        dq,
        dk,
        dv,
        dg,
        d_initial_state: d0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::TensorView;
    use crate::testing::Rng;

    /// The BPTT backward against central finite differences of the forward, for every decay kind,
    /// GQA, an initial state, a final-state gradient and varlen boundaries.
    #[test]
    fn backward_matches_finite_differences() {
        let (t, h, hk, kd, vd) = (7usize, 4usize, 2usize, 3usize, 2usize);
        let mut rng = Rng::new(11);
        let mut nv = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.normal() as f32).collect() };
        let q = nv(t * h * kd);
        let k = nv(t * hk * kd);
        let v = nv(t * hk * vd);
        let mut rng = Rng::new(12);
        let per_head: Vec<f32> = (0..h).map(|i| -0.1 - 0.2 * i as f32).collect();
        let token: Vec<f32> = (0..t * h)
            .map(|_| -0.05 - (rng.uniform() as f32) * 0.8)
            .collect();
        let gate: Vec<f32> = (0..t * h * kd)
            .map(|_| -0.05 - (rng.uniform() as f32) * 0.8)
            .collect();
        let cu = [0i32, 3, 3, 7];
        let s0 = nv(3 * h * kd * vd);
        let dout = nv(t * h * vd);
        let dfin = nv(3 * h * kd * vd);
        let dout64: Vec<f64> = dout.iter().map(|&x| x as f64).collect();
        let dfin64: Vec<f64> = dfin.iter().map(|&x| x as f64).collect();
        for (name, decay) in [
            ("none", Decay::None),
            ("per_head", Decay::PerHead(&per_head)),
            ("token", Decay::Token(&token)),
            ("gate", Decay::Gate(&gate)),
        ] {
            // loss = <dout, out> + <dfin, final state>
            let loss = |q: &[f32], k: &[f32], v: &[f32], g: Option<&[f32]>, s0: &[f32]| {
                let decay = match (decay, g) {
                    (Decay::Token(_), Some(g)) => Decay::Token(g),
                    (Decay::Gate(_), Some(g)) => Decay::Gate(g),
                    (d, _) => d,
                };
                let c = Core {
                    q: TensorView::contiguous(q, [1, t, h, kd]).unwrap(),
                    k: TensorView::contiguous(k, [1, t, hk, kd]).unwrap(),
                    v: TensorView::contiguous(v, [1, t, hk, vd]).unwrap(),
                    decay,
                    scale: 0.7,
                    initial_state: Some(s0),
                    cu_seqlens: Some(&cu),
                };
                let r = forward_f64(&c).unwrap();
                let a: f64 = r.out.iter().zip(&dout64).map(|(x, y)| x * y).sum();
                a + r.state.iter().zip(&dfin64).map(|(x, y)| x * y).sum::<f64>()
            };
            let g0: Option<Vec<f32>> = match decay {
                Decay::Token(g) | Decay::Gate(g) => Some(g.to_vec()),
                _ => None,
            };
            let c = Core {
                q: TensorView::contiguous(&q[..], [1, t, h, kd]).unwrap(),
                k: TensorView::contiguous(&k[..], [1, t, hk, kd]).unwrap(),
                v: TensorView::contiguous(&v[..], [1, t, hk, vd]).unwrap(),
                decay,
                scale: 0.7,
                initial_state: Some(&s0),
                cu_seqlens: Some(&cu),
            };
            let gr = backward_f64(&c, &dout64, Some(&dfin64)).unwrap();
            let eps = 1e-2f32;
            let check = |label: &str, x: &[f32], grad: &[f64], which: usize| {
                for i in 0..x.len() {
                    let mut xp = x.to_vec();
                    let mut xm = x.to_vec();
                    xp[i] += eps;
                    xm[i] -= eps;
                    let args = |z: &[f32]| -> f64 {
                        let mut a = [q.clone(), k.clone(), v.clone(), s0.clone()];
                        let mut g = g0.clone();
                        match which {
                            0..=3 => a[which] = z.to_vec(),
                            _ => g = Some(z.to_vec()),
                        }
                        loss(&a[0], &a[1], &a[2], g.as_deref(), &a[3])
                    };
                    let fd = (args(&xp) - args(&xm)) / (2.0 * eps as f64);
                    assert!(
                        (fd - grad[i]).abs() <= 2e-3 * (1.0 + fd.abs()),
                        "{name}: d{label}[{i}] = {} but finite differences give {fd}",
                        grad[i]
                    );
                }
            };
            check("q", &q, &gr.dq, 0);
            check("k", &k, &gr.dk, 1);
            check("v", &v, &gr.dv, 2);
            check("s0", &s0, &gr.d_initial_state, 3);
            if let Some(g) = &g0 {
                check("g", g, gr.dg.as_ref().unwrap(), 4);
            }
        }
    }
}
