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
//! both parts, quantized entries dequantized.
//!
//! Over an eviction press (`h2o(budget=0.5)+quest(budget=0.2)`, `duo(...)` roles too): pages are
//! runs of a head's kept entries, so a query's budget is a fraction of what the head still holds
//! of the positions it sees; a compression changes a head's entries and its bounds are rebuilt
//! at the next attention ([`QuestIndex::update`]). The press's scores are observed under the
//! selection: a key a query did not attend scores 0 for it ([`crate::kv::score::Observation`]).
//! With KIVI as well (`h2o(...)+kivi(...)+quest(...)`), a rebuild bounds the quantized entries'
//! keys as they are attended, dequantized. Not with `merge` (a residual slot is no position).
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
///
/// Pages are runs of `page` consecutive *entries* of a head: on a head that holds every
/// position they are runs of positions; on a head an eviction press compacted, runs of its kept
/// entries (in position order). A query at position `at` sees the entries with position <= at,
/// n of them; it attends the page holding the newest of those and the best others,
/// ceil(ceil(B n) / P) pages in all ([`select_pages`] with the entry index n - 1). When the
/// entries of a head change other than by appending (a compression), its bounds are rebuilt
/// from its keys at the next [`update`](Self::update).
#[derive(Clone, Debug)]
pub struct QuestIndex {
    pub quest: Quest,
    /// `[layer * Hk + KV head]`.
    pub heads: Vec<PageBounds>,
    /// The position of every indexed entry, per head (increasing).
    pos: Vec<Vec<u32>>,
}

/// The pages each (query head, query row) of one attention selects ([`QuestIndex::select`]).
pub struct QuestSelection {
    sq: usize,
    /// Pages per query head's KV head (the largest count).
    np: usize,
    /// `[(h * Sq + i) * np + page]`.
    sel: Vec<bool>,
    /// Every (head, row) selected every page it sees: the plain attention is the same.
    pub whole: bool,
    page: usize,
    g: usize,
}

impl QuestSelection {
    /// Whether query head `h`, row `i` attends the entry at position `pos` of its KV head,
    /// given the index's entry positions `positions` of that head.
    fn get(&self, positions: &[u32], h: usize, i: usize, pos: usize) -> bool {
        // Positions increase strictly, so entry `pos` holding position `pos` is the one (every
        // entry of a head nothing was evicted from); else search.
        let entry = match positions.get(pos) {
            Some(&p) if p as usize == pos => Ok(pos),
            _ => positions.binary_search(&(pos as u32)),
        };
        match entry {
            Ok(e) => self.sel[(h * self.sq + i) * self.np + e / self.page],
            Err(_) => false,
        }
    }
}

impl QuestIndex {
    pub fn new(quest: Quest, cache: &PagedKvCache) -> Result<Self> {
        quest.check()?;
        let c = cache.config();
        let n = c.layers * c.kv_heads;
        Ok(QuestIndex {
            quest,
            heads: vec![PageBounds::new(quest.page, c.head_dim); n],
            pos: vec![Vec::new(); n],
        })
    }

    /// Folds in the keys appended to one layer since the last call; a head whose indexed
    /// entries are no longer its first ones (compressed since) is indexed again from its keys.
    pub fn update(&mut self, cache: &PagedKvCache, id: SeqId, layer: usize) -> Result<()> {
        let c = cache.config();
        for kh in 0..c.kv_heads {
            let at = layer * c.kv_heads + kh;
            let now = cache.positions(id, layer, kh)?;
            let known = &self.pos[at];
            if now.len() < known.len() || now[..known.len()] != known[..] {
                self.heads[at] = PageBounds::new(self.quest.page, c.head_dim);
                self.pos[at].clear();
            }
            let b = &mut self.heads[at];
            if b.len() >= cache.head_quantized(id, layer, kh)? {
                // The new entries, in full precision (KIVI quantizes only older ones).
                b.append(&cache.head_keys(id, layer, kh, b.len())?);
            } else {
                // Rebuilding a head with quantized entries: their keys as attended, dequantized.
                let (k, _, _) = cache.gather_head(id, layer, kh)?;
                b.append(&k[b.len() * c.head_dim..]);
            }
            self.pos[at] = now;
        }
        Ok(())
    }

    /// The pages every query head and row of `q` `[1, Sq, Hq, D]` (the last Sq positions,
    /// indexed with [`update`](Self::update)) selects.
    pub fn select(
        &self,
        cache: &PagedKvCache,
        id: SeqId,
        layer: usize,
        q: &TensorView,
    ) -> Result<QuestSelection> {
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
        let p = self.quest.page;
        let heads = layer * c.kv_heads..(layer + 1) * c.kv_heads;
        let np = self.heads[heads.clone()]
            .iter()
            .map(PageBounds::pages)
            .max()
            .unwrap_or(0);
        let mut sel = vec![false; hq * sq * np];
        let mut whole = true;
        let mut qv = vec![0.0f32; d];
        for h in 0..hq {
            let at = layer * c.kv_heads + h / g;
            let (b, positions) = (&self.heads[at], &self.pos[at]);
            let held = cache.head_len(id, layer, h / g)?;
            if b.len() != held || positions.len() != held {
                return Err(err(format!(
                    "layer {layer}: the page bounds hold {} of {held} entries (update first)",
                    b.len()
                )));
            }
            for i in 0..sq {
                // Entries this row sees: those at positions <= its own.
                let seen = positions.partition_point(|&x| x as usize <= len - sq + i);
                if seen == 0 {
                    continue;
                }
                for (x, v) in qv.iter_mut().enumerate() {
                    *v = q.get(0, i, h, x);
                }
                let cur = (seen - 1) / p;
                let bounds: Vec<f32> = (0..cur).map(|pg| b.bound(&qv, pg)).collect();
                let pages = select_pages(&self.quest, &bounds, seen - 1);
                whole &= pages.len() == cur + 1;
                for pg in pages {
                    sel[(h * sq + i) * np + pg] = true;
                }
            }
        }
        Ok(QuestSelection {
            sq,
            np,
            sel,
            whole,
            page: p,
            g,
        })
    }

    /// `select(query head, row, position)` of a selection made at `layer`: whether that key is
    /// attended (for [`PagedKvCache::attend_selected`] and the scores' [`Observation`]).
    ///
    /// [`Observation`]: crate::kv::score::Observation
    pub fn selector<'a>(
        &'a self,
        sel: &'a QuestSelection,
        cache: &PagedKvCache,
        layer: usize,
    ) -> impl Fn(usize, usize, usize) -> bool + Sync + 'a {
        let hk = cache.config().kv_heads;
        move |h: usize, i: usize, pos: usize| sel.get(&self.pos[layer * hk + h / sel.g], h, i, pos)
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
        let sel = self.select(cache, id, layer, q)?;
        self.attend_selection(cache, id, layer, q, mask, params, &sel)
    }

    /// [`attend`](Self::attend) with a selection made by [`select`](Self::select).
    #[allow(clippy::too_many_arguments)]
    pub fn attend_selection(
        &self,
        cache: &PagedKvCache,
        id: SeqId,
        layer: usize,
        q: &TensorView,
        mask: Option<&MaskExpr>,
        params: &AttnParams,
        sel: &QuestSelection,
    ) -> Result<AttnOutput> {
        if sel.whole {
            return cache.attend(id, layer, q, mask, params);
        }
        let select = self.selector(sel, cache, layer);
        cache.attend_selected(id, layer, q, mask, params, &select)
    }
}

#[cfg(test)]
#[path = "quest_tests.rs"]
mod tests;
