//! Head roles for DuoAttention / RazorAttention, found training-free: retrieval heads keep every
//! entry, streaming heads keep the sinks and a window (`duo(sinks=S,window=W,...)`, see
//! [`super::press`]).
//!
//! The probe is a copy / induction test: a prefix, then R random tokens, then the same R tokens
//! again. A head that retrieves from the context attends, at the i-th token of the second copy
//! (position `a + R + i`, `a` = prefix length), to the same token in the first copy (position
//! `a + i`, the echo) or to the token that followed it (`a + i + 1`, the induction target). The
//! retrieval score of query head h is the mean over the second copy's rows of that mass,
//!
//!   `score_h = (1 / R) sum_i (P_h[a + R + i, a + i] + P_h[a + R + i, a + i + 1])`, in [0, 1],
//!
//! with `P[r, j] = exp(scale q_r . k_j - lse_r)` the attention probability (the kernel's own LSE;
//! the plain reference recomputes every row's softmax in f64). A KV head's score is the maximum
//! over its group's query heads (a KV head read by one retrieval head must keep its entries).
//! The heads above a threshold, or the top fraction, are retrieval heads ([`RoleSelect`]).
use std::sync::Mutex;

use crate::attention::AttnOutput;
use crate::error::{Error, Result};
use crate::kv::{PagedKvCache, SeqId};
use crate::model::{Attention, LayerAttn, MaskedAttention, Model};
use crate::tensor::TensorView;

const OP: &str = "kv roles";

fn err(msg: String) -> Error {
    Error::Param { op: OP, msg }
}

/// How retrieval heads are chosen from the scores.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RoleSelect {
    /// The top `ceil(f n)` of the n KV heads by score (equal scores: the lower index first).
    Ratio(f64),
    /// Every KV head whose score is at least the threshold.
    Threshold(f64),
}

impl RoleSelect {
    pub fn check(&self) -> Result<()> {
        match *self {
            RoleSelect::Ratio(f) if !(0.0..=1.0).contains(&f) => {
                Err(err(format!("ratio {f} outside [0, 1]")))
            }
            RoleSelect::Threshold(t) if !t.is_finite() => {
                Err(err(format!("threshold {t} is not finite")))
            }
            _ => Ok(()),
        }
    }
}

impl std::fmt::Display for RoleSelect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RoleSelect::Ratio(r) => write!(f, "ratio={r}"),
            RoleSelect::Threshold(t) => write!(f, "threshold={t}"),
        }
    }
}

/// The role table of one model: per `[layer][KV head]` the retrieval score and the role.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HeadRoles {
    pub layers: usize,
    pub kv_heads: usize,
    /// `[layer][KV head]` retrieval score (module documentation).
    pub scores: Vec<Vec<f64>>,
    /// `[layer][KV head]`: true for a retrieval head (keeps everything).
    pub retrieval: Vec<Vec<bool>>,
    /// How the roles were chosen (`ratio=F` or `threshold=T`).
    pub select: String,
    /// The probe: prefix length and copy length.
    pub prefix: usize,
    pub copy_len: usize,
}

impl HeadRoles {
    /// Roles from scores `[layer][KV head]` under `select`.
    pub fn from_scores(
        scores: Vec<Vec<f64>>,
        select: RoleSelect,
        prefix: usize,
        copy_len: usize,
    ) -> Result<HeadRoles> {
        select.check()?;
        let layers = scores.len();
        let kv_heads = scores.first().map_or(0, |r| r.len());
        if layers == 0 || kv_heads == 0 || scores.iter().any(|r| r.len() != kv_heads) {
            return Err(err(
                "scores must be a non-empty table with as many KV heads in every layer".into(),
            ));
        }
        if let Some(x) = scores.iter().flatten().find(|x| !x.is_finite()) {
            return Err(err(format!("score {x} is not finite")));
        }
        let flat: Vec<f64> = scores.iter().flatten().copied().collect();
        let chosen: Vec<bool> = match select {
            RoleSelect::Threshold(t) => flat.iter().map(|&s| s >= t).collect(),
            RoleSelect::Ratio(f) => {
                let n = (f * flat.len() as f64).ceil() as usize;
                let mut idx: Vec<usize> = (0..flat.len()).collect();
                idx.sort_by(|&a, &b| flat[b].total_cmp(&flat[a]).then(a.cmp(&b)));
                let mut c = vec![false; flat.len()];
                for &i in &idx[..n.min(flat.len())] {
                    c[i] = true;
                }
                c
            }
        };
        Ok(HeadRoles {
            layers,
            kv_heads,
            retrieval: chosen.chunks(kv_heads).map(|c| c.to_vec()).collect(),
            scores,
            select: select.to_string(),
            prefix,
            copy_len,
        })
    }

    /// The same scores with the roles chosen again.
    pub fn reselect(&self, select: RoleSelect) -> Result<HeadRoles> {
        HeadRoles::from_scores(self.scores.clone(), select, self.prefix, self.copy_len)
    }

    /// Checks the table's shape against a cache of `layers` x `kv_heads` (and its own fields,
    /// for a table read from a file).
    pub fn check(&self, layers: usize, kv_heads: usize) -> Result<()> {
        if self.layers != layers || self.kv_heads != kv_heads {
            return Err(err(format!(
                "the role table is for {} layers x {} KV heads, the model has {layers} x {kv_heads}",
                self.layers, self.kv_heads
            )));
        }
        let shaped = |n: usize| n == layers;
        if !shaped(self.scores.len())
            || !shaped(self.retrieval.len())
            || self.scores.iter().any(|r| r.len() != kv_heads)
            || self.retrieval.iter().any(|r| r.len() != kv_heads)
        {
            return Err(err(format!(
                "the role table's scores / retrieval are not {layers} x {kv_heads}"
            )));
        }
        Ok(())
    }

    /// Whether (layer, KV head) is a retrieval head.
    pub fn is_retrieval(&self, layer: usize, kh: usize) -> bool {
        self.retrieval[layer][kh]
    }

    /// Retrieval heads / all heads.
    pub fn retrieval_fraction(&self) -> f64 {
        let n = self.retrieval.iter().flatten().filter(|&&r| r).count();
        n as f64 / (self.layers * self.kv_heads).max(1) as f64
    }
}

/// The probe positions: rows `a + R + i` and their echo / induction columns.
fn check_probe(len: usize, sq: usize, prefix: usize, copy_len: usize) -> Result<()> {
    if copy_len < 2 {
        return Err(err(format!("copy length {copy_len} must be >= 2")));
    }
    if len != prefix + 2 * copy_len || sq != len {
        return Err(err(format!(
            "the probe needs the whole sequence (prefix {prefix} + 2 x {copy_len}) in one chunk, got {sq} queries over {len} positions"
        )));
    }
    Ok(())
}

/// Retrieval scores of one layer from the kernel's LSE (fast path): per KV head the maximum over
/// its query heads of the mean echo + induction probability. `q` `[1, len, Hq, D]` is the whole
/// probe sequence, `lse` `[1, Hq, len]`. The head must hold every position.
#[allow(clippy::too_many_arguments)]
pub fn retrieval_scores(
    cache: &PagedKvCache,
    seq: SeqId,
    layer: usize,
    q: &TensorView,
    lse: &[f32],
    scale: f32,
    prefix: usize,
    copy_len: usize,
) -> Result<Vec<f64>> {
    let c = cache.config();
    let (len, hq, d) = (cache.len(seq)?, q.heads(), q.dim());
    check_probe(len, q.seq(), prefix, copy_len)?;
    let g = hq / c.kv_heads;
    let mut out = Vec::with_capacity(c.kv_heads);
    for kh in 0..c.kv_heads {
        let (k, _, pos) = cache.gather_head(seq, layer, kh)?;
        if pos.len() != len {
            return Err(err(format!(
                "layer {layer} KV head {kh} holds {} of {len} positions (probe an uncompressed cache)",
                pos.len()
            )));
        }
        let mut best = 0.0f64;
        for h in kh * g..(kh + 1) * g {
            let mut sum = 0.0f64;
            for i in 0..copy_len {
                let r = prefix + copy_len + i;
                let l = lse[h * len + r];
                for j in [prefix + i, prefix + i + 1] {
                    let dot: f32 = (0..d).map(|x| q.get(0, r, h, x) * k[j * d + x]).sum();
                    sum += ((scale * dot - l) as f64).exp();
                }
            }
            best = best.max(sum / copy_len as f64);
        }
        out.push(best);
    }
    Ok(out)
}

/// Plain reference of [`retrieval_scores`]: every row's causal softmax in f64.
pub fn retrieval_scores_reference(
    cache: &PagedKvCache,
    seq: SeqId,
    layer: usize,
    q: &TensorView,
    scale: f32,
    prefix: usize,
    copy_len: usize,
) -> Result<Vec<f64>> {
    let c = cache.config();
    let (len, hq, d) = (cache.len(seq)?, q.heads(), q.dim());
    check_probe(len, q.seq(), prefix, copy_len)?;
    let g = hq / c.kv_heads;
    let mut out = Vec::new();
    for kh in 0..c.kv_heads {
        let (k, _, _) = cache.gather_head(seq, layer, kh)?;
        let mut per_head = Vec::new();
        for h in kh * g..(kh + 1) * g {
            let mut sum = 0.0f64;
            for i in 0..copy_len {
                let r = prefix + copy_len + i;
                let s: Vec<f64> = (0..=r)
                    .map(|j| {
                        scale as f64
                            * (0..d)
                                .map(|x| q.get(0, r, h, x) as f64 * k[j * d + x] as f64)
                                .sum::<f64>()
                    })
                    .collect();
                let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                sum += ((s[prefix + i] - m).exp() + (s[prefix + i + 1] - m).exp()) / z;
            }
            per_head.push(sum / copy_len as f64);
        }
        out.push(per_head.into_iter().fold(0.0, f64::max));
    }
    Ok(out)
}

/// Causal attention that records each layer's retrieval scores (the probe's forward).
struct ProbeAttention {
    inner: MaskedAttention,
    prefix: usize,
    copy_len: usize,
    scores: Mutex<Vec<Option<Vec<f64>>>>,
}

impl Attention for ProbeAttention {
    fn spec(&self) -> String {
        format!("{} (head role probe)", self.inner.spec())
    }
    fn attend(
        &self,
        cache: &PagedKvCache,
        seq: SeqId,
        q: &TensorView,
        layer: &LayerAttn,
    ) -> Result<AttnOutput> {
        let out = self.inner.attend(cache, seq, q, layer)?;
        let s = retrieval_scores(
            cache,
            seq,
            layer.layer,
            q,
            &out.lse,
            layer.scale,
            self.prefix,
            self.copy_len,
        )?;
        let mut g = self.scores.lock().unwrap_or_else(|e| e.into_inner());
        g[layer.layer] = Some(s);
        Ok(out)
    }
}

/// The probe's token sequence: `prefix`, then `copy_len` random ids in `[lo, vocab)` (seeded),
/// twice. `lo` keeps clear of the special tokens at the low ids of most vocabularies.
pub fn probe_tokens(prefix: &[u32], copy_len: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let lo = if vocab > 1000 { 256 } else { 0 };
    let mut rng = crate::testing::Rng::new(seed);
    let r: Vec<u32> = (0..copy_len)
        .map(|_| (lo + rng.below(vocab - lo)) as u32)
        .collect();
    [prefix, &r[..], &r[..]].concat()
}

/// Runs the copy / induction probe on `model` (one forward of `prefix + 2 copy_len` tokens under
/// causal attention) and chooses the roles with `select`.
pub fn probe(
    model: &Model,
    prefix: &[u32],
    copy_len: usize,
    seed: u64,
    select: RoleSelect,
) -> Result<HeadRoles> {
    select.check()?;
    if copy_len < 2 {
        return Err(err(format!("copy length {copy_len} must be >= 2")));
    }
    let toks = probe_tokens(prefix, copy_len, model.cfg.vocab, seed);
    let attn = ProbeAttention {
        inner: MaskedAttention::new("causal")?,
        prefix: prefix.len(),
        copy_len,
        scores: Mutex::new(vec![None; model.cfg.layers]),
    };
    let mut cache = model.new_cache(64)?;
    let seq = cache.add_sequence();
    model.forward(&mut cache, seq, &toks, &attn, None)?;
    let scores = attn
        .scores
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .into_iter()
        .enumerate()
        .map(|(l, s)| s.ok_or_else(|| err(format!("the probe saw no attention in layer {l}"))))
        .collect::<Result<Vec<_>>>()?;
    HeadRoles::from_scores(scores, select, prefix.len(), copy_len)
}

#[cfg(test)]
#[path = "roles_tests.rs"]
mod tests;
