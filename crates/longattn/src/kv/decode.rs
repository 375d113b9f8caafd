//! Batched decode against a paged KV cache: the CPU twin of the CUDA decode kernel
//! ([`crate::cuda::decode`]), with the same layout, the same work split and the same LSE merge, so
//! that CI (no GPU) tests the algorithm the GPU runs.
//!
//! Layout (one layer):
//! - pages `k`, `v`: `[num_pages, page_size, Hk, D]` (f32, bf16 or f16), page size 16..=256;
//! - block tables `[B, max_pages]` (i32): logical page `i` of sequence `b` is physical page
//!   `tables[b * max_pages + i]` (entries past `ceil(len / page_size)` are never read);
//! - lengths `[B]` (i32): sequence `b` holds positions `0 .. lens[b]`;
//! - queries `[B, 1, Hq, D]` (one new token per sequence), Hq a multiple of Hk.
//!
//! Ragged per-head tables (`BlockTables::head_tables`, a compressed cache such as
//! [`super::PagedKvCache`]'s): every (sequence, KV head) has its own block table and length, tables
//! `[B, Hk, max_pages]`, lengths `[B, Hk]`, and a page holds the tokens of one KV head,
//! `[num_pages, page_size, D]`. Everything below then reads "length of (b, KV head)" for
//! "length of b"; the work split and the merge are the same.
//!
//! Output `[B, 1, Hq, D]` in the dtype of q and the natural-log LSE `[B, Hq]`:
//! for query head h (KV head h / (Hq / Hk)), `s_j = softcap(scale q . k_j)` over j < len,
//! `lse = log sum_j exp(s_j)`, `o = sum_j exp(s_j - lse) v_j`; a sequence of length 0 gives o = 0,
//! lse = -inf.
//!
//! Work split (as on the GPU): one block per (sequence b, KV head, split). Split `x` covers keys
//! `x * split_len .. min((x + 1) * split_len, len)`; the G = Hq / Hk query heads of the group are
//! processed together, so each K/V row is read once for all of them (GQA packing). A block runs the
//! online softmax over its keys and leaves a partial (o_x, lse_x); the partials are merged by LSE
//! ([`merge_splits`]). [`plan_splits`] chooses `split_len` from the amount of parallel work.
//!
//! [`PageTables`] is the page allocator (free list, per-sequence tables and lengths) shared with
//! the GPU cache; [`PagedCache`] owns pages on the host and appends new K/V into them.
//! [`decode_reference`] (gather into contiguous K/V + the f64 oracle) is the test truth.
use rayon::prelude::*;

use crate::attention::{AttnOutput, AttnParams};
use crate::error::{Error, Result};
use crate::reference::{attention_f64, RefOutput};
use crate::tensor::{Buffer, DType, Element, Slice, Tensor, TensorView};
use crate::testing::Rng;

use super::PAGE_SIZES;

const OP: &str = "kv decode";

fn param(msg: String) -> Error {
    Error::Param { op: OP, msg }
}

fn shape(tensor: &str, got: Vec<usize>, expected: String) -> Error {
    Error::Shape {
        op: OP,
        tensor: tensor.into(),
        got,
        expected,
    }
}

/// Paged K/V of one layer (borrowed): `[num_pages, page_size, Hk, D]` each.
#[derive(Clone, Copy, Debug)]
pub struct PagedKv<'a> {
    pub k: Slice<'a>,
    pub v: Slice<'a>,
    pub page_size: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl PagedKv<'_> {
    /// Elements of one page.
    pub fn page_elems(&self) -> usize {
        self.page_size * self.kv_heads * self.head_dim
    }
    pub fn num_pages(&self) -> usize {
        self.k.len() / self.page_elems().max(1)
    }
    pub fn dtype(&self) -> DType {
        self.k.dtype()
    }
}

/// Block tables `[B, max_pages]` and lengths `[B]` of a batch (borrowed, i32 as on the GPU); with
/// `head_tables`, one table and length per (sequence, KV head): `[B, Hk, max_pages]` and `[B, Hk]`,
/// pages of one KV head each (see the module documentation).
#[derive(Clone, Copy, Debug)]
pub struct BlockTables<'a> {
    pub tables: &'a [i32],
    pub max_pages: usize,
    pub lens: &'a [i32],
    pub head_tables: bool,
}

impl<'a> BlockTables<'a> {
    /// Tables shared by every KV head of a sequence (`[B, max_pages]`, lengths `[B]`).
    pub fn shared(tables: &'a [i32], max_pages: usize, lens: &'a [i32]) -> Self {
        BlockTables {
            tables,
            max_pages,
            lens,
            head_tables: false,
        }
    }
    /// Tables per (sequence, KV head) (`[B, Hk, max_pages]`, lengths `[B, Hk]`).
    pub fn per_head(tables: &'a [i32], max_pages: usize, lens: &'a [i32]) -> Self {
        BlockTables {
            tables,
            max_pages,
            lens,
            head_tables: true,
        }
    }
    /// Tables per sequence: Hk with `head_tables`, else 1.
    pub fn tables_per_seq(&self, hk: usize) -> usize {
        if self.head_tables {
            hk
        } else {
            1
        }
    }
    /// Length of (sequence b, KV head kh).
    pub fn len_of(&self, b: usize, kh: usize, hk: usize) -> usize {
        let t = self.tables_per_seq(hk);
        self.lens[b * t + kh % t].max(0) as usize
    }
    /// Physical page of logical page `i` of (sequence b, KV head kh).
    pub fn page_of(&self, b: usize, kh: usize, hk: usize, i: usize) -> usize {
        let t = self.tables_per_seq(hk);
        self.tables[(b * t + kh % t) * self.max_pages + i] as usize
    }
}

/// Tunables of one decode call.
#[derive(Clone, Debug, Default)]
pub struct DecodeParams {
    /// Multiplier of q.k (default 1/sqrt(D)).
    pub scale: Option<f32>,
    /// Logit soft-cap c: s -> c tanh(s / c).
    pub softcap: Option<f32>,
    /// Keys per split; `None` lets [`plan_splits`] choose.
    pub split_len: Option<usize>,
}

impl DecodeParams {
    pub fn scale_for(&self, d: usize) -> f32 {
        self.scale.unwrap_or(1.0 / (d as f32).sqrt())
    }
    fn attn(&self) -> AttnParams {
        AttnParams {
            scale: self.scale,
            softcap: self.softcap,
            isa: None,
            skip_below: None,
        }
    }
    pub(crate) fn check(&self) -> Result<()> {
        if let Some(s) = self.scale {
            if !s.is_finite() {
                return Err(param(format!("scale must be finite, got {s}")));
            }
        }
        if let Some(c) = self.softcap {
            if !(c.is_finite() && c > 0.0) {
                return Err(param(format!("softcap must be finite and > 0, got {c}")));
            }
        }
        if self.split_len == Some(0) {
            return Err(param("split_len must be >= 1".into()));
        }
        Ok(())
    }
}

/// Sizes of a validated decode problem.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeDims {
    pub batch: usize,
    pub hq: usize,
    pub hk: usize,
    pub d: usize,
    pub page_size: usize,
    pub num_pages: usize,
    pub max_pages: usize,
    /// Longest sequence of the batch.
    pub max_len: usize,
}

/// Checks q `[B, 1, Hq, D]` against the pages, tables and lengths: geometry, dtypes, every
/// length non-negative and covered by its table, every page index used in range. The GPU wrapper runs the same
/// checks before anything reaches the device.
pub fn validate(
    q_shape: [usize; 4],
    q_dtype: DType,
    kv: &PagedKv,
    bt: &BlockTables,
) -> Result<DecodeDims> {
    let (p, hk, d) = (kv.page_size, kv.kv_heads, kv.head_dim);
    if !PAGE_SIZES.contains(&p) {
        return Err(param(format!(
            "page size {p} outside {}..={}",
            PAGE_SIZES.start(),
            PAGE_SIZES.end()
        )));
    }
    if hk == 0 || d == 0 {
        return Err(param(format!(
            "kv heads {hk} and head dim {d} must be >= 1"
        )));
    }
    // A page holds every KV head (shared tables) or one (per-head tables).
    let page_heads = if bt.head_tables { 1 } else { hk };
    let pe = p * page_heads * d;
    if !kv.k.len().is_multiple_of(pe) || kv.v.len() != kv.k.len() {
        return Err(shape(
            "k/v pages",
            vec![kv.k.len(), kv.v.len()],
            format!(
                "equal lengths, a multiple of page_size x heads per page x D = {p} x {page_heads} x {d}"
            ),
        ));
    }
    for (name, dt) in [("k pages", kv.k.dtype()), ("v pages", kv.v.dtype())] {
        if dt != q_dtype {
            return Err(Error::DType {
                op: OP,
                tensor: name.into(),
                got: dt.to_string(),
                expected: format!("{q_dtype} (the dtype of q)"),
            });
        }
    }
    let [b, one, hq, qd] = q_shape;
    if one != 1 || qd != d || hq == 0 || !hq.is_multiple_of(hk) {
        return Err(shape(
            "q",
            q_shape.to_vec(),
            format!("[B, 1, Hq, {d}] with Hq a multiple of the {hk} KV heads"),
        ));
    }
    let t = bt.tables_per_seq(hk);
    let rows_name = if bt.head_tables {
        format!("[{b}, {hk}] (batch of q x KV heads)")
    } else {
        format!("[{b}] (the batch of q)")
    };
    if bt.lens.len() != b * t {
        return Err(shape("lens", vec![bt.lens.len()], rows_name));
    }
    if bt.tables.len() != b * t * bt.max_pages {
        return Err(shape(
            "block tables",
            vec![bt.tables.len()],
            format!(
                "{} tables of {} pages = {} entries",
                b * t,
                bt.max_pages,
                b * t * bt.max_pages
            ),
        ));
    }
    let num_pages = kv.k.len() / pe;
    let mut max_len = 0;
    for (row, &len) in bt.lens.iter().enumerate() {
        // Name the sequence (and KV head) of a table row in errors.
        let bi = if bt.head_tables {
            format!("{} (KV head {})", row / t, row % t)
        } else {
            row.to_string()
        };
        if len < 0 {
            return Err(param(format!("sequence {bi} has a negative length {len}")));
        }
        let len = len as usize;
        let need = len.div_ceil(p);
        if need > bt.max_pages {
            return Err(param(format!(
                "sequence {bi} of length {len} needs {need} pages of {p}, its block table holds {}",
                bt.max_pages
            )));
        }
        for (i, &pg) in bt.tables[row * bt.max_pages..][..need].iter().enumerate() {
            if pg < 0 || pg as usize >= num_pages {
                return Err(param(format!(
                    "block table of sequence {bi}: logical page {i} -> physical page {pg}, outside the pool of {num_pages} pages"
                )));
            }
        }
        max_len = max_len.max(len);
    }
    Ok(DecodeDims {
        batch: b,
        hq,
        hk,
        d,
        page_size: p,
        num_pages,
        max_pages: bt.max_pages,
        max_len,
    })
}

/// How the keys of every sequence are split: split `x` covers `x * split_len .. (x + 1) * split_len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitPlan {
    pub split_len: usize,
    pub num_splits: usize,
}

/// Fewest keys worth a split of their own: below this the block's fixed cost (loading q, the
/// reduction across warps) and the merge's extra read dominate the keys' own traffic.
pub const MIN_SPLIT_KEYS: usize = 256;
/// Most splits per sequence (bounds the workspace: `B * Hq * MAX_SPLITS * D` f32).
pub const MAX_SPLITS: usize = 128;

/// Chooses the split of keys. `items` blocks exist per split (B x KV heads x head chunks);
/// `slots` blocks run at once (SMs x resident blocks per SM on the GPU, threads on the CPU);
/// `align` is the granule of `split_len` (the page size, so a block walks whole pages).
///
/// Blocks are of equal size, so time goes in waves of `slots` blocks: with `w = items * s / slots`
/// waves, the last one is `w / ceil(w)` full. The rule (the one FlashAttention uses for split-KV):
/// take the fewest splits whose wave efficiency is at least 85% of the best over 1..=max, where
/// max keeps every split >= [`MIN_SPLIT_KEYS`] keys and <= [`MAX_SPLITS`] splits. Fewer splits
/// mean less merge traffic; splits only pay while the device is not yet full.
pub fn plan_splits(items: usize, slots: usize, max_len: usize, align: usize) -> SplitPlan {
    let align = align.max(1);
    if max_len == 0 || items == 0 {
        return SplitPlan {
            split_len: align,
            num_splits: 1,
        };
    }
    let slots = slots.max(1);
    let max_s = (max_len / MIN_SPLIT_KEYS).clamp(1, MAX_SPLITS);
    let eff = |s: usize| {
        let waves = (items * s) as f64 / slots as f64;
        waves / waves.ceil()
    };
    let best = (1..=max_s).map(eff).fold(0.0f64, f64::max);
    let s = (1..=max_s).find(|&s| eff(s) >= 0.85 * best).unwrap_or(1);
    split_plan_for(max_len, max_len.div_ceil(s), align)
}

/// [`plan_splits`] for rows of unequal lengths `lens` (a compressed, ragged per-head cache), each
/// row `chunks` blocks wide: the wave efficiency of a split count s counts the blocks the rows
/// really launch, sum_r ceil(len_r / split_len) per chunk, and the keys they really hold:
///
/// ```text
///   eff(s) = chunks sum_r len_r / (ceil(blocks(s) / slots) slots split_len(s))
/// ```
///
/// (a wave lasts as long as a full split). Counting rows' worth of keys instead, as
/// [`plan_splits`] does, misses each row's partial last split: 8 rows of 0.1-0.3 x 128k keys, 8
/// sequences, 264 slots gave 6 splits, 280 blocks, and a second wave of 16 blocks (H100: 0.339
/// ms against 0.308-0.311 with 16-64 splits; PERF.md). The same rule then picks the fewest splits
/// within 85% of the best. Rows of equal length get [`plan_splits`]'s plan up to the rounding of
/// `split_len` to `align` (equal on the benchmark's shapes, which the tests check).
pub fn plan_splits_ragged(
    lens: &[usize],
    chunks: usize,
    slots: usize,
    max_len: usize,
    align: usize,
) -> SplitPlan {
    let total: usize = lens.iter().map(|&l| l.min(max_len)).sum::<usize>() * chunks;
    if total == 0 || max_len == 0 {
        return plan_splits(lens.len() * chunks, slots, max_len, align);
    }
    let slots = slots.max(1);
    let max_s = (max_len / MIN_SPLIT_KEYS).clamp(1, MAX_SPLITS);
    let eff = |s: usize| {
        let p = split_plan_for(max_len, max_len.div_ceil(s), align);
        // A row of no keys still runs its first split (a -inf partial).
        let blocks: usize = lens
            .iter()
            .map(|&l| l.min(max_len).div_ceil(p.split_len).max(1))
            .sum::<usize>()
            * chunks;
        total as f64 / (blocks.div_ceil(slots) * slots * p.split_len) as f64
    };
    let effs: Vec<f64> = (1..=max_s).map(eff).collect();
    let best = effs.iter().copied().fold(0.0f64, f64::max);
    let s = effs
        .iter()
        .position(|&e| e >= 0.85 * best)
        .map_or(1, |i| i + 1);
    split_plan_for(max_len, max_len.div_ceil(s), align)
}

/// The plan with about `split_len` keys per split (rounded up to `align`), capped at
/// [`MAX_SPLITS`] splits.
pub fn split_plan_for(max_len: usize, split_len: usize, align: usize) -> SplitPlan {
    let align = align.max(1);
    let mut split_len = split_len.max(1).div_ceil(align) * align;
    if max_len.div_ceil(split_len) > MAX_SPLITS {
        split_len = max_len.div_ceil(MAX_SPLITS).div_ceil(align) * align;
    }
    SplitPlan {
        split_len,
        num_splits: max_len.div_ceil(split_len).max(1),
    }
}

/// Query heads handled by one GPU block: the whole group when G <= 8, else the largest divisor
/// of G that is <= 8 (the per-thread registers hold 8 x G values of q and of the accumulator).
pub fn heads_per_block(group: usize) -> usize {
    (1..=group.min(8))
        .rev()
        .find(|&g| group.is_multiple_of(g))
        .unwrap_or(1)
}

/// Batched decode on the CPU: see the module documentation. Returns out `[B, 1, Hq, D]` in the
/// dtype of q and lse `[B, Hq]`.
pub fn decode(
    q: &TensorView,
    kv: &PagedKv,
    bt: &BlockTables,
    params: &DecodeParams,
) -> Result<AttnOutput> {
    params.check()?;
    let dims = validate(q.shape, q.dtype(), kv, bt)?;
    let threads = rayon::current_num_threads();
    let plan = match params.split_len {
        Some(n) => split_plan_for(dims.max_len, n, 1),
        // Per-head tables: the rows' own lengths (a compressed cache is ragged).
        None if bt.head_tables => {
            let lens: Vec<usize> = bt.lens.iter().map(|&l| l.max(0) as usize).collect();
            plan_splits_ragged(&lens, 1, threads, dims.max_len, dims.page_size)
        }
        None => plan_splits(dims.batch * dims.hk, threads, dims.max_len, dims.page_size),
    };
    match (kv.k, kv.v) {
        (Slice::F32(k), Slice::F32(v)) => run::<f32>(q, k, v, bt, &dims, plan, params),
        (Slice::BF16(k), Slice::BF16(v)) => run(q, k, v, bt, &dims, plan, params),
        (Slice::F16(k), Slice::F16(v)) => run(q, k, v, bt, &dims, plan, params),
        _ => unreachable!("validate checked the dtypes"),
    }
}

/// One block's partial result: `o` `[G][D]` (normalised) and `lse` `[G]` (natural log).
struct Partial {
    o: Vec<f32>,
    lse: Vec<f32>,
}

#[allow(clippy::too_many_arguments)]
fn run<T: Element>(
    q: &TensorView,
    k: &[T],
    v: &[T],
    bt: &BlockTables,
    dims: &DecodeDims,
    plan: SplitPlan,
    params: &DecodeParams,
) -> Result<AttnOutput> {
    let DecodeDims {
        batch, hq, hk, d, ..
    } = *dims;
    let g = hq / hk;
    let s_n = plan.num_splits;
    let log2e = std::f32::consts::LOG2_E;
    let scale = params.scale_for(d);
    // Logits in log2 units: x = (scale log2 e) q.k, or with soft-cap x = (c log2 e) tanh((scale / c) q.k).
    let (q_scale, cap_mul) = match params.softcap {
        Some(c) => (scale / c, Some(c * log2e)),
        None => (scale * log2e, None),
    };
    let cfg = BlockCfg {
        k,
        v,
        bt: *bt,
        page: dims.page_size,
        hk,
        d,
        g,
        cap_mul,
    };
    // Blocks (b, kv head, split) in the GPU's grid order; a block past its sequence's end is
    // empty and skipped (the merge reads only splits that hold keys).
    let blocks: Vec<(usize, usize, usize)> = (0..batch)
        .flat_map(|b| (0..hk).flat_map(move |h| (0..s_n).map(move |x| (b, h, x))))
        .collect();
    let parts: Vec<Option<Partial>> = blocks
        .par_iter()
        .map(|&(b, kh, x)| {
            let len = bt.len_of(b, kh, hk);
            let j0 = x * plan.split_len;
            if j0 >= len && !(s_n == 1 && x == 0) {
                return None;
            }
            let j1 = (j0 + plan.split_len).min(len);
            let qg: Vec<f32> = (0..g * d)
                .map(|i| q.get(b, 0, kh * g + i / d, i % d) * q_scale)
                .collect();
            Some(cfg.block(&qg, b, kh, j0, j1))
        })
        .collect();

    // Workspace as on the GPU: o_part [B * Hq][S][D], lse_part [B * Hq][S].
    let rows = batch * hq;
    let mut o_part = vec![0.0f32; rows * s_n * d];
    let mut lse_part = vec![f32::NEG_INFINITY; rows * s_n];
    for (&(b, kh, x), part) in blocks.iter().zip(&parts) {
        let Some(part) = part else { continue };
        for gi in 0..g {
            let row = b * hq + kh * g + gi;
            o_part[(row * s_n + x) * d..][..d].copy_from_slice(&part.o[gi * d..][..d]);
            lse_part[row * s_n + x] = part.lse[gi];
        }
    }
    let (out, lse) = if s_n == 1 {
        (o_part, lse_part)
    } else {
        let counts: Vec<usize> = (0..rows)
            .map(|r| bt.len_of(r / hq, (r % hq) / g, hk).div_ceil(plan.split_len))
            .collect();
        merge_splits(&o_part, &lse_part, s_n, d, &counts)
    };
    Ok(AttnOutput {
        out: Tensor::new(Buffer::from_f32(q.dtype(), &out), vec![batch, 1, hq, d])?,
        lse,
    })
}

/// What every block of one call shares.
struct BlockCfg<'a, T> {
    k: &'a [T],
    v: &'a [T],
    bt: BlockTables<'a>,
    page: usize,
    hk: usize,
    d: usize,
    g: usize,
    cap_mul: Option<f32>,
}

/// Keys per step of the online softmax (the GPU block's step is 8 to 32 keys).
const STEP: usize = 16;

impl<T: Element> BlockCfg<'_, T> {
    /// Element offset of the K/V row of (sequence b, position j, KV head kh) in the pages.
    fn row(&self, b: usize, j: usize, kh: usize) -> usize {
        let page = self.bt.page_of(b, kh, self.hk, j / self.page);
        if self.bt.head_tables {
            (page * self.page + j % self.page) * self.d
        } else {
            ((page * self.page + j % self.page) * self.hk + kh) * self.d
        }
    }

    /// Partial attention of the G query heads of KV head `kh` (q pre-scaled, `[G][D]`) over keys
    /// `j0 .. j1` of sequence b. Per step of keys, for each head (logits x in log2 units):
    ///   m' = max(m, max_j x_j),  p_j = 2^(x_j - m'),  l' = 2^(m - m') l + sum_j p_j,
    ///   acc' = 2^(m - m') acc + sum_j p_j v_j;
    /// at the end o = acc / l, lse = ln 2 (m + log2 l) (l = 0: o = 0, lse = -inf).
    fn block(&self, q: &[f32], b: usize, kh: usize, j0: usize, j1: usize) -> Partial {
        let (d, g) = (self.d, self.g);
        let mut m = vec![f32::NEG_INFINITY; g];
        let mut l = vec![0.0f32; g];
        let mut acc = vec![0.0f32; g * d];
        let mut kf = vec![0.0f32; STEP * d];
        let mut vf = vec![0.0f32; STEP * d];
        let mut x = vec![0.0f32; STEP * g];
        let mut j = j0;
        while j < j1 {
            let n = STEP.min(j1 - j);
            // Each K/V row is converted once and used by all G heads (GQA packing).
            for t in 0..n {
                let r = self.row(b, j + t, kh);
                for (dst, src) in kf[t * d..][..d].iter_mut().zip(&self.k[r..r + d]) {
                    *dst = src.to_f32();
                }
                for (dst, src) in vf[t * d..][..d].iter_mut().zip(&self.v[r..r + d]) {
                    *dst = src.to_f32();
                }
            }
            for t in 0..n {
                let kr = &kf[t * d..][..d];
                for gi in 0..g {
                    let qr = &q[gi * d..][..d];
                    let dot: f32 = qr.iter().zip(kr).map(|(a, b)| a * b).sum();
                    x[t * g + gi] = match self.cap_mul {
                        Some(c) => c * dot.tanh(),
                        None => dot,
                    };
                }
            }
            for gi in 0..g {
                let mx = (0..n).map(|t| x[t * g + gi]).fold(m[gi], f32::max);
                // Nothing seen yet (m = -inf): subtract 0 so that 2^(-inf) = 0, never NaN.
                let base = if mx == f32::NEG_INFINITY { 0.0 } else { mx };
                let alpha = (m[gi] - base).exp2();
                m[gi] = mx;
                l[gi] *= alpha;
                let a = &mut acc[gi * d..][..d];
                a.iter_mut().for_each(|y| *y *= alpha);
                for t in 0..n {
                    let p = (x[t * g + gi] - base).exp2();
                    l[gi] += p;
                    for (y, &vv) in a.iter_mut().zip(&vf[t * d..][..d]) {
                        *y += p * vv;
                    }
                }
            }
            j += n;
        }
        let mut lse = vec![f32::NEG_INFINITY; g];
        for gi in 0..g {
            let inv = if l[gi] > 0.0 { 1.0 / l[gi] } else { 0.0 };
            acc[gi * d..][..d].iter_mut().for_each(|y| *y *= inv);
            if l[gi] > 0.0 {
                lse[gi] = (m[gi] + l[gi].log2()) * std::f32::consts::LN_2;
            }
        }
        Partial { o: acc, lse }
    }
}

/// Merges the splits of every row (the GPU's merge kernel, row for row). With the partials
/// (o_i, lse_i) of the splits holding keys, i < n (`counts[row]`), over disjoint key ranges:
///   lse = log sum_i exp(lse_i) = M + log sum_i exp(lse_i - M),   M = max_i lse_i,
///   o   = sum_i exp(lse_i - lse) o_i.
/// A row with n = 0 (length 0) or only -inf partials gets o = 0, lse = -inf.
/// `o_part` is `[rows][S][D]`, `lse_part` `[rows][S]`.
pub fn merge_splits(
    o_part: &[f32],
    lse_part: &[f32],
    s_n: usize,
    d: usize,
    counts: &[usize],
) -> (Vec<f32>, Vec<f32>) {
    let rows = counts.len();
    let mut out = vec![0.0f32; rows * d];
    let mut lse = vec![f32::NEG_INFINITY; rows];
    for (r, &n) in counts.iter().enumerate() {
        let n = n.min(s_n);
        let lp = &lse_part[r * s_n..][..n];
        let mx = lp.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if mx == f32::NEG_INFINITY {
            continue;
        }
        let sum: f32 = lp.iter().map(|&x| (x - mx).exp()).sum();
        let l = mx + sum.ln();
        lse[r] = l;
        let o = &mut out[r * d..][..d];
        for (i, &li) in lp.iter().enumerate() {
            let w = (li - l).exp();
            for (y, &x) in o.iter_mut().zip(&o_part[(r * s_n + i) * d..][..d]) {
                *y += w * x;
            }
        }
    }
    (out, lse)
}

/// The reference: each sequence's K/V gathered into contiguous `[1, len, Hk, D]` and attended by
/// the f64 oracle. Output `[B, 1, Hq, D]`, LSE `[B, Hq]`.
pub fn decode_reference(
    q: &TensorView,
    kv: &PagedKv,
    bt: &BlockTables,
    params: &DecodeParams,
) -> Result<RefOutput> {
    params.check()?;
    let dims = validate(q.shape, q.dtype(), kv, bt)?;
    let DecodeDims {
        batch, hq, hk, d, ..
    } = dims;
    let g = hq / hk;
    let mut out = vec![0.0f64; batch * hq * d];
    let mut lse = vec![f64::NEG_INFINITY; batch * hq];
    let (ks, vs, p) = (kv.k, kv.v, kv.page_size);
    // Each (sequence, KV head): its keys gathered, its group of query heads attended.
    for b in 0..batch {
        for kh in 0..hk {
            let len = bt.len_of(b, kh, hk);
            if len == 0 {
                continue; // no key: o = 0, lse = -inf (a view cannot have a zero dimension)
            }
            let mut kc = Vec::with_capacity(len * d);
            let mut vc = Vec::with_capacity(len * d);
            for j in 0..len {
                let page = bt.page_of(b, kh, hk, j / p);
                let r = if bt.head_tables {
                    (page * p + j % p) * d
                } else {
                    ((page * p + j % p) * hk + kh) * d
                };
                kc.extend((r..r + d).map(|i| ks.get_f32(i)));
                vc.extend((r..r + d).map(|i| vs.get_f32(i)));
            }
            let qb: Vec<f32> = (0..g * d)
                .map(|i| q.get(b, 0, kh * g + i / d, i % d))
                .collect();
            let qv = TensorView::contiguous(&qb[..], [1, 1, g, d])?;
            let kv_ = TensorView::contiguous(&kc[..], [1, len, 1, d])?;
            let vv = TensorView::contiguous(&vc[..], [1, len, 1, d])?;
            let r = attention_f64(&qv, &kv_, &vv, &params.attn(), &|_, _, _, _| true)?;
            out[(b * hq + kh * g) * d..][..g * d].copy_from_slice(&r.out);
            lse[b * hq + kh * g..][..g].copy_from_slice(&r.lse);
        }
    }
    Ok(RefOutput {
        out,
        lse,
        shape: [batch, 1, hq, d],
    })
}

/// The page allocator of a batch: a pool of `num_pages` pages, a free list, and per sequence its
/// block table and length. Used by [`PagedCache`] and by the GPU cache (the tables are uploaded).
#[derive(Clone, Debug)]
pub struct PageTables {
    page_size: usize,
    num_pages: usize,
    /// Free pages; `pop` takes the next one.
    free: Vec<i32>,
    seqs: Vec<Vec<i32>>,
    lens: Vec<usize>,
}

impl PageTables {
    /// `batch` empty sequences over a pool of `num_pages` pages of `page_size` tokens.
    pub fn new(page_size: usize, num_pages: usize, batch: usize) -> Result<PageTables> {
        if !PAGE_SIZES.contains(&page_size) {
            return Err(param(format!(
                "page size {page_size} outside {}..={}",
                PAGE_SIZES.start(),
                PAGE_SIZES.end()
            )));
        }
        if num_pages > i32::MAX as usize {
            return Err(param(format!("{num_pages} pages: at most 2^31 - 1")));
        }
        Ok(PageTables {
            page_size,
            num_pages,
            // Page 0 first out.
            free: (0..num_pages as i32).rev().collect(),
            seqs: vec![Vec::new(); batch],
            lens: vec![0; batch],
        })
    }
    /// The allocator state of existing tables (`[B, max_pages]`, lengths `[B]`): every page not
    /// referenced by a live position is free. The tables must pass [`validate`]'s checks.
    pub fn from_tables(
        page_size: usize,
        num_pages: usize,
        tables: &[i32],
        max_pages: usize,
        lens: &[i32],
    ) -> Result<PageTables> {
        let mut t = PageTables::new(page_size, num_pages, lens.len())?;
        if tables.len() != lens.len() * max_pages {
            return Err(shape(
                "block tables",
                vec![tables.len()],
                format!("[{}, {max_pages}]", lens.len()),
            ));
        }
        let mut used = vec![false; num_pages];
        for (b, &len) in lens.iter().enumerate() {
            let need = (len.max(0) as usize).div_ceil(page_size);
            if len < 0 || need > max_pages {
                return Err(param(format!(
                    "sequence {b}: length {len} does not fit a table of {max_pages} pages of {page_size}"
                )));
            }
            for &pg in &tables[b * max_pages..][..need] {
                if pg < 0 || pg as usize >= num_pages {
                    return Err(param(format!(
                        "block table of sequence {b}: page {pg} outside the pool of {num_pages} pages"
                    )));
                }
                used[pg as usize] = true;
            }
            t.seqs[b] = tables[b * max_pages..][..need].to_vec();
            t.lens[b] = len as usize;
        }
        t.free.retain(|&p| !used[p as usize]);
        Ok(t)
    }
    pub fn page_size(&self) -> usize {
        self.page_size
    }
    pub fn num_pages(&self) -> usize {
        self.num_pages
    }
    pub fn batch(&self) -> usize {
        self.lens.len()
    }
    pub fn free_pages(&self) -> usize {
        self.free.len()
    }
    pub fn len(&self, seq: usize) -> usize {
        self.lens.get(seq).copied().unwrap_or(0)
    }
    pub fn lens(&self) -> Vec<i32> {
        self.lens.iter().map(|&l| l as i32).collect()
    }
    pub fn max_len(&self) -> usize {
        self.lens.iter().copied().max().unwrap_or(0)
    }
    /// Shuffles the free list (tests, benchmarks: sequences get scattered, non-consecutive pages).
    pub fn shuffle_free(&mut self, seed: u64) {
        let mut rng = Rng::new(seed);
        for i in (1..self.free.len()).rev() {
            let j = rng.below(i + 1);
            self.free.swap(i, j);
        }
    }
    /// Block tables `[B, max_pages]` (rows padded with -1; at least one column) and `max_pages`.
    pub fn block_tables(&self) -> (Vec<i32>, usize) {
        let w = self.seqs.iter().map(|s| s.len()).max().unwrap_or(0).max(1);
        let mut t = vec![-1i32; self.batch() * w];
        for (b, s) in self.seqs.iter().enumerate() {
            t[b * w..][..s.len()].copy_from_slice(s);
        }
        (t, w)
    }
    /// Grows sequence `seq` by `n` positions, taking pages from the free list as needed, and
    /// returns the slot (`page * page_size + offset`) of each new position. Out of pages: an
    /// error and nothing changes.
    pub fn grow(&mut self, seq: usize, n: usize) -> Result<Vec<usize>> {
        if seq >= self.batch() {
            return Err(param(format!(
                "sequence {seq} outside the batch of {}",
                self.batch()
            )));
        }
        let p = self.page_size;
        let len = self.lens[seq];
        let need = (len + n).div_ceil(p).saturating_sub(self.seqs[seq].len());
        if need > self.free.len() {
            return Err(param(format!(
                "out of pages: sequence {seq} grows to {} tokens and needs {need} more pages of {p}, {} of {} are free",
                len + n,
                self.free.len(),
                self.num_pages
            )));
        }
        for _ in 0..need {
            let pg = self.free.pop().expect("counted above");
            self.seqs[seq].push(pg);
        }
        self.lens[seq] = len + n;
        let s = &self.seqs[seq];
        Ok((len..len + n)
            .map(|j| s[j / p] as usize * p + j % p)
            .collect())
    }
    /// Slot (`page * page_size + offset`) of position `j` of sequence `seq` (None past its length).
    pub fn slot(&self, seq: usize, j: usize) -> Option<usize> {
        let p = self.page_size;
        (j < self.len(seq)).then(|| self.seqs[seq][j / p] as usize * p + j % p)
    }
    /// Physical pages of sequence `seq` in logical order.
    pub fn pages(&self, seq: usize) -> &[i32] {
        self.seqs.get(seq).map(|s| &s[..]).unwrap_or(&[])
    }
    /// Rebuilds sequence `seq` with `n` positions on fresh pages from the free list and hands
    /// back its old pages without freeing them: the caller copies from the old slots into the new
    /// ones and only then returns the old pages ([`PageTables::give_back`]), so no later rebuild
    /// of the same batch reuses a page that is still a source. Returns (old pages, new slots).
    /// Out of pages: an error and nothing changes.
    pub fn rebuild(&mut self, seq: usize, n: usize) -> Result<(Vec<i32>, Vec<usize>)> {
        if seq >= self.batch() {
            return Err(param(format!(
                "sequence {seq} outside the batch of {}",
                self.batch()
            )));
        }
        let old = std::mem::take(&mut self.seqs[seq]);
        let old_len = std::mem::replace(&mut self.lens[seq], 0);
        match self.grow(seq, n) {
            Ok(slots) => Ok((old, slots)),
            Err(e) => {
                self.seqs[seq] = old;
                self.lens[seq] = old_len;
                Err(e)
            }
        }
    }
    /// Returns pages (taken by [`PageTables::rebuild`]) to the free list.
    pub fn give_back(&mut self, pages: &[i32]) {
        self.free.extend(pages.iter().rev());
    }
    /// Empties sequence `seq` and returns its pages to the free list.
    pub fn release(&mut self, seq: usize) -> Result<()> {
        if seq >= self.batch() {
            return Err(param(format!(
                "sequence {seq} outside the batch of {}",
                self.batch()
            )));
        }
        let pages = std::mem::take(&mut self.seqs[seq]);
        self.free.extend(pages.into_iter().rev());
        self.lens[seq] = 0;
        Ok(())
    }
}

/// A paged cache of one layer on the host, in one dtype: pages `[num_pages, page_size, Hk, D]`
/// and the [`PageTables`] of a batch.
#[derive(Clone, Debug)]
pub struct PagedCache {
    pub k: Buffer,
    pub v: Buffer,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub tables: PageTables,
    /// Block tables and lengths as i32 (refreshed after every append).
    table_cache: (Vec<i32>, usize),
    lens_cache: Vec<i32>,
}

impl PagedCache {
    /// An empty cache of `num_pages` pages (zeros) for `batch` sequences.
    pub fn new(
        dtype: DType,
        kv_heads: usize,
        head_dim: usize,
        page_size: usize,
        num_pages: usize,
        batch: usize,
    ) -> Result<PagedCache> {
        let tables = PageTables::new(page_size, num_pages, batch)?;
        if kv_heads == 0 || head_dim == 0 {
            return Err(param(format!(
                "kv heads {kv_heads} and head dim {head_dim} must be >= 1"
            )));
        }
        let n = num_pages * page_size * kv_heads * head_dim;
        let mut c = PagedCache {
            k: Buffer::zeros(dtype, n),
            v: Buffer::zeros(dtype, n),
            kv_heads,
            head_dim,
            tables,
            table_cache: (Vec::new(), 1),
            lens_cache: Vec::new(),
        };
        c.refresh();
        Ok(c)
    }
    fn refresh(&mut self) {
        self.table_cache = self.tables.block_tables();
        self.lens_cache = self.tables.lens();
    }
    pub fn dtype(&self) -> DType {
        self.k.as_slice().dtype()
    }
    /// The pages as a [`PagedKv`].
    pub fn view(&self) -> PagedKv<'_> {
        PagedKv {
            k: self.k.as_slice(),
            v: self.v.as_slice(),
            page_size: self.tables.page_size,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
        }
    }
    /// The block tables and lengths as a [`BlockTables`].
    pub fn block_tables(&self) -> BlockTables<'_> {
        BlockTables::shared(&self.table_cache.0, self.table_cache.1, &self.lens_cache)
    }

    /// Appends `n` tokens to sequence `seq`: `k`, `v` are `[1, n, Hk, D]` in the cache's dtype.
    pub fn append_seq(&mut self, seq: usize, k: &TensorView, v: &TensorView) -> Result<()> {
        let [one, n, h, d] = k.shape;
        let want = [1, n, self.kv_heads, self.head_dim];
        for (name, t) in [("k_new", k), ("v_new", v)] {
            if t.shape != want {
                return Err(shape(name, t.shape.to_vec(), format!("{want:?}")));
            }
            if t.dtype() != self.dtype() {
                return Err(Error::DType {
                    op: OP,
                    tensor: name.into(),
                    got: t.dtype().to_string(),
                    expected: format!("{} (the cache's dtype)", self.dtype()),
                });
            }
        }
        debug_assert!(one == 1 && h == self.kv_heads && d == self.head_dim);
        let slots = self.tables.grow(seq, n)?;
        self.write(&slots, k, v, 0);
        self.refresh();
        Ok(())
    }

    /// Appends `T` tokens to every sequence: `k`, `v` are `[B, T, Hk, D]` (a decode step: T = 1).
    /// Out of pages: an error and nothing changes.
    pub fn append(&mut self, k: &TensorView, v: &TensorView) -> Result<()> {
        let [b, t, _, _] = k.shape;
        let want = [self.tables.batch(), t, self.kv_heads, self.head_dim];
        for (name, x) in [("k_new", k), ("v_new", v)] {
            if x.shape != want {
                return Err(shape(name, x.shape.to_vec(), format!("{want:?}")));
            }
            if x.dtype() != self.dtype() {
                return Err(Error::DType {
                    op: OP,
                    tensor: name.into(),
                    got: x.dtype().to_string(),
                    expected: format!("{} (the cache's dtype)", self.dtype()),
                });
            }
        }
        // All or nothing: grow a copy of the tables, commit when every sequence fits.
        let mut tables = self.tables.clone();
        let mut slots = Vec::with_capacity(b);
        for s in 0..b {
            slots.push(tables.grow(s, t)?);
        }
        self.tables = tables;
        for (s, sl) in slots.iter().enumerate() {
            self.write(sl, k, v, s);
        }
        self.refresh();
        Ok(())
    }

    /// Writes row (b, i) of k/v into slot `slots[i]`.
    fn write(&mut self, slots: &[usize], k: &TensorView, v: &TensorView, b: usize) {
        let row = self.kv_heads * self.head_dim;
        fn put<T: Element>(dst: &mut [T], slots: &[usize], src: &TensorView, b: usize, row: usize) {
            let d = src.shape[3];
            for (i, &s) in slots.iter().enumerate() {
                for (x, y) in dst[s * row..][..row].iter_mut().enumerate() {
                    *y = T::from_f32(src.get(b, i, x / d, x % d));
                }
            }
        }
        for (dst, src) in [(&mut self.k, k), (&mut self.v, v)] {
            match dst {
                Buffer::F32(x) => put(x, slots, src, b, row),
                Buffer::BF16(x) => put(x, slots, src, b, row),
                Buffer::F16(x) => put(x, slots, src, b, row),
            }
        }
    }
}

/// The test and selftest input recipe: appends of random K/V (`[1, n, Hk, D]` in `dtype`) that
/// fill sequences of `lens` in interleaved chunks of `page / 2 + 5` tokens (not a multiple of the
/// page size), as `(sequence, k, v)` in order.
pub fn random_appends(
    dtype: DType,
    lens: &[usize],
    page: usize,
    hk: usize,
    d: usize,
    seed: u64,
) -> Vec<(usize, Tensor, Tensor)> {
    let chunk = page / 2 + 5;
    let mut done = vec![0usize; lens.len()];
    let mut out = Vec::new();
    let mut round = 0u64;
    while done.iter().zip(lens).any(|(a, b)| a < b) {
        for s in 0..lens.len() {
            let n = chunk.min(lens[s] - done[s]);
            if n == 0 {
                continue;
            }
            round += 1;
            let k =
                crate::testing::random_tensor(dtype, &[1, n, hk, d], 1.0, seed * 1000 + 2 * round);
            let v = crate::testing::random_tensor(
                dtype,
                &[1, n, hk, d],
                1.0,
                seed * 1000 + 2 * round + 1,
            );
            out.push((s, k, v));
            done[s] += n;
        }
    }
    out
}

/// A cache holding sequences of `lens` filled by [`random_appends`] from a free list shuffled with
/// `seed` (every block table scattered), with 3 spare pages; and random q `[B, 1, Hq, D]`.
pub fn random_cache(
    dtype: DType,
    lens: &[usize],
    page: usize,
    hq: usize,
    hk: usize,
    d: usize,
    seed: u64,
) -> Result<(PagedCache, Tensor)> {
    let pages: usize = lens.iter().map(|l| l.div_ceil(page)).sum::<usize>() + 3;
    let mut c = PagedCache::new(dtype, hk, d, page, pages, lens.len())?;
    c.tables.shuffle_free(seed);
    for (s, k, v) in random_appends(dtype, lens, page, hk, d, seed) {
        c.append_seq(s, &k.view("k")?, &v.view("v")?)?;
    }
    let q = crate::testing::random_tensor(dtype, &[lens.len(), 1, hq, d], 1.0, seed + 77);
    Ok((c, q))
}

#[cfg(test)]
#[path = "decode_tests.rs"]
mod tests;
