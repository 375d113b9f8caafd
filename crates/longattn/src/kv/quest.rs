//! Quest: query-aware page selection, `quest(budget=B,page=P)`. Nothing is dropped.
//!
//! Every (layer, KV head) keeps, per page of P consecutive positions, the element-wise minimum
//! and maximum of its keys ([`PageBounds`], grown as entries are appended). A query q scores each
//! page by an upper bound of q . k over the page's keys:
//!   q . k = sum_d q_d k_d <= sum_d max(q_d min_d, q_d max_d)
//! (each term is linear in k_d in [min_d, max_d], so its largest value is at an end). A query at
//! position t sees the pages 0 ..= t / P; it attends the page being filled (the one holding t)
//! and the pages of largest bound among the others, ceil(ceil(B (t + 1)) / P) pages in all
//! (ties: the newer page first). When that covers every page it sees, the query attends the
//! whole cache through the unselected path (budget >= length is the full cache bit for bit).
//! Selection is per query head and query row; the keys of the chosen pages are attended exactly
//! under the model's mask (the selection is a row mask read at the entries' positions).
//!
//! Over KIVI (`quest(...)+kivi(...)`): the bounds are folded in at each attention, while the
//! newest keys are still in full precision (KIVI quantizes only after the forward, and only the
//! oldest whole groups), so they bound the original keys; the selected pages are attended over
//! both parts, quantized entries dequantized. Quest composes with no eviction: its pages cover
//! every position.
//!
//! Fast path: [`PageBounds`] (running f32 min / max) and [`select_pages`]; plain reference:
//! [`select_reference`] (bounds recomputed from the keys in f64) and the f64 oracle over the
//! selected keys.
use std::fmt;

use super::press::{top_entries, top_entries_reference};
use super::{PagedKvCache, SeqId};
use crate::attention::{AttnOutput, AttnParams};
use crate::error::{Error, Result};
use crate::mask::MaskExpr;
use crate::tensor::TensorView;

const OP: &str = "kv quest";

fn err(msg: String) -> Error {
    Error::Param { op: OP, msg }
}

/// The selection policy (module documentation).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Quest {
    /// Fraction in (0, 1] of the positions a query sees that it attends (rounded up to pages).
    pub budget: f64,
    /// Positions per page.
    pub page: usize,
}

impl Quest {
    pub fn parse(text: &str) -> Result<Quest> {
        let (name, _) = crate::sparse::spec::split_call(OP, text)?;
        if name != "quest" {
            return Err(err(format!("`{text}` is not a quest spec")));
        }
        let v = super::spec::parse_args(OP, text, &[("budget", None), ("page", Some(16.0))])?;
        let q = Quest {
            budget: v[0],
            page: super::spec::int_arg(OP, name, "page", v[1])?,
        };
        q.check()?;
        Ok(q)
    }

    pub fn check(&self) -> Result<()> {
        if !(self.budget > 0.0 && self.budget <= 1.0) {
            return Err(err(format!(
                "`{self}`: budget {} outside (0, 1]",
                self.budget
            )));
        }
        if self.page == 0 {
            return Err(err(format!("`{self}`: page must be >= 1")));
        }
        Ok(())
    }

    /// Pages a query at position `at` attends: ceil(ceil(B (at + 1)) / P), at least 1.
    pub fn pages_for(&self, at: usize) -> usize {
        let tokens = (self.budget * (at + 1) as f64).ceil() as usize;
        tokens.div_ceil(self.page).max(1)
    }
}

impl fmt::Display for Quest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "quest(budget={},page={})", self.budget, self.page)
    }
}

/// Element-wise min and max of the keys of each page of one head (entries = positions 0..n).
#[derive(Clone, Debug)]
pub struct PageBounds {
    page: usize,
    d: usize,
    n: usize,
    /// `[pages][D]`.
    min: Vec<f32>,
    max: Vec<f32>,
}

impl PageBounds {
    pub fn new(page: usize, d: usize) -> Self {
        PageBounds {
            page,
            d,
            n: 0,
            min: Vec::new(),
            max: Vec::new(),
        }
    }
    /// Entries folded in so far.
    pub fn len(&self) -> usize {
        self.n
    }
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }
    pub fn pages(&self) -> usize {
        self.n.div_ceil(self.page)
    }

    /// Folds in keys `[m, D]` of the next m entries.
    pub fn append(&mut self, keys: &[f32]) {
        let d = self.d;
        for k in keys.chunks_exact(d) {
            if self.n.is_multiple_of(self.page) {
                self.min.extend_from_slice(k);
                self.max.extend_from_slice(k);
            } else {
                let pg = self.n / self.page;
                let (mn, mx) = (&mut self.min[pg * d..][..d], &mut self.max[pg * d..][..d]);
                for x in 0..d {
                    mn[x] = mn[x].min(k[x]);
                    mx[x] = mx[x].max(k[x]);
                }
            }
            self.n += 1;
        }
    }

    /// Upper bound of q . k over page `pg`: sum_d max(q_d min_d, q_d max_d).
    pub fn bound(&self, q: &[f32], pg: usize) -> f32 {
        let (mn, mx) = (
            &self.min[pg * self.d..][..self.d],
            &self.max[pg * self.d..][..self.d],
        );
        q.iter()
            .zip(mn.iter().zip(mx))
            .map(|(&qd, (&a, &b))| (qd * a).max(qd * b))
            .sum()
    }
}

/// The pages a query at position `at` attends (ascending), from the bounds of pages
/// `0 ..= at / P` (fast path).
pub fn select_pages(quest: &Quest, bounds: &[f32], at: usize) -> Vec<usize> {
    let cur = at / quest.page;
    let k = quest.pages_for(at);
    if k > cur {
        return (0..=cur).collect();
    }
    let mut s = top_entries(0..cur, &bounds[..cur], k - 1);
    s.push(cur);
    s
}

/// Plain reference of the selection: every page's bound recomputed from the keys `[n, D]` in
/// f64, the pages sorted by it.
pub fn select_reference(quest: &Quest, keys: &[f32], d: usize, q: &[f32], at: usize) -> Vec<usize> {
    let p = quest.page;
    let cur = at / p;
    let k = quest.pages_for(at);
    if k > cur {
        return (0..=cur).collect();
    }
    let bounds: Vec<f32> = (0..cur)
        .map(|pg| {
            (0..d)
                .map(|x| {
                    let col = (pg * p..(pg + 1) * p).map(|j| keys[j * d + x] as f64);
                    let mn = col.clone().fold(f64::INFINITY, f64::min);
                    let mx = col.fold(f64::NEG_INFINITY, f64::max);
                    let qx = q[x] as f64;
                    (qx * mn).max(qx * mx)
                })
                .sum::<f64>() as f32
        })
        .collect();
    let mut s = top_entries_reference(0..cur, &bounds, k - 1);
    s.push(cur);
    s
}

/// The page bounds of every (layer, KV head) of one sequence, grown at each attention.
#[derive(Clone, Debug)]
pub struct QuestIndex {
    pub quest: Quest,
    /// `[layer * Hk + KV head]`.
    pub heads: Vec<PageBounds>,
}

impl QuestIndex {
    pub fn new(quest: Quest, cache: &PagedKvCache) -> Result<Self> {
        quest.check()?;
        let c = cache.config();
        Ok(QuestIndex {
            quest,
            heads: vec![PageBounds::new(quest.page, c.head_dim); c.layers * c.kv_heads],
        })
    }

    /// Folds in the keys appended to one layer since the last call. Every head must hold every
    /// position (Quest drops nothing and composes with no eviction).
    pub fn update(&mut self, cache: &PagedKvCache, id: SeqId, layer: usize) -> Result<()> {
        let c = cache.config();
        let len = cache.len(id)?;
        for kh in 0..c.kv_heads {
            let b = &mut self.heads[layer * c.kv_heads + kh];
            let held = cache.head_len(id, layer, kh)?;
            if held != len || b.len() > held {
                return Err(err(format!(
                    "layer {layer} KV head {kh} holds {held} entries of {len} positions ({} indexed): quest needs every position",
                    b.len()
                )));
            }
            b.append(&cache.head_keys(id, layer, kh, b.len())?);
        }
        Ok(())
    }

    /// Attention of `q` `[1, Sq, Hq, D]` (the last Sq positions, already written and folded in
    /// with [`update`](Self::update)) over the pages each query head and row selects, under
    /// `mask`. Every selection whole: the cache's plain attention.
    pub fn attend(
        &self,
        cache: &PagedKvCache,
        id: SeqId,
        layer: usize,
        q: &TensorView,
        mask: Option<&MaskExpr>,
        params: &AttnParams,
    ) -> Result<AttnOutput> {
        let c = cache.config();
        let len = cache.len(id)?;
        let [_, sq, hq, d] = q.shape;
        if d != c.head_dim || sq > len || !hq.is_multiple_of(c.kv_heads) {
            return Err(err(format!(
                "q of shape {:?} for a cache of head dim {}, {} KV heads, {len} positions",
                q.shape, c.head_dim, c.kv_heads
            )));
        }
        let g = hq / c.kv_heads;
        let np = len.div_ceil(self.quest.page);
        // sel[(h * Sq + i) * pages + page]
        let mut sel = vec![false; hq * sq * np];
        let mut whole = true;
        let mut qv = vec![0.0f32; d];
        for h in 0..hq {
            let b = &self.heads[layer * c.kv_heads + h / g];
            if b.len() != len {
                return Err(err(format!(
                    "layer {layer}: the page bounds hold {} of {len} positions (update first)",
                    b.len()
                )));
            }
            for i in 0..sq {
                let at = len - sq + i;
                for (x, v) in qv.iter_mut().enumerate() {
                    *v = q.get(0, i, h, x);
                }
                let cur = at / self.quest.page;
                let bounds: Vec<f32> = (0..cur).map(|pg| b.bound(&qv, pg)).collect();
                let pages = select_pages(&self.quest, &bounds, at);
                whole &= pages.len() == cur + 1;
                for pg in pages {
                    sel[(h * sq + i) * np + pg] = true;
                }
            }
        }
        if whole {
            return cache.attend(id, layer, q, mask, params);
        }
        let p = self.quest.page;
        let select = |h: usize, i: usize, pos: usize| sel[(h * sq + i) * np + pos / p];
        cache.attend_selected(id, layer, q, mask, params, &select)
    }
}

#[cfg(test)]
#[path = "quest_tests.rs"]
mod tests;
