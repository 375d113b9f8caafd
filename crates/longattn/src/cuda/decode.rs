//! Paged KV-cache decode on the GPU (split over key ranges, merged by LSE).
//!
//! - [`DevPagedCache`]: K/V pages of one layer on the device (`[num_pages, P, Hk, D]`, or a
//!   contiguous `[B, seq_cap, Hk, D]` for comparison), the block tables and lengths (uploaded from
//!   the host allocator [`PageTables`]), and appends of new K/V into the pages (`la_kv_append`).
//! - [`DecodePlan`]: the kernel variant (dtype, head dim, heads per block, page size, soft-cap)
//!   and the split of the keys ([`plan_splits`]: enough blocks to fill the GPU), with its
//!   workspace; [`DecodePlan::launch`] runs on device buffers (timing without transfers).
//! - [`decode`]: host in, host out, the contract of [`crate::kv::decode::decode`].
//! - [`selftest`] (the decode part of `longattn selftest --backend cuda`) and [`bench`].
//!
//! The kernels are in `kernels/decode.cu` (the algorithm and the merge formula are written there)
//! and `kernels/kv_append.cu`; the CPU twin with the same split and merge is
//! [`crate::kv::decode`].
use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};

use super::forward::DevTensor;
use super::selftest::CaseResult;
use super::{drv, CudaDevice};
use crate::attention::AttnOutput;
use crate::error::{Error, Result};
use crate::kv::decode::{
    decode_reference, heads_per_block, plan_splits, plan_splits_ragged, random_appends,
    random_cache, split_plan_for, validate, BlockTables, DecodeParams, PageTables, PagedCache,
    PagedKv, SplitPlan,
};
use crate::kv::score::{Reduce, ScoreKind};
use crate::tensor::{DType, Slice, Tensor};
use crate::testing::{compare, out_tolerance, AWKWARD_SIZES, LSE_TOLERANCE};

const COMMON: &str = include_str!("kernels/common.cuh");
const DECODE: &str = include_str!("kernels/decode.cu");
const APPEND: &str = include_str!("kernels/kv_append.cu");
pub(crate) const KIVI: &str = include_str!("kernels/kv_kivi.cu");

const OP: &str = "cuda decode";

/// Warps per decode block.
const WARPS: usize = 4;
/// Merge kernel: rows (warps) per block (`LA_MERGE_ROWS` in decode.cu).
const MERGE_ROWS: usize = 4;

/// Head dims the decode kernel supports: a token's row is held by D / 8 lanes, which must divide
/// the 32 lanes of a warp.
pub const HEAD_DIMS: [usize; 4] = [32, 64, 128, 256];

fn param(msg: String) -> Error {
    Error::Param { op: OP, msg }
}

/// Whether the tensor-core decode kernel (`LA_MMA`) takes head dim `d`: D <= 128, unless
/// `LONGATTN_CUDA_DECODE_MMA=0` picks the lane-group kernel (KIVI pages always take it).
fn mma_path(d: usize) -> bool {
    d <= 128 && std::env::var("LONGATTN_CUDA_DECODE_MMA").map_or(true, |v| v != "0")
}

/// Whether the decode kernel can fold press scores (`LA_SCORE`) at head dim `d` with `group`
/// query heads per KV head: the tensor-core path with the whole group in one block.
/// [`DecodePlan::with_scores`] refuses the rest (on a per-head paged, full-precision cache).
pub(crate) fn folds_scores(d: usize, group: usize) -> bool {
    mma_path(d) && group / heads_per_block(group) == 1
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Kernel parameters; field for field `LaDecParams` in `kernels/decode.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct LaDecParams {
    q: u64,
    k: u64,
    v: u64,
    tables: u64,
    lens: u64,
    o: u64,
    lse: u64,
    o_part: u64,
    lse_part: u64,
    seq_cap: i64,
    b: i32,
    hq: i32,
    hk: i32,
    max_pages: i32,
    num_splits: i32,
    split_len: i32,
    head_chunks: i32,
    head_tables: i32,
    q_scale: f32,
    cap_mul: f32,
    qpages: u64,
    qtables: u64,
    qlens: u64,
    qmax_pages: i32,
    qpad: i32,
    tickets: u64,
    q_prev: u64,
    lse_prev: u64,
    score: u64,
    score_cap: i32,
    score_prev_new: i32,
    score_f: f32,
    score_pad: i32,
}

// SAFETY: plain-old-data with the C layout of the kernel's parameter struct.
unsafe impl cudarc::driver::DeviceRepr for LaDecParams {}

/// Parameters of `la_kv_append`; field for field `LaAppendParams` in `kernels/kv_append.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct LaAppendParams {
    k_new: u64,
    v_new: u64,
    k_pages: u64,
    v_pages: u64,
    slots: u64,
    n: i64,
    row_chunks: i64,
}

// SAFETY: as above.
unsafe impl cudarc::driver::DeviceRepr for LaAppendParams {}

/// Parameters of `la_kv_move`; field for field `LaMoveParams` in `kernels/kv_append.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct LaMoveParams {
    k_pages: u64,
    v_pages: u64,
    src: u64,
    dst: u64,
    n: i64,
    row_chunks: i64,
}

// SAFETY: as above.
unsafe impl cudarc::driver::DeviceRepr for LaMoveParams {}

/// How the K/V rows of a batch are laid out on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvLayout {
    /// Pages of `page_size` tokens `[num_pages, page_size, Hk, D]` and block tables.
    Paged { page_size: usize },
    /// One slab per sequence `[B, seq_cap, Hk, D]` (no table: the baseline paging is held to).
    Contiguous { seq_cap: usize },
    /// Ragged per-head pages (a compressed cache): pages of one KV head `[num_pages, page_size,
    /// D]`, one block table and length per (sequence, KV head), `[B, Hk, max_pages]` / `[B, Hk]`.
    HeadPaged { page_size: usize },
}

impl KvLayout {
    fn define(&self) -> usize {
        match *self {
            KvLayout::Paged { page_size } | KvLayout::HeadPaged { page_size } => page_size,
            KvLayout::Contiguous { .. } => 0,
        }
    }
    /// Tokens per page (paged layouts).
    pub fn page_size(&self) -> Option<usize> {
        match *self {
            KvLayout::Paged { page_size } | KvLayout::HeadPaged { page_size } => Some(page_size),
            KvLayout::Contiguous { .. } => None,
        }
    }
    /// One table per (sequence, KV head).
    pub fn head_tables(&self) -> bool {
        matches!(self, KvLayout::HeadPaged { .. })
    }
    pub fn name(&self) -> String {
        match *self {
            KvLayout::Paged { page_size } => format!("paged p{page_size}"),
            KvLayout::HeadPaged { page_size } => format!("per-head paged p{page_size}"),
            KvLayout::Contiguous { .. } => "contiguous".into(),
        }
    }
}

/// Who decides where position j of sequence b lives.
#[derive(Clone, Debug)]
enum Slots {
    Paged(PageTables),
    Contiguous { cap: usize, lens: Vec<usize> },
}

/// One layer's K/V cache on the device: see the module documentation.
pub struct DevPagedCache {
    dev: Arc<CudaDevice>,
    pub dtype: DType,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub layout: KvLayout,
    pub k: CudaSlice<u16>,
    pub v: CudaSlice<u16>,
    slots: Slots,
    tables: CudaSlice<i32>,
    max_pages: usize,
    lens: CudaSlice<i32>,
}

fn check_kind(dtype: DType, d: usize) -> Result<()> {
    if !matches!(dtype, DType::BF16 | DType::F16) {
        return Err(Error::DType {
            op: OP,
            tensor: "kv cache".into(),
            got: dtype.to_string(),
            expected: "bf16 or f16 (use the CPU decode for f32)".into(),
        });
    }
    if !HEAD_DIMS.contains(&d) {
        return Err(param(format!(
            "head dim {d}: the CUDA decode kernel supports {HEAD_DIMS:?}"
        )));
    }
    Ok(())
}

pub(crate) fn bits(s: Slice) -> Vec<u16> {
    match s {
        Slice::BF16(x) => x.iter().map(|v| v.to_bits()).collect(),
        Slice::F16(x) => x.iter().map(|v| v.to_bits()).collect(),
        Slice::F32(_) => Vec::new(),
    }
}

impl DevPagedCache {
    fn alloc_zeros(dev: &CudaDevice, n: usize) -> Result<CudaSlice<u16>> {
        dev.stream()
            .alloc_zeros::<u16>(n.max(1))
            .map_err(drv("alloc kv cache"))
    }

    /// An empty paged cache: `num_pages` pages of `page_size` tokens (zeros), `batch` sequences.
    pub fn new_paged(
        dev: &Arc<CudaDevice>,
        dtype: DType,
        kv_heads: usize,
        head_dim: usize,
        page_size: usize,
        num_pages: usize,
        batch: usize,
    ) -> Result<DevPagedCache> {
        let layout = KvLayout::Paged { page_size };
        Self::new_pages(dev, dtype, kv_heads, head_dim, layout, num_pages, batch)
    }

    /// An empty ragged per-head cache ([`KvLayout::HeadPaged`]): `num_pages` pages of
    /// `page_size` tokens of one KV head (zeros), `batch` sequences of `kv_heads` tables each.
    pub fn new_head_paged(
        dev: &Arc<CudaDevice>,
        dtype: DType,
        kv_heads: usize,
        head_dim: usize,
        page_size: usize,
        num_pages: usize,
        batch: usize,
    ) -> Result<DevPagedCache> {
        let layout = KvLayout::HeadPaged { page_size };
        Self::new_pages(dev, dtype, kv_heads, head_dim, layout, num_pages, batch)
    }

    /// The empty cache of a paged `layout`: a page holds every KV head's rows (`Paged`, one
    /// table per sequence) or one head's (`HeadPaged`, one table per (sequence, KV head)).
    fn new_pages(
        dev: &Arc<CudaDevice>,
        dtype: DType,
        kv_heads: usize,
        head_dim: usize,
        layout: KvLayout,
        num_pages: usize,
        batch: usize,
    ) -> Result<DevPagedCache> {
        check_kind(dtype, head_dim)?;
        if kv_heads == 0 {
            return Err(param("kv heads must be >= 1".into()));
        }
        let page_size = layout.page_size().unwrap_or(0);
        let heads = if layout.head_tables() { 1 } else { kv_heads };
        let pt = PageTables::new(page_size, num_pages, batch * kv_heads / heads)?;
        let n = num_pages * page_size * heads * head_dim;
        Self::empty(
            dev,
            (dtype, kv_heads, head_dim),
            layout,
            Slots::Paged(pt),
            n,
        )
    }

    /// A cache of `n` zeroed K and V elements with no tables uploaded yet.
    fn empty(
        dev: &Arc<CudaDevice>,
        (dtype, kv_heads, head_dim): (DType, usize, usize),
        layout: KvLayout,
        slots: Slots,
        n: usize,
    ) -> Result<DevPagedCache> {
        let mut c = DevPagedCache {
            dev: dev.clone(),
            dtype,
            kv_heads,
            head_dim,
            layout,
            k: Self::alloc_zeros(dev, n)?,
            v: Self::alloc_zeros(dev, n)?,
            slots,
            tables: dev.upload::<i32>(&[])?,
            max_pages: 1,
            lens: dev.upload::<i32>(&[])?,
        };
        c.sync()?;
        Ok(c)
    }

    /// An empty contiguous cache `[batch, seq_cap, Hk, D]` (zeros).
    pub fn new_contiguous(
        dev: &Arc<CudaDevice>,
        dtype: DType,
        kv_heads: usize,
        head_dim: usize,
        seq_cap: usize,
        batch: usize,
    ) -> Result<DevPagedCache> {
        check_kind(dtype, head_dim)?;
        if kv_heads == 0 || seq_cap == 0 || seq_cap > i32::MAX as usize {
            return Err(param(format!(
                "kv heads {kv_heads} and seq_cap {seq_cap} must be in 1..2^31"
            )));
        }
        let n = batch * seq_cap * kv_heads * head_dim;
        Self::empty(
            dev,
            (dtype, kv_heads, head_dim),
            KvLayout::Contiguous { seq_cap },
            Slots::Contiguous {
                cap: seq_cap,
                lens: vec![0; batch],
            },
            n,
        )
    }

    /// Uploads pages, tables and lengths given as host arrays (checked like the CPU decode).
    /// With per-head tables (`bt.head_tables`) the cache is [`KvLayout::HeadPaged`].
    pub fn from_parts(
        dev: &Arc<CudaDevice>,
        kv: &PagedKv,
        bt: &BlockTables,
    ) -> Result<DevPagedCache> {
        check_kind(kv.dtype(), kv.head_dim)?;
        let batch = bt.lens.len() / bt.tables_per_seq(kv.kv_heads).max(1);
        let dims = validate([batch, 1, kv.kv_heads, kv.head_dim], kv.dtype(), kv, bt)?;
        let pt = PageTables::from_tables(
            kv.page_size,
            dims.num_pages,
            bt.tables,
            bt.max_pages,
            bt.lens,
        )?;
        let mut c = DevPagedCache {
            dev: dev.clone(),
            dtype: kv.dtype(),
            kv_heads: kv.kv_heads,
            head_dim: kv.head_dim,
            layout: if bt.head_tables {
                KvLayout::HeadPaged {
                    page_size: kv.page_size,
                }
            } else {
                KvLayout::Paged {
                    page_size: kv.page_size,
                }
            },
            k: dev.upload(&bits(kv.k))?,
            v: dev.upload(&bits(kv.v))?,
            slots: Slots::Paged(pt),
            tables: dev.upload::<i32>(&[])?,
            max_pages: 1,
            lens: dev.upload::<i32>(&[])?,
        };
        c.sync()?;
        Ok(c)
    }

    /// A host cache's pages and tables on the device (its free list too).
    pub fn from_host(dev: &Arc<CudaDevice>, c: &PagedCache) -> Result<DevPagedCache> {
        let mut d = Self::from_parts(dev, &c.view(), &c.block_tables())?;
        d.slots = Slots::Paged(c.tables.clone());
        Ok(d)
    }

    pub fn batch(&self) -> usize {
        match &self.slots {
            Slots::Paged(t) => t.batch() / self.rows_per_seq(),
            Slots::Contiguous { lens, .. } => lens.len(),
        }
    }
    /// Block tables per sequence: Hk for [`KvLayout::HeadPaged`], else 1.
    fn rows_per_seq(&self) -> usize {
        if self.layout.head_tables() {
            self.kv_heads
        } else {
            1
        }
    }
    /// Length of every table row: per sequence, or per (sequence, KV head) for
    /// [`KvLayout::HeadPaged`].
    pub fn lens(&self) -> Vec<usize> {
        match &self.slots {
            Slots::Paged(t) => (0..t.batch()).map(|s| t.len(s)).collect(),
            Slots::Contiguous { lens, .. } => lens.clone(),
        }
    }
    pub fn max_len(&self) -> usize {
        self.lens().into_iter().max().unwrap_or(0)
    }
    /// The page allocator (paged layout), e.g. to shuffle its free list.
    pub fn page_tables_mut(&mut self) -> Option<&mut PageTables> {
        match &mut self.slots {
            Slots::Paged(t) => Some(t),
            Slots::Contiguous { .. } => None,
        }
    }

    /// Uploads the block tables and lengths after the host allocator changed.
    fn sync(&mut self) -> Result<()> {
        let (t, w, l) = match &self.slots {
            Slots::Paged(pt) => {
                let (t, w) = pt.block_tables();
                (t, w, pt.lens())
            }
            Slots::Contiguous { lens, .. } => (
                vec![0; lens.len()],
                1,
                lens.iter().map(|&l| l as i32).collect(),
            ),
        };
        self.tables = self.dev.upload(&t)?;
        self.max_pages = w;
        self.lens = self.dev.upload(&l)?;
        Ok(())
    }

    /// Grows sequence `seq` by `n` positions and returns their slots (rows of the pool).
    /// A per-head cache grows every KV head of the sequence by the same positions; its slots
    /// (rows of D elements) come as `[n, Hk]`.
    fn grow(&mut self, seq: usize, n: usize) -> Result<Vec<usize>> {
        let hk = self.kv_heads;
        let heads = self.layout.head_tables();
        match &mut self.slots {
            Slots::Paged(t) if heads => {
                if seq >= t.batch() / hk {
                    return Err(param(format!(
                        "sequence {seq} outside the batch of {}",
                        t.batch() / hk
                    )));
                }
                let saved = t.clone();
                let mut per = Vec::with_capacity(hk);
                for kh in 0..hk {
                    match t.grow(seq * hk + kh, n) {
                        Ok(s) => per.push(s),
                        Err(e) => {
                            *t = saved;
                            return Err(e);
                        }
                    }
                }
                Ok((0..n).flat_map(|i| per.iter().map(move |s| s[i])).collect())
            }
            Slots::Paged(t) => t.grow(seq, n),
            Slots::Contiguous { cap, lens } => {
                let (cap, b) = (*cap, lens.len());
                let len = *lens
                    .get(seq)
                    .ok_or_else(|| param(format!("sequence {seq} outside the batch of {b}")))?;
                if len + n > cap {
                    return Err(param(format!(
                        "sequence {seq} grows to {} tokens, the contiguous cache holds {cap}",
                        len + n
                    )));
                }
                lens[seq] = len + n;
                Ok((len..len + n).map(|j| seq * cap + j).collect())
            }
        }
    }

    /// Sets every sequence to `len` positions without writing them (benchmarks fill the pool on
    /// the device); a paged cache takes the pages from its free list.
    pub fn grow_all(&mut self, len: usize) -> Result<()> {
        let per = self.rows_per_seq();
        for s in 0..self.batch() {
            let cur = self.lens()[s * per];
            if len > cur {
                self.grow(s, len - cur)?;
            }
        }
        self.sync()
    }

    /// Sets every table row r to `lens[r]` positions (at least its current length) without
    /// writing them: a ragged per-head cache for benchmarks (pages filled on the device).
    pub fn grow_rows(&mut self, lens: &[usize]) -> Result<()> {
        let Slots::Paged(t) = &mut self.slots else {
            return Err(param("grow_rows needs a paged cache".into()));
        };
        if lens.len() != t.batch() {
            return Err(param(format!(
                "{} lengths for {} table rows",
                lens.len(),
                t.batch()
            )));
        }
        for (r, &l) in lens.iter().enumerate() {
            let cur = t.len(r);
            if l > cur {
                t.grow(r, l - cur)?;
            }
        }
        self.sync()
    }

    fn append_fn(&self) -> Result<CudaFunction> {
        let src = format!("{COMMON}\n{APPEND}");
        let defines = vec![(
            "LA_F16".into(),
            ((self.dtype == DType::F16) as u8).to_string(),
        )];
        self.dev.function(
            &format!("kv_append_{}", self.dtype.name()),
            "la_kv_append",
            &src,
            &defines,
            0,
        )
    }

    /// Copies rows `k_new` / `v_new` (`[n, Hk, D]` as `[.., .., Hk, D]` tensors, row-major) into
    /// the given slots.
    fn write_slots(&mut self, slots: &[usize], k: &DevTensor, v: &DevTensor) -> Result<()> {
        if slots.is_empty() {
            return Ok(());
        }
        let f = self.append_fn()?;
        // A slot is a token row of every KV head, or (per-head pages) of one.
        let row_chunks = self.head_dim / 8
            * if self.layout.head_tables() {
                1
            } else {
                self.kv_heads
            };
        let sl: Vec<i64> = slots.iter().map(|&s| s as i64).collect();
        let sd = self.dev.upload(&sl)?;
        let s = self.dev.stream();
        let p = LaAppendParams {
            k_new: k.data.device_ptr(s).0,
            v_new: v.data.device_ptr(s).0,
            k_pages: self.k.device_ptr(s).0,
            v_pages: self.v.device_ptr(s).0,
            slots: sd.device_ptr(s).0,
            n: slots.len() as i64,
            row_chunks: row_chunks as i64,
        };
        let total = slots.len() * row_chunks;
        debug_assert_eq!(total * 8, k.data.len());
        let cfg = self.stride_cfg(total);
        let mut b = s.launch_builder(&f);
        b.arg(&p);
        // SAFETY: the struct matches the kernel's; k/v hold n x Hk x D elements (checked by the
        // callers), every slot lies inside the pool (given out by the allocator), and `sd` lives
        // until the stream is synchronized below.
        unsafe { b.launch(cfg) }.map_err(drv("launch kv append"))?;
        self.dev.synchronize()
    }

    fn check_new(&self, name: &str, t: &DevTensor, want: [usize; 4]) -> Result<()> {
        if t.shape != want || t.dtype != self.dtype {
            return Err(Error::Shape {
                op: OP,
                tensor: name.into(),
                got: t.shape.to_vec(),
                expected: format!("{want:?} in {}", self.dtype),
            });
        }
        Ok(())
    }

    /// Appends `n` tokens to sequence `seq`: `k`, `v` are `[1, n, Hk, D]` on the device.
    pub fn append_seq(&mut self, seq: usize, k: &DevTensor, v: &DevTensor) -> Result<()> {
        let n = k.shape[1];
        let want = [1, n, self.kv_heads, self.head_dim];
        self.check_new("k_new", k, want)?;
        self.check_new("v_new", v, want)?;
        let slots = self.grow(seq, n)?;
        self.sync()?;
        self.write_slots(&slots, k, v)
    }

    /// Appends `T` tokens to every sequence: `k`, `v` are `[B, T, Hk, D]` (a decode step: T = 1).
    /// Out of pages: an error and nothing changes.
    pub fn append(&mut self, k: &DevTensor, v: &DevTensor) -> Result<()> {
        let t = k.shape[1];
        let want = [self.batch(), t, self.kv_heads, self.head_dim];
        self.check_new("k_new", k, want)?;
        self.check_new("v_new", v, want)?;
        let saved = self.slots.clone();
        let mut slots = Vec::with_capacity(self.batch() * t);
        for s in 0..self.batch() {
            match self.grow(s, t) {
                Ok(x) => slots.extend(x),
                Err(e) => {
                    self.slots = saved;
                    return Err(e);
                }
            }
        }
        self.sync()?;
        self.write_slots(&slots, k, v)
    }

    /// The device's block tables, their width and the lengths (what the kernels read).
    pub(crate) fn device_tables(&self) -> (&CudaSlice<i32>, usize, &CudaSlice<i32>) {
        (&self.tables, self.max_pages, &self.lens)
    }

    /// The pointers of one decode over this cache (its own tables, or `tables`: (block tables,
    /// width, lengths) over the same pool, e.g. a selection).
    pub(crate) fn raw_decode(
        &self,
        q: &DevTensor,
        o: &mut DevTensor,
        lse: &mut CudaSlice<f32>,
        tables: Option<(&CudaSlice<i32>, usize, &CudaSlice<i32>)>,
    ) -> RawDecode {
        let s = self.dev.stream();
        let (t, w, l) = tables.unwrap_or((&self.tables, self.max_pages, &self.lens));
        RawDecode {
            q: q.data.device_ptr(s).0,
            k: self.k.device_ptr(s).0,
            v: self.v.device_ptr(s).0,
            tables: t.device_ptr(s).0,
            max_pages: w,
            lens: l.device_ptr(s).0,
            o: o.data.device_ptr(s).0,
            lse: lse.device_ptr(s).0,
        }
    }

    /// Block tables and lengths of every table row as the kernels read them: (`[rows,
    /// max_pages]` padded with -1, max_pages, `[rows]`); rows are sequences, or (sequence, KV
    /// head) pairs for [`KvLayout::HeadPaged`]. Contiguous caches have no tables.
    pub fn tables(&self) -> Option<(Vec<i32>, usize, Vec<i32>)> {
        match &self.slots {
            Slots::Paged(t) => {
                let (tab, w) = t.block_tables();
                Some((tab, w, t.lens()))
            }
            Slots::Contiguous { .. } => None,
        }
    }

    /// Compression of a [`KvLayout::HeadPaged`] cache: table row r (sequence r / Hk, KV head
    /// r % Hk) keeps the entries `keep[r]` (strictly increasing indices below its length), moved in
    /// order into fresh pages by `la_kv_move`; the row's old pages go back to the free list.
    /// Returns the pages freed (in use before less in use after). Everything is checked before
    /// anything moves: a bad keep list or too few free pages is an error and the cache is as it was.
    pub fn compress_heads(&mut self, keep: &[Vec<usize>]) -> Result<usize> {
        let d = self.head_dim;
        let Slots::Paged(t) = &mut self.slots else {
            return Err(param("compress_heads needs a per-head paged cache".into()));
        };
        if !self.layout.head_tables() {
            return Err(param(format!(
                "compress_heads needs a per-head paged cache, this one is {}",
                self.layout.name()
            )));
        }
        if keep.len() != t.batch() {
            return Err(param(format!(
                "{} keep lists for {} table rows (batch x KV heads)",
                keep.len(),
                t.batch()
            )));
        }
        for (r, k) in keep.iter().enumerate() {
            let len = t.len(r);
            if let Some(w) = k.windows(2).find(|w| w[0] >= w[1]) {
                return Err(param(format!(
                    "keep list of row {r}: indices must increase ({} then {})",
                    w[0], w[1]
                )));
            }
            if let Some(&last) = k.last() {
                if last >= len {
                    return Err(param(format!(
                        "keep list of row {r}: entry {last} past the row's {len} entries"
                    )));
                }
            }
        }
        let in_use = |t: &PageTables| (0..t.batch()).map(|r| t.pages(r).len()).sum::<usize>();
        let before = in_use(t);
        let saved = t.clone();
        // Every row gets fresh pages before any old page goes back (a later row must not take
        // a page that is still a source of this call's moves).
        let (mut src, mut dst, mut old) = (Vec::new(), Vec::new(), Vec::new());
        for (r, k) in keep.iter().enumerate() {
            let from: Vec<i64> = k
                .iter()
                .map(|&e| t.slot(r, e).expect("checked above") as i64)
                .collect();
            match t.rebuild(r, k.len()) {
                Ok((o, to)) => {
                    src.extend(from);
                    dst.extend(to.into_iter().map(|x| x as i64));
                    old.extend(o);
                }
                Err(e) => {
                    *t = saved;
                    return Err(param(format!(
                        "compression needs fresh pages for every kept entry before the old ones are freed: {e}"
                    )));
                }
            }
        }
        t.give_back(&old);
        let after = in_use(t);
        if !src.is_empty() {
            let f = self.move_fn()?;
            let (sd, dd) = (self.dev.upload(&src)?, self.dev.upload(&dst)?);
            let s = self.dev.stream();
            let row_chunks = d / 8;
            let p = LaMoveParams {
                k_pages: self.k.device_ptr(s).0,
                v_pages: self.v.device_ptr(s).0,
                src: sd.device_ptr(s).0,
                dst: dd.device_ptr(s).0,
                n: src.len() as i64,
                row_chunks: row_chunks as i64,
            };
            let total = src.len() * row_chunks;
            let cfg = self.stride_cfg(total);
            let mut b = s.launch_builder(&f);
            b.arg(&p);
            // SAFETY: the struct matches the kernel's; every source slot is a live entry of its
            // row and every destination a slot of a fresh page (taken from the free list before
            // the old pages went back), both inside the pool; `sd` / `dd` live until the
            // synchronisation below.
            unsafe { b.launch(cfg) }.map_err(drv("launch kv move"))?;
            self.dev.synchronize()?;
        }
        self.sync()?;
        Ok(before - after)
    }

    /// Grid-stride launch of the 256-thread copy kernels over `total` 16-byte chunks.
    fn stride_cfg(&self, total: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (total.div_ceil(256).clamp(1, self.dev.sms * 16) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn move_fn(&self) -> Result<CudaFunction> {
        let src = format!("{COMMON}\n{APPEND}");
        self.dev.function("kv_move", "la_kv_move", &src, &[], 0)
    }

    /// The pools copied to the host (tests).
    pub fn download(&self) -> Result<(Vec<u16>, Vec<u16>)> {
        let s = self.dev.stream();
        Ok((
            s.clone_dtoh(&self.k).map_err(drv("copy to host"))?,
            s.clone_dtoh(&self.v).map_err(drv("copy to host"))?,
        ))
    }
}

/// Everything about one decode problem that does not depend on the data: see the module
/// documentation.
pub struct DecodePlan {
    dev: Arc<CudaDevice>,
    func: CudaFunction,
    merge: CudaFunction,
    cfg: LaunchConfig,
    merge_cfg: LaunchConfig,
    base: LaDecParams,
    pub split: SplitPlan,
    /// Query heads per block (the whole group when it is <= 8).
    pub heads_per_block: usize,
    /// Blocks per SM the kernel reaches (the occupancy the split plan assumed).
    pub blocks_per_sm: usize,
    pub batch: usize,
    pub hq: usize,
    pub layout: KvLayout,
    dtype: DType,
    hk: usize,
    d: usize,
    /// (bits, group) of a KIVI plan.
    quant: Option<(u32, usize)>,
    /// The press-score fold compiled into the kernel ([`DecodePlan::with_scores`]).
    pub scores: Option<ScoreFold>,
    _o_part: CudaSlice<f32>,
    _lse_part: CudaSlice<f32>,
    _tickets: CudaSlice<i32>,
}

/// The rows' lengths of a ragged per-head cache, for the split plan
/// ([`crate::kv::decode::plan_splits_ragged`]: rows shorter than the longest launch fewer
/// blocks, so count the blocks, not the grid); None for one table per sequence.
fn cache_row_lens(cache: &DevPagedCache) -> Option<Vec<usize>> {
    cache.layout.head_tables().then(|| cache.lens())
}

impl DecodePlan {
    /// Plans decode of `hq` query heads against `cache` for sequences of at most `max_len` keys.
    pub fn new(
        dev: &Arc<CudaDevice>,
        cache: &DevPagedCache,
        hq: usize,
        max_len: usize,
        params: &DecodeParams,
    ) -> Result<DecodePlan> {
        let rows = cache_row_lens(cache);
        Self::for_cache(dev, cache, hq, max_len, params, rows, None, None)
    }

    /// [`DecodePlan::new`] with the press-score fold of the previous step inside the kernel
    /// (`crate::kv::score_cuda::DevScores::decode_fold`): the tensor-core kernel over a per-head
    /// paged cache, every query head of a KV head's group in one block (groups of at most 8).
    /// `fold` (the scores' [`crate::kv::score_cuda::DevScores::fold`]) is compiled into the
    /// kernel: the plan folds scores of that kind and group reduction only.
    pub fn with_scores(
        dev: &Arc<CudaDevice>,
        cache: &DevPagedCache,
        hq: usize,
        max_len: usize,
        params: &DecodeParams,
        fold: ScoreFold,
    ) -> Result<DecodePlan> {
        let rows = cache_row_lens(cache);
        Self::for_cache(dev, cache, hq, max_len, params, rows, None, Some(fold))
    }

    /// [`DecodePlan::plan`] for `cache`'s layout and dimensions.
    #[allow(clippy::too_many_arguments)]
    fn for_cache(
        dev: &Arc<CudaDevice>,
        cache: &DevPagedCache,
        hq: usize,
        max_len: usize,
        params: &DecodeParams,
        rows: Option<Vec<usize>>,
        quant: Option<(u32, usize)>,
        scores: Option<ScoreFold>,
    ) -> Result<DecodePlan> {
        let dims = (cache.dtype, cache.kv_heads, cache.head_dim, cache.batch());
        Self::plan(
            dev,
            cache.layout,
            dims,
            hq,
            max_len,
            params,
            rows,
            quant,
            scores,
        )
    }

    /// A plan for a KIVI-quantized per-head cache (`crate::kv::kivi_cuda::DevKivi`): `bits` and
    /// `group` of its pages, rows of at most `max_len` entries, `lens` the rows' total entries
    /// now (quantized + full precision).
    pub(crate) fn for_kivi(
        dev: &Arc<CudaDevice>,
        cache: &DevPagedCache,
        hq: usize,
        (max_len, lens): (usize, &[usize]),
        params: &DecodeParams,
        (bits, group): (u32, usize),
    ) -> Result<DecodePlan> {
        let (rows, quant) = (Some(lens.to_vec()), Some((bits, group)));
        Self::for_cache(dev, cache, hq, max_len, params, rows, quant, None)
    }

    /// A plan for caches of `layout` holding `(dtype, kv heads, head dim, batch)` (the caches
    /// themselves may be a caller's: [`DecodePlan::launch_raw`]).
    pub fn for_layout(
        dev: &Arc<CudaDevice>,
        layout: KvLayout,
        dims: (DType, usize, usize, usize),
        hq: usize,
        max_len: usize,
        params: &DecodeParams,
    ) -> Result<DecodePlan> {
        Self::plan(dev, layout, dims, hq, max_len, params, None, None, None)
    }

    /// `rows`: the lengths of the table rows (a per-head cache, B Hk of them; default: every
    /// row full), for the split plan. `quant`: (bits, group) of KIVI pages
    /// before each row's full-precision ones (kernels/kv_kivi.cu; per-head tables only).
    /// `scores`: the kernel folds press scores of this kind and reduction (LA_SCORE;
    /// [`DecodePlan::with_scores`]).
    #[allow(clippy::too_many_arguments)]
    fn plan(
        dev: &Arc<CudaDevice>,
        layout: KvLayout,
        (dtype, hk, d, batch): (DType, usize, usize, usize),
        hq: usize,
        max_len: usize,
        params: &DecodeParams,
        rows: Option<Vec<usize>>,
        quant: Option<(u32, usize)>,
        scores: Option<ScoreFold>,
    ) -> Result<DecodePlan> {
        params.check()?;
        check_kind(dtype, d)?;
        if let Some((bits, group)) = quant {
            crate::kv::kivi_cuda::PageLayout::new(d, bits, group)?;
            if !layout.head_tables() {
                return Err(param(format!(
                    "KIVI pages need a per-head paged cache, this one is {}",
                    layout.name()
                )));
            }
            if params.split_len.is_some_and(|n| n % group != 0) {
                return Err(param(format!(
                    "split length: a multiple of the KIVI group {group} (whole quantized pages)"
                )));
            }
        }
        if let KvLayout::Paged { page_size } | KvLayout::HeadPaged { page_size } = layout {
            if !crate::kv::PAGE_SIZES.contains(&page_size) {
                return Err(param(format!(
                    "page size {page_size}: the decode kernel takes pages of {}..={} tokens",
                    crate::kv::PAGE_SIZES.start(),
                    crate::kv::PAGE_SIZES.end()
                )));
            }
        }
        if hq == 0 || !hq.is_multiple_of(hk) {
            return Err(param(format!(
                "{hq} query heads: must be a multiple of the {hk} KV heads"
            )));
        }
        if max_len > i32::MAX as usize / 2 {
            return Err(param(format!("max_len {max_len}: at most 2^30")));
        }
        let group = hq / hk;
        let g = heads_per_block(group);
        let chunks = group / g;
        let page = layout.define();
        // Keys in flight. Contiguous caches load K / V straight into registers, 4 tokens per lane
        // group (2 when G >= 8: q and acc take 16 G registers). Paged caches go through a ring
        // of 3 stages in shared memory filled by cp.async (2 iterations of 4 tokens in flight
        // without holding registers): a key's address waits on its page-table entry, and with
        // registers alone the 8 tokens that hid it took 168 registers a thread (3 blocks per SM).
        // H100, batch 32, 8k keys, 32 / 8 heads, D 128, paged p16 ms: registers u 2 / 4 / 8 / 12
        // / 16 0.471 / 0.428 / 0.410 / 0.452 / 0.443 (pages in order the same within 1%: not their
        // placement); ring (u, stages) (2, 2) 0.377, (2, 3) 0.391, (4, 2) 0.383, (4, 3) 0.380,
        // (4, 4) 0.382, (8, 3) 0.382, (6, 3) 0.376; contiguous in the same runs 0.367-0.380
        // either way (registers u 4: 0.370). `LONGATTN_CUDA_DECODE=u[,splits[,stages]]`
        // overrides (tuning runs; capping the registers with launch bounds spilled, 15-100%
        // slower).
        let tune = super::forward::env_list("LONGATTN_CUDA_DECODE");
        let u = match tune.first() {
            Some(&u) if (1..=16).contains(&u) => u,
            _ if g >= 8 => 2,
            _ => 4,
        };
        // The tensor-core kernel (`mma_path`; KIVI pages always) streams through its per-warp
        // ring.
        let mma = quant.is_some() || mma_path(d);
        if scores.is_some() && params.split_len.is_some_and(|n| n % 16 != 0) {
            return Err(param(
                "press scores in the decode kernel: a split length must be a multiple of 16 keys (whole tiles)".into(),
            ));
        }
        if scores.is_some() && (quant.is_some() || !layout.head_tables() || !folds_scores(d, group))
        {
            return Err(param(format!(
                "press scores in the decode kernel need its tensor-core path (D <= 128, got {d}), a per-head paged cache (got {}, {}) and a group of at most 8 query heads (got {group}); fold them with DevScores::observe instead",
                layout.name(),
                if quant.is_some() { "KIVI pages" } else { "full precision" }
            )));
        }
        // Bytes of one ring stage of one warp: a K and a V tile of 16 rows (padded), or a KIVI
        // page (kv_kivi.cu).
        let stage = match quant {
            Some((bits, group)) => {
                crate::kv::kivi_cuda::PageLayout::new(d, bits, group)?.stage_bytes()
            }
            None => 2 * 16 * (d + 8) * 2,
        };
        let mut ns = match tune.get(2) {
            Some(&n) if (2..=8).contains(&n) => n,
            Some(&0) if !mma => 0,
            _ if page > 0 || mma => 3,
            _ => 0,
        };
        // KIVI: blocks per SM the registers are capped for, and stages of the ring of pages
        // (`LONGATTN_CUDA_KIVI=minb,stages`, tuning runs). H200, 1 / 8 x 128k, int4 g32 ms:
        // (4, 2) 0.0643 / 0.3357, (3, 2) 0.0609 / 0.3274, (3, 3) 0.0655 / 0.362, (2, 3) 0.0648 /
        // 0.352, (4, 4) 0.0733 / 0.433, (2, 6) 0.0902 / 0.590 (PERF.md): 3 blocks, 2 stages.
        // At D 256 the registers' cap for 3 blocks (168) spills 240-300 bytes (ptxas, sm_90a:
        // O^T is 64 registers a thread, q in both types 64 more): 2 blocks (254, no spill).
        let kivi_tune = super::forward::env_list("LONGATTN_CUDA_KIVI");
        let minb = match kivi_tune.first() {
            Some(&b) if (1..=8).contains(&b) => b,
            _ if d > 128 => 2,
            _ => 3,
        };
        if quant.is_some() {
            ns = match kivi_tune.get(1) {
                Some(&n) if (2..=8).contains(&n) => n,
                _ => 2,
            };
        }
        let softcap = params.softcap.is_some();
        // A fourth value of the override sets the warps per block (tuning runs). 8 warps in one
        // block per SM (tensor-core kernel, H200): full decode 1-2% faster, eviction at 8 x 128k
        // 11% slower than 2 blocks of 4 (PERF.md): 4 stays.
        let warps = match tune.get(3) {
            Some(&w) if (1..=16).contains(&w) => w,
            _ => WARPS,
        };
        if mma {
            // The ring's stages shrink (to 2) until the ring and the finish's static arrays
            // (s_acc, s_m, s_l) fit the device's shared memory (the press-score fold keeps its
            // scores in the padding of the ring's K tiles).
            let fixed = warps * g * (d + 2) * 4 + warps * crate::kv::decode::MAX_SPLITS * 4 + 1024;
            while ns > 2 && warps * ns * stage + fixed > dev.smem_optin {
                ns -= 1;
            }
        }
        // L2 prefetch hint of the tensor-core kernel's copies (bytes; tuning runs:
        // `LONGATTN_CUDA_DECODE_PF=0|128|256`).
        let l2pf = std::env::var("LONGATTN_CUDA_DECODE_PF")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|v| [0, 128, 256].contains(v))
            .unwrap_or(128);
        // The page of a warp's next tile read one copy ahead (opt-in, tensor-core kernel over
        // pages: `LONGATTN_CUDA_DECODE_PAGE_AHEAD=1`, `LA_PAGE_AHEAD` in decode.cu).
        let page_ahead = mma
            && page > 0
            && std::env::var("LONGATTN_CUDA_DECODE_PAGE_AHEAD").as_deref() == Ok("1");
        let smem = if mma {
            warps * ns * stage
        } else {
            ns * 2 * u * warps * 32 * 16
        };
        let mut defines = vec![
            ("LA_F16".into(), ((dtype == DType::F16) as u8).to_string()),
            ("LA_D".into(), d.to_string()),
            ("LA_G".into(), g.to_string()),
            ("LA_PAGE".into(), page.to_string()),
            ("LA_SOFTCAP".into(), (softcap as u8).to_string()),
            ("LA_WARPS".into(), warps.to_string()),
            ("LA_U".into(), u.to_string()),
            ("LA_MERGE_ONLY".into(), "0".into()),
            ("LA_NS".into(), ns.to_string()),
            ("LA_MMA".into(), (mma as u8).to_string()),
            ("LA_L2PF".into(), l2pf.to_string()),
            ("LA_PAGE_AHEAD".into(), (page_ahead as u8).to_string()),
        ];
        // H2O's fold as a reduction at L2 (`LA_SCORE_RED`; `LONGATTN_CUDA_DECODE_FOLD_RED=0`
        // copies the old scores in with the tile instead, the former kernel). H100, two runs
        // each, decode + fold against the decode of the same per-head cache: +1.9% / +3.5% at
        // 1 x 128k (copy: +7.0% / +6.5%), +4.3% / +3.4% at 32 x 8k (+5.0% / +5.9%) (PERF.md).
        let fold_red = scores.is_some_and(|f| f.kind == 0)
            && std::env::var("LONGATTN_CUDA_DECODE_FOLD_RED").as_deref() != Ok("0");
        if let Some(f) = scores {
            defines.push(("LA_SCORE".into(), "1".into()));
            defines.push(("LA_SCORE_KIND".into(), f.kind.to_string()));
            defines.push(("LA_SCORE_REDUCE".into(), f.reduce.to_string()));
            defines.push(("LA_SCORE_RED".into(), (fold_red as u8).to_string()));
        }
        let mut variant = format!(
            "decode_{}_d{d}_g{g}_p{page}_u{u}_s{ns}_w{warps}{}{}",
            dtype.name(),
            if softcap { "_cap" } else { "" },
            if mma {
                let score = scores.map_or(String::new(), |f| {
                    let red = if fold_red { "_red" } else { "" };
                    format!("_score_k{}_r{}{red}", f.kind, f.reduce)
                });
                let ahead = if page_ahead { "_ahead" } else { "" };
                format!("_mma_pf{l2pf}{ahead}{score}")
            } else {
                String::new()
            }
        );
        let func = match quant {
            Some((bits, group)) => {
                defines.extend(crate::kv::kivi_cuda::defines(bits, group));
                defines.push(("KQ_MINB".into(), minb.to_string()));
                variant.push_str(&format!("_kivi_b{bits}_g{group}_mb{minb}"));
                let src = format!("{COMMON}\n{DECODE}\n{KIVI}");
                dev.function(&variant, "la_decode_kivi", &src, &defines, smem)?
            }
            None => {
                let src = format!("{COMMON}\n{DECODE}");
                dev.function(&variant, "la_decode", &src, &defines, smem)?
            }
        };
        let src = format!("{COMMON}\n{DECODE}");
        // The merge depends on dtype and D only: its own module (the module cache is keyed by
        // variant and defines, not by entry name).
        let merge_defines = vec![
            defines[0].clone(),
            defines[1].clone(),
            ("LA_MERGE_ONLY".into(), "1".into()),
            (
                "LA_MAX_SPLITS".into(),
                crate::kv::decode::MAX_SPLITS.to_string(),
            ),
        ];
        let merge = dev.function(
            &format!("decode_merge_{}_d{d}", dtype.name()),
            "la_decode_merge",
            &src,
            &merge_defines,
            0,
        )?;
        let threads = (warps * 32) as u32;
        let blocks_per_sm = func
            .occupancy_max_active_blocks_per_multiprocessor(threads, smem, None)
            .ok()
            .filter(|&n| n > 0)
            .unwrap_or(4) as usize;
        // Splits in whole pages (64 keys for contiguous caches); over KIVI pages also in whole
        // quantized pages of G keys (a warp takes whole ones): lcm(page, G).
        let align = match (quant, page) {
            (Some((_, g)), p) => p * g / gcd(p, g),
            (None, 0) => 64,
            (None, p) => p,
        };
        let split = match params.split_len {
            Some(n) => split_plan_for(max_len, n, 1),
            None if tune.get(1).is_some_and(|&s| s > 0) => {
                split_plan_for(max_len, max_len.div_ceil(tune[1]), align)
            }
            None => match rows {
                Some(l) if l.len() == batch * hk => {
                    plan_splits_ragged(&l, chunks, dev.sms * blocks_per_sm, max_len, align)
                }
                _ => plan_splits(batch * hk * chunks, dev.sms * blocks_per_sm, max_len, align),
            },
        };
        if hk * chunks > 65535 || batch > 65535 {
            return Err(param(format!(
                "grid: KV heads x head chunks {} and batch {batch} must be <= 65535",
                hk * chunks
            )));
        }
        let ws = if split.num_splits > 1 {
            batch * hq * split.num_splits
        } else {
            0
        };
        let s = dev.stream();
        let o_part = s
            .alloc_zeros::<f32>((ws * d).max(1))
            .map_err(drv("alloc workspace"))?;
        let lse_part = s
            .alloc_zeros::<f32>(ws.max(1))
            .map_err(drv("alloc workspace"))?;
        // The merge fused into the decode kernel (the last split of a row merges; one ticket per
        // grid row): no second launch. `LONGATTN_CUDA_DECODE_FUSE=0` keeps la_decode_merge.
        let fuse = split.num_splits > 1
            && std::env::var("LONGATTN_CUDA_DECODE_FUSE").map_or(true, |v| v != "0");
        let tickets = s
            .alloc_zeros::<i32>(if fuse { batch * hk * chunks } else { 1 })
            .map_err(drv("alloc decode tickets"))?;
        let scale = params.scale_for(d);
        let log2e = std::f32::consts::LOG2_E;
        let (q_scale, cap_mul) = match params.softcap {
            Some(c) => (scale / c, c * log2e),
            None => (scale * log2e, 0.0),
        };
        let base = LaDecParams {
            o_part: o_part.device_ptr(s).0,
            lse_part: lse_part.device_ptr(s).0,
            seq_cap: match layout {
                KvLayout::Contiguous { seq_cap } => seq_cap as i64,
                KvLayout::Paged { .. } | KvLayout::HeadPaged { .. } => 0,
            },
            head_tables: layout.head_tables() as i32,
            b: batch as i32,
            hq: hq as i32,
            hk: hk as i32,
            num_splits: split.num_splits as i32,
            split_len: split.split_len as i32,
            head_chunks: chunks as i32,
            q_scale,
            cap_mul,
            tickets: if fuse { tickets.device_ptr(s).0 } else { 0 },
            ..Default::default()
        };
        let cfg = LaunchConfig {
            grid_dim: (
                split.num_splits as u32,
                (hk * chunks) as u32,
                batch.max(1) as u32,
            ),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let merge_cfg = LaunchConfig {
            grid_dim: ((batch * hq).div_ceil(MERGE_ROWS).max(1) as u32, 1, 1),
            block_dim: ((MERGE_ROWS * 32) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        Ok(DecodePlan {
            dev: dev.clone(),
            func,
            merge,
            cfg,
            merge_cfg,
            base,
            split,
            heads_per_block: g,
            blocks_per_sm,
            batch,
            hq,
            layout,
            dtype,
            hk,
            d,
            quant,
            scores,
            _o_part: o_part,
            _lse_part: lse_part,
            _tickets: tickets,
        })
    }

    /// (bits, group) of a KIVI plan ([`DecodePlan::for_kivi`]), None for the others.
    pub(crate) fn kivi(&self) -> Option<(u32, usize)> {
        self.quant
    }

    /// The checks of a launch: `cache` is the planned one, its longest row (`max_len` keys) is
    /// within the planned splits, q / out / lse have the planned shapes.
    pub(crate) fn check_io(
        &self,
        cache: &DevPagedCache,
        max_len: usize,
        q: &DevTensor,
        o: &DevTensor,
        lse: &CudaSlice<f32>,
    ) -> Result<()> {
        let (b, hq, d) = (self.batch, self.hq, self.d);
        if cache.layout != self.layout
            || cache.dtype != self.dtype
            || cache.kv_heads != self.hk
            || cache.head_dim != d
            || cache.batch() != b
        {
            return Err(param(format!(
                "cache ({}, {}, Hk {}, D {}, batch {}) is not the one the plan was made for ({}, {}, Hk {}, D {d}, batch {b})",
                cache.layout.name(),
                cache.dtype,
                cache.kv_heads,
                cache.head_dim,
                cache.batch(),
                self.layout.name(),
                self.dtype,
                self.hk
            )));
        }
        let planned = self.split.split_len * self.split.num_splits;
        if max_len > planned {
            return Err(param(format!(
                "a sequence holds {max_len} keys; the plan covers {planned} (make a new plan)"
            )));
        }
        for (name, t) in [("q", q), ("out", o)] {
            if t.shape != [b, 1, hq, d] || t.dtype != self.dtype {
                return Err(Error::Shape {
                    op: OP,
                    tensor: name.into(),
                    got: t.shape.to_vec(),
                    expected: format!("[{b}, 1, {hq}, {d}] in {}", self.dtype),
                });
            }
        }
        if lse.len() < b * hq {
            return Err(Error::Shape {
                op: OP,
                tensor: "lse".into(),
                got: vec![lse.len()],
                expected: format!("[{b}, {hq}]"),
            });
        }
        Ok(())
    }

    /// Runs decode (asynchronously on the device's stream): q `[B, 1, Hq, D]`, writes o
    /// `[B, 1, Hq, D]` and lse `[B, Hq]`.
    pub fn launch(
        &self,
        cache: &DevPagedCache,
        q: &DevTensor,
        o: &mut DevTensor,
        lse: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.check_io(cache, cache.max_len(), q, o, lse)?;
        let b = self.batch;
        if b == 0 {
            return Ok(());
        }
        let s = self.dev.stream();
        let raw = cache.raw_decode(q, o, lse, None);
        // SAFETY: q/o/lse have the checked shapes; the tables and lengths were checked against
        // the pool when they were built (allocator or `from_parts`), and every length is within
        // the planned splits.
        unsafe { self.launch_raw(s, raw) }
    }
}

/// Device pointers of one decode call on a caller's buffers ([`DecodePlan::launch_raw`]): q and
/// out `[B, 1, Hq, D]` contiguous, the cache in the plan's layout, `tables` `[B, max_pages]`
/// int32 (paged; 0 for contiguous caches), `lens` `[B]` int32, `lse` `[B, Hq]` f32.
#[derive(Clone, Copy, Debug)]
pub struct RawDecode {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub tables: u64,
    pub max_pages: usize,
    pub lens: u64,
    pub o: u64,
    pub lse: u64,
}

/// What a [`DecodePlan::with_scores`] kernel folds, compiled into it (`LA_SCORE_KIND` and
/// `LA_SCORE_REDUCE` of `kernels/decode.cu`, part of the variant's name): the update (0 H2O
/// `score + c`, 1 A2SF `f score + c` with f a launch argument, 2 TOVA and SnapKV's one row `c`)
/// and the reduction over the group (0 max, 1 sum, 2 mean: [`Reduce::kernel_code`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScoreFold {
    kind: i32,
    reduce: i32,
}

impl ScoreFold {
    pub fn new(kind: ScoreKind, reduce: Reduce) -> ScoreFold {
        let kind = match kind {
            ScoreKind::H2o => 0,
            ScoreKind::A2sf(_) => 1,
            ScoreKind::Tova | ScoreKind::SnapKv(_) => 2,
        };
        ScoreFold {
            kind,
            reduce: reduce.kernel_code(),
        }
    }
}

/// The press-score fold of a [`DecodePlan::with_scores`] launch (`kernels/decode.cu`, LA_SCORE):
/// the previous step's q `[B, Hq, D]` and lse `[B, Hq]`, the scores `[B Hk, cap]` f32, entries
/// appended since the previous step, and A2SF's forgetting factor `f` (read by an A2SF plan
/// only: the kind and the reduction are the plan's [`ScoreFold`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct RawScore {
    pub q_prev: u64,
    pub lse_prev: u64,
    pub score: u64,
    pub cap: usize,
    pub prev_new: usize,
    pub f: f32,
}

/// Device pointers of the quantized pages of a KIVI decode: the pool, the tables `[B Hk,
/// qmax_pages]` and the quantized entries per row `[B Hk]` (int32).
#[derive(Clone, Copy, Debug)]
pub(crate) struct RawQuant {
    pub qpages: u64,
    pub qtables: u64,
    pub qmax_pages: usize,
    pub qlens: u64,
}

impl DecodePlan {
    /// Runs decode on `stream` over a caller's buffers (no copies, no synchronisation).
    ///
    /// # Safety
    /// Every pointer addresses a live device buffer of the shape [`RawDecode`] states for this
    /// plan's problem; the lengths are at most the planned keys and the tables point inside the
    /// cache (the kernel reads them where they are; the Python layer checks them first).
    pub unsafe fn launch_raw(
        &self,
        s: &Arc<cudarc::driver::CudaStream>,
        r: RawDecode,
    ) -> Result<()> {
        // SAFETY: the caller's contract, above.
        unsafe { self.launch_with(s, r, None, None) }
    }

    /// [`DecodePlan::launch_raw`] of a [`DecodePlan::with_scores`] plan folding `sc`.
    ///
    /// # Safety
    /// As [`DecodePlan::launch_raw`]; `sc`'s buffers hold the shapes [`RawScore`] states, every
    /// row's length is at most `sc.cap`.
    pub(crate) unsafe fn launch_raw_scored(
        &self,
        s: &Arc<cudarc::driver::CudaStream>,
        r: RawDecode,
        sc: RawScore,
    ) -> Result<()> {
        // SAFETY: the caller's contract, above.
        unsafe { self.launch_with(s, r, None, Some(sc)) }
    }

    /// [`DecodePlan::launch_raw`] of a KIVI plan ([`DecodePlan::for_kivi`]) with the quantized
    /// pages `rq`.
    ///
    /// # Safety
    /// As [`DecodePlan::launch_raw`]; `rq`'s tables point inside its pool of pages of this plan's
    /// layout and every row's total length is within the planned keys.
    pub(crate) unsafe fn launch_raw_kivi(
        &self,
        s: &Arc<cudarc::driver::CudaStream>,
        r: RawDecode,
        rq: RawQuant,
    ) -> Result<()> {
        // SAFETY: the caller's contract, above.
        unsafe { self.launch_with(s, r, Some(rq), None) }
    }

    /// # Safety
    /// [`DecodePlan::launch_raw_kivi`], [`DecodePlan::launch_raw_scored`].
    unsafe fn launch_with(
        &self,
        s: &Arc<cudarc::driver::CudaStream>,
        r: RawDecode,
        rq: Option<RawQuant>,
        sc: Option<RawScore>,
    ) -> Result<()> {
        if rq.is_some() != self.quant.is_some() {
            return Err(param(
                "a KIVI plan runs with its quantized pages, any other plan without".into(),
            ));
        }
        if sc.is_some() && self.scores.is_none() {
            return Err(param(
                "this decode plan does not fold scores: make it with DecodePlan::with_scores"
                    .into(),
            ));
        }
        if self.batch == 0 {
            return Ok(());
        }
        let mut p = self.base;
        if let Some(rq) = rq {
            p.qpages = rq.qpages;
            p.qtables = rq.qtables;
            p.qmax_pages = rq.qmax_pages as i32;
            p.qlens = rq.qlens;
        }
        p.q = r.q;
        p.k = r.k;
        p.v = r.v;
        p.tables = r.tables;
        p.lens = r.lens;
        p.max_pages = r.max_pages as i32;
        p.o = r.o;
        p.lse = r.lse;
        if let Some(sc) = sc {
            p.q_prev = sc.q_prev;
            p.lse_prev = sc.lse_prev;
            p.score = sc.score;
            p.score_cap = sc.cap as i32;
            p.score_prev_new = sc.prev_new.min(i32::MAX as usize) as i32;
            p.score_f = sc.f;
        }
        let mut lb = s.launch_builder(&self.func);
        lb.arg(&p);
        // SAFETY: the struct matches the kernel's; the buffers are the caller's contract (above);
        // the workspace holds B x Hq x num_splits rows and the tickets one int per grid row (y, z),
        // zero between launches (the merging block resets its ticket).
        unsafe { lb.launch(self.cfg) }.map_err(drv("launch decode"))?;
        if self.split.num_splits > 1 && p.tickets == 0 {
            let mut mb = s.launch_builder(&self.merge);
            mb.arg(&p);
            // SAFETY: as above; the merge reads the splits the decode kernel wrote.
            unsafe { mb.launch(self.merge_cfg) }.map_err(drv("launch decode merge"))?;
        }
        Ok(())
    }
}

/// [`crate::kv::decode::decode`] on the GPU: uploads q, the pages and the tables, runs, returns
/// out `[B, 1, Hq, D]` (input dtype) and lse `[B, Hq]`.
pub fn decode(
    dev: &Arc<CudaDevice>,
    q: &crate::tensor::TensorView,
    kv: &PagedKv,
    bt: &BlockTables,
    params: &DecodeParams,
) -> Result<AttnOutput> {
    params.check()?;
    let dims = validate(q.shape, q.dtype(), kv, bt)?;
    check_kind(q.dtype(), dims.d)?;
    let cache = DevPagedCache::from_parts(dev, kv, bt)?;
    run_host(dev, &cache, q, dims.max_len, params)
}

fn run_host(
    dev: &Arc<CudaDevice>,
    cache: &DevPagedCache,
    q: &crate::tensor::TensorView,
    max_len: usize,
    params: &DecodeParams,
) -> Result<AttnOutput> {
    let [b, _, hq, d] = q.shape;
    let plan = DecodePlan::new(dev, cache, hq, max_len, params)?;
    let qd = DevTensor::upload(dev, "q", q)?;
    let mut o = DevTensor::alloc(dev, [b, 1, hq, d], q.dtype())?;
    let mut lse = dev
        .stream()
        .alloc_zeros::<f32>((b * hq).max(1))
        .map_err(drv("alloc"))?;
    plan.launch(cache, &qd, &mut o, &mut lse)?;
    dev.synchronize()?;
    let out = o.download(dev)?;
    let mut lse = dev.stream().clone_dtoh(&lse).map_err(drv("copy to host"))?;
    lse.truncate(b * hq);
    Ok(AttnOutput { out, lse })
}

/// A `[1, n, Hk, D]` host tensor on the device.
fn upload_tensor(dev: &Arc<CudaDevice>, name: &str, t: &Tensor) -> Result<DevTensor> {
    DevTensor::upload(dev, name, &t.view(name)?)
}

/// One case of the matrix: decode `lens` on the GPU (through `how`) and compare with the oracle.
struct Case<'a> {
    name: String,
    dtype: DType,
    lens: &'a [usize],
    page: usize,
    hq: usize,
    hk: usize,
    d: usize,
    params: DecodeParams,
    how: How,
}

#[derive(Clone, Copy, PartialEq)]
enum How {
    /// Host cache uploaded with its tables ([`decode`]).
    Host,
    /// Paged device cache filled by `la_kv_append`; its pages must equal the host's bit for bit.
    DeviceAppend,
    /// Contiguous device cache filled by `la_kv_append`.
    Contiguous,
}

fn run_case(dev: &Arc<CudaDevice>, c: &Case) -> CaseResult {
    let tol = out_tolerance(c.dtype);
    let mut r = CaseResult {
        group: "decode",
        name: c.name.clone(),
        passed: false,
        err: f64::NAN,
        tol,
        lse_err: f64::NAN,
        detail: String::new(),
    };
    let res = (|| -> Result<(f64, f64, String)> {
        let seed = (c.page * 131 + c.hq * 17 + c.hk * 5 + c.d + c.lens.len()) as u64;
        let (host, q) = random_cache(c.dtype, c.lens, c.page, c.hq, c.hk, c.d, seed)?;
        let qv = q.view("q")?;
        let reference = decode_reference(&qv, &host.view(), &host.block_tables(), &c.params)?;
        let max_len = c.lens.iter().copied().max().unwrap_or(0);
        let mut detail = String::new();
        let got = match c.how {
            How::Host => decode(dev, &qv, &host.view(), &host.block_tables(), &c.params)?,
            How::DeviceAppend | How::Contiguous => {
                let mut dc = if c.how == How::Contiguous {
                    DevPagedCache::new_contiguous(
                        dev,
                        c.dtype,
                        c.hk,
                        c.d,
                        max_len.max(1),
                        c.lens.len(),
                    )?
                } else {
                    let mut dc = DevPagedCache::new_paged(
                        dev,
                        c.dtype,
                        c.hk,
                        c.d,
                        c.page,
                        host.tables.num_pages(),
                        c.lens.len(),
                    )?;
                    if let Some(t) = dc.page_tables_mut() {
                        t.shuffle_free(seed);
                    }
                    dc
                };
                for (s, k, v) in random_appends(c.dtype, c.lens, c.page, c.hk, c.d, seed) {
                    let (kd, vd) = (upload_tensor(dev, "k", &k)?, upload_tensor(dev, "v", &v)?);
                    dc.append_seq(s, &kd, &vd)?;
                }
                if c.how == How::DeviceAppend {
                    let (k, v) = dc.download()?;
                    let same = k == bits(host.k.as_slice()) && v == bits(host.v.as_slice());
                    if !same {
                        return Err(param(
                            "pages written by la_kv_append differ from the host's".into(),
                        ));
                    }
                    detail = "appended pages bit-equal to the host's".into();
                }
                run_host(dev, &dc, &qv, max_len, &c.params)?
            }
        };
        let (eo, el) = compare(&got.out, &got.lse, &reference);
        Ok((eo, el, detail))
    })();
    match res {
        Ok((eo, el, detail)) => {
            r.err = eo;
            r.lse_err = el;
            r.passed = eo <= tol && el <= LSE_TOLERANCE;
            r.detail = detail;
        }
        Err(e) => r.detail = e.to_string(),
    }
    r
}

/// The decode correctness matrix on the GPU against the f64 oracle (through the CPU cache):
/// ragged lengths (the awkward sizes, 0, and one of 32k), page sizes 16/64/256, GQA 4:1 / MQA /
/// MHA / MQA 32:1 (head chunks), D 64/128/256, bf16 and f16, forced unaligned splits, soft-cap,
/// appends through the kernel (paged and contiguous), and bad input refused with an error.
pub fn selftest(dev: &Arc<CudaDevice>) -> Result<Vec<CaseResult>> {
    let mut lens = AWKWARD_SIZES.to_vec();
    lens.push(0);
    let long = [32768, 1, 0, 4224];
    let auto = DecodeParams::default();
    let forced = DecodeParams {
        split_len: Some(100),
        ..Default::default()
    };
    let capped = DecodeParams {
        softcap: Some(30.0),
        ..Default::default()
    };
    let bf = DType::BF16;
    let mut cases: Vec<Case> = Vec::new();
    let mut add = |name: &str, dtype, lens, page, hq, hk, d, params: &DecodeParams, how| {
        cases.push(Case {
            name: format!("{name} {dtype} p{page} {hq}:{hk} d{d}"),
            dtype,
            lens,
            page,
            hq,
            hk,
            d,
            params: params.clone(),
            how,
        })
    };
    for page in [16, 64, 256] {
        add(
            "ragged gqa",
            bf,
            &lens[..],
            page,
            8,
            2,
            128,
            &auto,
            How::Host,
        );
    }
    add(
        "ragged gqa",
        DType::F16,
        &lens[..],
        16,
        8,
        2,
        128,
        &auto,
        How::Host,
    );
    add("ragged mqa", bf, &lens[..], 64, 4, 1, 64, &auto, How::Host);
    add("ragged mha", bf, &lens[..], 16, 4, 4, 256, &auto, How::Host);
    add(
        "ragged mha",
        DType::F16,
        &lens[..],
        64,
        2,
        2,
        64,
        &auto,
        How::Host,
    );
    add(
        "ragged mqa32",
        bf,
        &lens[..],
        16,
        32,
        1,
        128,
        &auto,
        How::Host,
    );
    add(
        "split 100",
        bf,
        &lens[..],
        16,
        8,
        2,
        128,
        &forced,
        How::Host,
    );
    add("long", bf, &long[..], 16, 8, 2, 128, &auto, How::Host);
    add("softcap", bf, &lens[..], 16, 8, 2, 128, &capped, How::Host);
    add(
        "append",
        bf,
        &lens[..],
        16,
        8,
        2,
        128,
        &auto,
        How::DeviceAppend,
    );
    add(
        "append",
        DType::F16,
        &lens[..],
        64,
        4,
        1,
        64,
        &auto,
        How::DeviceAppend,
    );
    add(
        "contiguous",
        bf,
        &lens[..],
        16,
        8,
        2,
        128,
        &auto,
        How::Contiguous,
    );
    let mut out: Vec<CaseResult> = cases.iter().map(|c| run_case(dev, c)).collect();

    // Bad input: errors, never a launch.
    let refused = |name: &str, r: Result<AttnOutput>, want: &str| {
        let (passed, detail) = match r {
            Err(e) => {
                let m = e.to_string();
                (m.contains(want), m)
            }
            Ok(_) => (false, "accepted".to_string()),
        };
        CaseResult {
            group: "decode",
            name: format!("refuses {name}"),
            passed,
            err: 0.0,
            tol: 0.0,
            lse_err: 0.0,
            detail,
        }
    };
    let (h, q) = random_cache(bf, &[40, 17], 16, 4, 2, 48, 1)?;
    out.push(refused(
        "head dim 48",
        decode(dev, &q.view("q")?, &h.view(), &h.block_tables(), &auto),
        "head dim 48",
    ));
    let (h, q) = random_cache(DType::F32, &[40, 17], 16, 4, 2, 64, 1)?;
    out.push(refused(
        "f32",
        decode(dev, &q.view("q")?, &h.view(), &h.block_tables(), &auto),
        "bf16 or f16",
    ));
    let (h, q) = random_cache(bf, &[40, 17], 16, 4, 2, 64, 1)?;
    let (mut t, w) = h.tables.block_tables();
    t[0] = 1 << 20;
    let lens2 = h.tables.lens();
    let bt = BlockTables::shared(&t, w, &lens2);
    out.push(refused(
        "page out of range",
        decode(dev, &q.view("q")?, &h.view(), &bt, &auto),
        "outside the pool",
    ));
    Ok(out)
}

/// The benchmark problem of [`bench`].
#[derive(Clone, Debug)]
pub struct DecodeBenchConfig {
    pub batch: usize,
    pub len: usize,
    pub hq: usize,
    pub hk: usize,
    pub d: usize,
    pub dtype: DType,
    pub warmup: usize,
    pub reps: usize,
    /// Input sets rotated between repetitions (so L2 does not hold the last one's K/V).
    pub sets: usize,
    /// Force the number of keys per split (tuning); `None` = the plan's choice.
    pub split_len: Option<usize>,
}

impl Default for DecodeBenchConfig {
    /// The target: batch 32, 8k tokens, 32 query / 8 KV heads, D 128, bf16.
    fn default() -> Self {
        DecodeBenchConfig {
            batch: 32,
            len: 8192,
            hq: 32,
            hk: 8,
            d: 128,
            dtype: DType::BF16,
            warmup: 5,
            reps: 30,
            sets: 2,
            split_len: None,
        }
    }
}

/// One timed configuration.
#[derive(Clone, Debug)]
pub struct DecodeBenchRow {
    /// `paged p16`, `paged p64`, `paged p16 (pages in order)`, `contiguous`, or `copy (dtod)`
    /// (the device's copy bandwidth:
    /// a device-to-device copy of one K/V set, bytes = read + write).
    pub name: String,
    pub num_splits: usize,
    pub split_len: usize,
    pub ms_median: f64,
    pub ms_min: f64,
    /// Bytes moved once: K + V + q + o (for the copy: 2 x the K/V bytes).
    pub bytes: usize,
    /// bytes / median time.
    pub gbps: f64,
}

fn median(mut x: Vec<f64>) -> f64 {
    x.sort_by(f64::total_cmp);
    x[x.len() / 2]
}

/// Fills `x` on the device with values uniform in [-1, 1) from a hash of (seed, index), rounded
/// to `dtype` (benchmark inputs without a host round trip).
pub(crate) fn fill_random(
    dev: &Arc<CudaDevice>,
    dtype: DType,
    x: &mut CudaSlice<u16>,
    seed: u32,
) -> Result<()> {
    let f = dev.function(
        &format!("kv_fill_{}", dtype.name()),
        "la_fill",
        &format!("{COMMON}\n{APPEND}"),
        &[("LA_F16".into(), ((dtype == DType::F16) as u8).to_string())],
        0,
    )?;
    fill(dev, &f, x, seed)
}

fn fill(dev: &Arc<CudaDevice>, f: &CudaFunction, x: &mut CudaSlice<u16>, seed: u32) -> Result<()> {
    let n = x.len() as i64;
    let cfg = LaunchConfig {
        grid_dim: (
            (n as usize).div_ceil(256).clamp(1, dev.sms * 16) as u32,
            1,
            1,
        ),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = dev.stream().launch_builder(f);
    b.arg(x).arg(&n).arg(&seed);
    // SAFETY: la_fill(u16*, i64 n, u32 seed) writes x[0..n], the slice's length.
    unsafe { b.launch(cfg) }.map_err(drv("launch fill"))?;
    Ok(())
}

/// Times decode of `cfg` (default: the target problem) with CUDA events, `warmup` runs
/// then the median of `reps`, rotating `sets` input sets: paged page 16 (scattered pages), paged
/// page 64 (scattered), paged page 16 with each sequence's pages in order, contiguous, and a
/// device-to-device copy of one K/V set for the copy bandwidth.
pub fn bench(dev: &Arc<CudaDevice>, cfg: &DecodeBenchConfig) -> Result<Vec<DecodeBenchRow>> {
    let DecodeBenchConfig {
        batch,
        len,
        hq,
        hk,
        d,
        dtype,
        ..
    } = *cfg;
    check_kind(dtype, d)?;
    if batch == 0 || len == 0 || cfg.reps == 0 || cfg.sets == 0 {
        return Err(param(format!(
            "bench: batch, len, reps and sets must be >= 1, got {cfg:?}"
        )));
    }
    let kv_bytes = 2 * batch * len * hk * d * dtype.size();
    let bytes = kv_bytes + 2 * batch * hq * d * dtype.size();
    let fill_fn = dev.function(
        &format!("kv_fill_{}", dtype.name()),
        "la_fill",
        &format!("{COMMON}\n{APPEND}"),
        &[("LA_F16".into(), ((dtype == DType::F16) as u8).to_string())],
        0,
    )?;
    let params = DecodeParams {
        split_len: cfg.split_len,
        ..Default::default()
    };
    let ev = |s: &Arc<cudarc::driver::CudaStream>| {
        s.record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(drv("record event"))
    };
    let mut rows = Vec::new();
    // (layout, pages scattered over the pool): the in-order page-16 row separates the cost of
    // scattered pages from the cost of the page-table walk.
    let layouts = [
        (KvLayout::Paged { page_size: 16 }, true),
        (KvLayout::Paged { page_size: 64 }, true),
        (KvLayout::Paged { page_size: 16 }, false),
        (KvLayout::HeadPaged { page_size: 16 }, true),
        (KvLayout::Contiguous { seq_cap: len }, false),
    ];
    for (li, (layout, scatter)) in layouts.into_iter().enumerate() {
        // Each set: its own cache (pages filled on the device, scattered tables), q and o.
        let mut sets = Vec::with_capacity(cfg.sets);
        for si in 0..cfg.sets {
            let mut c = match layout {
                KvLayout::Paged { page_size } => {
                    let pages = batch * len.div_ceil(page_size);
                    let mut c =
                        DevPagedCache::new_paged(dev, dtype, hk, d, page_size, pages, batch)?;
                    if let Some(t) = c.page_tables_mut().filter(|_| scatter) {
                        t.shuffle_free(si as u64 + 1);
                    }
                    c
                }
                KvLayout::HeadPaged { page_size } => {
                    let pages = batch * hk * len.div_ceil(page_size);
                    let mut c =
                        DevPagedCache::new_head_paged(dev, dtype, hk, d, page_size, pages, batch)?;
                    if let Some(t) = c.page_tables_mut() {
                        t.shuffle_free(si as u64 + 1);
                    }
                    c
                }
                KvLayout::Contiguous { seq_cap } => {
                    DevPagedCache::new_contiguous(dev, dtype, hk, d, seq_cap, batch)?
                }
            };
            c.grow_all(len)?;
            let seed = (li * 16 + si) as u32;
            fill(dev, &fill_fn, &mut c.k, 4 * seed)?;
            fill(dev, &fill_fn, &mut c.v, 4 * seed + 1)?;
            let mut q = DevTensor::alloc(dev, [batch, 1, hq, d], dtype)?;
            fill(dev, &fill_fn, &mut q.data, 4 * seed + 2)?;
            let o = DevTensor::alloc(dev, [batch, 1, hq, d], dtype)?;
            let lse = dev
                .stream()
                .alloc_zeros::<f32>(batch * hq)
                .map_err(drv("alloc"))?;
            sets.push((c, q, o, lse));
        }
        let plan = DecodePlan::new(dev, &sets[0].0, hq, len, &params)?;
        let mut times = Vec::with_capacity(cfg.reps);
        for r in 0..cfg.warmup + cfg.reps {
            let (c, q, o, lse) = &mut sets[r % cfg.sets];
            let s = dev.stream();
            let e0 = ev(s)?;
            plan.launch(c, q, o, lse)?;
            let e1 = ev(s)?;
            let ms = e0.elapsed_ms(&e1).map_err(drv("event time"))? as f64;
            if r >= cfg.warmup {
                times.push(ms);
            }
        }
        let ms_median = median(times.clone());
        rows.push(DecodeBenchRow {
            name: match layout {
                KvLayout::Paged { .. } if !scatter => format!("{} (pages in order)", layout.name()),
                _ => layout.name(),
            },
            num_splits: plan.split.num_splits,
            split_len: plan.split.split_len,
            ms_median,
            ms_min: times.iter().copied().fold(f64::INFINITY, f64::min),
            bytes,
            gbps: bytes as f64 / (ms_median * 1e-3) / 1e9,
        });
        if li == layouts.len() - 1 {
            // Copy bandwidth: K of set 0 -> K of set 1 (or itself with one set), and V likewise.
            let mut times = Vec::with_capacity(cfg.reps);
            for r in 0..cfg.warmup + cfg.reps {
                let s = dev.stream().clone();
                let e0 = ev(&s)?;
                if sets.len() > 1 {
                    let (a, b) = sets.split_at_mut(1);
                    s.memcpy_dtod(&a[0].0.k, &mut b[0].0.k)
                        .map_err(drv("copy"))?;
                    s.memcpy_dtod(&a[0].0.v, &mut b[0].0.v)
                        .map_err(drv("copy"))?;
                } else {
                    let c = &mut sets[0].0;
                    let tmp = s.clone_dtod(&c.k).map_err(drv("copy"))?;
                    s.memcpy_dtod(&tmp, &mut c.v).map_err(drv("copy"))?;
                }
                let e1 = ev(&s)?;
                let ms = e0.elapsed_ms(&e1).map_err(drv("event time"))? as f64;
                if r >= cfg.warmup {
                    times.push(ms);
                }
            }
            let ms_median = median(times.clone());
            rows.push(DecodeBenchRow {
                name: "copy (dtod)".into(),
                num_splits: 0,
                split_len: 0,
                ms_median,
                ms_min: times.iter().copied().fold(f64::INFINITY, f64::min),
                bytes: 2 * kv_bytes,
                gbps: 2.0 * kv_bytes as f64 / (ms_median * 1e-3) / 1e9,
            });
        }
        dev.synchronize()?;
    }
    Ok(rows)
}

#[cfg(test)]
mod layout_tests {
    use super::*;

    #[test]
    fn decode_parameter_struct_matches_the_kernel() {
        crate::cuda::forward::check_layout(
            DECODE,
            "LaDecParams",
            &crate::cuda::forward::offsets!(LaDecParams; q, k, v, tables, lens, o, lse, o_part,
                lse_part, seq_cap, b, hq, hk, max_pages, num_splits, split_len, head_chunks,
                head_tables, q_scale, cap_mul, qpages, qtables, qlens, qmax_pages, qpad, tickets,
                q_prev, lse_prev, score, score_cap, score_prev_new, score_f,
                score_pad),
            std::mem::size_of::<LaDecParams>(),
        );
    }
}
