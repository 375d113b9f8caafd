//! Host side of the CUDA backward: [`backward`] mirrors [`crate::backward`] (same inputs, same
//! checks, gradients in the input dtype). Two schemes, both after `la_bwd_prep` (Delta =
//! rowsum(dO * O), LSE in log2 units; `kernels/bwd_common.cuh`):
//!
//! - two-pass (`kernels/attn_bwd.cu`, mma.sync, every GPU, head dims to 256): `la_bwd_dq` (one
//!   block per 64 query rows, walking the schedule's rows) and `la_bwd_dkdv` (one block per 64
//!   keys and KV head, walking the schedule's columns for every query head of the group). No
//!   atomics: every gradient element is summed in a fixed order by one thread: bit-identical run
//!   to run, at the price of computing S and dP twice (7 matrix products per tile pair instead
//!   of 5). Both modes off Hopper and at head dims other than 64 / 128.
//! - one pass, Hopper, D 64 / 128 (`kernels/attn_bwd_wg.cu`, warpgroup MMA, warp-specialized):
//!   dK, dV and dQ together over the schedule's columns. A producer warpgroup loads Q, dO (TMA)
//!   and the rows' LSE/Delta into a two-stage ring; two consumer warpgroups own 64 keys each;
//!   each stages one 64 x 64 block of the tile's dQ partial, which a warp of the producer
//!   warpgroup adds to an f32 buffer by a 16 KiB bulk reduce-add of the TMA unit, and
//!   `la_bwd_dq_store` converts it (applying the softmax scale). Fast mode: the adds
//!   land in whatever order they arrive (run-to-run differences of a few f32 ulps before the
//!   final rounding to bf16/f16). Deterministic mode (`LA_ORDERED`): the adds into each dQ tile
//!   go in a fixed order (key tile, then warpgroup), handed on by a per-tile counter; a reducer
//!   warp per consumer does the waiting so the consumers keep computing, and the blocks walk
//!   their columns backwards so that under causal and banded masks they reach each tile in that
//!   order. The adds into one tile are serial, so the deterministic mode launches its blocks in
//!   groups of heads that fit L2, key tiles outermost ([`bwd_head_group`]): the blocks running
//!   together are a few key tiles of many heads rather than every key tile of a few, which
//!   would queue on the same tiles' counters. Cost on an H100 (docs/PERF.md, 2026-12-06, second
//!   table): 1.13-1.32x the fast mode's time (1.25-1.96x with the fast mode's order; the
//!   two-pass kernels: 1.46-2.39x).
//!
//! Otherwise both schemes put the tile index first in the grid, so the blocks running together
//! are the tiles of one head: they walk the same rows (columns) and share them in L2 (1.6x at
//! n = 4k). The fast one-pass kernel launches groups of four heads, key tiles outermost, where
//! one head has fewer key tiles than half the SMs: under causal masks the heavy blocks then
//! start first instead of in the last wave ([`bwd_head_group`]).
use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};

use super::forward::{
    check_launch, check_tma, unsupported, DevMask, DevTensor, TmaMap, COMMON, MMA_TILE, TMA, WGMMA,
};
use super::{drv, CudaDevice};
use crate::attention::{AttnParams, Dims, MaskSpec};
use crate::backward::{BackwardParams, Grads};
use crate::error::{Error, Result};
use crate::mask::codegen::MASK_CONSTS;
use crate::tensor::{DType, TensorView};

const BWD_COMMON: &str = include_str!("kernels/bwd_common.cuh");
const BWD: &str = include_str!("kernels/attn_bwd.cu");
const BWD_WG: &str = include_str!("kernels/attn_bwd_wg.cu");
/// Query rows and keys per tile of the mma.sync kernels.
const T: usize = 64;

/// Shared memory of the one-pass kernel: K, V; two stages of Q and dO; the dS^T tile (two stages
/// with `merge`); two 64 x 64 f32 dQ staging blocks per consumer warpgroup (one with `merge`);
/// two stages of L2 and Delta; up to 16 mbarriers (128 bytes: K/V, two stages full and empty,
/// staging full and free per consumer); 1 KiB to align the swizzle atoms.
fn one_pass_smem(br: usize, bc: usize, d: usize, merge: bool) -> usize {
    let (ds_stages, stg_blocks) = if merge { (2, 1) } else { (1, 2) };
    (2 * bc * d + 4 * br * d + ds_stages * bc * br) * 2
        + (bc / 64) * stg_blocks * 4096 * 4
        + 2 * 2 * br * 4
        + 128
        + 1024
}

/// How the one-pass kernel's dQ partials reach the f32 accumulator, `LONGATTN_CUDA_BWD_DQ_ADD`
/// (fast mode; the deterministic mode always uses the producer's warps, in a fixed order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DqAdd {
    /// The default since 2026-12-06 (`LA_DQ_WARP`): warps of the producer warpgroup issue the
    /// bulk reduce-adds; a consumer hands its staging over with one arrival per warp instead of
    /// a barrier of the warpgroup (H100: +4 to +7% at 4k and 16k, D 64 and 128, docs/PERF.md).
    Warp,
    /// `bulk`: a consumer thread issues the bulk add after a barrier of its warpgroup (before).
    Bulk,
    /// `red` (opt-in; H100 2026-12-05: within 2%, not adopted): each thread adds its dQ
    /// registers by vector reductions (`red.global.add.v4.f32`) instead of staging them, saving
    /// a proxy fence and a barrier per item (`LA_DQ_RED`).
    Red,
}

/// How the one-pass kernel's consumers wait for the S^T and dP^T products,
/// `LONGATTN_CUDA_BWD_WAIT` (`LA_BWD_SPLITWAIT`). The split wait issues them as two commit
/// groups and forms P^T = exp(S^T - L) while dP^T still runs, as FA4's Hopper backward does;
/// never with soft-cap, and at BR 128 (D 64), where S^T and dP^T of 128 queries are held at
/// once, only when the producer's warps add dQ (with bulk adds issued by the consumers ptxas
/// spills there; the compile test checks both). Consumers get 240 registers, the producer 24,
/// without which ptxas serializes the wgmma.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wait {
    /// The default: split at D 64, one wait at D 128. H100 2026-12-06: split +4 to +6% at 4k
    /// and full 16k D 64 (+1% causal 16k), but -1 to -7% at D 128 (causal 16k the worst),
    /// docs/PERF.md.
    Auto,
    /// `one`: one wait for both products at every head dim.
    One,
    /// `split`: the split wait wherever it can run.
    Split,
}

/// The one-pass kernel's optional steps, from the environment (read once per launch).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct BwdSteps {
    /// How dQ partials are formed, `LONGATTN_CUDA_BWD_DQ`: `merge` (the default since
    /// 2026-12-05: each consumer over the whole key tile, one block per consumer and item, half
    /// the bytes added to dq_acc, a barrier of the two consumers per item; `LA_DQ_MERGE` in
    /// attn_bwd_wg.cu; H200: +7-10% over `split` at 4k and 16k, D 64 and 128, docs/PERF.md) or
    /// `split` (the earlier form: each consumer over its own 64 keys, two blocks added per
    /// consumer).
    merge: bool,
    /// How the consumers wait for S^T and dP^T, `LONGATTN_CUDA_BWD_WAIT` ([`Wait`]).
    wait: Wait,
    /// The order of the products after dS^T, `LONGATTN_CUDA_BWD_ORDER`: `dk_last` (the default
    /// since 2026-12-05, with `merge`, and since 2026-12-06 also with `split`: dK is issued
    /// after the dQ product and runs while dQ is staged and added, `LA_BWD_DKLAST`; H200: +4%
    /// at 16k, H100: +3-4% at 16k, +4-5% at 4k, docs/PERF.md) or `dk_first` (dV and dK
    /// together before dQ, as before).
    dk_last: bool,
    /// How staged dQ partials reach the accumulator ([`DqAdd`], `LONGATTN_CUDA_BWD_DQ_ADD`).
    dq_add: DqAdd,
    /// `LONGATTN_CUDA_BWD_L2PRE=N` (opt-in, 0 unless set): the L2 values of the first N groups
    /// of 8 queries read into registers before the wait for S^T / dP^T (`LA_BWD_L2PRE`; at
    /// most 8 at D 128, 4 at D 64).
    l2pre: u32,
    /// `LONGATTN_CUDA_BWD_ARRIVE=all` (opt-in): every consumer thread hands a Q / dO stage back
    /// with its own mbarrier arrival instead of lane 0 after a warp barrier (`LA_ARRIVE_ALL`):
    /// the form compute-sanitizer racecheck follows (`scripts/gpu/racecheck_repro.cu`).
    arrive_all: bool,
    /// `LONGATTN_CUDA_BWD_KNOCK=BITS`: timing experiments that drop parts of the kernel
    /// (`LA_KNOCK`; the gradients are wrong). 0 unless set.
    knock: u32,
}

impl BwdSteps {
    fn from_env() -> BwdSteps {
        let merge = std::env::var("LONGATTN_CUDA_BWD_DQ").as_deref() != Ok("split");
        let wait = match std::env::var("LONGATTN_CUDA_BWD_WAIT").as_deref() {
            Ok("split") => Wait::Split,
            Ok("one") => Wait::One,
            _ => Wait::Auto,
        };
        let knock = std::env::var("LONGATTN_CUDA_BWD_KNOCK")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if knock != 0 {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                eprintln!(
                    "warning: LONGATTN_CUDA_BWD_KNOCK={knock}: timing experiment, the backward's gradients are wrong"
                )
            });
        }
        BwdSteps {
            merge,
            wait,
            dk_last: std::env::var("LONGATTN_CUDA_BWD_ORDER").as_deref() != Ok("dk_first"),
            dq_add: match std::env::var("LONGATTN_CUDA_BWD_DQ_ADD").as_deref() {
                Ok("bulk") => DqAdd::Bulk,
                Ok("red") => DqAdd::Red,
                _ => DqAdd::Warp,
            },
            l2pre: std::env::var("LONGATTN_CUDA_BWD_L2PRE")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
                .min(16),
            arrive_all: std::env::var("LONGATTN_CUDA_BWD_ARRIVE").as_deref() == Ok("all"),
            knock,
        }
    }

    /// The defaults (no environment): merged dQ, the wait by head dim, dK last, dQ added by the
    /// producer's warps.
    #[cfg(test)]
    pub(super) fn defaults() -> BwdSteps {
        BwdSteps {
            merge: true,
            wait: Wait::Auto,
            dk_last: true,
            dq_add: DqAdd::Warp,
            l2pre: 0,
            arrive_all: false,
            knock: 0,
        }
    }
}

/// Source, variant name, shared memory, main and dQ entry points, and defines of `kernel` for
/// the mask `program` (`steps`: the one-pass kernel's options).
#[allow(clippy::type_complexity)]
pub(super) fn kernel_build(
    kernel: BwdKernel,
    dtype: DType,
    d: usize,
    params: &AttnParams,
    program: &str,
    steps: BwdSteps,
) -> (
    String,
    String,
    usize,
    &'static str,
    &'static str,
    Vec<(String, String)>,
) {
    let mut defines = vec![
        ("LA_F16".into(), ((dtype == DType::F16) as u8).to_string()),
        ("LA_D".into(), d.to_string()),
        ("LA_PREP_TPR".into(), prep_threads(d).to_string()),
        (
            "LA_SOFTCAP".into(),
            (params.softcap.is_some() as u8).to_string(),
        ),
    ];
    let (src, variant, smem, main, dq) = match kernel {
        BwdKernel::TwoPass => (
            format!("{COMMON}\n{MMA_TILE}\n{BWD_COMMON}\n{program}\n{BWD}"),
            format!("attn_bwd_{}_d{d}", dtype.name()),
            two_pass_smem(d),
            "la_bwd_dkdv",
            "la_bwd_dq",
        ),
        BwdKernel::OnePassWgmma { br, bc, ordered } => {
            defines.push(("LA_NWG".into(), (bc / 64).to_string()));
            defines.push(("LA_BR".into(), br.to_string()));
            defines.push(("LA_ORDERED".into(), (ordered as u8).to_string()));
            let merge = steps.merge;
            defines.push(("LA_DQ_MERGE".into(), (merge as u8).to_string()));
            // The split wait ([`Wait`]): at BR 128 (D 64) only when the producer's warps add dQ
            // (`DqAdd::Warp`, or the deterministic mode).
            let warp_adds = steps.dq_add == DqAdd::Warp || ordered;
            let asked = match steps.wait {
                Wait::Auto => br == 128,
                Wait::One => false,
                Wait::Split => true,
            };
            let split = asked && params.softcap.is_none() && (br == 64 || warp_adds);
            defines.push(("LA_BWD_SPLITWAIT".into(), (split as u8).to_string()));
            let dk_last = steps.dk_last && merge;
            defines.push(("LA_BWD_DKLAST".into(), (dk_last as u8).to_string()));
            // The deterministic mode adds through the producer's warps whatever was asked
            // (`LA_ORDERED` implies `LA_DQ_WARP`).
            let red = steps.dq_add == DqAdd::Red && !ordered;
            defines.push(("LA_DQ_RED".into(), (red as u8).to_string()));
            let warp = steps.dq_add == DqAdd::Warp;
            defines.push(("LA_DQ_WARP".into(), (warp as u8).to_string()));
            if steps.l2pre != 0 {
                defines.push(("LA_BWD_L2PRE".into(), steps.l2pre.to_string()));
            }
            if steps.arrive_all {
                defines.push(("LA_ARRIVE_ALL".into(), "1".into()));
            }
            if steps.knock != 0 {
                defines.push(("LA_KNOCK".into(), steps.knock.to_string()));
            }
            let wrappers = &*super::wgmma::WRAPPERS;
            (
                format!("{COMMON}\n{WGMMA}\n{wrappers}\n{TMA}\n{BWD_COMMON}\n{program}\n{BWD_WG}"),
                format!("attn_bwd_wg_{}_d{d}_{br}x{bc}", dtype.name()),
                one_pass_smem(br, bc, d, merge),
                "la_bwd_wg",
                "la_bwd_dq_store",
            )
        }
    };
    (src, variant, smem, main, dq, defines)
}

/// The one-pass kernel's launch order (`hgroup` of `la_bwd_block` in bwd_common.cuh): `0`, the
/// 3-D grid with key tiles fastest; `l2`, groups of the (batch, KV head) pairs whose Q, dO (bf16)
/// and f32 dQ accumulator fill L2, key tiles outermost inside a group; `N`, groups of N pairs.
///
/// Fast mode: key tiles fastest while one pair's key tiles fill a wave of blocks (`k_tiles`
/// above half the SMs): the blocks running together share one head's Q and dO in L2. With
/// fewer key tiles a wave spans several pairs, and under causal masks the heaviest blocks of the
/// last pairs (key tile 0: every query tile) start within the last wave, so the launch ends on
/// a tail of about one such block; groups of [`BWD_FAST_GROUP`] pairs with key tiles outermost
/// start every group's heavy blocks first instead (greedy list-scheduling model: 3-7% above
/// the ideal at 4k, 0.1-0.5% grouped). H100, 2026-12-06 (docs/PERF.md): causal 4k +2% (D 64)
/// / +4% (D 128), full 4k within the spread; groups at 16k cost 2-8%, so not there.
/// Deterministic mode: `l2` always (1.13-1.32x the fast mode's time against 1.25-1.96x with key
/// tiles fastest: a query tile's ordered adds come from key tiles that run one after another
/// instead of all at once). `LONGATTN_CUDA_BWD_HGROUP` sets it for both.
fn bwd_head_group(dev: &CudaDevice, dims: &Dims, deterministic: bool, k_tiles: usize) -> usize {
    let env = std::env::var("LONGATTN_CUDA_BWD_HGROUP").ok();
    head_group(
        dev.sms,
        dev.l2_bytes,
        dims,
        deterministic,
        k_tiles,
        env.as_deref(),
    )
}

/// [`bwd_head_group`] for a device of `sms` SMs and `l2_bytes` of L2, with the environment's
/// setting `env`.
fn head_group(
    sms: usize,
    l2_bytes: usize,
    dims: &Dims,
    deterministic: bool,
    k_tiles: usize,
    env: Option<&str>,
) -> usize {
    let pairs = (dims.batch * dims.hk).max(1);
    let l2 = || {
        let per_pair = (dims.hq / dims.hk.max(1)).max(1) * dims.sq * dims.d * (2 + 2 + 4);
        (l2_bytes / per_pair.max(1)).clamp(1, pairs)
    };
    match env {
        Some("l2") => l2(),
        Some(v) => v.parse::<usize>().map_or(0, |g| g.min(pairs)),
        None if deterministic => l2(),
        None if 2 * k_tiles <= sms && pairs > 1 => BWD_FAST_GROUP.min(l2()),
        None => 0,
    }
}

/// Pairs per launch group of the fast mode when a wave of blocks spans several pairs
/// ([`bwd_head_group`]; 4 and 8 measured alike at 4k, 4 a little ahead).
const BWD_FAST_GROUP: usize = 4;

/// Threads per row of `la_bwd_prep` (its `LA_PREP_TPR`, and the launch's rows per block): 8
/// elements each, a power of two.
fn prep_threads(d: usize) -> usize {
    (d / 8).next_power_of_two().clamp(2, 32)
}

/// Blocks per tile of the two-pass kernels: above D 128 each owns half of the gradient columns
/// (`LA_NH` in `kernels/attn_bwd.cu`).
fn two_pass_halves(d: usize) -> usize {
    if d > 128 {
        2
    } else {
        1
    }
}

/// Shared memory of a two-pass kernel: the block's own two tiles (Q, dO or K, V) and the streamed
/// pair, double-buffered up to D 128, single above (128 KiB at D 256).
fn two_pass_smem(d: usize) -> usize {
    let stages = if d > 128 { 1 } else { 2 };
    (2 + 2 * stages) * T * d * 2
}

/// Which backward scheme runs a problem.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BwdKernel {
    /// `attn_bwd.cu`: a dQ pass over the rows and a dK/dV pass over the columns, no atomics.
    TwoPass,
    /// `attn_bwd_wg.cu`: one pass over the columns on Hopper, dQ by f32 bulk reduce-adds.
    OnePassWgmma {
        /// Query rows per step (64 or 128).
        br: usize,
        /// Keys per block (64 per warpgroup).
        bc: usize,
        /// Deterministic: the reduce-adds into each dQ tile go in a fixed order (key tile, then
        /// warpgroup), passed on by a per-tile counter.
        ordered: bool,
    },
}

impl BwdKernel {
    /// The one-pass kernel on Hopper at D 64 / 128 (`LONGATTN_CUDA_WGMMA=0` turns it off), in
    /// the deterministic mode with ordered dQ adds (`LONGATTN_CUDA_ORDERED=0`: the two-pass
    /// kernels there instead); the two-pass kernels otherwise. Tiles: 2 warpgroups x 64 keys;
    /// D 64 steps 128 query rows (its dQ splits into two 64-row blocks), D 128 steps 64 (dQ
    /// splits into two 64-column blocks; 128 rows would not fit the registers next to the
    /// 64 x 128 dK and dV).
    pub fn choose(d: usize, cc: (i32, i32), deterministic: bool) -> BwdKernel {
        let hopper = cc == (9, 0) && !super::forward::env_off("LONGATTN_CUDA_WGMMA");
        let ordered_ok = !super::forward::env_off("LONGATTN_CUDA_ORDERED");
        match d {
            64 | 128 if hopper && (!deterministic || ordered_ok) => BwdKernel::OnePassWgmma {
                br: if d == 64 { 128 } else { 64 },
                bc: 128,
                ordered: deterministic,
            },
            _ => BwdKernel::TwoPass,
        }
    }
}

/// Kernel parameters; field for field `LaBwdParams` in `kernels/bwd_common.cuh` (passed by
/// value: the layouts must match byte for byte; sizes are checked on both sides).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct LaBwdParams {
    q: u64,
    k: u64,
    v: u64,
    o: u64,
    dout: u64,
    lse: u64,
    lse2: u64,
    delta: u64,
    dq: u64,
    dk: u64,
    dv: u64,
    dq_acc: u64,
    q_s: [i64; 3],
    k_s: [i64; 3],
    b: i32,
    sq: i32,
    sk: i32,
    hq: i32,
    hk: i32,
    scale_log2: f32,
    cap_pre: f32,
    cap_post: f32,
    scale: f32,
    row_off: u64,
    row_ent: u64,
    col_off: u64,
    col_ent: u64,
    sched_batch: i32,
    sched_heads: i32,
    q_tiles: i32,
    k_tiles: i32,
    qdoc: u64,
    kdoc: u64,
    blk: u64,
    blk_dims: [i32; 6],
    lstride: i32,
    /// Launch order of the one-pass kernel: 0 = 3-D grid, key tiles fastest; n = groups of n
    /// (batch, KV head) pairs over a 1-D grid (`la_bwd_block`, [`bwd_head_group`]).
    hgroup: i32,
    dq_sem: u64,
    col_rank: u64,
    /// First / last key of each query row's document run (interval programs of document masks;
    /// [`DevMask`]'s `dlo` / `dhi`).
    dlo: u64,
    dhi: u64,
    /// The mask program's atom constants (`p.mc[k]`, [`crate::mask::codegen::CudaProgram`]).
    mc: [i32; MASK_CONSTS],
}

// The C side asserts the same sizes (`static_assert` in bwd_common.cuh and attn_bwd_wg.cu); 4
// bytes of implicit padding before `row_off` on both sides.
const _: () = assert!(std::mem::size_of::<LaBwdParams>() == 448);
const _: () = assert!(std::mem::offset_of!(LaBwdParams, row_off) == 184);
const _: () = assert!(std::mem::offset_of!(LaBwdParams, mc) == 320);
const _: () = assert!(std::mem::size_of::<LaBwdWsParams>() == 960);

// SAFETY: plain-old-data with the C layout of the kernel's parameter struct.
unsafe impl cudarc::driver::DeviceRepr for LaBwdParams {}

/// Parameters of the one-pass kernel: TMA maps of q, k, v, dO, then the common ones;
/// `LaBwdWsParams` in `kernels/attn_bwd_wg.cu`.
#[repr(C)]
#[derive(Clone, Copy)]
struct LaBwdWsParams {
    tq: TmaMap,
    tk: TmaMap,
    tv: TmaMap,
    tdo: TmaMap,
    p: LaBwdParams,
}

// SAFETY: plain-old-data with the C layout of the kernel's `LaBwdWsParams` (64-byte aligned maps).
unsafe impl cudarc::driver::DeviceRepr for LaBwdWsParams {}

/// Row length of the LSE (log2) and Delta work buffers: Sq rounded up to 128, so every query
/// tile of either kernel reads whole, 16-byte aligned rows (entries past Sq: +inf and 0).
fn lstride(sq: usize) -> usize {
    sq.div_ceil(128) * 128
}

/// Everything of one backward problem that does not depend on the data: kernel variants, the
/// schedule (rows and columns) and mask buffers, the LSE/Delta work buffers.
pub struct BwdPlan {
    dev: Arc<CudaDevice>,
    dims: Dims,
    dtype: DType,
    kernel: BwdKernel,
    f_prep: CudaFunction,
    /// Two-pass: the dQ pass; one-pass: the dQ conversion.
    f_dq: CudaFunction,
    /// Two-pass: the dK/dV pass; one-pass: the fused pass.
    f_main: CudaFunction,
    base: LaBwdParams,
    smem: usize,
    _mask: DevMask,
    _cols: (CudaSlice<u32>, CudaSlice<u32>, CudaSlice<u32>),
    /// Work buffers the kernel parameters point into (LSE in log2 units, Delta per row, the f32
    /// dQ accumulator of the one-pass kernel).
    _lse2: CudaSlice<f32>,
    _delta: CudaSlice<f32>,
    _dq_acc: Option<CudaSlice<f32>>,
    _dq_sem: Option<CudaSlice<i32>>,
    /// Built with `LONGATTN_CUDA_BWD_KNOCK` in effect (fast one-pass kernel): wrong gradients.
    knocked: bool,
}

impl BwdPlan {
    /// The kernel scheme follows [`BwdKernel::choose`] (the mode in `bwd`, the device, D).
    pub fn new(
        dev: &Arc<CudaDevice>,
        dims: Dims,
        dtype: DType,
        params: &AttnParams,
        mask: MaskSpec,
        bwd: &BackwardParams,
    ) -> Result<BwdPlan> {
        Self::build(dev, dims, dtype, params, bwd, |br, bc| {
            DevMask::new(dev, mask, br, bc, dims)
        })
    }

    /// The backward through a gathered-key selection (`sparse::gather::TileKeys`, the pairs
    /// `mask & selection`; `mask` Full or an expression): the selection at the kernel's tiles,
    /// each Partial tile testing its pairs against the mask and the selection's key bits
    /// ([`DevMask::gathered`]). A tile costs its whole product here (the forward gathers the
    /// keys instead); the gradients are the selection's exactly.
    pub fn with_gather(
        dev: &Arc<CudaDevice>,
        dims: Dims,
        dtype: DType,
        params: &AttnParams,
        mask: MaskSpec,
        sel: &crate::sparse::gather::TileKeys,
        bwd: &BackwardParams,
    ) -> Result<BwdPlan> {
        Self::build(dev, dims, dtype, params, bwd, |br, bc| {
            DevMask::gathered(dev, mask, sel, br, bc, dims)
        })
    }

    fn build(
        dev: &Arc<CudaDevice>,
        dims: Dims,
        dtype: DType,
        params: &AttnParams,
        bwd: &BackwardParams,
        mask: impl FnOnce(usize, usize) -> Result<DevMask>,
    ) -> Result<BwdPlan> {
        let d = dims.d;
        if !matches!(dtype, DType::BF16 | DType::F16) {
            return Err(unsupported(format!(
                "dtype {dtype}: the CUDA backward takes bf16 or f16"
            )));
        }
        if d == 0 || !d.is_multiple_of(16) || d > 256 || dims.dv != d {
            return Err(unsupported(format!(
                "head dims D {d} / Dv {}: the CUDA backward needs D = Dv, a multiple of 16, at most 256",
                dims.dv
            )));
        }
        let kernel = BwdKernel::choose(d, dev.cc, bwd.deterministic);
        let (br, bc) = match kernel {
            BwdKernel::TwoPass => (T, T),
            BwdKernel::OnePassWgmma { br, bc, .. } => (br, bc),
        };
        let (q_tiles, k_tiles) = (dims.sq.div_ceil(br), dims.sk.div_ceil(bc));
        if q_tiles > 65535 || k_tiles > 65535 || dims.batch * two_pass_halves(d) > 65535 {
            return Err(unsupported(
                "grid: more than 65535 tiles or batch rows".into(),
            ));
        }
        params.check()?;
        params.refuse_skip("cuda attention backward", "in the backward")?;
        let dm = mask(br, bc)?;
        let cols = dm.columns(dev)?;
        // The mask program is a template on the parameter struct, instantiated in the kernels; its
        // constants are arguments (`mc`), so the variant depends on the mask's structure only.
        let program = &dm.program;
        let steps = BwdSteps::from_env();
        let (src, variant, smem, main, dq, defines) =
            kernel_build(kernel, dtype, d, params, program, steps);
        let dq_smem = if kernel == BwdKernel::TwoPass {
            smem
        } else {
            0
        };
        let f_prep = dev.function(&variant, "la_bwd_prep", &src, &defines, 0)?;
        let f_dq = dev.function(&variant, dq, &src, &defines, dq_smem)?;
        let f_main = dev.function(&variant, main, &src, &defines, smem)?;
        let n_lse = dims.batch * dims.hq * lstride(dims.sq);
        let lse2 = dev.alloc_f32(n_lse)?;
        let delta = dev.alloc_f32(n_lse)?;
        let dq_acc = match kernel {
            BwdKernel::TwoPass => None,
            // 64-row blocks, lstride / 64 of them per head (kernels/bwd_common.cuh,
            // la_dq_acc_at: every query tile, even one reaching past Sq, adds whole blocks);
            // zeroed here, and again by la_bwd_dq_store as it reads them.
            BwdKernel::OnePassWgmma { .. } => {
                Some(dev.alloc_f32(dims.batch * dims.hq * lstride(dims.sq) * d)?)
            }
        };
        // Deterministic one-pass: a counter per (batch, query head, query tile of br rows),
        // zeroed by la_bwd_prep before every launch.
        let dq_sem = match kernel {
            BwdKernel::OnePassWgmma { ordered: true, .. } => {
                Some(dev.upload(&vec![0i32; dims.batch * dims.hq * lstride(dims.sq) / br])?)
            }
            _ => None,
        };
        let s = dev.stream();
        let scale = params.scale_for(d);
        let (scale_log2, cap_pre, cap_post) = super::forward::logit_consts(params, d);
        let base = LaBwdParams {
            lse2: lse2.device_ptr(s).0,
            delta: delta.device_ptr(s).0,
            dq_acc: dq_acc.as_ref().map_or(0, |a| a.device_ptr(s).0),
            b: dims.batch as i32,
            sq: dims.sq as i32,
            sk: dims.sk as i32,
            hq: dims.hq as i32,
            hk: dims.hk as i32,
            scale_log2,
            cap_pre,
            cap_post,
            scale,
            row_off: dm.row_off.device_ptr(s).0,
            row_ent: dm.row_ent.device_ptr(s).0,
            col_off: cols.0.device_ptr(s).0,
            col_ent: cols.1.device_ptr(s).0,
            sched_batch: dm.sched.batch as i32,
            sched_heads: dm.sched.heads as i32,
            q_tiles: q_tiles as i32,
            k_tiles: k_tiles as i32,
            qdoc: dm.qdoc.device_ptr(s).0,
            kdoc: dm.kdoc.device_ptr(s).0,
            blk: dm.blk.device_ptr(s).0,
            blk_dims: dm.blk_dims,
            lstride: lstride(dims.sq) as i32,
            hgroup: match kernel {
                BwdKernel::OnePassWgmma { ordered, .. } => {
                    bwd_head_group(dev, &dims, ordered, k_tiles) as i32
                }
                BwdKernel::TwoPass => 0,
            },
            dq_sem: dq_sem.as_ref().map_or(0, |a| a.device_ptr(s).0),
            col_rank: cols.2.device_ptr(s).0,
            dlo: dm.dlo.device_ptr(s).0,
            dhi: dm.dhi.device_ptr(s).0,
            mc: dm.consts,
            ..Default::default()
        };
        Ok(BwdPlan {
            dev: dev.clone(),
            dims,
            dtype,
            kernel,
            f_prep,
            f_dq,
            f_main,
            base,
            smem,
            _mask: dm,
            _cols: cols,
            _lse2: lse2,
            _delta: delta,
            _dq_acc: dq_acc,
            _dq_sem: dq_sem,
            knocked: steps.knock != 0
                && matches!(kernel, BwdKernel::OnePassWgmma { ordered: false, .. }),
        })
    }

    /// Whether this plan runs a timing experiment (`LONGATTN_CUDA_BWD_KNOCK`, fast one-pass
    /// kernel only) whose gradients are wrong on purpose.
    pub fn timing_experiment(&self) -> bool {
        self.knocked
    }

    /// Enqueues the three kernels: dq, dk, dv (input dtype) from q, k, v, the forward's out and
    /// LSE, and dO (all on the device, contiguous).
    #[allow(clippy::too_many_arguments)]
    pub fn launch(
        &self,
        q: &DevTensor,
        k: &DevTensor,
        v: &DevTensor,
        out: &DevTensor,
        lse: &CudaSlice<f32>,
        dout: &DevTensor,
        dq: &mut DevTensor,
        dk: &mut DevTensor,
        dv: &mut DevTensor,
    ) -> Result<()> {
        self.launch_on(self.dev.stream(), q, k, v, out, lse, dout, dq, dk, dv)
    }

    /// [`BwdPlan::launch`] on a caller's stream. The kernels take one set of strides for the
    /// query-shaped tensors (q, out, dO, dQ) and one for the key-shaped ones (k, v, dK, dV): each
    /// set must agree (an error names the tensor that differs).
    #[allow(clippy::too_many_arguments)]
    pub fn launch_on(
        &self,
        s: &Arc<cudarc::driver::CudaStream>,
        q: &DevTensor,
        k: &DevTensor,
        v: &DevTensor,
        out: &DevTensor,
        lse: &CudaSlice<f32>,
        dout: &DevTensor,
        dq: &mut DevTensor,
        dk: &mut DevTensor,
        dv: &mut DevTensor,
    ) -> Result<()> {
        for (name, t, like, like_name) in [
            ("out", out, q, "q"),
            ("do", dout, q, "q"),
            ("dq", &*dq, q, "q"),
            ("v", v, k, "k"),
            ("dk", &*dk, k, "k"),
            ("dv", &*dv, k, "k"),
        ] {
            if t.strides != like.strides {
                return Err(unsupported(format!(
                    "cuda attention backward: tensor `{name}` has strides {:?}, the kernel needs those of `{like_name}` {:?}",
                    t.strides, like.strides
                )));
            }
        }
        if matches!(self.kernel, BwdKernel::OnePassWgmma { .. }) {
            check_tma(
                "cuda attention backward",
                &[("q", q), ("k", k), ("v", v), ("do", dout)],
            )?;
        }
        let Dims {
            batch,
            sq,
            sk,
            hq,
            hk,
            d,
            ..
        } = self.dims;
        let qs = [batch, sq, hq, d];
        let ks = [batch, sk, hk, d];
        check_launch(
            "cuda attention backward",
            self.dtype,
            &[
                ("q", q, qs),
                ("k", k, ks),
                ("v", v, ks),
                ("out", out, qs),
                ("do", dout, qs),
                ("dq", &*dq, qs),
                ("dk", &*dk, ks),
                ("dv", &*dv, ks),
            ],
            lse.len(),
            [batch, hq, sq],
        )?;
        let mut p = self.base;
        p.q = q.data.device_ptr(s).0;
        p.k = k.data.device_ptr(s).0;
        p.v = v.data.device_ptr(s).0;
        p.o = out.data.device_ptr(s).0;
        p.dout = dout.data.device_ptr(s).0;
        p.lse = lse.device_ptr(s).0;
        p.dq = dq.data.device_ptr(s).0;
        p.dk = dk.data.device_ptr(s).0;
        p.dv = dv.data.device_ptr(s).0;
        p.q_s = q.strides();
        p.k_s = k.strides();
        let launch = |f: &CudaFunction, cfg: LaunchConfig| -> Result<()> {
            let mut b = s.launch_builder(f);
            b.arg(&p);
            // SAFETY: the parameter struct matches the kernels'; every pointer is a live
            // allocation of the size the kernels index (shapes checked above; plan buffers owned
            // by self).
            unsafe { b.launch(cfg) }.map_err(drv("launch backward"))?;
            Ok(())
        };
        launch(
            &self.f_prep,
            LaunchConfig {
                // prep_threads(d) threads per row, rows padded to lstride; y: the batch.
                grid_dim: (
                    (lstride(sq) * hq).div_ceil(256 / prep_threads(d)) as u32,
                    batch as u32,
                    1,
                ),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            },
        )?;
        match self.kernel {
            BwdKernel::TwoPass => {
                // dQ: a block per (query tile, head, batch [, column half]); dK/dV: per (key tile,
                // KV head, batch [, column half]).
                let z = (batch * two_pass_halves(d)) as u32;
                for (f, heads, tiles) in [(&self.f_dq, hq, sq), (&self.f_main, hk, sk)] {
                    launch(
                        f,
                        LaunchConfig {
                            grid_dim: (tiles.div_ceil(T) as u32, heads as u32, z),
                            block_dim: (128, 1, 1),
                            shared_mem_bytes: self.smem as u32,
                        },
                    )?;
                }
            }
            BwdKernel::OnePassWgmma { br, bc, .. } => {
                let ws = LaBwdWsParams {
                    tq: TmaMap::rows(q, br)?,
                    tk: TmaMap::rows(k, bc)?,
                    tv: TmaMap::rows(v, bc)?,
                    tdo: TmaMap::rows(dout, br)?,
                    p,
                };
                let mut b = s.launch_builder(&self.f_main);
                b.arg(&ws);
                let k_tiles = sk.div_ceil(bc) as u32;
                let grid_dim = if p.hgroup > 0 {
                    (k_tiles * (hk * batch) as u32, 1, 1)
                } else {
                    (k_tiles, hk as u32, batch as u32)
                };
                let cfg = LaunchConfig {
                    grid_dim,
                    // A producer warpgroup + one consumer warpgroup per 64 keys.
                    block_dim: (128 * (bc as u32 / 64 + 1), 1, 1),
                    shared_mem_bytes: self.smem as u32,
                };
                // SAFETY: as above; the TMA maps describe exactly the q, k, v, dO allocations.
                unsafe { b.launch(cfg) }.map_err(drv("launch backward"))?;
                // A thread per two elements of dq.
                launch(
                    &self.f_dq,
                    LaunchConfig {
                        grid_dim: ((batch * sq * hq * d / 2).div_ceil(256) as u32, 1, 1),
                        block_dim: (256, 1, 1),
                        shared_mem_bytes: 0,
                    },
                )?;
            }
        }
        Ok(())
    }
}

/// dQ, dK, dV of `sum(out * dout)` on the GPU; `out` and `lse` are the forward's results for
/// the same inputs and mask. bf16/f16, head dims that are multiples of 16 up to 256, D = Dv.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    dev: &Arc<CudaDevice>,
    q: &TensorView,
    k: &TensorView,
    v: &TensorView,
    out: &TensorView,
    lse: &[f32],
    dout: &TensorView,
    params: &AttnParams,
    mask: MaskSpec,
    bwd: &BackwardParams,
) -> Result<Grads> {
    run_host(dev, [q, k, v, out, dout], lse, |dims| {
        BwdPlan::new(dev, dims, q.dtype(), params, mask, bwd)
    })
}

/// [`backward`] through a gathered-key selection ([`BwdPlan::with_gather`]): `out` and `lse`
/// from the forward over `mask & selection`.
#[allow(clippy::too_many_arguments)]
pub fn backward_gathered(
    dev: &Arc<CudaDevice>,
    q: &TensorView,
    k: &TensorView,
    v: &TensorView,
    out: &TensorView,
    lse: &[f32],
    dout: &TensorView,
    params: &AttnParams,
    mask: MaskSpec,
    sel: &crate::sparse::gather::TileKeys,
    bwd: &BackwardParams,
) -> Result<Grads> {
    run_host(dev, [q, k, v, out, dout], lse, |dims| {
        BwdPlan::with_gather(dev, dims, q.dtype(), params, mask, sel, bwd)
    })
}

/// A backward plan run on host tensors: checked, uploaded, launched, downloaded.
fn run_host(
    dev: &Arc<CudaDevice>,
    [q, k, v, out, dout]: [&TensorView; 5],
    lse: &[f32],
    plan: impl FnOnce(Dims) -> Result<BwdPlan>,
) -> Result<Grads> {
    let dims =
        crate::backward::validate_inputs("cuda attention backward", q, k, v, out, lse, dout)?;
    if let Some(i) = lse.iter().position(|x| x.is_nan() || *x == f32::INFINITY) {
        return Err(Error::NonFinite {
            tensor: "lse".into(),
            index: i,
            value: lse[i],
        });
    }
    let plan = plan(dims)?;
    let up = |name: &str, t: &TensorView| DevTensor::upload(dev, name, t);
    let (qd, kd, vd, od, dod) = (
        up("q", q)?,
        up("k", k)?,
        up("v", v)?,
        up("out", out)?,
        up("do", dout)?,
    );
    let lse_d = dev.upload(lse)?;
    let mut dq = DevTensor::alloc(dev, q.shape, q.dtype())?;
    let mut dk = DevTensor::alloc(dev, k.shape, q.dtype())?;
    let mut dv = DevTensor::alloc(dev, v.shape, q.dtype())?;
    plan.launch(&qd, &kd, &vd, &od, &lse_d, &dod, &mut dq, &mut dk, &mut dv)?;
    dev.synchronize()?;
    Ok(Grads {
        dq: dq.download(dev)?,
        dk: dk.download(dev)?,
        dv: dv.download(dev)?,
    })
}

#[cfg(test)]
mod tests {
    use super::{
        head_group, kernel_build, one_pass_smem, two_pass_halves, two_pass_smem, BwdKernel,
        LaBwdParams, LaBwdWsParams, BWD_COMMON, BWD_WG,
    };
    use crate::attention::{AttnParams, Dims, MaskSpec};
    use crate::cuda::forward::{c_struct_layout, check_layout, offsets, MaskHost};
    use crate::tensor::DType;

    /// `LaBwdParams` and `LaBwdWsParams` are laid out as the kernels declare them (passed by
    /// value).
    #[test]
    fn parameter_structs_match_the_kernels() {
        let rust = offsets!(LaBwdParams; q, k, v, o, dout, lse, lse2, delta, dq, dk, dv, dq_acc,
            q_s, k_s, b, sq, sk, hq, hk, scale_log2, cap_pre, cap_post, scale, row_off, row_ent,
            col_off, col_ent, sched_batch, sched_heads, q_tiles, k_tiles, qdoc, kdoc, blk,
            blk_dims, lstride, hgroup, dq_sem, col_rank, dlo, dhi, mc);
        let size = std::mem::size_of::<LaBwdParams>();
        check_layout(BWD_COMMON, "LaBwdParams", &rust, size);
        let (c, _) = c_struct_layout(BWD_COMMON, "LaBwdParams");
        assert_eq!(c.len(), 12 + 6 + 9 + 4 + 4 + 2 + 1 + 6 + 2 + 2 + 2 + 1);
        assert!(BWD_COMMON.contains(&format!("sizeof(LaBwdParams) == {size},")));
        let ws = format!(
            "sizeof(LaBwdWsParams) == {},",
            std::mem::size_of::<LaBwdWsParams>()
        );
        assert!(BWD_WG.contains(&ws), "attn_bwd_wg.cu must assert {ws}");
        assert_eq!(std::mem::offset_of!(LaBwdWsParams, p), 4 * 128);
    }

    /// The two-pass kernels fit an A100's 163 KiB at every head dim (128 KiB at D 256, where a
    /// block owns half of the gradient columns); up to D 128 one block owns them all.
    #[test]
    fn two_pass_tiles_fit_shared_memory() {
        for d in (16..=256).step_by(16) {
            let bytes = two_pass_smem(d);
            assert!(bytes <= 128 * 1024, "D {d}: {bytes} bytes");
            assert_eq!(two_pass_halves(d), if d > 128 { 2 } else { 1 }, "D {d}");
        }
        assert_eq!(two_pass_smem(256), 128 * 1024);
    }

    /// Tuning aid, run by hand: writes the default one-pass backward's CUBIN for `full` and
    /// `causal` (D 64 / 128, bf16) to `$LONGATTN_DUMP_CUBIN`, to read its SASS with `nvdisasm`
    /// without a GPU: `LONGATTN_DUMP_CUBIN=/tmp/cub cargo test -p longattn --lib dump_backward
    /// -- --ignored`.
    #[test]
    #[ignore = "a tuning aid that writes files, not a check: run by hand with LONGATTN_DUMP_CUBIN (docs/PERF.md)"]
    fn dump_backward_cubins() {
        let Some(dir) = super::super::compile::dump_dir() else {
            return;
        };
        for mask in ["full", "causal"] {
            let bm = crate::mask::MaskExpr::parse(mask)
                .unwrap()
                .bind(crate::mask::MaskShape::square(4096), None)
                .unwrap();
            let program = bm.cuda_program().source;
            for d in [64, 128] {
                let kernel = BwdKernel::choose(d, (9, 0), false);
                let (src, variant, _, _, _, defines) = kernel_build(
                    kernel,
                    DType::BF16,
                    d,
                    &AttnParams::default(),
                    &program,
                    super::BwdSteps::from_env(),
                );
                super::super::compile::dump_cubin(
                    &dir,
                    &format!("{mask}_{variant}"),
                    &src,
                    &defines,
                );
            }
        }
    }

    /// The backward through a gathered selection (`BwdPlan::with_gather`): the keys program
    /// (mask && key bit, `DevMask::gathered`) over causal and over no mask compiles into the
    /// one-pass kernel at both head dims and in both modes, clean for ptxas, and into the
    /// two-pass kernel.
    #[test]
    fn gathered_backward_kernels_compile_with_nvrtc() {
        if super::super::compile::test_programs().is_none() {
            return;
        }
        let bm = crate::mask::MaskExpr::parse("causal")
            .unwrap()
            .bind(crate::mask::MaskShape::square(500), None)
            .unwrap();
        let causal = bm.cuda_program().source;
        for (what, expr) in [
            ("causal", causal.as_str()),
            ("full", crate::cuda::forward::ALL_PAIRS),
        ] {
            let program = crate::cuda::forward::keys_program(expr);
            for d in [64, 128] {
                for det in [false, true] {
                    let kernel = BwdKernel::choose(d, (9, 0), det);
                    let (src, variant, _, _, _, defines) = kernel_build(
                        kernel,
                        DType::BF16,
                        d,
                        &AttnParams::default(),
                        &program,
                        super::BwdSteps::defaults(),
                    );
                    let name = format!("test_keys_{what}_{variant}");
                    super::super::compile::assert_ptxas_clean(&name, &src, &defines);
                }
            }
            // The two-pass kernel (other GPUs, other head dims): that it compiles, as
            // two_pass_kernels_compile_with_nvrtc checks it for the plain programs.
            let (src, variant, _, _, _, defines) = kernel_build(
                BwdKernel::TwoPass,
                DType::BF16,
                96,
                &AttnParams::default(),
                &program,
                super::BwdSteps::defaults(),
            );
            let name = format!("test_keys_{what}_{variant}");
            super::super::compile::assert_compiles(&name, &src, "sm_80", &defines);
        }
    }

    /// Document masks whose documents are runs of keys (element and interval programs, the run
    /// bounds read from `p.dlo` / `p.dhi`), built as the plan builds them (`MaskHost`), compile
    /// into the one-pass kernel at both head dims and in both modes, clean for ptxas.
    #[test]
    fn document_backward_kernels_compile_with_nvrtc() {
        if super::super::compile::test_programs().is_none() {
            return;
        }
        let shape = crate::mask::MaskShape {
            batch: 1,
            sq: 500,
            sk: 500,
        };
        let ids: Vec<i32> = (0..500).map(|i| (i >= 200) as i32).collect();
        for expr in ["document", "causal & document", "document & window(64,0)"] {
            let docs = crate::mask::DocIds {
                q: ids.clone(),
                k: ids.clone(),
            };
            let bm = crate::mask::MaskExpr::parse(expr)
                .unwrap()
                .bind(shape, Some(docs))
                .unwrap();
            for d in [64, 128] {
                let dims = Dims {
                    batch: 1,
                    sq: 500,
                    sk: 500,
                    hq: 1,
                    hk: 1,
                    d,
                    dv: d,
                };
                for det in [false, true] {
                    let kernel = BwdKernel::choose(d, (9, 0), det);
                    let BwdKernel::OnePassWgmma { br, bc, .. } = kernel else {
                        panic!("D {d}: not the one-pass kernel on Hopper");
                    };
                    let h = MaskHost::new(MaskSpec::Expr(&bm), br, bc, dims).unwrap();
                    assert!(h.program.contains("p.dlo"), "{expr}: no interval form");
                    let (src, variant, _, _, _, defines) = kernel_build(
                        kernel,
                        DType::BF16,
                        d,
                        &AttnParams::default(),
                        &h.program,
                        super::BwdSteps::defaults(),
                    );
                    let name = format!("test_doc_{variant}");
                    super::super::compile::assert_ptxas_clean(&name, &src, &defines);
                }
            }
        }
    }

    /// The launch order's defaults on an H100's 132 SMs and 50 MiB of L2 (dims: B x Sq x Hq x D,
    /// 16k tokens): the fast mode groups four heads where a head has fewer key tiles than half
    /// the SMs (4k: 32 key tiles of 128) and keeps key tiles fastest at 16k (128); the
    /// deterministic mode groups by L2; the environment overrides both.
    #[test]
    fn launch_groups_follow_key_tiles_and_l2() {
        let (sms, l2) = (132, 50 << 20);
        let dims = |b, n, h, d| Dims {
            batch: b,
            sq: n,
            sk: n,
            hq: h,
            hk: h,
            d,
            dv: d,
        };
        // (dims, deterministic, key tiles, environment, pairs per group)
        let cases = [
            // 4k, D 64: 4 x 32 pairs of 32 key tiles; D 128: 4 x 16.
            (dims(4, 4096, 32, 64), false, 32, None, 4),
            (dims(4, 4096, 16, 128), false, 32, None, 4),
            // 16k: 128 key tiles fill a wave.
            (dims(1, 16384, 32, 64), false, 128, None, 0),
            // One pair: nothing to group. A pair bigger than L2 / 4: as many as fit.
            (dims(1, 4096, 1, 64), false, 32, None, 0),
            (dims(8, 65536 / 2, 2, 128), false, 32, None, 1),
            // Deterministic: L2 groups (4k D 64: 2 MiB a pair -> 25).
            (dims(4, 4096, 32, 64), true, 32, None, 25),
            // Overrides, capped by the pairs; an unreadable one is the 3-D grid.
            (dims(4, 4096, 32, 64), false, 32, Some("0"), 0),
            (dims(4, 4096, 32, 64), false, 32, Some("l2"), 25),
            (dims(1, 4096, 2, 64), false, 32, Some("8"), 2),
            (dims(4, 4096, 32, 64), false, 32, Some("x"), 0),
        ];
        for (dm, det, k_tiles, env, want) in cases {
            assert_eq!(
                head_group(sms, l2, &dm, det, k_tiles, env),
                want,
                "{dm:?} deterministic {det} key tiles {k_tiles} env {env:?}"
            );
        }
    }

    /// The one-pass kernel compiles under NVRTC for sm_90a in every mode (no GPU needed, only
    /// `libnvrtc`; skipped, and said so, without it): D 64 / 128, bf16 / f16, fast and ordered
    /// adds, dQ merged with dK last (the default, the split wait at D 64 only) or split, in bf16
    /// also merged with the split wait at both head dims (which soft-cap turns off), with one
    /// wait at both, and with dK first ([`BwdSteps`]), with and without soft-cap; ptxas keeps
    /// every wgmma asynchronous and spills nothing.
    #[test]
    fn one_pass_kernels_compile_with_nvrtc() {
        let Some((program, _)) = super::super::compile::test_programs() else {
            return;
        };
        let mut n = 0;
        for d in [64, 128] {
            for det in [false, true] {
                let kernel = BwdKernel::choose(d, (9, 0), det);
                assert!(matches!(kernel, BwdKernel::OnePassWgmma { .. }));
                for dtype in [DType::BF16, DType::F16] {
                    // (merge, wait, dK last, dQ adds): the default (merged, the wait by head
                    // dim, dK last, the producer's adder warps), split dQ with one wait; in bf16
                    // also merged with the split wait everywhere (dK first / last, with and
                    // without the adder warps), with one wait everywhere (dK last / first), and
                    // the default with vector reductions or with bulk adds issued by the
                    // consumers.
                    use super::DqAdd::{Bulk, Red, Warp};
                    use super::Wait::{Auto, One, Split};
                    let mut steps = vec![(true, Auto, true, Warp), (false, One, false, Warp)];
                    if dtype == DType::BF16 {
                        steps.extend([
                            (true, Split, false, Warp),
                            (true, Split, true, Bulk),
                            (true, Split, true, Warp),
                            (true, One, true, Warp),
                            (true, One, false, Warp),
                            (true, Auto, true, Red),
                            (true, Auto, true, Bulk),
                        ]);
                    }
                    for (merge, wait, dk_last, dq_add) in steps {
                        for softcap in [None, Some(20.0)] {
                            let params = AttnParams {
                                softcap,
                                ..Default::default()
                            };
                            let steps = super::BwdSteps {
                                merge,
                                wait,
                                dk_last,
                                dq_add,
                                l2pre: 0,
                                arrive_all: false,
                                knock: 0,
                            };
                            let (src, variant, _, _, _, defines) =
                                kernel_build(kernel, dtype, d, &params, &program, steps);
                            // The split wait where asked (by default at D 64 only), without
                            // soft-cap; at D 64 (BR 128) only with the producer's dQ adds.
                            let split_on = defines
                                .iter()
                                .any(|(k, v)| k == "LA_BWD_SPLITWAIT" && v == "1");
                            let asked = match wait {
                                Auto => d == 64,
                                One => false,
                                Split => true,
                            };
                            let want =
                                asked && softcap.is_none() && (d == 128 || dq_add == Warp || det);
                            assert_eq!(split_on, want, "{variant} {defines:?}");
                            let name = format!("test_{variant}");
                            super::super::compile::assert_ptxas_clean(&name, &src, &defines);
                            n += 1;
                        }
                    }
                }
            }
        }
        assert_eq!(n, 88);
    }

    /// The reduced reproduction of the hand-back pattern racecheck reports in the one-pass
    /// kernel (`scripts/gpu/racecheck_repro.cu`, run by `dense_check.sh racerepro`) still
    /// compiles against the crate's own mbarrier and bulk-copy helpers (its `#include`s are the
    /// kernels' `common.cuh` and `tma.cuh`, given here as text).
    #[test]
    fn racecheck_repro_compiles_with_nvrtc() {
        if super::super::compile::test_programs().is_none() {
            return;
        }
        let repro = include_str!("../../../../scripts/gpu/racecheck_repro.cu");
        assert!(
            repro.contains("#include \"common.cuh\"") && repro.contains("#include \"tma.cuh\"")
        );
        let body: String = repro
            .lines()
            .filter(|l| !l.starts_with("#include \""))
            .map(|l| format!("{l}\n"))
            .collect();
        let src = format!(
            "{}\n{}\n{body}",
            super::super::forward::COMMON,
            super::super::forward::TMA
        );
        super::super::compile::assert_compiles(
            "test_racecheck_repro",
            &src,
            "sm_90a",
            &[("LA_F16".into(), "0".into())],
        );
    }

    /// Source, variant and defines of the one-pass `kernel` in bf16 at head dim `d` under `steps`
    /// (default attention parameters), checked to carry the define `key` = `value`.
    fn build_with_define(
        kernel: BwdKernel,
        d: usize,
        steps: super::BwdSteps,
        program: &str,
        (key, value): (&str, &str),
    ) -> (String, String, Vec<(String, String)>) {
        let params = AttnParams::default();
        let (src, variant, _, _, _, defines) =
            kernel_build(kernel, DType::BF16, d, &params, program, steps);
        assert!(
            defines.iter().any(|(k, v)| k == key && v == value),
            "{variant} {defines:?}"
        );
        (src, variant, defines)
    }

    /// Every consumer thread arriving on the stage's "empty" barrier
    /// (`LONGATTN_CUDA_BWD_ARRIVE=all`) keeps the one-pass kernel clean for ptxas in both modes
    /// at both head dims, under the default steps.
    #[test]
    fn arrive_all_kernels_compile_with_nvrtc() {
        let Some((program, _)) = super::super::compile::test_programs() else {
            return;
        };
        for d in [64, 128] {
            for det in [false, true] {
                let kernel = BwdKernel::choose(d, (9, 0), det);
                let steps = super::BwdSteps {
                    arrive_all: true,
                    ..super::BwdSteps::defaults()
                };
                let (src, variant, defines) =
                    build_with_define(kernel, d, steps, &program, ("LA_ARRIVE_ALL", "1"));
                let name = format!("test_arrive_all_{variant}");
                super::super::compile::assert_ptxas_clean(&name, &src, &defines);
            }
        }
    }

    /// The timing experiments (`LONGATTN_CUDA_BWD_KNOCK`, fast mode, the default steps) compile
    /// for every knock `dense_check.sh knock` runs, at both tiles (D 64: BR 128, D 128: BR 64).
    #[test]
    fn knock_kernels_compile_with_nvrtc() {
        let Some((program, _)) = super::super::compile::test_programs() else {
            return;
        };
        for d in [64, 128] {
            let kernel = BwdKernel::choose(d, (9, 0), false);
            for knock in [1, 2, 4, 6, 16] {
                let steps = super::BwdSteps {
                    knock,
                    ..super::BwdSteps::defaults()
                };
                let want = knock.to_string();
                let (src, variant, defines) =
                    build_with_define(kernel, d, steps, &program, ("LA_KNOCK", &want));
                super::super::compile::assert_compiles(
                    &format!("test_knock{knock}_{variant}"),
                    &src,
                    "sm_90a",
                    &defines,
                );
            }
        }
    }

    /// The opt-in L2 preload (`LONGATTN_CUDA_BWD_L2PRE`) keeps the one-pass kernel clean for
    /// ptxas (asynchronous wgmma, no spills) at every depth the benchmarks try.
    #[test]
    fn l2_preload_kernels_compile_with_nvrtc() {
        let Some((program, _)) = super::super::compile::test_programs() else {
            return;
        };
        for d in [64, 128] {
            let kernel = BwdKernel::choose(d, (9, 0), false);
            for l2pre in [2, 4, 8, 16] {
                // Above the kernel's cap (8 at D 128, 4 at D 64) runs as the cap.
                let steps = super::BwdSteps {
                    l2pre,
                    ..super::BwdSteps::defaults()
                };
                let (src, variant, _, _, _, defines) = kernel_build(
                    kernel,
                    DType::BF16,
                    d,
                    &AttnParams::default(),
                    &program,
                    steps,
                );
                let name = format!("test_l2pre{l2pre}_{variant}");
                super::super::compile::assert_ptxas_clean(&name, &src, &defines);
            }
        }
    }

    /// The two-pass kernels (and the shared `la_bwd_prep`, whose threads per row follow D)
    /// compile at head dims off the one-pass kernel's 64 / 128, in both storage types.
    #[test]
    fn two_pass_kernels_compile_with_nvrtc() {
        let Some((program, _)) = super::super::compile::test_programs() else {
            return;
        };
        for d in [16, 48, 96, 256] {
            for dtype in [DType::BF16, DType::F16] {
                let (src, variant, _, _, _, defines) = kernel_build(
                    BwdKernel::TwoPass,
                    dtype,
                    d,
                    &AttnParams::default(),
                    &program,
                    super::BwdSteps::defaults(),
                );
                let name = format!("test_{variant}");
                super::super::compile::assert_compiles(&name, &src, "sm_80", &defines);
            }
        }
    }

    /// A gated mask's program (the expression ANDed with the gate's table) compiles in the
    /// one-pass backward (NVRTC; skipped without `libnvrtc`).
    #[test]
    fn gated_backward_kernels_compile_with_nvrtc() {
        let Some((program, _)) = super::super::compile::test_programs() else {
            return;
        };
        let program = crate::cuda::forward::gated_program(&program);
        let kernel = BwdKernel::choose(128, (9, 0), false);
        let (src, variant, _, _, _, defines) = kernel_build(
            kernel,
            DType::BF16,
            128,
            &AttnParams::default(),
            &program,
            super::BwdSteps::defaults(),
        );
        let name = format!("test_gated_{variant}");
        super::super::compile::assert_compiles(&name, &src, "sm_90a", &defines);
    }

    /// Both one-pass tile configurations fit Hopper's 227 KiB of shared memory per block.
    #[test]
    fn one_pass_tiles_fit_shared_memory() {
        for d in [64, 128] {
            let BwdKernel::OnePassWgmma { br, bc, .. } = BwdKernel::choose(d, (9, 0), false) else {
                panic!("D {d}: no one-pass kernel");
            };
            for merge in [false, true] {
                let bytes = one_pass_smem(br, bc, d, merge);
                assert!(bytes <= 227 * 1024, "D {d} merge {merge}: {bytes} bytes");
            }
        }
    }

    /// The one-pass kernel serves both modes on Hopper at D 64 / 128 (ordered adds in the
    /// deterministic one), the two-pass kernels everything else.
    #[test]
    fn one_pass_only_on_hopper_at_64_and_128() {
        let hopper = (9, 0);
        for det in [false, true] {
            assert_eq!(
                BwdKernel::choose(64, hopper, det),
                BwdKernel::OnePassWgmma {
                    br: 128,
                    bc: 128,
                    ordered: det
                }
            );
            assert_eq!(
                BwdKernel::choose(128, hopper, det),
                BwdKernel::OnePassWgmma {
                    br: 64,
                    bc: 128,
                    ordered: det
                }
            );
        }
        for (d, cc, det) in [
            (96, hopper, true),
            (256, hopper, false),
            (96, hopper, false),
            (32, hopper, false),
            (128, (8, 0), false),
            (64, (8, 9), false),
        ] {
            assert_eq!(
                BwdKernel::choose(d, cc, det),
                BwdKernel::TwoPass,
                "{d} {cc:?} {det}"
            );
        }
    }
}
