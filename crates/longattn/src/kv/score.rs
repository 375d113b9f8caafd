//! Attention scores of the cached keys, per (layer, KV head, entry): what the presses
//! ([`super::press`]) rank entries by.
//!
//! One rule covers every score. With `P_h[q, j] = exp(s_h(q, j) - lse_h(q))` the attention
//! probability of query row q of query head h on entry j (0 where the mask forbids the pair;
//! `s = scale q.k`, soft-capped when asked; `lse` the attention's own LSE, so nothing is
//! renormalised), the weighted column sum of head h is
//!   `c_h[j] = sum_q w_q P_h[q, j]`,
//! reduced over the G query heads of the KV head's group (`Reduce`: mean, max or sum):
//! `c[j] = R_h c_h[j]`, and folded into the running score
//!   `score[j] = decay * score[j] + c[j]`            (entries new since the last fold start at 0).
//! The kinds ([`ScoreKind`]) choose `decay` and `w` for a chunk of Sq query rows:
//! - H2O (accumulated attention): `decay = 1`, `w_q = 1`;
//! - A2SF (accumulation with forgetting factor f): `decay = f^Sq`, `w_q = f^(Sq - 1 - q)`, so that
//!   a chunk folds exactly as Sq single-token steps `score = f score + p` would;
//! - TOVA (the latest query only): `decay = 0`, `w_q = [q = Sq - 1]`;
//! - SnapKV (observation window of the last W queries): `decay = 0`, `w_q = [q >= Sq - W]`.
//!
//! Decode steps are chunks of one row (the LSE of [`super::PagedKvCache::decode`] or `attend`);
//! a prefill chunk gives the forward's LSE. [`column_scores`] is the fast path (parallel over
//! (KV head, query head), the LSE read, never recomputed); [`column_scores_reference`] the plain
//! f64 one (softmax from the definition, no LSE given).
use rayon::prelude::*;

use super::{PagedKvCache, SeqId};
use crate::error::{Error, Result};
use crate::mask::{BoundMask, MaskExpr, MaskShape, RowMask};
use crate::tensor::TensorView;

fn param(msg: String) -> Error {
    Error::Param {
        op: "kv scores",
        msg,
    }
}

/// How the G query heads of a KV head's group are reduced into one score per entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Reduce {
    #[default]
    Mean,
    Max,
    Sum,
}

impl Reduce {
    pub fn parse(s: &str) -> Result<Reduce> {
        match s {
            "mean" => Ok(Reduce::Mean),
            "max" => Ok(Reduce::Max),
            "sum" => Ok(Reduce::Sum),
            _ => Err(param(format!(
                "unknown head reduction `{s}` (expected mean, max or sum)"
            ))),
        }
    }
    /// The code the CUDA kernels read (`reduce` in kv_quest.cu, kv_score.cu and decode.cu's
    /// `score_reduce`): 0 max, 1 sum, 2 mean.
    pub(crate) fn kernel_code(self) -> i32 {
        match self {
            Reduce::Max => 0,
            Reduce::Sum => 1,
            Reduce::Mean => 2,
        }
    }

    pub(crate) fn apply(self, xs: impl Iterator<Item = f64>, g: usize) -> f64 {
        match self {
            Reduce::Sum => xs.sum(),
            Reduce::Mean => xs.sum::<f64>() / g as f64,
            Reduce::Max => xs.fold(0.0, f64::max),
        }
    }
}

/// Which running score is kept (see the module documentation for its decay and weights).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ScoreKind {
    /// Accumulated attention (H2O).
    H2o,
    /// Accumulated attention with forgetting factor f in [0, 1] (A2SF).
    A2sf(f32),
    /// The latest query's attention (TOVA).
    Tova,
    /// The attention of the last `window` queries of the latest chunk (SnapKV).
    SnapKv(usize),
}

impl ScoreKind {
    /// Refuses a forgetting factor outside [0, 1] and an empty SnapKV window.
    pub fn check(self) -> Result<()> {
        match self {
            ScoreKind::A2sf(f) if !(0.0..=1.0).contains(&f) => {
                Err(param(format!("forgetting factor f = {f} outside [0, 1]")))
            }
            ScoreKind::SnapKv(0) => Err(param("SnapKV window must be >= 1".into())),
            _ => Ok(()),
        }
    }

    /// The first of `sq` rows whose weight can be non-zero ([`ScoreKind::weights`]).
    pub fn first_row(self, sq: usize) -> usize {
        match self {
            ScoreKind::H2o | ScoreKind::A2sf(_) => 0,
            ScoreKind::Tova => sq.saturating_sub(1),
            ScoreKind::SnapKv(w) => sq.saturating_sub(w.max(1)),
        }
    }

    /// The factor a chunk of `sq` query rows applies to the running scores before adding its
    /// own ([`ScoreKind::weights`]).
    pub fn decay(self, sq: usize) -> f64 {
        match self {
            ScoreKind::H2o => 1.0,
            ScoreKind::A2sf(f) => (f as f64).powi(sq.min(i32::MAX as usize) as i32),
            ScoreKind::Tova | ScoreKind::SnapKv(_) => 0.0,
        }
    }

    /// `(decay, w)` of a chunk of `sq` query rows.
    pub fn weights(self, sq: usize) -> (f64, Vec<f64>) {
        let decay = self.decay(sq);
        match self {
            ScoreKind::H2o => (decay, vec![1.0; sq]),
            ScoreKind::A2sf(f) => {
                let f = f as f64;
                (
                    decay,
                    (0..sq).map(|q| f.powi((sq - 1 - q) as i32)).collect(),
                )
            }
            ScoreKind::Tova => (decay, (0..sq).map(|q| f64::from(q + 1 == sq)).collect()),
            ScoreKind::SnapKv(w) => (
                decay,
                (0..sq).map(|q| f64::from(q + w.max(1) >= sq)).collect(),
            ),
        }
    }
}

/// The logit rule of the attention being observed.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ScoreParams {
    /// Multiplier of q.k (default 1/sqrt(D)).
    pub scale: Option<f32>,
    /// Logit soft-cap c: s -> c tanh(s / c).
    pub softcap: Option<f32>,
    pub reduce: Reduce,
}

/// What one fold reads: the queries `[1, Sq, Hq, D]` (the last Sq positions of the sequence),
/// the attention's LSE `[Hq, Sq]` (natural log) and the mask it ran under (`None` = every pair).
#[derive(Clone, Copy)]
pub struct Observation<'a> {
    pub q: &'a TensorView<'a>,
    pub lse: &'a [f32],
    pub mask: Option<&'a MaskExpr>,
    /// The keys each query attended besides the mask, `select(query head, row, position)`
    /// (Quest's pages; `None`: every key the mask allows). Keys it leaves out score 0 for that
    /// row, as a kernel that attends only the selection would report them.
    pub select: Option<&'a (dyn Fn(usize, usize, usize) -> bool + Sync)>,
}

fn check(cache: &PagedKvCache, id: SeqId, layer: usize, obs: &Observation) -> Result<usize> {
    let c = cache.config();
    let [b, sq, hq, d] = obs.q.shape;
    let len = cache.len(id)?;
    if b != 1 || d != c.head_dim || sq > len || hq == 0 || !hq.is_multiple_of(c.kv_heads) {
        return Err(Error::Shape {
            op: "kv scores",
            tensor: "q".into(),
            got: obs.q.shape.to_vec(),
            expected: format!(
                "[1, Sq <= {len}, Hq (a multiple of the {} KV heads), {}]",
                c.kv_heads, c.head_dim
            ),
        });
    }
    if obs.lse.len() != hq * sq {
        return Err(Error::Shape {
            op: "kv scores",
            tensor: "lse".into(),
            got: vec![obs.lse.len()],
            expected: format!("[{hq}, {sq}] (Hq x Sq of q)"),
        });
    }
    if layer >= c.layers {
        return Err(param(format!(
            "layer {layer} outside the cache's {}",
            c.layers
        )));
    }
    Ok(len)
}

/// [`check`], one weight per query row in `w`, and the mask bound to (Sq, the cached length):
/// what [`column_scores`] and its reference share.
fn prepare(
    cache: &PagedKvCache,
    id: SeqId,
    layer: usize,
    obs: &Observation,
    w: &[f64],
) -> Result<(usize, Option<BoundMask>)> {
    let len = check(cache, id, layer, obs)?;
    let sq = obs.q.shape[1];
    if w.len() != sq {
        return Err(param(format!("{} weights for {sq} query rows", w.len())));
    }
    let bound = obs
        .mask
        .map(|e| {
            e.bind(
                MaskShape {
                    batch: 1,
                    sq,
                    sk: len,
                },
                None,
            )
        })
        .transpose()?;
    Ok((len, bound))
}

/// The weighted column sums `c[j] = R_h sum_q w_q P_h[q, j]` of every KV head of one layer, one
/// value per entry the head holds (`[Hk][head_len]`). `w` has one weight per query row.
pub fn column_scores(
    cache: &PagedKvCache,
    id: SeqId,
    layer: usize,
    obs: &Observation,
    w: &[f64],
    params: &ScoreParams,
) -> Result<Vec<Vec<f32>>> {
    let (len, bound) = prepare(cache, id, layer, obs, w)?;
    let c = cache.config();
    let [_, sq, hq, d] = obs.q.shape;
    let (hk, g) = (c.kv_heads, hq / c.kv_heads);
    let scale = params.scale.unwrap_or(1.0 / (d as f32).sqrt());
    let heads: Vec<(Vec<f32>, Vec<u32>)> = (0..hk)
        .map(|kh| cache.gather_head(id, layer, kh).map(|(k, _, pos)| (k, pos)))
        .collect::<Result<_>>()?;
    let rows: Vec<usize> = (0..sq).filter(|&i| w[i] != 0.0).collect();
    // One task per (KV head, query head): c_h[j] = sum_q w_q exp(s - lse), f32 logits, f64 sums.
    let per_head: Vec<Vec<f64>> = (0..hk * g)
        .into_par_iter()
        .map(|t| {
            let (kh, h) = (t / g, t);
            let (k, pos) = &heads[kh];
            let n = pos.len();
            let mut col = vec![0.0f64; n];
            // The rows' dot products with every entry in one product (`gemm`):
            // dots[r][j] = q_{rows[r]} . k_j.
            let qm: Vec<f32> = rows
                .iter()
                .flat_map(|&i| (0..d).map(move |x| obs.q.get(0, i, h, x)))
                .collect();
            let mut dots = vec![0.0f32; rows.len() * n];
            crate::cpu::gemm::gemm_abt(&mut dots, &qm, k, (rows.len(), n, d));
            // The mask's row over every position (64 per word), read at the entries' positions.
            let mut bits = vec![u64::MAX; len.div_ceil(64)];
            for (r, &i) in rows.iter().enumerate() {
                let l = obs.lse[h * sq + i];
                if l == f32::NEG_INFINITY {
                    continue; // the row attended nothing
                }
                if let Some(m) = &bound {
                    m.row_bits(0, 0, i, 0, &mut bits);
                }
                for (j, cj) in col.iter_mut().enumerate() {
                    let p = pos[j] as usize;
                    if bits[p / 64] >> (p % 64) & 1 == 0 {
                        continue;
                    }
                    if obs.select.is_some_and(|f| !f(h, i, pos[j] as usize)) {
                        continue;
                    }
                    let dot = dots[r * n + j];
                    let s = match params.softcap {
                        Some(cap) => cap * (scale * dot / cap).tanh(),
                        None => scale * dot,
                    };
                    *cj += w[i] * ((s - l) as f64).exp();
                }
            }
            col
        })
        .collect();
    Ok((0..hk)
        .map(|kh| {
            let n = heads[kh].1.len();
            (0..n)
                .map(|j| {
                    params
                        .reduce
                        .apply((0..g).map(|gi| per_head[kh * g + gi][j]), g)
                        as f32
                })
                .collect()
        })
        .collect())
}

/// The plain reference of [`column_scores`]: every probability from the definition in f64
/// (`P = exp(s - log sum_j' exp(s_j'))` over the row's allowed entries; `obs.lse` is not read).
pub fn column_scores_reference(
    cache: &PagedKvCache,
    id: SeqId,
    layer: usize,
    obs: &Observation,
    w: &[f64],
    params: &ScoreParams,
) -> Result<Vec<Vec<f64>>> {
    let (_, bound) = prepare(cache, id, layer, obs, w)?;
    let c = cache.config();
    let [_, sq, hq, d] = obs.q.shape;
    let (hk, g) = (c.kv_heads, hq / c.kv_heads);
    let scale = params.scale.unwrap_or(1.0 / (d as f32).sqrt()) as f64;
    let mut out = Vec::with_capacity(hk);
    for kh in 0..hk {
        let (k, _, pos) = cache.gather_head(id, layer, kh)?;
        let n = pos.len();
        let mut cols = vec![vec![0.0f64; n]; g];
        for (gi, col) in cols.iter_mut().enumerate() {
            let h = kh * g + gi;
            for (i, &wi) in w.iter().enumerate().take(sq) {
                let allowed: Vec<usize> = (0..n)
                    .filter(|&j| {
                        bound
                            .as_ref()
                            .is_none_or(|m| m.allowed(0, i, pos[j] as usize))
                            && obs.select.is_none_or(|f| f(h, i, pos[j] as usize))
                    })
                    .collect();
                if allowed.is_empty() {
                    continue;
                }
                let s: Vec<f64> = allowed
                    .iter()
                    .map(|&j| {
                        let dot: f64 = (0..d)
                            .map(|x| obs.q.get(0, i, h, x) as f64 * k[j * d + x] as f64)
                            .sum();
                        match params.softcap {
                            Some(cap) => cap as f64 * (scale * dot / cap as f64).tanh(),
                            None => scale * dot,
                        }
                    })
                    .collect();
                let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let lse = m + s.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
                for (&j, &sj) in allowed.iter().zip(&s) {
                    col[j] += wi * (sj - lse).exp();
                }
            }
        }
        out.push(
            (0..n)
                .map(|j| params.reduce.apply(cols.iter().map(|c| c[j]), g))
                .collect(),
        );
    }
    Ok(out)
}

/// Running scores of one sequence: `[layer * Hk + KV head]`, one per entry the head held at the
/// last fold (entries appended since then count as 0 until the next fold).
#[derive(Clone, Debug, PartialEq)]
pub struct KvScores {
    pub kind: ScoreKind,
    pub params: ScoreParams,
    kv_heads: usize,
    pub scores: Vec<Vec<f32>>,
}

impl KvScores {
    /// Empty scores for a cache's layers and KV heads.
    pub fn new(cache: &PagedKvCache, kind: ScoreKind, params: ScoreParams) -> Result<KvScores> {
        kind.check()?;
        let c = cache.config();
        Ok(KvScores {
            kind,
            params,
            kv_heads: c.kv_heads,
            scores: vec![Vec::new(); c.layers * c.kv_heads],
        })
    }

    /// The scores of (layer, KV head).
    pub fn head(&self, layer: usize, kh: usize) -> &[f32] {
        &self.scores[layer * self.kv_heads + kh]
    }

    /// Folds the attention of one chunk of queries (a decode step: Sq = 1) of one layer:
    /// `score = decay * score + c` (see the module documentation).
    pub fn observe(
        &mut self,
        cache: &PagedKvCache,
        id: SeqId,
        layer: usize,
        obs: &Observation,
    ) -> Result<()> {
        let sq = obs.q.shape[1];
        let (decay, w) = self.kind.weights(sq);
        let cols = column_scores(cache, id, layer, obs, &w, &self.params)?;
        for (kh, col) in cols.into_iter().enumerate() {
            let s = &mut self.scores[layer * self.kv_heads + kh];
            if s.len() > col.len() {
                return Err(param(format!(
                    "layer {layer} KV head {kh}: {} scores for {} entries (the cache was compressed without its scores)",
                    s.len(),
                    col.len()
                )));
            }
            s.resize(col.len(), 0.0);
            for (x, cj) in s.iter_mut().zip(col) {
                *x = (decay * *x as f64) as f32 + cj;
            }
        }
        Ok(())
    }

    /// Keeps the scores of entries `keep` of (layer, KV head), in order (as
    /// [`PagedKvCache::compress`] keeps the entries).
    pub fn compact(&mut self, layer: usize, kh: usize, keep: &[usize]) {
        let s = &mut self.scores[layer * self.kv_heads + kh];
        let kept: Vec<f32> = keep
            .iter()
            .map(|&e| s.get(e).copied().unwrap_or(0.0))
            .collect();
        *s = kept;
    }
}

#[cfg(test)]
#[path = "score_tests.rs"]
mod tests;
