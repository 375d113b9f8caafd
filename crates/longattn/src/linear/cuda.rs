//! The linear-attention core on NVIDIA GPUs: chunked forward and backward, and the recurrent
//! decode step (`cuda/kernels/linear_*.cu`, compiled by NVRTC at run time like the attention
//! kernels; one variant per dtype / head dims / slice width, lengths, scale and decays are
//! kernel arguments).
//!
//! - [`forward`] / [`backward`] / [`step`] run on device tensors ([`DevCore`]);
//! - [`forward_host`] / [`backward_host`] / [`step_host`] take the host [`Core`] (upload, run,
//!   download: the selftest and the CLI);
//!
//! Scope: q / k / v in bf16 or f16 (f32 is refused with [`Error::DType`]), K and V head dims 64
//! or 128, decays none / per head / per token / per key dim (GLA) in the chunked kernels and
//! [`step`] (the gate's backward always takes the chunk-parallel path), GQA, initial and final states `[seqs, H, K, V]` f32, varlen through
//! `cu_seqlens`, strided q / k / v with a contiguous head dim (16-byte aligned rows).
//!
//! Kernel designs (`cuda/kernels/linear_fwd.cu`, `linear_bwd.cu`, `linear_seg.cu`,
//! `linear_step.cu` hold the math): chunks of 64 tokens; one block per (state slice, head,
//! segment) walking its chunks in order (or in reverse for dK / dV), its slice of the state in
//! f32 registers, chunk c + 1 loading (cp.async) while chunk c computes on the tensor cores
//! (mma.sync m16n8k16). No per-chunk state ever goes to global memory. When slices x heads x
//! sequences leave the SMs idle, each sequence is cut into segments (`choose_segments`): a state
//! pass gives each segment's own contribution, a scan over segments the state entering each
//! (and, for the backward, the gradient leaving each), then every segment runs in parallel.
//! Forward (`choose_fwd`): 16 warps over the whole state (BV = V), or 8 warps with slices of
//! `choose_bv` columns; backward (8 warps): dV with slices of `choose_bv` columns in reverse, dQ
//! (in order) and dK (in reverse) with slices of 32 key rows, then dg as reverse cumulative sums
//! of `q . dq - k . dk`. `scripts/linear_emu` runs the kernels on the CPU (an emulation of
//! mma.sync / ldmatrix / shuffles) against an f64 recurrence.
use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};

use super::{Core, CoreDims, Decay};
use crate::cuda::forward::COMMON;
use crate::cuda::{drv, CudaDevice, DevTensor};
use crate::error::{Error, Result};
use crate::tensor::{DType, Slice, Tensor, TensorView};

const LIN_COMMON: &str = include_str!("../cuda/kernels/linear_common.cuh");
const LIN_FWD: &str = include_str!("../cuda/kernels/linear_fwd.cu");
const LIN_BWD: &str = include_str!("../cuda/kernels/linear_bwd.cu");
const LIN_STEP: &str = include_str!("../cuda/kernels/linear_step.cu");
const LIN_SEG: &str = include_str!("../cuda/kernels/linear_seg.cu");

/// Tokens per chunk (`LIN_C`).
pub const CHUNK: usize = 64;
/// Key rows per block of the dQ / dK kernels (`LIN_BK`).
const BK: usize = 32;
/// Threads per block of the chunked kernels (`LIN_THREADS`).
const THREADS: u32 = 256;

/// Kernel parameters; field for field `LinParams` in `kernels/linear_common.cuh` (passed by
/// value: the layouts must match byte for byte; both sides check the size).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct LinParams {
    q: u64,
    k: u64,
    v: u64,
    dout: u64,
    o: u64,
    dq: u64,
    dk: u64,
    dv: u64,
    dk_acc: u64,
    dv_acc: u64,
    g: u64,
    s0: u64,
    sfin: u64,
    dsfin: u64,
    ds0: u64,
    db: u64,
    cu: u64,
    seg_f: u64,
    seg_r: u64,
    seg_g: u64,
    q_s: [i64; 3],
    k_s: [i64; 3],
    v_s: [i64; 3],
    do_s: [i64; 3],
    o_s: [i64; 3],
    dq_s: [i64; 3],
    dk_s: [i64; 3],
    dv_s: [i64; 3],
    b: i32,
    t: i32,
    h: i32,
    hk: i32,
    seqs: i32,
    decay: i32,
    has_s0: i32,
    has_cu: i32,
    has_dsfin: i32,
    want_db: i32,
    gqa_acc: i32,
    seg_len: i32,
    nseg: i32,
    pad0: i32,
    scale: f32,
    pad1: f32,
    chunk_f: u64,
    chunk_r: u64,
    dg: u64,
    dg_tot: u64,
}

const _: () = assert!(std::mem::size_of::<LinParams>() == 448);
const _: () = assert!(std::mem::offset_of!(LinParams, q_s) == 160);
const _: () = assert!(std::mem::offset_of!(LinParams, b) == 352);
const _: () = assert!(std::mem::offset_of!(LinParams, scale) == 408);

// SAFETY: plain-old-data with the C layout of the kernels' parameter struct.
unsafe impl cudarc::driver::DeviceRepr for LinParams {}

/// The decay on the device (log space, `g <= 0`; the caller guarantees the sign, the host
/// wrappers check it).
#[derive(Clone, Copy, Debug)]
pub enum DevDecay<'a> {
    None,
    /// `[H]`.
    PerHead(&'a CudaSlice<f32>),
    /// `[B, T, H]`.
    Token(&'a CudaSlice<f32>),
    /// `[B, T, H, K]` (GLA): the forward and the decode step (the chunked backward refuses it).
    Gate(&'a CudaSlice<f32>),
}

/// `LinParams::decay` of the per-key-dimension gate.
const GATE: i32 = 3;

impl DevDecay<'_> {
    fn kind(&self) -> i32 {
        match self {
            DevDecay::None => 0,
            DevDecay::PerHead(_) => 1,
            DevDecay::Token(_) => 2,
            DevDecay::Gate(_) => GATE,
        }
    }
    fn slice(&self) -> Option<&CudaSlice<f32>> {
        match *self {
            DevDecay::None => None,
            DevDecay::PerHead(g) | DevDecay::Token(g) | DevDecay::Gate(g) => Some(g),
        }
    }
}

/// One core problem on the device: `q [B, T, H, K]`, `k [B, T, Hk, K]`, `v [B, T, Hk, V]`
/// (bf16 or f16, one dtype), the decay, the scale, the optional initial state
/// `[seqs, H, K, V]` f32 and optional `cu_seqlens [N + 1]` int32 (then `B = 1`; its values
/// must start at 0, never decrease and end at T: the kernels clamp them into `[0, T]`).
#[derive(Clone, Copy)]
pub struct DevCore<'a> {
    pub q: &'a DevTensor,
    pub k: &'a DevTensor,
    pub v: &'a DevTensor,
    pub decay: DevDecay<'a>,
    pub scale: f32,
    pub initial_state: Option<&'a CudaSlice<f32>>,
    pub cu_seqlens: Option<&'a CudaSlice<i32>>,
}

/// Gradients of [`backward`] on the device: `dq` like q, `dk` / `dv` like k / v (summed over the
/// query heads of each kv head), `dg [B, T, H]` for a token decay (`[B, T, H, K]` for the gate),
/// `d_initial_state`
/// `[seqs, H, K, V]`.
pub struct DevGrads {
    pub dq: DevTensor,
    pub dk: DevTensor,
    pub dv: DevTensor,
    pub dg: Option<CudaSlice<f32>>,
    pub d_initial_state: CudaSlice<f32>,
}

fn param(op: &'static str, msg: String) -> Error {
    Error::Param { op, msg }
}

fn ptr<T>(s: &CudaSlice<T>) -> u64 {
    s.device_ptr(s.stream()).0
}

fn tptr(t: &DevTensor) -> u64 {
    t.data.device_ptr(t.data.stream()).0
}

/// Checks what the kernels support: the dtype (bf16 / f16) and the head dims (64 / 128).
fn check_support(op: &'static str, dtype: DType, kd: usize, vd: usize) -> Result<()> {
    if !matches!(dtype, DType::BF16 | DType::F16) {
        return Err(Error::DType {
            op,
            tensor: "q".into(),
            got: dtype.to_string(),
            expected: "bf16 or f16 (the tensor-core kernels; use the CPU oracle for f32)".into(),
        });
    }
    for (name, d) in [("K", kd), ("V", vd)] {
        if d != 64 && d != 128 {
            return Err(param(
                op,
                format!("{name} head dim {d} is not supported on the GPU (64 or 128)"),
            ));
        }
    }
    Ok(())
}

/// 16-byte aligned rows: the kernels load 16-byte chunks (cp.async).
fn check_aligned(op: &'static str, name: &str, t: &DevTensor) -> Result<()> {
    if !tptr(t).is_multiple_of(16) || t.strides[..3].iter().any(|s| !s.is_multiple_of(8)) {
        return Err(Error::Shape {
            op,
            tensor: name.into(),
            got: t.shape.to_vec(),
            expected: format!(
                "a 16-byte aligned address and strides that are multiples of 8 elements, got strides {:?}",
                t.strides
            ),
        });
    }
    Ok(())
}

impl DevCore<'_> {
    /// Checks shapes, dtypes, alignment and buffer lengths; the sizes of the problem.
    pub fn validate(&self, op: &'static str) -> Result<CoreDims> {
        let [b, t, h, kd] = self.q.shape;
        let [kb, kt, hk, kk] = self.k.shape;
        let [vb, vt, vh, vd] = self.v.shape;
        let shape = |name: &str, got: [usize; 4], expected: String| Error::Shape {
            op,
            tensor: name.into(),
            got: got.to_vec(),
            expected,
        };
        if (kb, kt, kk) != (b, t, kd) || hk == 0 || h % hk != 0 {
            return Err(shape(
                "k",
                self.k.shape,
                format!("[{b}, {t}, Hk, {kd}] with Hk dividing H = {h}"),
            ));
        }
        if (vb, vt, vh) != (b, t, hk) {
            return Err(shape("v", self.v.shape, format!("[{b}, {t}, {hk}, V]")));
        }
        for (name, x) in [("k", self.k), ("v", self.v)] {
            if x.dtype != self.q.dtype {
                return Err(Error::DType {
                    op,
                    tensor: name.into(),
                    got: x.dtype.to_string(),
                    expected: format!("{} like q", self.q.dtype),
                });
            }
        }
        check_support(op, self.q.dtype, kd, vd)?;
        for (name, x) in [("q", self.q), ("k", self.k), ("v", self.v)] {
            check_aligned(op, name, x)?;
        }
        if !self.scale.is_finite() {
            return Err(param(
                op,
                format!("scale must be finite, got {}", self.scale),
            ));
        }
        let seqs = match self.cu_seqlens {
            None => b,
            Some(cu) => {
                if b != 1 || cu.len() < 2 {
                    return Err(param(
                        op,
                        format!(
                            "cu_seqlens needs batch 1 and at least 2 entries (batch {b}, {} entries)",
                            cu.len()
                        ),
                    ));
                }
                cu.len() - 1
            }
        };
        let want = match self.decay {
            DevDecay::None => 0,
            DevDecay::PerHead(_) => h,
            DevDecay::Token(_) => b * t * h,
            DevDecay::Gate(_) => b * t * h * kd,
        };
        if let Some(g) = self.decay.slice() {
            if g.len() < want {
                return Err(param(
                    op,
                    format!("decay `g` has {} elements, expected {want}", g.len()),
                ));
            }
        }
        let dims = CoreDims {
            batch: b,
            t,
            h,
            hk,
            k: kd,
            v: vd,
            seqs,
        };
        if let Some(s) = self.initial_state {
            if s.len() < dims.state_len() {
                return Err(param(
                    op,
                    format!(
                        "initial_state has {} elements, expected [{seqs}, {h}, {kd}, {vd}]",
                        s.len()
                    ),
                ));
            }
        }
        if seqs > 65535 || h > 65535 {
            return Err(param(
                op,
                format!(
                    "{seqs} sequences x {h} heads: the launch grid takes at most 65535 of each"
                ),
            ));
        }
        if (b * t) as u64 * h as u64 * kd.max(vd) as u64 >= 1 << 62 || t > i32::MAX as usize {
            return Err(param(op, format!("T = {t} is too long")));
        }
        Ok(dims)
    }

    fn params(&self, d: &CoreDims) -> LinParams {
        LinParams {
            q: tptr(self.q),
            k: tptr(self.k),
            v: tptr(self.v),
            q_s: self.q.strides(),
            k_s: self.k.strides(),
            v_s: self.v.strides(),
            g: self.decay.slice().map_or(0, ptr),
            s0: self.initial_state.map_or(0, ptr),
            cu: self.cu_seqlens.map_or(0, ptr),
            b: d.batch as i32,
            t: d.t as i32,
            h: d.h as i32,
            hk: d.hk as i32,
            seqs: d.seqs as i32,
            decay: self.decay.kind(),
            has_s0: self.initial_state.is_some() as i32,
            has_cu: self.cu_seqlens.is_some() as i32,
            nseg: 1,
            scale: self.scale,
            ..Default::default()
        }
    }
}

/// Value columns per block of the 8-warp forward and of the dV kernel: 64 (half the
/// recomputation of Q K^T per value column of 32; the sequences are cut into segments when the
/// blocks are too few), or V when V < 64. `LONGATTN_LINEAR_BV=32|64` overrides.
fn choose_bv(d: &CoreDims) -> usize {
    match std::env::var("LONGATTN_LINEAR_BV").ok().as_deref() {
        Some("32") => 32,
        _ => d.v.min(64),
    }
}

/// Layout of the forward: `(BV, warps)`. 8 warps with [`choose_bv`]'s slices, or 16 warps over
/// the whole state (BV = V: Q K^T and K o w computed once per chunk and head instead of once per
/// slice). `LONGATTN_LINEAR_NW=8|16` overrides (16 takes BV = V unless `LONGATTN_LINEAR_BV`
/// is `64`).
fn choose_fwd(d: &CoreDims) -> (usize, usize) {
    let nw = match std::env::var("LONGATTN_LINEAR_NW").ok().as_deref() {
        Some("16") => 16,
        Some("8") => 8,
        _ => FWD_WARPS,
    };
    if nw == 16 {
        let bv = match std::env::var("LONGATTN_LINEAR_BV").ok().as_deref() {
            Some("64") => 64,
            _ => d.v,
        };
        (bv, 16)
    } else {
        (choose_bv(d), 8)
    }
}

/// How the backward runs (`backward_on`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BwdPath {
    /// The state entering and the gradient leaving every chunk stored (storage type, two
    /// buffers of chunk ids x H x K x V) by two walks, then every chunk's gradients at once
    /// (`lin_bwd_chunk`).
    Chunked,
    /// No per-chunk states: three kernels walking the chunks of their state slices
    /// (`lin_bwd_dv`, `lin_bwd_dq`, `lin_bwd_dk`), each recomputing the state it needs.
    Sliced,
}

/// Largest per-chunk state storage (bytes, both directions) the chunked backward takes before
/// the sliced one is used instead.
const CHUNK_STATES_MAX: usize = 4 << 30;

/// Chunk ids of the per-chunk states (`lin_chunk_id`): `ceil(T / 64) + seqs` with
/// `cu_seqlens`, `B ceil(T / 64)` without.
fn chunk_ids(d: &CoreDims, varlen: bool) -> usize {
    if varlen {
        d.t.div_ceil(CHUNK) + d.seqs
    } else {
        d.batch * d.t.div_ceil(CHUNK)
    }
}

/// [`BwdPath::Chunked`] unless its states would pass [`CHUNK_STATES_MAX`] bytes (or cannot be
/// allocated: `backward_on` falls back then); `LONGATTN_LINEAR_BWD=chunk|slice` overrides.
fn choose_bwd(d: &CoreDims, varlen: bool, el: usize) -> BwdPath {
    if chunk_ids(d, varlen) > i32::MAX as usize {
        return BwdPath::Sliced; // the grid's x limit
    }
    match std::env::var("LONGATTN_LINEAR_BWD").ok().as_deref() {
        Some("chunk") => BwdPath::Chunked,
        Some("slice") => BwdPath::Sliced,
        _ if 2 * chunk_ids(d, varlen) * d.h * d.k * d.v * el <= CHUNK_STATES_MAX => {
            BwdPath::Chunked
        }
        _ => BwdPath::Sliced,
    }
}

/// Default warps of the forward (see [`choose_fwd`]): 16 (measured on the H200 before the
/// fragment scaling, both cut into segments: 0.98 vs 1.25 ms at (1, 16k, 32, 128), 3.00 vs
/// 4.40 ms at 64k; docs/PERF.md).
const FWD_WARPS: usize = 16;

/// Shortest segment the chooser makes (tokens): below it the state passes and the scan cost
/// more than the parallelism gains.
const MIN_SEGMENT: usize = 512;

/// How the sequences are cut into segments that run in parallel (`linear_common.cuh`,
/// "Segments"): `(tokens a segment, segments a sequence)`, `(0, 1)` when they are not cut.
/// `slots` = SMs x resident blocks a SM. Blocks without cutting: `slices x H x seqs`; when they
/// fill at least 90% of one wave of slots, nothing is cut (a state pass and a scan cost more
/// than the last tenth of a wave). Otherwise each sequence of up to T tokens is cut into n
/// segments of at least [`MIN_SEGMENT`] tokens, n between the count that gives four waves and
/// twice that, picking the n whose last wave is fullest. `LONGATTN_LINEAR_SEG=N` forces
/// segments of N tokens (rounded up to the chunk), `0` turns cutting off.
fn choose_segments(dev: &CudaDevice, d: &CoreDims, slices: usize, per_sm: usize) -> (usize, usize) {
    let forced = std::env::var("LONGATTN_LINEAR_SEG")
        .ok()
        .and_then(|x| x.trim().parse::<usize>().ok());
    segments_for(dev.sms, d, slices, per_sm, forced)
}

/// [`choose_segments`] for `sms` SMs and an optional forced segment length.
fn segments_for(
    sms: usize,
    d: &CoreDims,
    slices: usize,
    per_sm: usize,
    forced: Option<usize>,
) -> (usize, usize) {
    // Segments of `len` tokens: their count, within the grid's z limit (seqs x nseg <= 65535).
    let most = (65535 / d.seqs).max(1);
    let cut = |len: usize| -> (usize, usize) {
        let mut len = len.max(CHUNK).div_ceil(CHUNK) * CHUNK;
        let mut n = d.t.div_ceil(len).max(1);
        if n > most {
            len = d.t.div_ceil(most).div_ceil(CHUNK) * CHUNK;
            n = d.t.div_ceil(len).max(1);
        }
        if n <= 1 {
            (0, 1)
        } else {
            (len, n)
        }
    };
    match forced {
        Some(0) => return (0, 1),
        Some(n) => return cut(n),
        None => {}
    }
    let slots = sms * per_sm;
    let base = slices * d.h * d.seqs;
    if base * 10 >= slots * 9 {
        return (0, 1);
    }
    let want = (4 * slots).div_ceil(base).max(2);
    let mut best = (0, 1);
    let mut best_eff = 0.0f64;
    for n in want..=2 * want {
        let (len, nseg) = cut(d.t.div_ceil(n).max(MIN_SEGMENT));
        if nseg <= 1 {
            break;
        }
        let blocks = base * nseg;
        let eff = blocks as f64 / (blocks.div_ceil(slots) * slots) as f64;
        if eff > best_eff + 1e-9 {
            (best, best_eff) = ((len, nseg), eff);
        }
    }
    best
}

/// The per-segment states of a cut problem ([`choose_segments`]): `f` (state entering each
/// segment), `r` (gradient reaching the state leaving it; backward only), `g` (each segment's
/// total log decay). Allocated stream-ordered on the launch stream; freed after the kernels
/// that read them (the stream orders the frees).
struct Segments {
    f: CudaSlice<f32>,
    r: Option<CudaSlice<f32>>,
    g: CudaSlice<f32>,
}

impl Segments {
    /// Cuts the sequences as `(seg_len, nseg)` says ([`choose_segments`]; `nseg = 1`: uncut,
    /// `None`): sets `p`'s segment fields, allocates the segment states, points `p` at them and
    /// runs the forward state pass and scan, and for the backward (`rev`) the reverse ones.
    #[allow(clippy::too_many_arguments)]
    fn prepare(
        dev: &CudaDevice,
        s: &Arc<CudaStream>,
        p: &mut LinParams,
        d: &CoreDims,
        dtype: DType,
        bv: usize,
        (seg_len, nseg): (usize, usize),
        rev: bool,
    ) -> Result<Option<Segments>> {
        (p.seg_len, p.nseg) = (seg_len as i32, nseg as i32);
        if nseg <= 1 {
            return Ok(None);
        }
        let n = d.seqs * nseg;
        let st = n * d.h * d.k * d.v;
        let zeros = |n: usize| {
            s.alloc_zeros::<f32>(n.max(1))
                .map_err(drv("alloc segments"))
        };
        let seg = Segments {
            f: zeros(st)?,
            r: if rev { Some(zeros(st)?) } else { None },
            // Each segment's total log decay: per head, or per head and key dim (gate).
            g: zeros(n * d.h * if p.decay == GATE { d.k } else { 1 })?,
        };
        p.seg_f = ptr(&seg.f);
        p.seg_r = seg.r.as_ref().map_or(0, ptr);
        p.seg_g = ptr(&seg.g);
        Self::run(dev, s, p, d, dtype, bv, false)?;
        if rev {
            Self::run(dev, s, p, d, dtype, bv, true)?;
        }
        Ok(Some(seg))
    }

    /// The state pass of one direction and its scan over segments: afterwards `seg_f` (or
    /// `seg_r`) holds the state entering (the gradient leaving) every segment.
    fn run(
        dev: &CudaDevice,
        s: &Arc<CudaStream>,
        p: &LinParams,
        d: &CoreDims,
        dtype: DType,
        bv: usize,
        rev: bool,
    ) -> Result<()> {
        let src = ("linear_seg", LIN_SEG);
        let gla = p.decay == GATE;
        let smem = smem_seg(d.k, bv) + if gla { smem_gate(d.k) } else { 0 };
        let entry = if rev {
            "lin_state_rev"
        } else {
            "lin_state_fwd"
        };
        let f = function_nw(dev, src, entry, dtype, d, bv, 8, gla, smem)?;
        let z = (d.seqs * p.nseg as usize) as u32;
        launch(
            s,
            &f,
            ((d.v / bv) as u32, d.h as u32, z),
            THREADS,
            smem,
            p,
            "launch linear segment states",
        )?;
        let scan = function_nw(dev, src, "lin_seg_scan", dtype, d, bv, 8, gla, 0)?;
        let cfg = LaunchConfig {
            grid_dim: ((d.k * d.v).div_ceil(256) as u32, d.h as u32, d.seqs as u32),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let dir = rev as i32;
        let mut b = s.launch_builder(&scan);
        b.arg(p).arg(&dir);
        // SAFETY: `p` points at live buffers (the caller's inputs, `Segments::new`'s states of
        // seqs x nseg x H x K x V and seqs x nseg x H f32); the grid is within the limits checked
        // in `validate` (H and seqs <= 65535).
        unsafe { b.launch(cfg) }.map_err(drv("launch linear segment scan"))?;
        Ok(())
    }
}

/// Dynamic shared memory (bytes) of each kernel, the layouts at the top of its source.
fn smem_fwd(k: usize, bv: usize) -> usize {
    (2 * (2 * CHUNK * k + CHUNK * bv) + CHUNK * CHUNK + k * bv) * 2 + 4 * CHUNK * 4
}
fn smem_dv(k: usize, bv: usize) -> usize {
    (2 * (2 * CHUNK * k + CHUNK * bv) + CHUNK * CHUNK + 2 * CHUNK * k + k * bv) * 2 + 3 * CHUNK * 4
}
/// What the gate's variants add (`LIN_GLA`): two stages of gates [64][K] f32; the forward also
/// a [64][K] tile of K o exp(-B) (`smem_gate(k) + CHUNK * k * 2`).
fn smem_gate(k: usize) -> usize {
    2 * CHUNK * k * 4
}
fn smem_seg(k: usize, bv: usize) -> usize {
    2 * (CHUNK * k + CHUNK * bv) * 2 + 4 * CHUNK * 4
}
fn smem_chunk(k: usize, v: usize) -> usize {
    (2 * CHUNK * k + 2 * CHUNK * v + k * v + 2 * CHUNK * CHUNK) * 2 + 2 * CHUNK * 4
}
/// The gate's `lin_bwd_chunk`: Q, K, Q o e^B, K o e^-B [64][K], V, dO [64][V], the state,
/// P and dA, the gates [64][K] f32 and 64 zeros.
fn smem_chunk_gate(k: usize, v: usize) -> usize {
    (4 * CHUNK * k + 2 * CHUNK * v + k * v + 2 * CHUNK * CHUNK) * 2 + CHUNK * k * 4 + CHUNK * 4
}
fn smem_kslice(v: usize) -> usize {
    (2 * (2 * CHUNK * BK + 2 * CHUNK * v) + CHUNK * CHUNK + CHUNK * BK + BK * v) * 2 + 3 * CHUNK * 4
}

/// Compiles (or fetches) kernel `entry` of `src` for this problem's variant (8 warps a block).
fn function(
    dev: &CudaDevice,
    src: (&str, &str),
    entry: &str,
    dtype: DType,
    d: &CoreDims,
    bv: usize,
    smem: usize,
) -> Result<CudaFunction> {
    function_nw(dev, src, entry, dtype, d, bv, 8, false, smem)
}

/// [`function`] with `nw` warps a block (the forward's 16-warp layout) and, with `gla`, the
/// per-key-dimension gate's variant (`LIN_GLA`).
#[allow(clippy::too_many_arguments)]
fn function_nw(
    dev: &CudaDevice,
    (name, src): (&str, &str),
    entry: &str,
    dtype: DType,
    d: &CoreDims,
    bv: usize,
    nw: usize,
    gla: bool,
    smem: usize,
) -> Result<CudaFunction> {
    let mut defines = vec![
        ("LIN_NW".to_string(), nw.to_string()),
        (
            "LA_F16".to_string(),
            ((dtype == DType::F16) as i32).to_string(),
        ),
        ("LIN_K".to_string(), d.k.to_string()),
        ("LIN_V".to_string(), d.v.to_string()),
        ("LIN_BV".to_string(), bv.to_string()),
        ("LIN_BK".to_string(), BK.to_string()),
    ];
    if gla {
        defines.push(("LIN_GLA".to_string(), "1".to_string()));
    }
    let full = || format!("{COMMON}\n{LIN_COMMON}\n{src}");
    dev.function_static(name, entry, full, &defines, smem)
}

fn launch(
    s: &Arc<CudaStream>,
    f: &CudaFunction,
    grid: (u32, u32, u32),
    block: u32,
    smem: usize,
    p: &LinParams,
    what: &'static str,
) -> Result<()> {
    let cfg = LaunchConfig {
        grid_dim: grid,
        block_dim: (block, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let mut b = s.launch_builder(f);
    b.arg(p);
    // SAFETY: every pointer in `p` addresses a live device buffer sized by `validate` (inputs)
    // or allocated here for the problem's shape (outputs); the grid stays within the launch
    // limits checked in `validate`; the shared memory was checked against the device's opt-in
    // limit when the function was loaded.
    unsafe { b.launch(cfg) }.map_err(drv(what))?;
    Ok(())
}

/// Forward: the output `[B, T, H, V]` (q's dtype) and the final state `[seqs, H, K, V]` f32,
/// allocated here, on the device's own stream.
pub fn forward(dev: &CudaDevice, c: &DevCore) -> Result<(DevTensor, CudaSlice<f32>)> {
    let d = c.validate("linear::cuda::forward")?;
    let out = DevTensor::alloc(dev, [d.batch, d.t, d.h, d.v], c.q.dtype)?;
    let fin = dev.alloc_f32(d.state_len())?;
    forward_on(dev, dev.stream(), c, &out, &fin)?;
    Ok((out, fin))
}

/// Checks a caller's output tensor: shape, dtype and the kernels' row alignment.
fn check_output(
    op: &'static str,
    name: &str,
    t: &DevTensor,
    shape: [usize; 4],
    dt: DType,
) -> Result<()> {
    if t.shape != shape || t.dtype != dt {
        return Err(Error::Shape {
            op,
            tensor: name.into(),
            got: t.shape.to_vec(),
            expected: format!("{shape:?} in {dt}"),
        });
    }
    check_aligned(op, name, t)
}

/// Checks a caller's f32 buffer holds at least `want` elements.
fn check_len(op: &'static str, name: &str, x: &CudaSlice<f32>, want: usize) -> Result<()> {
    if x.len() < want {
        return Err(param(
            op,
            format!("`{name}` has {} elements, expected {want}", x.len()),
        ));
    }
    Ok(())
}

/// Forward into the caller's `out [B, T, H, V]` (q's dtype) and `fin [seqs, H, K, V]` f32, on
/// stream `s` (no synchronisation; the per-segment states of a cut problem are allocated
/// stream-ordered on `s`).
pub fn forward_on(
    dev: &CudaDevice,
    s: &Arc<CudaStream>,
    c: &DevCore,
    out: &DevTensor,
    fin: &CudaSlice<f32>,
) -> Result<()> {
    const OP: &str = "linear::cuda::forward";
    let d = c.validate(OP)?;
    check_output(OP, "out", out, [d.batch, d.t, d.h, d.v], c.q.dtype)?;
    check_len(OP, "final_state", fin, d.state_len())?;
    // The gate's forward: 16 warps over the whole state (its shared memory leaves no room for
    // two 8-warp blocks a SM), gates and K o exp(-B) staged beside the tiles.
    let gla = matches!(c.decay, DevDecay::Gate(_));
    if let (true, Some(g)) = (gla, c.decay.slice()) {
        if !ptr(g).is_multiple_of(16) {
            return Err(param(
                OP,
                "the gate `g` must start at a 16-byte aligned address (the kernels copy 16-byte runs)".into(),
            ));
        }
    }
    let (bv, nw) = if gla { (d.v, 16) } else { choose_fwd(&d) };
    let smem = smem_fwd(d.k, bv)
        + if gla {
            smem_gate(d.k) + CHUNK * d.k * 2
        } else {
            0
        };
    let f = function_nw(
        dev,
        ("linear_fwd", LIN_FWD),
        "lin_fwd",
        c.q.dtype,
        &d,
        bv,
        nw,
        gla,
        smem,
    )?;
    let mut p = c.params(&d);
    p.o = tptr(out);
    p.o_s = out.strides();
    p.sfin = ptr(fin);
    let cut = choose_segments(dev, &d, d.v / bv, if nw == 16 { 1 } else { 2 });
    // The state pass has its own slices (8 warps, at most 64 columns: registers).
    let _seg = Segments::prepare(dev, s, &mut p, &d, c.q.dtype, bv.min(64), cut, false)?;
    let grid = ((d.v / bv) as u32, d.h as u32, (d.seqs * cut.1) as u32);
    let threads = 32 * nw as u32;
    launch(s, &f, grid, threads, smem, &p, "launch linear forward")
}

/// Backward of `loss(out, final state)`: `dout [B, T, H, V]` (q's dtype, 16-byte aligned rows)
/// and optionally the gradient of the final state `[seqs, H, K, V]` f32; the gradients are
/// allocated here, on the device's own stream.
pub fn backward(
    dev: &CudaDevice,
    c: &DevCore,
    dout: &DevTensor,
    d_final_state: Option<&CudaSlice<f32>>,
) -> Result<DevGrads> {
    let d = c.validate("linear::cuda::backward")?;
    let dt = c.q.dtype;
    let dq = DevTensor::alloc(dev, [d.batch, d.t, d.h, d.k], dt)?;
    let dk = DevTensor::alloc(dev, [d.batch, d.t, d.hk, d.k], dt)?;
    let dv = DevTensor::alloc(dev, [d.batch, d.t, d.hk, d.v], dt)?;
    let ds0 = dev.alloc_f32(d.state_len())?;
    let dg = match c.decay {
        DevDecay::Token(_) => Some(dev.alloc_f32(d.batch * d.t * d.h)?),
        DevDecay::Gate(_) => Some(dev.alloc_f32(d.batch * d.t * d.h * d.k)?),
        _ => None,
    };
    let out = GradsOut {
        dq: &dq,
        dk: &dk,
        dv: &dv,
        dg: dg.as_ref(),
        d_initial_state: &ds0,
    };
    backward_on(dev, dev.stream(), c, dout, d_final_state, &out)?;
    Ok(DevGrads {
        dq,
        dk,
        dv,
        dg,
        d_initial_state: ds0,
    })
}

/// Where [`backward_on`] writes: `dq` like q, `dk` / `dv` like k / v (contiguous when
/// `Hk < H`: the GQA sums are converted in one flat pass), `dg [B, T, H]` f32 for a per-token
/// decay, `[B, T, H, K]` for the gate (`None` otherwise), `d_initial_state [seqs, H, K, V]` f32.
pub struct GradsOut<'a> {
    pub dq: &'a DevTensor,
    pub dk: &'a DevTensor,
    pub dv: &'a DevTensor,
    pub dg: Option<&'a CudaSlice<f32>>,
    pub d_initial_state: &'a CudaSlice<f32>,
}

/// Backward into the caller's gradient buffers, on stream `s` (scratch for the GQA sums and the
/// per-token `db` is allocated stream-ordered on `s` and freed after the kernels that use it).
pub fn backward_on(
    dev: &CudaDevice,
    s: &Arc<CudaStream>,
    c: &DevCore,
    dout: &DevTensor,
    d_final_state: Option<&CudaSlice<f32>>,
    out: &GradsOut,
) -> Result<()> {
    const OP: &str = "linear::cuda::backward";
    let d = c.validate(OP)?;
    let dt = c.q.dtype;
    check_output(OP, "dout", dout, [d.batch, d.t, d.h, d.v], dt)?;
    if let Some(x) = d_final_state {
        check_len(OP, "d_final_state", x, d.state_len())?;
    }
    let gqa = d.h != d.hk;
    // Decays with a gradient: per token (`db`, `dg` [B, T, H]) and the gate ([B, T, H, K]).
    let gla = matches!(c.decay, DevDecay::Gate(_));
    let token = matches!(c.decay, DevDecay::Token(_)) || gla;
    let gw = if gla { d.k } else { 1 };
    if let (true, Some(g)) = (gla, c.decay.slice()) {
        if !ptr(g).is_multiple_of(16) {
            return Err(param(
                OP,
                "the gate `g` must start at a 16-byte aligned address (the kernels copy 16-byte runs)".into(),
            ));
        }
    }
    let (dq, dk, dv) = (out.dq, out.dk, out.dv);
    check_output(OP, "dq", dq, [d.batch, d.t, d.h, d.k], dt)?;
    check_output(OP, "dk", dk, [d.batch, d.t, d.hk, d.k], dt)?;
    check_output(OP, "dv", dv, [d.batch, d.t, d.hk, d.v], dt)?;
    if gqa {
        for (name, t) in [("dk", dk), ("dv", dv)] {
            let [_, tt, hh, dd] = t.shape;
            if t.strides() != [(tt * hh * dd) as i64, (hh * dd) as i64, dd as i64] {
                return Err(Error::Shape {
                    op: OP,
                    tensor: name.into(),
                    got: t.shape.to_vec(),
                    expected:
                        "a contiguous tensor (grouped-query heads are summed in one flat pass)"
                            .into(),
                });
            }
        }
    }
    check_len(OP, "d_initial_state", out.d_initial_state, d.state_len())?;
    let n_tok = d.batch * d.t;
    match (token, out.dg) {
        (true, Some(g)) => check_len(OP, "dg", g, n_tok * d.h * gw)?,
        (true, None) => {
            return Err(param(
                OP,
                "a per-token decay or gate needs its gradient buffer `dg`".into(),
            ))
        }
        _ => {}
    }
    let bv = choose_bv(&d);
    let zeros = |n: usize| s.alloc_zeros::<f32>(n.max(1)).map_err(drv("alloc"));
    let dk_acc = if gqa {
        Some(zeros(n_tok * d.hk * d.k)?)
    } else {
        None
    };
    let dv_acc = if gqa {
        Some(zeros(n_tok * d.hk * d.v)?)
    } else {
        None
    };
    // db: [B, T, H] for a token decay; for the gate only the final state's term, [seqs, H, K]
    // (the chunk kernel keeps db in shared memory and writes dg itself).
    let db = if gla {
        Some(zeros(d.seqs * d.h * d.k)?)
    } else if token {
        Some(zeros(n_tok * d.h)?)
    } else {
        None
    };

    let mut p = c.params(&d);
    p.dout = tptr(dout);
    p.do_s = dout.strides();
    p.dq = tptr(dq);
    p.dq_s = dq.strides();
    p.dk = tptr(dk);
    p.dk_s = dk.strides();
    p.dv = tptr(dv);
    p.dv_s = dv.strides();
    p.dk_acc = dk_acc.as_ref().map_or(0, ptr);
    p.dv_acc = dv_acc.as_ref().map_or(0, ptr);
    p.dsfin = d_final_state.map_or(0, ptr);
    p.has_dsfin = d_final_state.is_some() as i32;
    p.ds0 = ptr(out.d_initial_state);
    p.db = db.as_ref().map_or(0, ptr);
    p.want_db = token as i32;
    p.gqa_acc = gqa as i32;

    // Cut sequences: states entering and gradients leaving every segment first.
    let cut = choose_segments(dev, &d, d.v / bv, 1);
    let _seg = Segments::prepare(dev, s, &mut p, &d, dt, bv, cut, true)?;

    let src = ("linear_bwd", LIN_BWD);
    let h = d.h as u32;
    let n = (d.seqs * cut.1) as u32;
    let varlen = c.cu_seqlens.is_some();
    // The chunk states, when the chunk-parallel path is chosen and they can be allocated (after
    // trimming the pool once); otherwise the sliced walks.
    // Gates have only the chunk-parallel path: its states may take up to a quarter of the
    // device's memory (the scalar decays fall back to the sliced walks past CHUNK_STATES_MAX).
    let path = if gla {
        let bytes = 2 * chunk_ids(&d, varlen) * d.h * d.k * d.v * 2;
        let most = CHUNK_STATES_MAX.max(dev.mem_info().map_or(0, |(_, total)| total / 4));
        if bytes > most || chunk_ids(&d, varlen) > i32::MAX as usize {
            return Err(param(
                OP,
                format!(
                    "the per-key-dim gate's backward keeps the state of every chunk: {:.1} GiB for \
                     this problem, more than the {:.1} GiB it may take (split the batch)",
                    bytes as f64 / (1u64 << 30) as f64,
                    most as f64 / (1u64 << 30) as f64
                ),
            ));
        }
        BwdPath::Chunked
    } else {
        choose_bwd(&d, varlen, 2)
    };
    let states = match path {
        BwdPath::Chunked => {
            let len = chunk_ids(&d, varlen) * d.h * d.k * d.v;
            // SAFETY: every element a kernel reads is written first: the walks store the state
            // of every chunk id that belongs to a chunk, and lin_bwd_chunk reads only those.
            let alloc = || -> Option<(CudaSlice<u16>, CudaSlice<u16>)> {
                let a = unsafe { s.alloc::<u16>(len.max(1)) }.ok()?;
                let b = unsafe { s.alloc::<u16>(len.max(1)) }.ok()?;
                Some((a, b))
            };
            alloc().or_else(|| {
                dev.trim_pool();
                alloc()
            })
        }
        BwdPath::Sliced => None,
    };
    if gla && states.is_none() {
        return Err(Error::Cuda {
            op: OP,
            msg: "out of device memory for the per-chunk states of the gate's backward".into(),
        });
    }
    // The gate's chunk totals of db, then its carries ([chunk ids, H, K]).
    let dg_tot = if gla {
        p.dg = out.dg.map_or(0, ptr);
        let t = zeros(chunk_ids(&d, varlen) * d.h * d.k)?;
        p.dg_tot = ptr(&t);
        Some(t)
    } else {
        None
    };
    if let Some((cf, cr)) = &states {
        p.chunk_f = ptr(cf);
        p.chunk_r = ptr(cr);
        let seg_src = ("linear_seg", LIN_SEG);
        // + the staging tile of the chunk states (and the gates' stages)
        let sm_seg = smem_seg(d.k, bv) + d.k * bv * 2 + if gla { smem_gate(d.k) } else { 0 };
        for (entry, what) in [
            ("lin_state_fwd_mat", "launch linear chunk states"),
            ("lin_state_rev_mat", "launch linear chunk state gradients"),
        ] {
            let f = function_nw(dev, seg_src, entry, dt, &d, bv, 8, gla, sm_seg)?;
            launch(s, &f, ((d.v / bv) as u32, h, n), THREADS, sm_seg, &p, what)?;
        }
        let sm = if gla {
            smem_chunk_gate(d.k, d.v)
        } else {
            smem_chunk(d.k, d.v)
        };
        let f = function_nw(dev, src, "lin_bwd_chunk", dt, &d, bv, 8, gla, sm)?;
        let ids = chunk_ids(&d, varlen) as u32;
        launch(
            s,
            &f,
            (ids, h, 1),
            THREADS,
            sm,
            &p,
            "launch linear chunk gradients",
        )?;
        if dg_tot.is_some() {
            // dg = the chunk's suffix sums (written above) + the later chunks' totals.
            let f = function_nw(dev, src, "lin_gla_dg_carry", dt, &d, bv, 8, true, 0)?;
            launch(
                s,
                &f,
                (h, d.seqs as u32, 1),
                d.k as u32,
                0,
                &p,
                "launch linear dg carry",
            )?;
            let f = function_nw(dev, src, "lin_gla_dg_add", dt, &d, bv, 8, true, 0)?;
            launch(s, &f, (ids, h, 1), THREADS, 0, &p, "launch linear dg add")?;
        }
    } else {
        let (sm_dv, sm_ks) = (smem_dv(d.k, bv), smem_kslice(d.v));
        let f_dv = function(dev, src, "lin_bwd_dv", dt, &d, bv, sm_dv)?;
        let f_dq = function(dev, src, "lin_bwd_dq", dt, &d, bv, sm_ks)?;
        let f_dk = function(dev, src, "lin_bwd_dk", dt, &d, bv, sm_ks)?;
        let ks = (d.k / BK) as u32;
        launch(
            s,
            &f_dv,
            ((d.v / bv) as u32, h, n),
            THREADS,
            sm_dv,
            &p,
            "launch linear dV",
        )?;
        launch(s, &f_dq, (ks, h, n), THREADS, sm_ks, &p, "launch linear dQ")?;
        launch(s, &f_dk, (ks, h, n), THREADS, sm_ks, &p, "launch linear dK")?;
    }
    if gqa {
        let f = function(dev, src, "lin_f32_to_el", dt, &d, bv, 0)?;
        for (acc, dst) in [(&dk_acc, dk), (&dv_acc, dv)] {
            let acc = acc.as_ref().expect("GQA accumulators");
            let len = acc.len() as i64;
            let blocks = (len as usize).div_ceil(512).clamp(1, dev.sms * 32) as u32;
            let cfg = LaunchConfig {
                grid_dim: (blocks, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let (pa, po) = (ptr(acc), tptr(dst));
            let mut b = s.launch_builder(&f);
            b.arg(&pa).arg(&po).arg(&len);
            // SAFETY: `acc` holds `len` f32 and `dst` (contiguous, checked above) `len` 16-bit
            // elements; `len` is even (head dims are 64 or 128).
            unsafe { b.launch(cfg) }.map_err(drv("launch linear gqa sum"))?;
        }
    }
    if let (true, false, Some(dg)) = (token, gla, out.dg) {
        let f = function(dev, src, "lin_bwd_dg", dt, &d, bv, 0)?;
        let cfg = LaunchConfig {
            grid_dim: (h, d.seqs as u32, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        let pg = ptr(dg);
        let mut b = s.launch_builder(&f);
        b.arg(&p).arg(&pg);
        // SAFETY: `p.db` and `dg` hold B x T x H f32; the grid is (H, seqs) within the limits
        // checked in `validate`.
        unsafe { b.launch(cfg) }.map_err(drv("launch linear dg"))?;
    }
    // The accumulators are freed when this returns: the stream orders the frees after the
    // kernels that read them.
    Ok(())
}

/// One decode step: `q [B, 1, H, K]`, `k [B, 1, Hk, K]`, `v [B, 1, Hk, V]`, the decay of this
/// token (`[H]`, `[B, H]` or the gate `[B, H, K]`), the state `[B, H, K, V]` f32 updated in place;
/// returns `o [B, 1, H, V]` (allocated here, on the device's own stream).
pub fn step(
    dev: &CudaDevice,
    q: &DevTensor,
    k: &DevTensor,
    v: &DevTensor,
    decay: DevDecay,
    scale: f32,
    state: &mut CudaSlice<f32>,
) -> Result<DevTensor> {
    let out = DevTensor::alloc(dev, [q.shape[0], 1, q.shape[2], v.shape[3]], q.dtype)?;
    step_on(dev, dev.stream(), q, k, v, decay, scale, state, &out)?;
    Ok(out)
}

/// [`step`] into the caller's `out [B, 1, H, V]`, on stream `s`. `state` is read and written by
/// the kernel (a caller's buffer seen through a shared handle).
#[allow(clippy::too_many_arguments)]
pub fn step_on(
    dev: &CudaDevice,
    s: &Arc<CudaStream>,
    q: &DevTensor,
    k: &DevTensor,
    v: &DevTensor,
    decay: DevDecay,
    scale: f32,
    state: &CudaSlice<f32>,
    out: &DevTensor,
) -> Result<()> {
    const OP: &str = "linear::cuda::step";
    let c = DevCore {
        q,
        k,
        v,
        decay,
        scale,
        initial_state: None,
        cu_seqlens: None,
    };
    let d = c.validate(OP)?;
    if d.t != 1 {
        return Err(Error::Shape {
            op: OP,
            tensor: "q".into(),
            got: q.shape.to_vec(),
            expected: "one token per sequence: [B, 1, H, K]".into(),
        });
    }
    check_len(OP, "state", state, d.state_len())?;
    check_output(OP, "out", out, [d.batch, 1, d.h, d.v], q.dtype)?;
    if d.batch > 65535 {
        return Err(param(OP, format!("batch {} > 65535", d.batch)));
    }
    let f = function(
        dev,
        ("linear_step", LIN_STEP),
        "lin_step",
        q.dtype,
        &d,
        32,
        0,
    )?;
    let mut p = c.params(&d);
    p.o = tptr(out);
    p.o_s = out.strides();
    p.sfin = ptr(state);
    launch(
        s,
        &f,
        (d.h as u32, d.batch as u32, 1),
        256,
        0,
        &p,
        "launch linear step",
    )
}

// ---- Host wrappers ----------------------------------------------------------------------------

/// A host view on the device: strided views whose rows the kernels can read directly (head dim
/// contiguous, strides multiples of 8) travel as their whole buffer with the same strides; others
/// are gathered contiguous.
struct Uploaded {
    t: DevTensor,
    _keep: Option<CudaSlice<u16>>,
}

fn upload_view(dev: &CudaDevice, op: &'static str, name: &str, v: &TensorView) -> Result<Uploaded> {
    let bits: Vec<u16> = match v.data {
        Slice::BF16(x) => x.iter().map(|e| e.to_bits()).collect(),
        Slice::F16(x) => x.iter().map(|e| e.to_bits()).collect(),
        Slice::F32(_) => {
            return Err(Error::DType {
                op,
                tensor: name.into(),
                got: "f32".into(),
                expected: "bf16 or f16 (the tensor-core kernels; use the CPU oracle for f32)"
                    .into(),
            })
        }
    };
    let direct = v.strides[3] == 1 && v.strides[..3].iter().all(|s| s.is_multiple_of(8));
    if !direct {
        return Ok(Uploaded {
            t: DevTensor::upload(dev, name, v)?,
            _keep: None,
        });
    }
    let buf = dev
        .stream()
        .clone_htod(&bits)
        .map_err(drv("copy to device"))?;
    // SAFETY: `buf` holds the view's whole buffer (every element its strides address, checked
    // when the view was made) and is kept alive next to the borrowing tensor.
    let t =
        unsafe { DevTensor::borrow(dev.stream(), name, ptr(&buf), v.shape, v.strides, v.dtype()) }?;
    Ok(Uploaded {
        t,
        _keep: Some(buf),
    })
}

/// Host-side inputs of a core problem, uploaded.
struct HostUpload {
    q: Uploaded,
    k: Uploaded,
    v: Uploaded,
    g: Option<CudaSlice<f32>>,
    s0: Option<CudaSlice<f32>>,
    cu: Option<CudaSlice<i32>>,
}

impl HostUpload {
    fn new(dev: &CudaDevice, c: &Core, op: &'static str) -> Result<(HostUpload, CoreDims)> {
        let d = c.validate(op)?;
        check_support(op, c.q.dtype(), d.k, d.v)?;
        for (name, x) in [("k", &c.k), ("v", &c.v)] {
            if x.dtype() != c.q.dtype() {
                return Err(Error::DType {
                    op,
                    tensor: name.into(),
                    got: x.dtype().to_string(),
                    expected: format!("{} like q", c.q.dtype()),
                });
            }
        }
        let g = match c.decay {
            Decay::None => None,
            Decay::PerHead(g) | Decay::Token(g) | Decay::Gate(g) => Some(dev.upload(g)?),
        };
        Ok((
            HostUpload {
                q: upload_view(dev, op, "q", &c.q)?,
                k: upload_view(dev, op, "k", &c.k)?,
                v: upload_view(dev, op, "v", &c.v)?,
                g,
                s0: c.initial_state.map(|s| dev.upload(s)).transpose()?,
                cu: c.cu_seqlens.map(|s| dev.upload(s)).transpose()?,
            },
            d,
        ))
    }

    fn core(&self, c: &Core) -> DevCore<'_> {
        let g = self.g.as_ref();
        DevCore {
            q: &self.q.t,
            k: &self.k.t,
            v: &self.v.t,
            decay: match c.decay {
                Decay::None => DevDecay::None,
                Decay::PerHead(_) => DevDecay::PerHead(g.expect("decay")),
                Decay::Token(_) => DevDecay::Token(g.expect("decay")),
                Decay::Gate(_) => DevDecay::Gate(g.expect("decay")),
            },
            scale: c.scale,
            initial_state: self.s0.as_ref(),
            cu_seqlens: self.cu.as_ref(),
        }
    }
}

/// Forward of a host problem: the output `[B, T, H, V]` in q's dtype and the final state.
pub fn forward_host(dev: &CudaDevice, c: &Core) -> Result<(Tensor, Vec<f32>)> {
    let (u, _) = HostUpload::new(dev, c, "linear::cuda::forward")?;
    let (out, fin) = forward(dev, &u.core(c))?;
    Ok((out.download(dev)?, dev.download(&fin)?))
}

/// Gradients of [`backward_host`], on the host.
#[derive(Clone, Debug)]
pub struct HostGrads {
    pub dq: Tensor,
    pub dk: Tensor,
    pub dv: Tensor,
    pub dg: Option<Vec<f32>>,
    pub d_initial_state: Vec<f32>,
}

/// Backward of a host problem: `dout [B, T, H, V]` in q's dtype, optionally the final state's
/// gradient `[seqs, H, K, V]`.
pub fn backward_host(
    dev: &CudaDevice,
    c: &Core,
    dout: &TensorView,
    d_final_state: Option<&[f32]>,
) -> Result<HostGrads> {
    const OP: &str = "linear::cuda::backward";
    let (u, d) = HostUpload::new(dev, c, OP)?;
    if let Some(s) = d_final_state {
        if s.len() != d.state_len() {
            return Err(param(
                OP,
                format!(
                    "d_final_state has {} elements, expected {}",
                    s.len(),
                    d.state_len()
                ),
            ));
        }
    }
    let du = upload_view(dev, OP, "dout", dout)?;
    let ds = d_final_state.map(|s| dev.upload(s)).transpose()?;
    let g = backward(dev, &u.core(c), &du.t, ds.as_ref())?;
    Ok(HostGrads {
        dq: g.dq.download(dev)?,
        dk: g.dk.download(dev)?,
        dv: g.dv.download(dev)?,
        dg: g.dg.as_ref().map(|x| dev.download(x)).transpose()?,
        d_initial_state: dev.download(&g.d_initial_state)?,
    })
}

/// One decode step of a host problem: `q [B, 1, H, K]`, `k`, `v`, the decay (`Token` is `[B, 1,
/// H]`, `Gate` `[B, 1, H, K]`), the state `[B, H, K, V]` updated in place; returns `o [B, 1, H, V]`.
pub fn step_host(
    dev: &CudaDevice,
    q: &TensorView,
    k: &TensorView,
    v: &TensorView,
    decay: Decay,
    scale: f32,
    state: &mut [f32],
) -> Result<Tensor> {
    const OP: &str = "linear::cuda::step";
    // The host checks (shapes, decay sign and length, state length) of the equivalent problem.
    let c = Core {
        q: *q,
        k: *k,
        v: *v,
        decay,
        scale,
        initial_state: Some(state),
        cu_seqlens: None,
    };
    let (u, _) = HostUpload::new(dev, &c, OP)?;
    let mut s = dev.upload(state)?;
    let o = step(dev, &u.q.t, &u.k.t, &u.v.t, u.core(&c).decay, scale, &mut s)?;
    let host = dev.download(&s)?;
    state.copy_from_slice(&host[..state.len()]);
    o.download(dev)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dims(seqs: usize, t: usize, h: usize) -> CoreDims {
        CoreDims {
            batch: seqs,
            t,
            h,
            hk: h,
            k: 128,
            v: 128,
            seqs,
        }
    }

    /// The cut covers every token with chunk-aligned segments, stays within the grid's z limit,
    /// leaves a nearly full wave uncut and fills the waves it makes.
    #[test]
    fn segments_cover_the_sequence_and_fill_the_waves() {
        for &(seqs, t, h, slices, per_sm) in &[
            (1, 16384, 32, 1, 1),
            (1, 65536, 32, 1, 1),
            (4, 32768, 32, 1, 1),
            (1, 1023, 2, 2, 2),
            (3, 4224, 4, 2, 2),
            (1, 1 << 20, 1, 1, 1),
            (1000, 700, 8, 2, 2),
            (1, 64, 32, 1, 1),
        ] {
            let d = dims(seqs, t, h);
            let (len, n) = segments_for(132, &d, slices, per_sm, None);
            let base = slices * h * seqs;
            if n == 1 {
                assert_eq!(len, 0);
                continue;
            }
            assert!(
                base * 10 < 132 * per_sm * 9,
                "cut although one wave is 90% full"
            );
            assert_eq!(len % CHUNK, 0);
            assert!(len >= MIN_SEGMENT, "{len}");
            assert!(n * len >= t && (n - 1) * len < t, "{n} x {len} for {t}");
            assert!(seqs * n <= 65535);
            let blocks = base * n;
            let slots = 132 * per_sm;
            let eff = blocks as f64 / (blocks.div_ceil(slots) * slots) as f64;
            assert!(
                eff >= 0.75 || t < 8 * MIN_SEGMENT,
                "waves {eff:.2} full at {seqs} x {t}"
            );
        }
        // (4, 32k, 32 heads, 16 warps): 128 blocks of 132 slots, one wave: not cut.
        assert_eq!(segments_for(132, &dims(4, 32768, 32), 1, 1, None), (0, 1));
        // (1, 64k, 16 warps): 20 segments of 3328 tokens (640 blocks, 97% of 5 waves; the cut
        // the H200 figures in docs/PERF.md ran with).
        assert_eq!(
            segments_for(132, &dims(1, 65536, 32), 1, 1, None),
            (3328, 20)
        );
    }

    #[test]
    fn forced_segments_round_to_the_chunk_and_respect_the_grid() {
        let d = dims(1, 1000, 2);
        assert_eq!(segments_for(132, &d, 1, 1, Some(0)), (0, 1));
        assert_eq!(segments_for(132, &d, 1, 1, Some(100)), (128, 8));
        assert_eq!(segments_for(132, &d, 1, 1, Some(5000)), (0, 1));
        // 65535 / 3 sequences = 21845 segments at most: 2^20 tokens need segments of >= 64.
        let (len, n) = segments_for(132, &dims(3, 1 << 20, 1), 1, 1, Some(1));
        assert!(3 * n <= 65535 && n * len >= 1 << 20, "{n} x {len}");
    }

    #[test]
    fn chunk_ids_cover_every_chunk_and_the_bound_picks_the_path() {
        // Mirror of lin_chunk_id (linear_common.cuh): ids of every chunk of every sequence are
        // distinct and below chunk_ids, for awkward cu_seqlens (empty and one-token sequences).
        let cu = [0usize, 0, 1, 64, 65, 129, 200, 263, 263, 1000];
        let d = CoreDims {
            seqs: cu.len() - 1,
            ..dims(1, 1000, 2)
        };
        let mut seen = std::collections::HashSet::new();
        for n in 0..d.seqs {
            let mut r0 = cu[n];
            while r0 < cu[n + 1] {
                let id = r0 / CHUNK + n;
                assert!(
                    id < chunk_ids(&d, true),
                    "chunk {r0} of sequence {n}: id {id}"
                );
                assert!(seen.insert(id), "id {id} twice");
                r0 += CHUNK;
            }
        }
        let b = dims(3, 130, 4);
        assert_eq!(chunk_ids(&b, false), 3 * 3);
        // 2 x ids x H x K x V bf16: (1, 64k, 32, 128) takes 2 GiB, (4, 64k, 32, 128) 8 GiB.
        let big = |batch| CoreDims {
            k: 128,
            v: 128,
            ..dims(batch, 1 << 16, 32)
        };
        if std::env::var_os("LONGATTN_LINEAR_BWD").is_none() {
            assert_eq!(choose_bwd(&big(1), false, 2), BwdPath::Chunked);
            assert_eq!(choose_bwd(&big(4), false, 2), BwdPath::Sliced);
        }
    }
}
