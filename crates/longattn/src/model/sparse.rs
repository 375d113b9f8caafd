//! Dynamic sparse prefill in a real model (`--attention SPEC` with a [`SparseSpec`]).
//!
//! One path: a chosen layer's prefill call gathers its keys and values from the paged cache,
//! selects with [`crate::sparse::select`] under the model's own mask (causal, intersected with
//! the layer's sliding window where it has one) and runs [`crate::forward`] through
//! [`Selection::mask`](crate::sparse::Selection::mask). There is no private kernel.
//!
//! Dense (the model's mask through the cache, as [`MaskedAttention`] with `causal`):
//! - layers not chosen (`SparseOptions::layers`);
//! - decode steps (one query row: prefill is what the selection is for);
//! - prefill calls with fewer keys than the spec's `dense_below` (the selector's own fallback;
//!   counted as density 1 in the statistics).
//!
//! Statistics ([`SparseStats`], per layer and query head, summed over every prefill call):
//! allowed pairs inside the selection and under the mask (density = their ratio), and on request
//! the attention mass recall of every row, sum_{j selected} p_ij = exp(LSE_sel - LSE_mask)
//! (p the softmax over the mask's keys), from the LSEs of the selected forward and of one extra
//! dense forward through the same kernel; beside it the recall of the best selection with as
//! many tiles in every query tile ([`sparse::best_recall`], the tiles of most exact mass). The
//! recall is that of the sparse run: each layer sees the hidden states that the sparse layers
//! before it produced.
use super::attn::{Attention, LayerAttn, MaskedAttention};
use crate::attention::{AttnOutput, AttnParams, MaskSpec};
use crate::error::{Error, Result};
use crate::kv::{PagedKvCache, SeqId};
use crate::mask::MaskShape;
use crate::sparse::{self, SparseSpec};
use crate::tensor::TensorView;
use std::sync::Mutex;
use std::time::Instant;

/// Where and what the sparse attention applies and measures.
#[derive(Clone, Debug, Default)]
pub struct SparseOptions {
    /// Layers whose prefill is sparse (`None`: every layer).
    pub layers: Option<Vec<usize>>,
    /// Measure the mass recall of every row (one extra dense forward per sparse call).
    pub recall: bool,
}

/// Statistics of one layer, per query head, over all prefill calls.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LayerStats {
    pub layer: usize,
    /// Prefill calls that selected.
    pub calls: usize,
    /// Prefill calls that fell back to dense (fewer keys than `dense_below`).
    pub fallbacks: usize,
    /// Allowed pairs inside the selection, per query head.
    pub selected: Vec<u64>,
    /// Allowed pairs of the mask, per query head.
    pub allowed: Vec<u64>,
    /// Sum over rows of exp(LSE_sel - LSE_mask), per query head (with `recall`).
    pub recall_sum: Vec<f64>,
    /// Rows summed in `recall_sum` (rows the mask leaves non-empty), per query head.
    pub recall_rows: Vec<u64>,
    /// The same sum for the best selection with as many tiles per query tile
    /// ([`sparse::best_recall`]), per query head (with `recall`; empty for element-level
    /// selections, whose equal size is a pair count, not a tile count).
    pub best_sum: Vec<f64>,
}

impl LayerStats {
    /// Selected / allowed pairs over the heads of this layer (1 when nothing was allowed).
    pub fn density(&self) -> f64 {
        ratio(self.selected.iter().sum(), self.allowed.iter().sum())
    }
    /// Mass recall of every query head (mean over rows), if measured.
    pub fn head_recall(&self) -> Option<Vec<f64>> {
        self.per_row(&self.recall_sum)
    }
    /// Mass recall of the best selection of equal size per query tile, per head, if measured.
    pub fn head_best_recall(&self) -> Option<Vec<f64>> {
        self.per_row(&self.best_sum)
    }
    fn per_row(&self, sums: &[f64]) -> Option<Vec<f64>> {
        let measured = !self.recall_rows.is_empty() && sums.len() == self.recall_rows.len();
        (measured && self.recall_rows.iter().all(|&n| n > 0)).then(|| {
            sums.iter()
                .zip(&self.recall_rows)
                .map(|(s, &n)| s / n as f64)
                .collect()
        })
    }
}

/// Statistics of the sparse layers (those that saw a prefill call), in layer order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SparseStats {
    pub spec: String,
    pub layers: Vec<LayerStats>,
    /// Seconds in `sparse::select` and in the attention forward of the sparse layers.
    pub select_seconds: f64,
    pub attend_seconds: f64,
}

impl SparseStats {
    /// Selected / allowed pairs over every sparse layer and head.
    pub fn density(&self) -> f64 {
        let s = self.layers.iter().flat_map(|l| &l.selected).sum();
        ratio(s, self.layers.iter().flat_map(|l| &l.allowed).sum())
    }
    /// Mean and worst mass recall over the (layer, head) pairs, if measured.
    pub fn recall(&self) -> Option<(f64, f64)> {
        self.mean_worst(LayerStats::head_recall)
    }
    /// Mean and worst recall of the best selections of equal size, if measured.
    pub fn best_recall(&self) -> Option<(f64, f64)> {
        self.mean_worst(LayerStats::head_best_recall)
    }
    fn mean_worst(&self, f: fn(&LayerStats) -> Option<Vec<f64>>) -> Option<(f64, f64)> {
        let all: Vec<f64> = self
            .layers
            .iter()
            .map(f)
            .collect::<Option<Vec<_>>>()?
            .into_iter()
            .flatten()
            .collect();
        if all.is_empty() {
            return None;
        }
        let worst = all.iter().copied().fold(f64::INFINITY, f64::min);
        Some((all.iter().sum::<f64>() / all.len() as f64, worst))
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        1.0
    } else {
        a as f64 / b as f64
    }
}

/// The sparse attention method of a model: see the module header.
pub struct SparseAttention {
    spec: SparseSpec,
    opts: SparseOptions,
    /// The model's own mask (and the dense path): `causal`, with the layer's window.
    dense: MaskedAttention,
    stats: Mutex<SparseStats>,
}

impl SparseAttention {
    pub fn new(spec: SparseSpec, opts: SparseOptions) -> Result<Self> {
        spec.check()?;
        Ok(SparseAttention {
            stats: Mutex::new(SparseStats {
                spec: spec.to_string(),
                ..Default::default()
            }),
            spec,
            opts,
            dense: MaskedAttention::new("causal")?,
        })
    }

    /// Errors when a chosen layer is not one of the model's `n` layers.
    pub fn check_layers(&self, n: usize) -> Result<()> {
        match self.opts.layers.iter().flatten().find(|&&l| l >= n) {
            Some(l) => Err(Error::Param {
                op: "sparse attention",
                msg: format!("layer {l} is chosen for sparse prefill, the model has layers 0..{n}"),
            }),
            None => Ok(()),
        }
    }

    fn chosen(&self, layer: usize) -> bool {
        self.opts
            .layers
            .as_ref()
            .is_none_or(|ls| ls.contains(&layer))
    }
}

impl Attention for SparseAttention {
    fn spec(&self) -> String {
        match &self.opts.layers {
            None => self.spec.to_string(),
            Some(ls) => format!("{} on layers {ls:?}", self.spec),
        }
    }

    fn sparse_stats(&self) -> Option<SparseStats> {
        Some(self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }

    fn attend(
        &self,
        cache: &PagedKvCache,
        seq: SeqId,
        q: &TensorView,
        layer: &LayerAttn,
    ) -> Result<AttnOutput> {
        let [_, sq, hq, _] = q.shape;
        if sq < 2 || !self.chosen(layer.layer) {
            return self.dense.attend(cache, seq, q, layer);
        }
        let c = cache.config();
        let (k, v) = cache.gather(seq, layer.layer)?;
        let sk = k.len() / (c.kv_heads * c.head_dim);
        let kv = TensorView::contiguous(&k[..], [1, sk, c.kv_heads, c.head_dim])?;
        let vv = TensorView::contiguous(&v[..], [1, sk, c.kv_heads, c.v_dim])?;
        let bound = self
            .dense
            .expr_for(layer.window)?
            .bind(MaskShape { batch: 1, sq, sk }, None)?;
        let params = AttnParams {
            scale: Some(layer.scale),
            ..Default::default()
        };
        let t0 = Instant::now();
        let sel = sparse::select(q, &kv, &params, &self.spec, MaskSpec::Expr(&bound))?;
        let t1 = Instant::now();
        let out = crate::forward(q, &kv, &vv, &sel.params(&params, &self.spec)?, sel.mask())?;
        let t2 = Instant::now();
        // Mass recall per row: exp(LSE_sel - LSE_mask), rows with an allowed key only.
        let recall = if self.opts.recall {
            let full = crate::forward(q, &kv, &vv, &params, MaskSpec::Expr(&bound))?;
            let mut per = vec![(0.0f64, 0u64); hq];
            for (h, acc) in per.iter_mut().enumerate() {
                for i in 0..sq {
                    let (ls, lf) = (out.lse[h * sq + i], full.lse[h * sq + i]);
                    if lf > f32::NEG_INFINITY {
                        // exp(-inf) = 0 for a row the selection leaves empty; capped at 1
                        // against f32 rounding of two equal sums.
                        acc.0 += ((ls as f64 - lf as f64).exp()).min(1.0);
                        acc.1 += 1;
                    }
                }
            }
            // The best selection of equal size per query tile: its per-head mean times the rows
            // (tile selections only).
            let best = match sel.lines {
                Some(_) => None,
                None => Some(sparse::best_recall(q, &kv, &params, &sel)?.per_head),
            };
            Some((per, best))
        } else {
            None
        };
        let mut st = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        st.select_seconds += (t1 - t0).as_secs_f64();
        st.attend_seconds += (t2 - t1).as_secs_f64();
        let at = match st.layers.iter().position(|l| l.layer == layer.layer) {
            Some(x) => x,
            None => {
                let x = st.layers.partition_point(|l| l.layer < layer.layer);
                let r = if self.opts.recall { hq } else { 0 }; // recall heads
                st.layers.insert(
                    x,
                    LayerStats {
                        layer: layer.layer,
                        selected: vec![0; hq],
                        allowed: vec![0; hq],
                        recall_sum: vec![0.0; r],
                        recall_rows: vec![0; r],
                        best_sum: vec![0.0; if self.spec.element_level() { 0 } else { r }],
                        ..Default::default()
                    },
                );
                x
            }
        };
        let ls = &mut st.layers[at];
        if ls.selected.len() != hq {
            return Err(Error::Param {
                op: "sparse attention",
                msg: format!(
                    "layer {} was called with {hq} query heads, earlier with {}",
                    layer.layer,
                    ls.selected.len()
                ),
            });
        }
        ls.calls += 1;
        ls.fallbacks += sel.fallback as usize;
        for h in 0..hq {
            ls.selected[h] += sel.report.selected[h];
            ls.allowed[h] += sel.report.allowed[h];
        }
        if let Some((per, best)) = recall {
            for (h, (s, n)) in per.into_iter().enumerate() {
                ls.recall_sum[h] += s;
                ls.recall_rows[h] += n;
                if let Some(b) = &best {
                    ls.best_sum[h] += b[h] * n as f64;
                }
            }
        }
        Ok(out)
    }
}
