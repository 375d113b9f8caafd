//! Fused, tiled CPU attention forward (online softmax, O(n) extra memory).
//!
//! One dispatch place ([`forward`]) turns (dtype, instruction set) into a monomorphized driver
//! `Job::run::<T, M>`; `M` is a [`micro::Micro`] path (scalar, AVX2, AVX-512, AVX-512 BF16, AMX).
//!
//! Work decomposition: K^T and V of a (batch row, KV head) group are packed once into 64-key
//! chunks (in parallel over the chunks). Then every (batch, query head, query tile) is a task that
//! walks its row of the block schedule. Tasks run on rayon, heaviest first, so work stealing
//! balances causal and ragged schedules. Long queries go one group at a time (its packed K/V stays
//! warm while every thread works on it); short ones (decode) pack all groups and run all tasks at
//! once so every thread has work.
pub mod backward;
pub mod buf;
pub mod gemm;
pub mod micro;
pub mod pack;

use crate::attention::{AttnMap, AttnOutput, AttnParams, Dims, MaskSpec};
use crate::error::{Error, Result};
use crate::mask::{BlockSchedule, RowMask, TileKind};
use crate::tensor::{DType, Element, Tensor, TensorView};
use buf::AlignedBuf;
use half::{bf16, f16};
use micro::{Logits, Micro, BQ, LDP, LDS, MAXW, NC};
use pack::{pack_kt, pack_q, pack_v, packed_dim, packed_dv};
use rayon::prelude::*;

/// Instruction-set paths of the CPU kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Plain loops (the reference path and the fallback).
    Scalar,
    /// AVX2 + FMA, f32 compute.
    Avx2,
    /// AVX-512F, f32 compute.
    Avx512,
    /// AVX-512 with `vdpbf16ps` for bf16 inputs (f32/f16 inputs use the AVX-512 f32 path).
    Avx512Bf16,
    /// AMX tiles for both products of bf16 inputs (f32/f16 inputs use the AVX-512 f32 path).
    Amx,
}

impl Isa {
    pub const ALL: [Isa; 5] = [
        Isa::Scalar,
        Isa::Avx2,
        Isa::Avx512,
        Isa::Avx512Bf16,
        Isa::Amx,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Avx512Bf16 => "avx512bf16",
            Isa::Amx => "amx",
        }
    }

    /// Whether this CPU can run the path.
    pub fn available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512dq")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Bf16 => Isa::Avx512.available() && is_x86_feature_detected!("avx512bf16"),
            #[cfg(target_arch = "x86_64")]
            Isa::Amx => micro::amx::available(),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The fastest available path.
    pub fn best() -> Isa {
        *Isa::ALL
            .iter()
            .rev()
            .find(|i| i.available())
            .unwrap_or(&Isa::Scalar)
    }
}

/// Skip-softmax counters of this process: key groups tested and dropped ([`skip_stats`]).
static SKIP_TESTED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static SKIP_DROPPED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// (key groups tested, key groups dropped) by skip-softmax since the last
/// [`reset_skip_stats`] (all forwards of this process with `AttnParams::skip_below`).
pub fn skip_stats() -> (u64, u64) {
    use std::sync::atomic::Ordering::Relaxed;
    (SKIP_TESTED.load(Relaxed), SKIP_DROPPED.load(Relaxed))
}

/// Zeroes the [`skip_stats`] counters.
pub fn reset_skip_stats() {
    use std::sync::atomic::Ordering::Relaxed;
    SKIP_TESTED.store(0, Relaxed);
    SKIP_DROPPED.store(0, Relaxed);
}

/// Dispatch: dtype x instruction set -> one monomorphized driver.
pub fn forward(
    q: &TensorView,
    k: &TensorView,
    v: &TensorView,
    dims: &Dims,
    params: &AttnParams,
    mask: MaskSpec,
) -> Result<AttnOutput> {
    forward_map(q, k, v, dims, params, mask, None).map(|(out, _)| out)
}

/// [`forward`], with the block-pooled attention map at `map_block` x `map_block` when asked
/// ([`crate::AttnMap`]; `map_block` a multiple of [`NC`]).
pub(crate) fn forward_map(
    q: &TensorView,
    k: &TensorView,
    v: &TensorView,
    dims: &Dims,
    params: &AttnParams,
    mask: MaskSpec,
    map_block: Option<usize>,
) -> Result<(AttnOutput, Option<AttnMap>)> {
    if let Some(bl) = map_block {
        if bl == 0 || bl % NC != 0 {
            return Err(Error::Param {
                op: "attention",
                msg: format!(
                    "the pooled attention map's block must be a positive multiple of {NC} (the CPU kernel's key chunk), got {bl}"
                ),
            });
        }
    }
    let isa = match params.isa {
        Some(i) if !i.available() => {
            return Err(Error::Param {
                op: "attention",
                msg: format!("instruction set {} is not available on this CPU", i.name()),
            })
        }
        Some(i) => i,
        None => Isa::best(),
    };
    let logits = Logits {
        scale: params.scale_for(dims.d),
        softcap: params.softcap,
    };
    // Resolve the mask into a schedule (+ element mask for Partial tiles).
    let owned;
    // Whether the row mask ignores the head (mask expressions do), so Partial tile bits can be
    // computed once and shared by every head.
    let mut head_free_rows = false;
    let (schedule, rows): (&BlockSchedule, Option<&dyn RowMask>) = match mask.as_schedule() {
        MaskSpec::Full => {
            owned = BlockSchedule::full(BQ, NC, dims.sq, dims.sk)?;
            (&owned, None)
        }
        MaskSpec::Expr(bound) => {
            crate::attention::check_bound("attention", bound, dims)?;
            owned = bound.schedule(BQ, NC)?;
            head_free_rows = true;
            (&owned, Some(bound as &dyn RowMask))
        }
        MaskSpec::Schedule { schedule, rows } => (schedule, rows),
        MaskSpec::Gated { .. } => unreachable!("as_schedule"),
    };
    check_schedule(schedule, rows.is_some(), dims)?;
    let partial_bits = match rows {
        Some(rm) if head_free_rows => PartialBits::build(schedule, rm),
        _ => None,
    };
    let job = Job {
        map: map_block.map(|bl| MapAcc::new(dims, bl)),
        epilogue: Epilogue::for_isa(isa),
        partial_bits,
        q,
        k,
        v,
        dims: *dims,
        logits,
        skip_log2: params.skip_below.map(f32::log2),
        schedule,
        rows,
    };
    let out = job.dispatch(isa, q.dtype())?;
    Ok((out, job.map.map(MapAcc::finish)))
}

/// The pooled attention map under construction: per (batch row, query head) a slab of
/// `[q_blocks, k_blocks]` sums of p and maxima of p, shared by the tasks (a task locks its
/// slab once per group of 64 rows).
struct MapAcc {
    block: usize,
    dims: Dims,
    q_blocks: usize,
    k_blocks: usize,
    slabs: Vec<std::sync::Mutex<(Vec<f32>, Vec<f32>)>>,
}

impl MapAcc {
    fn new(dims: &Dims, block: usize) -> MapAcc {
        let (q_blocks, k_blocks) = (dims.sq.div_ceil(block), dims.sk.div_ceil(block));
        let n = q_blocks * k_blocks;
        MapAcc {
            block,
            dims: *dims,
            q_blocks,
            k_blocks,
            slabs: (0..dims.batch * dims.hq)
                .map(|_| std::sync::Mutex::new((vec![0.0; n], vec![0.0; n])))
                .collect(),
        }
    }

    /// Sums become means over each query block's rows.
    fn finish(self) -> AttnMap {
        let (mut mass, mut max) = (Vec::new(), Vec::new());
        for slab in self.slabs {
            let (m, x) = slab.into_inner().expect("map slab");
            mass.extend(m);
            max.extend(x);
        }
        let (nq, nk, bl, sq) = (self.q_blocks, self.k_blocks, self.block, self.dims.sq);
        for (r, row) in mass.chunks_mut(nk).enumerate() {
            let rows = bl.min(sq - (r % nq) * bl) as f32;
            row.iter_mut().for_each(|x| *x /= rows);
        }
        AttnMap {
            block: bl,
            batch: self.dims.batch,
            heads: self.dims.hq,
            q_blocks: nq,
            k_blocks: nk,
            mass,
            max,
        }
    }
}

impl Job<'_> {
    /// dtype x instruction set -> one monomorphized driver.
    fn dispatch(&self, isa: Isa, dtype: DType) -> Result<AttnOutput> {
        #[cfg(target_arch = "x86_64")]
        {
            use micro::{amx::Amx, avx2::Avx2, avx512::Avx512, avx512bf16::Avx512Bf16};
            match (isa, dtype) {
                (Isa::Amx, DType::BF16) => return self.run::<bf16, Amx>(Amx),
                (Isa::Avx512Bf16, DType::BF16) => return self.run::<bf16, Avx512Bf16>(Avx512Bf16),
                (Isa::Avx512 | Isa::Avx512Bf16 | Isa::Amx, _) => return self.run_dtype(Avx512),
                (Isa::Avx2, _) => return self.run_dtype(Avx2),
                (Isa::Scalar, _) => {}
            }
        }
        let _ = (isa, dtype);
        self.run_dtype(micro::scalar::Scalar)
    }
}

pub(crate) fn check_schedule(s: &BlockSchedule, has_rows: bool, d: &Dims) -> Result<()> {
    let bad = |msg: String| Err(Error::Schedule(msg));
    if s.sq != d.sq || s.sk != d.sk {
        return bad(format!(
            "schedule is for sq {} / sk {}, the inputs have sq {} / sk {}",
            s.sq, s.sk, d.sq, d.sk
        ));
    }
    if s.batch != 1 && s.batch != d.batch {
        return bad(format!(
            "schedule has {} batch rows, inputs {}",
            s.batch, d.batch
        ));
    }
    if s.heads != 1 && s.heads != d.hq {
        return bad(format!(
            "schedule has {} heads, inputs have {} query heads",
            s.heads, d.hq
        ));
    }
    if !has_rows && s.counts().1 > 0 {
        return bad("schedule has Partial tiles but no element mask was given".into());
    }
    Ok(())
}

/// How the epilogue writes output rows: AVX-512 conversions on the AVX-512 paths (the plain
/// `Element::from_f32_scaled` loops otherwise, and for f16).
#[derive(Clone, Copy)]
struct Epilogue {
    f32: bool,
    bf16: bool,
}

impl Epilogue {
    fn for_isa(isa: Isa) -> Epilogue {
        match isa {
            Isa::Amx | Isa::Avx512Bf16 => Epilogue {
                f32: true,
                bf16: true,
            },
            Isa::Avx512 => Epilogue {
                f32: true,
                bf16: false,
            },
            Isa::Scalar | Isa::Avx2 => Epilogue {
                f32: false,
                bf16: false,
            },
        }
    }

    /// `dst = src * scale` in the output dtype.
    #[inline]
    fn row<T: Element>(self, src: &[f32], scale: f32, dst: &mut [T]) {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: `for_isa` enabled a flag only for paths whose CPU features were checked
            // by `Isa::available` (AVX-512F; AVX-512 BF16 for the bf16 one).
            if self.bf16 && T::DTYPE == DType::BF16 {
                let d: &mut [u16] = bytemuck::cast_slice_mut(dst);
                return unsafe { micro::avx512::scale_to_bf16(src, scale, d) };
            }
            if self.f32 && T::DTYPE == DType::F32 {
                let d: &mut [f32] = bytemuck::cast_slice_mut(dst);
                return unsafe { micro::avx512::scale_f32(src, scale, d) };
            }
        }
        let _ = self;
        T::from_f32_scaled(src, scale, dst)
    }
}

/// One attention call, resolved.
struct Job<'a> {
    /// The pooled attention map, when asked for ([`forward_map`]).
    map: Option<MapAcc>,
    epilogue: Epilogue,
    /// Precomputed bits of the Partial tiles, shared by all heads (see [`PartialBits`]).
    partial_bits: Option<PartialBits>,
    q: &'a TensorView<'a>,
    k: &'a TensorView<'a>,
    v: &'a TensorView<'a>,
    dims: Dims,
    logits: Logits,
    /// Skip-softmax: log2 of `lambda` ([`AttnParams::skip_below`]).
    skip_log2: Option<f32>,
    schedule: &'a BlockSchedule,
    rows: Option<&'a dyn RowMask>,
}

/// Raw output pointers shared by the tasks.
///
/// SAFETY: every task writes only the output rows of its own (batch, head, query tile), which
/// no other task touches, and the buffers outlive the parallel section.
#[derive(Clone, Copy)]
struct OutPtr<T> {
    out: *mut T,
    lse: *mut f32,
}
unsafe impl<T> Send for OutPtr<T> {}
unsafe impl<T> Sync for OutPtr<T> {}

/// Per-thread scratch of one task (sized for BQ rows). The buffers the micro-kernels stream
/// through are cache-line aligned (see [`buf`]).
struct Scratch<P: bytemuck::Pod> {
    q: AlignedBuf<P>,
    s: AlignedBuf<f32>,
    p: AlignedBuf<P>,
    o: AlignedBuf<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
    alpha: Vec<f32>,
    mask: Vec<u64>,
    /// Pooled map (empty without one): per (row, key chunk) of the current 64 rows a reference
    /// base-2 maximum `cm`, `cs = sum_j 2^(x_j - cm)` and `cx = max_j 2^(x_j - cm)` over the
    /// chunk's allowed keys; `touched` the chunks the rows' schedule entries cover.
    cm: Vec<f32>,
    cs: Vec<f32>,
    cx: Vec<f32>,
    touched: Vec<usize>,
}

impl<P: bytemuck::Pod> Scratch<P> {
    fn new(dp: usize, dvp: usize, map_chunks: usize) -> Self {
        Scratch {
            cm: vec![0.0; BQ * map_chunks],
            cs: vec![0.0; BQ * map_chunks],
            cx: vec![0.0; BQ * map_chunks],
            touched: Vec::new(),
            q: AlignedBuf::zeroed(BQ * dp),
            s: AlignedBuf::zeroed(BQ * LDS),
            p: AlignedBuf::zeroed(BQ * LDP),
            o: AlignedBuf::zeroed(BQ * dvp),
            m: vec![0.0; BQ],
            l: vec![0.0; BQ],
            alpha: vec![0.0; BQ],
            mask: vec![0; BQ * MAXW],
        }
    }
}

/// The element-mask bits of every Partial tile of a head-shared schedule with BQ x NC tiles,
/// computed once (in parallel) instead of once per head: `words[slot * BQ + r]` holds the bits of
/// query row `q0 + r` of the tile whose entry has `slot[entry] = slot`.
struct PartialBits {
    slot: Vec<u32>,
    words: Vec<u64>,
}

impl PartialBits {
    fn build(s: &BlockSchedule, rm: &dyn RowMask) -> Option<PartialBits> {
        if s.heads != 1 || s.tile_q != BQ || s.tile_k != NC {
            return None;
        }
        let mut slot = vec![u32::MAX; s.entries().len()];
        // (batch row, query tile, key tile) of every Partial entry, in slot order.
        let mut jobs = Vec::new();
        for b in 0..s.batch {
            for qt in 0..s.q_tiles {
                let start = s.row_start(b, 0, qt);
                for (k, e) in s.row(b, 0, qt).iter().enumerate() {
                    if e.kind == TileKind::Partial {
                        slot[start + k] = jobs.len() as u32;
                        jobs.push((b, qt, e.k_tile as usize));
                    }
                }
            }
        }
        let mut words = vec![0u64; jobs.len() * BQ];
        words
            .par_chunks_mut(BQ)
            .zip(&jobs)
            .for_each(|(w, &(b, qt, kt))| {
                let (q0, q1) = s.q_range(qt);
                for (r, word) in w.iter_mut().enumerate().take(q1 - q0) {
                    rm.row_bits(b, 0, q0 + r, kt * NC, std::slice::from_mut(word));
                }
            });
        Some(PartialBits { slot, words })
    }
}

/// Up to this many bytes of packed K/V, all groups are packed at once and their tasks run in one
/// parallel loop; above it, long queries go group by group.
const PACK_ALL_BYTES: usize = 4 << 20;

/// One 64-key chunk of a group: keys `c * NC + lo .. c * NC + hi` are in the scheduled tile.
#[derive(Clone, Copy, Default)]
struct Chunk {
    c: usize,
    lo: usize,
    hi: usize,
    partial: bool,
    /// Index of the schedule entry (for [`PartialBits`]).
    entry: usize,
}

/// Bits `lo .. hi` (0 <= lo <= hi <= 64) set.
#[inline]
fn range_bits(lo: usize, hi: usize) -> u64 {
    let upto = |n: usize| if n >= 64 { u64::MAX } else { (1u64 << n) - 1 };
    upto(hi) & !upto(lo)
}

impl Job<'_> {
    fn run_dtype<M: Micro>(&self, m: M) -> Result<AttnOutput> {
        match self.q.dtype() {
            DType::F32 => self.run::<f32, M>(m),
            DType::BF16 => self.run::<bf16, M>(m),
            DType::F16 => self.run::<f16, M>(m),
        }
    }

    fn run<T: Element, M: Micro>(&self, micro: M) -> Result<AttnOutput> {
        let Dims {
            batch,
            sq,
            sk,
            hq,
            hk,
            d,
            dv,
        } = self.dims;
        // Rows with no scheduled key are never written: they stay 0.
        let mut out = buf::zeroed_vec::<T>(batch * sq * hq * dv);
        let mut lse = vec![f32::NEG_INFINITY; batch * hq * sq];
        let ptr = OutPtr {
            out: out.as_mut_ptr(),
            lse: lse.as_mut_ptr(),
        };
        let dp = packed_dim::<M>(d);
        let dvp = packed_dv::<M>(dv);
        let chunks = sk.div_ceil(NC);
        let group = hq / hk;
        let sched = self.schedule;
        let groups: Vec<(usize, usize)> = (0..batch)
            .flat_map(|b| (0..hk).map(move |h| (b, h)))
            .collect();
        let (kt_len, v_len) = (dp * NC, NC * dvp);
        let map_chunks = if self.map.is_some() { chunks } else { 0 };
        let (glen, vglen) = (chunks * kt_len, chunks * v_len);
        // Packs K^T and V of the groups `gs` into `kt`/`vp` (group after group), in parallel over
        // all their chunks. The packed copy is the size of K + V (plus padding).
        let pack = |gs: &[(usize, usize)], kt: &mut [M::P], vp: &mut [M::P]| {
            kt.par_chunks_mut(kt_len)
                .zip(vp.par_chunks_mut(v_len))
                .enumerate()
                .for_each(|(i, (ktc, vc))| {
                    let ((b, g), c) = (gs[i / chunks], i % chunks);
                    pack_kt::<T, M>(self.k, b, g, c, ktc);
                    pack_v::<T, M>(self.v, b, g, c, vc);
                });
        };
        // One task per (batch, query head, query tile) with scheduled keys, heaviest first, so
        // work stealing balances causal and ragged schedules.
        let tasks_of = |gs: &[(usize, usize)]| {
            let mut t: Vec<(usize, usize, usize, usize)> = gs
                .iter()
                .flat_map(|&(b, g)| {
                    (g * group..(g + 1) * group)
                        .flat_map(move |h| (0..sched.q_tiles).map(move |qt| (b, h, qt)))
                })
                .map(|(b, h, qt)| (b, h, qt, sched.row(b, h, qt).len()))
                .filter(|t| t.3 > 0)
                .collect();
            t.sort_by_key(|t| std::cmp::Reverse(t.3));
            t
        };
        // Scratch buffers are taken from a pool and given back after each task: rayon calls a
        // `for_each_init` initializer once per job, i.e. once per task here (`with_max_len(1)`),
        // and allocating and zeroing ~150 KiB per task cost 5-10% at n = 1k.
        let pool: std::sync::Mutex<Vec<Scratch<M::P>>> = std::sync::Mutex::new(Vec::new());
        // `gi0`: index of the first group packed in `kt`/`vp`.
        let run_tasks =
            |tasks: &[(usize, usize, usize, usize)], gi0: usize, kt: &[M::P], vp: &[M::P]| {
                tasks.par_iter().with_max_len(1).for_each(|&(b, h, qt, _)| {
                    let taken = pool.lock().expect("scratch pool").pop();
                    let mut scr =
                        taken.unwrap_or_else(|| Scratch::<M::P>::new(dp, dvp, map_chunks));
                    let gi = b * hk + h / group - gi0;
                    let ktg = &kt[gi * glen..(gi + 1) * glen];
                    let vpg = &vp[gi * vglen..(gi + 1) * vglen];
                    self.tile::<T, M>(&micro, b, h, qt, ktg, vpg, &mut scr, ptr);
                    pool.lock().expect("scratch pool").push(scr);
                });
            };
        let threads = rayon::current_num_threads();
        let elem = std::mem::size_of::<M::P>();
        let packed_bytes = groups.len() * (glen + vglen) * elem;
        // The packed K^T / V buffers are kept between calls (`buf::Reuse`); every element the
        // kernels read is written by the packers first.
        static KT: buf::Reuse = buf::Reuse::new();
        static VP: buf::Reuse = buf::Reuse::new();
        let one_group = group * sched.q_tiles >= 4 * threads && packed_bytes > PACK_ALL_BYTES;
        let ng = if one_group { 1 } else { groups.len() };
        let (mut ktb, mut vpb) = (KT.take(ng * glen * elem), VP.take(ng * vglen * elem));
        {
            let kt: &mut [M::P] = bytemuck::cast_slice_mut(&mut ktb[..ng * glen * elem]);
            let vp: &mut [M::P] = bytemuck::cast_slice_mut(&mut vpb[..ng * vglen * elem]);
            if one_group {
                // Long queries: one group at a time, so its packed K/V stays warm in cache while
                // all threads work on its tasks.
                for (gi, g) in groups.iter().enumerate() {
                    pack(std::slice::from_ref(g), kt, vp);
                    run_tasks(&tasks_of(std::slice::from_ref(g)), gi, kt, vp);
                }
            } else {
                // Short queries (decode, small Sq) or small problems: all groups at once, one
                // parallel loop over every task (no barrier per group).
                pack(&groups, kt, vp);
                run_tasks(&tasks_of(&groups), 0, kt, vp);
            }
        }
        KT.give(ktb);
        VP.give(vpb);
        Ok(AttnOutput {
            out: Tensor::new(T::wrap(out), vec![batch, sq, hq, dv])?,
            lse,
        })
    }

    /// One group of key chunks for query rows `i0 .. i0 + rows`: S = Q K^T per chunk (into the
    /// chunk's 64 columns of S), the mask bits (Full: the valid key range; Partial: the row mask
    /// too), one online-softmax step over the whole group, and O = alpha O + P V.
    #[allow(clippy::too_many_arguments)]
    fn group<M: Micro>(
        &self,
        micro: &M,
        b: usize,
        h: usize,
        i0: usize,
        rows: usize,
        group: &[Chunk],
        kt: &[M::P],
        vp: &[M::P],
        scr: &mut Scratch<M::P>,
    ) {
        let Dims { d, dv, .. } = self.dims;
        let (dp, dvp) = (packed_dim::<M>(d), packed_dv::<M>(dv));
        let mut vts: [&[M::P]; MAXW] = [&[]; MAXW];
        for (g, ch) in group.iter().enumerate() {
            let range = range_bits(ch.lo, ch.hi);
            match (ch.partial, self.rows) {
                (true, Some(_)) if self.partial_bits.is_some() => {
                    let pb = self.partial_bits.as_ref().expect("checked");
                    // Schedule tiles are BQ x NC here, so the task's rows are the tile's rows.
                    let base = pb.slot[ch.entry] as usize * BQ;
                    for r in 0..rows {
                        scr.mask[r * MAXW + g] = pb.words[base + r] & range;
                    }
                }
                (true, Some(rm)) => {
                    for r in 0..rows {
                        let mut word = [0u64];
                        rm.row_bits(b, h, i0 + r, ch.c * NC, &mut word);
                        scr.mask[r * MAXW + g] = word[0] & range;
                    }
                }
                _ => (0..rows).for_each(|r| scr.mask[r * MAXW + g] = range),
            }
            let ktc = &kt[ch.c * dp * NC..(ch.c + 1) * dp * NC];
            micro.qk(&scr.q, rows, dp, ktc, &mut scr.s[g * NC..], LDS);
            vts[g] = &vp[ch.c * NC * dvp..(ch.c + 1) * NC * dvp];
        }
        if let Some(t) = self.skip_log2 {
            use std::sync::atomic::Ordering::Relaxed;
            SKIP_TESTED.fetch_add(1, Relaxed);
            if self.negligible(rows, group.len(), t, scr) {
                SKIP_DROPPED.fetch_add(1, Relaxed);
                return;
            }
        }
        micro.softmax(
            &scr.s,
            rows,
            group.len(),
            &scr.mask,
            &self.logits,
            &mut scr.m,
            &mut scr.l,
            &mut scr.alpha,
            &mut scr.p,
        );
        if self.map.is_some() {
            self.map_stats(rows, group, scr);
        }
        micro.pv(
            &scr.p,
            rows,
            &vts[..group.len()],
            dv,
            &scr.alpha,
            &mut scr.o,
        );
    }

    /// Pooled map, per row and chunk of the group, from the softmax step's own P (no extra
    /// exponential): p_c = 2^(x_c - m) with m the row's running maximum after the step, so the
    /// chunk's (sum_c p_c, max_c p_c) are exact relative to m. They merge into the row's state
    /// for the chunk (cm: its reference maximum, cs: sum, cx: max, both relative to cm) as two
    /// online-softmax states merge:
    ///   m* = max(cm, m),  cs <- cs 2^(cm - m*) + sum 2^(m - m*),  cx likewise with max.
    fn map_stats<P: micro::FromF32 + bytemuck::Pod>(
        &self,
        rows: usize,
        group: &[Chunk],
        scr: &mut Scratch<P>,
    ) {
        let chunks = scr.cm.len() / BQ;
        for r in 0..rows {
            let m = scr.m[r];
            if m == f32::NEG_INFINITY {
                continue;
            }
            for (g, ch) in group.iter().enumerate() {
                if scr.mask[r * MAXW + g] == 0 {
                    continue;
                }
                // 16 independent lanes (branch-free, so the loop vectorizes).
                let (mut sums, mut tops) = ([0.0f32; 16], [0.0f32; 16]);
                for x in scr.p[r * LDP + g * NC..r * LDP + g * NC + NC].chunks_exact(16) {
                    for l in 0..16 {
                        let v = x[l].to_f32();
                        sums[l] += v;
                        tops[l] = if v > tops[l] { v } else { tops[l] };
                    }
                }
                let sum: f32 = sums.iter().sum();
                let top = tops.iter().fold(0.0f32, |a, &b| a.max(b));
                let idx = r * chunks + ch.c;
                let cm = scr.cm[idx];
                if cm == f32::NEG_INFINITY {
                    // First visit of the chunk (the only one unless tiles split it).
                    (scr.cm[idx], scr.cs[idx], scr.cx[idx]) = (m, sum, top);
                    continue;
                }
                let mm = cm.max(m);
                let (a, b) = ((cm - mm).exp2(), (m - mm).exp2());
                scr.cs[idx] = scr.cs[idx] * a + sum * b;
                scr.cx[idx] = (scr.cx[idx] * a).max(top * b);
                scr.cm[idx] = mm;
            }
        }
    }

    /// Pooled map: the finished rows `i0 .. i0 + rows` of (b, h) into the map, with
    /// p_ij = 2^(x_ij - lse2_i), lse2_i = m_i + log2 l_i:
    ///   sum over the chunk's keys of p = cs 2^(cm - lse2),  max of p = cx 2^(cm - lse2).
    fn map_flush<P: bytemuck::Pod>(
        &self,
        b: usize,
        h: usize,
        i0: usize,
        rows: usize,
        scr: &Scratch<P>,
    ) {
        let Some(map) = &self.map else {
            return;
        };
        let chunks = scr.cm.len() / BQ;
        let nk = map.k_blocks;
        let mut slab = map.slabs[b * self.dims.hq + h].lock().expect("map slab");
        let (mass, max) = &mut *slab;
        for r in 0..rows {
            let l = scr.l[r];
            if l == 0.0 {
                continue;
            }
            let lse2 = scr.m[r] + l.log2();
            let base = (i0 + r) / map.block * nk;
            for &c in &scr.touched {
                let cm = scr.cm[r * chunks + c];
                if cm == f32::NEG_INFINITY {
                    continue;
                }
                let f = (cm - lse2).exp2();
                let cell = base + c * NC / map.block;
                mass[cell] += scr.cs[r * chunks + c] * f;
                max[cell] = max[cell].max(scr.cx[r * chunks + c] * f);
            }
        }
    }

    /// Skip-softmax: whether every allowed logit x of the group (base 2) lies below its row's
    /// running maximum by more than -t = -log2 lambda, i.e. 2^(x - m) < lambda for every row and
    /// key. A row that has seen no key yet (m = -inf) or a NaN logit keeps the group. The logit
    /// is monotone in the raw dot product s (increasing for scale > 0, decreasing for scale < 0,
    /// with or without soft-cap), so a row's largest logit is that of its largest or smallest s.
    fn negligible<P: bytemuck::Pod>(
        &self,
        rows: usize,
        w: usize,
        t: f32,
        scr: &Scratch<P>,
    ) -> bool {
        for r in 0..rows {
            let m = scr.m[r];
            if m == f32::NEG_INFINITY {
                return false;
            }
            let (mut hi, mut lo, mut any) = (f32::NEG_INFINITY, f32::INFINITY, false);
            for g in 0..w {
                let bits = scr.mask[r * MAXW + g];
                if bits == 0 {
                    continue;
                }
                any = true;
                let row = &scr.s[r * LDS + g * NC..r * LDS + g * NC + NC];
                if bits == u64::MAX {
                    // A whole chunk: branch-free selects the compiler turns into vector max /
                    // min (a NaN never wins a comparison, so it is flagged on its own; a float
                    // sum would not vectorize: its order is fixed).
                    let (mut h, mut l, mut nan) = (f32::NEG_INFINITY, f32::INFINITY, false);
                    for &x in row {
                        h = if x > h { x } else { h };
                        l = if x < l { x } else { l };
                        nan |= x.is_nan();
                    }
                    if nan {
                        return false;
                    }
                    hi = hi.max(h);
                    lo = lo.min(l);
                    continue;
                }
                for (c, &x) in row.iter().enumerate() {
                    if bits >> c & 1 == 1 {
                        if x.is_nan() {
                            return false;
                        }
                        hi = hi.max(x);
                        lo = lo.min(x);
                    }
                }
            }
            if !any {
                continue;
            }
            let top = self.logits.base2(hi).max(self.logits.base2(lo));
            let gap = top - m;
            if gap.is_nan() || gap >= t {
                return false;
            }
        }
        true
    }

    /// One (batch row, query head, schedule query tile): the online-softmax loop over its key tiles.
    #[allow(clippy::too_many_arguments)]
    fn tile<T: Element, M: Micro>(
        &self,
        micro: &M,
        b: usize,
        h: usize,
        qt: usize,
        kt: &[M::P],
        vp: &[M::P],
        scr: &mut Scratch<M::P>,
        ptr: OutPtr<T>,
    ) {
        let Dims { sq, sk, hq, dv, .. } = self.dims;
        let sched = self.schedule;
        let dvp = packed_dv::<M>(dv);
        let entries = sched.row(b, h, qt);
        let (t0, t1) = sched.q_range(qt);
        micro.begin();
        for i0 in (t0..t1).step_by(BQ) {
            let rows = BQ.min(t1 - i0);
            pack_q::<T, M>(self.q, b, h, i0, rows, &mut scr.q);
            scr.m[..rows].fill(f32::NEG_INFINITY);
            scr.l[..rows].fill(0.0);
            scr.o[..rows * dvp].fill(0.0);
            if self.map.is_some() {
                // The chunks this row's entries cover (non-decreasing: entries are sorted).
                let chunks = scr.cm.len() / BQ;
                scr.touched.clear();
                for e in entries {
                    let (k0, k1) = sched.k_range(e.k_tile as usize);
                    for c in k0 / NC..k1.div_ceil(NC) {
                        if scr.touched.last() != Some(&c) {
                            scr.touched.push(c);
                            for r in 0..rows {
                                scr.cm[r * chunks + c] = f32::NEG_INFINITY;
                                scr.cs[r * chunks + c] = 0.0;
                                scr.cx[r * chunks + c] = 0.0;
                            }
                        }
                    }
                }
            }
            // Walk the schedule row in 64-key chunks, flushing groups of up to MAXW chunks.
            let mut group: [Chunk; MAXW] = [Chunk::default(); MAXW];
            let mut w = 0;
            let first = sched.row_start(b, h, qt);
            for (ei, e) in entries.iter().enumerate() {
                let (k0, k1) = sched.k_range(e.k_tile as usize);
                for c in k0 / NC..k1.div_ceil(NC) {
                    group[w] = Chunk {
                        c,
                        lo: k0.max(c * NC) - c * NC,
                        hi: k1.min(c * NC + NC).min(sk) - c * NC,
                        partial: e.kind == TileKind::Partial,
                        entry: first + ei,
                    };
                    w += 1;
                    if w == M::GROUP {
                        self.group(micro, b, h, i0, rows, &group[..w], kt, vp, scr);
                        w = 0;
                    }
                }
            }
            if w > 0 {
                self.group(micro, b, h, i0, rows, &group[..w], kt, vp, scr);
            }
            // Epilogue: out = O / l, LSE = ln 2 * (m + log2 l); empty rows (l = 0): out 0,
            // LSE -inf. A NaN l (NaN inputs) propagates to out and LSE.
            for r in 0..rows {
                let i = i0 + r;
                // SAFETY: see `OutPtr`; (b, i, h) rows are written by this task only.
                unsafe {
                    let orow = std::slice::from_raw_parts_mut(
                        ptr.out.add(((b * sq + i) * hq + h) * dv),
                        dv,
                    );
                    let l = scr.l[r];
                    if l != 0.0 {
                        self.epilogue
                            .row(&scr.o[r * dvp..r * dvp + dv], 1.0 / l, orow);
                        *ptr.lse.add((b * hq + h) * sq + i) =
                            std::f32::consts::LN_2 * (scr.m[r] + l.log2());
                    } else {
                        orow.fill(T::from_f32(0.0));
                    }
                }
            }
            self.map_flush(b, h, i0, rows, scr);
        }
    }
}
