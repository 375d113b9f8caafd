//! Tree decode: the keys and values of one sequence sharded across ranks, the (few) new queries
//! on every rank, and every rank ending with the whole attention.
//!
//! Rank r holds the keys `k0_r .. k1_r` of the Sk keys (contiguous, in rank order, any lengths,
//! some possibly empty) and the same queries `q [B, Sq, Hq, D]` (Sq <= Sk: the last Sq
//! positions, the mask's bottom-right alignment). Each rank runs the common `forward` on its
//! shard with the mask's cut for the rectangle `[0, Sq) x [k0_r, k1_r)` ([`CpMask::rect`]: the
//! mask's schedule and element mask shifted to the shard, so any mask expression works), giving
//! a partial `(o_r, lse_r)` (a shard the mask leaves no key of: `o_r = 0`, `lse_r = -inf`). One
//! all-gather brings every rank all P partials, and each rank merges them in rank order (the same
//! bits on every rank), per (batch, query, head), in f64:
//!   m = max_r lse_r,   lse = m + log sum_r exp(lse_r - m),
//!   out = sum_r exp(lse_r - lse) o_r
//! (a row no rank has a key for stays `out = 0`, `lse = -inf`, as single-rank `forward` gives).
//! The queries, not the keys, travel: a rank receives `(P - 1) B Sq Hq (Dv + 1)` floats whatever
//! the sequence's length. The shard runs through the common `forward` rather than the paged
//! decode (`kv::decode`: one query per sequence, no mask) so that a batch of new queries and any
//! mask expression work; the merge is the same split-KV merge the paged decode does inside one
//! rank. Single-rank `forward` and the f64 oracle are the references (tests).
use super::block::{from_bytes, to_bytes, CpMask};
use super::scheme::on_threads;
use super::transport::{Traffic, Transport};
use crate::attention::{forward, AttnParams};
use crate::error::{Error, Result};
use crate::tensor::TensorView;
use std::time::Duration;

/// One rank's share of a decode: the queries `q [B, Sq, Hq, D]` (the same on every rank) and its
/// keys and values `k [B, k1 - k0, Hk, D]`, `v [B, k1 - k0, Hk, Dv]` (f32, contiguous), the keys
/// `keys = (k0, k1)` of the sequence.
pub struct DecodeShard<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub keys: (usize, usize),
    /// (B, Sq, Hq, Hk, D, Dv)
    pub dims: (usize, usize, usize, usize, usize, usize),
}

impl DecodeShard<'_> {
    /// This rank's own check: shapes against the buffers and the mask.
    fn check(&self, mask: &CpMask) -> std::result::Result<(), String> {
        let (b, sq, hq, hk, d, dv) = self.dims;
        let (k0, k1) = self.keys;
        let s = mask.bound.shape();
        if [b, sq, hq, hk, d, dv].contains(&0) || !hq.is_multiple_of(hk) {
            return Err(format!(
                "batch {b}, queries {sq}, heads {hq} / {hk}, dims {d} / {dv}: all >= 1 and the query heads a multiple of the key / value heads"
            ));
        }
        if (s.batch, s.sq) != (b, sq) || k0 > k1 || k1 > s.sk {
            return Err(format!(
                "the mask is bound to batch {}, {} queries, {} keys; this rank has batch {b}, {sq} queries and keys {k0}..{k1}",
                s.batch, s.sq, s.sk
            ));
        }
        let n = k1 - k0;
        let want = (b * sq * hq * d, b * n * hk * d, b * n * hk * dv);
        let got = (self.q.len(), self.k.len(), self.v.len());
        if got != want {
            return Err(format!(
                "q / k / v hold {} / {} / {} values, expected {} / {} / {} ([B {b}, Sq {sq}, Hq {hq}, D {d}] and [B, {n} keys, Hk {hk}, D / Dv])",
                got.0, got.1, got.2, want.0, want.1, want.2
            ));
        }
        Ok(())
    }
}

/// Checks this rank's shard, then (one all-gather of a few words) that every rank has the same
/// shapes and mask and that the shards tile the keys `0 .. Sk` in rank order.
fn agree(t: &dyn Transport, mask: &CpMask, x: &DecodeShard) -> Result<()> {
    let local = x.check(mask);
    let (b, sq, hq, hk, d, dv) = x.dims;
    let fields = [
        ("batch", b as u64),
        ("queries", sq as u64),
        ("query heads", hq as u64),
        ("key / value heads", hk as u64),
        ("head dim", d as u64),
        ("value dim", dv as u64),
        ("mask", mask.fingerprint()),
    ];
    let mine: Vec<u64> = [local.is_ok() as u64, x.keys.0 as u64, x.keys.1 as u64]
        .into_iter()
        .chain(fields.iter().map(|f| f.1))
        .collect();
    let bytes: Vec<u8> = mine.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut all = vec![0u8; bytes.len() * t.world()];
    t.all_gather(&bytes, &mut all)?;
    local.map_err(|m| t.err(format!("tree decode: {m}")))?;
    let mut end = 0u64;
    for (r, theirs) in all.chunks(bytes.len()).enumerate() {
        let word =
            |i: usize| u64::from_le_bytes(theirs[8 * i..8 * i + 8].try_into().expect("8 bytes"));
        if word(0) == 0 {
            return Err(t.err(format!(
                "tree decode: rank {r} refused its inputs (its own error names the problem)"
            )));
        }
        for (i, &(name, v)) in fields.iter().enumerate() {
            if word(i + 3) != v {
                return Err(t.err(format!(
                    "tree decode: rank {r} has {name} {}, this rank {v}: every rank must pass the same queries, shapes and mask",
                    word(i + 3)
                )));
            }
        }
        if word(1) != end {
            return Err(t.err(format!(
                "tree decode: rank {r} holds keys {}..{}, but the shards must follow each other in rank order (it should start at {end})",
                word(1),
                word(2)
            )));
        }
        end = word(2);
    }
    let sk = mask.bound.shape().sk as u64;
    if end != sk {
        return Err(t.err(format!(
            "tree decode: the shards cover keys 0..{end} of the {sk} the mask is bound to"
        )));
    }
    Ok(())
}

/// The whole decode on every rank (module header): `(out [B, Sq, Hq, Dv], lse [B, Hq, Sq])`,
/// the same bits on every rank.
pub fn tree_decode(
    t: &dyn Transport,
    mask: &CpMask,
    x: &DecodeShard,
    params: &AttnParams,
) -> Result<(Vec<f32>, Vec<f32>)> {
    agree(t, mask, x)?;
    let (b, sq, hq, hk, d, dv) = x.dims;
    let (k0, k1) = x.keys;
    let (n_out, n_lse) = (b * sq * hq * dv, b * hq * sq);
    // This rank's partial: its shard under the mask's cut, or nothing.
    let rect = match k1 > k0 {
        true => mask.rect((0, sq), (k0, k1))?,
        false => None,
    };
    let mut part = match rect {
        Some(rect) => {
            let res = forward(
                &TensorView::contiguous(x.q, [b, sq, hq, d])?,
                &TensorView::contiguous(x.k, [b, k1 - k0, hk, d])?,
                &TensorView::contiguous(x.v, [b, k1 - k0, hk, dv])?,
                params,
                rect.spec(),
            )?;
            let mut o = res.out.data.to_f32_vec();
            o.extend_from_slice(&res.lse);
            o
        }
        None => {
            let mut o = vec![0f32; n_out];
            o.resize(n_out + n_lse, f32::NEG_INFINITY);
            o
        }
    };
    // One all-gather of every rank's (out, lse).
    let mine = to_bytes(&part);
    let mut all = vec![0u8; mine.len() * t.world()];
    t.all_gather(&mine, &mut all)?;
    let parts: Vec<Vec<f32>> = all.chunks(mine.len()).map(from_bytes).collect();
    merge(&parts, (b, sq, hq, dv), &mut part);
    part.truncate(n_out);
    let lse = parts_lse(&parts, (b, sq, hq, dv));
    Ok((part, lse))
}

/// The merged out (formula in the module header) of the partials `parts` (each `out` then
/// `lse`, layouts `[B, Sq, Hq, Dv]` and `[B, Hq, Sq]`) written into `out[..B Sq Hq Dv]`.
fn merge(parts: &[Vec<f32>], (b, sq, hq, dv): (usize, usize, usize, usize), out: &mut [f32]) {
    let n_out = b * sq * hq * dv;
    let mut w = vec![0f64; parts.len()];
    let mut acc = vec![0f64; dv];
    for bi in 0..b {
        for i in 0..sq {
            for h in 0..hq {
                let li = n_out + (bi * hq + h) * sq + i;
                let m = parts
                    .iter()
                    .map(|p| p[li])
                    .fold(f32::NEG_INFINITY, f32::max);
                let o = ((bi * sq + i) * hq + h) * dv;
                if m == f32::NEG_INFINITY {
                    out[o..o + dv].fill(0.0);
                    continue;
                }
                for (wr, p) in w.iter_mut().zip(parts) {
                    *wr = (p[li] as f64 - m as f64).exp();
                }
                let s: f64 = w.iter().sum();
                acc.fill(0.0);
                for (wr, p) in w.iter().zip(parts) {
                    for (a, &x) in acc.iter_mut().zip(&p[o..o + dv]) {
                        *a += wr * x as f64;
                    }
                }
                for (y, a) in out[o..o + dv].iter_mut().zip(&acc) {
                    *y = (a / s) as f32;
                }
            }
        }
    }
}

/// The merged LSE `[B, Hq, Sq]`: `m + log sum_r exp(lse_r - m)` (module header).
fn parts_lse(parts: &[Vec<f32>], (b, sq, hq, dv): (usize, usize, usize, usize)) -> Vec<f32> {
    let n_out = b * sq * hq * dv;
    (0..b * hq * sq)
        .map(|x| {
            let m = parts
                .iter()
                .map(|p| p[n_out + x])
                .fold(f32::NEG_INFINITY, f32::max);
            if m == f32::NEG_INFINITY {
                return m;
            }
            let s: f64 = parts
                .iter()
                .map(|p| (p[n_out + x] as f64 - m as f64).exp())
                .sum();
            (m as f64 + s.ln()) as f32
        })
        .collect()
}

/// What [`tree_decode_threads`] returns: the decode's `out [B, Sq, Hq, Dv]` and
/// `lse [B, Hq, Sq]` (rank 0's; every rank's is checked to be the same bits) and each rank's
/// traffic.
pub struct DecodeOut {
    pub out: Vec<f32>,
    pub lse: Vec<f32>,
    pub traffic: Vec<Traffic>,
}

/// Tree decode with ranks as threads: whole `q [B, Sq, Hq, D]`, `k [B, Sk, Hk, D]`,
/// `v [B, Sk, Hk, Dv]` (f32, contiguous), rank r given the keys `bounds[r] .. bounds[r + 1]`
/// (`bounds` rising from 0 to Sk, P + 1 entries; equal neighbours give an empty shard).
pub fn tree_decode_threads(
    mask: &CpMask,
    (q, k, v): (&[f32], &[f32], &[f32]),
    dims: (usize, usize, usize, usize, usize, usize, usize),
    bounds: &[usize],
    params: &AttnParams,
    timeout: Duration,
) -> Result<DecodeOut> {
    let (b, sq, sk, hq, hk, d, dv) = dims;
    let bad = |msg: String| {
        Err(Error::Param {
            op: "tree decode",
            msg,
        })
    };
    if bounds.len() < 2
        || bounds[0] != 0
        || bounds[bounds.len() - 1] != sk
        || bounds.windows(2).any(|w| w[0] > w[1])
    {
        return bad(format!(
            "shard bounds {bounds:?} must rise from 0 to the {sk} keys (P + 1 entries, at least one rank)"
        ));
    }
    if (k.len(), v.len()) != (b * sk * hk * d, b * sk * hk * dv) {
        return bad(format!(
            "k / v hold {} / {} values, expected [B {b}, Sk {sk}, Hk {hk}, D {d} / Dv {dv}] = {} / {}",
            k.len(),
            v.len(),
            b * sk * hk * d,
            b * sk * hk * dv
        ));
    }
    let p = bounds.len() - 1;
    // Rank r's rows k0 .. k1 of a [B, Sk, H, W] tensor.
    let rows = |x: &[f32], w: usize, (k0, k1): (usize, usize)| -> Vec<f32> {
        (0..b)
            .flat_map(|bi| x[(bi * sk + k0) * w..(bi * sk + k1) * w].iter().copied())
            .collect()
    };
    let mut ok = on_threads(p, timeout, |t| {
        let keys = (bounds[t.rank()], bounds[t.rank() + 1]);
        let (lk, lv) = (rows(k, hk * d, keys), rows(v, hk * dv, keys));
        let x = DecodeShard {
            q,
            k: &lk,
            v: &lv,
            keys,
            dims: (b, sq, hq, hk, d, dv),
        };
        let (o, l) = tree_decode(&t, mask, &x, params).inspect_err(|e| t.abort(&e.to_string()))?;
        Ok((o, l, t.traffic()))
    })?;
    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    if let Some(r) =
        (1..p).find(|&r| bits(&ok[r].0) != bits(&ok[0].0) || bits(&ok[r].1) != bits(&ok[0].1))
    {
        return Err(Error::Comm {
            rank: r,
            world: p,
            msg: "tree decode: this rank's merged result differs from rank 0's".into(),
        });
    }
    let traffic = ok.iter().map(|x| x.2).collect();
    let (out, lse, _) = ok.swap_remove(0);
    Ok(DecodeOut { out, lse, traffic })
}
