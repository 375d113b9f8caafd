//! Dynamic sparse prefill on NVIDIA GPUs: the estimator runs on the device and writes the block
//! schedule the attention kernels read, with no host synchronisation between the inputs and the
//! output (`cuda/kernels/sparse_vs.cu` holds the math).
//!
//! ```text
//!   SparsePlan::new(dev, dims, dtype, params, spec, mask)   // FwdPlan of the mask + scratch
//!   plan.launch_on(stream, q, k, v, out, lse)                // estimate -> schedule -> attention
//!   plan.selection(..)                                       // the schedule on the host (report)
//! ```
//!
//! One path of data: the candidates are the mask's own schedule at the attention kernel's tiles
//! (`FwdPlan::mask_schedule`, uploaded once per plan); the estimator keeps a subset of each
//! row's entries with their kinds (the result is `mask & selection`, exact for the mask part)
//! and writes them in the kernels' CSR form into a buffer sized by the candidates (a bounded
//! entry count); the forward runs through it (`FwdPlan::launch_sched_on`). The selection is
//! made at the kernel's tiles, not at the spec's `block` (the report and `block_mask` give the
//! tiles). Methods on the device: `vertical_slash` (MInference), exactly the CPU estimator's
//! semantics at those tiles ([`super::estimate::vs_keep`]), and `lowbit` (SALE's idea,
//! `cuda/kernels/sparse_lowbit.cu`: int8 keys and queries, every candidate's flag from int8 MMA
//! products against its rows' sink / band maxima, the CPU rule of [`super::lowbit`] in f32);
//! the others give a clear error.
//! Below the spec's `dense_below` keys ([`CUDA_DENSE_BELOW`] when not given) the mask's schedule
//! runs as it is (no estimator).
//!
//! Skip-softmax (`skip=F` on a method, or the `skip(factor=F)` method over the mask's own
//! schedule) runs in the attention kernel (`cuda/kernels/attn_fwd_ws.cu`, `LA_SKIP`) with
//! lambda = F / Sk, not under the dense fallback; the CUDA forward drops a consumer
//! warpgroup's 64 rows x tile keys at once (the CPU: its query block x key-tile group), so the
//! two backends' dropped sets differ while both obey the same per-row bound.
use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};

use super::{estimate, report, Ctx, Doc, Elements, Logit, Method, Selection, SparseSpec};
use crate::attention::{AttnOutput, AttnParams, Dims, MaskSpec};
use crate::cuda::forward::{LaFwdParams, COMMON, PARAMS};
use crate::cuda::{drv, CudaDevice, DevTensor, FwdPlan};
use crate::error::{Error, Result};
use crate::mask::{BlockSchedule, RowMask, TileEntry, TileKind};
use crate::tensor::{DType, TensorView};

pub(super) const SRC: &str = include_str!("../cuda/kernels/sparse_vs.cu");
pub(super) const SRC_LB: &str = include_str!("../cuda/kernels/sparse_lowbit.cu");
pub(super) const SELECT: &str = include_str!("../cuda/kernels/select.cuh");

/// The device's dense fallback when the spec gives no `dense_below`: below this many keys the
/// estimate (a few fixed-cost launches) and a sparse schedule cannot pay against the dense
/// kernel (docs/PERF.md, "Dynamic sparse prefill on the GPU").
pub const CUDA_DENSE_BELOW: usize = 16384;
const OP: &str = "cuda sparse";
/// Most last rows (`SP_L`) and keys per chunk (`SP_KC`) in the kernels.
const SP_L: usize = 64;
const SP_KC: usize = 256;

/// Scratch pointers and arguments; field for field `SpParams` in `sparse_vs.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct SpParams {
    stats: u64,
    lse: u64,
    col: u64,
    diag: u64,
    cp: u64,
    dp: u64,
    cnt: u64,
    off: u64,
    ent: u64,
    thr: u64,
    seg: u64,
    flag: u64,
    last: i32,
    nchunks: i32,
    nv: i32,
    ns: i32,
    sink: i32,
    local: i32,
    k_tiles: i32,
    vec: i32,
    nseg: i32,
    ncand: i32,
}

// SAFETY: plain-old-data with the C layout of the kernels' parameter struct.
unsafe impl cudarc::driver::DeviceRepr for SpParams {}

/// Scratch pointers and arguments of the low-bit estimator; field for field `LbParams` in
/// `sparse_lowbit.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct LbParams {
    mu_part: u64,
    mu: u64,
    kq: u64,
    ks: u64,
    qq: u64,
    qs: u64,
    qmu: u64,
    flag: u64,
    log2_tau: f32,
    sink: i32,
    local: i32,
    nkc: i32,
    kgroups: i32,
    ncand: i32,
}

// SAFETY: plain-old-data with the C layout of the kernels' parameter struct.
unsafe impl cudarc::driver::DeviceRepr for LbParams {}

/// Keys per chunk of the low-bit estimator's key mean (`LB_KC`).
pub(super) const LB_KC: usize = 512;

/// The device estimator of a spec: vertical-slash `[v, s, last, sink, local]`, or low-bit.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Est {
    Vs([usize; 5]),
    LowBit { tau: f64, sink: usize, local: usize },
}

/// Lines per block of the flag / prefix kernels (`SP_SEG`).
const SP_SEG: usize = 4096;

/// Segments of the longer line kind (diagonals: Sq + Sk - 1).
fn nseg(d: &Dims) -> usize {
    (d.sq + d.sk - 1).div_ceil(SP_SEG)
}

fn param(msg: String) -> Error {
    Error::Param { op: OP, msg }
}

/// The device estimator of `spec`, or the error naming why there is none.
fn est_of(spec: &SparseSpec) -> Result<Est> {
    match spec.method {
        Method::LowBit { tau, sink, local } => {
            let big = |x: usize| x.min(i32::MAX as usize);
            Ok(Est::LowBit {
                tau,
                sink: big(sink),
                local: big(local),
            })
        }
        _ => vs_args(spec).map(Est::Vs),
    }
}

/// Vertical-slash arguments: [v, s, last, sink, local].
fn vs_args(spec: &SparseSpec) -> Result<[usize; 5]> {
    match spec.method {
        Method::VerticalSlash {
            v,
            s,
            last,
            sink,
            local,
        } => {
            if last > SP_L {
                return Err(param(format!(
                    "vertical_slash last={last}: the CUDA estimator takes at most {SP_L} last rows"
                )));
            }
            let big = |x: usize| x.min(i32::MAX as usize);
            Ok([big(v), big(s), last, big(sink), big(local)])
        }
        _ => Err(param(format!(
            "`{spec}` has no CUDA estimator yet (the CPU backend has it; on CUDA: vertical_slash, lowbit)"
        ))),
    }
}

/// The device estimator takes the last rows of the whole batch row: under a mask with document
/// ids it would apply the last document's columns and diagonals to every document, where the
/// CPU estimator works per document ([`super::documents`]). Refused rather than different.
pub(super) fn refuse_documents(mask: &MaskSpec) -> Result<()> {
    match mask {
        MaskSpec::Expr(b) if b.docs.is_some() => Err(param(format!(
            "mask `{}` has document ids: the CUDA estimator estimates over the whole packed sequence, not per document (select on the CPU, --backend cpu, or set dense_below above Sk to run the mask dense)",
            b.expr()
        ))),
        _ => Ok(()),
    }
}

/// Milliseconds `f`'s launches take on `s`, between two CUDA events (waits for the second).
pub(super) fn time_on(s: &Arc<CudaStream>, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
    let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let e0 = s.record_event(flags).map_err(drv("event"))?;
    f()?;
    let e1 = s.record_event(flags).map_err(drv("event"))?;
    Ok(e0.elapsed_ms(&e1).map_err(drv("event"))? as f64)
}

/// The scan kernel's parameters (`sp_scan` reads `cnt` and writes `off`; nothing else).
pub(super) fn scan_params(cnt: u64, off: u64) -> SpParams {
    SpParams {
        cnt,
        off,
        ..Default::default()
    }
}

/// Wraps each launch of the estimator: `around(stage name, launch)` (timing, or just calling).
pub(super) type Around<'a> =
    dyn FnMut(&'static str, &mut dyn FnMut() -> Result<()>) -> Result<()> + 'a;

/// Whether the device estimator takes `spec` (its method and arguments; lengths aside): the
/// error a plan would give, before any device is opened.
pub fn check_spec(spec: &SparseSpec) -> Result<()> {
    spec.check()?;
    if spec.with.is_some() {
        return Err(param(format!(
            "`{spec}`: unions of methods (`A + B`) are selected on the CPU only (--backend cpu)"
        )));
    }
    if spec.dense_last > 0 {
        return Err(param(
            "`dense_last` runs on the CPU only: the device estimator has no dense rows yet (--backend cpu)".into(),
        ));
    }
    if spec.element {
        return Err(param(
            "element-level lines (`element=1`) run on the CPU only: the device schedule keeps whole tiles (drop `element=1`, or select on the CPU, --backend cpu)".into(),
        ));
    }
    if spec.method != Method::Whole {
        est_of(spec)?;
    }
    Ok(())
}

/// Device buffers of the estimator and the selected schedule.
struct Scratch {
    stats: CudaSlice<f32>,
    lse: CudaSlice<f32>,
    col: CudaSlice<f32>,
    diag: CudaSlice<f32>,
    cp: CudaSlice<u32>,
    dp: CudaSlice<u32>,
    cnt: CudaSlice<u32>,
    off: CudaSlice<u32>,
    ent: CudaSlice<u32>,
    thr: CudaSlice<i32>,
    seg: CudaSlice<u32>,
    /// The low-bit estimator's buffers (the vertical-slash ones above are then of length 1).
    lb: Option<LbScratch>,
}

/// Buffers of the low-bit estimator (`LbParams`).
pub(super) struct LbScratch {
    mu_part: CudaSlice<f32>,
    mu: CudaSlice<f32>,
    kq: CudaSlice<u8>,
    ks: CudaSlice<f32>,
    qq: CudaSlice<u8>,
    qs: CudaSlice<f32>,
    qmu: CudaSlice<f32>,
    flag: CudaSlice<u8>,
}

impl LbScratch {
    /// The int8 side of q and k (`sparse_lowbit.cu`'s quantizers write it) for `dims`, the
    /// head dim rounded up to `d32`, and `flags` kept flags (`sp_lb_score`'s; 1 when unused).
    pub(super) fn alloc(
        s: &Arc<CudaStream>,
        dims: &Dims,
        d32: usize,
        flags: usize,
    ) -> Result<LbScratch> {
        let zf = |n: usize| s.alloc_zeros::<f32>(n.max(1)).map_err(drv("alloc"));
        let zb = |n: usize| s.alloc_zeros::<u8>(n.max(1)).map_err(drv("alloc"));
        let (bh, bhk, d) = (dims.batch * dims.hq, dims.batch * dims.hk, dims.d);
        let kgroups = dims.sk.div_ceil(64);
        Ok(LbScratch {
            mu_part: zf(bhk * dims.sk.div_ceil(LB_KC) * d)?,
            mu: zf(bhk * d)?,
            kq: zb(bhk * kgroups * 64 * d32)?,
            ks: zf(bhk * kgroups)?,
            qq: zb(bh * dims.sq * d32)?,
            qs: zf(bh * dims.sq)?,
            qmu: zf(bh * dims.sq)?,
            flag: zb(flags)?,
        })
    }

    /// `LbParams` over these buffers (the selection's arguments zero: set by the caller).
    pub(super) fn params(&self, s: &Arc<CudaStream>, dims: &Dims) -> LbParams {
        let f = |b: &CudaSlice<f32>| b.device_ptr(s).0;
        LbParams {
            mu_part: f(&self.mu_part),
            mu: f(&self.mu),
            kq: self.kq.device_ptr(s).0,
            ks: f(&self.ks),
            qq: self.qq.device_ptr(s).0,
            qs: f(&self.qs),
            qmu: f(&self.qmu),
            flag: self.flag.device_ptr(s).0,
            nkc: dims.sk.div_ceil(LB_KC) as i32,
            kgroups: dims.sk.div_ceil(64) as i32,
            ..Default::default()
        }
    }

    /// Queues the quantizers, each stage inside `around` (profiling): the key mean, int8 keys
    /// per 64-key group, int8 query rows with q . mu (`f` = sp_lb_mean_part, sp_lb_mean,
    /// sp_lb_quant_k, sp_lb_quant_q).
    pub(super) fn quantize(
        s: &Arc<CudaStream>,
        f: [&CudaFunction; 4],
        p: &LaFwdParams,
        lp: &LbParams,
        dims: &Dims,
        around: &mut Around,
    ) -> Result<()> {
        let (bh, bhk) = ((dims.batch * dims.hq) as u32, (dims.batch * dims.hk) as u32);
        let launch = |x: usize, grid: (u32, u32), threads: u32| -> Result<()> {
            let mut b = s.launch_builder(f[x]);
            b.arg(p);
            b.arg(lp);
            // SAFETY: LbParams matches the kernels' struct; its buffers sized by `alloc` for
            // these dims, q / k device tensors of them (the caller's plan contract).
            unsafe {
                b.launch(LaunchConfig {
                    grid_dim: (grid.0, grid.1, 1),
                    block_dim: (threads, 1, 1),
                    shared_mem_bytes: 0,
                })
            }
            .map(|_| ())
            .map_err(drv("launch int8 quantizer"))
        };
        around("key mean", &mut || {
            launch(0, (lp.nkc as u32, bhk), 128)?;
            launch(1, (bhk, 1), 128)
        })?;
        around("int8 keys", &mut || {
            launch(2, (lp.kgroups as u32, bhk), 256)
        })?;
        around("int8 queries", &mut || {
            launch(3, (dims.sq.div_ceil(8) as u32, bh), 256)
        })
    }
}

/// The low-bit estimator's kernels (`sparse_lowbit.cu`).
struct LbKernels {
    mean_part: CudaFunction,
    mean: CudaFunction,
    quant_k: CudaFunction,
    quant_q: CudaFunction,
    score: CudaFunction,
}

/// The kernels of one (dtype, head dim, tiles, mask program) variant.
struct Kernels {
    stats: CudaFunction,
    lse: CudaFunction,
    mass: CudaFunction,
    select: CudaFunction,
    flags: CudaFunction,
    prefix: CudaFunction,
    coarsen: CudaFunction,
    scan: CudaFunction,
    lb: Option<LbKernels>,
}

/// Sparse attention forward of one problem on the device: the mask's forward plan, the
/// estimator's kernels and scratch.
pub struct SparsePlan {
    dev: Arc<CudaDevice>,
    fwd: FwdPlan,
    dims: Dims,
    /// No estimator runs (fewer keys than `dense_below`, or the `skip` method): the mask's
    /// schedule as it is.
    pub fallback: bool,
    /// Fewer keys than `dense_below`: the dense fallback (no skip-softmax either).
    short: bool,
    est: Est,
    k: Option<(Kernels, Scratch)>,
    /// Schedule rows (B Hq q_tiles) and the entry bound (the candidates' count).
    rows: usize,
    cap: usize,
    nchunks: usize,
    /// Dynamic shared memory of sp_vs_stats, sp_vs_mass and sp_lb_score.
    smem: (usize, usize, usize),
    /// Warps of sp_lb_score (`LB_WARPS`).
    lb_warps: usize,
}

impl SparsePlan {
    pub fn new(
        dev: &Arc<CudaDevice>,
        dims: Dims,
        dtype: DType,
        params: &AttnParams,
        spec: &SparseSpec,
        mask: MaskSpec,
    ) -> Result<SparsePlan> {
        check_spec(spec)?;
        let short = dims.sk < spec.dense_below_or(CUDA_DENSE_BELOW);
        let fallback = short || spec.method == Method::Whole;
        let est = if fallback {
            Est::Vs([0; 5])
        } else {
            est_of(spec)?
        };
        let lowbit = matches!(est, Est::LowBit { .. });
        if !fallback {
            refuse_documents(&mask)?;
        }
        // Skip-softmax (`skip=F`, or the `skip` method) in the forward through the selection,
        // lambda = F / Sk, as on the CPU (`Selection::params`): not under the dense fallback.
        let mut params = params.clone();
        params.skip_below = if short {
            None
        } else {
            spec.skip_below(dims.sk)?
        };
        let fwd = FwdPlan::new(dev, dims, dtype, &params, mask)?;
        let (br, bc) = (fwd.tile.br, fwd.tile.bc);
        let q_tiles = dims.sq.div_ceil(br);
        let rows = dims.batch * dims.hq * q_tiles;
        let cand = fwd.mask_schedule();
        let copies = (dims.batch / cand.batch) * (dims.hq / cand.heads);
        let cap = cand.entries().len() * copies;
        let nchunks = dims.sk.div_ceil(SP_KC);
        let d = dims.d;
        // sizeof(SpSmem): q and k tiles of 64 padded rows (16-bit), the kind table, the
        // cross-warp (max, sum) pairs.
        let base = 2 * 2 * 64 * (d + 8) + 4 * ((SP_KC + SP_L) / 16 + 4) + 2 * SP_L * 2 * 4;
        // sizeof(LbSmem): int8 queries of the tile's 64-row windows and each warp's two key
        // groups (rows of D32 + 16 bytes), per-row scale, q . mu and reference maximum, the
        // warps' partial maxima. 8 warps up to D 128, 4 above (the rings' shared memory).
        let (d32, nwin) = (d.div_ceil(32) * 32, br.div_ceil(64));
        let lb_warps = if d32 <= 128 { 8 } else { 4 };
        // Key groups in flight per warp and blocks per SM the registers are capped for
        // (`LONGATTN_LOWBIT=stages,minb`, tuning runs). H100, 16k / 64k tile scores ms: 2
        // stages, 1 block (172 KB, 212 registers) 4.083 / 48.100; 1 stage, 2 blocks (128
        // registers) 2.974 / 37.414; 1 stage, 1 block 4.147 / 48.366: the warps, not the
        // prefetch, hide the latency.
        let (lb_stages, lb_minb) = match crate::cuda::forward::env_list("LONGATTN_LOWBIT")[..] {
            [st, mb] if (1..=2).contains(&st) && (1..=2).contains(&mb) => (st, mb),
            _ => (1, 2),
        };
        // Behind it the kind table of a schedule row (one byte per key tile).
        let lb_smem = (nwin * 64 + lb_warps * lb_stages * 64) * (d32 + 16)
            + (3 + lb_warps) * nwin * 64 * 4
            + dims.sk.div_ceil(bc).div_ceil(16) * 16;
        // sp_vs_mass adds its column and diagonal sums behind it.
        let smem = (base, base + 4 * (2 * SP_KC + SP_L), lb_smem);
        let mut plan = SparsePlan {
            dev: dev.clone(),
            dims,
            fallback,
            short,
            est,
            k: None,
            rows,
            cap,
            nchunks,
            smem,
            lb_warps,
            fwd,
        };
        if fallback {
            return Ok(plan);
        }
        if br < 32 {
            return Err(param(format!(
                "query tiles of {br} rows: the estimator needs at least 32"
            )));
        }
        if dims.batch * dims.hq > 65535 || q_tiles > 65535 || nchunks > 65535 {
            return Err(param(format!(
                "grid: batch x heads {} and query tiles {q_tiles} must be <= 65535",
                dims.batch * dims.hq
            )));
        }
        if lowbit && smem.2 > dev.smem_optin {
            return Err(param(format!(
                "lowbit over {} keys: the estimator's shared memory ({} bytes with a byte per key tile) exceeds the device's {}",
                dims.sk, smem.2, dev.smem_optin
            )));
        }
        if plan.fwd.uses_mask_bits() {
            return Err(param(
                "masks whose Partial tiles read a bit table (2-D neighborhoods, dealt documents) cannot take a device-written schedule yet".into(),
            ));
        }
        if (dims.sq + dims.sk) as u64 * (dims.batch * dims.hq) as u64 > u32::MAX as u64 {
            return Err(param(
                "sequence too long for the estimator's 32-bit counts".into(),
            ));
        }
        let src = format!(
            "{COMMON}\n{PARAMS}\n{}\n{SELECT}\n{SRC}\n{}",
            plan.fwd.mask_program(),
            if lowbit { SRC_LB } else { "" }
        );
        let defines: Vec<(String, String)> = vec![
            ("LA_F16".into(), ((dtype == DType::F16) as u8).to_string()),
            ("LA_D".into(), d.to_string()),
            ("LA_BR".into(), br.to_string()),
            ("LA_BC".into(), bc.to_string()),
            (
                "LA_SOFTCAP".into(),
                (params.softcap.is_some() as u8).to_string(),
            ),
            ("LB_D32".into(), d32.to_string()),
            ("LB_WARPS".into(), lb_warps.to_string()),
            ("LB_STAGES".into(), lb_stages.to_string()),
            ("LB_MINB".into(), lb_minb.to_string()),
        ];
        let variant = format!(
            "sparse_{}_{}_d{d}_{br}x{bc}",
            if lowbit { "lowbit" } else { "vs" },
            dtype.name()
        );
        let f = |entry: &str, smem: usize| dev.function(&variant, entry, &src, &defines, smem);
        let kernels = Kernels {
            stats: f("sp_vs_stats", smem.0)?,
            lse: f("sp_vs_lse", 0)?,
            mass: f("sp_vs_mass", smem.1)?,
            select: f("sp_vs_select", 0)?,
            flags: f("sp_vs_flags", 0)?,
            prefix: f("sp_vs_prefix", 0)?,
            coarsen: f("sp_coarsen", 0)?,
            scan: f("sp_scan", 0)?,
            lb: match lowbit {
                false => None,
                true => Some(LbKernels {
                    mean_part: f("sp_lb_mean_part", 0)?,
                    mean: f("sp_lb_mean", 0)?,
                    quant_k: f("sp_lb_quant_k", 0)?,
                    quant_q: f("sp_lb_quant_q", 0)?,
                    // The kind table grows with Sk: the variant's function allows the device's
                    // whole opt-in (launches pass their own size).
                    score: f("sp_lb_score", dev.smem_optin)?,
                }),
            },
        };
        let bh = dims.batch * dims.hq;
        let nd = dims.sq + dims.sk - 1;
        let s = dev.stream();
        let zf = |n: usize| s.alloc_zeros::<f32>(n.max(1)).map_err(drv("alloc"));
        let zu = |n: usize| s.alloc_zeros::<u32>(n.max(1)).map_err(drv("alloc"));
        // The vertical-slash buffers (length 1 under low-bit, which does not read them).
        let vs = |n: usize| if lowbit { 1 } else { n };
        let lb = match lowbit {
            false => None,
            true => Some(LbScratch::alloc(s, &dims, d32, cap)?),
        };
        let scratch = Scratch {
            stats: zf(vs(bh * nchunks * SP_L * 2))?,
            lse: zf(vs(bh * SP_L))?,
            col: zf(vs(bh * dims.sk))?,
            diag: zf(vs(bh * nd))?,
            cp: zu(vs(bh * (dims.sk + 1)))?,
            dp: zu(vs(bh * (nd + 1)))?,
            cnt: zu(rows)?,
            off: zu(rows + 1)?,
            ent: zu(cap)?,
            thr: s.alloc_zeros::<i32>(vs(bh * 4)).map_err(drv("alloc"))?,
            seg: zu(vs(bh * 2 * nseg(&dims)))?,
            lb,
        };
        plan.k = Some((kernels, scratch));
        Ok(plan)
    }

    /// Skip-softmax's counters since the last call (key tiles tested, dropped); None without
    /// skip-softmax. Waits for the device ([`FwdPlan::take_skip_stats`]).
    pub fn take_skip_stats(&mut self) -> Result<Option<(u64, u64)>> {
        self.fwd.take_skip_stats()
    }

    /// The attention kernel's tiles (query rows, keys): the selection's tiles.
    pub fn tiles(&self) -> (usize, usize) {
        (self.fwd.tile.br, self.fwd.tile.bc)
    }

    /// Queues the estimator and the schedule build on `s` (nothing when the plan falls back to
    /// dense): after it, the device holds the selected schedule.
    pub fn launch_select_on(
        &mut self,
        s: &Arc<CudaStream>,
        q: &DevTensor,
        k: &DevTensor,
    ) -> Result<()> {
        self.stages(s, q, k, &mut |_, f| f())
    }

    /// [`Self::launch_select_on`] with each stage timed by CUDA events (synchronises): (stage,
    /// ms) in launch order.
    pub fn profile_select_on(
        &mut self,
        s: &Arc<CudaStream>,
        q: &DevTensor,
        k: &DevTensor,
    ) -> Result<Vec<(&'static str, f64)>> {
        let mut out = Vec::new();
        self.stages(s, q, k, &mut |name, f| {
            out.push((name, time_on(s, f)?));
            Ok(())
        })?;
        Ok(out)
    }

    /// The estimator's launches, each through `around(stage name, launch)`.
    fn stages(
        &mut self,
        s: &Arc<CudaStream>,
        q: &DevTensor,
        k: &DevTensor,
        around: &mut Around,
    ) -> Result<()> {
        let Some((kern, sc)) = &mut self.k else {
            return Ok(());
        };
        let p: LaFwdParams = self.fwd.params_for(s, q, k);
        let [v, sl, last, sink, local] = match self.est {
            Est::Vs(a) => a,
            Est::LowBit { sink, local, .. } => [0, 0, 0, sink, local],
        };
        let ncand = self.fwd.mask_schedule().entries().len();
        let ptr_f = |x: &CudaSlice<f32>| x.device_ptr(s).0;
        let ptr_u = |x: &CudaSlice<u32>| x.device_ptr(s).0;
        let sp = SpParams {
            stats: ptr_f(&sc.stats),
            lse: ptr_f(&sc.lse),
            col: ptr_f(&sc.col),
            diag: ptr_f(&sc.diag),
            cp: ptr_u(&sc.cp),
            dp: ptr_u(&sc.dp),
            cnt: ptr_u(&sc.cnt),
            off: ptr_u(&sc.off),
            ent: ptr_u(&sc.ent),
            thr: sc.thr.device_ptr(s).0,
            seg: ptr_u(&sc.seg),
            flag: sc.lb.as_ref().map_or(0, |l| l.flag.device_ptr(s).0),
            last: last as i32,
            nchunks: self.nchunks as i32,
            nv: v as i32,
            ns: sl as i32,
            sink: sink as i32,
            local: local as i32,
            k_tiles: self.dims.sk.div_ceil(self.fwd.tile.bc) as i32,
            vec: (q.tma_aligned() && k.tma_aligned()) as i32,
            nseg: nseg(&self.dims) as i32,
            ncand: ncand as i32,
        };
        let bh = (self.dims.batch * self.dims.hq) as u32;
        let q_tiles = self.dims.sq.div_ceil(self.fwd.tile.br) as u32;
        let cfg = |grid: (u32, u32, u32), threads: u32, smem: usize| LaunchConfig {
            grid_dim: grid,
            block_dim: (threads, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let nch = self.nchunks as u32;
        let rows = self.rows as i32;
        let smem = self.smem;
        // SAFETY (every launch below): the parameter structs match the kernels'; every pointer
        // is a live allocation of the size the kernels index (scratch sized in `new` from the
        // same dims; q / k are device tensors of these dims, the forward plan's contract).
        let launch = |f: &CudaFunction, c: LaunchConfig, extra: Option<i32>| -> Result<()> {
            let mut b = s.launch_builder(f);
            b.arg(&p);
            b.arg(&sp);
            if let Some(x) = &extra {
                b.arg(x);
            }
            unsafe { b.launch(c) }
                .map(|_| ())
                .map_err(drv("launch sparse estimator"))
        };
        match (self.est, &kern.lb, &sc.lb) {
            (Est::LowBit { tau, sink, local }, Some(lk), Some(ls)) => {
                let d = &self.dims;
                let lp = LbParams {
                    log2_tau: tau.log2() as f32,
                    sink: sink as i32,
                    local: local as i32,
                    ncand: ncand as i32,
                    ..ls.params(s, d)
                };
                LbScratch::quantize(
                    s,
                    [&lk.mean_part, &lk.mean, &lk.quant_k, &lk.quant_q],
                    &p,
                    &lp,
                    d,
                    around,
                )?;
                around("tile scores", &mut || {
                    let threads = 32 * self.lb_warps as u32;
                    let mut b = s.launch_builder(&lk.score);
                    b.arg(&p);
                    b.arg(&sp);
                    b.arg(&lp);
                    // SAFETY: as above (LbParams matches the kernels'; its buffers sized in `new`).
                    unsafe { b.launch(cfg((q_tiles, bh, 1), threads, smem.2)) }
                        .map(|_| ())
                        .map_err(drv("launch sparse estimator"))
                })?;
            }
            _ => {
                // Diagonals no row meets keep mass 0 (the mass kernel writes only the others).
                around("zero diagonals", &mut || {
                    s.memset_zeros(&mut sc.diag).map_err(drv("memset"))
                })?;
                around("row stats", &mut || {
                    launch(&kern.stats, cfg((nch, bh, 1), 256, smem.0), None)
                })?;
                around("row LSE", &mut || {
                    launch(&kern.lse, cfg((bh, 1, 1), SP_L as u32, 0), None)
                })?;
                around("masses", &mut || {
                    launch(&kern.mass, cfg((nch, bh, 1), 256, smem.1), None)
                })?;
                let ns = nseg(&self.dims) as u32;
                around("top lines", &mut || {
                    launch(&kern.select, cfg((bh, 2, 1), 1024, 0), None)?;
                    launch(&kern.flags, cfg((ns, bh, 2), 1024, 0), None)?;
                    launch(&kern.prefix, cfg((ns, bh, 2), 1024, 0), None)
                })?;
            }
        }
        around("coarsen: count", &mut || {
            launch(&kern.coarsen, cfg((q_tiles, bh, 1), 128, 0), Some(0))
        })?;
        around("scan", &mut || {
            let mut b = s.launch_builder(&kern.scan);
            b.arg(&sp);
            b.arg(&rows);
            // SAFETY: as above.
            unsafe { b.launch(cfg((1, 1, 1), 1024, 0)) }
                .map(|_| ())
                .map_err(drv("launch sparse estimator"))
        })?;
        around("coarsen: write", &mut || {
            launch(&kern.coarsen, cfg((q_tiles, bh, 1), 128, 0), Some(1))
        })?;
        Ok(())
    }

    /// Estimate, build the schedule and run the attention through it, all queued on `s`.
    pub fn launch_on(
        &mut self,
        s: &Arc<CudaStream>,
        q: &DevTensor,
        k: &DevTensor,
        v: &DevTensor,
        o: &mut DevTensor,
        lse: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.launch_select_on(s, q, k)?;
        self.launch_attention_on(s, q, k, v, o, lse)
    }

    /// The attention through the schedule the last [`Self::launch_select_on`] wrote (the
    /// mask's own under the dense fallback).
    pub fn launch_attention_on(
        &self,
        s: &Arc<CudaStream>,
        q: &DevTensor,
        k: &DevTensor,
        v: &DevTensor,
        o: &mut DevTensor,
        lse: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let sched = self
            .k
            .as_ref()
            .map(|(_, sc)| (sc.off.device_ptr(s).0, sc.ent.device_ptr(s).0));
        self.fwd
            .launch_sched_on(s, q, k, v, o, lse, sched, None, None)
    }

    /// The selected schedule on the host (synchronises the device's stream): batch B, heads Hq,
    /// the kernel's tiles.
    pub fn schedule(&self) -> Result<BlockSchedule> {
        let cand = self.fwd.mask_schedule();
        let d = &self.dims;
        let Some((_, sc)) = &self.k else {
            // The mask's schedule, expanded to every (batch row, head).
            let rows = (0..d.batch * d.hq).flat_map(|r| {
                (0..cand.q_tiles).map(move |qt| cand.row(r / d.hq, r % d.hq, qt).to_vec())
            });
            return BlockSchedule::from_rows(
                cand.tile_q,
                cand.tile_k,
                d.sq,
                d.sk,
                d.batch,
                d.hq,
                rows,
            );
        };
        let off = self.dev.download(&sc.off)?;
        let ent = self.dev.download(&sc.ent)?;
        let n = off[self.rows] as usize;
        if n > self.cap {
            return Err(param(format!(
                "the device schedule holds {n} entries, more than its bound {}",
                self.cap
            )));
        }
        let rows = (0..self.rows).map(|r| {
            ent[off[r] as usize..off[r + 1] as usize]
                .iter()
                .map(|&e| TileEntry {
                    k_tile: e >> 1,
                    kind: if e & 1 == 1 {
                        TileKind::Partial
                    } else {
                        TileKind::Full
                    },
                })
                .collect::<Vec<_>>()
        });
        BlockSchedule::from_rows(cand.tile_q, cand.tile_k, d.sq, d.sk, d.batch, d.hq, rows)
    }

    /// The estimator's column masses `[B Hq, Sk]` and diagonal masses `[B Hq, Sq + Sk - 1]` of
    /// the last launch (synchronises; tests). `None` under the dense fallback.
    pub fn masses(&self) -> Result<Option<(Vec<f32>, Vec<f32>)>> {
        match &self.k {
            None => Ok(None),
            Some((_, sc)) => Ok(Some((
                self.dev.download(&sc.col)?,
                self.dev.download(&sc.diag)?,
            ))),
        }
    }

    /// [`Self::selection`] after a forward through it, with skip-softmax's counters of the
    /// launches since they were last taken ([`Self::take_skip_stats`]) as its `skipped`.
    pub fn selection_after_forward<'a>(
        &mut self,
        rows: Option<&'a dyn RowMask>,
    ) -> Result<Selection<'a>> {
        let mut sel = self.selection(rows)?;
        sel.skipped = self.take_skip_stats()?;
        Ok(sel)
    }

    /// The last launch's selection with its report (synchronises): candidates are the mask's
    /// schedule at the kernel's tiles, `rows` the mask's element rule.
    pub fn selection<'a>(&self, rows: Option<&'a dyn RowMask>) -> Result<Selection<'a>> {
        let schedule = self.schedule()?;
        let cand = self.fwd.mask_schedule().clone();
        let report = report((&schedule, rows), (&cand, rows), &self.dims);
        Ok(Selection {
            schedule,
            candidates: std::borrow::Cow::Owned(cand),
            rows,
            lines: None,
            report,
            fallback: self.short,
            skipped: None,
        })
    }
}

/// The mask's element rule for reports: the bound expression's rows, none for `Full`.
fn rows_of<'a>(mask: &MaskSpec<'a>) -> Option<&'a dyn RowMask> {
    match *mask {
        MaskSpec::Expr(b) => Some(b as &dyn RowMask),
        MaskSpec::Schedule { rows, .. } => rows,
        MaskSpec::Gated { mask, .. } => Some(mask as &dyn RowMask),
        MaskSpec::Full => None,
    }
}

/// Uploads q, k, v, selects and attends on the device, waits, and returns the plan (its
/// selection and masses stay readable) with the output and LSE.
pub(super) fn run_host(
    dev: &Arc<CudaDevice>,
    [q, k, v]: [&TensorView; 3],
    params: &AttnParams,
    spec: &SparseSpec,
    mask: MaskSpec,
) -> Result<(SparsePlan, AttnOutput)> {
    let dims = crate::attention::validate(OP, q, k, v)?;
    let mut plan = SparsePlan::new(dev, dims, q.dtype(), params, spec, mask)?;
    let (qd, kd, vd) = (
        DevTensor::upload(dev, "q", q)?,
        DevTensor::upload(dev, "k", k)?,
        DevTensor::upload(dev, "v", v)?,
    );
    let mut o = DevTensor::alloc(dev, [dims.batch, dims.sq, dims.hq, dims.dv], q.dtype())?;
    let mut lse = dev.alloc_f32(dims.batch * dims.hq * dims.sq)?;
    plan.launch_on(dev.stream(), &qd, &kd, &vd, &mut o, &mut lse)?;
    dev.synchronize()?;
    let out = AttnOutput {
        out: o.download(dev)?,
        lse: dev.download(&lse)?,
    };
    Ok((plan, out))
}

/// Host in, host out (the CLI and the selftest): uploads q, k, v, selects and attends on the
/// device, returns the output, the LSE and the selection.
pub fn forward<'a>(
    dev: &Arc<CudaDevice>,
    q: &TensorView,
    k: &TensorView,
    v: &TensorView,
    params: &AttnParams,
    spec: &SparseSpec,
    mask: MaskSpec<'a>,
) -> Result<(AttnOutput, Selection<'a>)> {
    let rows = rows_of(&mask);
    let (mut plan, out) = run_host(dev, [q, k, v], params, spec, mask)?;
    Ok((out, plan.selection_after_forward(rows)?))
}

/// The CPU estimators' context for a device check: the whole batch row one document, the
/// device's candidates (the mask's schedule at the kernel's tiles), no fallback.
pub(super) fn check_ctx<'a>(
    [q, k]: [&'a TensorView<'a>; 2],
    dims: Dims,
    params: &AttnParams,
    cand: &'a BlockSchedule,
    rows: Option<&'a dyn RowMask>,
) -> Ctx<'a> {
    Ctx {
        q,
        k,
        dims,
        logit: Logit::new(params, dims.d),
        cand,
        el: Elements { s: cand, rows },
        docs: vec![vec![Doc::whole(&dims)]; dims.batch],
        dense_below: 0,
        element: false,
        dense_last: 0,
    }
}

/// What the device selftest compares for one vertical-slash case.
pub struct VsCheck {
    /// Largest |device mass - f64 mass| / (1 + |f64 mass|) over columns and diagonals.
    pub mass_err: f64,
    /// Rows of the device's schedule that differ from the CPU keep step run on the device's
    /// masses (must be 0), and from the CPU estimator on its own f64 masses (near-ties may
    /// differ; reported).
    pub rows_differ: usize,
    pub rows_differ_f64: usize,
    pub density: f64,
}

/// Runs `spec` (vertical_slash) on the device and checks it against the CPU estimator at the
/// kernel's tiles: the masses, the keep step (exactly, from the device's masses), and returns
/// the selection and output for the caller's attention check.
pub fn check_vertical_slash<'a>(
    dev: &Arc<CudaDevice>,
    q: &TensorView,
    k: &TensorView,
    v: &TensorView,
    params: &AttnParams,
    spec: &SparseSpec,
    mask: MaskSpec<'a>,
) -> Result<(VsCheck, AttnOutput, Selection<'a>)> {
    let dims = crate::attention::validate(OP, q, k, v)?;
    let rows = rows_of(&mask);
    let (plan, out) = run_host(dev, [q, k, v], params, spec, mask)?;
    let sel = plan.selection(rows)?;
    let Some((col, diag)) = plan.masses()? else {
        return Err(param(
            "the check needs a plan that estimates (not the dense fallback)".into(),
        ));
    };
    let Est::Vs([v_, s_, last, sink, local]) = plan.est else {
        return Err(param(
            "check_vertical_slash takes a vertical_slash spec".into(),
        ));
    };
    let cand = sel.candidates.as_ref();
    let ctx = check_ctx([q, k], dims, params, cand, rows);
    let nd = dims.sq + dims.sk - 1;
    let (mut mass_err, mut rows_differ, mut rows_differ_f64) = (0f64, 0, 0);
    for r in 0..dims.batch * dims.hq {
        let (b, h) = (r / dims.hq, r % dims.hq);
        let (c64, d64) = estimate::last_mass(&ctx, b, h, last);
        let cg: Vec<f64> = col[r * dims.sk..][..dims.sk]
            .iter()
            .map(|&x| x as f64)
            .collect();
        let dg: Vec<f64> = diag[r * nd..][..nd].iter().map(|&x| x as f64).collect();
        for (a, b) in cg.iter().zip(&c64).chain(dg.iter().zip(&d64)) {
            mass_err = mass_err.max((a - b).abs() / (1.0 + b.abs()));
        }
        let keep = [v_, s_, sink, local];
        let from_dev = estimate::vs_keep(&ctx, b, h, &cg, &dg, keep);
        let from_f64 = estimate::vs_keep(&ctx, b, h, &c64, &d64, keep);
        for (qt, (x, y)) in from_dev.iter().zip(&from_f64).enumerate() {
            let got = sel.schedule.row(b, h, qt);
            rows_differ += (got != x.as_slice()) as usize;
            rows_differ_f64 += (got != y.as_slice()) as usize;
        }
    }
    let density = sel.report.density();
    Ok((
        VsCheck {
            mass_err,
            rows_differ,
            rows_differ_f64,
            density,
        },
        out,
        sel,
    ))
}

/// What the device selftest compares for one low-bit case.
pub struct LbCheck {
    /// Candidate tiles whose kept flag differs from the CPU estimator's (f64 on the same int8
    /// values) where the CPU's score is more than `margin` from ln tau (must be 0).
    pub tiles_differ: usize,
    /// Those that differ within the margin (f32 rounding of the logits; reported).
    pub tiles_near: usize,
    pub candidates: usize,
    pub density: f64,
}

/// Runs `spec` (lowbit) on the device and checks every candidate's flag against the CPU
/// estimator at the kernel's tiles (`sparse::lowbit::doc_scores`); returns the selection and
/// output for the caller's attention check.
pub fn check_lowbit<'a>(
    dev: &Arc<CudaDevice>,
    [q, k, v]: [&TensorView; 3],
    params: &AttnParams,
    spec: &SparseSpec,
    mask: MaskSpec<'a>,
    margin: f64,
) -> Result<(LbCheck, AttnOutput, Selection<'a>)> {
    let dims = crate::attention::validate(OP, q, k, v)?;
    let rows = rows_of(&mask);
    let (plan, out) = run_host(dev, [q, k, v], params, spec, mask)?;
    let Est::LowBit { tau, sink, local } = plan.est else {
        return Err(param(
            "check_lowbit takes a lowbit spec that estimates (not the dense fallback)".into(),
        ));
    };
    let sel = plan.selection(rows)?;
    let cand = sel.candidates.as_ref();
    let ctx = check_ctx([q, k], dims, params, cand, rows);
    let doc = Doc::whole(&dims);
    let all: Vec<usize> = (0..dims.sk).collect();
    let ln_tau = tau.ln();
    let mut chk = LbCheck {
        tiles_differ: 0,
        tiles_near: 0,
        candidates: 0,
        density: sel.report.density(),
    };
    for b in 0..dims.batch {
        for g in 0..dims.hk {
            let keys = super::lowbit::quant_keys(k, b, g, &all);
            for h in (0..dims.hq).filter(|&h| ctx.kv_head(h) == g) {
                for (qt, xs, ts) in
                    super::lowbit::doc_scores(&ctx, (b, h), &doc, &keys, [sink, local])
                {
                    let got = sel.schedule.row(b, h, qt);
                    for (c, e) in cand.row(b, h, qt)[xs].iter().enumerate() {
                        let want = super::lowbit::keeps(ts.forced[c], ts.score[c], ln_tau);
                        let has = got.iter().any(|x| x.k_tile == e.k_tile);
                        chk.candidates += 1;
                        if want != has {
                            if !ts.forced[c] && (ts.score[c] - ln_tau).abs() <= margin {
                                chk.tiles_near += 1;
                            } else {
                                chk.tiles_differ += 1;
                            }
                        }
                    }
                }
            }
        }
    }
    Ok((chk, out, sel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_struct_matches_the_kernels() {
        crate::cuda::forward::check_layout(
            SRC,
            "SpParams",
            &[
                ("stats", std::mem::offset_of!(SpParams, stats)),
                ("lse", std::mem::offset_of!(SpParams, lse)),
                ("col", std::mem::offset_of!(SpParams, col)),
                ("diag", std::mem::offset_of!(SpParams, diag)),
                ("cp", std::mem::offset_of!(SpParams, cp)),
                ("dp", std::mem::offset_of!(SpParams, dp)),
                ("cnt", std::mem::offset_of!(SpParams, cnt)),
                ("off", std::mem::offset_of!(SpParams, off)),
                ("ent", std::mem::offset_of!(SpParams, ent)),
                ("thr", std::mem::offset_of!(SpParams, thr)),
                ("seg", std::mem::offset_of!(SpParams, seg)),
                ("last", std::mem::offset_of!(SpParams, last)),
                ("nchunks", std::mem::offset_of!(SpParams, nchunks)),
                ("nv", std::mem::offset_of!(SpParams, nv)),
                ("ns", std::mem::offset_of!(SpParams, ns)),
                ("sink", std::mem::offset_of!(SpParams, sink)),
                ("local", std::mem::offset_of!(SpParams, local)),
                ("k_tiles", std::mem::offset_of!(SpParams, k_tiles)),
                ("vec", std::mem::offset_of!(SpParams, vec)),
                ("flag", std::mem::offset_of!(SpParams, flag)),
                ("nseg", std::mem::offset_of!(SpParams, nseg)),
                ("ncand", std::mem::offset_of!(SpParams, ncand)),
            ],
            std::mem::size_of::<SpParams>(),
        );
    }

    #[test]
    fn lowbit_parameter_struct_matches_the_kernels() {
        crate::cuda::forward::check_layout(
            SRC_LB,
            "LbParams",
            &[
                ("mu_part", std::mem::offset_of!(LbParams, mu_part)),
                ("mu", std::mem::offset_of!(LbParams, mu)),
                ("kq", std::mem::offset_of!(LbParams, kq)),
                ("ks", std::mem::offset_of!(LbParams, ks)),
                ("qq", std::mem::offset_of!(LbParams, qq)),
                ("qs", std::mem::offset_of!(LbParams, qs)),
                ("qmu", std::mem::offset_of!(LbParams, qmu)),
                ("flag", std::mem::offset_of!(LbParams, flag)),
                ("log2_tau", std::mem::offset_of!(LbParams, log2_tau)),
                ("sink", std::mem::offset_of!(LbParams, sink)),
                ("local", std::mem::offset_of!(LbParams, local)),
                ("nkc", std::mem::offset_of!(LbParams, nkc)),
                ("kgroups", std::mem::offset_of!(LbParams, kgroups)),
                ("ncand", std::mem::offset_of!(LbParams, ncand)),
            ],
            std::mem::size_of::<LbParams>(),
        );
    }

    #[test]
    fn document_masks_are_refused_by_name() {
        use crate::mask::{DocIds, MaskExpr, MaskShape};
        let shape = MaskShape::square(4);
        let ids = DocIds {
            q: vec![0, 0, 1, 1],
            k: vec![0, 0, 1, 1],
        };
        let docs = MaskExpr::parse("causal & document").unwrap();
        let bound = docs.bind(shape, Some(ids)).unwrap();
        let e = refuse_documents(&MaskSpec::Expr(&bound))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("document ids") && e.contains("per document"),
            "{e}"
        );
        let causal = MaskExpr::parse("causal")
            .unwrap()
            .bind(shape, None)
            .unwrap();
        assert!(refuse_documents(&MaskSpec::Expr(&causal)).is_ok());
        assert!(refuse_documents(&MaskSpec::Full).is_ok());
    }

    #[test]
    fn other_methods_are_refused_with_their_name() {
        let spec = SparseSpec::parse("topmass(gamma=0.9)").unwrap();
        let e = vs_args(&spec).unwrap_err().to_string();
        assert!(e.contains("topmass") && e.contains("vertical_slash"), "{e}");
        let spec = SparseSpec::parse("vertical_slash(last=65)").unwrap();
        let e = vs_args(&spec).unwrap_err().to_string();
        assert!(e.contains("last=65"), "{e}");
        let spec = SparseSpec::parse("vertical_slash(v=3,s=5,last=7,sink=2,local=9)").unwrap();
        assert_eq!(vs_args(&spec).unwrap(), [3, 5, 7, 2, 9]);
        let spec = SparseSpec::parse("lowbit(tau=0.25,sink=2,local=9)").unwrap();
        assert_eq!(
            est_of(&spec).unwrap(),
            Est::LowBit {
                tau: 0.25,
                sink: 2,
                local: 9
            }
        );
        assert!(check_spec(&spec).is_ok());
    }
}
