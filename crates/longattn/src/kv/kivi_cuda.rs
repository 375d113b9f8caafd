//! KIVI quantized pages on the GPU ([`DevKivi`], kernels `cuda/kernels/kv_kivi.cu`): the oldest
//! entries of every (sequence, KV head) of a per-head cache ([`KvLayout::HeadPaged`]) move, a
//! group of G at a time, into quantized pages (K per channel, V per token, 2 or 4 bits, the
//! policy of [`super::kivi`]); the newest R .. R + G - 1 stay in the cache's full-precision pages
//! (the residual), whose freed pages go back to its pool. One decode kernel reads both parts of a
//! row (quantized tiles dequantized in registers on the tensor cores, then the residual) with
//! the split, online softmax and LSE merge of `cuda/kernels/decode.cu`.
//!
//! Scales and minima are stored as f16 (the CPU path keeps f32): the page layout is written in
//! `kv_kivi.cu`; [`PageLayout`], [`pack_page`] and [`unpack_page`] are its plain reference (the
//! device's pages must equal [`pack_page`] byte for byte, and decode must match the f64 oracle
//! over [`unpack_page`]'s values: [`selftest`]).
use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};
use half::f16;

use super::decode::DecodeParams;
use super::kivi::Kivi;
use crate::cuda::decode::{DecodePlan, DevPagedCache, KvLayout, RawQuant};
use crate::cuda::selftest::CaseResult;
use crate::cuda::{drv, CudaDevice, DevTensor};
use crate::error::{Error, Result};
use crate::reference::RefOutput;
use crate::tensor::{Buffer, DType, Tensor};
use crate::testing::{compare, out_tolerance, Rng, LSE_TOLERANCE};

const OP: &str = "cuda kivi";

fn param(msg: String) -> Error {
    Error::Param { op: OP, msg }
}

/// Groups the device takes (tokens per page and K group, channels per V group).
pub const DEVICE_GROUPS: [usize; 3] = [16, 32, 64];
/// Head dims the device takes (K and V alike).
pub const DEVICE_HEAD_DIMS: [usize; 3] = [64, 128, 256];
/// At most this many V channel groups per token (D / G): a tile's V minima are the rows of one
/// mma A fragment's first 8 rows (kv_kivi.cu).
const MAX_V_GROUPS: usize = 8;

/// Byte layout of one quantized page: `kv_kivi.cu`'s header states it; the functions here
/// compute the same offsets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageLayout {
    pub d: usize,
    pub bits: u32,
    pub group: usize,
}

impl PageLayout {
    pub fn new(d: usize, bits: u32, group: usize) -> Result<PageLayout> {
        if ![2, 4].contains(&bits) {
            return Err(param(format!(
                "KIVI pages on the GPU hold 2 or 4 bits, got {bits}"
            )));
        }
        if !DEVICE_HEAD_DIMS.contains(&d) {
            return Err(param(format!(
                "KIVI pages on the GPU take head dims {DEVICE_HEAD_DIMS:?}, got {d}"
            )));
        }
        if !Self::groups(d).any(|g| g == group) {
            return Err(param(format!(
                "KIVI group {group}: at head dim {d} the GPU takes {:?} (from {DEVICE_GROUPS:?}, dividing D into at most {MAX_V_GROUPS} channel groups)",
                Self::groups(d).collect::<Vec<_>>()
            )));
        }
        Ok(PageLayout { d, bits, group })
    }
    /// The groups the device takes at head dim `d`.
    pub fn groups(d: usize) -> impl Iterator<Item = usize> {
        DEVICE_GROUPS
            .into_iter()
            .filter(move |&g| d.is_multiple_of(g) && d / g <= MAX_V_GROUPS)
    }
    /// Dynamic shared memory of the quantizer (`la_kivi_quant`): a job's G entries of K and V
    /// in the storage type, K's (s, lo) per channel and V's per (token, channel group) in f32.
    pub fn quant_smem(&self) -> usize {
        4 * self.group * self.d + 8 * self.d + 8 * self.group * self.ng()
    }
    /// Code words of one lane and tile.
    fn nw(&self) -> usize {
        self.d * self.bits as usize / 64
    }
    /// Bytes of a lane's chunk.
    fn ch(&self) -> usize {
        (4 * self.nw()).min(16)
    }
    fn codes(&self) -> usize {
        2 * self.d * self.bits as usize
    }
    fn ng(&self) -> usize {
        self.d / self.group
    }
    fn tile(&self) -> usize {
        2 * self.codes() + 64 * self.ng()
    }
    fn ks(&self) -> usize {
        4 * self.d
    }
    pub fn page_bytes(&self) -> usize {
        self.ks() + self.group / 16 * self.tile()
    }
    /// One decode ring stage: a page.
    pub fn stage_bytes(&self) -> usize {
        self.page_bytes()
    }
    /// Byte offset of lane `l`'s word `wi` in a tile's codes.
    fn word_at(&self, wi: usize, l: usize) -> usize {
        let chw = self.ch() / 4;
        (wi / chw) * 32 * self.ch() + l * self.ch() + (wi % chw) * 4
    }
    /// (byte, bit) of element `el` of register `reg` of fragment f of lane l in a tile's codes
    /// (A fragments: register reg = rows r + 8 (reg & 1), k columns 2 q4 + 8 (reg >> 1) + el).
    fn slot(&self, f: usize, reg: usize, el: usize, l: usize) -> (usize, usize) {
        let b = self.bits as usize;
        let fw = 4 / b;
        let (wi, j) = (f / fw, f % fw);
        let bit = el * 16 + 8 * (reg & 1) + 4 * j + b * (reg >> 1);
        (self.word_at(wi, l) + bit / 8, bit % 8)
    }
    /// (lane, register, element) of A-fragment entry (row 0..16, k column 0..16).
    fn a_entry(row: usize, col: usize) -> (usize, usize, usize) {
        let (r, q4) = (row % 8, (col % 8) / 2);
        (4 * r + q4, row / 8 + 2 * (col / 8), col & 1)
    }
    /// Position of a k index 0..16 in the 16-byte scale groups: (q4, e), e = (k & 1) + 2 (k >= 8).
    fn k_index(k: usize) -> (usize, usize) {
        ((k % 8) / 2, (k & 1) + 2 * usize::from(k >= 8))
    }
    /// (byte, bit) of K's code of (token t, channel c): fragment c / 16, row = key, k = channel.
    fn k_code_at(&self, t: usize, c: usize) -> (usize, usize) {
        let (l, reg, el) = Self::a_entry(t % 16, c % 16);
        let (at, bit) = self.slot(c / 16, reg, el, l);
        (self.ks() + (t / 16) * self.tile() + at, bit)
    }
    /// (byte, bit) of V's code of (token t, channel c): fragment c / 16, row = channel, k = key.
    fn v_code_at(&self, t: usize, c: usize) -> (usize, usize) {
        let (l, reg, el) = Self::a_entry(c % 16, t % 16);
        let (at, bit) = self.slot(c / 16, reg, el, l);
        (self.ks() + (t / 16) * self.tile() + self.codes() + at, bit)
    }
    /// Offset of the f16 element e of a pair of pairs: (e0, e1), (e2, e3).
    fn half(e: usize) -> usize {
        (e >> 1) * 4 + (e & 1) * 2
    }
    /// Byte offsets of K's f16 s and lo of channel c.
    fn k_scale_at(&self, c: usize) -> (usize, usize) {
        let (q4, e) = Self::k_index(c % 16);
        let at = (4 * (c / 16) + q4) * 16 + Self::half(e);
        (at, at + 8)
    }
    /// Byte offsets of V's f16 s and lo of (token t, channel group g).
    fn v_scale_at(&self, t: usize, g: usize) -> (usize, usize) {
        let (ti, tt) = (t / 16, t % 16);
        let (q4, e) = Self::k_index(tt);
        let base = self.ks() + ti * self.tile() + 2 * self.codes();
        let ng = self.ng();
        (
            base + (q4 * ng + g) * 8 + Self::half(e),
            base + 32 * ng + (g * 4 + q4) * 8 + Self::half(e),
        )
    }
}

/// The kernels' compile-time constants of a layout.
pub(crate) fn defines(bits: u32, group: usize) -> Vec<(String, String)> {
    vec![
        ("LA_KIVI".into(), "1".into()),
        ("LA_QB".into(), bits.to_string()),
        ("LA_QG".into(), group.to_string()),
    ]
}

/// (s, lo) of a group as stored (f16, returned as f32) and whether both are finite with finite
/// inputs (the kernel's `scale`).
fn scale_lo16(x: impl Iterator<Item = f32> + Clone, bits: u32) -> (f32, f32, bool) {
    let finite = x.clone().all(f32::is_finite);
    let (s, lo) = super::kivi::scale_lo(x, bits);
    let (s, lo) = (f16::from_f32(s).to_f32(), f16::from_f32(lo).to_f32());
    (s, lo, finite && s.is_finite() && lo.is_finite())
}

fn put(page: &mut [u8], (sa, la): (usize, usize), s: f32, lo: f32) {
    page[sa..sa + 2].copy_from_slice(&f16::from_f32(s).to_bits().to_le_bytes());
    page[la..la + 2].copy_from_slice(&f16::from_f32(lo).to_bits().to_le_bytes());
}

fn get(page: &[u8], (sa, la): (usize, usize)) -> (f32, f32) {
    let h = |a: usize| f16::from_bits(u16::from_le_bytes([page[a], page[a + 1]])).to_f32();
    (h(sa), h(la))
}

/// The page of G tokens `k`, `v` (`[G, D]` row-major, values of the storage type) under `lay`,
/// and whether every group's scale and minimum are finite in f16 (reference of `la_kivi_quant`).
pub fn pack_page(k: &[f32], v: &[f32], lay: PageLayout) -> (Vec<u8>, bool) {
    let (g, d, bits) = (lay.group, lay.d, lay.bits);
    let mut page = vec![0u8; lay.page_bytes()];
    let mut ok = true;
    for c in 0..d {
        let (s, lo, fin) = scale_lo16((0..g).map(|t| k[t * d + c]), bits);
        ok &= fin;
        put(&mut page, lay.k_scale_at(c), s, lo);
        for t in 0..g {
            let (at, bit) = lay.k_code_at(t, c);
            page[at] |= super::kivi::code(k[t * d + c], s, lo, bits) << bit;
        }
    }
    for t in 0..g {
        for grp in 0..lay.ng() {
            let xs = &v[t * d + grp * g..][..g];
            let (s, lo, fin) = scale_lo16(xs.iter().copied(), bits);
            ok &= fin;
            put(&mut page, lay.v_scale_at(t, grp), s, lo);
            for (i, &x) in xs.iter().enumerate() {
                let (at, bit) = lay.v_code_at(t, grp * g + i);
                page[at] |= super::kivi::code(x, s, lo, bits) << bit;
            }
        }
    }
    (page, ok)
}

/// The values a page stands for: (K^, V^) `[G, D]`, x^ = lo + s c.
pub fn unpack_page(page: &[u8], lay: PageLayout) -> (Vec<f32>, Vec<f32>) {
    let (g, d) = (lay.group, lay.d);
    let mask = (1u8 << lay.bits) - 1;
    let code = |(at, bit): (usize, usize)| ((page[at] >> bit) & mask) as f32;
    let mut k = vec![0f32; g * d];
    let mut v = vec![0f32; g * d];
    for c in 0..d {
        let (s, lo) = get(page, lay.k_scale_at(c));
        for t in 0..g {
            k[t * d + c] = lo + s * code(lay.k_code_at(t, c));
        }
    }
    for t in 0..g {
        for c in 0..d {
            let (s, lo) = get(page, lay.v_scale_at(t, c / g));
            v[t * d + c] = lo + s * code(lay.v_code_at(t, c));
        }
    }
    (k, v)
}

/// Field for field `LaKiviParams` in `kernels/kv_kivi.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct LaKiviParams {
    k: u64,
    v: u64,
    tables: u64,
    jobs: u64,
    qpages: u64,
    bad: u64,
    max_pages: i32,
    njobs: i32,
}

// SAFETY: plain-old-data with the C layout of the kernel's parameter struct.
unsafe impl cudarc::driver::DeviceRepr for LaKiviParams {}

/// The quantized part of one layer's per-head cache (see the module documentation): a pool of
/// pages, a table and a count of quantized entries per (sequence, KV head) row.
pub struct DevKivi {
    dev: Arc<CudaDevice>,
    pub kivi: Kivi,
    pub layout: PageLayout,
    quant: CudaFunction,
    pool: CudaSlice<u8>,
    free: Vec<i32>,
    num_pages: usize,
    /// Pages of every row, oldest first.
    tables: Vec<Vec<i32>>,
    qtables: CudaSlice<i32>,
    qmax_pages: usize,
    qlens: CudaSlice<i32>,
    dtype: DType,
    hk: usize,
    batch: usize,
}

impl DevKivi {
    /// Quantized pages for `cache` (per-head pages, D 64 or 128) under `kivi`: a pool of
    /// `num_pages` pages, rows of at most `max_len` quantized entries.
    pub fn new(
        dev: &Arc<CudaDevice>,
        cache: &DevPagedCache,
        kivi: Kivi,
        max_len: usize,
        num_pages: usize,
    ) -> Result<DevKivi> {
        kivi.check()?;
        if kivi.mixed.is_some() {
            return Err(param(format!(
                "`{kivi}`: a bit width per page by importance is not on the device yet (the CPU cache runs it); use kivi(bits=4|2)"
            )));
        }
        let KvLayout::HeadPaged { page_size } = cache.layout else {
            return Err(param(format!(
                "KIVI on the device needs a per-head paged cache, this one is {}",
                cache.layout.name()
            )));
        };
        let layout = PageLayout::new(cache.head_dim, kivi.bits, kivi.group)?;
        let dt = cache.dtype;
        let mut defs = vec![
            ("LA_F16".into(), ((dt == DType::F16) as u8).to_string()),
            ("LA_D".into(), layout.d.to_string()),
            ("LA_G".into(), "1".into()),
            ("LA_PAGE".into(), page_size.to_string()),
            ("LA_WARPS".into(), "4".into()),
            ("LA_U".into(), "4".into()),
            ("LA_NS".into(), "2".into()),
            ("LA_MMA".into(), "1".into()),
            ("LA_MERGE_ONLY".into(), "0".into()),
        ];
        defs.extend(defines(layout.bits, layout.group));
        let src = format!(
            "{}\n{}\n{}",
            include_str!("../cuda/kernels/common.cuh"),
            include_str!("../cuda/kernels/decode.cu"),
            crate::cuda::decode::KIVI
        );
        let variant = format!(
            "kivi_quant_{}_d{}_b{}_g{}_p{page_size}",
            dt.name(),
            layout.d,
            layout.bits,
            layout.group
        );
        let quant = dev.function(&variant, "la_kivi_quant", &src, &defs, layout.quant_smem())?;
        let rows = cache.batch() * cache.kv_heads;
        let qmax_pages = max_len.div_ceil(layout.group).max(1);
        let s = dev.stream();
        let pool = s
            .alloc_zeros::<u8>((num_pages * layout.page_bytes()).max(1))
            .map_err(drv("alloc kivi pages"))?;
        let qtables = s
            .alloc_zeros::<i32>((rows * qmax_pages).max(1))
            .map_err(drv("alloc kivi tables"))?;
        let qlens = s
            .alloc_zeros::<i32>(rows.max(1))
            .map_err(drv("alloc kivi lengths"))?;
        Ok(DevKivi {
            dev: dev.clone(),
            kivi,
            layout,
            quant,
            pool,
            free: (0..num_pages as i32).rev().collect(),
            num_pages,
            tables: vec![Vec::new(); rows],
            qtables,
            qmax_pages,
            qlens,
            dtype: dt,
            hk: cache.kv_heads,
            batch: cache.batch(),
        })
    }

    /// Quantized entries per row.
    pub fn lens(&self) -> Vec<usize> {
        self.tables
            .iter()
            .map(|t| t.len() * self.layout.group)
            .collect()
    }

    /// Bytes of the pages in use, and of the pool.
    pub fn bytes(&self) -> (usize, usize) {
        let pb = self.layout.page_bytes();
        ((self.num_pages - self.free.len()) * pb, self.num_pages * pb)
    }

    /// The pages of row r, oldest first.
    pub fn pages(&self, r: usize) -> &[i32] {
        &self.tables[r]
    }

    /// The pool as bytes (tests).
    pub fn download(&self) -> Result<Vec<u8>> {
        self.dev.download(&self.pool)
    }

    /// Moves the oldest full groups of every row's residual into quantized pages while it keeps
    /// more than R + G - 1 entries (so it ends with R .. R + G - 1), then compacts the residual
    /// (`compress_heads`: its freed pages go back to the cache's pool). Returns the entries
    /// quantized. Out of pages, or values whose scale or minimum f16 cannot hold (NaN, inf,
    /// beyond 65504): an error, and the cache and the quantized pages are as they were.
    pub fn quantize(&mut self, cache: &mut DevPagedCache) -> Result<usize> {
        let rows = self.tables.len();
        if !cache.layout.head_tables()
            || cache.batch() * cache.kv_heads != rows
            || cache.dtype != self.dtype
            || cache.head_dim != self.layout.d
        {
            return Err(param(format!(
                "cache ({}, {} rows, D {}) is not the one these KIVI pages were made for ({rows} rows, D {})",
                cache.layout.name(),
                cache.batch() * cache.kv_heads,
                cache.head_dim,
                self.layout.d
            )));
        }
        let (g, res) = (self.kivi.group, self.kivi.residual);
        let lens = cache.lens();
        let groups: Vec<usize> = lens
            .iter()
            .map(|&l| if l >= res + g { (l - res) / g } else { 0 })
            .collect();
        for (r, &n) in groups.iter().enumerate() {
            if self.tables[r].len() + n > self.qmax_pages {
                return Err(param(format!(
                    "row {r} would hold {} quantized entries; these pages cover {} (make new ones)",
                    (self.tables[r].len() + n) * g,
                    self.qmax_pages * g
                )));
            }
        }
        let need: usize = groups.iter().sum();
        if need == 0 {
            return Ok(0);
        }
        if need > self.free.len() {
            return Err(param(format!(
                "{need} quantized pages needed, {} free",
                self.free.len()
            )));
        }
        // The free list is popped from its end: a row's new pages come in ascending order.
        let mut taken: Vec<i32> = self.free.split_off(self.free.len() - need);
        taken.reverse();
        let mut jobs = Vec::with_capacity(3 * need);
        let mut next = taken.iter();
        for (r, &n) in groups.iter().enumerate() {
            for i in 0..n {
                jobs.extend([r as i32, (i * g) as i32, *next.next().expect("counted")]);
            }
        }
        let restore = |me: &mut DevKivi, e: Error| {
            me.free.extend(taken.iter().rev());
            Err(e)
        };
        if let Err(e) = self.launch_quant(cache, &jobs, need) {
            return restore(self, e);
        }
        let keep: Vec<Vec<usize>> = groups
            .iter()
            .zip(&lens)
            .map(|(&n, &l)| (n * g..l).collect())
            .collect();
        if let Err(e) = cache.compress_heads(&keep) {
            return restore(self, e);
        }
        let mut next = taken.iter();
        for (r, &n) in groups.iter().enumerate() {
            self.tables[r].extend(next.by_ref().take(n));
        }
        self.sync()?;
        Ok(need * g)
    }

    fn launch_quant(&self, cache: &DevPagedCache, jobs: &[i32], n: usize) -> Result<()> {
        let s = self.dev.stream();
        let jd = self.dev.upload(jobs)?;
        let bad = self.dev.upload(&[0i32])?;
        let (tables, max_pages, _) = cache.device_tables();
        let p = LaKiviParams {
            k: cache.k.device_ptr(s).0,
            v: cache.v.device_ptr(s).0,
            tables: tables.device_ptr(s).0,
            jobs: jd.device_ptr(s).0,
            qpages: self.pool.device_ptr(s).0,
            bad: bad.device_ptr(s).0,
            max_pages: max_pages as i32,
            njobs: n as i32,
        };
        let cfg = LaunchConfig {
            grid_dim: (n as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: self.layout.quant_smem() as u32,
        };
        let mut lb = s.launch_builder(&self.quant);
        lb.arg(&p);
        // SAFETY: the struct matches the kernel's; every job reads G live entries of its row
        // (positions below the row's length, through the cache's tables) and writes one page of
        // the pool taken from the free list; `jd` / `bad` live until the synchronisation below.
        unsafe { lb.launch(cfg) }.map_err(drv("launch kivi quantize"))?;
        self.dev.synchronize()?;
        let bad = self.dev.download(&bad)?[0];
        if bad > 0 {
            return Err(param(format!(
                "{bad} groups hold values whose scale or minimum f16 cannot represent (NaN, inf or beyond 65504): nothing was quantized"
            )));
        }
        Ok(())
    }

    /// Uploads the tables and counts after a change.
    fn sync(&mut self) -> Result<()> {
        let w = self.qmax_pages;
        let mut flat = vec![0i32; self.tables.len() * w];
        for (r, t) in self.tables.iter().enumerate() {
            flat[r * w..][..t.len()].copy_from_slice(t);
        }
        let lens: Vec<i32> = self.lens().into_iter().map(|l| l as i32).collect();
        self.qtables = self.dev.upload(&flat)?;
        self.qlens = self.dev.upload(&lens)?;
        Ok(())
    }

    /// Total entries (quantized + residual) of every row of `cache`.
    pub fn total_lens(&self, cache: &DevPagedCache) -> Vec<usize> {
        self.lens()
            .iter()
            .zip(cache.lens())
            .map(|(a, b)| a + b)
            .collect()
    }

    /// A decode plan for `hq` query heads over rows of at most `max_len` total entries.
    pub fn plan(
        &self,
        cache: &DevPagedCache,
        hq: usize,
        max_len: usize,
        params: &DecodeParams,
    ) -> Result<DecodePlan> {
        let lens = self.total_lens(cache);
        let max_len = lens.iter().copied().fold(max_len, usize::max);
        DecodePlan::for_kivi(
            &self.dev,
            cache,
            hq,
            (max_len, &lens),
            params,
            (self.layout.bits, self.layout.group),
        )
    }

    /// Decode of q `[B, 1, Hq, D]` over every row's quantized and residual entries: o `[B, 1, Hq,
    /// D]`, lse `[B, Hq]` (asynchronous).
    pub fn decode(
        &self,
        plan: &DecodePlan,
        cache: &DevPagedCache,
        q: &DevTensor,
        o: &mut DevTensor,
        lse: &mut CudaSlice<f32>,
    ) -> Result<()> {
        if cache.batch() != self.batch || cache.kv_heads != self.hk {
            return Err(param(
                "the cache is not the one these KIVI pages were made for".into(),
            ));
        }
        let ours = (self.layout.bits, self.layout.group);
        if plan.kivi() != Some(ours) {
            return Err(param(format!(
                "the plan (KIVI bits and group {:?}) is not one for these pages ({ours:?}): make it with DevKivi::plan",
                plan.kivi()
            )));
        }
        let longest = self.total_lens(cache).into_iter().max().unwrap_or(0);
        plan.check_io(cache, longest, q, o, lse)?;
        let s = self.dev.stream();
        let raw = cache.raw_decode(q, o, lse, None);
        let rq = RawQuant {
            qpages: self.pool.device_ptr(s).0,
            qtables: self.qtables.device_ptr(s).0,
            qmax_pages: self.qmax_pages,
            qlens: self.qlens.device_ptr(s).0,
        };
        // SAFETY: q / o / lse checked above; the residual's tables were checked against its pool
        // by its allocator; the quantized tables hold pages of this pool (taken from its free
        // list) and cover qlens; every row's total is within the plan (check_io).
        unsafe { plan.launch_raw_kivi(s, raw, rq) }
    }
}

// ----------------------------------------------------------------------------------------------
// Self-test (`longattn selftest --backend cuda --filter kv`).

/// f64 decode oracle over explicit rows: `keys[r]` / `vals[r]` `[n_r, D]` of table row r = b Hk
/// + kh, q `[B, Hq, D]`, scale 1 / sqrt(D).
fn oracle(
    q: &[f32],
    (b, hq, hk, d): (usize, usize, usize, usize),
    keys: &[Vec<f32>],
    vals: &[Vec<f32>],
) -> RefOutput {
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = vec![0f64; b * hq * d];
    let mut lse = vec![f64::NEG_INFINITY; b * hq];
    for bi in 0..b {
        for h in 0..hq {
            let r = bi * hk + h / (hq / hk);
            let qr = &q[(bi * hq + h) * d..][..d];
            let n = keys[r].len() / d;
            let s: Vec<f64> = (0..n)
                .map(|j| {
                    let k = &keys[r][j * d..][..d];
                    qr.iter()
                        .zip(k)
                        .map(|(&a, &c)| a as f64 * c as f64)
                        .sum::<f64>()
                        * scale
                })
                .collect();
            if n == 0 {
                continue;
            }
            let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let l: f64 = s.iter().map(|x| (x - m).exp()).sum();
            let o = &mut out[(bi * hq + h) * d..][..d];
            for (j, x) in s.iter().enumerate() {
                let p = (x - m).exp() / l;
                for (oc, &vc) in o.iter_mut().zip(&vals[r][j * d..][..d]) {
                    *oc += p * vc as f64;
                }
            }
            lse[bi * hq + h] = m + l.ln();
        }
    }
    RefOutput {
        out,
        lse,
        shape: [b, 1, hq, d],
    }
}

/// Values as the storage type's bits (what the device's pages hold).
fn bits_of(x: &[f32], dt: DType) -> Vec<u16> {
    crate::cuda::decode::bits(Buffer::from_f32(dt, x).as_slice())
}

/// Storage bits as f32 values.
fn from_bits(b: &[u16], dt: DType) -> Vec<f32> {
    super::cuda::from_bits(b.to_vec(), dt).to_f32_vec()
}

/// Random entries in the storage type: uniform [-1, 1) with a few outlier channels (K's, the
/// reason KIVI quantizes K per channel) and a few heavy tokens.
fn random_rows(n: usize, d: usize, rng: &mut Rng, dt: DType) -> (Vec<f32>, Vec<f32>) {
    let mut k: Vec<f32> = (0..n * d)
        .map(|_| rng.uniform() as f32 * 2.0 - 1.0)
        .collect();
    let v: Vec<f32> = (0..n * d)
        .map(|_| rng.uniform() as f32 * 2.0 - 1.0)
        .collect();
    for (i, x) in k.iter_mut().enumerate() {
        if (i % d) % 29 == 3 {
            *x = *x * 6.0 + 4.0;
        }
    }
    for j in (0..n).step_by(53) {
        for x in &mut k[j * d..][..d] {
            *x *= 3.0;
        }
    }
    let round = |x: Vec<f32>| Buffer::from_f32(dt, &x).to_f32_vec();
    (round(k), round(v))
}

/// Values of the storage type as a device tensor.
fn upload(dev: &Arc<CudaDevice>, x: &[f32], shape: [usize; 4], dt: DType) -> Result<DevTensor> {
    let t = Tensor::new(Buffer::from_f32(dt, x), shape.to_vec())?;
    DevTensor::upload(dev, "kivi input", &t.view("kivi input")?)
}

struct KiviCase {
    dt: DType,
    heads: (usize, usize),
    d: usize,
    kivi: Kivi,
    /// Per sequence (every KV head of a sequence gets len + kh * 3 entries).
    lens: Vec<usize>,
    /// Entries appended to every row after the first quantization (then quantized again).
    more: usize,
    seed: u64,
}

/// One case: a per-head cache of random entries on the device, quantized; the pages must equal
/// [`pack_page`] of the same entries byte for byte, the residual must hold the newest entries
/// unchanged, and decode must match the f64 oracle over the dequantized pages and the residual;
/// then `more` appends, quantized again, checked again.
fn check_case(dev: &Arc<CudaDevice>, c: &KiviCase) -> Result<(f64, f64, String, bool)> {
    let (hq, hk) = c.heads;
    let (d, dt, page) = (c.d, c.dt, 16usize);
    let b = c.lens.len();
    let rows = b * hk;
    let row_len = |r: usize| c.lens[r / hk] + (r % hk) * 3;
    let mut rng = Rng::new(c.seed);
    // The full history of every row (host).
    let mut hist: Vec<(Vec<f32>, Vec<f32>)> = (0..rows)
        .map(|r| random_rows(row_len(r), d, &mut rng, dt))
        .collect();
    let max_total = (0..rows).map(row_len).max().unwrap_or(0) + c.more;
    let pages = 2
        * (0..rows)
            .map(|r| (row_len(r) + c.more).div_ceil(page) + 2)
            .sum::<usize>();
    let mut cache = DevPagedCache::new_head_paged(dev, dt, hk, d, page, pages, b)?;
    if let Some(t) = cache.page_tables_mut() {
        t.shuffle_free(c.seed);
    }
    cache.grow_rows(&(0..rows).map(row_len).collect::<Vec<_>>())?;
    // Write the entries into their slots through the tables.
    {
        let (tables, w, _) = cache.tables().expect("paged");
        let mut kb = vec![0u16; cache.k.len()];
        let mut vb = vec![0u16; cache.v.len()];
        for (r, (k, v)) in hist.iter().enumerate() {
            for j in 0..k.len() / d {
                let slot = tables[r * w + j / page] as usize * page + j % page;
                kb[slot * d..][..d].copy_from_slice(&bits_of(&k[j * d..][..d], dt));
                vb[slot * d..][..d].copy_from_slice(&bits_of(&v[j * d..][..d], dt));
            }
        }
        cache.k = dev.upload(&kb)?;
        cache.v = dev.upload(&vb)?;
    }
    let qpages = (0..rows)
        .map(|r| (row_len(r) + c.more) / c.kivi.group + 1)
        .sum();
    let mut kv = DevKivi::new(dev, &cache, c.kivi, max_total, qpages)?;
    let q: Vec<f32> = {
        let x: Vec<f32> = (0..b * hq * d)
            .map(|_| rng.uniform() as f32 * 2.0 - 1.0)
            .collect();
        Buffer::from_f32(dt, &x).to_f32_vec()
    };
    let qd = upload(dev, &q, [b, 1, hq, d], dt)?;
    let (mut worst, mut worst_lse, mut bad_bytes, mut bad_res) = (0f64, 0f64, 0usize, 0usize);
    // The logits' rounding bound: A = q s in f16 (relative 2^-11 per product), so a logit is off
    // by at most scale 2^-11 sum_d |q_d| s_d c_d <= scale 2^-11 sum_d |q_d| (s_d (2^b - 1)), and
    // the LSE by at most the largest logit error.
    let mut lse_bound = 0f64;
    let maxc = ((1u32 << c.kivi.bits) - 1) as f64;
    let mut quantized = 0;
    for round in 0..2 {
        if round == 1 {
            if c.more == 0 {
                break;
            }
            // Appends: `more` new entries for every row, one token per call.
            for _ in 0..c.more {
                let mut kn = Vec::with_capacity(rows * d);
                let mut vn = Vec::with_capacity(rows * d);
                for h in hist.iter_mut() {
                    let (k, v) = random_rows(1, d, &mut rng, dt);
                    h.0.extend(&k);
                    h.1.extend(&v);
                    kn.extend(k);
                    vn.extend(v);
                }
                let (kt, vt) = (
                    upload(dev, &kn, [b, 1, hk, d], dt)?,
                    upload(dev, &vn, [b, 1, hk, d], dt)?,
                );
                cache.append(&kt, &vt)?;
            }
        }
        quantized += kv.quantize(&mut cache)?;
        // Pages vs the reference packing; the residual vs the newest entries.
        let pool = kv.download()?;
        let pb = kv.layout.page_bytes();
        let g = c.kivi.group;
        let (res_k, res_v) = cache.download()?;
        let (tables, w, lens) = cache.tables().expect("paged");
        let mut keys = Vec::with_capacity(rows);
        let mut vals = Vec::with_capacity(rows);
        for (r, (hk_, hv_)) in hist.iter().enumerate() {
            let (mut kr, mut vr) = (Vec::new(), Vec::new());
            for (i, &pg) in kv.pages(r).iter().enumerate() {
                let got = &pool[pg as usize * pb..][..pb];
                let (want, _) = pack_page(
                    &hk_[i * g * d..][..g * d],
                    &hv_[i * g * d..][..g * d],
                    kv.layout,
                );
                bad_bytes += got.iter().zip(&want).filter(|(a, b)| a != b).count();
                let (k, v) = unpack_page(got, kv.layout);
                kr.extend(k);
                vr.extend(v);
            }
            let mut range = vec![0f64; d];
            for &pg in kv.pages(r) {
                let got = &pool[pg as usize * pb..][..pb];
                for (ch, x) in range.iter_mut().enumerate() {
                    *x = x.max(get(got, kv.layout.k_scale_at(ch)).0 as f64 * maxc);
                }
            }
            for h in (r % hk) * (hq / hk)..(r % hk + 1) * (hq / hk) {
                let qr = &q[((r / hk) * hq + h) * d..][..d];
                let sum: f64 = qr.iter().zip(&range).map(|(a, x)| a.abs() as f64 * x).sum();
                lse_bound = lse_bound.max(sum / (d as f64).sqrt() * 2f64.powi(-11));
            }
            let nq = kv.pages(r).len() * g;
            let rl = lens[r] as usize;
            if nq + rl != hk_.len() / d {
                return Err(param(format!(
                    "row {r}: {nq} quantized + {rl} residual entries, {} appended",
                    hk_.len() / d
                )));
            }
            for j in 0..rl {
                let slot = tables[r * w + j / page] as usize * page + j % page;
                let k = from_bits(&res_k[slot * d..][..d], dt);
                let v = from_bits(&res_v[slot * d..][..d], dt);
                bad_res += usize::from(
                    k[..] != hk_[(nq + j) * d..][..d] || v[..] != hv_[(nq + j) * d..][..d],
                );
                kr.extend(k);
                vr.extend(v);
            }
            keys.push(kr);
            vals.push(vr);
        }
        let reference = oracle(&q, (b, hq, hk, d), &keys, &vals);
        let plan = kv.plan(&cache, hq, max_total, &DecodeParams::default())?;
        let mut o = DevTensor::alloc(dev, [b, 1, hq, d], dt)?;
        let mut lse = dev.alloc_f32((b * hq).max(1))?;
        kv.decode(&plan, &cache, &qd, &mut o, &mut lse)?;
        dev.synchronize()?;
        let out = o.download(dev)?;
        let mut l = dev.download(&lse)?;
        l.truncate(b * hq);
        let (e, el) = compare(&out, &l, &reference);
        worst = worst.max(e);
        worst_lse = worst_lse.max(el);
    }
    let (used, _) = kv.bytes();
    let lse_tol = (1.5 * lse_bound).max(LSE_TOLERANCE);
    let detail = format!(
        "{quantized} entries quantized into {} KiB; page bytes differing from the reference: {bad_bytes}; residual entries changed: {bad_res}; LSE held to {lse_tol:.2e} (f16 products q s)",
        used / 1024
    );
    Ok((
        worst,
        worst_lse,
        detail,
        bad_bytes == 0 && bad_res == 0 && quantized > 0 && worst_lse <= lse_tol,
    ))
}

/// Bad input: a failed quantization (values beyond f16) leaves the cache and the pages as they
/// were; unsupported layouts are refused by name.
fn check_refusals(dev: &Arc<CudaDevice>) -> Result<(f64, f64, String, bool)> {
    let (d, hk, page) = (64usize, 1usize, 16usize);
    let mut cache = DevPagedCache::new_head_paged(dev, DType::BF16, hk, d, page, 16, 1)?;
    cache.grow_rows(&[70])?;
    let mut kb = vec![half::bf16::from_f32(0.5).to_bits(); cache.k.len()];
    kb[5 * d + 3] = half::bf16::from_f32(1.0e6).to_bits();
    cache.k = dev.upload(&kb)?;
    let kivi = Kivi::uniform(4, 32, 0);
    let mut kv = DevKivi::new(dev, &cache, kivi, 128, 4)?;
    let before = cache.download()?;
    let e1 = kv.quantize(&mut cache);
    let unchanged = cache.download()? == before && cache.lens() == vec![70] && kv.lens() == vec![0];
    let mut notes = vec![format!(
        "overflow: {:?}",
        e1.as_ref().err().map(|e| e.to_string())
    )];
    let mut ok = e1.is_err() && unchanged && kv.bytes().0 == 0;
    let refused = [
        PageLayout::new(96, 4, 32).is_err(),
        PageLayout::new(256, 4, 16).is_err(),
        PageLayout::new(128, 3, 32).is_err(),
        PageLayout::new(64, 4, 128).is_err(),
        PageLayout::new(128, 4, 48).is_err(),
    ];
    ok &= refused.iter().all(|&x| x);
    notes.push(format!("layouts refused: {refused:?}"));
    let paged = DevPagedCache::new_paged(dev, DType::BF16, hk, d, page, 4, 1)?;
    let e2 = DevKivi::new(dev, &paged, kivi, 128, 4);
    ok &= e2.is_err();
    // A plan made for other pages (int2) is refused by the int4 pages' decode.
    let other = DevKivi::new(dev, &cache, Kivi { bits: 2, ..kivi }, 128, 4)?;
    let plan = other.plan(&cache, 1, 128, &DecodeParams::default())?;
    let q = upload(dev, &[0.5; 64], [1, 1, 1, 64], DType::BF16)?;
    let mut o = DevTensor::alloc(dev, [1, 1, 1, 64], DType::BF16)?;
    let mut lse = dev.alloc_f32(1)?;
    let e3 = kv.decode(&plan, &cache, &q, &mut o, &mut lse);
    notes.push(format!(
        "other plan: {:?}",
        e3.as_ref().err().map(|e| e.to_string())
    ));
    ok &= e3.is_err_and(|e| e.to_string().contains("not one for these pages"));
    Ok((0.0, 0.0, notes.join("; "), ok))
}

/// The KIVI part of `longattn selftest --backend cuda --filter kv`.
pub fn selftest(dev: &Arc<CudaDevice>) -> Vec<CaseResult> {
    let k = Kivi::uniform;
    let cases = [
        KiviCase {
            dt: DType::BF16,
            heads: (8, 2),
            d: 128,
            kivi: k(4, 32, 32),
            lens: vec![0, 1, 7, 63, 65, 113, 1023, 4224],
            more: 37,
            seed: 1,
        },
        KiviCase {
            dt: DType::BF16,
            heads: (32, 8),
            d: 128,
            kivi: k(2, 32, 0),
            lens: vec![4224, 65],
            more: 33,
            seed: 2,
        },
        KiviCase {
            dt: DType::F16,
            heads: (4, 1),
            d: 64,
            kivi: k(4, 16, 5),
            lens: vec![1023, 7, 113],
            more: 20,
            seed: 3,
        },
        KiviCase {
            dt: DType::BF16,
            heads: (4, 4),
            d: 64,
            kivi: k(2, 64, 32),
            lens: vec![2047, 130],
            more: 70,
            seed: 4,
        },
        KiviCase {
            dt: DType::F16,
            heads: (16, 2),
            d: 128,
            kivi: k(4, 64, 16),
            lens: vec![1, 4224],
            more: 0,
            seed: 5,
        },
        // D 256 (Gemma-3's heads): groups of 32 and 64 only (at most 8 V channel groups).
        KiviCase {
            dt: DType::BF16,
            heads: (4, 1),
            d: 256,
            kivi: k(4, 32, 32),
            lens: vec![1, 7, 63, 65, 113, 1023, 4224],
            more: 37,
            seed: 6,
        },
        KiviCase {
            dt: DType::F16,
            heads: (8, 2),
            d: 256,
            kivi: k(2, 64, 16),
            lens: vec![4224, 130],
            more: 70,
            seed: 7,
        },
    ];
    let mut out: Vec<CaseResult> = cases
        .iter()
        .map(|c| {
            let name = format!(
                "kv kivi {} {}/{} D{} {} lens {:?} +{}",
                c.dt, c.heads.0, c.heads.1, c.d, c.kivi, c.lens, c.more
            );
            let tol = out_tolerance(c.dt);
            match check_case(dev, c) {
                // The LSE is held to the case's own bound (its verdict), not LSE_TOLERANCE.
                Ok((err, lse_err, detail, ok)) => CaseResult {
                    group: "kv",
                    name,
                    passed: ok && err <= tol,
                    err,
                    tol,
                    lse_err,
                    detail,
                },
                Err(e) => CaseResult::checked("kv", name, Err(e), tol),
            }
        })
        .collect();
    out.push(CaseResult::checked(
        "kv",
        "kv kivi refusals (overflow leaves the cache as it was; layouts)".into(),
        check_refusals(dev),
        0.0,
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: usize, d: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
        random_rows(n, d, &mut Rng::new(seed), DType::BF16)
    }

    #[test]
    fn parameter_struct_matches_the_kernel() {
        // 6 pointers, 2 ints.
        assert_eq!(std::mem::size_of::<LaKiviParams>(), 56);
    }

    #[test]
    fn every_code_and_scale_has_its_own_place() {
        for d in DEVICE_HEAD_DIMS {
            for bits in [2, 4] {
                for group in PageLayout::groups(d) {
                    let lay = PageLayout::new(d, bits, group).unwrap();
                    let mut seen = vec![0u8; lay.page_bytes()];
                    let mut mark = |at: usize, mask: u8| {
                        assert_eq!(seen[at] & mask, 0, "{lay:?}: byte {at} used twice");
                        seen[at] |= mask;
                    };
                    let m = (1u8 << bits) - 1;
                    for t in 0..group {
                        for c in 0..d {
                            let (at, bit) = lay.k_code_at(t, c);
                            mark(at, m << bit);
                            let (at, bit) = lay.v_code_at(t, c);
                            mark(at, m << bit);
                        }
                        for g in 0..d / group {
                            let (sa, la) = lay.v_scale_at(t, g);
                            for a in [sa, sa + 1, la, la + 1] {
                                mark(a, 0xff);
                            }
                        }
                    }
                    for c in 0..d {
                        let (sa, la) = lay.k_scale_at(c);
                        for a in [sa, sa + 1, la, la + 1] {
                            mark(a, 0xff);
                        }
                    }
                    assert!(seen.iter().all(|&x| x == 0xff), "{lay:?}: holes");
                }
            }
        }
    }

    #[test]
    fn round_trip_error_is_within_half_a_step() {
        for (d, bits, group) in [
            (128, 4, 32),
            (64, 2, 16),
            (128, 2, 64),
            (64, 4, 64),
            (256, 4, 32),
            (256, 2, 64),
        ] {
            let lay = PageLayout::new(d, bits, group).unwrap();
            let (k, v) = rows(group, d, 7 + d as u64);
            let (page, ok) = pack_page(&k, &v, lay);
            assert!(ok);
            let (kq, vq) = unpack_page(&page, lay);
            let steps = ((1u32 << bits) - 1) as f32;
            for c in 0..d {
                let col: Vec<f32> = (0..group).map(|t| k[t * d + c]).collect();
                let (lo, hi) = col
                    .iter()
                    .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| {
                        (a.min(x), b.max(x))
                    });
                // Half a step, plus the f16 rounding of s and lo (relative 2^-11 each).
                let tol = (hi - lo) / steps / 2.0 * 1.01 + lo.abs().max(hi.abs()) * 2e-3;
                for t in 0..group {
                    let e = (kq[t * d + c] - k[t * d + c]).abs();
                    assert!(e <= tol, "{lay:?} K ({t}, {c}): {e} > {tol}");
                }
            }
            for t in 0..group {
                for g in 0..d / group {
                    let xs = &v[t * d + g * group..][..group];
                    let lo = xs.iter().copied().fold(f32::INFINITY, f32::min);
                    let hi = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let tol = (hi - lo) / steps / 2.0 * 1.01 + lo.abs().max(hi.abs()) * 2e-3;
                    for (i, &x) in xs.iter().enumerate() {
                        let e = (vq[t * d + g * group + i] - x).abs();
                        assert!(e <= tol, "{lay:?} V ({t}, {i}): {e} > {tol}");
                    }
                }
            }
        }
    }

    #[test]
    fn values_on_the_grid_come_back_exactly() {
        // Values on a grid of 16 steps whose scale and minimum f16 holds exactly.
        let (d, group) = (64, 16);
        let lay = PageLayout::new(d, 4, group).unwrap();
        let k: Vec<f32> = (0..group * d)
            .map(|i| ((i * 7 + i / d) % 16) as f32 * 0.25 - 2.0)
            .collect();
        let v: Vec<f32> = (0..group * d)
            .map(|i| ((i * 5) % 16) as f32 * 0.5)
            .collect();
        let (page, ok) = pack_page(&k, &v, lay);
        assert!(ok);
        let (kq, vq) = unpack_page(&page, lay);
        assert_eq!(kq, k);
        assert_eq!(vq, v);
    }

    #[test]
    fn non_finite_and_overflowing_groups_are_flagged() {
        let lay = PageLayout::new(64, 4, 16).unwrap();
        let (mut k, v) = rows(16, 64, 3);
        assert!(pack_page(&k, &v, lay).1);
        k[70] = 1.0e6;
        assert!(!pack_page(&k, &v, lay).1);
        k[70] = f32::NAN;
        assert!(!pack_page(&k, &v, lay).1);
    }

    #[test]
    fn bad_layouts_are_refused_by_name() {
        let e = PageLayout::new(96, 4, 32).unwrap_err().to_string();
        assert!(e.contains("head dims"), "{e}");
        let e = PageLayout::new(256, 4, 16).unwrap_err().to_string();
        assert!(e.contains("[32, 64]"), "{e}");
        let e = PageLayout::new(128, 3, 32).unwrap_err().to_string();
        assert!(e.contains("2 or 4 bits"), "{e}");
        let e = PageLayout::new(64, 4, 128).unwrap_err().to_string();
        assert!(e.contains("group"), "{e}");
    }
}
