//! Press scores on the GPU ([`DevScores`], kernel `cuda/kernels/kv_score.cu`): the weighted
//! column sums of [`super::score`] (H2O, A2SF, TOVA, SnapKV's observation window; max / sum / mean
//! over a KV head's query heads) computed from the attention's own LSE over a per-head paged
//! cache ([`KvLayout::HeadPaged`]) and folded into one running score per cached entry, on the
//! device, with no host synchronisation. One kernel serves a decode step (one query row) and a
//! prefill chunk (SnapKV's last W rows, or every row for H2O's full accumulation).
//!
//! The chunk's rows are the latest positions: with `causal`, entry e of a row holding `len`
//! entries is seen by chunk row i iff `e <= len - Sq + i` (the chunk's own entries are the row's
//! last Sq, appended after any compression); otherwise every entry is seen by every row.
//!
//! Plain reference beside it: [`chunk_scores_reference`] (probabilities from the definition in
//! f64 over any per-head storage), tied to the CPU's [`super::score::column_scores_reference`] by
//! a test; [`selftest`] compares the device against it.
use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};

use super::score::{Reduce, ScoreKind, ScoreParams};
use crate::cuda::decode::{DecodePlan, DevPagedCache, KvLayout, RawScore, ScoreFold};
use crate::cuda::forward::{TmaMap, TMA, WGMMA};
use crate::cuda::selftest::CaseResult;
use crate::cuda::{drv, CudaDevice, DevTensor};
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};
use crate::testing::{random_tensor, Rng};

const COMMON: &str = include_str!("../cuda/kernels/common.cuh");
const SCORE: &str = include_str!("../cuda/kernels/kv_score.cu");
const SCORE_WG: &str = include_str!("../cuda/kernels/kv_score_wg.cu");
const OP: &str = "cuda kv scores";

/// Chunks with at least this many weighted rows fold through the Hopper kernel
/// (`kv_score_wg.cu`) where it applies ([`DevScores::observe`]).
const WG_MIN_ROWS: usize = 128;

fn param(msg: String) -> Error {
    Error::Param { op: OP, msg }
}

/// Field for field `LaScoreParams` in `kernels/kv_score.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct LaScoreParams {
    q: u64,
    k: u64,
    lse: u64,
    tables: u64,
    lens: u64,
    score: u64,
    q_sb: i64,
    q_ss: i64,
    q_sh: i64,
    b: i32,
    sq: i32,
    hq: i32,
    hk: i32,
    max_pages: i32,
    cap: i32,
    causal: i32,
    reduce: i32,
    kind: i32,
    window: i32,
    f: f32,
    q_scale: f32,
    cap_mul: f32,
    kblocks: i32,
    rows_cap: i32,
    pad: i32,
}

// SAFETY: plain-old-data with the C layout of the kernel's parameter struct.
unsafe impl cudarc::driver::DeviceRepr for LaScoreParams {}

/// Field for field `LaColArgs` in `kernels/kv_score_wg.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct LaColArgs {
    k: u64,
    l2: u64,
    tables: u64,
    lens: u64,
    score: u64,
    sq: i32,
    hq: i32,
    hk: i32,
    max_pages: i32,
    cap: i32,
    sq_pad: i32,
    causal: i32,
    reduce: i32,
    first: i32,
    decay: f32,
    q_scale: f32,
    cap_mul: f32,
}

/// `LaColWs`: q's tensor map, then the arguments.
#[repr(C)]
#[derive(Clone, Copy)]
struct LaColWs {
    tq: TmaMap,
    p: LaColArgs,
}

const _: () = assert!(std::mem::size_of::<LaColWs>() == 256);
// SAFETY: plain-old-data with the C layout of the kernel's parameter struct.
unsafe impl cudarc::driver::DeviceRepr for LaColWs {}

/// Tiling of `la_kv_colscore` at head dim `d`: (query rows a step, ring stages).
fn wg_tiles(d: usize) -> (usize, usize) {
    (if d > 128 { 64 } else { 128 }, 3)
}

/// Items per turn of `la_kv_colscore`'s consumer loop (`LC_PIPE`): 4 (H100, 2026-12-07: H2O's
/// full accumulation 0.70x -> 0.65x of a forward at 32 x 8k, 0.76x -> 0.66x at 1 x 128k), or
/// the former 2 with `LONGATTN_CUDA_SCORE_PIPE=2`.
fn wg_pipe() -> usize {
    match std::env::var("LONGATTN_CUDA_SCORE_PIPE").as_deref() {
        Ok("2") => 2,
        _ => 4,
    }
}

/// Whether `la_kv_colscore` tests the causal mask only in items that cross the diagonal
/// (`LC_UNSWITCH`): yes (H200, 2026-12-07, two runs: H2O's full accumulation 18.42 / 18.74 ->
/// 17.12 / 17.48 ms at 32 x 8k, 140.2 / 139.9 -> 130.1 / 130.1 ms at 1 x 128k) unless
/// `LONGATTN_CUDA_SCORE_UNSWITCH=0` (the former, per element in every item; A / B runs).
fn wg_unswitch() -> bool {
    std::env::var("LONGATTN_CUDA_SCORE_UNSWITCH").map_or(true, |v| v != "0")
}

/// Dynamic shared memory of `la_kv_colscore`: 1 KiB for alignment, the ring's Q tiles and l2
/// rows, its mbarriers.
fn wg_smem_bytes(d: usize) -> usize {
    let (br, st) = wg_tiles(d);
    1024 + st * br * d * 2 + st * br * 4 + 2 * st * 8
}

/// Dynamic shared memory of `la_kv_score`: 64 keys and `rows` query rows of D + 8 elements, and
/// the rows' weights and LSE (`kv_score.cu`).
fn smem_bytes(d: usize, rows: usize) -> usize {
    (64 + rows) * (d + 8) * 2 + 2 * rows * 4
}

/// The most query rows `la_kv_score` holds in shared memory at once (89 KiB at D 128, 102 KiB at
/// D 256 with the keys).
fn max_rows(d: usize) -> usize {
    if d > 128 {
        128
    } else {
        256
    }
}

/// Launch shape of `la_kv_score` for a chunk whose blocks read at most `n_rows` staged rows
/// (G heads x the rows a head can weigh, padded to 8), over `table_rows` rows of at most `max`
/// entries: (rows in the shared buffer, key blocks of 64 per thread block). With `resident` (the
/// default; `LONGATTN_CUDA_SCORE_RESIDENT=0` turns it off) and every row fitting the buffer, the
/// rows are staged once per block and a block takes several key blocks (up to 8, keeping about
/// 8 blocks per SM); otherwise chunks of 64 rows over one key block. Resident rows on the H100
/// (2026-12-07): the SnapKV window 0.79 -> 0.53 ms at 32 x 8k, the decode step's fold 0.37 ->
/// 0.27 ms.
fn launch_shape(
    n_rows: usize,
    max: usize,
    table_rows: usize,
    (d, sms): (usize, usize),
    resident: bool,
) -> (usize, usize) {
    if !resident || n_rows > max_rows(d) {
        return (64, 1);
    }
    let rows = n_rows.next_multiple_of(64).max(64);
    let key_blocks = max.div_ceil(64) * table_rows;
    (rows, (key_blocks / (8 * sms.max(1))).clamp(1, 8))
}

/// Running press scores of one layer's per-head cache on the device: `[rows, cap]` f32, row
/// r = b Hk + kh, entry e of the row at `r cap + e`. Entries past a row's length hold 0 (set at
/// creation, kept by [`DevScores::compact`]), so entries appended since the last fold start at 0
/// as on the CPU.
pub struct DevScores {
    dev: Arc<CudaDevice>,
    func: CudaFunction,
    pub kind: ScoreKind,
    pub params: ScoreParams,
    scores: CudaSlice<f32>,
    rows: usize,
    cap: usize,
    hq: usize,
    dtype: DType,
    head_dim: usize,
    page: usize,
    /// The Hopper fold's row offsets (`la_kv_score_l2`), grown as chunks need.
    l2: Option<CudaSlice<f32>>,
    /// The kernels' variant name and compile-time constants (`kv_score.cu`).
    variant: String,
    defines: Vec<(String, String)>,
    /// Whether large chunks may take the Hopper kernel: the default since it passed the device
    /// selftest on an H100 (H2O's accumulation at 32 x 8k: 19.6 ms against the generic kernel's
    /// 75.7, docs/PERF.md); `LONGATTN_CUDA_SCORE_WG=0` keeps the generic one.
    hopper: bool,
}

impl DevScores {
    /// Scores for `cache` (per-head pages) read by `hq` query heads, rows of at most `cap`
    /// entries (rounded up to a multiple of 16: the row stride).
    pub fn new(
        dev: &Arc<CudaDevice>,
        cache: &DevPagedCache,
        hq: usize,
        cap: usize,
        kind: ScoreKind,
        params: ScoreParams,
    ) -> Result<DevScores> {
        kind.check()?;
        let KvLayout::HeadPaged { page_size } = cache.layout else {
            return Err(param(format!(
                "scores on the device need a per-head paged cache, this one is {}",
                cache.layout.name()
            )));
        };
        let (d, hk) = (cache.head_dim, cache.kv_heads);
        if hq == 0 || !hq.is_multiple_of(hk) {
            return Err(param(format!(
                "{hq} query heads: must be a multiple of the {hk} KV heads"
            )));
        }
        if !d.is_multiple_of(32) || d > 256 {
            return Err(param(format!(
                "head dim {d}: the score kernel takes multiples of 32 up to 256"
            )));
        }
        if let Some(c) = params.softcap {
            if !(c.is_finite() && c > 0.0) {
                return Err(param(format!("soft-cap {c}: must be finite and > 0")));
            }
        }
        let dt = cache.dtype;
        let softcap = params.softcap.is_some();
        let defines = vec![
            ("LA_F16".into(), ((dt == DType::F16) as u8).to_string()),
            ("LA_D".into(), d.to_string()),
            ("LA_PAGE".into(), page_size.to_string()),
            ("LA_SOFTCAP".into(), (softcap as u8).to_string()),
        ];
        let variant = format!(
            "kv_score_{}_d{d}_p{page_size}{}",
            dt.name(),
            if softcap { "_cap" } else { "" }
        );
        let smem = smem_bytes(d, max_rows(d));
        let func = dev.function_static(
            &variant,
            "la_kv_score",
            || format!("{COMMON}\n{SCORE}"),
            &defines,
            smem,
        )?;
        // Rows of a multiple of 16 floats: the decode kernel copies a tile's 16 scores as four
        // aligned 16-byte pieces.
        let cap = cap.max(1).next_multiple_of(16);
        let rows = cache.batch() * hk;
        let scores = dev
            .stream()
            .alloc_zeros::<f32>((rows * cap).max(1))
            .map_err(drv("alloc scores"))?;
        Ok(DevScores {
            dev: dev.clone(),
            func,
            kind,
            params,
            scores,
            rows,
            cap,
            hq,
            dtype: dt,
            head_dim: d,
            page: page_size,
            l2: None,
            variant,
            defines,
            hopper: std::env::var("LONGATTN_CUDA_SCORE_WG").map_or(true, |v| v != "0"),
        })
    }

    /// Folds one chunk: q `[B, Sq, Hq, D]` (the latest Sq positions, any strides with unit
    /// dims), `lse` `[B, Hq, Sq]` the attention's LSE (natural log; a decode's `[B, Hq]` is Sq
    /// = 1), `causal` as in the module documentation. Asynchronous on the device's stream.
    pub fn observe(
        &mut self,
        cache: &DevPagedCache,
        q: &DevTensor,
        lse: &CudaSlice<f32>,
        causal: bool,
    ) -> Result<()> {
        let [b, sq, hq, d] = q.shape;
        let max = self.check_cache(cache)?;
        if b != cache.batch()
            || hq != self.hq
            || d != self.head_dim
            || sq == 0
            || q.dtype != self.dtype
        {
            return Err(Error::Shape {
                op: OP,
                tensor: "q".into(),
                got: q.shape.to_vec(),
                expected: format!(
                    "[{}, Sq >= 1, {}, {}] in {}",
                    cache.batch(),
                    self.hq,
                    self.head_dim,
                    self.dtype
                ),
            });
        }
        if lse.len() < b * hq * sq {
            return Err(Error::Shape {
                op: OP,
                tensor: "lse".into(),
                got: vec![lse.len()],
                expected: format!("[{b}, {hq}, {sq}] (B x Hq x Sq of q) f32"),
            });
        }
        if self.rows == 0 || max == 0 {
            return Ok(());
        }
        let s = self.dev.stream();
        let (tables, max_pages, lens) = cache.device_tables();
        let scale = self.params.scale.unwrap_or(1.0 / (d as f32).sqrt());
        let log2e = std::f32::consts::LOG2_E;
        let (q_scale, cap_mul) = match self.params.softcap {
            Some(c) => (scale / c, c * log2e),
            None => (scale * log2e, 0.0),
        };
        let (kind, f, window) = match self.kind {
            ScoreKind::H2o => (0, 1.0, 0),
            ScoreKind::A2sf(f) => (1, f, 0),
            ScoreKind::Tova => (2, 0.0, 0),
            ScoreKind::SnapKv(w) => (3, 0.0, w.min(i32::MAX as usize) as i32),
        };
        // The most rows a block stages: G heads x the rows from the first weighted one (rounded
        // down to 8) to Sq, padded to 8 (kv_score.cu).
        let n_rows =
            hq / cache.kv_heads * (sq - (self.kind.first_row(sq) & !7)).next_multiple_of(8);
        let resident = std::env::var("LONGATTN_CUDA_SCORE_RESIDENT").map_or(true, |v| v != "0");
        let (rows_cap, kblocks) = launch_shape(n_rows, max, self.rows, (d, self.dev.sms), resident);
        let p = LaScoreParams {
            q: q.data.device_ptr(s).0,
            k: cache.k.device_ptr(s).0,
            lse: lse.device_ptr(s).0,
            tables: tables.device_ptr(s).0,
            lens: lens.device_ptr(s).0,
            score: self.scores.device_ptr(s).0,
            q_sb: q.strides[0] as i64,
            q_ss: q.strides[1] as i64,
            q_sh: q.strides[2] as i64,
            b: b as i32,
            sq: sq as i32,
            hq: hq as i32,
            hk: cache.kv_heads as i32,
            max_pages: max_pages as i32,
            cap: self.cap as i32,
            causal: causal as i32,
            reduce: self.params.reduce.kernel_code(),
            kind,
            window,
            f,
            q_scale,
            cap_mul,
            kblocks: kblocks as i32,
            rows_cap: rows_cap as i32,
            pad: 0,
        };
        if self.takes_wg(q) {
            return self.observe_wg(q, &p, max);
        }
        let cfg = LaunchConfig {
            grid_dim: (max.div_ceil(64 * kblocks) as u32, self.rows as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: smem_bytes(d, rows_cap) as u32,
        };
        let mut lb = s.launch_builder(&self.func);
        lb.arg(&p);
        // SAFETY: the struct matches the kernel's; tables and lengths are the cache's (pages of
        // its pool), every length is at most cap (checked: the score row bounds), q's strides and
        // shape were checked against [B, Sq, Hq, D], lse holds B Hq Sq values.
        unsafe { lb.launch(cfg) }.map_err(drv("launch kv scores"))?;
        Ok(())
    }

    /// Whether the chunk `q` folds through the Hopper kernel: at least `WG_MIN_ROWS` weighted
    /// rows, the kernel turned on (the `hopper` field), an sm_90 device, head dim 64, 128 or 256,
    /// q's address and strides multiples of 16 bytes (TMA).
    fn takes_wg(&self, q: &DevTensor) -> bool {
        let sq = q.shape[1];
        sq - self.kind.first_row(sq) >= WG_MIN_ROWS
            && self.hopper
            && self.dev.cc == (9, 0)
            && matches!(self.head_dim, 64 | 128 | 256)
            && q.tma_aligned()
    }

    /// The fold of `observe` through `kv_score_wg.cu`: the rows' offsets in log2 units
    /// (`la_kv_score_l2`, padded to whole query tiles), then one block per (128 entries, table
    /// row). `p` is the generic kernel's parameter set for this chunk (checked by `observe`),
    /// `max` the longest row.
    fn observe_wg(&mut self, q: &DevTensor, p: &LaScoreParams, max: usize) -> Result<()> {
        let [b, sq, hq, d] = q.shape;
        let first = self.kind.first_row(sq);
        let (br, stages) = wg_tiles(d);
        let sq_pad = sq.next_multiple_of(br);
        let n = b * hq * sq_pad;
        if self.l2.as_ref().is_none_or(|x| x.len() < n) {
            self.l2 = Some(self.dev.alloc_f32(n)?);
        }
        let l2 = self.l2.as_ref().expect("allocated above");
        let (src, variant) = (|| format!("{COMMON}\n{SCORE}"), &self.variant);
        let prep = self
            .dev
            .function_static(variant, "la_kv_score_l2", src, &self.defines, 0)?;
        let mut defines = self.defines.clone();
        defines.push(("LC_BR".into(), br.to_string()));
        defines.push(("LC_ST".into(), stages.to_string()));
        let pipe = wg_pipe();
        defines.push(("LC_PIPE".into(), pipe.to_string()));
        let unswitch = wg_unswitch() as u8;
        defines.push(("LC_UNSWITCH".into(), unswitch.to_string()));
        let smem = wg_smem_bytes(d);
        let wrappers = &*crate::cuda::wgmma::WRAPPERS;
        let main = self.dev.function_static(
            &format!("{}_wg{br}x{stages}p{pipe}u{unswitch}", self.variant),
            "la_kv_colscore",
            || format!("{COMMON}\n{WGMMA}\n{wrappers}\n{TMA}\n{SCORE_WG}"),
            &defines,
            smem,
        )?;
        let s = self.dev.stream();
        let sq_pad_i = sq_pad as i32;
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(256).min(65535) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut lb = s.launch_builder(&prep);
        lb.arg(p).arg(l2).arg(&sq_pad_i);
        // SAFETY: the parameters as for `la_kv_score` (checked by observe); l2 holds
        // B Hq sq_pad values.
        unsafe { lb.launch(cfg) }.map_err(drv("launch kv score offsets"))?;
        let w = LaColWs {
            tq: TmaMap::rows(q, br)?,
            p: LaColArgs {
                k: p.k,
                l2: l2.device_ptr(s).0,
                tables: p.tables,
                lens: p.lens,
                score: p.score,
                sq: sq as i32,
                hq: hq as i32,
                hk: p.hk,
                max_pages: p.max_pages,
                cap: p.cap,
                sq_pad: sq_pad_i,
                causal: p.causal,
                reduce: p.reduce,
                first: first as i32,
                decay: self.kind.decay(sq) as f32,
                q_scale: p.q_scale,
                cap_mul: p.cap_mul,
            },
        };
        let cfg = LaunchConfig {
            grid_dim: (max.div_ceil(128) as u32, self.rows as u32, 1),
            block_dim: (384, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let mut lb = s.launch_builder(&main);
        lb.arg(&w);
        // SAFETY: the struct matches the kernel's (size asserted on both sides); q's tensor map
        // covers [B, Sq, Hq, D]; l2 was just written for every (b, h, row < sq_pad); tables,
        // lengths and scores as for `la_kv_score`.
        unsafe { lb.launch(cfg) }.map_err(drv("launch kv scores (Hopper)"))?;
        Ok(())
    }

    /// What a decode plan folding these scores compiles in: their kind and group reduction
    /// ([`DecodePlan::with_scores`]).
    pub fn fold(&self) -> ScoreFold {
        ScoreFold::new(self.kind, self.params.reduce)
    }

    /// One decode step that also folds the previous step's attention (the tensor-core decode
    /// kernel computes the previous query's logits in rows of its product that are zero
    /// otherwise: no extra product, no second read of K). `plan` from
    /// [`DecodePlan::with_scores`] with [`DevScores::fold`]; q, o `[B, 1, Hq, D]`, lse `[B, Hq]` as
    /// [`DecodePlan::launch`]. `prev`: the previous step's (q, lse) and how many entries every row
    /// gained since it (its keys were each row's first `len - appended`); `None` (the first step,
    /// or the first after a compression) folds nothing. Scores therefore lag one step: fold the
    /// latest step with [`DevScores::observe`] (Sq = 1) before a press reads them. H2O, A2SF,
    /// TOVA and SnapKV (one row: as TOVA). Asynchronous.
    #[allow(clippy::too_many_arguments)]
    pub fn decode_fold(
        &mut self,
        plan: &DecodePlan,
        cache: &DevPagedCache,
        q: &DevTensor,
        o: &mut DevTensor,
        lse: &mut CudaSlice<f32>,
        prev: Option<(&DevTensor, &CudaSlice<f32>, usize)>,
    ) -> Result<()> {
        let max = self.check_cache(cache)?;
        if plan.scores != Some(self.fold()) {
            return Err(param(format!(
                "decode_fold needs a plan made by DecodePlan::with_scores for these scores' kind and reduction ({:?}); this plan folds {:?}",
                self.fold(),
                plan.scores
            )));
        }
        plan.check_io(cache, max, q, o, lse)?;
        if plan.batch == 0 {
            return Ok(());
        }
        let s = self.dev.stream();
        let raw = cache.raw_decode(q, o, lse, None);
        let Some((qp, lp, appended)) = prev else {
            // SAFETY: checked as DecodePlan::launch does (check_io above).
            return unsafe { plan.launch_raw(s, raw) };
        };
        if qp.shape != q.shape
            || qp.dtype != q.dtype
            || !qp.is_contiguous()
            || lp.len() < q.shape[0] * self.hq
        {
            return Err(Error::Shape {
                op: OP,
                tensor: "previous q / lse".into(),
                got: qp.shape.to_vec(),
                expected: format!("{:?} contiguous in {} and [B, Hq] f32", q.shape, q.dtype),
            });
        }
        let f = match self.kind {
            ScoreKind::A2sf(f) => f,
            _ => 0.0,
        };
        let sc = RawScore {
            q_prev: qp.data.device_ptr(s).0,
            lse_prev: lp.device_ptr(s).0,
            score: self.scores.device_ptr(s).0,
            cap: self.cap,
            prev_new: appended,
            f,
        };
        // SAFETY: q / o / lse checked by check_io, the previous q has q's shape and lse holds
        // B Hq values, every length is at most cap (the score rows' bound).
        unsafe { plan.launch_raw_scored(s, raw, sc) }
    }

    /// `cache` is the one these scores were made for and its longest row (returned) fits them.
    fn check_cache(&self, cache: &DevPagedCache) -> Result<usize> {
        if cache.layout
            != (KvLayout::HeadPaged {
                page_size: self.page,
            })
            || cache.batch() * cache.kv_heads != self.rows
            || cache.head_dim != self.head_dim
            || cache.dtype != self.dtype
        {
            return Err(param(format!(
                "cache ({}, {} rows of D {} in {}) is not the one these scores were made for ({} rows of D {} in {})",
                cache.layout.name(),
                cache.batch() * cache.kv_heads,
                cache.head_dim,
                cache.dtype,
                self.rows,
                self.head_dim,
                self.dtype
            )));
        }
        let max = cache.max_len();
        if max > self.cap {
            return Err(param(format!(
                "a head holds {max} entries; these scores cover {} (make new ones)",
                self.cap
            )));
        }
        Ok(max)
    }

    /// The scores `[rows, cap]` and the row stride `cap` (synchronous).
    pub fn download(&self) -> Result<(Vec<f32>, usize)> {
        let mut v = self.dev.download(&self.scores)?;
        v.truncate(self.rows * self.cap);
        Ok((v, self.cap))
    }

    /// Keeps the scores of entries `keep[r]` of every row, in order (as
    /// [`DevPagedCache::compress_heads`] keeps the entries); the rest of each row becomes 0.
    /// Through the host (a compression step, not a decode step).
    pub fn compact(&mut self, keep: &[Vec<usize>]) -> Result<()> {
        if keep.len() != self.rows {
            return Err(param(format!(
                "{} keep lists for {} rows",
                keep.len(),
                self.rows
            )));
        }
        let (old, cap) = self.download()?;
        let mut new = vec![0.0f32; old.len().max(1)];
        for (r, k) in keep.iter().enumerate() {
            if k.len() > cap {
                return Err(param(format!(
                    "row {r} keeps {} entries; the scores hold {cap}",
                    k.len()
                )));
            }
            for (slot, &e) in k.iter().enumerate() {
                if e >= cap {
                    return Err(param(format!("row {r}: entry {e} outside {cap}")));
                }
                new[r * cap + slot] = old[r * cap + e];
            }
        }
        self.scores = self.dev.upload(&new)?;
        Ok(())
    }
}

/// What [`chunk_scores_reference`] returns: the chunk's column sums per row (`[rows][len_r]`,
/// not folded) and the LSE `[B, Hq, Sq]` of its rows (natural log, -inf where a row sees nothing).
pub struct ChunkScores {
    pub cols: Vec<Vec<f64>>,
    pub lse: Vec<f64>,
}

/// The plain reference of one fold's column sums over any per-head storage: `key(r, e)` is entry e
/// of table row r = b Hk + kh (D values), `lens[r]` the row's entries, q `[B, Sq, Hq, D]` row-major
/// f32 values. Every probability from the definition in f64 (`P = exp(s - lse)`, lse over the
/// entries the row sees), weights `w` (one per row), the module's causal rule.
#[allow(clippy::too_many_arguments)]
pub fn chunk_scores_reference(
    key: &dyn Fn(usize, usize) -> Vec<f32>,
    lens: &[usize],
    q: &[f32],
    [b, sq, hq, d]: [usize; 4],
    w: &[f64],
    params: &ScoreParams,
    causal: bool,
) -> ChunkScores {
    let hk = lens.len() / b.max(1);
    let g = hq / hk.max(1);
    let scale = params.scale.unwrap_or(1.0 / (d as f32).sqrt()) as f64;
    let mut lse = vec![f64::NEG_INFINITY; b * hq * sq];
    let mut cols = Vec::with_capacity(lens.len());
    for (r, &len) in lens.iter().enumerate() {
        let (bi, kh) = (r / hk, r % hk);
        let keys: Vec<Vec<f32>> = (0..len).map(|e| key(r, e)).collect();
        let mut per_head = vec![vec![0.0f64; len]; g];
        for (gi, col) in per_head.iter_mut().enumerate() {
            let h = kh * g + gi;
            for i in 0..sq {
                let qi = &q[((bi * sq + i) * hq + h) * d..][..d];
                let seen = if causal {
                    (len + i + 1).saturating_sub(sq).min(len)
                } else {
                    len
                };
                let s: Vec<f64> = keys[..seen]
                    .iter()
                    .map(|k| {
                        let dot: f64 = qi.iter().zip(k).map(|(&x, &y)| x as f64 * y as f64).sum();
                        match params.softcap {
                            Some(c) => c as f64 * (scale * dot / c as f64).tanh(),
                            None => scale * dot,
                        }
                    })
                    .collect();
                if s.is_empty() {
                    continue;
                }
                let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let l = m + s.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
                lse[(bi * hq + h) * sq + i] = l;
                for (cj, &sj) in col.iter_mut().zip(&s) {
                    *cj += w[i] * (sj - l).exp();
                }
            }
        }
        cols.push(
            (0..len)
                .map(|e| params.reduce.apply(per_head.iter().map(|c| c[e]), g))
                .collect(),
        );
    }
    ChunkScores { cols, lse }
}

fn case(name: String, r: Result<(f64, String, bool)>) -> CaseResult {
    CaseResult::checked("kv", name, r.map(|(e, d, ok)| (e, 0.0, d, ok)), SCORE_TOL)
}

/// Largest score error relative to the row's largest score the selftest accepts (f32 logits
/// from bf16 / f16 products, the approximate exp2, f32 sums).
const SCORE_TOL: f64 = 2e-4;

/// A random per-head cache on the device for the selftest (`super::cuda::random_head_cache`:
/// pages of 16 scattered over a pool, ragged rows `lens`), with what the references read.
struct Fixture {
    cache: DevPagedCache,
    /// K of the pool as f32, the tables and their width.
    kf: Vec<f32>,
    tables: Vec<i32>,
    w: usize,
    /// q `[B, 1, Hq, D]` (random).
    q: Tensor,
    ulens: Vec<usize>,
    b: usize,
    d: usize,
}

impl Fixture {
    fn new(
        dev: &Arc<CudaDevice>,
        dt: DType,
        lens: &[i32],
        (hq, hk, d): (usize, usize, usize),
        seed: u64,
    ) -> Result<Fixture> {
        let page = 16;
        let (k, v, tables, w, q) =
            super::cuda::random_head_cache(dt, lens, page, (hq, hk, d), seed)?;
        let kv = super::decode::PagedKv {
            k: k.data.as_slice(),
            v: v.data.as_slice(),
            page_size: page,
            kv_heads: hk,
            head_dim: d,
        };
        let bt = super::decode::BlockTables::per_head(&tables, w, lens);
        let cache = DevPagedCache::from_parts(dev, &kv, &bt)?;
        Ok(Fixture {
            cache,
            kf: k.data.to_f32_vec(),
            tables,
            w,
            q,
            ulens: lens.iter().map(|&l| l.max(0) as usize).collect(),
            b: lens.len() / hk,
            d,
        })
    }

    /// Entry e of table row r (its D key values).
    fn key(&self, r: usize, e: usize) -> Vec<f32> {
        let slot = self.tables[r * self.w + e / 16] as usize * 16 + e % 16;
        self.kf[slot * self.d..][..self.d].to_vec()
    }

    fn max_len(&self) -> usize {
        self.ulens.iter().copied().max().unwrap_or(0)
    }
}

/// One selftest case: a random per-head cache (ragged rows), two folds of `kind` (chunks of
/// `sq1` then `sq2` rows over the same cache; the second's LSE from the reference), then a
/// compaction; every step against [`chunk_scores_reference`] folded on the host in f64.
#[allow(clippy::too_many_arguments)]
fn check_scores(
    dev: &Arc<CudaDevice>,
    dt: DType,
    lens: &[i32],
    (hq, hk, d): (usize, usize, usize),
    (sq1, sq2): (usize, usize),
    kind: ScoreKind,
    params: ScoreParams,
    causal: bool,
    seed: u64,
) -> Result<(f64, String, bool)> {
    let fx = Fixture::new(dev, dt, lens, (hq, hk, d), seed)?;
    let (cache, b, ulens) = (&fx.cache, fx.b, &fx.ulens);
    let max_len = fx.max_len();
    let key = |r: usize, e: usize| fx.key(r, e);
    let mut dsc = DevScores::new(dev, cache, hq, max_len.max(1) + 5, kind, params)?;
    dsc.hopper = true;
    // The same folds through the generic kernel only (a chunk of many weighted rows takes the
    // Hopper kernel in `dsc` where it applies).
    let mut generic = DevScores::new(dev, cache, hq, max_len.max(1) + 5, kind, params)?;
    generic.hopper = false;
    let mut hopper_used = false;
    let mut want: Vec<Vec<f64>> = ulens.iter().map(|&l| vec![0.0; l]).collect();
    let mut worst = 0.0f64;
    let mut err_of = |got: &[f32], stride: usize, want: &[Vec<f64>]| {
        let mut e = 0.0f64;
        for (r, wr) in want.iter().enumerate() {
            let scale = wr.iter().fold(1e-30f64, |m, x| m.max(x.abs()));
            for (j, &x) in wr.iter().enumerate() {
                e = e.max((got[r * stride + j] as f64 - x).abs() / scale);
            }
            // Past the row's length the scores stay 0.
            if got[r * stride + wr.len()..(r + 1) * stride]
                .iter()
                .any(|&x| x != 0.0)
            {
                e = f64::INFINITY;
            }
        }
        worst = worst.max(e);
        e
    };
    let mut errs = Vec::new();
    for (n, sq) in [sq1, sq2].into_iter().enumerate() {
        let q = random_tensor(dt, &[b, sq, hq, d], 1.0, seed + 10 + n as u64);
        let qf = q.data.to_f32_vec();
        let (decay, wts) = kind.weights(sq);
        let reference =
            chunk_scores_reference(&key, ulens, &qf, [b, sq, hq, d], &wts, &params, causal);
        for (wr, c) in want.iter_mut().zip(&reference.cols) {
            for (x, &y) in wr.iter_mut().zip(c) {
                *x = decay * *x + y;
            }
        }
        let lse: Vec<f32> = reference.lse.iter().map(|&x| x as f32).collect();
        let lse_d = dev.upload(&lse)?;
        let qd = DevTensor::upload(dev, "q", &q.view("q")?)?;
        dsc.observe(cache, &qd, &lse_d, causal)?;
        generic.observe(cache, &qd, &lse_d, causal)?;
        hopper_used |= dsc.takes_wg(&qd);
        let (got, stride) = dsc.download()?;
        errs.push(err_of(&got, stride, &want));
        let (got, stride) = generic.download()?;
        errs.push(err_of(&got, stride, &want));
    }
    // Compaction: a random keep set per row (some rows whole, some empty).
    let mut rng = Rng::new(seed + 99);
    let keep: Vec<Vec<usize>> = ulens
        .iter()
        .enumerate()
        .map(|(r, &l)| match r % 3 {
            0 => (0..l).collect(),
            1 => Vec::new(),
            _ => (0..l).filter(|_| rng.below(3) == 0).collect(),
        })
        .collect();
    dsc.compact(&keep)?;
    let kept: Vec<Vec<f64>> = keep
        .iter()
        .zip(&want)
        .map(|(k, wr)| k.iter().map(|&e| wr[e]).collect())
        .collect();
    let (got, stride) = dsc.download()?;
    errs.push(err_of(&got, stride, &kept));
    Ok((
        worst,
        format!(
            "score err (vs the row's largest) fold 1 {:.1e}, fold 2 {:.1e}, after compaction {:.1e}{}; generic kernel fold 1 {:.1e}, fold 2 {:.1e}",
            errs[0],
            errs[2],
            errs[4],
            if hopper_used { " (Hopper kernel)" } else { "" },
            errs[1],
            errs[3]
        ),
        worst <= SCORE_TOL,
    ))
}

/// Decode-step scores from the decode kernel's own LSE: decode on the device, then one fold of
/// Sq = 1 with that LSE, against the reference (whose LSE is its own).
fn check_decode_scores(
    dev: &Arc<CudaDevice>,
    dt: DType,
    lens: &[i32],
    (hq, hk, d): (usize, usize, usize),
    seed: u64,
) -> Result<(f64, String, bool)> {
    use super::decode::DecodeParams;
    let fx = Fixture::new(dev, dt, lens, (hq, hk, d), seed)?;
    let (cache, b, ulens, q) = (&fx.cache, fx.b, &fx.ulens, &fx.q);
    let max_len = fx.max_len();
    let plan = DecodePlan::new(dev, cache, hq, max_len, &DecodeParams::default())?;
    let qd = DevTensor::upload(dev, "q", &q.view("q")?)?;
    let mut o = DevTensor::alloc(dev, [b, 1, hq, d], dt)?;
    let mut lse = dev.alloc_f32((b * hq).max(1))?;
    plan.launch(cache, &qd, &mut o, &mut lse)?;
    let params = ScoreParams {
        reduce: Reduce::Sum,
        ..Default::default()
    };
    let mut dsc = DevScores::new(dev, cache, hq, max_len.max(1), ScoreKind::H2o, params)?;
    dsc.observe(cache, &qd, &lse, true)?;
    let (got, stride) = dsc.download()?;
    let key = |r: usize, e: usize| fx.key(r, e);
    let reference = chunk_scores_reference(
        &key,
        ulens,
        &q.data.to_f32_vec(),
        [b, 1, hq, d],
        &[1.0],
        &params,
        true,
    );
    let mut err = 0.0f64;
    let mut sums_off = 0.0f64;
    for (r, wr) in reference.cols.iter().enumerate() {
        let scale = wr.iter().fold(1e-30f64, |m, x| m.max(x.abs()));
        for (j, &x) in wr.iter().enumerate() {
            err = err.max((got[r * stride + j] as f64 - x).abs() / scale);
        }
        // With a sum over the group, a row's scores add up to G (each head's probabilities to 1).
        if !wr.is_empty() {
            let total: f64 = got[r * stride..][..wr.len()]
                .iter()
                .map(|&x| x as f64)
                .sum();
            sums_off = sums_off.max((total - (hq / hk) as f64).abs() / (hq / hk) as f64);
        }
    }
    Ok((
        err,
        format!(
            "score err {err:.1e} (decode's own LSE); row sums off G by {sums_off:.1e} (tol 1e-3)"
        ),
        err <= SCORE_TOL && sums_off <= 1e-3,
    ))
}

/// The fold inside the decode kernel: three decode steps over one cache (q1, q2, q3; the second
/// and third fold the step before), then the last step folded by [`DevScores::observe`]; against
/// the reference folded in f64 (c1, c2, c3 from each step's query over the whole rows). The
/// decode's outputs must equal the plain decode's bit for bit, and a second score set told that
/// 3 entries per row were new since each previous step must hold the same scores below them and
/// nothing from them.
#[allow(clippy::too_many_arguments)]
fn check_fused(
    dev: &Arc<CudaDevice>,
    dt: DType,
    lens: &[i32],
    (hq, hk, d): (usize, usize, usize),
    kind: ScoreKind,
    params: ScoreParams,
    seed: u64,
) -> Result<(f64, String, bool)> {
    use super::decode::DecodeParams;
    let fx = Fixture::new(dev, dt, lens, (hq, hk, d), seed)?;
    let (cache, b, ulens) = (&fx.cache, fx.b, &fx.ulens);
    let max_len = fx.max_len().max(1);
    let dp = DecodeParams {
        softcap: params.softcap,
        ..Default::default()
    };
    let plain = DecodePlan::new(dev, cache, hq, max_len, &dp)?;
    let mut sa = DevScores::new(dev, cache, hq, max_len, kind, params)?;
    let mut sb = DevScores::new(dev, cache, hq, max_len, kind, params)?;
    let fused = DecodePlan::with_scores(dev, cache, hq, max_len, &dp, sa.fold())?;
    let qs: Vec<Tensor> = (0..3)
        .map(|i| random_tensor(dt, &[b, 1, hq, d], 1.0, seed + 20 + i))
        .collect();
    let qd: Vec<DevTensor> = qs
        .iter()
        .map(|q| DevTensor::upload(dev, "q", &q.view("q")?))
        .collect::<Result<_>>()?;
    let mut os: Vec<DevTensor> = (0..3)
        .map(|_| DevTensor::alloc(dev, [b, 1, hq, d], dt))
        .collect::<Result<_>>()?;
    let mut ls: Vec<CudaSlice<f32>> = (0..3)
        .map(|_| dev.alloc_f32(b * hq))
        .collect::<Result<_>>()?;
    let mut differ = 0usize;
    for t in 0..3 {
        let (before, rest) = ls.split_at_mut(t);
        let prev = |x: usize| (t > 0).then(|| (&qd[t - 1], &before[t - 1], x));
        sa.decode_fold(&fused, cache, &qd[t], &mut os[t], &mut rest[0], prev(0))?;
        let mut ob2 = DevTensor::alloc(dev, [b, 1, hq, d], dt)?;
        let mut lb2 = dev.alloc_f32(b * hq)?;
        sb.decode_fold(&fused, cache, &qd[t], &mut ob2, &mut lb2, prev(3))?;
        // The plain decode of the same query: outputs equal bit for bit.
        let mut op = DevTensor::alloc(dev, [b, 1, hq, d], dt)?;
        let mut lp = dev.alloc_f32(b * hq)?;
        plain.launch(cache, &qd[t], &mut op, &mut lp)?;
        let (x, y) = (os[t].download(dev)?, op.download(dev)?);
        let bits = |t: &Tensor| {
            t.data
                .to_f32_vec()
                .iter()
                .map(|v| v.to_bits())
                .collect::<Vec<_>>()
        };
        differ += (bits(&x) != bits(&y) || bits(&ob2.download(dev)?) != bits(&y)) as usize;
        differ += (dev.download(&rest[0])? != dev.download(&lp)?) as usize;
    }
    let (pre, _) = sa.download()?;
    // Flush the last step.
    sa.observe(cache, &qd[2], &ls[2], true)?;
    let (got, stride) = sa.download()?;
    let (gb, _) = sb.download()?;
    let key = |r: usize, e: usize| fx.key(r, e);
    let (decay, wts) = kind.weights(1);
    let mut want: Vec<Vec<f64>> = ulens.iter().map(|&l| vec![0.0; l]).collect();
    for q in &qs {
        let c = chunk_scores_reference(
            &key,
            ulens,
            &q.data.to_f32_vec(),
            [b, 1, hq, d],
            &wts,
            &params,
            true,
        );
        for (wr, cr) in want.iter_mut().zip(&c.cols) {
            for (x, &y) in wr.iter_mut().zip(cr) {
                *x = decay * *x + y;
            }
        }
    }
    let mut err = 0.0f64;
    let mut lag_wrong = 0usize;
    for (r, wr) in want.iter().enumerate() {
        let scale = wr.iter().fold(1e-30f64, |m, x| m.max(x.abs()));
        for (j, &x) in wr.iter().enumerate() {
            err = err.max((got[r * stride + j] as f64 - x).abs() / scale);
        }
        // Told that 3 entries were new at each step: those hold nothing (two lagged folds only,
        // no flush), the rest what the first set held before its flush.
        let l = wr.len();
        let cut = l.saturating_sub(3);
        lag_wrong += gb[r * stride..][cut..l]
            .iter()
            .filter(|&&x| x != 0.0)
            .count();
        lag_wrong += gb[r * stride..][..cut]
            .iter()
            .zip(&pre[r * stride..][..cut])
            .filter(|(x, y)| x.to_bits() != y.to_bits())
            .count();
    }
    let ok = err <= SCORE_TOL && differ == 0 && lag_wrong == 0;
    Ok((
        err,
        format!("score err {err:.1e} after 2 folds in the decode + 1 observe; decode outputs != plain decode {differ} (must be 0); entries folded though new {lag_wrong} (must be 0)"),
        ok,
    ))
}

/// The device's press scores (group `kv` of `longattn selftest --backend cuda`, cases `kv scores
/// ...`): every kind and reduction, causal and not, Sq 1 / 7 / 65 / 113 and chunks of 128+
/// weighted rows (129 .. 1023: the Hopper kernel on sm_90, each also through the generic one),
/// ragged rows 0..4224,
/// GQA / MQA / MHA, D 64 / 128 / 256, bf16 and f16, soft-cap, compaction; decode steps with the
/// decode kernel's LSE; the fold inside the decode kernel; bad input refused.
pub fn selftest(dev: &Arc<CudaDevice>) -> Vec<CaseResult> {
    let mut out = Vec::new();
    let ragged = [1i32, 7, 63, 65, 113, 1023, 4224, 0];
    // (dtype, (Hq, Hk, D), (Sq of fold 1, of fold 2), kind, reduction, soft-cap, causal)
    type Case = (
        DType,
        (usize, usize, usize),
        (usize, usize),
        ScoreKind,
        Reduce,
        Option<f32>,
        bool,
    );
    let (bf, f16) = (DType::BF16, DType::F16);
    #[rustfmt::skip]
    let cases: [Case; 13] = [
        (bf, (8, 2, 128), (7, 1), ScoreKind::H2o, Reduce::Mean, None, true),
        // Chunks of >= 128 weighted rows: the Hopper kernel on sm_90.
        (bf, (8, 2, 128), (300, 129), ScoreKind::H2o, Reduce::Mean, None, true),
        (f16, (4, 1, 64), (1023, 200), ScoreKind::A2sf(0.999), Reduce::Max, None, true),
        (bf, (4, 4, 256), (257, 128), ScoreKind::H2o, Reduce::Sum, Some(20.0), false),
        (bf, (32, 8, 128), (513, 7), ScoreKind::H2o, Reduce::Sum, None, true),
        (bf, (8, 2, 64), (300, 131), ScoreKind::SnapKv(200), Reduce::Mean, None, false),
        (f16, (4, 1, 64), (65, 7), ScoreKind::A2sf(0.9), Reduce::Max, None, true),
        (bf, (4, 4, 256), (1, 1), ScoreKind::Tova, Reduce::Sum, None, true),
        (bf, (32, 8, 128), (113, 33), ScoreKind::SnapKv(32), Reduce::Mean, None, true),
        (bf, (8, 2, 64), (7, 65), ScoreKind::H2o, Reduce::Sum, Some(20.0), true),
        (f16, (8, 2, 128), (63, 1), ScoreKind::A2sf(0.5), Reduce::Mean, None, false),
        (bf, (6, 2, 128), (1, 1), ScoreKind::H2o, Reduce::Max, None, true),
        (bf, (8, 8, 128), (65, 65), ScoreKind::SnapKv(7), Reduce::Max, None, false),
    ];
    for (n, &(dt, (hq, hk, d), sqs, kind, reduce, softcap, causal)) in cases.iter().enumerate() {
        // Rows of the ragged lengths (two sequences' worth, cycled over the KV heads).
        let lens: Vec<i32> = (0..2 * hk)
            .map(|r| ragged[(r + n) % ragged.len()])
            .collect();
        let params = ScoreParams {
            scale: None,
            softcap,
            reduce,
        };
        out.push(case(
            format!(
                "kv scores {dt} Hq{hq}/{hk} D{d} Sq {}+{} {kind:?} {reduce:?}{}{}",
                sqs.0,
                sqs.1,
                if causal { " causal" } else { " all pairs" },
                softcap.map_or(String::new(), |c| format!(" softcap {c}"))
            ),
            check_scores(
                dev,
                dt,
                &lens,
                (hq, hk, d),
                sqs,
                kind,
                params,
                causal,
                500 + 17 * n as u64,
            ),
        ));
    }
    for (n, &(dt, (hq, hk, d))) in [(DType::BF16, (32, 8, 128)), (DType::F16, (4, 1, 64))]
        .iter()
        .enumerate()
    {
        let lens: Vec<i32> = (0..3 * hk)
            .map(|r| ragged[(r + 3 * n) % ragged.len()])
            .collect();
        out.push(case(
            format!("kv scores decode step {dt} Hq{hq}/{hk} D{d} (decode's LSE)"),
            check_decode_scores(dev, dt, &lens, (hq, hk, d), 700 + n as u64),
        ));
    }
    type Fused = (DType, (usize, usize, usize), ScoreKind, Reduce, Option<f32>);
    #[rustfmt::skip]
    let fused: [Fused; 4] = [
        (bf, (32, 8, 128), ScoreKind::H2o, Reduce::Sum, None),
        (f16, (4, 1, 64), ScoreKind::A2sf(0.8), Reduce::Max, None),
        (bf, (8, 8, 128), ScoreKind::Tova, Reduce::Mean, Some(30.0)),
        (bf, (16, 2, 64), ScoreKind::H2o, Reduce::Mean, None),
    ];
    for (n, &(dt, (hq, hk, d), kind, reduce, softcap)) in fused.iter().enumerate() {
        let lens: Vec<i32> = (0..2 * hk)
            .map(|r| ragged[(r + 2 * n) % ragged.len()])
            .collect();
        let params = ScoreParams {
            scale: None,
            softcap,
            reduce,
        };
        out.push(case(
            format!(
                "kv scores in the decode {dt} Hq{hq}/{hk} D{d} {kind:?} {reduce:?}{}",
                softcap.map_or(String::new(), |c| format!(" softcap {c}"))
            ),
            check_fused(
                dev,
                dt,
                &lens,
                (hq, hk, d),
                kind,
                params,
                800 + 13 * n as u64,
            ),
        ));
    }
    out.push(bad_input(dev));
    out
}

/// Bad input refused with an error naming it.
fn bad_input(dev: &Arc<CudaDevice>) -> CaseResult {
    let r = (|| -> Result<(f64, String, bool)> {
        let (hq, hk, d) = (8, 2, 64);
        let lens = [40i32, 9];
        let fx = Fixture::new(dev, DType::BF16, &lens, (hq, hk, d), 3)?;
        let cache = &fx.cache;
        let p = ScoreParams::default();
        let mut refused = Vec::new();
        refused.push(DevScores::new(dev, cache, 5, 64, ScoreKind::H2o, p).is_err());
        refused.push(DevScores::new(dev, cache, hq, 64, ScoreKind::A2sf(1.5), p).is_err());
        refused.push(DevScores::new(dev, cache, hq, 64, ScoreKind::SnapKv(0), p).is_err());
        let mut ok = DevScores::new(dev, cache, hq, 64, ScoreKind::H2o, p)?;
        let mut small = DevScores::new(dev, cache, hq, 16, ScoreKind::H2o, p)?;
        let q = random_tensor(DType::BF16, &[1, 3, hq, d], 1.0, 5);
        let qd = DevTensor::upload(dev, "q", &q.view("q")?)?;
        let short = dev.alloc_f32(hq * 3 - 1)?;
        let lse = dev.alloc_f32(hq * 3)?;
        refused.push(ok.observe(cache, &qd, &short, true).is_err());
        refused.push(small.observe(cache, &qd, &lse, true).is_err());
        let wrong: Tensor = random_tensor(DType::BF16, &[1, 3, hq, 32], 1.0, 6);
        let wd = DevTensor::upload(dev, "q", &wrong.view("q")?)?;
        refused.push(ok.observe(cache, &wd, &lse, true).is_err());
        refused.push(ok.compact(&[vec![0]]).is_err());
        // The fold in the decode: a plan without it, a plan folding another kind or reduction,
        // a group of 16 query heads.
        let dp = crate::kv::decode::DecodeParams::default();
        let plain = DecodePlan::new(dev, cache, hq, 64, &dp)?;
        let mut o = DevTensor::alloc(dev, [1, 1, hq, d], DType::BF16)?;
        let q1 = DevTensor::upload(
            dev,
            "q",
            &random_tensor(DType::BF16, &[1, 1, hq, d], 1.0, 7).view("q")?,
        )?;
        let mut l1 = dev.alloc_f32(hq)?;
        refused.push(
            ok.decode_fold(&plain, cache, &q1, &mut o, &mut l1, None)
                .is_err(),
        );
        for other in [
            ScoreFold::new(ScoreKind::A2sf(0.5), p.reduce),
            ScoreFold::new(ScoreKind::H2o, crate::kv::score::Reduce::Max),
        ] {
            let plan = DecodePlan::with_scores(dev, cache, hq, 64, &dp, other)?;
            refused.push(
                ok.decode_fold(&plan, cache, &q1, &mut o, &mut l1, None)
                    .is_err(),
            );
        }
        refused.push(DecodePlan::with_scores(dev, cache, 32, 64, &dp, ok.fold()).is_err());
        refused.push(ok.compact(&[vec![0], vec![99]]).is_err());
        let all = refused.iter().all(|&x| x);
        Ok((
            0.0,
            format!(
                "refused {} of {} bad calls",
                refused.iter().filter(|&&x| x).count(),
                refused.len()
            ),
            all,
        ))
    })();
    case("kv scores bad input refused".into(), r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::score::{column_scores_reference, Observation};
    use crate::kv::{KvConfig, PagedKvCache};
    use crate::mask::MaskExpr;
    use crate::tensor::TensorView;

    #[test]
    fn score_parameter_struct_matches_the_kernel() {
        crate::cuda::forward::check_layout(
            SCORE,
            "LaScoreParams",
            &crate::cuda::forward::offsets!(LaScoreParams; q, k, lse, tables, lens, score, q_sb,
                q_ss, q_sh, b, sq, hq, hk, max_pages, cap, causal, reduce, kind, window, f,
                q_scale, cap_mul, kblocks, rows_cap, pad),
            std::mem::size_of::<LaScoreParams>(),
        );
    }

    #[test]
    fn colscore_parameter_struct_matches_the_kernel() {
        crate::cuda::forward::check_layout(
            SCORE_WG,
            "LaColArgs",
            &crate::cuda::forward::offsets!(LaColArgs; k, l2, tables, lens, score, sq, hq, hk,
                max_pages, cap, sq_pad, causal, reduce, first, decay, q_scale, cap_mul),
            std::mem::size_of::<LaColArgs>(),
        );
        assert_eq!(std::mem::offset_of!(LaColWs, p), 128);
    }

    /// The generic fold's launch shape: chunks of 64 rows over one key block unless the rows are
    /// resident; resident rows up to the buffer (256 at D 128, 128 at D 256) in multiples of 64,
    /// up to 8 key blocks a block while the grid keeps about 8 blocks per SM; the shared memory
    /// of the largest buffer within the device's 227 KiB.
    #[test]
    fn generic_fold_launch_shape() {
        let sms = 132;
        // SnapKV's window of 32 rows at G 4 (128 rows), 32 x 8 table rows of 8192 entries.
        assert_eq!(launch_shape(128, 8192, 256, (128, sms), false), (64, 1));
        assert_eq!(launch_shape(128, 8192, 256, (128, sms), true), (128, 8));
        // A decode step (G 4 heads x 8 padded rows) on 8 rows of 4096: 512 key blocks, 1 each.
        assert_eq!(launch_shape(32, 4096, 8, (128, sms), true), (64, 1));
        // 1 x 128k at 8 table rows: 16384 key blocks, 15 per 8 x 132 -> 8.
        assert_eq!(launch_shape(32, 131072, 8, (128, sms), true), (64, 8));
        // More rows than the buffer holds: chunks.
        assert_eq!(launch_shape(257, 8192, 256, (128, sms), true), (64, 1));
        assert_eq!(launch_shape(129, 8192, 256, (256, sms), true), (64, 1));
        assert_eq!(launch_shape(128, 8192, 256, (256, sms), true), (128, 8));
        for d in [64, 128, 256] {
            assert!(smem_bytes(d, max_rows(d)) <= 227 * 1024);
        }
    }

    /// The Hopper fold compiles under NVRTC for sm_90a (no GPU needed, only `libnvrtc`;
    /// skipped, and said so, without it): D 64 / 128 / 256, bf16 / f16, with and without
    /// soft-cap, two and four items per turn, the mask's test unswitched or not; ptxas keeps every wgmma asynchronous and spills
    /// nothing. The offsets kernel
    /// compiles with the generic one (`scripts/nvrtc_check.py`).
    #[test]
    fn colscore_kernels_compile_with_nvrtc() {
        if crate::cuda::compile::test_programs().is_none() {
            return;
        }
        let wrappers = &*crate::cuda::wgmma::WRAPPERS;
        let src = format!("{COMMON}\n{WGMMA}\n{wrappers}\n{TMA}\n{SCORE_WG}");
        let mut n = 0;
        for d in [64usize, 128, 256] {
            let (br, st) = wg_tiles(d);
            assert!(wg_smem_bytes(d) <= 227 * 1024);
            for (f16, cap, pipe, unswitch) in [
                (0, 0, 2, 1),
                (0, 1, 2, 1),
                (1, 0, 2, 1),
                (1, 1, 2, 1),
                (0, 0, 4, 1),
                (1, 1, 4, 1),
                (0, 0, 4, 0),
            ] {
                let defines: Vec<(String, String)> = [
                    ("LA_F16", f16.to_string()),
                    ("LA_D", d.to_string()),
                    ("LA_PAGE", "16".to_string()),
                    ("LA_SOFTCAP", cap.to_string()),
                    ("LC_BR", br.to_string()),
                    ("LC_ST", st.to_string()),
                    ("LC_PIPE", pipe.to_string()),
                    ("LC_UNSWITCH", unswitch.to_string()),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
                let name = format!("test_kv_colscore_d{d}_f{f16}_c{cap}_p{pipe}u{unswitch}");
                crate::cuda::compile::assert_ptxas_clean(&name, &src, &defines);
                n += 1;
            }
        }
        assert_eq!(n, 21);
    }

    /// The device's reference reads entries by index with the chunk as every row's last Sq
    /// entries; the CPU reference reads positions through the mask. On a cache whose heads were
    /// compressed (ragged) and then received the chunk, the two agree for every kind, reduction
    /// and Sq, causal and not, soft-capped or not.
    #[test]
    fn chunk_reference_equals_the_cpu_reference() {
        let (hq, hk, d) = (6, 2, 16);
        let cfg = KvConfig {
            layers: 1,
            kv_heads: hk,
            head_dim: d,
            v_dim: d,
            page_size: 16,
        };
        let mut rng = Rng::new(41);
        let mut randn =
            |n: usize, s: f32| -> Vec<f32> { (0..n).map(|_| s * rng.normal() as f32).collect() };
        for &(len0, sq) in &[(7usize, 1usize), (113, 7), (65, 65), (1023, 13)] {
            let mut c = PagedKvCache::new(cfg).unwrap();
            let a = c.add_sequence();
            let (k0, v0) = (randn(len0 * hk * d, 2.0), randn(len0 * hk * d, 1.0));
            c.append(a, &[(&k0, &v0)]).unwrap();
            // Head 1 keeps about a third of its entries.
            let keep: Vec<usize> = (0..len0).filter(|e| e % 3 == 1).collect();
            c.compress(a, 0, 1, &keep).unwrap();
            let (k1, v1) = (randn(sq * hk * d, 2.0), randn(sq * hk * d, 1.0));
            c.append(a, &[(&k1, &v1)]).unwrap();
            let qd = randn(sq * hq * d, 1.0);
            let q = TensorView::contiguous(&qd[..], [1, sq, hq, d]).unwrap();
            let heads: Vec<Vec<f32>> = (0..hk)
                .map(|kh| c.gather_head(a, 0, kh).unwrap().0)
                .collect();
            let lens: Vec<usize> = heads.iter().map(|k| k.len() / d).collect();
            let key = |r: usize, e: usize| heads[r][e * d..][..d].to_vec();
            let causal = MaskExpr::parse("causal").unwrap();
            for mask in [Some(&causal), None] {
                for kind in [
                    ScoreKind::H2o,
                    ScoreKind::A2sf(0.7),
                    ScoreKind::Tova,
                    ScoreKind::SnapKv(5),
                ] {
                    for reduce in [Reduce::Mean, Reduce::Max, Reduce::Sum] {
                        for softcap in [None, Some(3.0)] {
                            let params = ScoreParams {
                                scale: None,
                                softcap,
                                reduce,
                            };
                            let (_, w) = kind.weights(sq);
                            let got = chunk_scores_reference(
                                &key,
                                &lens,
                                &qd,
                                [1, sq, hq, d],
                                &w,
                                &params,
                                mask.is_some(),
                            );
                            let obs = Observation {
                                q: &q,
                                lse: &vec![0.0; hq * sq],
                                mask,
                                select: None,
                            };
                            let want =
                                column_scores_reference(&c, a, 0, &obs, &w, &params).unwrap();
                            for (g, w) in got.cols.iter().zip(&want) {
                                assert_eq!(g.len(), w.len());
                                for (x, y) in g.iter().zip(w) {
                                    assert!((x - y).abs() <= 1e-12 * y.abs().max(1.0), "len {len0} sq {sq} {kind:?} {reduce:?} {softcap:?}: {x} vs {y}");
                                }
                            }
                            // The LSE it hands the device: every row sees at least one entry.
                            assert!(got.lse.iter().all(|l| l.is_finite()));
                        }
                    }
                }
            }
        }
    }
}
