//! KV-cache compression on the GPU, over the ragged per-head cache
//! ([`KvLayout::HeadPaged`]: pages of one KV head, a block table and a length per (sequence, KV
//! head)) and the one decode kernel (`cuda/kernels/decode.cu`, per-head tables):
//! - eviction: [`DevPagedCache::compress_heads`] keeps a subset of every head's entries,
//!   compacted into fresh pages; the freed pages go back to the pool; decode then reads only
//!   what is kept;
//! - Quest ([`DevQuest`], kernels `cuda/kernels/kv_quest.cu`): per-page key bounds kept on the
//!   device, pages scored per query and the top pages written as block tables by the device (no
//!   host synchronisation), then the unchanged decode over those tables. Selection is per KV head
//!   (the G query heads' bounds reduced by max / sum / mean: the group shares one read of K / V);
//!   the CPU policy [`super::quest`] selects per query head, and its keep rule
//!   ([`super::quest::select_pages`]) is what the device applies to the reduced scores.
//!
//! Plain references beside them: [`quest_scores_reference`] (bounds recomputed from the keys in
//! f64) and the f64 decode oracle over the selected tables ([`selftest`]); the speeds are
//! measured by [`bench`] (`longattn kv bench`).
use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};

use super::decode::{decode_reference, BlockTables, DecodeParams, PagedKv};
use super::kivi::Kivi;
use super::kivi_cuda::DevKivi;
use super::quest::{select_pages, Quest};
use super::score::{Reduce, ScoreKind, ScoreParams};
use super::score_cuda::DevScores;
use crate::cuda::decode::{DecodePlan, DevPagedCache, KvLayout};
use crate::cuda::selftest::CaseResult;
use crate::cuda::{drv, CudaDevice, DevTensor};
use crate::error::{Error, Result};
use crate::tensor::{Buffer, DType, Tensor};
use crate::testing::{compare, out_tolerance, random_tensor, Rng};

const COMMON: &str = include_str!("../cuda/kernels/common.cuh");
const SELECT: &str = include_str!("../cuda/kernels/select.cuh");
const QUEST: &str = include_str!("../cuda/kernels/kv_quest.cu");
const OP: &str = "cuda kv";
/// Most page keys per row the Quest select kernel keeps in shared memory.
const SMEM_KEYS: usize = 16384;
/// Most candidates per row the Quest select kernel holds in registers (1024 threads x LQ_KPT).
const REG_KEYS: usize = 8192;

/// Rows of at most this many candidates stay on the select kernel's shared path (H100,
/// 2026-12-07: the register path took quest(0.2)'s score + select from 62 to 72 us at 32 x 8k,
/// 512 pages a row, and from 45 to 38 us at 1 x 128k, 8192 pages).
const REG_MIN: usize = 2048;

fn param(msg: String) -> Error {
    Error::Param { op: OP, msg }
}

/// Field for field `LaQuestParams` in `kernels/kv_quest.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct LaQuestParams {
    q: u64,
    k: u64,
    meta: u64,
    tables: u64,
    lens: u64,
    score: u64,
    sel_tables: u64,
    sel_lens: u64,
    budget: f64,
    b: i32,
    hq: i32,
    hk: i32,
    max_pages: i32,
    sel_pages: i32,
    tail_only: i32,
    reduce: i32,
    score_stride: i32,
    smem_keys: i32,
    reg_keys: i32,
    reg_min: i32,
}

// SAFETY: plain-old-data with the C layout of the kernel's parameter struct.
unsafe impl cudarc::driver::DeviceRepr for LaQuestParams {}

/// Rows of more than this many (and at most REG_KEYS) candidates take the Quest select
/// kernel's register path. The register path runs its passes over all 1024 x 8 slots whatever
/// the row's length, so short rows stay on the shared path: `LONGATTN_CUDA_QUEST_REG_MIN`
/// (default REG_MIN; REG_KEYS turns the register path off).
fn reg_min() -> usize {
    std::env::var("LONGATTN_CUDA_QUEST_REG_MIN")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(REG_MIN)
        .min(REG_KEYS)
}

/// Pages each lane group of the score kernel scores (`LQ_SPP`): 3 (H100, 2026-12-07, three runs
/// each: score + select at 1 x 128k 38.1 / 35.4 / 33.9 us with 1 / 2 / 3, at 8 x 128k 138.3 /
/// 138.4 / 132.1 us, at 32 x 8k 56.6 / 55.7 / 55.9 us; 4 took 61 us at 32 x 8k).
/// `LONGATTN_CUDA_QUEST_SPP` (1..=8) overrides (A / B runs).
fn score_pages() -> usize {
    std::env::var("LONGATTN_CUDA_QUEST_SPP")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| (1..=8).contains(n))
        .unwrap_or(3)
}

/// Whether the select kernel's register path starts its radix passes at the keys' first
/// differing bit and stops at a bin that holds exactly the keys still wanted (`LQ_PREFIX`,
/// `la_radix_top_in`); `LONGATTN_CUDA_QUEST_PREFIX=0` gives the four fixed passes (A / B runs).
fn prefix_select() -> bool {
    crate::cuda::forward::env_off("LONGATTN_CUDA_QUEST_PREFIX")
}

/// Quest on the device for one layer's per-head cache: the page bounds, the scores, the
/// selected tables and the decode plan over them (see the module documentation).
pub struct DevQuest {
    dev: Arc<CudaDevice>,
    bounds: CudaFunction,
    score_fn: CudaFunction,
    select: CudaFunction,
    pub quest: Quest,
    pub reduce: Reduce,
    /// `[num_pages, 2, D]` min / max per physical page (storage dtype).
    meta: CudaSlice<u16>,
    /// `[rows, cap_pages]`.
    score: CudaSlice<f32>,
    /// `[rows, sel_pages]` and `[rows]`: what the decode reads.
    sel_tables: CudaSlice<i32>,
    sel_lens: CudaSlice<i32>,
    sel_pages: usize,
    cap_pages: usize,
    /// Candidates per row whose keys the select kernel holds in shared memory.
    smem_keys: usize,
    /// Rows of more than `reg_min` and at most REG_KEYS candidates take the select kernel's
    /// register path.
    reg_min: usize,
    /// Pages a lane group of the score kernel scores (its `LQ_SPP`).
    score_pages: usize,
    rows: usize,
    hq: usize,
    /// Decode over the selected tables.
    pub plan: DecodePlan,
}

impl DevQuest {
    /// Quest for `cache` (per-head pages of `quest.page` tokens) with `hq` query heads, for rows of
    /// at most `max_len` entries.
    pub fn new(
        dev: &Arc<CudaDevice>,
        cache: &DevPagedCache,
        hq: usize,
        max_len: usize,
        quest: Quest,
        reduce: Reduce,
        params: &DecodeParams,
    ) -> Result<DevQuest> {
        quest.check()?;
        let KvLayout::HeadPaged { page_size } = cache.layout else {
            return Err(param(format!(
                "Quest on the device needs a per-head paged cache, this one is {}",
                cache.layout.name()
            )));
        };
        if page_size != quest.page {
            return Err(param(format!(
                "`{quest}`: its pages must be the cache's ({page_size} tokens)"
            )));
        }
        let (d, hk, b) = (cache.head_dim, cache.kv_heads, cache.batch());
        if hq == 0 || !hq.is_multiple_of(hk) {
            return Err(param(format!(
                "{hq} query heads: must be a multiple of the {hk} KV heads"
            )));
        }
        let dt = cache.dtype;
        let spp = score_pages();
        let prefix = prefix_select() as u8;
        let defines = vec![
            ("LA_F16".into(), ((dt == DType::F16) as u8).to_string()),
            ("LA_D".into(), d.to_string()),
            ("LA_PAGE".into(), page_size.to_string()),
            ("LQ_SPP".into(), spp.to_string()),
            ("LQ_PREFIX".into(), prefix.to_string()),
        ];
        let src = format!("{COMMON}\n{SELECT}\n{QUEST}");
        let variant = format!("kv_quest_{}_d{d}_p{page_size}_s{spp}_x{prefix}", dt.name());
        let f = |name: &str| dev.function(&variant, name, &src, &defines, 0);
        let cap_pages = max_len.div_ceil(page_size).max(1);
        // Up to SMEM_KEYS candidates (64 KiB of keys) stay in shared memory for the select
        // passes; the kernel is loaded once allowing the most (the launch asks for what it uses).
        // Rows of more than reg_min and at most REG_KEYS candidates take the kernel's register
        // path instead (`reg_min`).
        let reg_min = reg_min();
        let smem_keys = cap_pages.min(SMEM_KEYS);
        let (bounds, score_fn) = (f("la_quest_bounds")?, f("la_quest_score")?);
        let select = dev.function(&variant, "la_quest_select", &src, &defines, SMEM_KEYS * 4)?;
        let rows = b * hk;
        let sel_pages = quest.pages_for(max_len.max(1) - 1).min(cap_pages).max(1);
        let s = dev.stream();
        let alloc_i32 = |n: usize| {
            s.alloc_zeros::<i32>(n.max(1))
                .map_err(drv("alloc quest tables"))
        };
        let num_pages = cache.k.len() / (page_size * d);
        let meta = s
            .alloc_zeros::<u16>((num_pages * 2 * d).max(1))
            .map_err(drv("alloc quest bounds"))?;
        let score = s
            .alloc_zeros::<f32>((rows * cap_pages).max(1))
            .map_err(drv("alloc quest scores"))?;
        let plan = DecodePlan::for_layout(
            dev,
            cache.layout,
            (dt, hk, d, b),
            hq,
            sel_pages * page_size,
            params,
        )?;
        Ok(DevQuest {
            dev: dev.clone(),
            bounds,
            score_fn,
            select,
            quest,
            reduce,
            meta,
            score,
            sel_tables: alloc_i32(rows * sel_pages)?,
            sel_lens: alloc_i32(rows)?,
            sel_pages,
            cap_pages,
            smem_keys,
            reg_min,
            score_pages: spp,
            rows,
            hq,
            plan,
        })
    }

    fn params(&self, cache: &DevPagedCache, q: u64) -> Result<LaQuestParams> {
        if cache.layout
            != (KvLayout::HeadPaged {
                page_size: self.quest.page,
            })
            || cache.batch() * cache.kv_heads != self.rows
        {
            return Err(param(format!(
                "cache ({}, {} rows) is not the one this Quest was made for ({} rows)",
                cache.layout.name(),
                cache.batch() * cache.kv_heads,
                self.rows
            )));
        }
        let max = cache.max_len();
        if max > self.cap_pages * self.quest.page {
            return Err(param(format!(
                "a head holds {max} entries; this Quest covers {} (make a new one)",
                self.cap_pages * self.quest.page
            )));
        }
        let s = self.dev.stream();
        let (tables, max_pages, lens) = cache.device_tables();
        Ok(LaQuestParams {
            q,
            k: cache.k.device_ptr(s).0,
            meta: self.meta.device_ptr(s).0,
            tables: tables.device_ptr(s).0,
            lens: lens.device_ptr(s).0,
            score: self.score.device_ptr(s).0,
            sel_tables: self.sel_tables.device_ptr(s).0,
            sel_lens: self.sel_lens.device_ptr(s).0,
            budget: self.quest.budget,
            b: cache.batch() as i32,
            hq: self.hq as i32,
            hk: cache.kv_heads as i32,
            max_pages: max_pages as i32,
            sel_pages: self.sel_pages as i32,
            tail_only: 0,
            reduce: self.reduce.kernel_code(),
            score_stride: self.cap_pages as i32,
            smem_keys: self.smem_keys as i32,
            reg_keys: REG_KEYS as i32,
            reg_min: self.reg_min as i32,
        })
    }

    /// Recomputes the bounds of every page of every row (`tail_only`: of each row's last page,
    /// the one an append touches). Asynchronous on the device's stream.
    pub fn update_bounds(&self, cache: &DevPagedCache, tail_only: bool) -> Result<()> {
        let mut p = self.params(cache, 0)?;
        p.tail_only = tail_only as i32;
        let ppb = 256 / (cache.head_dim / 8);
        let gx = if tail_only {
            1
        } else {
            (p.max_pages as usize).div_ceil(ppb).max(1)
        };
        let cfg = LaunchConfig {
            grid_dim: (gx as u32, self.rows.max(1) as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        if self.rows == 0 {
            return Ok(());
        }
        let s = self.dev.stream();
        let mut lb = s.launch_builder(&self.bounds);
        lb.arg(&p);
        // SAFETY: the struct matches the kernel's; tables and lengths are the cache's (checked
        // against its pool when built), meta holds 2 D values per pool page.
        unsafe { lb.launch(cfg) }.map_err(drv("launch quest bounds"))?;
        Ok(())
    }

    /// Scores the pages for q `[B, 1, Hq, D]` and writes the selected tables (asynchronous).
    pub fn select(&self, cache: &DevPagedCache, q: &DevTensor) -> Result<()> {
        let want = [cache.batch(), 1, self.hq, cache.head_dim];
        if q.shape != want || q.dtype != cache.dtype {
            return Err(Error::Shape {
                op: OP,
                tensor: "q".into(),
                got: q.shape.to_vec(),
                expected: format!("{want:?} in {}", cache.dtype),
            });
        }
        if self.rows == 0 {
            return Ok(());
        }
        let s = self.dev.stream();
        let p = self.params(cache, q.data.device_ptr(s).0)?;
        let ppb = 256 / (cache.head_dim / 8) * self.score_pages;
        let score_cfg = LaunchConfig {
            grid_dim: (
                (p.max_pages as usize).div_ceil(ppb).max(1) as u32,
                self.rows as u32,
                1,
            ),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut lb = s.launch_builder(&self.score_fn);
        lb.arg(&p);
        // SAFETY: as in update_bounds; q has the checked shape; scores hold cap_pages per row,
        // at least the table width (the cache's longest row is within the capacity).
        unsafe { lb.launch(score_cfg) }.map_err(drv("launch quest score"))?;
        let sel_cfg = LaunchConfig {
            grid_dim: (self.rows as u32, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: (self.smem_keys * 4) as u32,
        };
        let mut lb = s.launch_builder(&self.select);
        lb.arg(&p);
        // SAFETY: as above; a row writes at most pages_for(len - 1) <= sel_pages entries.
        unsafe { lb.launch(sel_cfg) }.map_err(drv("launch quest select"))?;
        Ok(())
    }

    /// Selection, then decode over it: o `[B, 1, Hq, D]`, lse `[B, Hq]` (asynchronous).
    pub fn decode(
        &self,
        cache: &DevPagedCache,
        q: &DevTensor,
        o: &mut DevTensor,
        lse: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.select(cache, q)?;
        let want = [cache.batch(), 1, self.hq, cache.head_dim];
        if o.shape != want
            || o.dtype != cache.dtype
            || lse.len() < self.rows / cache.kv_heads * self.hq
        {
            return Err(Error::Shape {
                op: OP,
                tensor: "out / lse".into(),
                got: o.shape.to_vec(),
                expected: format!("{want:?} in {} and [B, Hq] f32", cache.dtype),
            });
        }
        let s = self.dev.stream();
        let raw = cache.raw_decode(
            q,
            o,
            lse,
            Some((&self.sel_tables, self.sel_pages, &self.sel_lens)),
        );
        // SAFETY: the selected tables hold pages of the cache's pool (copied from its tables),
        // their lengths are at most sel_pages x P (the plan's keys), q / o / lse checked above.
        unsafe { self.plan.launch_raw(s, raw) }
    }

    /// The selected tables `[rows, sel_pages]`, their width and lengths (tests).
    pub fn selection(&self) -> Result<(Vec<i32>, usize, Vec<i32>)> {
        self.dev.synchronize()?;
        Ok((
            self.dev.download(&self.sel_tables)?,
            self.sel_pages,
            self.dev.download(&self.sel_lens)?,
        ))
    }

    /// The scores `[rows, cap_pages]` (tests) and the row stride.
    pub fn scores(&self) -> Result<(Vec<f32>, usize)> {
        self.dev.synchronize()?;
        Ok((self.dev.download(&self.score)?, self.cap_pages))
    }

    /// The bounds `[num_pages, 2, D]` (tests).
    pub fn bounds(&self) -> Result<Vec<u16>> {
        self.dev.synchronize()?;
        self.dev.download(&self.meta)
    }
}

/// Plain reference of the device's scores: for row r (sequence r / Hk, KV head r % Hk) and each
/// page i before the row's last, the bound sum_d max(q_d min_d, q_d max_d) of every query head of
/// the group over the page's keys (min / max recomputed from the keys, f64), reduced over the
/// group. `k` is the per-head pool `[num_pages, P, D]` as f32.
#[allow(clippy::too_many_arguments)]
pub fn quest_scores_reference(
    q: &[f32],
    k: &[f32],
    (tables, max_pages, lens): (&[i32], usize, &[i32]),
    page: usize,
    d: usize,
    (hq, hk): (usize, usize),
    reduce: Reduce,
) -> Vec<Vec<f64>> {
    let g = hq / hk;
    lens.iter()
        .enumerate()
        .map(|(r, &len)| {
            let (b, kh) = (r / hk, r % hk);
            let len = len.max(0) as usize;
            let cur = len.saturating_sub(1) / page;
            (0..if len == 0 { 0 } else { cur })
                .map(|i| {
                    let pg = tables[r * max_pages + i] as usize;
                    let n = page.min(len - i * page);
                    let bound = |h: usize| -> f64 {
                        (0..d)
                            .map(|x| {
                                let col = (0..n).map(|t| k[(pg * page + t) * d + x] as f64);
                                let mn = col.clone().fold(f64::INFINITY, f64::min);
                                let mx = col.fold(f64::NEG_INFINITY, f64::max);
                                let qx = q[(b * hq + h) * d + x] as f64;
                                (qx * mn).max(qx * mx)
                            })
                            .sum()
                    };
                    let us = (0..g).map(|j| bound(kh * g + j));
                    match reduce {
                        Reduce::Max => us.fold(f64::NEG_INFINITY, f64::max),
                        Reduce::Sum => us.sum(),
                        Reduce::Mean => us.sum::<f64>() / g as f64,
                    }
                })
                .collect()
        })
        .collect()
}

/// A random per-head cache on the host: `lens` per (sequence, KV head) row, pages of one head
/// scattered over a pool with spare pages, K / V uniform in [-1, 1) with a few planted heavy
/// keys (so that selection matters), and q `[B, 1, Hq, D]`. Returns (k, v, tables, max_pages, q).
#[allow(clippy::type_complexity)]
pub fn random_head_cache(
    dtype: DType,
    lens: &[i32],
    page: usize,
    (hq, hk, d): (usize, usize, usize),
    seed: u64,
) -> Result<(Tensor, Tensor, Vec<i32>, usize, Tensor)> {
    let b = lens.len() / hk;
    let need = |l: i32| (l.max(0) as usize).div_ceil(page);
    let w = lens.iter().map(|&l| need(l)).max().unwrap_or(0).max(1);
    let pages: usize = lens.iter().map(|&l| need(l)).sum::<usize>() + 3;
    let mut order: Vec<i32> = (0..pages as i32).collect();
    let mut rng = Rng::new(seed);
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i + 1));
    }
    let mut tables = vec![-1i32; lens.len() * w];
    let mut next = order.into_iter();
    for (r, &l) in lens.iter().enumerate() {
        for x in tables[r * w..][..need(l)].iter_mut() {
            *x = next.next().expect("counted");
        }
    }
    let k = random_tensor(dtype, &[pages * page * d], 1.0, seed + 1);
    let v = random_tensor(dtype, &[pages * page * d], 1.0, seed + 2);
    let q = random_tensor(dtype, &[b, 1, hq, d], 1.0, seed + 3);
    // Heavy keys: a few rows scaled up (their pages carry wide bounds and large logits).
    let mut kf = k.data.to_f32_vec();
    for _ in 0..(pages * page / 97).max(1) {
        let row = rng.below(pages * page);
        for x in &mut kf[row * d..][..d] {
            *x *= 4.0;
        }
    }
    let k = Tensor::new(Buffer::from_f32(dtype, &kf), vec![pages * page * d])?;
    Ok((k, v, tables, w, q))
}

/// Storage bits (as the device holds them) as a host buffer of `dt`.
pub(super) fn from_bits(bits: Vec<u16>, dt: DType) -> Buffer {
    match dt {
        DType::F16 => Buffer::F16(bits.into_iter().map(half::f16::from_bits).collect()),
        _ => Buffer::BF16(bits.into_iter().map(half::bf16::from_bits).collect()),
    }
}

fn case(name: String, r: Result<(f64, f64, String, bool)>, tol: f64) -> CaseResult {
    CaseResult::checked("kv", name, r, tol)
}

/// A host per-head cache (pool `[pages, P, D]` of K and V, tables `[rows, w]`, row lengths) on the
/// device.
fn upload_heads(
    dev: &Arc<CudaDevice>,
    (k, v): (&Tensor, &Tensor),
    (tables, w, lens): (&[i32], usize, &[i32]),
    (page, hk, d): (usize, usize, usize),
) -> Result<DevPagedCache> {
    let kv = PagedKv {
        k: k.data.as_slice(),
        v: v.data.as_slice(),
        page_size: page,
        kv_heads: hk,
        head_dim: d,
    };
    DevPagedCache::from_parts(dev, &kv, &BlockTables::per_head(tables, w, lens))
}

/// Decode through `cache` on the device with its own tables, compared with the f64 oracle over the
/// same pool and tables (downloaded).
fn check_decode(dev: &Arc<CudaDevice>, cache: &DevPagedCache, q: &Tensor) -> Result<(f64, f64)> {
    let (tables, w, lens) = cache
        .tables()
        .ok_or_else(|| param("a paged cache has tables".into()))?;
    let (kb, vb) = cache.download()?;
    let dt = cache.dtype;
    let kt = Tensor::new(from_bits(kb, dt), vec![cache.k.len()])?;
    let vt = Tensor::new(from_bits(vb, dt), vec![cache.v.len()])?;
    let kv = PagedKv {
        k: kt.data.as_slice(),
        v: vt.data.as_slice(),
        page_size: cache.layout.page_size().unwrap_or(16),
        kv_heads: cache.kv_heads,
        head_dim: cache.head_dim,
    };
    let bt = BlockTables::per_head(&tables, w, &lens);
    let qv = q.view("q")?;
    let reference = decode_reference(&qv, &kv, &bt, &DecodeParams::default())?;
    let max_len = lens.iter().copied().max().unwrap_or(0).max(0) as usize;
    let plan = DecodePlan::new(dev, cache, q.shape[2], max_len, &DecodeParams::default())?;
    let qd = DevTensor::upload(dev, "q", &qv)?;
    let [b, _, hq, d] = [q.shape[0], q.shape[1], q.shape[2], q.shape[3]];
    let mut o = DevTensor::alloc(dev, [b, 1, hq, d], dt)?;
    let mut lse = dev.alloc_f32((b * hq).max(1))?;
    plan.launch(cache, &qd, &mut o, &mut lse)?;
    dev.synchronize()?;
    let out = o.download(dev)?;
    let mut l = dev.download(&lse)?;
    l.truncate(b * hq);
    Ok(compare(&out, &l, &reference))
}

/// Eviction on the device: a per-head cache filled by appends (every head the same positions),
/// then `compress_heads` with a random keep set per head (ragged, some empty, some whole); the
/// moved rows must equal the original entries bit for bit, the pages freed must be what the
/// lengths say, and decode must match the oracle over what is kept.
fn check_evict(
    dev: &Arc<CudaDevice>,
    dt: DType,
    (hq, hk, d): (usize, usize, usize),
    seed: u64,
) -> Result<(f64, f64, String, bool)> {
    let page = 16;
    let (b, len) = (2usize, 1023usize);
    let pages = b * hk * len.div_ceil(page) * 2 + 4;
    let mut c = DevPagedCache::new_head_paged(dev, dt, hk, d, page, pages, b)?;
    if let Some(t) = c.page_tables_mut() {
        t.shuffle_free(seed);
    }
    // Appends in uneven chunks (13 then the rest), every sequence.
    let k_all = random_tensor(dt, &[b, len, hk, d], 1.0, seed + 1);
    let v_all = random_tensor(dt, &[b, len, hk, d], 1.0, seed + 2);
    let (kf, vf) = (k_all.data.to_f32_vec(), v_all.data.to_f32_vec());
    for (j0, j1) in [(0usize, 13usize), (13, len)] {
        for s in 0..b {
            let part = |x: &[f32]| -> Result<DevTensor> {
                let rows: Vec<f32> = (j0..j1)
                    .flat_map(|j| x[(s * len + j) * hk * d..][..hk * d].iter().copied())
                    .collect();
                let t = Tensor::new(Buffer::from_f32(dt, &rows), vec![1, j1 - j0, hk, d])?;
                DevTensor::upload(dev, "kv", &t.view("kv")?)
            };
            c.append_seq(s, &part(&kf)?, &part(&vf)?)?;
        }
    }
    let mut rng = Rng::new(seed + 7);
    let keep: Vec<Vec<usize>> = (0..b * hk)
        .map(|r| match r % 4 {
            0 => Vec::new(),
            1 => (0..len).collect(),
            _ => (0..len).filter(|_| rng.below(5) == 0).collect(),
        })
        .collect();
    let used_before: usize = c
        .tables()
        .map(|t| t.2.iter().map(|&l| (l as usize).div_ceil(page)).sum())
        .unwrap_or(0);
    let freed = c.compress_heads(&keep)?;
    let used_after: usize = keep.iter().map(|k| k.len().div_ceil(page)).sum();
    // The kept rows, read back through the new tables, against the appended values.
    let (tables, w, lens) = c.tables().ok_or_else(|| param("tables".into()))?;
    let (kb, _) = c.download()?;
    let kt = Tensor::new(from_bits(kb, dt), vec![c.k.len()])?
        .data
        .to_f32_vec();
    let mut wrong = 0usize;
    for (r, kr) in keep.iter().enumerate() {
        let (s, kh) = (r / hk, r % hk);
        if lens[r] as usize != kr.len() {
            wrong += 1;
            continue;
        }
        for (e, &j) in kr.iter().enumerate() {
            let slot = tables[r * w + e / page] as usize * page + e % page;
            let got = &kt[slot * d..][..d];
            let want = &kf[((s * len + j) * hk + kh) * d..][..d];
            if got != want {
                wrong += 1;
            }
        }
    }
    let q = random_tensor(dt, &[b, 1, hq, d], 1.0, seed + 3);
    let (eo, el) = check_decode(dev, &c, &q)?;
    let ok = wrong == 0 && freed == used_before - used_after;
    Ok((
        eo,
        el,
        format!(
            "rows moved wrong {wrong} (must be 0); pages freed {freed} (expected {})",
            used_before - used_after
        ),
        ok,
    ))
}

/// Quest on the device against its references: the scores vs [`quest_scores_reference`], the
/// selection vs the CPU keep rule on the device's own scores (must be equal), the output vs the
/// f64 oracle over the selected tables; with `tail` the bounds are rebuilt after an append by the
/// tail-only update and must equal a full rebuild bit for bit. `levels`: every physical page's
/// keys are one value of `levels` evenly spaced ones (pages tie in groups, at the select's cut
/// too), else random keys.
#[allow(clippy::too_many_arguments)]
fn check_quest(
    dev: &Arc<CudaDevice>,
    dt: DType,
    lens: &[i32],
    (hq, hk, d): (usize, usize, usize),
    budget: f64,
    reduce: Reduce,
    seed: u64,
    levels: Option<usize>,
) -> Result<(f64, f64, String, bool)> {
    let page = 16;
    let (mut k, v, tables, w, q) = random_head_cache(dt, lens, page, (hq, hk, d), seed)?;
    if let Some(n) = levels {
        let mut kf = k.data.to_f32_vec();
        let mut rng = Rng::new(seed + 9);
        for chunk in kf.chunks_mut(page * d) {
            let x = (rng.below(n) as f32 + 1.0) / n as f32;
            chunk.fill(x);
        }
        k = Tensor::new(Buffer::from_f32(dt, &kf), k.shape.clone())?;
    }
    let kv = PagedKv {
        k: k.data.as_slice(),
        v: v.data.as_slice(),
        page_size: page,
        kv_heads: hk,
        head_dim: d,
    };
    let bt = BlockTables::per_head(&tables, w, lens);
    let cache = DevPagedCache::from_parts(dev, &kv, &bt)?;
    let max_len = lens.iter().copied().max().unwrap_or(0).max(0) as usize;
    let quest = Quest { budget, page };
    let dq = DevQuest::new(
        dev,
        &cache,
        hq,
        max_len,
        quest,
        reduce,
        &DecodeParams::default(),
    )?;
    dq.update_bounds(&cache, false)?;
    let qv = q.view("q")?;
    let qd = DevTensor::upload(dev, "q", &qv)?;
    let b = lens.len() / hk;
    let mut o = DevTensor::alloc(dev, [b, 1, hq, d], dt)?;
    let mut lse = dev.alloc_f32((b * hq).max(1))?;
    dq.decode(&cache, &qd, &mut o, &mut lse)?;
    dev.synchronize()?;
    let out = o.download(dev)?;
    let mut l = dev.download(&lse)?;
    l.truncate(b * hq);
    // Scores.
    let (sc, stride) = dq.scores()?;
    let reference = quest_scores_reference(
        &q.data.to_f32_vec(),
        &k.data.to_f32_vec(),
        (&tables, w, lens),
        page,
        d,
        (hq, hk),
        reduce,
    );
    let mut score_err = 0.0f64;
    for (r, want) in reference.iter().enumerate() {
        let scale = want.iter().fold(1.0f64, |m, x| m.max(x.abs()));
        for (i, &x) in want.iter().enumerate() {
            score_err = score_err.max((sc[r * stride + i] as f64 - x).abs() / scale);
        }
    }
    // Selection: the CPU keep rule on the device's scores.
    let (sel, sw, sel_lens) = dq.selection()?;
    let mut rows_differ = 0;
    for (r, &len) in lens.iter().enumerate() {
        let len = len.max(0) as usize;
        let want_pages: Vec<i32> = if len == 0 {
            Vec::new()
        } else {
            select_pages(&quest, &sc[r * stride..][..(len - 1) / page], len - 1)
                .into_iter()
                .map(|i| tables[r * w + i])
                .collect()
        };
        let want_len = match want_pages.len() {
            0 => 0,
            n => (n - 1) * page + (len - (len - 1) / page * page),
        };
        if sel_lens[r] as usize != want_len || sel[r * sw..][..want_pages.len()] != want_pages[..] {
            rows_differ += 1;
        }
    }
    // Output: the oracle over the selected tables.
    let sbt = BlockTables::per_head(&sel, sw, &sel_lens);
    let oracle = decode_reference(&qv, &kv, &sbt, &DecodeParams::default())?;
    let (eo, el) = compare(&out, &l, &oracle);
    let kept: usize = sel_lens.iter().map(|&x| x as usize).sum();
    let all: usize = lens.iter().map(|&x| x.max(0) as usize).sum();
    // Tail-only bounds after an append equal a full rebuild.
    let mut tail_ok = true;
    if budget < 1.0 {
        let before = dq.bounds()?;
        dq.update_bounds(&cache, true)?;
        tail_ok = dq.bounds()? == before;
    }
    let ok = rows_differ == 0 && score_err <= 1e-5 && tail_ok;
    Ok((
        eo,
        el,
        format!(
            "kept {kept} of {all} entries; score err {score_err:.1e} (tol 1e-5); rows != CPU keep rule on the device's scores {rows_differ} (must be 0); tail-only bounds == full {tail_ok}"
        ),
        ok,
    ))
}

/// The device part of issue-16 compression (group `kv` of `longattn selftest --backend cuda`):
/// per-head decode (ragged lengths incl. 0 and 4224, GQA / MQA / MHA, D 64 / 128 / 256, bf16 and
/// f16), eviction by compaction, Quest (budgets 0.05 .. 1, max / sum / mean over the group,
/// ragged rows), and bad input refused.
pub fn selftest(dev: &Arc<CudaDevice>) -> Vec<CaseResult> {
    let mut out = Vec::new();
    let ragged = [1i32, 7, 63, 65, 113, 1023, 4224, 0];
    for &(dt, hq, hk, d) in &[
        (DType::BF16, 8, 2, 128),
        (DType::F16, 4, 1, 64),
        (DType::BF16, 4, 4, 256),
        (DType::BF16, 32, 8, 128),
    ] {
        let tol = out_tolerance(dt);
        // Per-head tables straight from the host: rows of every awkward length.
        let lens: Vec<i32> = (0..2 * hk)
            .map(|r| ragged[(r * 3 + hk) % ragged.len()])
            .collect();
        let name = format!("kv per-head decode {dt} {hq}:{hk} d{d}");
        let r = (|| {
            let (k, v, tables, w, q) = random_head_cache(dt, &lens, 16, (hq, hk, d), 11)?;
            let c = upload_heads(dev, (&k, &v), (&tables, w, &lens), (16, hk, d))?;
            let (eo, el) = check_decode(dev, &c, &q)?;
            Ok((eo, el, format!("row lengths {lens:?}"), true))
        })();
        out.push(case(name, r, tol));
        out.push(case(
            format!("kv evict {dt} {hq}:{hk} d{d}"),
            check_evict(dev, dt, (hq, hk, d), 21 + d as u64),
            tol,
        ));
        for (budget, reduce) in [
            (0.2, Reduce::Max),
            (0.05, Reduce::Sum),
            (0.5, Reduce::Mean),
            (1.0, Reduce::Max),
        ] {
            let lens: Vec<i32> = (0..2 * hk)
                .map(|r| {
                    if r == 1 {
                        0
                    } else {
                        [4224, 1023, 113, 65, 17, 2000][r % 6]
                    }
                })
                .collect();
            out.push(case(
                format!("kv quest({budget}) {reduce:?} {dt} {hq}:{hk} d{d}"),
                check_quest(
                    dev,
                    dt,
                    &lens,
                    (hq, hk, d),
                    budget,
                    reduce,
                    31 + hq as u64,
                    None,
                ),
                tol,
            ));
        }
    }
    // Ties: every key equal, so every page ties; the newest pages must win (a short row on the
    // shared path, a long one on the register path).
    for len in [1000i32, 40_000] {
        let tie = (|| {
            let (hq, hk, d, page) = (4usize, 1usize, 64usize, 16usize);
            let lens = vec![len];
            let (_, v, tables, w, q) = random_head_cache(DType::BF16, &lens, page, (hq, hk, d), 5)?;
            let kf = vec![0.5f32; v.data.as_slice().len()];
            let k = Tensor::new(Buffer::from_f32(DType::BF16, &kf), vec![kf.len()])?;
            let cache = upload_heads(dev, (&k, &v), (&tables, w, &lens), (page, hk, d))?;
            let quest = Quest { budget: 0.3, page };
            let dq = DevQuest::new(
                dev,
                &cache,
                hq,
                len as usize,
                quest,
                Reduce::Max,
                &DecodeParams::default(),
            )?;
            dq.update_bounds(&cache, false)?;
            let qd = DevTensor::upload(dev, "q", &q.view("q")?)?;
            dq.select(&cache, &qd)?;
            let (sel, _, sl) = dq.selection()?;
            let n = quest.pages_for(len as usize - 1);
            let cur = (len as usize - 1) / page;
            let want: Vec<i32> = {
                let mut x: Vec<i32> = ((cur - (n - 1))..cur).map(|i| tables[i]).collect();
                x.push(tables[cur]);
                x
            };
            let ok = sel[..n] == want[..];
            Ok((
                0.0,
                0.0,
                format!(
                    "{n} pages of {} tied: kept {:?}.., expected the newest {:?}..; len {}",
                    cur + 1,
                    &sel[..n.min(8)],
                    &want[..n.min(8)],
                    sl[0]
                ),
                ok,
            ))
        })();
        out.push(case(
            format!("kv quest ties keep the newest pages ({len} entries)"),
            tie,
            1.0,
        ));
    }
    // Long rows, bf16 4:1 D 64, budget 0.2: past the select kernel's register path (REG_KEYS
    // candidates), one whose keys fit the shared buffer (140000 entries, 8750 pages) and one
    // read from global memory (270000: more candidates than SMEM_KEYS); on the register path
    // (more than REG_MIN and at most REG_KEYS candidates: 2499 and 8191 pages) with random keys
    // (spread scores), pages of 600 key levels (a few ties at the cut) and of 3 (thousands of
    // ties at the cut).
    let long = [
        (
            "long rows (shared, global select)",
            [140_000, 270_000],
            Reduce::Max,
            77,
            None,
        ),
        (
            "register rows, random keys",
            [40_000, 131_072],
            Reduce::Sum,
            78,
            None,
        ),
        (
            "register rows, 600 key levels",
            [40_000, 131_072],
            Reduce::Sum,
            78,
            Some(600),
        ),
        (
            "register rows, 3 key levels",
            [40_000, 131_072],
            Reduce::Sum,
            78,
            Some(3),
        ),
    ];
    for (what, lens, reduce, seed, levels) in long {
        out.push(case(
            format!("kv quest(0.2) {reduce:?} bf16 4:1 d64 {what}"),
            check_quest(
                dev,
                DType::BF16,
                &lens,
                (4, 1, 64),
                0.2,
                reduce,
                seed,
                levels,
            ),
            out_tolerance(DType::BF16),
        ));
    }
    // Bad input.
    let refused = |name: &str, r: Result<()>, want: &str| {
        let (passed, detail) = match r {
            Err(e) => {
                let m = e.to_string();
                (m.contains(want), m)
            }
            Ok(()) => (false, "accepted".into()),
        };
        CaseResult {
            group: "kv",
            name: format!("kv refuses {name}"),
            passed,
            err: 0.0,
            tol: 0.0,
            lse_err: 0.0,
            detail,
        }
    };
    let bad = DevPagedCache::new_head_paged(dev, DType::BF16, 2, 64, 16, 64, 1);
    match bad {
        Ok(mut c) => {
            out.push(refused(
                "a keep list past the row",
                c.compress_heads(&[vec![0], vec![5]]).map(|_| ()),
                "past the row",
            ));
            out.push(refused(
                "quest pages other than the cache's",
                DevQuest::new(
                    dev,
                    &c,
                    4,
                    64,
                    Quest {
                        budget: 0.2,
                        page: 32,
                    },
                    Reduce::Max,
                    &DecodeParams::default(),
                )
                .map(|_| ()),
                "must be the cache's",
            ));
        }
        Err(e) => out.push(case("kv refuses bad input".into(), Err(e), 0.0)),
    }
    out
}

/// A benchmark cache filled on the device: per-sequence tables (`heads` false, `lens` per
/// sequence) or per-head tables (`lens` per (sequence, KV head)), pages scattered by `seed`.
fn bench_cache(
    dev: &Arc<CudaDevice>,
    cfg: &KvBenchConfig,
    heads: bool,
    lens: &[usize],
    seed: u32,
) -> Result<DevPagedCache> {
    let (dt, hk, d, page) = (cfg.dtype, cfg.hk, cfg.d, cfg.page);
    let pages: usize = lens.iter().map(|l| l.div_ceil(page)).sum();
    let mut c = if heads {
        DevPagedCache::new_head_paged(dev, dt, hk, d, page, pages, cfg.batch)?
    } else {
        DevPagedCache::new_paged(dev, dt, hk, d, page, pages, cfg.batch)?
    };
    if let Some(t) = c.page_tables_mut() {
        t.shuffle_free(seed as u64);
    }
    c.grow_rows(lens)?;
    crate::cuda::decode::fill_random(dev, dt, &mut c.k, 10 * seed + 1)?;
    crate::cuda::decode::fill_random(dev, dt, &mut c.v, 10 * seed + 2)?;
    Ok(c)
}

/// The problem of [`bench`]: one layer's decode at `len` positions per (sequence, KV head).
#[derive(Clone, Debug)]
pub struct KvBenchConfig {
    pub batch: usize,
    pub len: usize,
    pub hq: usize,
    pub hk: usize,
    pub d: usize,
    pub dtype: DType,
    /// Fraction kept by eviction and attended by Quest.
    pub budget: f64,
    pub page: usize,
    /// KIVI group (and residual) of the quantized rows.
    pub kivi_group: usize,
    /// Timed launches per sample (back to back between two events) and samples (median).
    pub reps: usize,
    pub samples: usize,
}

impl Default for KvBenchConfig {
    fn default() -> Self {
        KvBenchConfig {
            batch: 1,
            len: 131072,
            hq: 32,
            hk: 8,
            d: 128,
            dtype: DType::BF16,
            budget: 0.2,
            page: 16,
            kivi_group: 32,
            reps: 20,
            samples: 7,
        }
    }
}

/// One timed row of [`bench`].
#[derive(Clone, Debug, serde::Serialize)]
pub struct KvBenchRow {
    pub name: String,
    /// Milliseconds per call (median over the samples of `reps` back-to-back calls).
    pub ms: f64,
    /// Bytes of K / V the call reads at least (kept entries; Quest adds its bounds).
    pub bytes: usize,
    /// Cache bytes held (pages in use) by the layer.
    pub cache_bytes: usize,
    /// Full paged decode's time over this row's.
    pub speedup: f64,
}

/// Median over `samples` of the mean time of `reps` back-to-back calls of `f` (CUDA events).
fn time_calls(
    dev: &Arc<CudaDevice>,
    reps: usize,
    samples: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    let s = dev.stream().clone();
    let ev = || {
        s.record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(drv("record event"))
    };
    let mut t = Vec::with_capacity(samples);
    let mut host = Vec::with_capacity(samples);
    for _ in 0..samples.max(1) {
        let e0 = ev()?;
        let h0 = std::time::Instant::now();
        for _ in 0..reps.max(1) {
            f()?;
        }
        host.push(h0.elapsed().as_secs_f64() * 1e3 / reps.max(1) as f64);
        let e1 = ev()?;
        t.push(e0.elapsed_ms(&e1).map_err(drv("event time"))? as f64 / reps.max(1) as f64);
    }
    t.sort_by(f64::total_cmp);
    host.sort_by(f64::total_cmp);
    let (ms, host_ms) = (t[t.len() / 2], host[host.len() / 2]);
    // The events time the device's stream; if the host takes about as long to enqueue a call,
    // the device waited on it and the row times the host, not the kernels.
    if host_ms > 0.8 * ms {
        eprintln!(
            "kv bench: the host took {:.1} us to enqueue a call the device ran in {:.1} us: this row may be host-bound",
            host_ms * 1e3,
            ms * 1e3
        );
    }
    Ok(ms)
}

/// Two calls timed in turns (`f(false)`, `f(true)`): per sample the mean of `reps` back-to-back
/// calls of each, the first of the two alternating between samples, so that a drift of the
/// device's clock over the run (power, heat) weighs on both alike; the medians of each.
fn time_pair(
    dev: &Arc<CudaDevice>,
    reps: usize,
    samples: usize,
    mut f: impl FnMut(bool) -> Result<()>,
) -> Result<(f64, f64)> {
    for w in [false, true, false, true] {
        f(w)?;
    }
    let s = dev.stream().clone();
    let ev = || {
        s.record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(drv("record event"))
    };
    let mut t = [Vec::new(), Vec::new()];
    for i in 0..samples.max(1) {
        for w in [i % 2 == 1, i % 2 == 0] {
            let e0 = ev()?;
            for _ in 0..reps.max(1) {
                f(w)?;
            }
            let e1 = ev()?;
            t[w as usize]
                .push(e0.elapsed_ms(&e1).map_err(drv("event time"))? as f64 / reps.max(1) as f64);
        }
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let [mut a, mut b] = t;
    Ok((med(&mut a), med(&mut b)))
}

/// Decode of one layer at `cfg` (the 128k problem by default), every cache filled on the
/// device: the full paged decode (tables per sequence), the full per-head cache, eviction to
/// `budget` (ragged: KV head kh keeps budget x (0.5 + kh / (Hk - 1)) of the positions, mean
/// budget) and Quest at `budget` (score + select + decode, the bounds kept up to date at append
/// time and not timed; their tail update is its own row).
pub fn bench(dev: &Arc<CudaDevice>, cfg: &KvBenchConfig) -> Result<Vec<KvBenchRow>> {
    let KvBenchConfig {
        batch,
        len,
        hq,
        hk,
        d,
        dtype: dt,
        page,
        ..
    } = *cfg;
    if batch == 0 || len == 0 || hk == 0 || hq % hk != 0 {
        return Err(param(format!("kv bench: bad problem {cfg:?}")));
    }
    let params = DecodeParams::default();
    let es = dt.size();
    let row_bytes = 2 * d * es; // K + V of one entry of one head
    let alloc_q = |seed: u32| -> Result<(DevTensor, DevTensor, CudaSlice<f32>)> {
        let mut q = DevTensor::alloc(dev, [batch, 1, hq, d], dt)?;
        crate::cuda::decode::fill_random(dev, dt, &mut q.data, seed)?;
        let o = DevTensor::alloc(dev, [batch, 1, hq, d], dt)?;
        let lse = dev.alloc_f32(batch * hq)?;
        Ok((q, o, lse))
    };
    let mut rows = Vec::new();
    let push =
        |name: String, ms: f64, bytes: usize, cache_bytes: usize, rows: &mut Vec<KvBenchRow>| {
            let full = rows.first().map(|r: &KvBenchRow| r.ms).unwrap_or(ms);
            rows.push(KvBenchRow {
                name,
                ms,
                bytes,
                cache_bytes,
                speedup: full / ms,
            });
        };
    // Full paged decode (one table per sequence).
    {
        let pages = batch * len.div_ceil(page);
        let c = bench_cache(dev, cfg, false, &vec![len; batch], 1)?;
        let (q, mut o, mut lse) = alloc_q(13)?;
        let plan = DecodePlan::new(dev, &c, hq, len, &params)?;
        let ms = time_calls(dev, cfg.reps, cfg.samples, || {
            plan.launch(&c, &q, &mut o, &mut lse)
        })?;
        let bytes = batch * hk * len * row_bytes;
        push(
            format!("full paged p{page}"),
            ms,
            bytes,
            pages * page * hk * row_bytes,
            &mut rows,
        );
    }
    // The per-head cache at full length: its decode, then Quest on it.
    {
        let pages = batch * hk * len.div_ceil(page);
        let c = bench_cache(dev, cfg, true, &vec![len; batch * hk], 2)?;
        let (q, mut o, mut lse) = alloc_q(23)?;
        let plan = DecodePlan::new(dev, &c, hq, len, &params)?;
        let ms = time_calls(dev, cfg.reps, cfg.samples, || {
            plan.launch(&c, &q, &mut o, &mut lse)
        })?;
        let full_bytes = batch * hk * len * row_bytes;
        let cache_bytes = pages * page * row_bytes;
        push(
            format!("full per-head p{page}"),
            ms,
            full_bytes,
            cache_bytes,
            &mut rows,
        );
        // Press scores from the decode's LSE (H2O, one query row), and SnapKV's window of 32
        // rows (its LSE a stand-in: the timing does not depend on the values).
        let mut sc = DevScores::new(dev, &c, hq, len, ScoreKind::H2o, ScoreParams::default())?;
        let ms = time_calls(dev, cfg.reps, cfg.samples, || {
            sc.observe(&c, &q, &lse, true)
        })?;
        let score_bytes = batch * hk * len * (d * es + 8);
        push(
            "h2o score fold, decode step (Sq 1)".into(),
            ms,
            score_bytes,
            0,
            &mut rows,
        );
        // The same fold inside the decode kernel (the previous step's query in the product's
        // free rows), against the decode alone above, where the decode can fold (other shapes
        // fold with `observe`, above).
        if crate::cuda::decode::folds_scores(d, hq / hk) {
            let fused = DecodePlan::with_scores(dev, &c, hq, len, &params, sc.fold())?;
            let (q0, _, l0) = alloc_q(27)?;
            let ms = time_calls(dev, cfg.reps, cfg.samples, || {
                sc.decode_fold(&fused, &c, &q, &mut o, &mut lse, Some((&q0, &l0, 1)))
            })?;
            push(
                "decode + h2o fold in the kernel".into(),
                ms,
                full_bytes + batch * hk * len * 8,
                cache_bytes,
                &mut rows,
            );
            // The fold's cost measured in turns with the decode alone (`time_pair`): the two
            // rows above ran one after the other, apart by the rows between.
            let (plain, folded) = time_pair(dev, cfg.reps, cfg.samples, |fold| {
                if fold {
                    sc.decode_fold(&fused, &c, &q, &mut o, &mut lse, Some((&q0, &l0, 1)))
                } else {
                    plan.launch(&c, &q, &mut o, &mut lse)
                }
            })?;
            push(
                "per-head decode, in turns with the fold".into(),
                plain,
                full_bytes,
                cache_bytes,
                &mut rows,
            );
            push(
                "decode + h2o fold, in turns with the decode".into(),
                folded,
                full_bytes + batch * hk * len * 8,
                cache_bytes,
                &mut rows,
            );
        }
        let w = 32;
        let mut qw = DevTensor::alloc(dev, [batch, w, hq, d], dt)?;
        crate::cuda::decode::fill_random(dev, dt, &mut qw.data, 29)?;
        let lw = dev.upload(&vec![8.0f32; batch * hq * w])?;
        let mut sw = DevScores::new(
            dev,
            &c,
            hq,
            len,
            ScoreKind::SnapKv(w),
            ScoreParams::default(),
        )?;
        let ms = time_calls(dev, cfg.reps, cfg.samples, || {
            sw.observe(&c, &qw, &lw, true)
        })?;
        push(
            format!("snapkv({w}) window scores (Sq {w})"),
            ms,
            score_bytes,
            0,
            &mut rows,
        );
        // H2O's full accumulation at prefill: every row of the prompt folded at once (Sq = the
        // length, causal), against the causal prefill forward of the same shape (the issue asks
        // <= 0.6x). Up to 256k tokens a call (three samples of one call each).
        if batch * len <= 1 << 18 {
            let mut qf = DevTensor::alloc(dev, [batch, len, hq, d], dt)?;
            crate::cuda::decode::fill_random(dev, dt, &mut qf.data, 31)?;
            let lf = dev.upload(&vec![8.0f32; batch * hq * len])?;
            let mut sf = DevScores::new(dev, &c, hq, len, ScoreKind::H2o, ScoreParams::default())?;
            let ms_obs = time_calls(dev, 1, 3, || sf.observe(&c, &qf, &lf, true))?;
            drop(sf);
            let mut kv = Vec::new();
            for seed in [37, 41] {
                let mut t = DevTensor::alloc(dev, [batch, len, hk, d], dt)?;
                crate::cuda::decode::fill_random(dev, dt, &mut t.data, seed)?;
                kv.push(t);
            }
            let shape = crate::mask::MaskShape {
                batch: 1,
                sq: len,
                sk: len,
            };
            let causal = crate::mask::MaskExpr::parse("causal")?.bind(shape, None)?;
            let dims = crate::attention::Dims {
                batch,
                sq: len,
                sk: len,
                hq,
                hk,
                d,
                dv: d,
            };
            let fwd = crate::cuda::FwdPlan::new(
                dev,
                dims,
                dt,
                &crate::AttnParams::default(),
                crate::attention::MaskSpec::Expr(&causal),
            )?;
            let mut of = DevTensor::alloc(dev, [batch, len, hq, d], dt)?;
            let mut lo = dev.alloc_f32(batch * hq * len)?;
            let ms_fwd = time_calls(dev, 1, 3, || {
                fwd.launch(&qf, &kv[0], &kv[1], &mut of, &mut lo)
            })?;
            push(
                format!("h2o full accumulation (Sq {len}, causal)"),
                ms_obs,
                score_bytes,
                0,
                &mut rows,
            );
            push(
                format!(
                    "causal prefill forward (Sq {len}); accumulation / forward {:.2}x",
                    ms_obs / ms_fwd
                ),
                ms_fwd,
                0,
                0,
                &mut rows,
            );
        }
        let quest = Quest {
            budget: cfg.budget,
            page,
        };
        let dq = DevQuest::new(dev, &c, hq, len, quest, Reduce::Max, &params)?;
        dq.update_bounds(&c, false)?;
        let ms = time_calls(dev, cfg.reps, cfg.samples, || dq.update_bounds(&c, true))?;
        push(
            "quest bounds, tail page (per append)".into(),
            ms,
            0,
            0,
            &mut rows,
        );
        let ms = time_calls(dev, cfg.reps, cfg.samples, || dq.select(&c, &q))?;
        let meta_bytes = batch * hk * len.div_ceil(page) * 2 * d * es;
        push(
            format!("quest({}) score + select", cfg.budget),
            ms,
            meta_bytes,
            0,
            &mut rows,
        );
        let ms = time_calls(dev, cfg.reps, cfg.samples, || {
            dq.decode(&c, &q, &mut o, &mut lse)
        })?;
        let kept = quest.pages_for(len - 1).min(len.div_ceil(page)) * page;
        push(
            format!("quest({},page={page}) score + select + decode", cfg.budget),
            ms,
            batch * hk * kept * row_bytes + meta_bytes,
            cache_bytes + batch * hk * len.div_ceil(page) * 2 * d * es,
            &mut rows,
        );
    }
    // Eviction to the budget, ragged over the heads.
    let frac = |kh: usize| {
        let t = if hk > 1 {
            kh as f64 / (hk - 1) as f64
        } else {
            0.5
        };
        (cfg.budget * (0.5 + t)).min(1.0)
    };
    {
        let lens: Vec<usize> = (0..batch * hk)
            .map(|r| ((frac(r % hk) * len as f64).round() as usize).max(1))
            .collect();
        let pages: usize = lens.iter().map(|l| l.div_ceil(page)).sum();
        let c = bench_cache(dev, cfg, true, &lens, 3)?;
        let (q, mut o, mut lse) = alloc_q(33)?;
        let max = lens.iter().copied().max().unwrap_or(1);
        let plan = DecodePlan::new(dev, &c, hq, max, &params)?;
        let ms = time_calls(dev, cfg.reps, cfg.samples, || {
            plan.launch(&c, &q, &mut o, &mut lse)
        })?;
        let kept: usize = lens.iter().sum();
        push(
            format!("evict to {} (ragged per head)", cfg.budget),
            ms,
            kept * row_bytes,
            pages * page * row_bytes,
            &mut rows,
        );
    }
    // KIVI pages (int4, int2; and int4 after eviction to the budget, the ragged lengths above):
    // the per-head cache quantized (not timed: a group's quantization happens once per G
    // appends), then decode over the pages and the residual.
    let evicted: Vec<usize> = (0..batch * hk)
        .map(|r| ((frac(r % hk) * len as f64).round() as usize).max(1))
        .collect();
    let full = vec![len; batch * hk];
    for (bits, lens, what) in [
        (4u32, &full, String::new()),
        (2, &full, String::new()),
        (4, &evicted, format!("evict to {} + ", cfg.budget)),
    ] {
        let kivi = Kivi::uniform(bits, cfg.kivi_group, cfg.kivi_group);
        let pages = 2 * lens.iter().map(|l| l.div_ceil(page) + 2).sum::<usize>();
        let mut c = DevPagedCache::new_head_paged(dev, dt, hk, d, page, pages, batch)?;
        c.grow_rows(lens)?;
        crate::cuda::decode::fill_random(dev, dt, &mut c.k, 41 + bits)?;
        crate::cuda::decode::fill_random(dev, dt, &mut c.v, 42 + bits)?;
        let qpages = lens.iter().map(|l| l.div_ceil(kivi.group)).sum();
        let mut kv = DevKivi::new(dev, &c, kivi, len, qpages)?;
        kv.quantize(&mut c)?;
        let (q, mut o, mut lse) = alloc_q(43)?;
        let max = lens.iter().copied().max().unwrap_or(1);
        let plan = kv.plan(&c, hq, max, &params)?;
        let ms = time_calls(dev, cfg.reps, cfg.samples, || {
            kv.decode(&plan, &c, &q, &mut o, &mut lse)
        })?;
        let (used, _) = kv.bytes();
        let res: usize = c.lens().iter().sum::<usize>() * row_bytes;
        push(
            format!("{what}{kivi}"),
            ms,
            used + res,
            used + res,
            &mut rows,
        );
    }
    dev.synchronize()?;
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quest_parameter_struct_matches_the_kernel() {
        crate::cuda::forward::check_layout(
            QUEST,
            "LaQuestParams",
            &crate::cuda::forward::offsets!(LaQuestParams; q, k, meta, tables, lens, score,
                sel_tables, sel_lens, budget, b, hq, hk, max_pages, sel_pages, tail_only, reduce,
                score_stride, smem_keys, reg_keys, reg_min),
            std::mem::size_of::<LaQuestParams>(),
        );
    }

    #[test]
    fn scores_reference_bounds_every_key_of_its_page() {
        // The bound of a page is >= q . k for each key of the page, and is reached when q
        // points along one key's coordinates' extremes.
        let (page, d, hq, hk) = (16, 8, 2, 1);
        let lens = [50i32];
        let (k, _, tables, w, q) =
            random_head_cache(DType::F32, &lens, page, (hq, hk, d), 3).unwrap();
        let (kf, qf) = (k.data.to_f32_vec(), q.data.to_f32_vec());
        for reduce in [Reduce::Max, Reduce::Sum, Reduce::Mean] {
            let s =
                quest_scores_reference(&qf, &kf, (&tables, w, &lens), page, d, (hq, hk), reduce);
            assert_eq!(s[0].len(), 3, "pages before the last of 50 entries");
            for (i, &bound) in s[0].iter().enumerate() {
                let pg = tables[i] as usize;
                for t in 0..page {
                    let dots: Vec<f64> = (0..hq)
                        .map(|h| {
                            (0..d)
                                .map(|x| qf[h * d + x] as f64 * kf[(pg * page + t) * d + x] as f64)
                                .sum()
                        })
                        .collect();
                    let r = match reduce {
                        Reduce::Max => dots.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
                        Reduce::Sum => dots.iter().sum(),
                        Reduce::Mean => dots.iter().sum::<f64>() / hq as f64,
                    };
                    assert!(
                        bound >= r - 1e-9,
                        "{reduce:?} page {i}: bound {bound} < {r}"
                    );
                }
            }
        }
    }
}
