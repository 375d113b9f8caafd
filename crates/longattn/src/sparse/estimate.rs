//! The fast CPU estimators: the one dispatch over [`Method`], parallel over (batch row, head),
//! and inside a (batch row, head) one document at a time.
//!
//! Pooled methods cost O((Sq + Sk) D) for the block means plus O(candidates x D) for the scores;
//! vertical-slash costs O(last x Sk x D) for its estimate plus O(candidates) to coarsen (prefix
//! sums over the kept columns and diagonals). Each returns, per query tile, the kept subset of
//! the candidate entries (kinds kept from the mask).
//!
//! Documents ([`Doc`]: a run of queries and the run of keys with its id; one per batch row
//! without ids): every method runs on each document alone. A document's part of a query tile
//! is the tile's rows inside it, its candidates there the candidate entries whose key tile
//! meets its keys ([`Ctx::doc_cands`]); what the parts keep is collected per query tile
//! ([`Kept`]), so a tile that straddles documents keeps the union of its parts' selections.
//! Means, last rows, masses and budgets only read the document's own queries and keys. A
//! document with fewer keys than `dense_below` keeps every candidate of its parts.
use super::lines::{set_bit, DocLines, HeadLines};
use super::{lowbit, Ctx, Doc, Method};
use crate::mask::{TileEntry, TileKind};
use rayon::prelude::*;
use std::cmp::Ordering;
use std::ops::Range;

/// Kept flags of one (batch row, head): per query tile, one flag per entry of its candidate
/// row. The documents' parts OR into it; [`Kept::entries`] gives the kept entries. With
/// element-level lines (`ctx.element`) it also collects the kept lines of every document and,
/// per candidate, whether a line pattern kept it (its entry becomes Partial).
struct Kept<'c> {
    rows: Vec<&'c [TileEntry]>,
    flags: Vec<Vec<bool>>,
    lines: Option<(HeadLines, Vec<Vec<bool>>)>,
    /// The document being estimated (its index in the batch row's documents).
    doc: usize,
}

impl<'c> Kept<'c> {
    fn new(ctx: &Ctx<'c>, b: usize, h: usize) -> Kept<'c> {
        let cand = ctx.cand;
        let rows: Vec<&'c [TileEntry]> = (0..cand.q_tiles).map(|qt| cand.row(b, h, qt)).collect();
        let flags: Vec<Vec<bool>> = rows.iter().map(|r| vec![false; r.len()]).collect();
        let lines = ctx.element.then(|| {
            let docs = ctx.docs.get(b).map_or(1, Vec::len);
            (
                HeadLines::new(ctx.dims.sk, docs, cand.q_tiles),
                flags.clone(),
            )
        });
        Kept {
            rows,
            flags,
            lines,
            doc: 0,
        }
    }

    /// Keeps candidate `xs.start + x` of query tile `qt` where `keep[x]`.
    fn or(&mut self, qt: usize, xs: &Range<usize>, keep: &[bool]) {
        for (f, &k) in self.flags[qt][xs.clone()].iter_mut().zip(keep) {
            *f |= k;
        }
    }

    /// [`Kept::or`] for tiles kept by lines: with element-level lines they keep only the lines'
    /// pairs (Partial).
    fn or_lines(&mut self, qt: usize, xs: &Range<usize>, keep: &[bool]) {
        self.or(qt, xs, keep);
        if let Some((_, partial)) = self.lines.as_mut() {
            for (f, &k) in partial[qt][xs.clone()].iter_mut().zip(keep) {
                *f |= k;
            }
        }
    }

    /// Records the current document's kept lines (element level only): columns `cols` (index
    /// j - k0) and diagonals `diags` (index o - omin).
    fn record_lines(&mut self, k0: usize, cols: &[bool], (diags, omin): (&[bool], i64)) {
        let Some((hl, _)) = self.lines.as_mut() else {
            return;
        };
        for x in (0..cols.len()).filter(|&x| cols[x]) {
            set_bit(&mut hl.cols, k0 + x);
        }
        // Reversed: bit n - 1 - x is offset omin + x = omax - (n - 1 - x).
        let n = diags.len();
        let mut diag = vec![0u64; n.div_ceil(64)];
        for x in (0..n).filter(|&x| diags[x]) {
            set_bit(&mut diag, n - 1 - x);
        }
        hl.docs[self.doc] = DocLines::lines(omin + n as i64 - 1, diag);
    }

    /// Marks the current document as selected by per-row keys (element level only): no
    /// columns or diagonals, its rows' own keys from [`Kept::row_keys`].
    fn row_lines(&mut self) {
        if let Some((hl, _)) = self.lines.as_mut() {
            hl.docs[self.doc] = DocLines::lines(0, Vec::new());
        }
    }

    /// Keys kept for query row `i` only (element level only), ascending.
    fn row_keys(&mut self, i: usize, keys: &[u32]) {
        if let Some((hl, _)) = self.lines.as_mut() {
            hl.rows.set(i, keys);
        }
    }

    /// Keys kept for the rows of query tile `qt` only (element level only).
    fn tile_keys(&mut self, qt: usize, keys: impl Iterator<Item = u32>) {
        if let Some((hl, _)) = self.lines.as_mut() {
            hl.tiles[qt].extend(keys);
        }
    }

    fn entries(self) -> (Vec<Vec<TileEntry>>, Option<HeadLines>) {
        let none = vec![Vec::new(); self.rows.len()];
        let (lines, partial) = match self.lines {
            Some((mut l, p)) => {
                for t in l.tiles.iter_mut() {
                    t.sort_unstable();
                    t.dedup();
                }
                (Some(l), p)
            }
            None => (None, none),
        };
        let rows = self
            .rows
            .iter()
            .zip(&self.flags)
            .enumerate()
            .map(|(qt, (row, f))| {
                row.iter()
                    .zip(f)
                    .enumerate()
                    .filter(|(_, (_, &k))| k)
                    .map(|(x, (e, _))| match partial[qt].get(x) {
                        Some(true) => TileEntry {
                            kind: TileKind::Partial,
                            ..*e
                        },
                        _ => *e,
                    })
                    .collect()
            })
            .collect();
        (rows, lines)
    }
}

/// Kept entries of every (batch row, query head) in row order, each a list per query tile, and
/// its element-level lines (with `ctx.element`).
pub(crate) type HeadSelection = (Vec<Vec<TileEntry>>, Option<HeadLines>);

/// The selection of every (batch row, query head) in row order.
pub(crate) fn select_all(ctx: &Ctx, method: &Method) -> Vec<HeadSelection> {
    let d = ctx.dims;
    if let Method::Proxy { gamma, rows, last } = *method {
        // The proxy scores once per (batch row, KV group), then each head's own budget.
        let scores: Vec<Vec<Vec<Vec<f64>>>> = (0..d.batch * d.hk)
            .into_par_iter()
            .map(|r| proxy_scores(ctx, r / d.hk, r % d.hk, rows))
            .collect();
        return (0..d.batch * d.hq)
            .into_par_iter()
            .map(|r| {
                let (b, h) = (r / d.hq, r % d.hq);
                let scores = &scores[b * d.hk + ctx.kv_head(h)];
                each_doc(ctx, b, h, |doc, x, kept| {
                    proxy_doc(ctx, (b, h), doc, &scores[x], [gamma], last, kept)
                })
            })
            .collect();
    }
    if let Method::LowBit { sink, local, .. } | Method::LowBitMass { sink, local, .. } = *method {
        // The int8 keys once per (batch row, KV group, document), then each head's rows.
        let keys: Vec<Vec<lowbit::QKeys>> = (0..d.batch * d.hk)
            .into_par_iter()
            .map(|r| {
                let (b, g) = (r / d.hk, r % d.hk);
                let docs = &ctx.docs[b];
                docs.iter()
                    .map(|doc| lowbit::quant_keys(ctx.k, b, g, &doc.k.clone().collect::<Vec<_>>()))
                    .collect()
            })
            .collect();
        return (0..d.batch * d.hq)
            .into_par_iter()
            .map(|r| {
                let (b, h) = (r / d.hq, r % d.hq);
                let keys = &keys[b * d.hk + ctx.kv_head(h)];
                each_doc(ctx, b, h, |doc, x, kept| match *method {
                    Method::LowBitMass { gamma, .. } => {
                        kept.row_lines();
                        let parts = lowbit::doc_rows(
                            ctx,
                            (b, h),
                            doc,
                            &keys[x],
                            ([sink, local], gamma),
                            |i, keys| kept.row_keys(i, keys),
                        );
                        for (qt, xs, hit) in parts {
                            kept.or_lines(qt, &xs, &hit);
                        }
                    }
                    Method::LowBit { tau, .. } => {
                        for (qt, xs, ts) in
                            lowbit::doc_scores(ctx, (b, h), doc, &keys[x], [sink, local])
                        {
                            let keep: Vec<bool> = ts
                                .forced
                                .iter()
                                .zip(&ts.score)
                                .map(|(&f, &r)| lowbit::keeps(f, r, tau.ln()))
                                .collect();
                            kept.or(qt, &xs, &keep);
                        }
                    }
                    _ => unreachable!("the low-bit methods"),
                })
            })
            .collect();
    }
    let pooled = !matches!(
        method,
        Method::VerticalSlash { .. } | Method::Columns { .. }
    );
    // Block means of every document's keys per (batch row, key head), shared by the query
    // heads of a group: `[document][its key tiles, D]`.
    let kbar: Vec<Vec<Vec<f64>>> = if pooled {
        (0..d.batch * d.hk)
            .into_par_iter()
            .map(|r| {
                let (b, g) = (r / d.hk, r % d.hk);
                ctx.docs[b]
                    .iter()
                    .map(|doc| key_means(ctx, b, g, doc))
                    .collect()
            })
            .collect()
    } else {
        Vec::new()
    };
    (0..d.batch * d.hq)
        .into_par_iter()
        .map(|r| {
            let (b, h) = (r / d.hq, r % d.hq);
            each_doc(ctx, b, h, |doc, x, kept| match *method {
                Method::Columns {
                    gamma,
                    rows,
                    sink,
                    local,
                    check,
                    gathered: true,
                    int8,
                    ..
                } => columns_gathered_doc(
                    ctx,
                    (b, h),
                    doc,
                    (gamma, rows, sink, local, int8),
                    check,
                    kept,
                ),
                Method::Columns {
                    gamma,
                    rows,
                    sink,
                    local,
                    check,
                    check_gamma,
                    gathered: false,
                    int8,
                } => columns_doc(
                    ctx,
                    (b, h),
                    doc,
                    (gamma, rows, [check, check_gamma], int8),
                    [sink, local],
                    kept,
                ),
                Method::VerticalSlash {
                    v,
                    s,
                    last,
                    sink,
                    local,
                } => vertical_slash(ctx, (b, h), doc, [v, s, last, sink, local], kept),
                Method::FlexPrefill {
                    gamma,
                    tau,
                    min_budget,
                    last,
                } => {
                    let kbar = &kbar[b * d.hk + ctx.kv_head(h)][x];
                    flexprefill(ctx, (b, h), doc, kbar, [gamma, tau], min_budget, last, kept)
                }
                _ => {
                    let kbar = &kbar[b * d.hk + ctx.kv_head(h)][x];
                    pooled_doc(ctx, method, (b, h), doc, kbar, kept)
                }
            })
        })
        .collect()
}

/// Runs `f(document, its index, kept)` on every document of batch row `b` that has keys and at
/// least `dense_below` of them (shorter ones keep all their candidates), then gives the kept
/// entries of (b, h).
fn each_doc(
    ctx: &Ctx,
    b: usize,
    h: usize,
    mut f: impl FnMut(&Doc, usize, &mut Kept),
) -> HeadSelection {
    let mut kept = Kept::new(ctx, b, h);
    for (x, doc) in ctx.docs[b].iter().enumerate() {
        kept.doc = x;
        if doc.k.is_empty() {
            continue; // no key: its queries attend nothing
        }
        if doc.k.len() < ctx.dense_below {
            for (qt, _) in ctx.parts(doc) {
                let xs = ctx.doc_cands(b, h, qt, doc);
                kept.or(qt, &xs, &vec![true; xs.len()]);
            }
            continue;
        }
        f(doc, x, &mut kept);
        if ctx.dense_last > 0 {
            // The document's last rows keep every candidate: whole query tiles at tile level,
            // those rows alone with lines (their tiles Partial for the other rows).
            let from = doc.q.end - ctx.dense_last.min(doc.q.len());
            let lines = match kept.lines.as_mut() {
                Some((hl, _)) if !hl.docs[x].whole => {
                    hl.docs[x].dense_from = from;
                    true
                }
                _ => false,
            };
            for (qt, part) in ctx.parts(doc).filter(|(_, p)| p.end > from) {
                let xs = ctx.doc_cands(b, h, qt, doc);
                let all = vec![true; xs.len()];
                if lines && part.start < from {
                    kept.or_lines(qt, &xs, &all);
                } else {
                    kept.or(qt, &xs, &all);
                }
            }
        }
    }
    kept.entries()
}

/// Mean of the rows `rows` of head `h` of `x` (q or k) in batch row `b`, `[D]`.
fn mean_rows(x: &crate::tensor::TensorView, b: usize, h: usize, rows: Range<usize>) -> Vec<f64> {
    let dd = x.dim();
    let mut acc = vec![0.0f64; dd];
    let inv = 1.0 / rows.len() as f64;
    for r in rows {
        for (c, a) in acc.iter_mut().enumerate() {
            *a += x.get(b, r, h, c) as f64;
        }
    }
    acc.iter_mut().for_each(|a| *a *= inv);
    acc
}

/// The document's keys in key tile `kt`: keys `c0..c1` (the tile's keys inside `doc.k`).
fn k_part(ctx: &Ctx, doc: &Doc, kt: usize) -> Range<usize> {
    let (k0, k1) = ctx.cand.k_range(kt);
    k0.max(doc.k.start)..k1.min(doc.k.end)
}

/// Block means of the document's keys (key head `g`): for every key tile that meets them, the
/// mean over its keys inside the document, as `[doc key tiles, D]` from the first such tile.
fn key_means(ctx: &Ctx, b: usize, g: usize, doc: &Doc) -> Vec<f64> {
    ctx.doc_k_tiles(doc)
        .flat_map(|kt| mean_rows(ctx.k, b, g, k_part(ctx, doc, kt)))
        .collect()
}

#[inline]
fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Orders indices by score descending, ties by index ascending (a total order).
fn by_score(s: &[f64]) -> impl Fn(&usize, &usize) -> Ordering + '_ {
    move |&a, &b| s[b].total_cmp(&s[a]).then(a.cmp(&b))
}

/// The forced tiles of a document's part (rows `rows`) among the candidates `cand`: the tiles
/// on the diagonal inside the document ([`Ctx::diag_tiles`]) and, with `sink`, the tile of the
/// document's first key.
fn forced(ctx: &Ctx, doc: &Doc, rows: &Range<usize>, cand: &[TileEntry], sink: bool) -> Vec<bool> {
    let diag = ctx.diag_tiles(rows, doc);
    let sink_tile = (doc.k.start / ctx.cand.tile_k) as u32;
    cand.iter()
        .map(|e| {
            diag.is_some_and(|(lo, hi)| lo <= e.k_tile && e.k_tile <= hi)
                || (sink && e.k_tile == sink_tile)
        })
        .collect()
}

/// One document of (batch row, head) for topmass / relthresh / moba (and FlexPrefill's
/// query-aware pattern): per part, the pooled scores of its candidates
///   s(part, kt) = softcap(scale mean_{i in part} q_i . mean_{j in kt, j in doc} k_j),
/// then the method's rule. `kbar` = [`key_means`] of the document.
fn pooled_doc(
    ctx: &Ctx,
    method: &Method,
    (b, h): (usize, usize),
    doc: &Doc,
    kbar: &[f64],
    kept: &mut Kept,
) {
    let dd = ctx.dims.d;
    let kt0 = ctx.doc_k_tiles(doc).start;
    let mut scores = Vec::new();
    for (qt, rows) in ctx.parts(doc) {
        let xs = ctx.doc_cands(b, h, qt, doc);
        let cand = &ctx.cand.row(b, h, qt)[xs.clone()];
        let qv = mean_rows(ctx.q, b, h, rows.clone());
        scores.clear();
        scores.extend(cand.iter().map(|e| {
            let kv = &kbar[(e.k_tile as usize - kt0) * dd..][..dd];
            ctx.logit.of(dot(&qv, kv))
        }));
        let sink = !matches!(method, Method::Moba { .. });
        let mut keep = forced(ctx, doc, &rows, cand, sink);
        match *method {
            Method::TopMass { gamma } => top_mass(&scores, gamma, 0, &mut keep),
            Method::FlexPrefill {
                gamma, min_budget, ..
            } => {
                let min_tiles = min_budget.div_ceil(ctx.cand.tile_k);
                top_mass(&scores, gamma, min_tiles, &mut keep)
            }
            Method::RelThresh { alpha } => rel_thresh(&scores, alpha, &mut keep),
            Method::Moba { topk } => top_k(&scores, topk, &mut keep),
            Method::Whole => keep.fill(true),
            Method::VerticalSlash { .. }
            | Method::Proxy { .. }
            | Method::Columns { .. }
            | Method::LowBit { .. }
            | Method::LowBitMass { .. } => {
                unreachable!("not a pooled method")
            }
        }
        kept.or(qt, &xs, &keep);
    }
}

/// Adds to `keep` the most probable blocks, p = softmax(s), in decreasing order until their
/// cumulative mass reaches gamma (the block that reaches it included) and at least `min_kept`
/// blocks of the row are kept (forced ones counted); gamma >= 1 keeps all (in exact arithmetic
/// only the whole row has mass 1).
fn top_mass(s: &[f64], gamma: f64, min_kept: usize, keep: &mut [bool]) {
    if gamma >= 1.0 {
        keep.fill(true);
        return;
    }
    let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = s.iter().map(|&x| (x - m).exp()).sum();
    let mut order: Vec<usize> = (0..s.len()).collect();
    order.sort_unstable_by(by_score(s));
    let mut kept = keep.iter().filter(|&&k| k).count();
    let mut mass = 0.0;
    for x in order {
        kept += !std::mem::replace(&mut keep[x], true) as usize;
        mass += (s[x] - m).exp() / z;
        if mass >= gamma && kept >= min_kept {
            break;
        }
    }
}

/// Adds the blocks with p >= alpha max p, i.e. s - max s >= ln alpha (one pass for the max, one
/// for the test; alpha = 0 gives ln 0 = -inf and keeps all).
fn rel_thresh(s: &[f64], alpha: f64, keep: &mut [bool]) {
    let thr = s.iter().copied().fold(f64::NEG_INFINITY, f64::max) + alpha.ln();
    for (k, &x) in keep.iter_mut().zip(s) {
        *k |= x >= thr;
    }
}

/// MoBA: the `topk` blocks first by forced (already in `keep`), then by score; forced blocks are
/// kept even past topk.
fn top_k(s: &[f64], topk: usize, keep: &mut [bool]) {
    if topk >= s.len() {
        keep.fill(true);
        return;
    }
    let forced = keep.to_vec();
    let score = by_score(s);
    let mut order: Vec<usize> = (0..s.len()).collect();
    order.select_nth_unstable_by(topk - 1, |a, b| {
        forced[*b].cmp(&forced[*a]).then(score(a, b))
    });
    for &x in &order[..topk] {
        keep[x] = true;
    }
}

/// The `n` largest entries among those > 0 (ties by index), as flags.
fn top_positive(mass: &[f64], n: usize) -> Vec<bool> {
    let mut idx: Vec<usize> = (0..mass.len()).filter(|&j| mass[j] > 0.0).collect();
    if idx.len() > n {
        if n == 0 {
            idx.clear();
        } else {
            idx.select_nth_unstable_by(n - 1, by_score(mass));
            idx.truncate(n);
        }
    }
    let mut out = vec![false; mass.len()];
    idx.into_iter().for_each(|j| out[j] = true);
    out
}

/// Exclusive prefix sums of flags: `p[b] - p[a]` counts the set flags in `a..b`.
fn prefix(flags: &[bool]) -> Vec<u32> {
    let mut p = Vec::with_capacity(flags.len() + 1);
    p.push(0u32);
    for &f in flags {
        p.push(p[p.len() - 1] + f as u32);
    }
    p
}

/// What the last query rows of one document of (batch row, head) say about its keys, from
/// their exact softmax rows under the mask.
struct LastRows {
    /// Column mass c_j = sum_i p_ij at index j - k0 (k0 the document's first key), `[doc keys]`.
    col: Vec<f64>,
    /// Diagonal mass d_o = sum_{p_i - j = o} p_ij at index o - omin, over every offset of the
    /// document's (query, key) pairs: `[doc queries + doc keys - 1]`.
    diag: Vec<f64>,
    /// The smallest offset, omin = p_q0 - (k1 - 1) (queries q0..q1, keys k0..k1).
    omin: i64,
    /// Keys allowed for at least one of the rows, as `col`.
    seen: Vec<bool>,
    /// Mean of the rows' queries (all of them), `[D]`.
    qmean: Vec<f64>,
}

/// Column and diagonal mass of the document's last `last` query rows (clipped to its length;
/// rows without an allowed key estimate nothing). The mask keeps every allowed key inside the
/// document (`document` is one of its conjuncts), so only the document's keys are visited.
fn last_rows(ctx: &Ctx, bh: (usize, usize), doc: &Doc, last: usize) -> LastRows {
    let (k0, nk) = (doc.k.start, doc.k.len());
    let omin = ctx.pos(doc.q.start) - (doc.k.end as i64 - 1);
    let mut col = vec![0.0f64; nk];
    let mut diag = vec![0.0f64; doc.q.len() + nk - 1];
    let mut seen = vec![false; nk];
    let mut qmean = vec![0.0f64; ctx.dims.d];
    let mut sm = RowSoftmax::new(ctx, bh, doc);
    let first = doc.q.end - last.min(doc.q.len());
    for i in first..doc.q.end {
        let any = sm.row(i);
        qmean.iter_mut().zip(&sm.qrow).for_each(|(a, x)| *a += x);
        if !any {
            continue; // no allowed key: the row estimates nothing
        }
        let base = ctx.pos(i) - k0 as i64 - omin; // index of o = p_i - k0
        for x in (0..nk).filter(|&x| sm.allowed[x]) {
            seen[x] = true;
            col[x] += sm.p[x];
            diag[(base - x as i64) as usize] += sm.p[x];
        }
    }
    let inv = 1.0 / (doc.q.end - first) as f64;
    qmean.iter_mut().for_each(|a| *a *= inv);
    LastRows {
        col,
        diag,
        omin,
        seen,
        qmean,
    }
}

/// Vertical-slash for one document of (batch row, head); `a` = [v, s, last, sink, local].
fn vertical_slash(ctx: &Ctx, bh: (usize, usize), doc: &Doc, a: [usize; 5], kept: &mut Kept) {
    let [v, s, last, sink, local] = a;
    let r = last_rows(ctx, bh, doc, last);
    vs_doc(
        ctx,
        bh,
        doc,
        (&r.col, &r.diag, r.omin),
        [v, s, sink, local],
        kept,
    )
}

/// Column mass `[Sk]` and diagonal mass `[Sq + Sk - 1]` (index o + Sq - 1) of the last `last`
/// rows of (b, h) over the whole batch row (the f64 reference of the CUDA estimator's first
/// kernels, which take no documents).
pub(crate) fn last_mass(ctx: &Ctx, b: usize, h: usize, last: usize) -> (Vec<f64>, Vec<f64>) {
    let r = last_rows(ctx, (b, h), &Doc::whole(&ctx.dims), last);
    (r.col, r.diag)
}

/// Vertical-slash's keep step over the whole batch row from given masses (as [`last_mass`]
/// gives them; the CUDA estimator's check); `a` = [v, s, sink, local].
pub(crate) fn vs_keep(
    ctx: &Ctx,
    b: usize,
    h: usize,
    col: &[f64],
    diag: &[f64],
    a: [usize; 4],
) -> Vec<Vec<TileEntry>> {
    let mut kept = Kept::new(ctx, b, h);
    let omin = 1 - ctx.dims.sq as i64;
    vs_doc(
        ctx,
        (b, h),
        &Doc::whole(&ctx.dims),
        (col, diag, omin),
        a,
        &mut kept,
    );
    kept.entries().0
}

/// Vertical-slash's keep step for one document from its masses (`m` = col, diag, omin as in
/// [`LastRows`]); `a` = [v, s, sink, local]: the `v` heaviest columns and `s` heaviest
/// diagonals with mass > 0 (ties by index), the document's first `sink` keys and the diagonals
/// 0 <= o < local, coarsened to the document's candidates.
fn vs_doc(
    ctx: &Ctx,
    bh: (usize, usize),
    doc: &Doc,
    (col, diag, omin): (&[f64], &[f64], i64),
    a: [usize; 4],
    kept: &mut Kept,
) {
    let [v, s, sink, local] = a;
    let mut cols = top_positive(col, v);
    let mut diags = top_positive(diag, s);
    sinks_and_band((&mut cols, &mut diags), omin, [sink, local]);
    coarsen(ctx, bh, doc, &cols, (&diags, omin), kept)
}

/// Keeps the first `sink` columns (index j - k0) and the local band 0 <= o < `local` of the
/// diagonals (index o - omin: -omin .. local - omin, clipped).
fn sinks_and_band((cols, diags): (&mut [bool], &mut [bool]), omin: i64, [sink, local]: [usize; 2]) {
    let n = cols.len();
    cols[..sink.min(n)].fill(true);
    let nd = diags.len() as i64;
    let local = i64::try_from(local).unwrap_or(i64::MAX);
    let band = (-omin).clamp(0, nd) as usize..local.saturating_sub(omin).clamp(0, nd) as usize;
    diags[band].fill(true);
}

/// The document's candidates crossed by a kept column (`cols`, index j - k0) or a kept
/// diagonal (`diags`, index o - omin) inside the document: per part (rows r0..r1) and candidate
/// tile, the document's keys c0..c1 in the tile hold a kept column, or a kept o = p_i - j with
/// i in the part and j in c0..c1, i.e. o in [p_r0 - (c1 - 1), p_(r1-1) - c0] (consecutive
/// integers).
fn coarsen(
    ctx: &Ctx,
    (b, h): (usize, usize),
    doc: &Doc,
    cols: &[bool],
    (diags, omin): (&[bool], i64),
    kept: &mut Kept,
) {
    let (cp, dp) = (prefix(cols), prefix(diags));
    let n_diag = diags.len() as i64;
    let k0 = doc.k.start;
    kept.record_lines(k0, cols, (diags, omin));
    for (qt, rows) in ctx.parts(doc) {
        let xs = ctx.doc_cands(b, h, qt, doc);
        let (p0, p1) = (ctx.pos(rows.start), ctx.pos(rows.end - 1));
        let keep: Vec<bool> = ctx.cand.row(b, h, qt)[xs.clone()]
            .iter()
            .map(|e| {
                let c = k_part(ctx, doc, e.k_tile as usize);
                let lo = (p0 - (c.end as i64 - 1) - omin).max(0);
                let hi = (p1 - c.start as i64 - omin).min(n_diag - 1);
                cp[c.end - k0] > cp[c.start - k0]
                    || (lo <= hi && dp[hi as usize + 1] > dp[lo as usize])
            })
            .collect();
        kept.or_lines(qt, &xs, &keep);
    }
}

/// The smallest set of entries, heaviest first (ties by index) among those > 0, whose mass
/// reaches `target` and that holds at least `min` entries (or every entry > 0), as flags.
fn cumulative(mass: &[f64], target: f64, min: usize) -> Vec<bool> {
    let mut idx: Vec<usize> = (0..mass.len()).filter(|&j| mass[j] > 0.0).collect();
    idx.sort_unstable_by(by_score(mass));
    let mut out = vec![false; mass.len()];
    let mut acc = 0.0;
    for (n, j) in idx.into_iter().enumerate() {
        if acc >= target && n >= min {
            break;
        }
        out[j] = true;
        acc += mass[j];
    }
    out
}

/// Square-root Jensen-Shannon distance of two distributions (natural logarithm, 0 ln 0 = 0):
/// sqrt(JSD), JSD = 1/2 sum p ln(p / m) + 1/2 sum q ln(q / m), m = (p + q) / 2; in
/// [0, sqrt(ln 2)].
pub(crate) fn js_distance(p: &[f64], q: &[f64]) -> f64 {
    let half_kl = |a: f64, m: f64| if a > 0.0 { 0.5 * a * (a / m).ln() } else { 0.0 };
    let jsd: f64 = p
        .iter()
        .zip(q)
        .map(|(&a, &b)| {
            let m = 0.5 * (a + b);
            half_kl(a, m) + half_kl(b, m)
        })
        .sum();
    jsd.max(0.0).sqrt()
}

/// FlexPrefill for one document of (batch row, head): the pattern test, then query-aware blocks
/// or cumulative vertical-slash. `gt` = [gamma, tau]; `kbar` the document's key tile means.
///
/// Pattern test, on the document's last `last` query rows, over the key tiles S that meet the
/// document's keys and that the rows can see: the exact block distribution
///   a_hat(kt) = sum_{j in kt} c_j / sum_j c_j        (c_j the rows' column mass)
/// against the pooled estimate
///   a_bar(kt) = softmax_{kt in S} softcap(scale mean_i(q_i) . mean_{j in kt, j in doc}(k_j)).
/// sqrt(JSD(a_bar, a_hat)) < tau: the pooled scores track the real distribution, so every part
/// keeps its key tiles by pooled score (top mass gamma, at least ceil(min_budget / block)
/// tiles, sink and diagonal tiles forced). Otherwise: the heaviest columns until their mass
/// reaches gamma of the column total (at least ceil(min_budget / block) of them), the same for
/// diagonals, with the document's first key and diagonal 0 forced, coarsened to tiles.
#[allow(clippy::too_many_arguments)]
fn flexprefill(
    ctx: &Ctx,
    bh: (usize, usize),
    doc: &Doc,
    kbar: &[f64],
    gt: [f64; 2],
    min_budget: usize,
    last: usize,
    kept: &mut Kept,
) {
    let [gamma, tau] = gt;
    let (dd, t) = (ctx.dims.d, ctx.cand.tile_k);
    let rows = last_rows(ctx, bh, doc, last);
    let kts = ctx.doc_k_tiles(doc);
    let k0 = doc.k.start;
    let span = |kt: usize| {
        let c = k_part(ctx, doc, kt);
        c.start - k0..c.end - k0
    };
    let total: f64 = rows.col.iter().sum();
    let visible: Vec<bool> = kts
        .clone()
        .map(|kt| rows.seen[span(kt)].contains(&true))
        .collect();
    let dist = if total > 0.0 {
        let exact: Vec<f64> = kts
            .clone()
            .map(|kt| rows.col[span(kt)].iter().sum::<f64>() / total)
            .collect();
        let s: Vec<f64> = (0..kts.len())
            .map(|x| match visible[x] {
                true => ctx.logit.of(dot(&rows.qmean, &kbar[x * dd..][..dd])),
                false => f64::NEG_INFINITY,
            })
            .collect();
        let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = s.iter().map(|&x| (x - m).exp()).sum();
        let pooled: Vec<f64> = s.iter().map(|&x| (x - m).exp() / z).collect();
        js_distance(&pooled, &exact)
    } else {
        0.0 // the rows see no key: nothing to compare, the query-aware pattern
    };
    if dist < tau {
        let method = Method::FlexPrefill {
            gamma,
            tau,
            min_budget,
            last,
        };
        return pooled_doc(ctx, &method, bh, doc, kbar, kept);
    }
    // The minimum in units of one tile per row: a column costs at most one tile of a row.
    let min_lines = min_budget.div_ceil(t);
    let mut cols = cumulative(&rows.col, gamma * total, min_lines);
    let diag_total: f64 = rows.diag.iter().sum();
    let mut diags = cumulative(&rows.diag, gamma * diag_total, min_lines);
    if let Some(c0) = cols.first_mut() {
        *c0 = true;
    }
    // Diagonal 0 (index -omin) when the document's pairs reach it.
    if let Some(d0) = usize::try_from(-rows.omin)
        .ok()
        .and_then(|x| diags.get_mut(x))
    {
        *d0 = true;
    }
    coarsen(ctx, bh, doc, &cols, (&diags, rows.omin), kept)
}

/// The document's keys of key head `g` in batch row `b`, widened once: `[doc keys, D]`.
fn doc_keys(ctx: &Ctx, b: usize, g: usize, doc: &Doc) -> Vec<f64> {
    let dd = ctx.dims.d;
    doc.k
        .clone()
        .flat_map(|j| (0..dd).map(move |c| (j, c)))
        .map(|(j, c)| ctx.k.get(b, j, g, c) as f64)
        .collect()
}

/// The sampled rows of a part r0..r1: i_r = r0 + floor((r + 1) (r1 - r0) / rows) - 1 for
/// r < rows (the last row always among them; fewer when the part is shorter).
pub(crate) fn sampled_rows(part: &Range<usize>, rows: usize) -> Vec<usize> {
    let (r0, r1) = (part.start, part.end);
    let mut s: Vec<usize> = (0..rows).map(|r| r0 + (r + 1) * (r1 - r0) / rows).collect();
    s.retain(|&i| i > r0);
    s.dedup();
    s.into_iter().map(|i| i - 1).collect()
}

/// Keys side by side in [`RowSoftmax`]'s dot products.
const LANES: usize = 8;

/// `[n, D]` rows into blocks of [`LANES`] rows, each `[D, LANES]`, the last padded with zeros.
fn lanes_of(rows: &[f64], dd: usize) -> Vec<f64> {
    let n = rows.len() / dd.max(1);
    let mut out = vec![0.0f64; n.div_ceil(LANES) * LANES * dd];
    for x in 0..n {
        let (blk, l) = (x / LANES, x % LANES);
        for c in 0..dd {
            out[(blk * dd + c) * LANES + l] = rows[x * dd + c];
        }
    }
    out
}

/// out[x] = sum_c q_c k_(x, c) for every key of `keys` (blocks of [`LANES`] keys, each
/// `[D, LANES]`), each summed in c order (as [`dot`] sums): the lanes of a block side by side,
/// with AVX-512 where the machine has it (the same products and sums, so the same bits).
fn lane_dots(q: &[f64], keys: &[f64], out: &mut [f64]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the feature was just detected.
        return unsafe { lane_dots_avx512(q, keys, out) };
    }
    lane_dots_plain(q, keys, out)
}

#[inline(always)]
fn lane_dots_plain(q: &[f64], keys: &[f64], out: &mut [f64]) {
    let dd = q.len();
    for (kb, o) in keys
        .chunks_exact(dd * LANES)
        .zip(out.chunks_exact_mut(LANES))
    {
        let mut acc = [0.0f64; LANES];
        for (&qc, row) in q.iter().zip(kb.chunks_exact(LANES)) {
            acc.iter_mut().zip(row).for_each(|(a, k)| *a += qc * k);
        }
        o.copy_from_slice(&acc);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn lane_dots_avx512(q: &[f64], keys: &[f64], out: &mut [f64]) {
    lane_dots_plain(q, keys, out)
}

/// Exact softmax rows of one (batch row, head) over one document's keys, with their scratch.
struct RowSoftmax<'c> {
    ctx: &'c Ctx<'c>,
    bh: (usize, usize),
    doc: &'c Doc,
    /// The document's keys of the head's key head in blocks of [`LANES`] keys, each block
    /// `[D, LANES]` (key-minor; the last block padded with zeros): the dot products of a row
    /// with a block's keys run side by side, each summed over c in order as [`dot`] sums.
    keys: Vec<f64>,
    allowed: Vec<bool>,
    words: Vec<u64>,
    qrow: Vec<f64>,
    /// p_ij of the last row asked (0 where not allowed), `[doc keys]`.
    p: Vec<f64>,
    /// q_i . k_j of the last row asked, `[doc keys rounded up to LANES]`.
    dots: Vec<f64>,
    /// With int8 products: the keys' int8 side (`keys` then holds their int8 values) and the
    /// row's int8 query.
    int8: Option<(super::lowbit::QKeys, Vec<i8>)>,
}

impl<'c> RowSoftmax<'c> {
    fn new(ctx: &'c Ctx<'c>, (b, h): (usize, usize), doc: &'c Doc) -> RowSoftmax<'c> {
        let nk = doc.k.len();
        RowSoftmax {
            ctx,
            bh: (b, h),
            doc,
            keys: lanes_of(&doc_keys(ctx, b, ctx.kv_head(h), doc), ctx.dims.d),
            allowed: vec![false; nk],
            words: Vec::new(),
            qrow: vec![0.0; ctx.dims.d],
            p: vec![0.0; nk],
            dots: vec![0.0; nk.div_ceil(LANES) * LANES],
            int8: None,
        }
    }

    /// With `int8`, the logits from `lowbit`'s int8 queries and keys (K smoothed by the
    /// document's mean, scaled per 64-key group; each query row by its own scale):
    ///   logit(sq_i sk_G(j) sum_c qq_ic kq_jc + q_i . mu)    (the integer sum exact in f64)
    /// as `lowbit`'s estimate; without, [`RowSoftmax::new`].
    fn with_int8(ctx: &'c Ctx<'c>, (b, h): (usize, usize), doc: &'c Doc, int8: bool) -> Self {
        let mut sm = RowSoftmax::new(ctx, (b, h), doc);
        if int8 {
            let keys: Vec<usize> = doc.k.clone().collect();
            let qk = super::lowbit::quant_keys(ctx.k, b, ctx.kv_head(h), &keys);
            let vals: Vec<f64> = qk.q.iter().map(|&x| x as f64).collect();
            sm.keys = lanes_of(&vals, ctx.dims.d);
            sm.int8 = Some((qk, vec![0i8; ctx.dims.d]));
        }
        sm
    }

    /// p_i = softmax over the allowed keys of logit(q_i . k_j) into `p` (`allowed` and `qrow`
    /// are row i's); false when row i has no allowed key (`p` is then not meaningful).
    fn row(&mut self, i: usize) -> bool {
        let (ctx, (b, h)) = (self.ctx, self.bh);
        ctx.el
            .row_in((b, h, i), &self.doc.k, &mut self.allowed, &mut self.words);
        match &mut self.int8 {
            None => {
                for (c, x) in self.qrow.iter_mut().enumerate() {
                    *x = ctx.q.get(b, i, h, c) as f64;
                }
                lane_dots(&self.qrow, &self.keys, &mut self.dots);
            }
            Some((kq, qq)) => {
                let (sq, qmu) = super::lowbit::quant_row(ctx.q, (b, h, i), &kq.mu, qq);
                for (x, &v) in self.qrow.iter_mut().zip(qq.iter()) {
                    *x = v as f64;
                }
                lane_dots(&self.qrow, &self.keys, &mut self.dots);
                for (d, &sk) in self.dots.iter_mut().zip(&kq.scale) {
                    *d = super::lowbit::est_dot(sq, sk, *d as i32, qmu);
                }
            }
        }
        let mut m = f64::NEG_INFINITY;
        for (x, &a) in self.dots[..self.p.len()].iter().enumerate() {
            self.p[x] = match self.allowed[x] {
                true => ctx.logit.of(a),
                false => f64::NEG_INFINITY,
            };
            m = m.max(self.p[x]);
        }
        if m == f64::NEG_INFINITY {
            return false;
        }
        // exp only where allowed (exp(-inf) = 0 elsewhere; the same sums).
        let e = |l: f64| {
            if l == f64::NEG_INFINITY {
                0.0
            } else {
                (l - m).exp()
            }
        };
        let z: f64 = self.p.iter().map(|&l| e(l)).sum();
        self.p.iter_mut().for_each(|l| *l = e(*l) / z);
        true
    }
}

/// Query-tile columns (`columns`) for one document of (batch row, head): per part (the
/// document's rows of a query tile) the mean softmax of its sampled rows (own head, under the
/// mask)
///   m_j = 1/n sum_{r sampled} p_rj,  p_r = softmax over the allowed keys of logit(q_r . k_j),
/// and the heaviest keys (ties by index) until their mass reaches gamma sum_j m_j (at least
/// one), kept for every row of the part, with the document's first `sink` keys and its
/// diagonals 0 <= o < `local` as lines; the candidates holding a kept key are kept.
///
/// With `check` > 0, first the test of the document's last part: the mean over its rows (all
/// of them, exactly) of the mass on their kept keys, sinks and band,
///   t = mean_i sum_{j kept for i} p_ij;
/// t < check: the sampled rows do not speak for the others (row-specific heads), and the
/// document keeps every candidate of its rows; with `check_gamma` > 0 it first selects again as
/// above with gamma = `check_gamma`, and keeps every candidate only if that fails the test too.
fn columns_doc(
    ctx: &Ctx,
    (b, h): (usize, usize),
    doc: &Doc,
    (gamma, rows, [check, check_gamma], int8): (f64, usize, [f64; 2], bool),
    [sink, local]: [usize; 2],
    kept: &mut Kept,
) {
    let (k0, nk) = (doc.k.start, doc.k.len());
    // The sampled rows' softmax (int8 products with `int8`); the check's is exact.
    let mut est = RowSoftmax::with_int8(ctx, (b, h), doc, int8);
    let mut sm = RowSoftmax::new(ctx, (b, h), doc);
    // Mean softmax of every part's sampled rows: (query tile, rows, m_j over the document's keys).
    let means: Vec<(usize, Range<usize>, Vec<f64>)> = ctx
        .parts(doc)
        .map(|(qt, part)| {
            let sampled = sampled_rows(&part, rows);
            let n = sampled.len() as f64;
            let mut mass = vec![0.0f64; nk];
            for i in sampled {
                if est.row(i) {
                    mass.iter_mut().zip(&est.p).for_each(|(m, p)| *m += p / n);
                }
            }
            (qt, part, mass)
        })
        .collect();
    // Kept keys of every part at cumulative mass g: (query tile, rows, flags over the keys).
    let pick = |g: f64| -> Vec<(usize, Range<usize>, Vec<bool>)> {
        means
            .iter()
            .map(|(qt, part, mass)| {
                let total: f64 = mass.iter().sum();
                (*qt, part.clone(), cumulative(mass, g * total, 1))
            })
            .collect()
    };
    let mut picks = pick(gamma);
    let on_lines = |i: usize, x: usize| {
        let o = ctx.pos(i) - (k0 + x) as i64;
        x < sink || (0..local as i64).contains(&o)
    };
    // The check's mean over the last part's rows of their mass on the kept keys and lines.
    let mut fails = |picks: &[(usize, Range<usize>, Vec<bool>)]| -> bool {
        let Some((_, part, keep)) = picks.last().filter(|_| check > 0.0) else {
            return false;
        };
        let (mut sum, mut n) = (0.0, 0usize);
        for i in part.clone() {
            if sm.row(i) {
                sum += (0..nk)
                    .filter(|&x| keep[x] || on_lines(i, x))
                    .map(|x| sm.p[x])
                    .sum::<f64>();
                n += 1;
            }
        }
        n > 0 && sum / (n as f64) < check
    };
    if fails(&picks) {
        if check_gamma > 0.0 {
            picks = pick(check_gamma);
        }
        if check_gamma == 0.0 || fails(&picks) {
            for (qt, _) in ctx.parts(doc) {
                let xs = ctx.doc_cands(b, h, qt, doc);
                kept.or(qt, &xs, &vec![true; xs.len()]);
            }
            return;
        }
    }
    let omin = ctx.pos(doc.q.start) - (doc.k.end as i64 - 1);
    let (mut cols, mut diags) = (vec![false; nk], vec![false; doc.q.len() + nk - 1]);
    sinks_and_band((&mut cols, &mut diags), omin, [sink, local]);
    coarsen(ctx, (b, h), doc, &cols, (&diags, omin), kept);
    for (qt, _, keep) in picks {
        let xs = ctx.doc_cands(b, h, qt, doc);
        let has = prefix(&keep);
        let tiles: Vec<bool> = ctx.cand.row(b, h, qt)[xs.clone()]
            .iter()
            .map(|e| {
                let c = k_part(ctx, doc, e.k_tile as usize);
                has[c.end - k0] > has[c.start - k0]
            })
            .collect();
        kept.or_lines(qt, &xs, &tiles);
        kept.tile_keys(qt, (0..nk).filter(|&x| keep[x]).map(|x| (k0 + x) as u32));
    }
}

/// ProxyAttn's shared scores of KV group `g` in batch row `b`, per document (none for one
/// without keys or below `dense_below`), per part (query tile of the document, in order), per
/// key tile of the document:
///   S(part, kt) = mean over the sampled rows i of sum_{j in kt, j in doc} pbar_ij,
///   pbar_i = softmax over the allowed keys j of logit(qbar_i . k_j),  qbar_i = mean_{h in g} q_hi,
/// with `rows` rows per part r0..r1, i_r = r0 + floor((r + 1) (r1 - r0) / rows) - 1 (the last
/// row always among them; fewer when the part is shorter). The element mask is the group's
/// first query head's. `[document][part][doc key tile]`.
fn proxy_scores(ctx: &Ctx, b: usize, g: usize, rows: usize) -> Vec<Vec<Vec<f64>>> {
    let dd = ctx.dims.d;
    let group = ctx.dims.hq / ctx.dims.hk;
    let h0 = g * group;
    let t = ctx.cand.tile_k;
    ctx.docs[b]
        .iter()
        .map(|doc| {
            if doc.k.is_empty() || doc.k.len() < ctx.dense_below {
                return Vec::new();
            }
            let (k0, nk) = (doc.k.start, doc.k.len());
            let kt0 = ctx.doc_k_tiles(doc).start;
            let n_tiles = ctx.doc_k_tiles(doc).len();
            let keys = doc_keys(ctx, b, g, doc);
            let (mut allowed, mut words) = (vec![false; nk], Vec::new());
            let mut logits = vec![0.0f64; nk];
            let mut qbar = vec![0.0f64; dd];
            ctx.parts(doc)
                .map(|(_, part)| {
                    let mut out = vec![0.0f64; n_tiles];
                    let sampled = sampled_rows(&part, rows);
                    let n = sampled.len();
                    for i in sampled {
                        ctx.el.row_in((b, h0, i), &doc.k, &mut allowed, &mut words);
                        for (c, x) in qbar.iter_mut().enumerate() {
                            *x = (h0..h0 + group)
                                .map(|h| ctx.q.get(b, i, h, c) as f64)
                                .sum::<f64>()
                                / group as f64;
                        }
                        let mut m = f64::NEG_INFINITY;
                        for x in (0..nk).filter(|&x| allowed[x]) {
                            logits[x] = ctx.logit.of(dot(&qbar, &keys[x * dd..][..dd]));
                            m = m.max(logits[x]);
                        }
                        if m == f64::NEG_INFINITY {
                            continue;
                        }
                        let z: f64 = (0..nk)
                            .filter(|&x| allowed[x])
                            .map(|x| (logits[x] - m).exp())
                            .sum();
                        for x in (0..nk).filter(|&x| allowed[x]) {
                            out[(k0 + x) / t - kt0] += (logits[x] - m).exp() / z;
                        }
                    }
                    out.iter_mut().for_each(|x| *x /= n.max(1) as f64);
                    out
                })
                .collect()
        })
        .collect()
}

/// ProxyAttn for one document of (batch row, head): its own budget, then the proxy's best
/// tiles (`scores` = the document's [`proxy_scores`]).
///
/// Budget: the document's last `last` rows' exact block distribution a_hat of this head (as in
/// FlexPrefill's test) needs n_h tiles, heaviest first, to reach mass gamma (every candidate
/// when the rows see no key). Kept per part: the tile of the document's first key and the
/// diagonal tiles, then candidates by proxy score (descending, ties by key tile) until at least
/// min(n_h, c) of its c candidates are kept and the kept tiles hold proxy mass >= gamma.
fn proxy_doc(
    ctx: &Ctx,
    (b, h): (usize, usize),
    doc: &Doc,
    scores: &[Vec<f64>],
    [gamma]: [f64; 1],
    last: usize,
    kept: &mut Kept,
) {
    let lr = last_rows(ctx, (b, h), doc, last);
    let kts = ctx.doc_k_tiles(doc);
    let k0 = doc.k.start;
    let tile_mass: Vec<f64> = kts
        .clone()
        .map(|kt| {
            let c = k_part(ctx, doc, kt);
            lr.col[c.start - k0..c.end - k0].iter().sum()
        })
        .collect();
    let total: f64 = tile_mass.iter().sum();
    let need = match total > 0.0 {
        true => cumulative(&tile_mass, gamma * total, 1)
            .iter()
            .filter(|&&k| k)
            .count(),
        false => usize::MAX,
    };
    for ((qt, rows), score) in ctx.parts(doc).zip(scores) {
        let xs = ctx.doc_cands(b, h, qt, doc);
        let cand = &ctx.cand.row(b, h, qt)[xs.clone()];
        let m = need.min(cand.len());
        let mut keep = forced(ctx, doc, &rows, cand, true);
        let s: Vec<f64> = cand
            .iter()
            .map(|e| score[e.k_tile as usize - kts.start])
            .collect();
        let mut order: Vec<usize> = (0..cand.len()).collect();
        order.sort_unstable_by(by_score(&s));
        let mut n_kept = keep.iter().filter(|&&k| k).count();
        let mut mass: f64 = s
            .iter()
            .zip(&keep)
            .filter(|(_, &k)| k)
            .map(|(x, _)| x)
            .sum();
        for x in order {
            if n_kept >= m && mass >= gamma {
                break;
            }
            if !keep[x] {
                keep[x] = true;
                n_kept += 1;
                mass += s[x];
            }
        }
        kept.or(qt, &xs, &keep);
    }
}

/// A query tile's gathered selection: key tiles computed whole, keys gathered besides.
pub(crate) type TileSel = (Vec<u32>, Vec<u32>);

/// `columns` in the gathered form for one document of (batch row b, head h): the plain
/// reference of the device estimator (`cuda/kernels/sparse_columns.cu`, semantics in
/// [`super::columns`]). Per query tile of the document: (key tiles computed whole, keys
/// gathered besides), and the check's mean mass t of its last tile (None without a row to test).
pub(crate) fn columns_gathered(
    ctx: &Ctx,
    (b, h): (usize, usize),
    doc: &Doc,
    (gamma, rows, sink, local, int8): (f64, usize, usize, usize, bool),
) -> (Vec<TileSel>, Option<f64>) {
    use super::columns::{band_tiles, bin, NBIN};
    let (k0, nk) = (doc.k.start, doc.k.len());
    let (tq, tk) = (ctx.cand.tile_q, ctx.cand.tile_k);
    // The sampled rows' softmax (int8 products with `int8`); the check's is exact.
    let mut est = RowSoftmax::with_int8(ctx, (b, h), doc, int8);
    let mut sm = RowSoftmax::new(ctx, (b, h), doc);
    let mut out = Vec::new();
    for (qt, part) in ctx.parts(doc) {
        let cand = &ctx.cand.row(b, h, qt)[ctx.doc_cands(b, h, qt, doc)];
        let sampled = sampled_rows(&part, rows);
        let n = sampled.len() as f64;
        let mut mass = vec![0.0f64; nk];
        for &i in &sampled {
            if est.row(i) {
                mass.iter_mut().zip(&est.p).for_each(|(m, p)| *m += p);
            }
        }
        mass.iter_mut().for_each(|m| *m /= n);
        // The cut bin: the largest B whose bins >= B hold gamma of the mass.
        let mut hist = vec![0.0f64; NBIN];
        for &m in mass.iter().filter(|&&m| m > 0.0) {
            hist[bin(m)] += m;
        }
        let total: f64 = hist.iter().sum();
        let mut cut = None;
        if total > 0.0 {
            let mut acc = 0.0;
            let mut c = NBIN - 1;
            while c > 0 {
                acc += hist[c];
                if acc >= gamma * total {
                    break;
                }
                c -= 1;
            }
            cut = Some(c);
        }
        let band = band_tiles(qt, (tq, tk), (ctx.dims.sq, ctx.dims.sk), local);
        let in_band = |kt: u32| band.as_ref().is_some_and(|r| r.contains(&(kt as usize)));
        let kind = |kt: u32| cand.binary_search_by_key(&kt, |e| e.k_tile).is_ok();
        let keys: Vec<u32> = (0..nk)
            .filter(|&x| {
                let kt = ((k0 + x) / tk) as u32;
                !in_band(kt)
                    && kind(kt)
                    && (x < sink || cut.is_some_and(|c| mass[x] > 0.0 && bin(mass[x]) >= c))
            })
            .map(|x| (k0 + x) as u32)
            .collect();
        // (Candidate keys of the document: its part of each candidate tile.)
        let cand_keys: usize = cand
            .iter()
            .map(|e| {
                let (a, z) = (e.k_tile as usize * tk, e.k_tile as usize * tk + tk);
                z.min(doc.k.end).saturating_sub(a.max(k0))
            })
            .sum();
        let all: Vec<u32> = cand.iter().map(|e| e.k_tile).collect();
        out.push(if keys.len() > cand_keys / 2 {
            (all, Vec::new())
        } else {
            (all.into_iter().filter(|&kt| in_band(kt)).collect(), keys)
        });
    }
    // The check over the last tile's rows: the mass on the pairs the forward computes.
    let (mut sum, mut cnt) = (0.0, 0usize);
    if let (Some((_, part)), Some((tiles, keys))) = (ctx.parts(doc).last(), out.last()) {
        for i in part {
            if sm.row(i) {
                sum += (0..nk)
                    .filter(|&x| {
                        tiles.binary_search(&(((k0 + x) / tk) as u32)).is_ok()
                            || keys.binary_search(&((k0 + x) as u32)).is_ok()
                    })
                    .map(|x| sm.p[x])
                    .sum::<f64>();
                cnt += 1;
            }
        }
    }
    (out, (cnt > 0).then(|| sum / cnt as f64))
}

/// `columns(gathered=1)` for one document of (batch row, head): [`columns_gathered`] as the
/// selection's lines, every pair the gathered forward computes in its query tile's keys (the
/// gathered keys, and every key of the tiles it computes whole: band tiles, or all candidate
/// tiles where the keys would exceed half the tile's candidate keys), the tiles holding them
/// Partial. A failed check keeps the document's candidate tiles whole (no lines).
fn columns_gathered_doc(
    ctx: &Ctx,
    (b, h): (usize, usize),
    doc: &Doc,
    args: (f64, usize, usize, usize, bool),
    check: f64,
    kept: &mut Kept,
) {
    let (per, t) = columns_gathered(ctx, (b, h), doc, args);
    if check > 0.0 && t.is_some_and(|t| t < check) {
        for (qt, _) in ctx.parts(doc) {
            let xs = ctx.doc_cands(b, h, qt, doc);
            kept.or(qt, &xs, &vec![true; xs.len()]);
        }
        return;
    }
    let tk = ctx.cand.tile_k;
    kept.row_lines();
    for ((qt, _), (tiles, mut keys)) in ctx.parts(doc).zip(per) {
        let xs = ctx.doc_cands(b, h, qt, doc);
        for &kt in &tiles {
            let (a, z) = (kt as usize * tk, kt as usize * tk + tk);
            keys.extend(a.max(doc.k.start) as u32..z.min(doc.k.end) as u32);
        }
        keys.sort_unstable();
        let has: Vec<bool> = ctx.cand.row(b, h, qt)[xs.clone()]
            .iter()
            .map(|e| {
                let a = e.k_tile as usize * tk;
                let lo = keys.partition_point(|&j| (j as usize) < a);
                keys.get(lo).is_some_and(|&j| (j as usize) < a + tk)
            })
            .collect();
        kept.or_lines(qt, &xs, &has);
        kept.tile_keys(qt, keys.into_iter());
    }
}
