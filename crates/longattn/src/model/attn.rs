//! How a model layer attends: a trait so later methods (sparse prefill, KV compression) plug in.
//!
//! - [`ExactAttention`] (`--attention exact`): plain reference attention (f32 dot products, f64
//!   softmax), no tiling, no schedule: the model's own causal (and sliding-window) mask only.
//! - [`MaskedAttention`] (`--attention 'causal & window(256,0)'`): the fast kernel through the
//!   paged cache under a mask expression applied in every layer (intersected with the model's own
//!   sliding window on the layers that have one).
//! - [`SparseAttention`] (`--attention 'topmass(gamma=0.9)'`, any [`SparseSpec`]): dynamic
//!   sparse prefill on all or chosen layers (`model/sparse.rs`).
use crate::attention::{AttnOutput, AttnParams};
use crate::error::{Error, Result};
use crate::kv::{PagedKvCache, SeqId};
use crate::mask::MaskExpr;
use crate::sparse::SparseSpec;
use crate::tensor::{Buffer, Tensor, TensorView};
use rayon::prelude::*;

use super::sparse::{SparseAttention, SparseOptions, SparseStats};

/// What the model tells the attention about one layer.
#[derive(Clone, Copy, Debug)]
pub struct LayerAttn {
    pub layer: usize,
    /// Multiplier of q.k.
    pub scale: f32,
    /// The architecture's sliding window (keys per query, the query included) on this layer.
    pub window: Option<usize>,
}

/// One attention method: queries `q` `[1, Sq, Hq, D]` are the last Sq positions already written
/// to the cache; returns output `[1, Sq, Hq, Dv]` (f32) and LSE `[1, Hq, Sq]`.
pub trait Attention: Send + Sync {
    /// The spec text this method was built from (reported in results).
    fn spec(&self) -> String;
    fn attend(
        &self,
        cache: &PagedKvCache,
        seq: SeqId,
        q: &TensorView,
        layer: &LayerAttn,
    ) -> Result<AttnOutput>;
    /// What a sparse method selected so far (density, mass recall); `None` for dense methods.
    fn sparse_stats(&self) -> Option<SparseStats> {
        None
    }
    /// Whether this attention removes cache entries itself (a press, whose scores follow the
    /// entries): [`super::Model::generate`] then leaves the cache to it.
    fn evicts(&self) -> bool {
        false
    }
}

/// Builds the method named by a spec: `exact`, a sparse spec (all layers, no recall), or a mask
/// expression.
pub fn from_spec(spec: &str) -> Result<Box<dyn Attention>> {
    from_spec_with(spec, None)
}

/// As [`from_spec`]; `sparse` sets the options of a sparse spec and is an error with any other.
pub fn from_spec_with(spec: &str, sparse: Option<SparseOptions>) -> Result<Box<dyn Attention>> {
    if SparseSpec::names_a_method(spec) {
        let s = SparseSpec::parse(spec)?;
        return Ok(Box::new(SparseAttention::new(
            s,
            sparse.unwrap_or_default(),
        )?));
    }
    if sparse.is_some() {
        return Err(Error::Param {
            op: "model attention",
            msg: format!(
                "sparse options (layers, recall) need a sparse spec, `{}` is not one",
                spec.trim()
            ),
        });
    }
    if spec.trim() == "exact" {
        return Ok(Box::new(ExactAttention));
    }
    Ok(Box::new(MaskedAttention::new(spec)?))
}

/// Plain reference attention on contiguous K/V gathered from the cache.
pub struct ExactAttention;

impl Attention for ExactAttention {
    fn spec(&self) -> String {
        "exact".into()
    }
    fn attend(
        &self,
        cache: &PagedKvCache,
        seq: SeqId,
        q: &TensorView,
        layer: &LayerAttn,
    ) -> Result<AttnOutput> {
        let c = cache.config();
        let (k, v) = cache.gather(seq, layer.layer)?;
        let qd = q.typed::<f32>().ok_or_else(|| Error::DType {
            op: "exact attention",
            tensor: "q".into(),
            got: q.dtype().to_string(),
            expected: "f32".into(),
        })?;
        let [_, sq, hq, d] = q.shape;
        let sk = k.len() / (c.kv_heads * c.head_dim);
        let (out, lse) = plain_attention(
            &qd[..sq * hq * d],
            sq,
            hq,
            &k,
            &v,
            sk,
            c.kv_heads,
            d,
            c.v_dim,
            layer.scale,
            layer.window,
        );
        Ok(AttnOutput {
            out: Tensor::new(Buffer::F32(out), vec![1, sq, hq, c.v_dim])?,
            lse,
        })
    }
}

/// Causal attention written from the definition. Query row i sits at position p = i + Sk - Sq;
/// it attends keys j with p - (W - 1) <= j <= p (W = window, or all j <= p):
///   s_j = scale q.k_j (f32 dot), lse = log sum_j exp(s_j) (f64), o = sum_j exp(s_j - lse) v_j.
/// q `[Sq, Hq, D]`, k `[Sk, Hk, D]`, v `[Sk, Hk, Dv]`; returns o `[Sq, Hq, Dv]`, lse `[Hq, Sq]`.
#[allow(clippy::too_many_arguments)]
pub fn plain_attention(
    q: &[f32],
    sq: usize,
    hq: usize,
    k: &[f32],
    v: &[f32],
    sk: usize,
    hk: usize,
    d: usize,
    dv: usize,
    scale: f32,
    window: Option<usize>,
) -> (Vec<f32>, Vec<f32>) {
    let group = hq / hk;
    // One task per (query row, head): (output row, lse).
    let rows: Vec<(Vec<f32>, f32)> = (0..sq * hq)
        .into_par_iter()
        .map(|r| {
            let (i, h) = (r / hq, r % hq);
            let g = h / group;
            let p = i + sk - sq;
            let j0 = window.map_or(0, |w| (p + 1).saturating_sub(w));
            let qi = &q[(i * hq + h) * d..][..d];
            let s: Vec<f64> = (j0..=p)
                .map(|j| {
                    let kj = &k[(j * hk + g) * d..][..d];
                    scale as f64 * qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() as f64
                })
                .collect();
            let m = s.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
            let lse = m + s.iter().map(|&x| (x - m).exp()).sum::<f64>().ln();
            let mut o = vec![0.0f64; dv];
            for (t, &sj) in s.iter().enumerate() {
                let w = (sj - lse).exp();
                let vj = &v[((j0 + t) * hk + g) * dv..][..dv];
                for (a, &b) in o.iter_mut().zip(vj) {
                    *a += w * b as f64;
                }
            }
            (o.into_iter().map(|x| x as f32).collect(), lse as f32)
        })
        .collect();
    let mut out = Vec::with_capacity(sq * hq * dv);
    let mut lse = vec![0.0f32; hq * sq];
    for (r, (o, l)) in rows.into_iter().enumerate() {
        out.extend(o);
        lse[(r % hq) * sq + r / hq] = l;
    }
    (out, lse)
}

/// The fast kernel under a mask expression, through the paged cache.
pub struct MaskedAttention {
    text: String,
    expr: MaskExpr,
    /// `(expr) & window(W-1, 0)` per model window W seen so far (parsed once).
    local: std::sync::Mutex<Vec<(usize, MaskExpr)>>,
}

impl MaskedAttention {
    pub fn new(spec: &str) -> Result<Self> {
        let expr = MaskExpr::parse(spec)?;
        if expr.uses_documents() {
            return Err(Error::Param {
                op: "model attention",
                msg: format!("mask `{spec}` uses `document`, which a single text has no ids for"),
            });
        }
        Ok(MaskedAttention {
            text: spec.trim().to_string(),
            expr,
            local: Default::default(),
        })
    }
    /// The expression for a layer with the model's sliding window `window` (keys per query).
    pub fn expr_for(&self, window: Option<usize>) -> Result<MaskExpr> {
        let Some(w) = window else {
            return Ok(self.expr.clone());
        };
        let mut local = self.local.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, e)) = local.iter().find(|(x, _)| *x == w) {
            return Ok(e.clone());
        }
        let e = MaskExpr::parse(&format!("({}) & window({},0)", self.expr, w.max(1) - 1))?;
        local.push((w, e.clone()));
        Ok(e)
    }
}

impl Attention for MaskedAttention {
    fn spec(&self) -> String {
        self.text.clone()
    }
    fn attend(
        &self,
        cache: &PagedKvCache,
        seq: SeqId,
        q: &TensorView,
        layer: &LayerAttn,
    ) -> Result<AttnOutput> {
        let expr = self.expr_for(layer.window)?;
        let params = AttnParams {
            scale: Some(layer.scale),
            ..Default::default()
        };
        cache.attend(seq, layer.layer, q, Some(&expr), &params)
    }
}
