//! Ring attention: the keys and values travel around the ranks, the queries stay.
//!
//! Rank r holds the chunks the [`Plan`] gives it (queries, keys and values of the same rows).
//! At step s = 0 .. P-1 it holds the keys and values of rank (r - s) mod P that its queries need
//! and, for each of its query chunks a and each held key chunk b that a needs (some scheduled
//! tile of the mask meets a x b: [`blocks`]), runs the common attention forward on the block
//! with the block's cut of the mask ([`CpMask::rect`]). Only the chunks a rank needs travel (the
//! halo exchange: rank r - s sends r exactly those at step s, [`Plan::exchanged`]), so a sliding
//! window moves the neighbouring chunks, not the whole sequence, and chunks the mask keeps apart
//! move nothing ([`ring_bytes`]). The partial results of a query chunk are merged in f32 as they
//! come (per row and head, [`merge_rows`]):
//!   lse = log(exp(lse_1) + exp(lse_2)),   out = exp(lse_1 - lse) out_1 + exp(lse_2 - lse) out_2.
//! Backward ([`ring_backward`]): the same walk; each block's gradients come from the common
//! `backward` given the query chunk's final out and LSE (so P = exp(S - LSE) is the block of the
//! whole softmax and D = rowsum(dO o O) is the whole row's):
//!   dQ_a += dS_ab K_b,   dK_b += dS_ab^T Q_a,   dV_b += P_ab^T dO_a.
//! The dK / dV of fetched chunks go back to their owner after each step and are added there in
//! step order.
//! Zigzag ([`zigzag_causal_forward`], [`zigzag_causal_backward`]) is the causal case with 2P
//! equal chunks, rank r holding chunks r and 2P - 1 - r (what [`plan`](super::plan::plan) picks
//! for a causal mask). Single-rank `forward` / `backward` are the reference (tests here and in
//! `cp/tests.rs`).
use super::block::{
    blocks, copy_rows, from_bytes, merge_rows, pack, same_heads, to_bytes, Block, Cp, CpMask,
    GradIn, Keys, LocalQkv, Rows, Run, Side,
};
use super::plan::{even_bounds, Plan};
use super::transport::Transport;
use crate::attention::{forward, AttnParams};
use crate::backward::{backward, BackwardParams};
use crate::error::{Error, Result};
use crate::mask::{BoundMask, MaskExpr, MaskShape};
use crate::tensor::TensorView;

/// Attention of this rank's query chunks over the whole sequence under `mask`, keys and values
/// passed around the ring; returns `(out [B, rows, Hq, Dv], lse [B, Hq, rows])` in the local row
/// order.
pub fn ring_forward(cp: &Cp, x: &LocalQkv, params: &AttnParams) -> Result<(Vec<f32>, Vec<f32>)> {
    let Cp { t, plan, mask } = *cp;
    x.agree(t, "ring", plan, mask)?;
    let ol = x.o_rows();
    let mut out = vec![0f32; ol.values()];
    let mut lse = vec![f32::NEG_INFINITY; x.lse_rows().values()];
    walk(t, plan, mask, x, false, |b, h| {
        let part = forward(&h.q, &h.k, &h.v, params, b.rect.spec())?;
        let o2 = part.out.data.to_f32_vec();
        merge_rows((&mut out, &mut lse), (&o2, &part.lse), ol, b.qa, b.la);
        Ok(())
    })?;
    Ok((out, lse))
}

/// One block's queries, and its keys and values from the rank held at this ring step; in a
/// backward the dK / dV accumulators of the keys held (layouts `kl`, `vl`).
struct Held<'a> {
    q: TensorView<'a>,
    k: TensorView<'a>,
    v: TensorView<'a>,
    kl: Rows,
    vl: Rows,
    dk: &'a mut [f32],
    dv: &'a mut [f32],
}

/// The ring walk of the forward and the backward (module header), with halo fetches: at step
/// s = 0 .. P-1 this rank holds the key chunks of rank r - s that its queries need
/// ([`Plan::exchanged`] with [`Side::Keys`]: all of them for a dense mask, the neighbouring
/// chunks for a sliding window, none for chunks the mask keeps apart) and runs `f` on each block
/// it needs. Step 0 reads its own keys in place; at step s > 0 it sends rank r + s the chunks
/// r + s needs of its own and receives from rank r - s the chunks it needs of r - s (the same
/// P - 1 steps as a ring pass, each message only the halo). With `grads` the dK / dV of the
/// fetched chunks go back to their owner after the step, which adds them in step order (its
/// own blocks first). Returns this rank's (dK, dV) (empty without `grads`).
fn walk(
    t: &dyn Transport,
    plan: &Plan,
    mask: &CpMask,
    x: &LocalQkv,
    grads: bool,
    mut f: impl FnMut(Block, Held) -> Result<()>,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let (p, r) = (t.world(), t.rank());
    let (kl, vl) = (x.k_rows(), x.v_rows());
    let n_acc = |n: usize| if grads { n } else { 0 };
    let (mut dk, mut dv) = (vec![0f32; n_acc(x.k.len())], vec![0f32; n_acc(x.v.len())]);
    for step in 0..p {
        let (to, from) = ((r + step) % p, (r + p - step) % p);
        let tag = 4 * step as u32;
        if step == 0 {
            let own = plan.chunks_of(r);
            for blk in blocks(plan, mask, r, Keys::Chunks(&own))? {
                let h = Held {
                    q: x.q_rows().view(x.q, blk.qa, blk.la)?,
                    k: kl.view(x.k, blk.kb, blk.lb)?,
                    v: vl.view(x.v, blk.kb, blk.lb)?,
                    kl,
                    vl,
                    dk: &mut dk,
                    dv: &mut dv,
                };
                f(blk, h)?;
            }
            continue;
        }
        // The halo: what `to` needs of this rank goes out, what this rank needs of `from` comes.
        let mine = plan.exchanged(r, to, Side::Keys);
        let theirs = plan.exchanged(from, r, Side::Keys);
        send(t, to, tag, &pack(plan, r, x.k, kl, &mine))?;
        send(t, to, tag + 1, &pack(plan, r, x.v, vl, &mine))?;
        let rows = plan.packed_rows(&theirs);
        let (hk, hv) = (kl.with_rows(rows), vl.with_rows(rows));
        let k = recv(t, from, tag, hk.values())?;
        let v = recv(t, from, tag + 1, hv.values())?;
        let (mut pdk, mut pdv) = (vec![0f32; n_acc(k.len())], vec![0f32; n_acc(v.len())]);
        for blk in blocks(plan, mask, r, Keys::Chunks(&theirs))? {
            let h = Held {
                q: x.q_rows().view(x.q, blk.qa, blk.la)?,
                k: hk.view(&k, blk.kb, blk.lb)?,
                v: hv.view(&v, blk.kb, blk.lb)?,
                kl: hk,
                vl: hv,
                dk: &mut pdk,
                dv: &mut pdv,
            };
            f(blk, h)?;
        }
        if grads {
            // The fetched chunks' gradients go home; this rank's come from `to`.
            send(t, from, tag + 2, &pdk)?;
            send(t, from, tag + 3, &pdv)?;
            let rows = plan.packed_rows(&mine);
            let back = plan.packed_runs(r, &mine);
            let back: Vec<Run> = back.into_iter().map(Run::rev).collect();
            for (acc, l, tg) in [(&mut dk, kl, tag + 2), (&mut dv, vl, tag + 3)] {
                let part = recv(t, to, tg, l.with_rows(rows).values())?;
                copy_rows(
                    (&part, l.with_rows(rows)),
                    (acc, l),
                    &back,
                    &same_heads(l.h),
                    true,
                );
            }
        }
    }
    Ok((dk, dv))
}

/// Sends `x` to rank `to` under `tag` when it is not empty (the receiver knows from the plan
/// that nothing comes).
pub(crate) fn send(t: &dyn Transport, to: usize, tag: u32, x: &[f32]) -> Result<()> {
    if x.is_empty() {
        return Ok(());
    }
    t.send(to, tag, &to_bytes(x))
}

/// Receives `len` f32 from rank `from` under `tag` (nothing when `len` is 0).
pub(crate) fn recv(t: &dyn Transport, from: usize, tag: u32, len: usize) -> Result<Vec<f32>> {
    if len == 0 {
        return Ok(Vec::new());
    }
    let mut raw = vec![0u8; 4 * len];
    t.recv(from, tag, &mut raw)?;
    Ok(from_bytes(&raw))
}

/// Bytes of keys and values the busiest rank receives over a forward (`kv_row`: bytes of one
/// row of K and V, every batch row and head): the halo of each step, the chunks of the other
/// ranks its queries need.
pub fn ring_bytes(plan: &Plan, kv_row: u64) -> u64 {
    let p = plan.world;
    (0..p)
        .map(|r| {
            (1..p)
                .map(|s| plan.packed_rows(&plan.exchanged((r + p - s) % p, r, Side::Keys)) as u64)
                .sum::<u64>()
                * kv_row
        })
        .max()
        .unwrap_or(0)
}

/// Gradients of this rank's share of the attention (module header): `g.out`, `g.lse` from
/// [`ring_forward`]; returns `(dq, dk, dv)` in the local row order (f32).
pub fn ring_backward(cp: &Cp, x: &LocalQkv, g: &GradIn, params: &AttnParams) -> Result<Grads> {
    let Cp { t, plan, mask } = *cp;
    g.agree(t, "ring", x, plan, mask)?;
    let (ql, ol) = (x.q_rows(), x.o_rows());
    // Each call sees one block of keys of the rows' softmax (out and LSE are the whole row's).
    let part_keys = BackwardParams {
        partial_keys: true,
        ..g.bwd
    };
    let mut dq = vec![0f32; ql.values()];
    let (dk, dv) = walk(t, plan, mask, x, true, |b, h| {
        let (qa, la) = (b.qa, b.la);
        let gr = backward(
            &h.q,
            &h.k,
            &h.v,
            &ol.view(g.out, qa, la)?,
            &g.lse_rows(x, qa, la),
            &ol.view(g.dout, qa, la)?,
            params,
            b.rect.spec(),
            &part_keys,
        )?;
        add(&mut dq, &gr.dq.data.to_f32_vec(), ql, qa, la);
        add(h.dk, &gr.dk.data.to_f32_vec(), h.kl, b.kb, b.lb);
        add(h.dv, &gr.dv.data.to_f32_vec(), h.vl, b.kb, b.lb);
        Ok(())
    })?;
    Ok((dq, dk, dv))
}

/// Adds `part [B, len, H, W]` into rows `r0 .. r0 + len` of `y` (layout `yl`).
pub(crate) fn add(y: &mut [f32], part: &[f32], yl: Rows, r0: usize, len: usize) {
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
}

/// Gradients `(dq, dk, dv)` of one rank's rows (f32).
pub type Grads = (Vec<f32>, Vec<f32>, Vec<f32>);

/// The causal mask bound to `n` x `n` (batch `b`).
fn causal_mask(b: usize, n: usize) -> Result<BoundMask> {
    let shape = MaskShape {
        batch: b,
        ..MaskShape::square(n)
    };
    MaskExpr::parse("causal")?.bind(shape, None)
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
    let mask = CpMask::new(causal_mask(b, n)?, 64)?;
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
    ring_forward(
        &Cp {
            t,
            plan: &plan,
            mask: &mask,
        },
        x,
        params,
    )
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
) -> Result<Grads> {
    let (plan, mask) = zigzag_setup(t, x)?;
    let g = GradIn {
        out,
        lse,
        dout,
        bwd: *bwd,
    };
    ring_backward(
        &Cp {
            t,
            plan: &plan,
            mask: &mask,
        },
        x,
        &g,
        params,
    )
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
    use crate::tensor::TensorView;
    use crate::testing::Rng;
    use std::time::Duration;

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
                let m = causal_mask(b, n).unwrap();
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
            let m = causal_mask(b, n).unwrap();
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
