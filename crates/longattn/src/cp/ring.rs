//! Ring attention for a causal mask with zigzag placement: the keys and values travel around
//! the ranks, the queries stay.
//!
//! A sequence of n tokens is cut into 2P chunks of c = n / (2P); rank r holds chunks r and
//! 2P - 1 - r (one early, one late: every rank gets the same causal work). At step
//! s = 0 .. P-1 rank r holds the keys and values of rank (r - s) mod P and, for each of its query
//! chunks a and each held chunk b, runs the common attention forward on the c x c block:
//! b < a the full block, b = a the causal block, b > a nothing. It then sends what it holds to
//! rank r + 1 and receives from rank r - 1. The partial results of a query chunk are merged in
//! f32 as they come (per row and head, `merge_partial`):
//!   lse = log(exp(lse_1) + exp(lse_2)),   out = exp(lse_1 - lse) out_1 + exp(lse_2 - lse) out_2.
//! Backward (`zigzag_causal_backward`): the same walk; each block's gradients come from the
//! common `backward` given the query chunk's final out and LSE (so P = exp(S - LSE) is the
//! block of the whole softmax and D = rowsum(dO o O) is the whole row's):
//!   dQ_a += dS_ab K_b,   dK_b += dS_ab^T Q_a,   dV_b += P_ab^T dO_a.
//! dK / dV accumulators travel with the keys and values and go home after the last step.
//! Single-rank `forward` / `backward` with `causal` are the reference (tests below, P = 1 .. 5).
use super::transport::Transport;
use crate::attention::{forward, AttnParams, MaskSpec};
use crate::backward::{backward, BackwardParams};
use crate::error::{Error, Result};
use crate::mask::{BoundMask, MaskExpr, MaskShape};
use crate::tensor::TensorView;

/// This rank's share of one causal attention: `q [B, 2c, Hq, D]`, `k [B, 2c, Hk, D]`,
/// `v [B, 2c, Hk, Dv]` (f32, contiguous; rows 0..c are chunk r, rows c..2c chunk 2P - 1 - r).
pub struct LocalQkv<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    /// (B, 2c, Hq, Hk, D, Dv)
    pub dims: (usize, usize, usize, usize, usize, usize),
}

impl LocalQkv<'_> {
    /// Checks the shapes; the chunk length c.
    fn check(&self, t: &dyn Transport) -> Result<usize> {
        let (b, s2, hq, hk, d, dv) = self.dims;
        if !s2.is_multiple_of(2) || s2 == 0 {
            return Err(t.err(format!(
                "zigzag: a rank holds two chunks of equal length, got {s2} rows"
            )));
        }
        let want = |n: usize| b * s2 * n;
        let (q, k, v) = (self.q.len(), self.k.len(), self.v.len());
        if q != want(hq * d) || k != want(hk * d) || v != want(hk * dv) {
            return Err(t.err(format!(
                "zigzag: q / k / v hold {q} / {k} / {v} values, expected [B {b}, 2c {s2}, H, D] = {} / {} / {}",
                want(hq * d),
                want(hk * d),
                want(hk * dv)
            )));
        }
        Ok(s2 / 2)
    }
}

/// Chunk `half` (0 or 1) of a rank's `[B, 2c, H, W]` f32 buffer as a `[B, c, H, W]` view (no
/// copy).
fn chunk(
    x: &[f32],
    (b, s2, h, w): (usize, usize, usize, usize),
    half: usize,
) -> Result<TensorView<'_>> {
    let c = s2 / 2;
    TensorView::strided(
        &x[half * c * h * w..],
        [b, c, h, w],
        [s2 * h * w, h * w, w, 1],
    )
}

/// The mask of a block: the bound causal mask on the diagonal, none below it.
fn block_mask(diag: bool, causal: &BoundMask) -> MaskSpec<'_> {
    if diag {
        MaskSpec::Expr(causal)
    } else {
        MaskSpec::Full
    }
}

/// Merges a partial result `(o2 [B, c, H, Dv], l2 [B, H, c])` of query chunk `half` into the
/// rank's `(o1 [B, 2c, H, Dv], l1 [B, H, 2c])` (formula in the module header; rows without keys
/// in both parts stay empty).
fn merge_partial(
    (o1, l1): (&mut [f32], &mut [f32]),
    (o2, l2): (&[f32], &[f32]),
    (b, s2, h, dv): (usize, usize, usize, usize),
    half: usize,
) {
    let c = s2 / 2;
    for bi in 0..b {
        for hi in 0..h {
            for i in 0..c {
                let (li, pi) = ((bi * h + hi) * s2 + half * c + i, (bi * h + hi) * c + i);
                let (a, z) = (l1[li], l2[pi]);
                let m = a.max(z);
                if m == f32::NEG_INFINITY {
                    continue;
                }
                let (wa, wz) = ((a - m).exp(), (z - m).exp());
                let s = wa + wz;
                l1[li] = m + s.ln();
                let (o, op) = (
                    ((bi * s2 + half * c + i) * h + hi) * dv,
                    ((bi * c + i) * h + hi) * dv,
                );
                for d in 0..dv {
                    o1[o + d] = (wa * o1[o + d] + wz * o2[op + d]) / s;
                }
            }
        }
    }
}

/// Causal attention of this rank's two query chunks over the whole sequence; returns
/// `(out [B, 2c, Hq, Dv], lse [B, Hq, 2c])` in the local row order.
pub fn zigzag_causal_forward(
    t: &dyn Transport,
    x: &LocalQkv,
    params: &AttnParams,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let (b, s2, hq, hk, d, dv) = x.dims;
    let (p, r) = (t.world(), t.rank());
    let c = x.check(t)?;
    let causal = causal_block(b, c)?;
    let mut out = vec![0f32; b * s2 * hq * dv];
    let mut lse = vec![f32::NEG_INFINITY; b * hq * s2];
    // The key / value chunks held at this step (both chunks of one rank), as sent.
    let (mut k_held, mut v_held) = (x.k.to_vec(), x.v.to_vec());
    for step in 0..p {
        for (la, lb, diag) in blocks_at(p, r, step) {
            let part = forward(
                &chunk(x.q, (b, s2, hq, d), la)?,
                &chunk(&k_held, (b, s2, hk, d), lb)?,
                &chunk(&v_held, (b, s2, hk, dv), lb)?,
                params,
                block_mask(diag, &causal),
            )?;
            let o2 = part.out.data.to_f32_vec();
            merge_partial((&mut out, &mut lse), (&o2, &part.lse), (b, s2, hq, dv), la);
        }
        if step + 1 < p {
            // Pass the held chunks on: to r + 1, from r - 1 (sends do not wait).
            let (next, prev) = ((r + 1) % p, (r + p - 1) % p);
            pass_on(
                t,
                next,
                prev,
                2 * step as u32,
                &mut [&mut k_held, &mut v_held],
            )?;
        }
    }
    Ok((out, lse))
}

fn to_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn from_bytes(x: &[u8]) -> Vec<f32> {
    x.chunks_exact(4)
        .map(|w| f32::from_le_bytes(w.try_into().expect("4 bytes")))
        .collect()
}

/// The blocks a rank computes at ring step `step`: (local query chunk, local held chunk,
/// whether it is a diagonal block) for every held chunk g <= query chunk a. Rank r's chunks are
/// r and 2P - 1 - r; at step s it holds those of rank (r - s) mod P.
fn blocks_at(p: usize, r: usize, step: usize) -> Vec<(usize, usize, bool)> {
    let owner = (r + p - step) % p;
    let (mine, theirs) = ([r, 2 * p - 1 - r], [owner, 2 * p - 1 - owner]);
    let mut v = Vec::with_capacity(4);
    for (la, &a) in mine.iter().enumerate() {
        for (lb, &g) in theirs.iter().enumerate() {
            if g <= a {
                v.push((la, lb, g == a));
            }
        }
    }
    v
}

/// The causal mask bound to square blocks of `c` rows (batch `b`).
fn causal_block(b: usize, c: usize) -> Result<BoundMask> {
    MaskExpr::parse("causal")?.bind(
        MaskShape {
            batch: b,
            sq: c,
            sk: c,
        },
        None,
    )
}

/// Sends each buffer to `to` (tags `tag0..`) and replaces it by the one of the same length
/// received from `from`.
fn pass_on(
    t: &dyn Transport,
    to: usize,
    from: usize,
    tag0: u32,
    bufs: &mut [&mut Vec<f32>],
) -> Result<()> {
    for (i, b) in bufs.iter().enumerate() {
        t.send(to, tag0 + i as u32, &to_bytes(b))?;
    }
    for (i, b) in bufs.iter_mut().enumerate() {
        let mut raw = vec![0u8; b.len() * 4];
        t.recv(from, tag0 + i as u32, &mut raw)?;
        **b = from_bytes(&raw);
    }
    Ok(())
}

/// Adds `part [B, c, H, W]` into chunk `half` of a rank's `[B, 2c, H, W]` buffer.
fn add_chunk(
    x: &mut [f32],
    part: &[f32],
    (b, s2, h, w): (usize, usize, usize, usize),
    half: usize,
) {
    let (c, hw) = (s2 / 2, h * w);
    for bi in 0..b {
        let dst = (bi * s2 + half * c) * hw;
        for (d, p) in x[dst..dst + c * hw]
            .iter_mut()
            .zip(&part[bi * c * hw..(bi + 1) * c * hw])
        {
            *d += p;
        }
    }
}

/// Gradients of this rank's share of causal attention (module header): `out [B, 2c, Hq, Dv]`
/// and `lse [B, Hq, 2c]` from [`zigzag_causal_forward`], `dout` like `out`; returns
/// `(dq, dk, dv)` in the local row order (f32).
pub fn zigzag_causal_backward(
    t: &dyn Transport,
    x: &LocalQkv,
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    params: &AttnParams,
    bwd: &BackwardParams,
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let (b, s2, hq, hk, d, dv) = x.dims;
    let (p, r) = (t.world(), t.rank());
    let c = x.check(t)?;
    if out.len() != b * s2 * hq * dv || dout.len() != out.len() || lse.len() != b * hq * s2 {
        return Err(t.err(format!(
            "zigzag backward: out / dout / lse hold {} / {} / {} values, expected {} / {} / {}",
            out.len(),
            dout.len(),
            lse.len(),
            b * s2 * hq * dv,
            b * s2 * hq * dv,
            b * hq * s2
        )));
    }
    let causal = causal_block(b, c)?;
    // The LSE rows of each query chunk, contiguous [B, Hq, c] as the backward takes them.
    let lse_of = |half: usize| -> Vec<f32> {
        (0..b * hq)
            .flat_map(|bh| &lse[bh * s2 + half * c..bh * s2 + (half + 1) * c])
            .copied()
            .collect()
    };
    let lse_c = [lse_of(0), lse_of(1)];
    // Each call sees one block of keys of the rows' softmax (out and LSE are the whole row's).
    let blk = BackwardParams {
        partial_keys: true,
        ..*bwd
    };
    let mut dq = vec![0f32; b * s2 * hq * d];
    let (mut k_held, mut v_held) = (x.k.to_vec(), x.v.to_vec());
    let (mut dk_held, mut dv_held) = (vec![0f32; x.k.len()], vec![0f32; x.v.len()]);
    for step in 0..p {
        for (la, lb, diag) in blocks_at(p, r, step) {
            let gr = backward(
                &chunk(x.q, (b, s2, hq, d), la)?,
                &chunk(&k_held, (b, s2, hk, d), lb)?,
                &chunk(&v_held, (b, s2, hk, dv), lb)?,
                &chunk(out, (b, s2, hq, dv), la)?,
                &lse_c[la],
                &chunk(dout, (b, s2, hq, dv), la)?,
                params,
                block_mask(diag, &causal),
                &blk,
            )?;
            add_chunk(&mut dq, &gr.dq.data.to_f32_vec(), (b, s2, hq, d), la);
            add_chunk(&mut dk_held, &gr.dk.data.to_f32_vec(), (b, s2, hk, d), lb);
            add_chunk(&mut dv_held, &gr.dv.data.to_f32_vec(), (b, s2, hk, dv), lb);
        }
        let (next, prev) = ((r + 1) % p, (r + p - 1) % p);
        if step + 1 < p {
            let tag = 4 * step as u32;
            pass_on(
                t,
                next,
                prev,
                tag,
                &mut [&mut k_held, &mut v_held, &mut dk_held, &mut dv_held],
            )?;
        } else if p > 1 {
            // The accumulators held now belong to rank r + 1; this rank's come from r - 1.
            pass_on(
                t,
                next,
                prev,
                4 * p as u32,
                &mut [&mut dk_held, &mut dv_held],
            )?;
        }
    }
    Ok((dq, dk_held, dv_held))
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
    use crate::cp::ThreadTransport;
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
