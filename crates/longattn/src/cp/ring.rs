//! Ring attention: the keys and values travel around the ranks, the queries stay.
//!
//! Rank r holds the chunks the [`Plan`] gives it (queries, keys and values of the same rows).
//! At step s = 0 .. P-1 it holds the keys and values of rank (r - s) mod P and, for each of its
//! query chunks a and each held key chunk b that a needs (some scheduled tile of the mask meets
//! a x b: [`blocks`]), runs the common attention forward on the block with the block's cut of the
//! mask ([`CpMask::rect`]); key chunks its queries do not need are skipped but still passed on.
//! It then sends what it holds to rank r + 1 and receives from rank r - 1. The partial results of
//! a query chunk are merged in f32 as they come (per row and head, [`merge_rows`]):
//!   lse = log(exp(lse_1) + exp(lse_2)),   out = exp(lse_1 - lse) out_1 + exp(lse_2 - lse) out_2.
//! Backward ([`ring_backward`]): the same walk; each block's gradients come from the common
//! `backward` given the query chunk's final out and LSE (so P = exp(S - LSE) is the block of the
//! whole softmax and D = rowsum(dO o O) is the whole row's):
//!   dQ_a += dS_ab K_b,   dK_b += dS_ab^T Q_a,   dV_b += P_ab^T dO_a.
//! dK / dV accumulators travel with the keys and values and go home after the last step.
//! Zigzag ([`zigzag_causal_forward`], [`zigzag_causal_backward`]) is the causal case with 2P
//! equal chunks, rank r holding chunks r and 2P - 1 - r (what [`plan`](super::plan::plan) picks
//! for a causal mask). Single-rank `forward` / `backward` are the reference (tests here and in
//! `cp/tests.rs`).
use super::block::{
    blocks, copy_rows, from_bytes, merge_rows, same_heads, to_bytes, CpMask, LocalQkv, Rows, Run,
};
use super::plan::{even_bounds, Plan};
use super::transport::Transport;
use crate::attention::{forward, AttnParams};
use crate::backward::{backward, BackwardParams};
use crate::error::{Error, Result};
use crate::mask::{MaskExpr, MaskShape};

/// Attention of this rank's query chunks over the whole sequence under `mask`, keys and values
/// passed around the ring; returns `(out [B, rows, Hq, Dv], lse [B, Hq, rows])` in the local row
/// order.
pub fn ring_forward(
    t: &dyn Transport,
    plan: &Plan,
    mask: &CpMask,
    x: &LocalQkv,
    params: &AttnParams,
) -> Result<(Vec<f32>, Vec<f32>)> {
    x.agree(t, "ring", plan, mask)?;
    let (p, r) = (t.world(), t.rank());
    let (ql, ol) = (x.q_rows(), x.o_rows());
    let mut out = vec![0f32; ol.values()];
    let mut lse = vec![f32::NEG_INFINITY; x.lse_rows().values()];
    // The key / value chunks held at this step (those of one rank), as sent.
    let (mut k_held, mut v_held) = (x.k.to_vec(), x.v.to_vec());
    for step in 0..p {
        let held = (r + p - step) % p;
        let (kl, vl) = held_rows(x, plan, held);
        for (a, qa, b, kb) in blocks(plan, r, held) {
            let Some(rect) = mask.rect(plan.range(a), plan.range(b))? else {
                continue;
            };
            let (la, lb) = (plan.len(a), plan.len(b));
            let part = forward(
                &ql.view(x.q, qa, la)?,
                &kl.view(&k_held, kb, lb)?,
                &vl.view(&v_held, kb, lb)?,
                params,
                rect.spec(),
            )?;
            let o2 = part.out.data.to_f32_vec();
            merge_rows((&mut out, &mut lse), (&o2, &part.lse), ol, qa, la);
        }
        if step + 1 < p {
            // Pass the held chunks on: to r + 1, from r - 1 (sends do not wait); what comes
            // next is rank (held - 1)'s.
            let (kn, vn) = held_rows(x, plan, (held + p - 1) % p);
            pass_on(
                t,
                2 * step as u32,
                &mut [(&mut k_held, kn.values()), (&mut v_held, vn.values())],
            )?;
        }
    }
    Ok((out, lse))
}

/// The layouts of rank `held`'s keys and values.
fn held_rows(x: &LocalQkv, plan: &Plan, held: usize) -> (Rows, Rows) {
    let n = plan.rows_of(held);
    (x.k_rows().with_rows(n), x.v_rows().with_rows(n))
}

/// Sends each buffer to rank r + 1 (tags `tag0..`) and replaces it by the one received from rank
/// r - 1, of the given length.
fn pass_on(t: &dyn Transport, tag0: u32, bufs: &mut [(&mut Vec<f32>, usize)]) -> Result<()> {
    let (p, r) = (t.world(), t.rank());
    let (to, from) = ((r + 1) % p, (r + p - 1) % p);
    for (i, (b, _)) in bufs.iter().enumerate() {
        t.send(to, tag0 + i as u32, &to_bytes(b))?;
    }
    for (i, (b, len)) in bufs.iter_mut().enumerate() {
        let mut raw = vec![0u8; *len * 4];
        t.recv(from, tag0 + i as u32, &mut raw)?;
        **b = from_bytes(&raw);
    }
    Ok(())
}

/// Checks `out`, `lse` and `dout` of a backward against this rank's inputs.
pub(crate) fn check_grad_inputs(
    scheme: &str,
    x: &LocalQkv,
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
) -> Result<()> {
    let (no, nl) = (x.o_rows().values(), x.lse_rows().values());
    if out.len() != no || dout.len() != no || lse.len() != nl {
        return Err(Error::Param {
            op: "context parallelism",
            msg: format!(
                "{scheme} backward: out / dout / lse hold {} / {} / {} values, expected {no} / {no} / {nl}",
                out.len(),
                dout.len(),
                lse.len()
            ),
        });
    }
    Ok(())
}

/// The LSE rows of a query chunk (local rows `r0 .. r0 + len`), contiguous `[B, Hq, len]` as
/// the backward takes them.
pub(crate) fn lse_chunk(x: &LocalQkv, lse: &[f32], r0: usize, len: usize) -> Vec<f32> {
    let ll = x.lse_rows();
    let mut y = vec![0f32; ll.with_rows(len).values()];
    let run = Run {
        src: r0,
        dst: 0,
        len,
    };
    copy_rows(
        (lse, ll),
        (&mut y, ll.with_rows(len)),
        &[run],
        &same_heads(ll.h),
        false,
    );
    y
}

/// Gradients of this rank's share of the attention (module header): `out [B, rows, Hq, Dv]`
/// and `lse [B, Hq, rows]` from [`ring_forward`], `dout` like `out`; returns `(dq, dk, dv)` in
/// the local row order (f32).
#[allow(clippy::too_many_arguments)]
pub fn ring_backward(
    t: &dyn Transport,
    plan: &Plan,
    mask: &CpMask,
    x: &LocalQkv,
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    params: &AttnParams,
    bwd: &BackwardParams,
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let checked = check_grad_inputs("ring", x, out, lse, dout);
    x.agree(t, "ring", plan, mask)?;
    checked?;
    let (p, r) = (t.world(), t.rank());
    let (ql, ol) = (x.q_rows(), x.o_rows());
    // Each call sees one block of keys of the rows' softmax (out and LSE are the whole row's).
    let blk = BackwardParams {
        partial_keys: true,
        ..*bwd
    };
    let mut dq = vec![0f32; ql.values()];
    let (mut k_held, mut v_held) = (x.k.to_vec(), x.v.to_vec());
    let (mut dk_held, mut dv_held) = (vec![0f32; x.k.len()], vec![0f32; x.v.len()]);
    for step in 0..p {
        let held = (r + p - step) % p;
        let (kl, vl) = held_rows(x, plan, held);
        for (a, qa, b, kb) in blocks(plan, r, held) {
            let Some(rect) = mask.rect(plan.range(a), plan.range(b))? else {
                continue;
            };
            let (la, lb) = (plan.len(a), plan.len(b));
            let gr = backward(
                &ql.view(x.q, qa, la)?,
                &kl.view(&k_held, kb, lb)?,
                &vl.view(&v_held, kb, lb)?,
                &ol.view(out, qa, la)?,
                &lse_chunk(x, lse, qa, la),
                &ol.view(dout, qa, la)?,
                params,
                rect.spec(),
                &blk,
            )?;
            let add = |y: &mut [f32], part: &[f32], yl: Rows, r0: usize, len: usize| {
                let run = Run {
                    src: 0,
                    dst: r0,
                    len,
                };
                copy_rows(
                    (part, yl.with_rows(len)),
                    (y, yl),
                    &[run],
                    &same_heads(yl.h),
                    true,
                );
            };
            add(&mut dq, &gr.dq.data.to_f32_vec(), ql, qa, la);
            add(&mut dk_held, &gr.dk.data.to_f32_vec(), kl, kb, lb);
            add(&mut dv_held, &gr.dv.data.to_f32_vec(), vl, kb, lb);
        }
        let (kn, vn) = held_rows(x, plan, (held + p - 1) % p);
        if step + 1 < p {
            pass_on(
                t,
                4 * step as u32,
                &mut [
                    (&mut k_held, kn.values()),
                    (&mut v_held, vn.values()),
                    (&mut dk_held, kn.values()),
                    (&mut dv_held, vn.values()),
                ],
            )?;
        } else if p > 1 {
            // The accumulators held now belong to rank r + 1; this rank's come from r - 1.
            pass_on(
                t,
                4 * p as u32,
                &mut [(&mut dk_held, kn.values()), (&mut dv_held, vn.values())],
            )?;
        }
    }
    Ok((dq, dk_held, dv_held))
}

/// The zigzag plan and causal mask of a rank holding `dims.1` = 2c rows (two chunks of c).
fn zigzag_setup(t: &dyn Transport, x: &LocalQkv) -> Result<(Plan, CpMask)> {
    let (b, s2, ..) = x.dims;
    let p = t.world();
    if !s2.is_multiple_of(2) || s2 == 0 {
        return Err(t.err(format!(
            "zigzag: a rank holds two chunks of equal length, got {s2} rows"
        )));
    }
    let n = p * s2;
    let mask = CpMask::new(
        MaskExpr::parse("causal")?.bind(
            MaskShape {
                batch: b,
                sq: n,
                sk: n,
            },
            None,
        )?,
        64,
    )?;
    let owner = (0..2 * p).map(|g| g.min(2 * p - 1 - g)).collect();
    let plan = Plan::new(&mask.sched, even_bounds(n, 2 * p), owner, p)?;
    Ok((plan, mask))
}

/// Causal attention of this rank's two zigzag chunks (rows 0..c chunk r, rows c..2c chunk
/// 2P - 1 - r) over the whole sequence: [`ring_forward`] with the zigzag plan.
pub fn zigzag_causal_forward(
    t: &dyn Transport,
    x: &LocalQkv,
    params: &AttnParams,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let (plan, mask) = zigzag_setup(t, x)?;
    ring_forward(t, &plan, &mask, x, params)
}

/// Gradients of [`zigzag_causal_forward`]: [`ring_backward`] with the zigzag plan.
pub fn zigzag_causal_backward(
    t: &dyn Transport,
    x: &LocalQkv,
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    params: &AttnParams,
    bwd: &BackwardParams,
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let (plan, mask) = zigzag_setup(t, x)?;
    ring_backward(t, &plan, &mask, x, out, lse, dout, params, bwd)
}

/// The zigzag placement of a whole `[B, n, H, D]` tensor: rank r's rows (chunks r and
/// 2P - 1 - r of c = n / (2P), concatenated). Errors when 2P does not divide n.
pub fn zigzag_shard(
    x: &[f32],
    b: usize,
    n: usize,
    hd: usize,
    p: usize,
    r: usize,
) -> Result<Vec<f32>> {
    if p == 0 || r >= p || !n.is_multiple_of(2 * p) {
        return Err(Error::Param {
            op: "zigzag",
            msg: format!(
                "{n} tokens over {p} ranks: zigzag needs 2P = {} to divide the length (rank {r})",
                2 * p
            ),
        });
    }
    let c = n / (2 * p);
    let mut out = Vec::with_capacity(b * 2 * c * hd);
    for bi in 0..b {
        for g in [r, 2 * p - 1 - r] {
            let base = (bi * n + g * c) * hd;
            out.extend_from_slice(&x[base..base + c * hd]);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::MaskSpec;
    use crate::cp::ThreadTransport;
    use crate::mask::BoundMask;
    use crate::tensor::TensorView;
    use crate::testing::Rng;
    use std::time::Duration;

    /// The causal mask bound to `n` x `n` (batch `b`).
    fn causal_block(b: usize, n: usize) -> Result<BoundMask> {
        MaskExpr::parse("causal")?.bind(
            MaskShape {
                batch: b,
                sq: n,
                sk: n,
            },
            None,
        )
    }

    fn seeded(seed: u64, n: usize) -> Vec<f32> {
        let mut r = Rng::new(seed);
        (0..n).map(|_| r.normal() as f32).collect()
    }

    /// Zigzag ring over P threads against single-rank causal attention on the whole sequence.
    #[test]
    fn zigzag_matches_single_rank_causal() {
        for &(p, c, hq, hk) in &[
            (1, 7, 2, 2),
            (2, 7, 2, 1),
            (3, 5, 4, 2),
            (4, 3, 2, 2),
            (5, 9, 3, 1),
        ] {
            let (b, d, dv) = (2, 16, 8);
            let n = 2 * p * c;
            let q = seeded(1 + p as u64, b * n * hq * d);
            let k = seeded(2 + p as u64, b * n * hk * d);
            let v = seeded(3 + p as u64, b * n * hk * dv);
            let whole = {
                let m = causal_block(b, n).unwrap();
                forward(
                    &TensorView::contiguous(&q[..], [b, n, hq, d]).unwrap(),
                    &TensorView::contiguous(&k[..], [b, n, hk, d]).unwrap(),
                    &TensorView::contiguous(&v[..], [b, n, hk, dv]).unwrap(),
                    &AttnParams::default(),
                    MaskSpec::Expr(&m),
                )
                .unwrap()
            };
            let want_o = whole.out.data.to_f32_vec();
            let group = ThreadTransport::group(p, Duration::from_secs(20)).unwrap();
            let hs: Vec<_> = group
                .into_iter()
                .map(|t| {
                    let (q, k, v) = (q.clone(), k.clone(), v.clone());
                    std::thread::spawn(move || {
                        let r = t.rank();
                        let lq = zigzag_shard(&q, b, n, hq * d, p, r).unwrap();
                        let lk = zigzag_shard(&k, b, n, hk * d, p, r).unwrap();
                        let lv = zigzag_shard(&v, b, n, hk * dv, p, r).unwrap();
                        let x = LocalQkv {
                            q: &lq,
                            k: &lk,
                            v: &lv,
                            dims: (b, 2 * c, hq, hk, d, dv),
                        };
                        zigzag_causal_forward(&t, &x, &AttnParams::default()).unwrap()
                    })
                })
                .collect();
            for (r, h) in hs.into_iter().enumerate() {
                let (o, l) = h.join().unwrap();
                let want = zigzag_shard(&want_o, b, n, hq * dv, p, r).unwrap();
                let err = o
                    .iter()
                    .zip(&want)
                    .map(|(a, w)| (a - w).abs())
                    .fold(0f32, f32::max);
                assert!(err < 1e-5, "p {p} rank {r}: out differs by {err}");
                for bi in 0..b {
                    for hi in 0..hq {
                        for (la, g) in [r, 2 * p - 1 - r].into_iter().enumerate() {
                            for i in 0..c {
                                let got = l[(bi * hq + hi) * 2 * c + la * c + i];
                                let w = whole.lse[(bi * hq + hi) * n + g * c + i];
                                assert!((got - w).abs() < 1e-5, "p {p} rank {r} lse {got} vs {w}");
                            }
                        }
                    }
                }
            }
        }
    }

    /// Gradients of the zigzag ring against single-rank causal backward on the whole sequence.
    #[test]
    fn zigzag_backward_matches_single_rank() {
        for &(p, c, hq, hk) in &[(1, 5, 2, 2), (2, 7, 2, 1), (3, 4, 4, 2), (5, 3, 3, 1)] {
            let (b, d, dv) = (2, 16, 8);
            let n = 2 * p * c;
            let q = seeded(11 + p as u64, b * n * hq * d);
            let k = seeded(12 + p as u64, b * n * hk * d);
            let v = seeded(13 + p as u64, b * n * hk * dv);
            let dout = seeded(14 + p as u64, b * n * hq * dv);
            let m = causal_block(b, n).unwrap();
            let (qv, kv, vv) = (
                TensorView::contiguous(&q[..], [b, n, hq, d]).unwrap(),
                TensorView::contiguous(&k[..], [b, n, hk, d]).unwrap(),
                TensorView::contiguous(&v[..], [b, n, hk, dv]).unwrap(),
            );
            let prm = AttnParams::default();
            let f = forward(&qv, &kv, &vv, &prm, MaskSpec::Expr(&m)).unwrap();
            let ov = f.out.view("out").unwrap();
            let dov = TensorView::contiguous(&dout[..], [b, n, hq, dv]).unwrap();
            let bp = BackwardParams {
                deterministic: true,
                ..Default::default()
            };
            let g = backward(
                &qv,
                &kv,
                &vv,
                &ov,
                &f.lse,
                &dov,
                &prm,
                MaskSpec::Expr(&m),
                &bp,
            )
            .unwrap();
            let want = [
                g.dq.data.to_f32_vec(),
                g.dk.data.to_f32_vec(),
                g.dv.data.to_f32_vec(),
            ];
            let group = ThreadTransport::group(p, Duration::from_secs(20)).unwrap();
            let hs: Vec<_> = group
                .into_iter()
                .map(|t| {
                    let (q, k, v, dout) = (q.clone(), k.clone(), v.clone(), dout.clone());
                    std::thread::spawn(move || {
                        let r = t.rank();
                        let sh = |x: &[f32], hd: usize| zigzag_shard(x, b, n, hd, p, r).unwrap();
                        let (lq, lk, lv, ld) = (
                            sh(&q, hq * d),
                            sh(&k, hk * d),
                            sh(&v, hk * dv),
                            sh(&dout, hq * dv),
                        );
                        let x = LocalQkv {
                            q: &lq,
                            k: &lk,
                            v: &lv,
                            dims: (b, 2 * c, hq, hk, d, dv),
                        };
                        let prm = AttnParams::default();
                        let (o, l) = zigzag_causal_forward(&t, &x, &prm).unwrap();
                        let bp = BackwardParams {
                            deterministic: true,
                            ..Default::default()
                        };
                        zigzag_causal_backward(&t, &x, &o, &l, &ld, &prm, &bp).unwrap()
                    })
                })
                .collect();
            for (r, h) in hs.into_iter().enumerate() {
                let (dq, dk, dv_) = h.join().unwrap();
                for (name, got, w, hd) in [
                    ("dq", &dq, &want[0], hq * d),
                    ("dk", &dk, &want[1], hk * d),
                    ("dv", &dv_, &want[2], hk * dv),
                ] {
                    let w = zigzag_shard(w, b, n, hd, p, r).unwrap();
                    let scale = w.iter().fold(0f32, |m, x| m.max(x.abs()));
                    let err = got
                        .iter()
                        .zip(&w)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max);
                    assert!(
                        err <= 1e-5 * scale.max(1.0),
                        "p {p} rank {r} {name}: {err} (max {scale})"
                    );
                }
            }
        }
    }

    #[test]
    fn uneven_lengths_and_shapes_are_refused() {
        let e = zigzag_shard(&[0.0; 10], 1, 10, 1, 3, 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("2P = 6"), "{e}");
        let g = ThreadTransport::group(1, Duration::from_secs(1)).unwrap();
        let x = LocalQkv {
            q: &[1.0; 6],
            k: &[1.0; 6],
            v: &[1.0; 6],
            dims: (1, 3, 1, 1, 2, 2),
        };
        let e = zigzag_causal_forward(&g[0], &x, &AttnParams::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("two chunks"), "{e}");
    }
}
