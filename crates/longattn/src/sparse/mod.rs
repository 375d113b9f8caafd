//! Training-free dynamic sparse prefill (issue 15, CPU): estimators that write the block schedule.
//!
//! One path of data: an estimator looks at q and k, keeps some of the key tiles of every
//! (batch, query head, query tile) that the caller's mask schedules, and writes the result as an
//! ordinary [`BlockSchedule`] (batch B, heads Hq, tiles `block` x `block`). The selection is
//! `mask & selection`: a kept tile keeps its kind from the mask's schedule (Full, or Partial with
//! the mask's own row bits), so the mask part is exact and only whole tiles are dropped. Attention
//! then runs through the existing forward ([`crate::forward`]) and backward ([`crate::backward`])
//! with [`Selection::mask`]; there is no private kernel.
//!
//! ```text
//!   SparseSpec::parse("topmass(gamma=0.95,block=128)")
//!   select(q, k, params, &spec, mask)  -> Selection { schedule, report }   (estimate.rs)
//!   forward(q, k, v, params, &spec, mask) = select + crate::forward(.., selection.mask())
//!   crate::backward(.., selection.mask(), ..)                                (same schedule)
//! ```
//!
//! # Grammar
//!
//! ```text
//!   spec := one | one '+' one                           (a union of two methods)
//!   one  := name | name '(' [arg (',' arg)*] ')'       (whitespace around tokens ignored)
//!   arg  := key '=' number
//! ```
//! Every argument is optional (defaults below), may be given once, and is range-checked; an
//! unknown method or argument is an error naming it and listing what is accepted.
//!
//! A union `A + B` keeps the tiles and pairs either method keeps (B's tiles whole under the
//! mask, A's as A keeps them: lines stay lines). Both select at one `block`; `dense_below` and
//! `skip` are the union's, given on A; B takes neither, nor `element`, and `skip` is not a
//! part. E.g. `vertical_slash(v=512,s=512,element=1)+proxy(gamma=0.7)`.
//!
//! Every method also takes `dense_below` (integer >= 0; default [`DENSE_BELOW`] = 1024 on the
//! CPU, [`cuda::CUDA_DENSE_BELOW`] on CUDA, where the estimate's launches cost more): the
//! automatic dense fallback. When the keys are fewer than `dense_below`, [`select`] runs no
//! estimator and keeps every tile of the mask ([`Selection::fallback`] is set, density 1):
//! at that length the estimate costs a sizeable part of the attention it would save and the
//! tiles every method must keep (sink, diagonal) are already a large share of a row.
//! `dense_below=0` always selects.
//!
//! Every method also takes `dense_last` (integer >= 0; default 0): the last N queries of every
//! document keep every candidate, "last rows dense" composed with the selection. At tile level
//! the query tiles holding them keep their whole candidate rows; at element level those rows
//! alone keep every pair of their tiles (the tiles stay Partial for the rows before them).
//! These are the rows a prompt asks its question in and the next token is read from.
//!
//! Every method also takes `skip` (F > 0; default 0: off): skip-softmax (BLASST) in the forward
//! through the selection ([`Selection::params`]): with lambda = F / Sk, a group of key tiles
//! whose every probability relative to its row's running maximum is below lambda, for every row
//! of the query block, is dropped without exponentials, V reads or P V
//! ([`crate::AttnParams::skip_below`]; the CPU forward and the CUDA warp-specialized forward,
//! not the backward, not under the dense fallback, F < Sk; on the GPU the V tile is still loaded).
//! The method `skip(factor=F, block)` keeps every tile of the mask and only skips.
//!
//! | method | arguments (default) | keeps, per (batch, query head, query block) |
//! |---|---|---|
//! | `topmass` | `gamma` in (0, 1] (0.95), `block` (64) | the most probable key blocks until their mass reaches gamma, under p = softmax over key blocks of the pooled score; gamma = 1 keeps every block |
//! | `relthresh` | `alpha` in [0, 1] (0.5), `block` (64) | the key blocks with p >= alpha max p (sort-free: s >= max s + ln alpha); alpha = 0 keeps every block |
//! | `moba` | `block` (512), `topk` >= 1 (3) | the topk key blocks by mean(q_block) . mean(k_block), the current (diagonal) blocks forced in first |
//! | `vertical_slash` | `v` (1000), `s` (6096), `block` (64), `last` >= 1 (64), `sink` (4), `local` (64), `element` 0 or 1 (0) | the tiles crossed by a kept column or diagonal, or with `element=1` only the pairs on them (below) |
//! | `flexprefill` | `gamma` in (0, 1] (0.9), `tau` in [0, 1] (0.1), `min_budget` (256), `block` (64), `last` >= 1 (64), `element` 0 or 1 (0) | per head, query-aware blocks or cumulative vertical-slash (its pairs only with `element=1`), chosen by a distance test (below) |
//! | `proxy` | `gamma` in (0, 1] (0.9), `rows` >= 1 (4), `block` (64), `last` >= 1 (64) | ProxyAttn: per KV group one proxy head (the mean of the group's queries) scores the key tiles by its exact softmax mass on `rows` sampled rows of the query tile, shared by the group; each head keeps sink and diagonal tiles, then the proxy's best until they hold proxy mass gamma and number at least the tiles its own last `last` rows need for mass gamma (its budget) |
//! | `columns` | `gamma` in (0, 1] (0.9), `rows` >= 1 (4), `block` (64), `sink` (4), `local` (64), `check` in [0, 1] (0), `check_gamma` in [0, 1] (0), `gathered` 0 or 1 (0), `int8` 0 or 1 (0) | element level: per query tile, the keys its `rows` sampled rows weigh most, to mass gamma, for every row of the tile, with sink columns and the local band; heads whose sample fails `check` keep every tile, or with `check_gamma` > 0 first select again to that mass (below) |
//! | `lowbit` | `tau` > 0 (0.02), `block` (64), `sink` (4), `local` (64) | SALE's idea: every allowed pair's logit estimated from int8 Q and K; the tiles with a pair whose estimated logit is within ln(1 / tau) of its row's largest over the row's sinks and band, and the tiles holding those (below) |
//! | `lowbit_mass` | `gamma` in (0, 1] (0.95), `block` (64), `sink` (4), `local` (64) | element level: the same int8 estimate; every row keeps its sinks and band, then its own keys by estimated logit until they hold gamma of its estimated softmax mass (below) |
//! | `skip` | `factor` > 0 (600), `block` (64) | every tile of the mask; the forward skips negligible key groups (above) |
//!
//! Pooled score (topmass, relthresh, moba): s(qb, kb) = softcap(scale mean(q_i, i in qb) .
//! mean(k_j, j in kb)) = softcap(mean over the block's pairs of scale q_i . k_j) (linearity).
//! topmass and relthresh always keep the sink block (key block 0) and the diagonal blocks (the key
//! blocks that hold an aligned position p_i = i + Sk - Sq of the query block); moba forces the
//! diagonal blocks. Only blocks the mask schedules are candidates, so `causal` as the mask gives
//! MoBA's causal gating; under `document` every method works per document (below).
//! Mean pooling dilutes a single hot key by the block size (its pooled logit is 1/block of the
//! key's), so the pooled methods see block-level structure (a passage of similar keys) but not a
//! lone hub column: on planted hub columns topmass(gamma=0.95) kept 97% of the pairs (the tests
//! record it); vertical-slash, which estimates per key, finds them.
//!
//! Vertical-slash (MInference): the last `last` query rows attend (exactly, under the mask) to
//! all keys; the column mass c_j = sum_i p_ij and the diagonal mass d_o = sum_{p_i - j = o} p_ij
//! estimate where the rest of the rows put theirs. Kept: the `v` heaviest columns and the `s`
//! heaviest diagonals among those with mass > 0, the columns j < `sink` and the diagonals
//! 0 <= o < `local`. The selection is coarsened to tiles: a tile is kept when a kept column or
//! diagonal passes through it.
//!
//! Element level (`element=1`, vertical_slash and flexprefill): the kept tiles are the same, but
//! they keep only the pairs on a kept column or diagonal (MInference's own granularity): each
//! becomes a Partial tile whose row bits are `mask(i, j) & (col(j) | diag(p_i - j))`
//! ([`Lines`], the selection's row mask, [`Selection::row_mask`]); density and recall count
//! those pairs. A FlexPrefill head that chose query-aware blocks keeps whole tiles. The CPU
//! forward and backward take it as any Partial schedule (a tile still costs its full product
//! there); on the GPU the selection's bits would need gathered key columns and unaligned
//! diagonal bands as schedule entry kinds, which are not built: the CUDA estimator refuses
//! `element=1`.
//!
//! Query-tile columns (`columns`, element level always): a head's mass often sits on keys
//! that neither one column set for all rows (vertical) nor offsets (slash) describe, but that
//! the rows of one query tile share (the passage they are about). Per query tile, `rows`
//! sampled rows i_r (as ProxyAttn samples them, but each head with its own queries) attend
//! exactly to every allowed key; m_j = 1/n sum_r p_(i_r) j, and the heaviest keys until their
//! mass reaches gamma sum_j m_j (at least one) are kept for every row of the tile, with the
//! document's first `sink` keys and its diagonals 0 <= o < `local` as lines ([`Lines`], a
//! sorted key list per query tile). `check` > 0 tests whether the sample speaks for the other
//! rows: on the document's last query tile, every row's exact mass on the keys kept for it;
//! a mean below `check` (heads whose rows each want their own keys) keeps every tile of the
//! document for that head; with `check_gamma` > 0 it first selects that head again to that
//! larger mass (a budget that grows where the mass is spread) and keeps every tile only if that
//! fails the check too. Cost: `rows` of every `block` rows attend densely (1/16 of the
//! score work at rows = 4, block = 64) plus the last tile under `check`. With `int8=1` the
//! sampled rows' logits come from `lowbit`'s int8 queries and keys (below; exact integer
//! products, the soft-cap and scale on top), the check's from the exact ones: the products a
//! device estimate runs at twice the bf16 rate (`sparse::columns`, CL_INT8).
//!
//! Low-bit estimate (`lowbit`, module [`lowbit`]): K smoothed by its mean over the document's
//! keys and quantized to int8 per group of 64 keys, each query row to int8 with its own scale;
//! e_ij = softcap(scale (s_q s_k sum qq kq + q_i . mu)) estimates every allowed logit. A row's
//! reference m_i is its largest e over its first `sink` keys and its band 0 <= p_i - j <
//! `local`; a candidate tile is kept when it holds such a reference pair, or when
//! max (e_ij - m_i) over its allowed pairs is at least ln tau (tau > 1 asks a pair to beat the
//! reference), or when one of its rows has no reference key. A maximum, not a sum: the device
//! takes it on the int32 products. The CPU estimator and the reference agree bit for bit (the
//! products are exact integers); the CUDA estimator computes e in f32.
//!
//! Per-row mass (`lowbit_mass`, element level always): the int8 estimate e_ij of `lowbit`,
//! read row by row. With w_ij = exp(e_ij - max_j e_ij) over the row's allowed keys, row i keeps
//! its reference keys (the document's first `sink` keys, the band 0 <= p_i - j < `local`), then
//! its other keys by e_ij descending until sum_kept w_ij >= gamma sum_j w_ij
//! ([`lowbit::mass_keep`]). The budget follows each row's mass: a head whose rows each read a
//! few keys of their own (no key set shared by a query tile holds them) keeps few, a diffuse
//! head many. The kept keys are the row's bits ([`Lines`]); the tiles they cross are Partial.
//! Its cost is `lowbit`'s products plus a partial sort per row (keys lighter than
//! (1 - gamma) / (2 n) of the row's weight are left out of it); CPU only (the CUDA estimator
//! refuses element-level specs).
//!
//! FlexPrefill: per head, the last `last` query rows give the exact block distribution
//! a_hat(kt) = sum_{j in kt} c_j / sum_j c_j and the pooled estimate
//! a_bar = softmax over the key tiles they can see of softcap(scale mean_i(q_i) . mean(k_kt)).
//! When the square-root Jensen-Shannon distance sqrt(JSD(a_bar, a_hat)) (natural logarithm, so
//! in [0, sqrt(ln 2) = 0.83]) is below `tau`, the pooled scores are trusted: every query tile
//! keeps key tiles by pooled score as `topmass(gamma)` does, at least ceil(min_budget / block)
//! of them (sink and diagonal tiles forced and counted). Otherwise the head is vertical-slash:
//! the heaviest columns until their mass reaches gamma of the total and at least
//! ceil(min_budget / block) of them (among those with mass; once coarsened a column costs at
//! most one tile of a row, so the minimum is counted in tiles in both patterns), the same for
//! diagonals, column 0 and diagonal 0 forced, coarsened to tiles as above. The slash budget is
//! cumulative too: a head whose mass sits on a few columns spreads it over every diagonal
//! o = p_i - j the last rows meet, so reaching gamma of it can keep many diagonals.
//!
//! Every method works per (batch, query head) with the key head h / (Hq / Hk) (GQA), in parallel
//! over (batch, head), for any Sq and Sk (queries aligned to the end of the keys, as the mask
//! language aligns them). Each fast estimator has a plain reference ([`reference`]: scores from
//! every pair, full sorts, brute-force tile coverage) that the tests compare it with.
//!
//! # Documents (packed varlen)
//!
//! A mask bound with document ids (the `document` atom, [`crate::mask::DocIds`]: an id per query
//! and per key) packs several documents into a batch row. Document d is a run of queries
//! Q_d = [q0, q1) with one id and the run of keys K_d = [k0, k1) with that id (empty when no key
//! has it: its rows attend nothing), and every method runs on each document alone, as on a
//! sequence of its own:
//! - last rows: the last min(last, |Q_d|) rows of Q_d; c_j = sum_i p_ij for j in K_d and
//!   d_o = sum_{p_i - j = o} p_ij over the document's pairs (o = p_i - j is the offset inside
//!   the document too);
//! - budgets per (document, head): vertical-slash's `v` / `s`, FlexPrefill's pattern test, gamma
//!   and `min_budget`, ProxyAttn's n_h count the document's columns, diagonals and tiles;
//! - sinks are the document's first keys, j - k0 < `sink` (the pooled methods' sink block is the
//!   tile of k0); the local band 0 <= o < `local` and the diagonal tiles lie inside K_d;
//! - pooled scores pool only the document's tokens. A query tile that straddles documents has a
//!   part per document (its rows in Q_d), scored against each key tile's keys in K_d:
//!   s_d(qt, kt) = softcap(scale mean_{i in qt, i in Q_d} q_i . mean_{j in kt, j in K_d} k_j);
//!   ProxyAttn samples its `rows` per part;
//! - a part's candidates are the entries of its tile's row whose key tile meets K_d, and the
//!   tile keeps the union of its parts' selections (`mask & selection` as everywhere);
//! - a document with fewer keys than `dense_below` keeps every candidate of its parts (the
//!   whole-row fallback still compares Sk).
//!
//! So with document boundaries on tile multiples (and Sq = Sk), the tiles a document's queries
//! keep are exactly those of the document run alone with the same spec (the tests check it for
//! every method). Positions stay aligned on the batch row (p_i = i + Sk - Sq). Refused with an
//! error naming the problem: a mask that uses `document` other than as a conjunct
//! (`causal | document`, `!document`: pairs across documents, which no document's estimate
//! sees), and ids that are not runs (an id whose queries, or keys, are split in a batch row),
//! both only where an estimator runs (not under the dense fallback or `skip`). A schedule given
//! as the mask ([`MaskSpec::Schedule`]) carries no ids: one document per batch row. The CUDA
//! estimator ([`cuda`]) takes the whole batch row's last rows and refuses masks with document
//! ids.
//!
//! [`SparseReport`] gives the achieved density per head; [`mass_recall`] the attention mass
//! inside the selection, computed exactly with the f64 oracle (small inputs).
//!
//! # Gates and targets from outside
//!
//! A selection made elsewhere (a learned gate's per-(batch, head) block map, SeerAttention-style)
//! needs no estimator: [`BlockSchedule::gated`] keeps the mask schedule's tiles the map keeps,
//! `mask & gate`, and [`MaskSpec::Gated`] runs it on either backend, forward and backward
//! (`longattn.BlockMask(table, block, under=EXPR)` in Python). Its training target, the
//! block-pooled attention map, comes from the dense forward: [`crate::forward_with_map`] (CPU),
//! [`crate::cuda::forward_with_map`] (the Hopper kernel, `FwdPlan::with_map`).
pub mod columns;
pub mod cuda;
mod estimate;
pub mod gather;
mod lines;
pub mod lowbit;
pub mod reference;
pub mod skip_check;
pub(crate) mod spec;
pub(crate) mod synthetic;
#[cfg(test)]
mod tests;

pub use lines::Lines;
pub use spec::{Method, SparseSpec, DENSE_BELOW};
pub use synthetic::{structured_qk, structured_qk_sharp};

use crate::attention::{check_bound, validate, AttnOutput, AttnParams, Dims, MaskSpec};
use crate::error::{Error, Result};
use crate::mask::{BlockSchedule, MaskExpr, RowMask, TileEntry, TileKind};
use crate::tensor::TensorView;
use std::borrow::Cow;
use std::collections::HashMap;
use std::ops::Range;

const OP: &str = "sparse select";

/// A selected schedule with the element mask its Partial tiles need and what it achieved.
pub struct Selection<'a> {
    /// The selected tiles: batch B, heads Hq, tiles `block` x `block`.
    pub schedule: BlockSchedule,
    /// The caller's mask at the same tiles (the candidates).
    pub candidates: Cow<'a, BlockSchedule>,
    /// The element mask of the candidates' Partial tiles (the caller's), if any.
    pub rows: Option<&'a dyn RowMask>,
    /// Element-level lines (`element=1`): the element mask of the selection's tiles (the
    /// caller's mask and the kept columns and diagonals); `None`: the selection's Partial tiles
    /// are the mask's, with `rows`.
    pub lines: Option<Lines<'a>>,
    pub report: SparseReport,
    /// The dense fallback was taken (fewer keys than the spec's `dense_below`): every
    /// candidate tile is kept and no estimator ran.
    pub fallback: bool,
    /// Skip-softmax in the forward that ran through this selection ([`forward`], the CUDA
    /// `forward` and the entry point): (tile groups tested, dropped): the CPU's key groups of a
    /// query block (read from the process-wide [`crate::cpu::skip_stats`], so concurrent
    /// forwards mix), the GPU's tiles of a consumer warpgroup (its plan's own counters). `None`
    /// without skip-softmax or before a forward.
    pub skipped: Option<(u64, u64)>,
}

impl<'a> Selection<'a> {
    /// The selection as a mask for [`crate::forward`] / [`crate::backward`].
    pub fn mask(&self) -> MaskSpec<'_> {
        MaskSpec::Schedule {
            schedule: &self.schedule,
            rows: self.row_mask(),
        }
    }

    /// The element mask of the selection's Partial tiles: the lines of an element-level
    /// selection, else the caller's.
    pub fn row_mask(&self) -> Option<&dyn RowMask> {
        self.lines.as_ref().map(|l| l as &dyn RowMask).or(self.rows)
    }

    /// The forward's parameters through this selection: `params` with the spec's skip-softmax
    /// threshold (lambda = F / Sk), none under the dense fallback (short rows: skipping cannot
    /// pay there either).
    pub fn params(&self, params: &AttnParams, spec: &SparseSpec) -> Result<AttnParams> {
        let mut p = params.clone();
        if !self.fallback {
            p.skip_below = spec.skip_below(self.schedule.sk)?;
        }
        Ok(p)
    }

    /// The selection as a u8 table `[B, Hq, query tiles, key tiles]`: 0 = tile skipped,
    /// 1 = computed whole, 2 = computed in part (a Partial tile of the mask, or of the kept
    /// lines of an element-level selection).
    pub fn block_mask(&self) -> Vec<u8> {
        let r = &self.report;
        block_table(&self.schedule, r.batch, r.heads)
    }
}

/// Expands a schedule (shared dimensions included) to `[batch, heads, q_tiles, k_tiles]` bytes:
/// 0 = not listed, else the entry's [`TileKind`] (1 Full, 2 Partial).
pub fn block_table(s: &BlockSchedule, batch: usize, heads: usize) -> Vec<u8> {
    let (nq, nk) = (s.q_tiles, s.k_tiles);
    let mut t = vec![0u8; batch * heads * nq * nk];
    for b in 0..batch {
        for h in 0..heads {
            for qt in 0..nq {
                let base = ((b * heads + h) * nq + qt) * nk;
                for e in s.row(b, h, qt) {
                    t[base + e.k_tile as usize] = e.kind as u8;
                }
            }
        }
    }
    t
}

/// Density of a selection: allowed pairs inside the selected tiles over allowed pairs of the
/// mask, per (batch row, query head).
#[derive(Clone, Debug, PartialEq)]
pub struct SparseReport {
    pub batch: usize,
    pub heads: usize,
    /// Allowed pairs in the selection, `[B, Hq]`.
    pub selected: Vec<u64>,
    /// Allowed pairs of the mask, `[B, Hq]`.
    pub allowed: Vec<u64>,
}

impl SparseReport {
    /// Density of one (batch row, head); 1 where the mask allows nothing.
    pub fn head_density(&self, b: usize, h: usize) -> f64 {
        let i = b * self.heads + h;
        ratio(self.selected[i], self.allowed[i])
    }
    /// Density over all heads: total selected pairs / total allowed pairs.
    pub fn density(&self) -> f64 {
        ratio(self.selected.iter().sum(), self.allowed.iter().sum())
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        1.0
    } else {
        a as f64 / b as f64
    }
}

/// Logits as the kernels compute them: softcap(scale x).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Logit {
    scale: f64,
    cap: Option<f64>,
}

impl Logit {
    fn new(params: &AttnParams, d: usize) -> Logit {
        Logit {
            scale: params.scale_for(d) as f64,
            cap: params.softcap.map(f64::from),
        }
    }
    /// softcap(scale dot): c tanh(scale dot / c), or scale dot without a cap.
    #[inline]
    pub(crate) fn of(self, dot: f64) -> f64 {
        let u = self.scale * dot;
        match self.cap {
            Some(c) => c * (u / c).tanh(),
            None => u,
        }
    }
}

/// One document of a batch row: its queries (one run of equal ids) and its keys (the run of
/// keys with that id; empty when no key has it). Without document ids a batch row is one
/// document, `0..Sq` and `0..Sk`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Doc {
    pub q: Range<usize>,
    pub k: Range<usize>,
}

impl Doc {
    /// The whole batch row as one document.
    pub fn whole(dims: &Dims) -> Doc {
        Doc {
            q: 0..dims.sq,
            k: 0..dims.sk,
        }
    }
}

/// True when `e` is `document` or a conjunction with `document` among its conjuncts: then every
/// pair the mask allows lies inside one document.
fn document_conjunct(e: &MaskExpr) -> bool {
    match e {
        MaskExpr::Document => true,
        MaskExpr::And(a, b) => document_conjunct(a) || document_conjunct(b),
        _ => false,
    }
}

/// The runs of equal ids of one batch row: (id, range).
fn runs(ids: &[i32]) -> Vec<(i32, Range<usize>)> {
    let mut out: Vec<(i32, Range<usize>)> = Vec::new();
    for (x, &id) in ids.iter().enumerate() {
        match out.last_mut() {
            Some((last, r)) if *last == id => r.end = x + 1,
            _ => out.push((id, x..x + 1)),
        }
    }
    out
}

/// The error for an id of batch row `b` found in two runs `a` and `c` of `side`.
fn not_a_run(b: usize, side: &str, id: i32, a: &Range<usize>, c: &Range<usize>) -> Error {
    Error::Param {
        op: OP,
        msg: format!(
            "document id {id} of batch row {b} is not one run of {side} ({side} {}..{} and {}..{}): the per-document estimate needs each document's tokens contiguous (packed varlen)",
            a.start, a.end, c.start, c.end
        ),
    }
}

/// The documents of every batch row, in query order (their query runs tile `0..Sq`): from the
/// mask's document ids when it has them, else one per batch row ([`Doc::whole`]).
///
/// Errors: a mask that uses `document` other than as a conjunct (`causal | document`,
/// `!document`: its pairs may cross documents, which a per-document estimate does not see), and
/// ids that are not runs (an id whose queries, or whose keys, are split in several runs of a
/// batch row). A schedule given as the mask carries no ids: one document per batch row.
pub(crate) fn documents(mask: &MaskSpec, dims: &Dims) -> Result<Vec<Vec<Doc>>> {
    let whole = || vec![vec![Doc::whole(dims)]; dims.batch];
    let MaskSpec::Expr(bound) = mask else {
        return Ok(whole());
    };
    let Some(docs) = &bound.docs else {
        return Ok(whole());
    };
    if !document_conjunct(bound.expr()) {
        return Err(Error::Param {
            op: OP,
            msg: format!(
                "mask `{}` uses `document` other than as a conjunct: its pairs may cross documents, which the per-document estimate does not see (write the mask as `document & (...)`)",
                bound.expr()
            ),
        });
    }
    let (sq, sk) = (dims.sq, dims.sk);
    let mut out = Vec::with_capacity(dims.batch);
    for b in 0..dims.batch {
        let mut keys: HashMap<i32, Range<usize>> = HashMap::new();
        for (id, r) in runs(&docs.k[b * sk..(b + 1) * sk]) {
            if let Some(prev) = keys.insert(id, r.clone()) {
                return Err(not_a_run(b, "keys", id, &prev, &r));
            }
        }
        let mut seen: HashMap<i32, Range<usize>> = HashMap::new();
        let mut row = Vec::new();
        for (id, r) in runs(&docs.q[b * sq..(b + 1) * sq]) {
            if let Some(prev) = seen.insert(id, r.clone()) {
                return Err(not_a_run(b, "queries", id, &prev, &r));
            }
            row.push(Doc {
                q: r,
                k: keys.get(&id).cloned().unwrap_or(0..0),
            });
        }
        out.push(row);
    }
    Ok(out)
}

/// Everything an estimator reads: inputs, sizes, the candidates (the mask at the spec's tiles),
/// the documents of every batch row.
pub(crate) struct Ctx<'a> {
    pub q: &'a TensorView<'a>,
    pub k: &'a TensorView<'a>,
    pub dims: Dims,
    pub logit: Logit,
    pub cand: &'a BlockSchedule,
    pub el: Elements<'a>,
    /// `[batch][document]`, in query order.
    pub docs: Vec<Vec<Doc>>,
    /// Documents with fewer keys keep every candidate of their queries (the dense fallback per
    /// document).
    pub dense_below: usize,
    /// Element-level lines (`element=1`): kept columns and diagonals select single pairs.
    pub element: bool,
    /// The last rows of every document that keep every candidate (`dense_last`).
    pub dense_last: usize,
}

impl Ctx<'_> {
    /// Key head of query head `h` (GQA).
    #[inline]
    pub fn kv_head(&self, h: usize) -> usize {
        h / (self.dims.hq / self.dims.hk)
    }
    /// Aligned position of query `i`: p_i = i + Sk - Sq.
    #[inline]
    pub fn pos(&self, i: usize) -> i64 {
        i as i64 + self.dims.sk as i64 - self.dims.sq as i64
    }
    /// The key tiles (inclusive range) that hold an aligned position p_i of a query `i` in
    /// `rows` inside the document's keys `doc.k` (positions p_r0 ..= p_r1-1 clipped to `doc.k`);
    /// `None` when every p_i is outside them.
    pub fn diag_tiles(&self, rows: &Range<usize>, doc: &Doc) -> Option<(u32, u32)> {
        let lo = self.pos(rows.start).max(doc.k.start as i64);
        let hi = self.pos(rows.end - 1).min(doc.k.end as i64 - 1);
        (lo <= hi).then(|| {
            let t = self.cand.tile_k as i64;
            ((lo / t) as u32, (hi / t) as u32)
        })
    }

    /// The parts of document `doc` of batch row `b` in the query tiles: (query tile, its rows
    /// inside the document), in order.
    pub fn parts<'d>(&self, doc: &'d Doc) -> impl Iterator<Item = (usize, Range<usize>)> + 'd {
        let t = self.cand.tile_q;
        let tiles = match doc.q.is_empty() {
            true => 0..0,
            false => doc.q.start / t..(doc.q.end - 1) / t + 1,
        };
        tiles.map(move |qt| (qt, (qt * t).max(doc.q.start)..((qt + 1) * t).min(doc.q.end)))
    }

    /// The key tiles that meet the document's keys, `kt0..kt1` (empty without keys).
    pub fn doc_k_tiles(&self, doc: &Doc) -> Range<usize> {
        let t = self.cand.tile_k;
        match doc.k.is_empty() {
            true => 0..0,
            false => doc.k.start / t..(doc.k.end - 1) / t + 1,
        }
    }

    /// The document's candidates in the row of (b, h, qt): the entries whose key tile meets
    /// `doc.k`, a slice `x0..x1` of the row (entries are sorted by key tile).
    pub fn doc_cands(&self, b: usize, h: usize, qt: usize, doc: &Doc) -> Range<usize> {
        let row = self.cand.row(b, h, qt);
        let kts = self.doc_k_tiles(doc);
        let x0 = row.partition_point(|e| (e.k_tile as usize) < kts.start);
        let x1 = row.partition_point(|e| (e.k_tile as usize) < kts.end);
        x0..x1.max(x0)
    }
}

/// The element mask of a schedule: a pair is allowed when its tile is listed and is Full or its
/// row bit (from `rows`) is set.
#[derive(Clone, Copy)]
pub(crate) struct Elements<'a> {
    pub s: &'a BlockSchedule,
    pub rows: Option<&'a dyn RowMask>,
}

impl Elements<'_> {
    /// One pair (a binary search in the row; tests and references).
    pub fn allowed(&self, b: usize, h: usize, i: usize, j: usize) -> bool {
        let row = self.s.row(b, h, i / self.s.tile_q);
        let kt = (j / self.s.tile_k) as u32;
        match row.binary_search_by_key(&kt, |e| e.k_tile) {
            Err(_) => false,
            Ok(x) => match (row[x].kind, self.rows) {
                (TileKind::Full, _) => true,
                (TileKind::Partial, None) => false,
                (TileKind::Partial, Some(rm)) => {
                    let mut w = [0u64];
                    rm.row_bits(b, h, i, j, &mut w);
                    w[0] & 1 == 1
                }
            },
        }
    }

    /// The allowed keys of query row `i` among the keys `keys` into `out` (length
    /// `keys.len()`, `out[x]` is key `keys.start + x`), a tile at a time.
    pub fn row_in(
        &self,
        (b, h, i): (usize, usize, usize),
        keys: &Range<usize>,
        out: &mut [bool],
        words: &mut Vec<u64>,
    ) {
        out.fill(false);
        for e in self.s.row(b, h, i / self.s.tile_q) {
            let (k0, k1) = self.s.k_range(e.k_tile as usize);
            let (c0, c1) = (k0.max(keys.start), k1.min(keys.end));
            if c0 >= c1 {
                continue;
            }
            let o = &mut out[c0 - keys.start..c1 - keys.start];
            match (e.kind, self.rows) {
                (TileKind::Full, _) => o.fill(true),
                (TileKind::Partial, None) => {}
                (TileKind::Partial, Some(rm)) => {
                    words.resize((c1 - c0).div_ceil(64), 0);
                    rm.row_bits(b, h, i, c0, words);
                    for (t, o) in o.iter_mut().enumerate() {
                        *o = words[t / 64] >> (t % 64) & 1 == 1;
                    }
                }
            }
        }
    }

    /// The allowed keys of query row `i` into `out` (length Sk), a tile at a time.
    pub fn row(&self, b: usize, h: usize, i: usize, out: &mut [bool], words: &mut Vec<u64>) {
        self.row_in((b, h, i), &(0..self.s.sk), out, words)
    }
}

/// Sizes of q and k (k stands in for v: the estimators read no values).
fn dims_of(q: &TensorView, k: &TensorView) -> Result<Dims> {
    validate(OP, q, k, k)
}

/// The caller's mask as a schedule at `tq` x `tk` tiles with its row mask.
fn candidates<'a>(
    mask: MaskSpec<'a>,
    dims: &Dims,
    (tq, tk): (usize, usize),
) -> Result<(Cow<'a, BlockSchedule>, Option<&'a dyn RowMask>)> {
    let block = tq;
    let (s, rows) = match mask.as_schedule() {
        MaskSpec::Full => (
            Cow::Owned(BlockSchedule::full(tq, tk, dims.sq, dims.sk)?),
            None,
        ),
        MaskSpec::Expr(bound) => {
            check_bound(OP, bound, dims)?;
            (
                Cow::Owned(bound.schedule(tq, tk)?),
                Some(bound as &dyn RowMask),
            )
        }
        MaskSpec::Schedule { schedule, rows } => {
            if (schedule.tile_q, schedule.tile_k) != (tq, tk) {
                return Err(Error::Param {
                    op: OP,
                    msg: format!(
                        "the mask's schedule has tiles {} x {}, the selection is made at {block} x {tk} tiles (give the mask as an expression, or a schedule at those tiles)",
                        schedule.tile_q, schedule.tile_k
                    ),
                });
            }
            (Cow::Borrowed(schedule), rows)
        }
        MaskSpec::Gated { .. } => unreachable!("as_schedule"),
    };
    crate::cpu::check_schedule(&s, rows.is_some(), dims)?;
    Ok((s, rows))
}

/// Selects the key tiles of every (batch row, query head, query tile) by `spec`, intersected with
/// `mask` (see the module header). `params` gives the scale and soft-cap of the estimates' logits.
pub fn select<'a>(
    q: &TensorView,
    k: &TensorView,
    params: &AttnParams,
    spec: &SparseSpec,
    mask: MaskSpec<'a>,
) -> Result<Selection<'a>> {
    spec.check()?;
    params.check()?;
    let dims = dims_of(q, k)?;
    let (cand, rows) = candidates(mask, &dims, (spec.block, spec.block))?;
    let dense_below = spec.dense_below_or(DENSE_BELOW);
    let fallback = dims.sk < dense_below;
    // The documents matter (and are checked) only where an estimator runs.
    let estimate = !fallback && spec.method != Method::Whole;
    let docs = match estimate {
        true => documents(&mask, &dims)?,
        false => Vec::new(),
    };
    let ctx = Ctx {
        q,
        k,
        dims,
        logit: Logit::new(params, dims.d),
        cand: &cand,
        el: Elements { s: &cand, rows },
        docs,
        dense_below,
        element: spec.element_level(),
        dense_last: spec.dense_last,
    };
    let (mut heads, mut with) = (Vec::new(), None);
    if estimate {
        heads = estimate::select_all(&ctx, &spec.method);
        if let Some(m) = spec.with {
            // The union's second method: whole tiles (no lines of its own).
            let ctx_b = Ctx {
                docs: ctx.docs.clone(),
                element: false,
                dense_last: 0,
                ..ctx
            };
            let b = estimate::select_all(&ctx_b, &m);
            heads = unite(heads, &b);
            with = Some(build(&ctx, b)?.0);
        }
    }
    let (schedule, lines) = match estimate {
        false => (cand.as_ref().clone(), None),
        true => build(&ctx, heads)?,
    };
    let lines = lines.map(|l| {
        let doc_q0 = ctx
            .docs
            .iter()
            .map(|r| r.iter().map(|d| d.q.start).collect());
        let size = (dims.hq, dims.sq, dims.sk);
        Lines::new(
            size,
            l,
            doc_q0.collect(),
            (cand.as_ref().clone(), with),
            rows,
        )
    });
    let sel_rows = lines.as_ref().map(|l| l as &dyn RowMask).or(rows);
    let report = report((&schedule, sel_rows), (&cand, rows), &dims);
    Ok(Selection {
        schedule,
        candidates: cand,
        rows,
        lines,
        report,
        fallback,
        skipped: None,
    })
}

/// The union of two selections of the same candidates, per (batch row, head) and query tile:
/// the tiles either keeps; a tile `b` keeps takes `b`'s entry (whole under the mask), `a`'s
/// lines stay with `a`'s heads.
fn unite(
    a: Vec<estimate::HeadSelection>,
    b: &[estimate::HeadSelection],
) -> Vec<estimate::HeadSelection> {
    a.into_iter()
        .zip(b)
        .map(|((rows, lines), (brows, _))| {
            let rows = rows
                .into_iter()
                .zip(brows)
                .map(|(x, y)| {
                    let mut out: Vec<TileEntry> = y.clone();
                    out.extend(
                        x.into_iter()
                            .filter(|e| y.binary_search_by_key(&e.k_tile, |f| f.k_tile).is_err()),
                    );
                    out.sort_unstable_by_key(|e| e.k_tile);
                    out
                })
                .collect();
            (rows, lines)
        })
        .collect()
}

/// Kept entries per (batch row, head) in order, each a list per query tile, into a schedule;
/// with element-level lines, those of every (batch row, head) too.
fn build(
    ctx: &Ctx,
    heads: Vec<estimate::HeadSelection>,
) -> Result<(BlockSchedule, Option<Vec<lines::HeadLines>>)> {
    let c = ctx.cand;
    let mut s = BlockSchedule::empty(c.tile_q, c.tile_k, c.sq, c.sk, ctx.dims.batch, ctx.dims.hq)?;
    s.reserve(heads.iter().flat_map(|h| &h.0).map(Vec::len).sum());
    for row in heads.iter().flat_map(|h| &h.0) {
        s.push_row_with(|out| out.extend_from_slice(row))?;
    }
    let lines = heads.into_iter().map(|h| h.1).collect::<Option<Vec<_>>>();
    Ok((s.finish()?, lines))
}

/// Allowed pairs of the selection (its schedule and element mask) and of the candidates, per
/// (batch row, head).
fn report(
    (sel, sel_rows): (&BlockSchedule, Option<&dyn RowMask>),
    (cand, rows): (&BlockSchedule, Option<&dyn RowMask>),
    dims: &Dims,
) -> SparseReport {
    let (bn, hq) = (dims.batch, dims.hq);
    let per_head = |s: &BlockSchedule, rows: Option<&dyn RowMask>| -> Vec<u64> {
        (0..bn * hq)
            .map(|r| s.allowed_pairs(r / hq, r % hq, rows))
            .collect()
    };
    SparseReport {
        batch: bn,
        heads: hq,
        selected: per_head(sel, sel_rows),
        allowed: per_head(cand, rows),
    }
}

/// Sparse attention forward: [`select`], then [`crate::forward`] through the selected schedule.
pub fn forward<'a>(
    q: &TensorView,
    k: &TensorView,
    v: &TensorView,
    params: &AttnParams,
    spec: &SparseSpec,
    mask: MaskSpec<'a>,
) -> Result<(AttnOutput, Selection<'a>)> {
    let mut sel = select(q, k, params, spec, mask)?;
    let p = sel.params(params, spec)?;
    let before = crate::cpu::skip_stats();
    let out = crate::forward(q, k, v, &p, sel.mask())?;
    if p.skip_below.is_some() {
        let after = crate::cpu::skip_stats();
        sel.skipped = Some((
            after.0.saturating_sub(before.0),
            after.1.saturating_sub(before.1),
        ));
    }
    Ok((out, sel))
}

/// Attention mass recall of a selection per (batch row, query head): the mean over the rows the
/// mask leaves non-empty of sum_{j selected} p_ij, with p the softmax over the mask's keys.
#[derive(Clone, Debug, PartialEq)]
pub struct Recall {
    /// `[B, Hq]`.
    pub per_head: Vec<f64>,
    pub mean: f64,
    pub worst: f64,
}

/// Exact mass recall of `sel` (made from these q and k) with the f64 oracle: for a row,
/// sum_{j in sel} exp(s_ij - LSE_mask) = exp(LSE_sel - LSE_mask), so two oracle passes give it.
/// Costs two dense f64 attentions: small inputs only (tests, quality tables).
pub fn mass_recall(
    q: &TensorView,
    k: &TensorView,
    params: &AttnParams,
    sel: &Selection,
) -> Result<Recall> {
    let dims = dims_of(q, k)?;
    let full = Elements {
        s: &sel.candidates,
        rows: sel.rows,
    };
    let part = Elements {
        s: &sel.schedule,
        rows: sel.row_mask(),
    };
    // k stands in for v: only the LSE is read.
    let oracle = |el: Elements| {
        crate::reference::attention_f64(q, k, k, params, &|b, h, i, j| el.allowed(b, h, i, j))
    };
    let (lf, ls) = (oracle(full)?.lse, oracle(part)?.lse);
    let per_head: Vec<f64> = (0..dims.batch * dims.hq)
        .map(|r| {
            let rows = r * dims.sq..(r + 1) * dims.sq;
            let (sum, n) = rows
                .filter(|&x| lf[x] > f64::NEG_INFINITY)
                .fold((0.0, 0usize), |(s, n), x| {
                    (s + (ls[x] - lf[x]).exp(), n + 1)
                });
            if n == 0 {
                1.0
            } else {
                sum / n as f64
            }
        })
        .collect();
    let mean = per_head.iter().sum::<f64>() / per_head.len() as f64;
    let worst = per_head.iter().copied().fold(f64::INFINITY, f64::min);
    Ok(Recall {
        per_head,
        mean,
        worst,
    })
}

/// The softmax mass of every candidate tile, summed over the tile's rows:
/// `[B, Hq, query tiles, key tiles]`, M(qt, kt) = sum_{i in qt} sum_{j in kt} p_ij with p the
/// softmax over the mask's keys. Through the kernel: for every key tile kt, one forward over
/// the candidates of column kt gives LSE_kt, and sum_{j in kt} p_ij = exp(LSE_kt(i) - LSE(i)).
/// Costs about two dense forwards (k stands in for v).
pub fn tile_mass(
    q: &TensorView,
    k: &TensorView,
    params: &AttnParams,
    sel: &Selection,
) -> Result<Vec<f64>> {
    let dims = dims_of(q, k)?;
    let c = sel.candidates.as_ref();
    let (bn, hq, sq) = (dims.batch, dims.hq, dims.sq);
    let (nq, nk) = (c.q_tiles, c.k_tiles);
    let full = crate::forward(
        q,
        k,
        k,
        params,
        MaskSpec::Schedule {
            schedule: c,
            rows: sel.rows,
        },
    )?;
    let mut mass = vec![0.0f64; bn * hq * nq * nk];
    for kt in 0..nk as u32 {
        let mut col = BlockSchedule::empty(c.tile_q, c.tile_k, c.sq, c.sk, bn, hq)?;
        let mut any = false;
        for b in 0..bn {
            for h in 0..hq {
                for qt in 0..nq {
                    let e: Vec<TileEntry> = c
                        .row(b, h, qt)
                        .iter()
                        .filter(|e| e.k_tile == kt)
                        .copied()
                        .collect();
                    any |= !e.is_empty();
                    col.push_row(&e)?;
                }
            }
        }
        if !any {
            continue;
        }
        let col = col.finish()?;
        let part = crate::forward(
            q,
            k,
            k,
            params,
            MaskSpec::Schedule {
                schedule: &col,
                rows: sel.rows,
            },
        )?;
        for b in 0..bn {
            for h in 0..hq {
                let lse = (b * hq + h) * sq;
                for i in 0..sq {
                    let (lp, lf) = (part.lse[lse + i], full.lse[lse + i]);
                    if lp > f32::NEG_INFINITY && lf > f32::NEG_INFINITY {
                        let qt = i / c.tile_q;
                        mass[((b * hq + h) * nq + qt) * nk + kt as usize] +=
                            (lp as f64 - lf as f64).exp();
                    }
                }
            }
        }
    }
    Ok(mass)
}

/// The mass recall of the best selection with as many tiles as `sel` in every (batch row, head,
/// query tile): there, the tiles with the most mass M(qt, kt) ([`tile_mass`]), which maximise
/// the sum of the rows' recalls. Per head: sum over query tiles of the kept masses / the rows
/// the mask leaves non-empty (the same normalisation as [`mass_recall`]). Tile selections
/// only: an element-level selection (`element=1`) is refused.
pub fn best_recall(
    q: &TensorView,
    k: &TensorView,
    params: &AttnParams,
    sel: &Selection,
) -> Result<Recall> {
    if sel.lines.is_some() {
        return Err(Error::Param {
            op: OP,
            msg: "best_recall compares tile counts: an element-level selection (element=1) keeps pairs, not whole tiles".into(),
        });
    }
    let dims = dims_of(q, k)?;
    let mass = tile_mass(q, k, params, sel)?;
    let c = sel.candidates.as_ref();
    let (nq, nk) = (c.q_tiles, c.k_tiles);
    let el = Elements {
        s: c,
        rows: sel.rows,
    };
    let (mut keys, mut words) = (vec![false; dims.sk], Vec::new());
    let per_head: Vec<f64> = (0..dims.batch * dims.hq)
        .map(|r| {
            let (b, h) = (r / dims.hq, r % dims.hq);
            let rows = (0..dims.sq)
                .filter(|&i| {
                    el.row(b, h, i, &mut keys, &mut words);
                    keys.contains(&true)
                })
                .count();
            let mut sum = 0.0;
            for qt in 0..nq {
                let m = &mass[(r * nq + qt) * nk..][..nk];
                let mut tiles: Vec<f64> = c
                    .row(b, h, qt)
                    .iter()
                    .map(|e| m[e.k_tile as usize])
                    .collect();
                tiles.sort_unstable_by(|x, y| y.total_cmp(x));
                sum += tiles[..sel.schedule.row(b, h, qt).len()]
                    .iter()
                    .sum::<f64>();
            }
            if rows == 0 {
                1.0
            } else {
                (sum / rows as f64).min(1.0)
            }
        })
        .collect();
    let mean = per_head.iter().sum::<f64>() / per_head.len() as f64;
    let worst = per_head.iter().copied().fold(f64::INFINITY, f64::min);
    Ok(Recall {
        per_head,
        mean,
        worst,
    })
}
