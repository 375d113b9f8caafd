//! The plain reference path: straight loops in f32, the same math as the SIMD paths.
use super::{update_max, Logits, Micro, LAZY_SUM, LDP, LDS, MAXW, NC};

pub struct Scalar;

impl Micro for Scalar {
    type P = f32;
    const PAIRS: bool = false;
    const GROUP: usize = 1;
    const DIM_ALIGN: usize = 1;
    const DV_ALIGN: usize = 1;
    const NAME: &'static str = "scalar";

    fn qk(&self, q: &[f32], rows: usize, dq: usize, kt: &[f32], s: &mut [f32], lds: usize) {
        for r in 0..rows {
            let srow = &mut s[r * lds..r * lds + NC];
            srow.fill(0.0);
            for (d, &qd) in q[r * dq..(r + 1) * dq].iter().enumerate() {
                for (sc, &kc) in srow.iter_mut().zip(&kt[d * NC..(d + 1) * NC]) {
                    *sc += qd * kc;
                }
            }
        }
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
        p: &mut [f32],
    ) {
        softmax_rows(s, rows, w, mask, logits, m, l, alpha, |r, c, x| {
            p[r * LDP + c] = x
        });
    }

    fn pv(&self, p: &[f32], rows: usize, vt: &[&[f32]], dv: usize, alpha: &[f32], o: &mut [f32]) {
        for r in 0..rows {
            let orow = &mut o[r * dv..(r + 1) * dv];
            orow.iter_mut().for_each(|x| *x *= alpha[r]);
            for (g, v) in vt.iter().enumerate() {
                for c in 0..NC {
                    let pc = p[r * LDP + g * NC + c];
                    for (ox, &vx) in orow.iter_mut().zip(&v[c * dv..(c + 1) * dv]) {
                        *ox += pc * vx;
                    }
                }
            }
        }
    }
}

/// The scalar online-softmax step (the model for the SIMD ones): rows of `w * NC` logits
/// ([`LDS`] apart), writes p through `store(r, c, p_rc)` for every column of every row.
#[allow(clippy::too_many_arguments)]
pub fn softmax_rows(
    s: &[f32],
    rows: usize,
    w: usize,
    mask: &[u64],
    logits: &Logits,
    m: &mut [f32],
    l: &mut [f32],
    alpha: &mut [f32],
    mut store: impl FnMut(usize, usize, f32),
) {
    let width = w * NC;
    let mut x = vec![0.0f32; width];
    for r in 0..rows {
        let mut mx = f32::NEG_INFINITY;
        for (c, xc) in x.iter_mut().enumerate() {
            let bit = mask[r * MAXW + c / NC] >> (c % NC) & 1;
            *xc = if bit == 1 {
                logits.base2(s[r * LDS + c])
            } else {
                f32::NEG_INFINITY
            };
            mx = mx.max(*xc);
        }
        // One pass against the running max m when the row has one: kept when sum p <= LAZY_SUM.
        if m[r] > f32::NEG_INFINITY {
            let p = |xc: f32| {
                if xc == f32::NEG_INFINITY {
                    0.0
                } else {
                    (xc - m[r]).exp2()
                }
            };
            let sum: f32 = x.iter().map(|&xc| p(xc)).sum();
            if sum <= LAZY_SUM {
                for (c, &xc) in x.iter().enumerate() {
                    store(r, c, p(xc));
                }
                alpha[r] = 1.0;
                l[r] += sum;
                continue;
            }
        }
        // NaN logits (NaN/Inf inputs) poison the row instead of being dropped by `max`.
        if x.iter().any(|v| v.is_nan()) {
            mx = f32::NAN;
        }
        let (m_new, a) = update_max(m[r], mx);
        alpha[r] = a;
        if m_new == f32::NEG_INFINITY {
            (0..width).for_each(|c| store(r, c, 0.0));
            continue;
        }
        let mut sum = 0.0;
        for (c, &xc) in x.iter().enumerate() {
            let pc = if xc == f32::NEG_INFINITY {
                0.0
            } else {
                (xc - m_new).exp2()
            };
            sum += pc;
            store(r, c, pc);
        }
        l[r] = l[r] * a + sum;
        m[r] = m_new;
    }
}
