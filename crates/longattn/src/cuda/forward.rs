//! Host side of the CUDA forward: tile configuration, schedule preparation, launch.
//!
//! A [`FwdPlan`] is everything that depends on the problem but not on the data: the kernel
//! variant (compiled once per dtype / head dim / tile config / mask program *structure*: the
//! mask's constants travel in the parameters, `LaFwdParams::mc`), the block schedule
//! built for the kernel's tiles and uploaded, document ids, the launch grid. [`FwdPlan::launch`]
//! then runs on device tensors ([`DevTensor`]); [`forward`] is the host-in, host-out wrapper
//! with [`crate::forward`]'s contract.
use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};
use half::{bf16, f16};

use super::{drv, CudaDevice};
use crate::attention::{validate, AttnOutput, AttnParams, Dims, MaskSpec};
use crate::error::{Error, Result};
use crate::mask::codegen::MASK_CONSTS;
use crate::mask::{BlockSchedule, TileEntry, TileKind};
use crate::sparse::gather::TileKeys;
use crate::tensor::{Buffer, DType, Slice, Tensor, TensorView};

pub(crate) const COMMON: &str = include_str!("kernels/common.cuh");
/// Swizzled shared-memory tiles of the mma.sync kernels (forward and backward).
pub(crate) const MMA_TILE: &str = include_str!("kernels/mma_tile.cuh");
pub(crate) const PARAMS: &str = include_str!("kernels/fwd_params.cuh");
const FWD: &str = include_str!("kernels/attn_fwd.cu");
pub(crate) const WGMMA: &str = include_str!("kernels/wgmma.cuh");
const FWD_WG: &str = include_str!("kernels/attn_fwd_wg.cu");
pub(crate) const TMA: &str = include_str!("kernels/tma.cuh");
const FWD_WS: &str = include_str!("kernels/attn_fwd_ws.cu");
const TOKENS: &str = include_str!("kernels/tile_tokens.cuh");
const WG_SOFTMAX: &str = include_str!("kernels/wg_softmax.cuh");
const MASK_BITS: &str = include_str!("kernels/mask_bits.cu");

/// A comma-separated list of numbers from an environment variable (tuning overrides).
pub(crate) fn env_list(key: &str) -> Vec<usize> {
    std::env::var(key)
        .unwrap_or_default()
        .split(',')
        .filter_map(|x| x.trim().parse().ok())
        .collect()
}

/// Whether a tuning switch in the environment is set to `0` (off).
pub(crate) fn env_off(key: &str) -> bool {
    std::env::var(key).is_ok_and(|v| v == "0")
}

/// How many (batch, head) pairs the warp-specialized kernel walks together ([`ws_work_list`]):
/// one, heads outermost, so that the blocks running at once read the keys and values of as few
/// heads as the query tiles allow. `LONGATTN_CUDA_HGROUP=N` sets it (tuning runs).
///
/// Until 2026-12-06 the group was the query heads whose keys and values fill half of L2 (3 at
/// 16k D 128). One head at a time was faster on the whole in every call that compared them:
/// the first H200 table (full / causal 16k D 128 620 / 676 against 603-619 / 651-652), and on
/// an H100 under sustained load (`bench --sustain 2`, full 4k D 64 / 128 +5% / +9%, 16k +4% /
/// +2%; 16k read 520 MB from DRAM per launch with 3 heads, L2 hit rate 92.8%: power the cap
/// takes from the clock) and in short bursts (geometric mean +1.2% over full / causal 4k / 16k,
/// from -2% to +4% per config), docs/PERF.md.
fn ws_head_group(pairs: usize) -> usize {
    std::env::var("LONGATTN_CUDA_HGROUP")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&g| g > 0)
        .map_or(1, |g| g.min(pairs.max(1)))
}

/// The warp-specialized kernel's work lists: `blocks + 1` offsets, then every item
/// `(b Hq + h) q_tiles + qt` once, block x's items at `[offsets[x], offsets[x + 1])` in the order
/// it runs them.
///
/// Items are taken in locality order: the `pairs` (batch, head) pairs in groups of `group`
/// consecutive pairs, group after group; inside a group query tiles outermost, heaviest first
/// (causal: the last tiles have the most keys), the group's pairs innermost. Each item goes to
/// the block with the least work so far (list scheduling; `cost(pair, qt)` = its key tiles, plus
/// one for the epilogue). Blocks then start items in about the locality order, so the blocks
/// running at once read the keys and values of about one group (which stay in L2), and no block
/// ends more than one item's cost after the average: a static stride over a group's uneven
/// (causal) items left some blocks with twice the work of others.
fn ws_work_list(
    pairs: usize,
    q_tiles: usize,
    group: usize,
    blocks: usize,
    cost: impl Fn(usize, usize) -> usize,
) -> Vec<u32> {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    let group = group.clamp(1, pairs.max(1));
    let blocks = blocks.max(1);
    let mut lists: Vec<Vec<u32>> = vec![Vec::new(); blocks];
    // (load, block): the least loaded block first, the lowest index among equals.
    let mut heap: BinaryHeap<Reverse<(u64, usize)>> =
        (0..blocks).map(|x| Reverse((0, x))).collect();
    for g0 in (0..pairs).step_by(group) {
        let g1 = (g0 + group).min(pairs);
        for qt in (0..q_tiles).rev() {
            for bh in g0..g1 {
                let Some(Reverse((load, x))) = heap.pop() else {
                    unreachable!("the heap holds every block")
                };
                lists[x].push((bh * q_tiles + qt) as u32);
                heap.push(Reverse((load + cost(bh, qt) as u64 + 1, x)));
            }
        }
    }
    let mut out = Vec::with_capacity(blocks + 1 + pairs * q_tiles);
    let mut off = 0u32;
    out.push(0);
    for l in &lists {
        off += l.len() as u32;
        out.push(off);
    }
    for l in lists {
        out.extend(l);
    }
    out
}

/// Which forward kernel runs a problem (one contract, three instruction sets).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FwdKernel {
    /// `attn_fwd.cu`: mma.sync + ldmatrix, every GPU from sm_80, head dims to 256.
    MmaSync,
    /// `attn_fwd_wg.cu`: Hopper warpgroup MMA, all warps load and compute.
    Wgmma,
    /// `attn_fwd_ws.cu`: Hopper warpgroup MMA with a TMA producer warpgroup, intra-warpgroup
    /// overlap of softmax and P V, ping-pong between consumer warpgroups.
    WarpSpecialized,
}

/// Tile configuration of the forward kernel for one head dim (one table, one reason each).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TileCfg {
    /// Query rows per block.
    pub br: usize,
    /// Keys per tile.
    pub bc: usize,
    pub warps: usize,
    /// Blocks of 16 query rows per warp: `br = 16 * mt * warps`.
    pub mt: usize,
    /// Keep Q fragments in registers for the whole block (saves a shared-memory read per MMA).
    pub qregs: bool,
    /// Blocks per SM the register budget is sized for (`__launch_bounds__`).
    pub min_blocks: usize,
    /// The kernel (Hopper ones: warps come in warpgroups of 4, 64 query rows per consumer
    /// warpgroup).
    pub kernel: FwdKernel,
}

impl TileCfg {
    /// The tile configuration for head dim `d` and `sk` keys on a GPU of compute capability `cc`.
    pub fn choose(d: usize, sk: usize, cc: (i32, i32)) -> TileCfg {
        Self::choose_with(d, sk, cc, ws_wide())
    }

    /// [`choose`](Self::choose) with the D 256 and padded head dims of the warp-specialized
    /// kernel on or off (`wide`, [`ws_wide`]).
    fn choose_with(d: usize, sk: usize, cc: (i32, i32), wide: bool) -> TileCfg {
        if let Some(t) = Self::from_env() {
            return t;
        }
        // `LONGATTN_CUDA_WGMMA=0`: no Hopper kernels; `LONGATTN_CUDA_WS=0`: the warpgroup-MMA
        // kernel without warp specialization.
        let hopper = cc == (9, 0) && !env_off("LONGATTN_CUDA_WGMMA");
        let ws = hopper && !env_off("LONGATTN_CUDA_WS");
        // Head dims between the kernels' own run padded (`ws_dim`).
        let d = match ws_dim(d, wide) {
            Some(k) if ws => k,
            _ => d,
        };
        if ws && wide && d == 256 {
            // D 256: two consumers of 64 rows (O is 128 registers a thread), 64-key tiles, one Q
            // stage (attn_fwd_ws.cu); without `wide`, or with `LONGATTN_CUDA_WS=0`, the mma.sync
            // kernel.
            return Self::warp_specialized(2, 64, 1);
        }
        let hopper = hopper && (d == 64 || d == 128);
        if hopper && ws {
            // Warp-specialized: one TMA producer warpgroup + consumers of 64 rows, persistent
            // blocks, one per SM (consumers get 240 registers with 2 of them, 160 with 3).
            // Measured at n 1k / 4k / 16k (full / causal TFLOP/s, non-persistent blocks):
            // D 64: 3 x 128 keys 298/140, 389/250, 425/305; 2 x 128 280/149, -, 360/273;
            // 3 x 64 266/146, 343/243, 377/297. D 128: 3 x 64 377/222, 506/373, 526/448;
            // 2 x 128 327/229, -, 505/468; 3 x 128 237/161, 292/285, 310/349.
            // `LONGATTN_CUDA_WS=consumers,bc[,blocks per SM]` overrides.
            let (nwg, bc, minb) = match env_list("LONGATTN_CUDA_WS")[..] {
                [n, b] if (1..=3).contains(&n) && (b == 64 || b == 128) => (n, b, 1),
                // Two blocks per SM fit the register file with one consumer warpgroup only.
                [n, b, m] if (1..=3).contains(&n) && (b == 64 || b == 128) => {
                    (n, b, if n == 1 { m.clamp(1, 2) } else { 1 })
                }
                _ if d == 64 => (3, 128, 1),
                // D 128: 2 x 128 from 2k keys on (n 4k / 16k full 538 / 570, causal 508 / 585,
                // against 497 / 501 and 447 / 519 for 3 x 64); below, 3 x 64 (n 1k full 373 vs
                // 305, causal 272 vs 247: more, shorter items keep the SMs busy).
                _ if sk >= 2048 => (2, 128, 1),
                _ => (3, 64, 1),
            };
            return Self::warp_specialized(nwg, bc, minb);
        }
        if hopper {
            return Self::choose_wgmma(d, false);
        }
        Self::mma_sync(d)
    }

    /// The mma.sync kernel (any GPU of compute capability 8.0 or later, D a multiple of 16 up to
    /// 256).
    fn mma_sync(d: usize) -> TileCfg {
        if d <= 128 {
            // 4 warps x 32 rows: every K/V fragment read from shared memory feeds two MMAs
            // (16-row warps were bound by shared-memory reads: 8 warps re-read each tile).
            // Measured on H100 at n 16k: D 128 with bc 64 ran 269 TFLOP/s (a few registers
            // spill) against 243 with bc 32; D 64: bc 64 250, bc 128 232.
            TileCfg {
                br: 128,
                bc: 64,
                warps: 4,
                mt: 2,
                qregs: false,
                min_blocks: 1,
                kernel: FwdKernel::MmaSync,
            }
        } else {
            // D 256: O alone takes 128 registers a thread; 16-row warps, Q re-read from shared
            // memory.
            TileCfg {
                br: 64,
                bc: 64,
                warps: 4,
                mt: 1,
                qregs: false,
                min_blocks: 1,
                kernel: FwdKernel::MmaSync,
            }
        }
    }

    /// The Hopper warp-specialized kernel: `nwg` consumer warpgroups of 64 rows, `bc`-key tiles,
    /// `minb` blocks per SM.
    fn warp_specialized(nwg: usize, bc: usize, minb: usize) -> TileCfg {
        TileCfg {
            br: 64 * nwg,
            bc,
            warps: 4 * (nwg + 1),
            mt: 1,
            qregs: false,
            min_blocks: minb,
            kernel: FwdKernel::WarpSpecialized,
        }
    }

    /// The Hopper warpgroup-MMA kernel without warp specialization (D 64 / 128; other head dims
    /// take the mma.sync kernel). `nbr2d`: the mask is a 2-D neighborhood (Partial tiles
    /// everywhere, short schedule rows).
    fn choose_wgmma(d: usize, nbr2d: bool) -> TileCfg {
        if d != 64 && d != 128 {
            return Self::mma_sync(d);
        }
        // Hopper: 2 warpgroups x 64 rows, 64-key tiles, two blocks per SM (registers capped
        // at 128: D 128 spills ~50 bytes a thread, still the fastest). Measured at n 16k
        // (full / causal TFLOP/s, D 128 | D 64): 2 WG x 128 keys, 1 block: 319/287 | 242/183;
        // 2 x 64, 2 blocks: 367/370 | 286/264; 3 x 64: 356/326 | 243/205; 3 x 128:
        // 366/349 | 287/230; 4 x 64: 391/343 | 258/233.
        // `LONGATTN_CUDA_WG=warpgroups,bc,min_blocks` overrides.
        let (nwg, bc, minb) = match env_list("LONGATTN_CUDA_WG")[..] {
            [n, b, m] if (1..=4).contains(&n) && (b == 64 || b == 128) => (n, b, m.max(1)),
            // 2-D neighborhoods at D 64: one warpgroup, three blocks per SM (n 1k / 4k ms: 0.375
            // / 0.622 against 0.428 / 0.743 with 2 x 64 and two blocks; 1 x 64 with four 0.379 /
            // 0.627). At D 128, 2 x 64 stays (0.282 / 0.481 against 0.356 / 0.554 for 1 x 64 x 3).
            _ if d == 64 && nbr2d => (1, 64, 3),
            _ => (2, 64, 2),
        };
        TileCfg {
            br: 64 * nwg,
            bc,
            warps: 4 * nwg,
            mt: 1,
            qregs: false,
            min_blocks: minb,
            kernel: FwdKernel::Wgmma,
        }
    }

    /// `LONGATTN_CUDA_TILE=br,bc,warps,qregs,min_blocks` overrides the table (tuning runs).
    fn from_env() -> Option<TileCfg> {
        let v: Vec<usize> = std::env::var("LONGATTN_CUDA_TILE")
            .ok()?
            .split(',')
            .filter_map(|x| x.trim().parse().ok())
            .collect();
        let [br, bc, warps, qregs, min_blocks] = v[..] else {
            return None;
        };
        let mt = br / (16 * warps.max(1));
        (mt >= 1 && br == 16 * mt * warps && bc % 16 == 0 && bc > 0).then_some(TileCfg {
            br,
            bc,
            warps,
            mt,
            qregs: qregs != 0,
            min_blocks: min_blocks.max(1),
            kernel: FwdKernel::MmaSync,
        })
    }

    /// Dynamic shared memory: Q [br][d] + two stages of K [bc][d] + V [bc][d], 2-byte elements
    /// (+ 1 KiB to align the wgmma kernel's swizzle atoms); `d`: the kernel's head dim
    /// ([`kernel_dim`]).
    pub fn smem(&self, d: usize) -> usize {
        let tiles = (self.br + 4 * self.bc) * d * 2;
        match self.kernel {
            FwdKernel::MmaSync => tiles,
            FwdKernel::Wgmma => tiles + 1024,
            // + the Q stages past the first (attn_fwd_ws.cu's LA_QST: one at D 256, else two),
            // the twelve mbarriers of the TMA rings and skip-softmax's votes (128 bytes).
            FwdKernel::WarpSpecialized => {
                let q_stages = if d == 256 { 1 } else { 2 };
                tiles + (q_stages - 1) * self.br * d * 2 + 1024 + 128
            }
        }
    }
}

/// Kernel parameters; field for field `LaFwdParams` in `kernels/fwd_params.cuh` (passed by
/// value: the layouts must match byte for byte; sizes are checked on both sides).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct LaFwdParams {
    q: u64,
    k: u64,
    v: u64,
    o: u64,
    lse: u64,
    q_s: [i64; 3],
    k_s: [i64; 3],
    v_s: [i64; 3],
    o_s: [i64; 3],
    b: i32,
    sq: i32,
    sk: i32,
    hq: i32,
    hk: i32,
    scale_log2: f32,
    cap_pre: f32,
    cap_post: f32,
    sched_off: u64,
    sched_ent: u64,
    sched_batch: i32,
    sched_heads: i32,
    q_tiles: i32,
    pad0: i32,
    qdoc: u64,
    kdoc: u64,
    blk: u64,
    blk_dims: [i32; 6],
    dlo: u64,
    dhi: u64,
    mbits: u64,
    mbix: u64,
    mgrp: u64,
    /// The mask program's atom constants (`p.mc[k]`, [`crate::mask::codegen::CudaProgram`]).
    mc: [i32; MASK_CONSTS],
}

// The C side asserts the same sizes (`static_assert` in fwd_params.cuh and attn_fwd_ws.cu).
const _: () = assert!(std::mem::size_of::<LaFwdParams>() == 416);
const _: () = assert!(std::mem::offset_of!(LaFwdParams, mc) == 288);
const _: () = assert!(std::mem::size_of::<LaWsParams>() == 896);

// SAFETY: plain-old-data with the C layout of the kernel's parameter struct.
unsafe impl cudarc::driver::DeviceRepr for LaFwdParams {}

impl LaFwdParams {
    /// These parameters reading the schedule (CSR rows `off`, entries `ent`, shared over
    /// `batch` / `heads` as in [`BlockSchedule`]) at device addresses.
    pub(crate) fn with_schedule(
        mut self,
        (off, ent): (u64, u64),
        (batch, heads): (usize, usize),
    ) -> Self {
        self.sched_off = off;
        self.sched_ent = ent;
        self.sched_batch = batch as i32;
        self.sched_heads = heads as i32;
        self
    }
}

/// A TMA descriptor (`CUtensorMap`, 128 opaque bytes built by the driver); `LaTmap` in
/// `kernels/tma.cuh`.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub(crate) struct TmaMap([u64; 16]);

impl TmaMap {
    /// Describes a `[B, S, H, D]` tensor (any 16-byte strides) as 4-D boxes of `{64 columns, rows, 1 head,
    /// 1 batch}` written to shared memory with the 128-byte swizzle; rows past S read as zeros.
    pub(crate) fn rows(t: &DevTensor, rows: usize) -> Result<TmaMap> {
        let [b, s, h, d] = t.shape;
        let [sb, ss, sh, _] = t.strides.map(|x| (x * 2) as u64);
        // Byte strides of dims 1.. (dim 0, the head dim, is contiguous).
        Self::encode(
            t,
            &[d as u64, s as u64, h as u64, b as u64],
            &[ss, sh, sb],
            &[64, rows as u32, 1, 1],
        )
    }

    /// Describes a `[B, S, H, D]` tensor whose sequence is a grid `w` tokens wide as
    /// 5-D boxes of `{64 columns, pw grid columns, ph grid rows, 1 head, 1 batch}`: a box lands
    /// as `ph` rows of `pw` tokens, the rows of a patch tile in patch order (`mask/patch.rs`).
    pub(crate) fn patches(t: &DevTensor, w: usize, (ph, pw): (usize, usize)) -> Result<TmaMap> {
        let [b, s, h, d] = t.shape;
        if w == 0 || !s.is_multiple_of(w) {
            return Err(unsupported(format!(
                "patch order: sequence {s} is not a whole number of grid rows of {w}"
            )));
        }
        let [sb, tok, sh, _] = t.strides.map(|x| (x * 2) as u64);
        Self::encode(
            t,
            &[d as u64, w as u64, (s / w) as u64, h as u64, b as u64],
            &[tok, tok * w as u64, sh, sb],
            &[64, pw as u32, ph as u32, 1, 1],
        )
    }

    /// `cuTensorMapEncodeTiled` of `t` with the given dims (innermost first), byte strides of
    /// dims 1.. and box, written to shared memory with the 128-byte swizzle; out-of-range
    /// elements read as zeros.
    fn encode(t: &DevTensor, dims: &[u64], strides: &[u64], boxes: &[u32]) -> Result<TmaMap> {
        use cudarc::driver::sys as cu;
        let rank = dims.len();
        debug_assert!(strides.len() == rank - 1 && boxes.len() == rank);
        let unit = [1u32; 5];
        let dtype = match t.dtype {
            DType::F16 => cu::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
            _ => cu::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        };
        let mut map = std::mem::MaybeUninit::<cu::CUtensorMap>::zeroed();
        let ptr = {
            let (p, _guard) = t.data.device_ptr(t.data.stream());
            p
        };
        // SAFETY: dims and boxes have `rank` entries, strides rank - 1, `unit` at least rank;
        // `map` is a properly aligned CUtensorMap the driver fills in.
        let r = unsafe {
            cu::cuTensorMapEncodeTiled(
                map.as_mut_ptr(),
                dtype,
                rank as u32,
                ptr as *mut std::ffi::c_void,
                dims.as_ptr(),
                strides.as_ptr(),
                boxes.as_ptr(),
                unit.as_ptr(),
                cu::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                cu::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
                cu::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                cu::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
        };
        if r != cu::CUresult::CUDA_SUCCESS {
            return Err(Error::Cuda {
                op: "tensor map",
                msg: format!(
                    "cuTensorMapEncodeTiled for a {:?} tensor (box {boxes:?}) failed: {r:?}",
                    t.shape
                ),
            });
        }
        // SAFETY: initialised by the successful call; CUtensorMap is 128 bytes of plain data.
        let raw: [u64; 16] = unsafe { std::mem::transmute_copy(&map.assume_init()) };
        Ok(TmaMap(raw))
    }
}

/// Parameters of the warp-specialized kernel: TMA maps of q, k, v, then the common ones.
#[repr(C)]
#[derive(Clone, Copy)]
struct LaWsParams {
    tq: TmaMap,
    tk: TmaMap,
    tv: TmaMap,
    p: LaFwdParams,
    /// The blocks' work lists ([`ws_work_list`]).
    work: u64,
    /// Skip-softmax: the counters {tiles tested, tiles dropped} (u64) and log2 lambda.
    skip_stats: u64,
    skip_log2: f32,
    /// Pooled attention map (`LA_MAP`): per-row scratch, the two maps, block, map query / key
    /// blocks and scratch slots per consumer warpgroup.
    map_scratch: u64,
    map_mass: u64,
    map_max: u64,
    map_block: i32,
    map_qb: i32,
    map_kb: i32,
    map_cap: i32,
    /// Gathered keys (`LA_GATHER`): the chunks' key lists.
    gkeys: u64,
}

// SAFETY: plain-old-data with the C layout of the kernel's `LaWsParams` (64-byte aligned maps).
unsafe impl cudarc::driver::DeviceRepr for LaWsParams {}

/// A `[B, S, H, D]` bf16/f16 tensor on the device: memory longattn allocated (contiguous), or a
/// caller's allocation (a PyTorch tensor) borrowed with its element strides. The head dim is
/// always contiguous (stride 1); the kernels take the other three strides as parameters.
pub struct DevTensor {
    /// Dropped (freed) only when `owned`; a borrowed allocation is released by its owner.
    pub data: std::mem::ManuallyDrop<CudaSlice<u16>>,
    pub shape: [usize; 4],
    pub dtype: DType,
    /// Element strides of (batch, seq, head, dim); `strides[3] == 1`.
    pub strides: [usize; 4],
    owned: bool,
}

impl Drop for DevTensor {
    fn drop(&mut self) {
        // SAFETY: `data` is taken exactly once, here.
        let data = unsafe { std::mem::ManuallyDrop::take(&mut self.data) };
        if self.owned {
            drop(data);
        } else {
            // The caller owns the memory: forget the wrapper without freeing it.
            data.leak();
        }
    }
}

fn contiguous_strides([_, s, h, d]: [usize; 4]) -> [usize; 4] {
    [s * h * d, h * d, d, 1]
}

impl DevTensor {
    /// Copies a (possibly strided) bf16/f16 view to the device, contiguous.
    pub fn upload(dev: &CudaDevice, name: &str, v: &TensorView) -> Result<DevTensor> {
        let bits = gather_u16(name, v)?;
        Ok(Self::owned(dev.upload(&bits)?, v.shape, v.dtype()))
    }

    fn owned(data: CudaSlice<u16>, shape: [usize; 4], dtype: DType) -> DevTensor {
        DevTensor {
            data: std::mem::ManuallyDrop::new(data),
            shape,
            dtype,
            strides: contiguous_strides(shape),
            owned: true,
        }
    }

    /// An uninitialised tensor (outputs).
    pub fn alloc(dev: &CudaDevice, shape: [usize; 4], dtype: DType) -> Result<DevTensor> {
        let n = shape.iter().product::<usize>().max(1);
        // SAFETY: u16 has no invalid bit patterns; the kernel writes every element it owns.
        let data = unsafe { dev.stream().alloc::<u16>(n) }.map_err(drv("alloc"))?;
        Ok(Self::owned(data, shape, dtype))
    }

    /// Borrows a caller's device allocation: `ptr` addresses element (0, 0, 0, 0) of a bf16/f16
    /// tensor of `shape` with element `strides` (head dim contiguous), valid on `stream`'s
    /// device. Nothing is copied and nothing is freed when the wrapper is dropped.
    ///
    /// # Safety
    /// `ptr` must be a live device allocation holding every element the strides address, and it
    /// must stay alive (and not be written by others) while kernels that read it are queued.
    pub unsafe fn borrow(
        stream: &Arc<cudarc::driver::CudaStream>,
        name: &str,
        ptr: u64,
        shape: [usize; 4],
        strides: [usize; 4],
        dtype: DType,
    ) -> Result<DevTensor> {
        if !matches!(dtype, DType::BF16 | DType::F16) {
            return Err(Error::DType {
                op: "cuda attention",
                tensor: name.into(),
                got: dtype.to_string(),
                expected: "bf16 or f16 (the tensor-core kernels; use the CPU for f32)".into(),
            });
        }
        if shape.contains(&0) || strides[3] != 1 && shape[3] > 1 {
            return Err(Error::Shape {
                op: "cuda attention",
                tensor: name.into(),
                got: shape.to_vec(),
                expected: format!(
                    "every dimension >= 1 and a contiguous head dim (stride 1), got strides {strides:?}"
                ),
            });
        }
        let len = 1 + (0..4).map(|a| (shape[a] - 1) * strides[a]).sum::<usize>();
        // SAFETY: the caller guarantees the allocation; the wrapper is leaked on drop, never freed.
        let data = unsafe { stream.upgrade_device_ptr::<u16>(ptr, len) };
        Ok(DevTensor {
            data: std::mem::ManuallyDrop::new(data),
            shape,
            dtype,
            strides: [strides[0], strides[1], strides[2], 1],
            owned: false,
        })
    }

    /// True when the address and every stride are multiples of 16 bytes (what TMA descriptors
    /// need).
    pub fn tma_aligned(&self) -> bool {
        let p = self.data.device_ptr(self.data.stream()).0;
        p % 16 == 0 && self.strides[..3].iter().all(|s| (s * 2) % 16 == 0)
    }

    pub fn download(&self, dev: &CudaDevice) -> Result<Tensor> {
        if !self.is_contiguous() {
            return Err(unsupported("download of a strided device tensor".into()));
        }
        let bits: Vec<u16> = dev
            .stream()
            .clone_dtoh(&*self.data)
            .map_err(drv("copy to host"))?;
        let buf = match self.dtype {
            DType::BF16 => Buffer::BF16(bits.into_iter().map(bf16::from_bits).collect()),
            _ => Buffer::F16(bits.into_iter().map(f16::from_bits).collect()),
        };
        Tensor::new(buf, self.shape.to_vec())
    }

    pub(crate) fn strides(&self) -> [i64; 3] {
        [
            self.strides[0] as i64,
            self.strides[1] as i64,
            self.strides[2] as i64,
        ]
    }

    pub fn is_contiguous(&self) -> bool {
        self.strides == contiguous_strides(self.shape)
    }
}

/// The bits of a bf16/f16 view in `[B, S, H, D]` order.
pub(crate) fn gather_u16(name: &str, v: &TensorView) -> Result<Vec<u16>> {
    let [b, s, h, d] = v.shape;
    let mut out = Vec::with_capacity(b * s * h * d);
    let push = |out: &mut Vec<u16>, f: &dyn Fn(usize) -> u16| {
        for bi in 0..b {
            for si in 0..s {
                for hi in 0..h {
                    let o = v.offset(bi, si, hi, 0);
                    for di in 0..d {
                        out.push(f(o + di * v.strides[3]));
                    }
                }
            }
        }
    };
    match v.data {
        Slice::BF16(x) => push(&mut out, &|i| x[i].to_bits()),
        Slice::F16(x) => push(&mut out, &|i| x[i].to_bits()),
        Slice::F32(_) => {
            return Err(Error::DType {
                op: "cuda attention",
                tensor: name.into(),
                got: "f32".into(),
                expected: "bf16 or f16 (the tensor-core kernels; use the CPU backend for f32)"
                    .into(),
            })
        }
    }
    Ok(out)
}

/// The mask of one problem on the device: the schedule for the kernel's tiles (CSR rows, CSC
/// columns on request), the mask program compiled into the kernel (`la_mask`) and its constants,
/// document ids and the explicit block table. Shared by the forward and the backward.
pub(crate) struct DevMask {
    pub sched: BlockSchedule,
    /// CUDA source of `la_mask`: generated from the expression, a table lookup for block masks,
    /// or `return true` when the schedule has no Partial tile. Its text depends on the
    /// expression's structure only; the atoms' constants are `consts`.
    pub program: String,
    /// The program's atom constants, for the parameter structs' `mc` (zeros when it reads none).
    pub consts: [i32; MASK_CONSTS],
    pub row_off: CudaSlice<u32>,
    pub row_ent: CudaSlice<u32>,
    pub qdoc: CudaSlice<i32>,
    pub kdoc: CudaSlice<i32>,
    /// First / last key of each query row's document run (interval programs with documents).
    pub dlo: CudaSlice<i32>,
    pub dhi: CudaSlice<i32>,
    pub blk: CudaSlice<u8>,
    /// tile_q, tile_k, q_tiles, k_tiles, batch, heads of the block table.
    pub blk_dims: [i32; 6],
    /// The Partial tiles' mask bits (`kernels/mask_bits.cu`) and, per schedule entry, its tile in
    /// that table, and per table tile the 64-row groups that allow some key; 1-element
    /// placeholders until [`DevMask::build_bits`].
    pub mbits: CudaSlice<u32>,
    pub mbix: CudaSlice<u32>,
    /// Per table tile: bit g set when its rows 64 g .. 64 g + 63 allow some key.
    pub mgrp: CudaSlice<u32>,
}

/// The program of a schedule without Partial tiles: no pair is masked, and a tile's only bound is
/// Sk. It is an interval program too (every row allows keys 0 ..= Sk - 1), so the
/// warp-specialized kernels take their interval path for the last key tile: two compares an
/// element instead of the element program's loop, and on three consumers (D 64) the descriptors
/// by one add, which the element path's registers do not leave room for (`kernel_build`).
const NO_MASK: &str = "template <typename P>\n__device__ __forceinline__ bool la_mask(const P&, int, int, int, int) { return true; }\n#define LA_MASK_INTERVAL 1\ntemplate <typename P>\n__device__ __forceinline__ void la_mask_interval(const P& p, int, int, int, int& lo, int& hi) {\n    lo = 0;\n    hi = p.Sk - 1;\n}\n";

/// `LONGATTN_CUDA_MASK_CONSTS=0`: mask constants written into the program source (one kernel
/// variant per distinct constant, as before they were arguments; tuning runs).
fn bake_mask_consts() -> bool {
    env_off("LONGATTN_CUDA_MASK_CONSTS")
}

/// The host half of [`DevMask::new`]: the schedule for the kernel's tiles, the mask program the
/// kernels compile (element form, with the interval form where the mask has one; `NO_MASK`
/// without Partial tiles; the block-table or gated programs for explicit schedules), its atom
/// constants, and the buffers to upload. No device needed: the compile tests build every mask
/// of the selftest's matrix through it.
pub(crate) struct MaskHost<'a> {
    pub sched: BlockSchedule,
    pub program: String,
    pub consts: [i32; MASK_CONSTS],
    /// Document ids of queries and keys.
    pub docs: Option<(Vec<i32>, Vec<i32>)>,
    /// The explicit schedule and its re-tiled table (block and gated masks).
    pub blk: Option<(&'a BlockSchedule, Vec<u8>)>,
    /// First / last key of each query row's document run (interval programs with documents).
    pub runs: (Vec<i32>, Vec<i32>),
}

impl<'a> MaskHost<'a> {
    pub(crate) fn new(
        mask: MaskSpec<'a>,
        tq: usize,
        tk: usize,
        dims: Dims,
    ) -> Result<MaskHost<'a>> {
        let mut runs = (Vec::new(), Vec::new());
        let mut consts = [0; MASK_CONSTS];
        let (sched, program, docs, blk) = match mask {
            MaskSpec::Full => (
                BlockSchedule::full(tq, tk, dims.sq, dims.sk)?,
                NO_MASK.to_string(),
                None,
                None,
            ),
            MaskSpec::Expr(bm) => {
                let s = bm.schedule(tq, tk)?;
                let prog = if s.counts().1 > 0 {
                    let bake = bake_mask_consts();
                    let el = bm.cuda_program_with(bake);
                    consts = el.const_array();
                    let mut prog = el.source;
                    // Same constants in the same slots as the element program (codegen.rs).
                    if let Some(iv) = bm.cuda_interval_program_with(bake) {
                        prog.push_str(&iv.source);
                        runs = bm.doc_key_intervals().unwrap_or_default();
                    }
                    prog
                } else {
                    NO_MASK.to_string()
                };
                let docs = bm.docs.as_ref().map(|d| (d.q.clone(), d.k.clone()));
                (s, prog, docs, None)
            }
            MaskSpec::Schedule { schedule, rows } => {
                if rows.is_some() {
                    return Err(unsupported(
                        "a schedule with a CPU row mask cannot run on the GPU: pass the mask expression (MaskSpec::Expr) instead".into(),
                    ));
                }
                let (s, table) = retile(schedule, tq, tk)?;
                let prog = if s.counts().1 > 0 {
                    BLOCK_PROGRAM.to_string()
                } else {
                    NO_MASK.to_string()
                };
                (s, prog, None, Some((schedule, table)))
            }
            // mask & gate: the kernel tiles both schedule, Full where both are; the element
            // program is the expression's ANDed with the gate's kept tiles (its table).
            MaskSpec::Gated { mask: bm, schedule } => {
                let (g, table) = retile(schedule, tq, tk)?;
                let s = gate_tiles(&bm.schedule(tq, tk)?, &g)?;
                let el = bm.cuda_program_with(bake_mask_consts());
                consts = el.const_array();
                let prog = if s.counts().1 > 0 {
                    gated_program(&el.source)
                } else {
                    NO_MASK.to_string()
                };
                let docs = bm.docs.as_ref().map(|d| (d.q.clone(), d.k.clone()));
                (s, prog, docs, Some((schedule, table)))
            }
        };
        Ok(MaskHost {
            sched,
            program,
            consts,
            docs,
            blk,
            runs,
        })
    }
}

impl DevMask {
    pub(crate) fn new(
        dev: &CudaDevice,
        mask: MaskSpec,
        tq: usize,
        tk: usize,
        dims: Dims,
    ) -> Result<DevMask> {
        let max = crate::mask::codegen::DEVICE_MAX_LEN;
        if dims.sq > max || dims.sk > max {
            return Err(unsupported(format!(
                "Sq {} / Sk {}: the CUDA kernels take sequences up to {max} tokens",
                dims.sq, dims.sk
            )));
        }
        let h = MaskHost::new(mask, tq, tk, dims)?;
        let blk = h.blk.map(|(s, table)| (blk_dims(s), table));
        Self::upload(
            dev,
            h.sched,
            (h.program, h.consts),
            h.docs,
            blk,
            h.runs,
            dims,
        )
    }

    /// The mask of a gathered-key selection ([`crate::sparse::gather::TileKeys`]) for kernels
    /// that test Partial tiles pair by pair (the backward): the schedule is the selection at
    /// the kernel's tiles under the mask ([`TileKeys::schedule_at`]), and the program is
    ///
    /// ```text
    ///   la_mask(b, h, i, j) = mask(b, h, i, j) && bit j of the key bits of selection row
    ///                         (b, h, i / tile_q)                    (TileKeys::key_bits)
    /// ```
    /// the bits in the block-table slot (`p.blk`, dims `[tile_q, 8, q_tiles, bytes per row,
    /// batch, heads]` of the selection). `mask` is Full or an expression.
    ///
    /// [`TileKeys::schedule_at`]: crate::sparse::gather::TileKeys::schedule_at
    pub(crate) fn gathered(
        dev: &CudaDevice,
        mask: MaskSpec,
        sel: &crate::sparse::gather::TileKeys,
        tq: usize,
        tk: usize,
        dims: Dims,
    ) -> Result<DevMask> {
        // The mask's schedule at the kernel's tiles and its element program (no interval form:
        // every Partial tile tests its pairs against the key bits too).
        let (mask_sched, expr, consts, docs) = match mask {
            MaskSpec::Full => (
                BlockSchedule::full(tq, tk, dims.sq, dims.sk)?,
                ALL_PAIRS.to_string(),
                [0; MASK_CONSTS],
                None,
            ),
            MaskSpec::Expr(bm) => {
                let el = bm.cuda_program_with(bake_mask_consts());
                let docs = bm.docs.as_ref().map(|d| (d.q.clone(), d.k.clone()));
                (
                    bm.schedule(tq, tk)?,
                    el.source.clone(),
                    el.const_array(),
                    docs,
                )
            }
            _ => {
                return Err(unsupported(
                    "a gathered selection is taken within a mask expression (or no mask)".into(),
                ))
            }
        };
        let sched = sel.schedule_at(&mask_sched, dims.batch, dims.hq)?;
        let program = keys_program(&expr);
        let table = (
            [
                sel.tile_q as i32,
                8,
                sel.q_tiles as i32,
                sel.sk.div_ceil(8) as i32,
                sel.batch as i32,
                sel.heads as i32,
            ],
            sel.key_bits(),
        );
        Self::upload(
            dev,
            sched,
            (program, consts),
            docs,
            Some(table),
            Default::default(),
            dims,
        )
    }

    /// The mask of a 2-D neighborhood in patch order (`mask/patch.rs`): the schedule in patch
    /// tiles, the expression's program on the tokens the kernel computes. The program reads the
    /// grid and kernel sizes from `p.mc` like any other; only the patch geometry (`LA_PATCH`,
    /// `LA_PW`, `LA_QPH` ... in `FwdPlan::new`: the TMA boxes and `la_qtok` / `la_ktok`) stays
    /// compile-time, so a new grid width or patch shape is a new variant, a new kernel size is not.
    pub(crate) fn patched(
        dev: &CudaDevice,
        bm: &crate::mask::BoundMask,
        nb: &crate::mask::patch::Nbr2d,
        grid: &crate::mask::patch::PatchGrid,
        dims: Dims,
    ) -> Result<DevMask> {
        let sched = nb.schedule(grid)?;
        let program = if sched.counts().1 > 0 {
            let p = bm.cuda_program_with(bake_mask_consts());
            let consts = p.const_array();
            (p.source, consts)
        } else {
            (NO_MASK.to_string(), [0; MASK_CONSTS])
        };
        Self::upload(dev, sched, program, None, None, Default::default(), dims)
    }

    /// Checks the schedule against the problem and uploads it with the mask's buffers.
    #[allow(clippy::type_complexity)]
    fn upload(
        dev: &CudaDevice,
        sched: BlockSchedule,
        (program, consts): (String, [i32; MASK_CONSTS]),
        docs: Option<(Vec<i32>, Vec<i32>)>,
        blk: Option<([i32; 6], Vec<u8>)>,
        runs: (Vec<i32>, Vec<i32>),
        dims: Dims,
    ) -> Result<DevMask> {
        if sched.batch != 1 && sched.batch != dims.batch
            || sched.heads != 1 && sched.heads != dims.hq
            || sched.sq != dims.sq
            || sched.sk != dims.sk
        {
            return Err(Error::Schedule(format!(
                "schedule for batch {} heads {} sq {} sk {} does not fit the problem {dims:?}",
                sched.batch, sched.heads, sched.sq, sched.sk
            )));
        }
        let (offs, ents) = encode(&sched);
        let (qd, kd) = docs.unwrap_or_default();
        let (blk, blk_dims) = match &blk {
            Some((d, table)) => (dev.upload(table)?, *d),
            None => (dev.upload::<u8>(&[])?, [1; 6]),
        };
        Ok(DevMask {
            row_off: dev.upload(&offs)?,
            row_ent: dev.upload(&ents)?,
            qdoc: dev.upload(&qd)?,
            kdoc: dev.upload(&kd)?,
            dlo: dev.upload(&runs.0)?,
            dhi: dev.upload(&runs.1)?,
            blk,
            blk_dims,
            mbits: dev.upload::<u32>(&[])?,
            mbix: dev.upload::<u32>(&[])?,
            mgrp: dev.upload::<u32>(&[])?,
            sched,
            program,
            consts,
        })
    }

    /// Largest mask bit table built (bytes); past it kernels run the mask program per element.
    const MAX_BITS_BYTES: usize = 256 << 20;

    /// Whether the bit table of tiles of `br` x `bc` stays within [`Self::MAX_BITS_BYTES`].
    fn bits_fit(&self, br: usize, bc: usize) -> bool {
        self.sched.counts().1 * br * bc / 8 <= Self::MAX_BITS_BYTES
    }

    /// Builds the bit table of the Partial tiles (`kernels/mask_bits.cu`) for query tiles of `br`
    /// rows and key tiles of `bc` keys on the device, evaluating `la_mask` once per element of
    /// each Partial tile with the kernel's parameters `p` (sequence lengths, document ids); `defines`
    /// carry the tile shape and the patch order. Returns false (nothing built) when the table
    /// would exceed [`Self::MAX_BITS_BYTES`].
    fn build_bits(
        &mut self,
        dev: &CudaDevice,
        p: &LaFwdParams,
        (br, bc): (usize, usize),
        defines: &[(String, String)],
    ) -> Result<bool> {
        let (offs, ents) = encode(&self.sched);
        let (mut tiles, mut bix) = (Vec::new(), vec![u32::MAX; ents.len()]);
        for row in 0..offs.len() - 1 {
            for e in offs[row] as usize..offs[row + 1] as usize {
                if ents[e] & 1 == 1 {
                    bix[e] = (tiles.len() / 2) as u32;
                    tiles.extend([row as u32, ents[e] >> 1]);
                }
            }
        }
        let n = tiles.len() / 2;
        let words = br * bc / 32;
        if n == 0 || !self.bits_fit(br, bc) {
            return Ok(false);
        }
        let src = format!(
            "{COMMON}\n{PARAMS}\n{}\n{TOKENS}\n{MASK_BITS}",
            self.program
        );
        let func = dev.function("mask_bits", "la_mask_bits", &src, defines, 0)?;
        let tiles = dev.upload(&tiles)?;
        // SAFETY: the kernel writes every word of the table (n tiles x words) before any read.
        let mut bits = unsafe { dev.stream().alloc::<u32>(n * words) }.map_err(drv("alloc"))?;
        let mut grp = dev.stream().alloc_zeros::<u32>(n).map_err(drv("alloc"))?;
        let mut b = dev.stream().launch_builder(&func);
        b.arg(p).arg(&tiles).arg(&mut bits).arg(&mut grp);
        let cfg = LaunchConfig {
            grid_dim: (n as u32, 1, 1),
            block_dim: (words.min(256) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: `p` points at the mask's live buffers (ids, runs, block table); `tiles` holds n
        // (schedule row, key tile) pairs of this schedule; `bits` has n x words words, `grp` n.
        unsafe { b.launch(cfg) }.map_err(drv("launch mask bits"))?;
        self.mbits = bits;
        self.mgrp = grp;
        self.mbix = dev.upload(&bix)?;
        dev.synchronize()?;
        Ok(true)
    }

    /// CSC columns of the schedule, uploaded: offsets, entries (`query tile << 1 | partial`,
    /// ascending query tile) and each entry's rank in its query tile's row
    /// ([`ColumnEntry::rank`](crate::mask::ColumnEntry)).
    #[allow(clippy::type_complexity)]
    pub(crate) fn columns(
        &self,
        dev: &CudaDevice,
    ) -> Result<(CudaSlice<u32>, CudaSlice<u32>, CudaSlice<u32>)> {
        let s = &self.sched;
        let cols = s.columns();
        let mut offs = vec![0u32];
        let (mut ents, mut ranks) = (Vec::new(), Vec::new());
        for b in 0..s.batch {
            for h in 0..s.heads {
                for kt in 0..s.k_tiles {
                    for e in cols.column(b, h, kt) {
                        ents.push(e.q_tile << 1 | (e.kind == TileKind::Partial) as u32);
                        ranks.push(e.rank);
                    }
                    offs.push(ents.len() as u32);
                }
            }
        }
        Ok((dev.upload(&offs)?, dev.upload(&ents)?, dev.upload(&ranks)?))
    }
}

/// Everything about one problem that does not depend on the data.
pub struct FwdPlan {
    dev: Arc<CudaDevice>,
    func: cudarc::driver::CudaFunction,
    cfg: LaunchConfig,
    dims: Dims,
    dtype: DType,
    base: LaFwdParams,
    /// Owns the device buffers the kernel parameters point into.
    _mask: DevMask,
    /// The warp-specialized kernel's work lists ([`ws_work_list`]).
    work: Option<CudaSlice<u32>>,
    pub tile: TileCfg,
    /// Seconds spent building the kernel's schedule on the host (and uploading it).
    pub schedule_seconds: f64,
    /// Tile counts of the kernel's schedule: (Full, Partial).
    pub tile_counts: (usize, usize),
    /// Grid width and query / key patch shapes in patch order (the TMA maps' boxes).
    patch: Option<crate::mask::patch::PatchGrid>,
    /// Skip-softmax: log2 lambda and the kernel's counters {tiles tested, tiles dropped}.
    skip: Option<(f32, CudaSlice<u64>)>,
    /// The pooled attention map the kernel also writes ([`FwdPlan::with_map`]).
    map: Option<MapPlan>,
    /// Gathered keys ([`FwdPlan::with_gather`]): the chunks' key lists, and the kept tiles and
    /// chunks the schedule lists.
    gather: Option<(CudaSlice<u32>, (usize, usize))>,
}

/// The pooled attention map of a forward plan (`LA_MAP`, attn_fwd_ws.cu): its block, the map's
/// query / key blocks, and the kernel's per-row scratch: per persistent block and consumer
/// warpgroup, `cap` = key tiles x (tile keys / 64) slots of 64 rows x (A, B) (f32 pairs).
struct MapPlan {
    block: usize,
    qb: usize,
    kb: usize,
    cap: usize,
    scratch: CudaSlice<f32>,
}

pub(crate) fn unsupported(msg: String) -> Error {
    Error::Param {
        op: "cuda attention",
        msg,
    }
}

impl FwdPlan {
    /// Prepares the forward of `dims` in `dtype` under `mask` (`Full`, `Expr`, or an explicit
    /// block schedule without a row mask).
    pub fn new(
        dev: &Arc<CudaDevice>,
        dims: Dims,
        dtype: DType,
        params: &AttnParams,
        mask: MaskSpec,
    ) -> Result<FwdPlan> {
        Self::with_tma(dev, dims, dtype, params, mask, true)
    }

    /// [`FwdPlan::new`]; `tma = false` keeps to kernels that read q/k/v without TMA descriptors
    /// (for tensors whose address or strides are not multiples of 16 bytes).
    pub fn with_tma(
        dev: &Arc<CudaDevice>,
        dims: Dims,
        dtype: DType,
        params: &AttnParams,
        mask: MaskSpec,
        tma: bool,
    ) -> Result<FwdPlan> {
        Self::build(dev, dims, dtype, params, mask, tma, None, None)
    }

    /// [`FwdPlan::new`] whose kernel also writes the block-pooled attention map
    /// ([`crate::AttnMap`], `block` a positive multiple of 64) at small extra cost: launch it with
    /// [`FwdPlan::launch_map_on`]. The warp-specialized kernel (Hopper, row order) only.
    pub fn with_map(
        dev: &Arc<CudaDevice>,
        dims: Dims,
        dtype: DType,
        params: &AttnParams,
        mask: MaskSpec,
        block: usize,
    ) -> Result<FwdPlan> {
        if block == 0 || !block.is_multiple_of(64) {
            return Err(unsupported(format!(
                "the pooled attention map's block must be a positive multiple of 64, got {block}"
            )));
        }
        Self::build(dev, dims, dtype, params, mask, true, Some(block), None)
    }

    /// [`FwdPlan::new`] of a selection of whole key tiles and single keys per query tile under
    /// `mask` (`sparse::gather`): the kept tiles run as schedule entries, the keys as gathered
    /// chunks of a key tile's size, so the work is the keys kept. The selection's tiles must be
    /// the kernel's ([`gather_tiles`]). The warp-specialized kernel (Hopper, row order) only.
    pub fn with_gather(
        dev: &Arc<CudaDevice>,
        dims: Dims,
        dtype: DType,
        params: &AttnParams,
        mask: MaskSpec,
        sel: &TileKeys,
    ) -> Result<FwdPlan> {
        Self::build(dev, dims, dtype, params, mask, true, None, Some(sel))
    }

    /// Kept tiles and gathered chunks of a plan made by [`FwdPlan::with_gather`].
    pub fn gather_counts(&self) -> Option<(usize, usize)> {
        self.gather.as_ref().map(|g| g.1)
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        dev: &Arc<CudaDevice>,
        dims: Dims,
        dtype: DType,
        params: &AttnParams,
        mask: MaskSpec,
        tma: bool,
        map_block: Option<usize>,
        gather: Option<&TileKeys>,
    ) -> Result<FwdPlan> {
        if !matches!(dtype, DType::BF16 | DType::F16) {
            return Err(unsupported(format!(
                "dtype {dtype}: the CUDA kernels take bf16 or f16 (use the CPU backend for f32)"
            )));
        }
        let d = dims.d;
        if !d.is_multiple_of(16) || d == 0 || d > 256 || dims.dv != d {
            return Err(unsupported(format!(
                "head dims D {d} / Dv {}: the CUDA kernel needs D = Dv, a multiple of 16, at most 256",
                dims.dv
            )));
        }
        if dims.sq > i32::MAX as usize || dims.sk > i32::MAX as usize {
            return Err(unsupported("sequence longer than 2^31".into()));
        }
        let tile = plan_tile(dev, d, dims.sk, &mask, tma, gather.is_some());
        let (bound, nbr2d) = match &mask {
            MaskSpec::Expr(bm) => (Some(*bm), bm.nbr2d()),
            _ => (None, None),
        };
        let heavy = bound.is_some_and(|bm| bm.cuda_program_is_heavy());
        // Skip-softmax is a step of the warp-specialized kernel's consumers (attn_fwd_ws.cu).
        if let Some(l) = params.skip_below {
            if tile.kernel != FwdKernel::WarpSpecialized {
                return Err(unsupported(format!(
                    "skip-softmax (skip_below = {l}) runs in the Hopper warp-specialized forward (sm_90, D 64, 128 or 256 and the head dims padded to them unless LONGATTN_CUDA_WS_WIDE=0, q / k / v addresses and strides multiples of 16 bytes); this forward takes the {:?} kernel (use the CPU backend)",
                    tile.kernel
                )));
            }
        }
        if let Some(bl) = map_block {
            if tile.kernel != FwdKernel::WarpSpecialized {
                return Err(unsupported(format!(
                    "the pooled attention map (block {bl}) is written by the Hopper warp-specialized forward (sm_90, D up to 256, q / k / v addresses and strides multiples of 16 bytes); this forward takes the {:?} kernel (use the CPU backend)",
                    tile.kernel
                )));
            }
        }
        if gather.is_some() && tile.kernel != FwdKernel::WarpSpecialized {
            return Err(unsupported(format!(
                "gathered keys run in the Hopper warp-specialized forward (sm_90, D up to 256, q / k / v addresses and strides multiples of 16 bytes); this forward takes the {:?} kernel (use the CPU backend)",
                tile.kernel
            )));
        }
        if gather.is_some() && params.skip_below.is_some() && kernel_dim(&tile, d) == 256 {
            // (attn_fwd_ws.cu: the gathered variant's consumers have 8 registers fewer; with
            // skip-softmax at D 256 they would spill.)
            return Err(unsupported(
                "gathered keys with skip-softmax at head dims above 128 (use one or the other, or the CPU backend)".into(),
            ));
        }
        let t0 = Instant::now();
        // A 2-D neighborhood runs in patch order (~2x fewer keys per query tile at 13 x 13) on
        // the wgmma kernel, and on the warp-specialized one when its Partial tiles read the bit
        // table (its element program takes row order); `LONGATTN_CUDA_PATCH=0` keeps row order.
        // (Gathered chunks are not key tiles: no bit table; their elements run the program.)
        let bits_on = heavy
            && tile.kernel != FwdKernel::MmaSync
            && gather.is_none()
            && !env_off("LONGATTN_CUDA_BITS");
        let patch = match (bound, nbr2d) {
            (Some(bm), Some(nb))
                if (tile.kernel == FwdKernel::Wgmma
                    || tile.kernel == FwdKernel::WarpSpecialized && bits_on)
                    && !env_off("LONGATTN_CUDA_PATCH") =>
            {
                nb.choose_patches(tile.br, tile.bc).map(|g| (bm, nb, g))
            }
            _ if map_block.is_some() => None, // the map pools in row order
            _ => None,
        };
        let patch = match gather {
            Some(_) => None, // chunks are gathered rows, not patches
            None => patch,
        };
        let mut dm = match &patch {
            Some((bm, nb, grid)) => DevMask::patched(dev, bm, nb, grid, dims)?,
            None => DevMask::new(dev, mask, tile.br, tile.bc, dims)?,
        };
        // The warp-specialized kernel in patch order needs the table (or no Partial tile).
        let patch = match patch {
            Some(_)
                if tile.kernel == FwdKernel::WarpSpecialized && !dm.bits_fit(tile.br, tile.bc) =>
            {
                dm = DevMask::new(dev, mask, tile.br, tile.bc, dims)?;
                None
            }
            p => p,
        };
        // A gathered selection: the kernel's rows are the lowered ones (kept tiles, then chunks).
        let mut lowered = None;
        if let Some(sel) = gather {
            let l = crate::sparse::gather::lower(&dm.sched, sel, dims.batch, dims.hq)?;
            dm.row_off = dev.upload(&l.offs)?;
            dm.row_ent = dev.upload(&l.ents)?;
            let keys = if l.keys.is_empty() {
                dev.upload(&[crate::sparse::gather::PAD])?
            } else {
                dev.upload(&l.keys)?
            };
            lowered = Some((l, keys));
        }
        let schedule_seconds = t0.elapsed().as_secs_f64();

        let ptr = |s: &CudaSlice<u32>| s.device_ptr(dev.stream()).0;
        let (src, entry, tag, mut defines) =
            kernel_build(&tile, dtype, d, params, &dm.program, &fwd_softmax());
        let mut ptag = String::new();
        if params.skip_below.is_some() {
            ptag.push_str("_skip");
        }
        if lowered.is_some() {
            defines.push(("LA_GATHER".into(), "1".into()));
            ptag.push_str("_gather");
            // `LONGATTN_CUDA_GATHER_WAIT=1`: each producer thread waits for its copies and fences
            // before the chunk's arrival (a diagnostic of the copies' hand-over).
            if std::env::var("LONGATTN_CUDA_GATHER_WAIT").is_ok_and(|v| v == "1") {
                defines.push(("LA_GATHER_WAIT".into(), "1".into()));
                ptag.push_str("_wait");
            }
            // `LONGATTN_CUDA_GATHER_ROWS=4` (experiment): four rows a step, eight lanes a row.
            if std::env::var("LONGATTN_CUDA_GATHER_ROWS").is_ok_and(|v| v == "4") {
                defines.push(("LA_GATHER_ROWS4".into(), "1".into()));
                ptag.push_str("_rows4");
            }
            // `LONGATTN_CUDA_GATHER_DIAG` (1: the chunks' copies left out, 2: issued but not
            // waited for): timing experiments, the output is wrong then.
            if let Ok(v) = std::env::var("LONGATTN_CUDA_GATHER_DIAG") {
                if v != "1" && v != "2" {
                    return Err(unsupported(format!(
                        "LONGATTN_CUDA_GATHER_DIAG={v:?}: the diagnostic takes 1 (copies left out) or 2 (copies not waited for)"
                    )));
                }
                defines.push(("LA_GATHER_DIAG".into(), v.clone()));
                ptag.push_str(&format!("_diag{v}"));
            }
        }
        if map_block.is_some() {
            defines.push(("LA_MAP".into(), "1".into()));
            ptag.push_str("_map");
            // `LONGATTN_CUDA_MAP_PARTS` (1: the per-tile statistics only, 2: the pool only):
            // timing experiments, the map is wrong then.
            if let Ok(v) = std::env::var("LONGATTN_CUDA_MAP_PARTS") {
                defines.push(("LA_MAP_PARTS".into(), v.clone()));
                ptag.push_str(&format!("_parts{v}"));
            }
        }
        // Patch order: the grid width and patch shapes are compile-time (TMA boxes, la_qtok /
        // la_ktok index math), so they stay defines and name the variant; the neighborhood's
        // grid and kernel sizes in the mask program itself are arguments (`mc`) like every other
        // mask constant.
        if let Some((_, _, g)) = &patch {
            for (k, v) in [
                ("LA_PATCH", 1),
                ("LA_PW", g.w),
                ("LA_QPH", g.q.0),
                ("LA_QPW", g.q.1),
                ("LA_KPH", g.k.0),
                ("LA_KPW", g.k.1),
            ] {
                defines.push((k.into(), v.to_string()));
            }
            ptag = format!("_patch{}x{}_{}x{}_w{}", g.q.0, g.q.1, g.k.0, g.k.1, g.w);
        }
        let smem = tile.smem(kernel_dim(&tile, d));
        let mut base = LaFwdParams {
            b: dims.batch as i32,
            sq: dims.sq as i32,
            sk: dims.sk as i32,
            hq: dims.hq as i32,
            hk: dims.hk as i32,
            sched_off: ptr(&dm.row_off),
            sched_ent: ptr(&dm.row_ent),
            sched_batch: dm.sched.batch as i32,
            sched_heads: dm.sched.heads as i32,
            q_tiles: dims.sq.div_ceil(tile.br) as i32,
            qdoc: dm.qdoc.device_ptr(dev.stream()).0,
            kdoc: dm.kdoc.device_ptr(dev.stream()).0,
            blk: dm.blk.device_ptr(dev.stream()).0,
            blk_dims: dm.blk_dims,
            dlo: dm.dlo.device_ptr(dev.stream()).0,
            dhi: dm.dhi.device_ptr(dev.stream()).0,
            // Before build_bits: the bit-table kernel runs la_mask with these parameters.
            mc: dm.consts,
            ..Default::default()
        };
        if let Some((l, _)) = &lowered {
            base.sched_batch = l.batch as i32;
            base.sched_heads = l.heads as i32;
        }
        // Programs that are heavy per element, on the wgmma kernel: Partial tiles read the mask's
        // bit table (built here, timed with the schedule) instead of running the program.
        // `LONGATTN_CUDA_BITS=0` keeps the program (tuning runs).
        let mut schedule_seconds = schedule_seconds;
        if bits_on {
            let t1 = Instant::now();
            if dm.build_bits(dev, &base, (tile.br, tile.bc), &defines)? {
                defines.push(("LA_MASK_BITS".into(), "1".into()));
                base.mbits = ptr(&dm.mbits);
                base.mbix = ptr(&dm.mbix);
                base.mgrp = ptr(&dm.mgrp);
            }
            schedule_seconds += t1.elapsed().as_secs_f64();
        }
        // The wgmma kernel's grid puts query tiles first (blocks running together share a head's
        // keys and values in L2; n 1k neighborhood2d D 128 on H100: L2 hit rate 25% -> 58%,
        // 0.274 -> 0.252 ms). `LONGATTN_CUDA_QFIRST=0` keeps heads first (tuning runs).
        // The mma.sync kernel reads (head, batch, query tile) from its grid as it is: it never
        // takes this order (heavy masks at D 32 on Hopper, or any heavy mask before Hopper, ran
        // with the grid's axes misread until this was checked: the Python tests caught it).
        let qfirst = tile.kernel != FwdKernel::MmaSync
            && (tile.kernel == FwdKernel::Wgmma || heavy)
            && !env_off("LONGATTN_CUDA_QFIRST");
        if qfirst && tile.kernel != FwdKernel::WarpSpecialized {
            defines.push(("LA_QFIRST".into(), "1".into()));
        }
        let variant = format!(
            "attn_fwd{tag}_{}_d{d}_{}x{}w{}{ptag}",
            dtype.name(),
            tile.br,
            tile.bc,
            tile.warps
        );
        let func = dev.function(&variant, entry, &src, &defines, smem)?;
        (base.scale_log2, base.cap_pre, base.cap_post) = logit_consts(params, d);
        let q_tiles = dims.sq.div_ceil(tile.br);
        if q_tiles > 65535 || dims.batch > 65535 || dims.hq > 65535 || dims.hq > i32::MAX as usize {
            return Err(unsupported(format!(
                "grid: query tiles {q_tiles} and batch {} must be <= 65535",
                dims.batch
            )));
        }
        let mut work = None;
        let grid = match tile.kernel {
            // Persistent blocks walk the (query tile, batch, head) items of their work lists.
            FwdKernel::WarpSpecialized => {
                let pairs = dims.batch * dims.hq;
                let items = q_tiles * pairs;
                if items + dev.sms * tile.min_blocks + 1 > u32::MAX as usize {
                    return Err(unsupported(format!(
                        "{items} work items (query tiles x batch x heads): at most {} fit the kernel's 32-bit work list",
                        u32::MAX as usize - dev.sms * tile.min_blocks - 1
                    )));
                }
                // `LONGATTN_CUDA_PERSIST=0`: one block per item (tuning runs).
                let blocks = if std::env::var("LONGATTN_CUDA_PERSIST").is_ok_and(|v| v == "0") {
                    items
                } else {
                    items.min(dev.sms * tile.min_blocks)
                }
                .max(1);
                let t1 = Instant::now();
                let s = &dm.sched;
                // A chunk costs what a key tile does.
                let list = ws_work_list(pairs, q_tiles, ws_head_group(pairs), blocks, |bh, qt| {
                    let (b, h) = (bh / dims.hq, bh % dims.hq);
                    match &lowered {
                        Some((l, _)) => {
                            let r = ((b % l.batch) * l.heads + h % l.heads) * q_tiles + qt;
                            (l.offs[r + 1] - l.offs[r]) as usize
                        }
                        None => s.row(b, h, qt).len(),
                    }
                });
                work = Some(dev.upload(&list)?);
                schedule_seconds += t1.elapsed().as_secs_f64();
                (blocks as u32, 1, 1)
            }
            _ if qfirst => (q_tiles as u32, dims.hq as u32, dims.batch as u32),
            _ => (dims.hq as u32, dims.batch as u32, q_tiles as u32),
        };
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: (tile.warps as u32 * 32, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let skip = match params.skip_below {
            Some(l) => Some((
                l.log2(),
                dev.stream()
                    .alloc_zeros::<u64>(2)
                    .map_err(drv("alloc skip counters"))?,
            )),
            None => None,
        };
        let map = match map_block {
            Some(block) => {
                // Scratch: blocks x consumers x cap slots x 64 rows x (A, B).
                let cap = dims.sk.div_ceil(tile.bc) * (tile.bc / 64);
                let consumers = tile.warps / 4 - 1;
                let n = cfg.grid_dim.0 as usize * consumers * cap * 64 * 2;
                if cap > i32::MAX as usize / 64 || n > i32::MAX as usize * 8 {
                    return Err(unsupported(format!(
                        "pooled attention map: {n} floats of scratch for Sk {}",
                        dims.sk
                    )));
                }
                let scratch = dev
                    .stream()
                    .alloc_zeros::<f32>(n.max(1))
                    .map_err(drv("alloc map scratch"))?;
                Some(MapPlan {
                    block,
                    qb: dims.sq.div_ceil(block),
                    kb: dims.sk.div_ceil(block),
                    cap,
                    scratch,
                })
            }
            None => None,
        };
        Ok(FwdPlan {
            dev: dev.clone(),
            func,
            cfg,
            dims,
            dtype,
            base,
            tile_counts: dm.sched.counts(),
            _mask: dm,
            work,
            tile,
            schedule_seconds,
            patch: patch.map(|(_, _, g)| g),
            skip,
            map,
            gather: lowered.map(|(l, keys)| (keys, (l.tiles, l.chunks))),
        })
    }

    /// The map's shape `[B, Hq, q_blocks, k_blocks]` when the plan writes one.
    pub fn map_shape(&self) -> Option<[usize; 4]> {
        self.map
            .as_ref()
            .map(|m| [self.dims.batch, self.dims.hq, m.qb, m.kb])
    }

    /// [`FwdPlan::launch_on`] of a plan made by [`FwdPlan::with_map`], also writing the pooled
    /// map into `mass` and `max` (f32, contiguous `[B, Hq, q_blocks, k_blocks]`, zeroed here on
    /// `s` first).
    #[allow(clippy::too_many_arguments)]
    pub fn launch_map_on(
        &self,
        s: &Arc<cudarc::driver::CudaStream>,
        q: &DevTensor,
        k: &DevTensor,
        v: &DevTensor,
        o: &mut DevTensor,
        lse: &mut CudaSlice<f32>,
        mass: &mut CudaSlice<f32>,
        max: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let Some(shape) = self.map_shape() else {
            return Err(unsupported(
                "this forward plan writes no attention map (make it with FwdPlan::with_map)".into(),
            ));
        };
        let n: usize = shape.iter().product();
        for (name, t) in [("mass", &*mass), ("max", &*max)] {
            if t.len() < n {
                return Err(Error::Shape {
                    op: "cuda attention map",
                    tensor: name.into(),
                    got: vec![t.len()],
                    expected: format!("{n} floats ({shape:?})"),
                });
            }
        }
        s.memset_zeros(mass).map_err(drv("zero map"))?;
        s.memset_zeros(max).map_err(drv("zero map"))?;
        let ptrs = (mass.device_ptr(s).0, max.device_ptr(s).0);
        self.launch_sched_on(s, q, k, v, o, lse, None, Some(ptrs), None)
    }

    /// Skip-softmax's counters since the plan was made or last read: (key tiles tested, tiles
    /// dropped), summed over the consumer warpgroups' 64-row tiles (the first tile of a row
    /// block is never tested: its rows have no reference yet); None without skip-softmax.
    /// Waits for the device's stream (launches on another stream must be finished by the caller)
    /// and zeroes the counters.
    pub fn take_skip_stats(&mut self) -> Result<Option<(u64, u64)>> {
        let Some((_, c)) = &mut self.skip else {
            return Ok(None);
        };
        let s = self.dev.stream();
        let v = s.clone_dtoh(&*c).map_err(drv("read skip counters"))?;
        s.memset_zeros(c).map_err(drv("zero skip counters"))?;
        // Zeroed before any later launch, whatever stream it is queued on.
        s.synchronize().map_err(drv("zero skip counters"))?;
        Ok(Some((v[0], v[1])))
    }

    /// Runs the kernel (asynchronously on the device's stream): `o` `[B, Sq, Hq, D]` and `lse`
    /// `[B, Hq, Sq]` are written.
    pub fn launch(
        &self,
        q: &DevTensor,
        k: &DevTensor,
        v: &DevTensor,
        o: &mut DevTensor,
        lse: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.launch_on(self.dev.stream(), q, k, v, o, lse)
    }

    /// [`FwdPlan::launch`] on a caller's stream (e.g. PyTorch's current stream).
    pub fn launch_on(
        &self,
        s: &Arc<cudarc::driver::CudaStream>,
        q: &DevTensor,
        k: &DevTensor,
        v: &DevTensor,
        o: &mut DevTensor,
        lse: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.launch_sched_on(s, q, k, v, o, lse, None, None, None)
    }

    /// The plan's kernel parameters with q and k bound (strides included): what the device-side
    /// estimators (`sparse/cuda.rs`) read besides the mask's schedule, program constants and
    /// logit constants.
    pub(crate) fn params_for(
        &self,
        s: &Arc<cudarc::driver::CudaStream>,
        q: &DevTensor,
        k: &DevTensor,
    ) -> LaFwdParams {
        let mut p = self.base;
        p.q = q.data.device_ptr(s).0;
        p.k = k.data.device_ptr(s).0;
        p.q_s = q.strides();
        p.k_s = k.strides();
        p
    }

    /// The CUDA source of the plan's mask program (`la_mask`), for kernels that evaluate the mask.
    pub(crate) fn mask_program(&self) -> &str {
        &self._mask.program
    }

    /// The mask's schedule at the kernel's tiles (shared batch / head dimensions as built).
    pub(crate) fn mask_schedule(&self) -> &BlockSchedule {
        &self._mask.sched
    }

    /// Whether Partial tiles read the mask's bit table (entries index it: a schedule written on
    /// the device cannot run then).
    pub(crate) fn uses_mask_bits(&self) -> bool {
        self.base.mbits != 0
    }

    /// [`FwdPlan::launch_on`] through a schedule in device memory instead of the mask's:
    /// `sched = (offsets, entries)` in the kernels' CSR form (`B Hq q_tiles + 1` offsets, entries
    /// `k_tile << 1 | partial`, rows (b, h, qt) in that order, a subset of the mask's rows with
    /// their kinds); `None` runs the mask's own schedule. `map`: the device addresses of the
    /// zeroed mass and max maps, for a plan that writes them ([`FwdPlan::launch_map_on`]) and
    /// only then.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn launch_sched_on(
        &self,
        s: &Arc<cudarc::driver::CudaStream>,
        q: &DevTensor,
        k: &DevTensor,
        v: &DevTensor,
        o: &mut DevTensor,
        lse: &mut CudaSlice<f32>,
        sched: Option<(u64, u64)>,
        map: Option<(u64, u64)>,
        gkeys: Option<u64>,
    ) -> Result<()> {
        if self.map.is_some() != map.is_some() {
            return Err(unsupported(if map.is_some() {
                "this forward plan writes no attention map (make it with FwdPlan::with_map)".into()
            } else {
                "this forward plan writes the pooled attention map: launch it with launch_map_on"
                    .into()
            }));
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
        check_launch(
            "cuda attention",
            self.dtype,
            &[
                ("q", q, [batch, sq, hq, d]),
                ("k", k, [batch, sk, hk, d]),
                ("v", v, [batch, sk, hk, d]),
                ("out", &*o, [batch, sq, hq, d]),
            ],
            lse.len(),
            [batch, hq, sq],
        )?;
        if self.tile.kernel == FwdKernel::WarpSpecialized {
            check_tma("cuda attention", &[("q", q), ("k", k), ("v", v)])?;
        }
        let mut p = self.params_for(s, q, k);
        p.v = v.data.device_ptr(s).0;
        p.o = o.data.device_ptr(s).0;
        p.lse = lse.device_ptr(s).0;
        p.v_s = v.strides();
        p.o_s = o.strides();
        if gkeys.is_some() && (self.gather.is_none() || sched.is_none()) {
            return Err(unsupported(
                "device-written key lists need a gathered plan (FwdPlan::with_gather) and a device-written schedule".into(),
            ));
        }
        if let Some((off, ent)) = sched {
            if self.gather.is_some() && gkeys.is_none() {
                return Err(unsupported(
                    "a device-written schedule with a gathered selection (the plan's rows are the selection's) needs the device-written key lists too".into(),
                ));
            }
            if self.uses_mask_bits() {
                return Err(unsupported(
                    "a device-written schedule with a mask whose Partial tiles read its bit table (2-D neighborhoods, dealt documents)".into(),
                ));
            }
            p.sched_off = off;
            p.sched_ent = ent;
            p.sched_batch = batch as i32;
            p.sched_heads = hq as i32;
        }
        let mut b = s.launch_builder(&self.func);
        let ws;
        if self.tile.kernel == FwdKernel::WarpSpecialized {
            let (tq, tk, tv) = match &self.patch {
                Some(g) => (
                    TmaMap::patches(q, g.w, g.q)?,
                    TmaMap::patches(k, g.w, g.k)?,
                    TmaMap::patches(v, g.w, g.k)?,
                ),
                None => (
                    TmaMap::rows(q, self.tile.br)?,
                    TmaMap::rows(k, self.tile.bc)?,
                    TmaMap::rows(v, self.tile.bc)?,
                ),
            };
            let work = match &self.work {
                Some(w) => w.device_ptr(s).0,
                None => {
                    return Err(unsupported(
                        "warp-specialized plan without work lists".into(),
                    ))
                }
            };
            let (skip_log2, skip_stats) = match &self.skip {
                Some((t, c)) => (*t, c.device_ptr(s).0),
                None => (0.0, 0),
            };
            let (mut map_scratch, mut map_block, mut map_qb, mut map_kb, mut map_cap) =
                (0, 0, 0, 0, 0);
            if let (Some(m), Some(_)) = (&self.map, map) {
                map_scratch = m.scratch.device_ptr(s).0;
                (map_block, map_qb, map_kb, map_cap) =
                    (m.block as i32, m.qb as i32, m.kb as i32, m.cap as i32);
            }
            let (map_mass, map_max) = map.unwrap_or((0, 0));
            ws = LaWsParams {
                tq,
                tk,
                tv,
                p,
                work,
                skip_stats,
                skip_log2,
                map_scratch,
                map_mass,
                map_max,
                map_block,
                map_qb,
                map_kb,
                map_cap,
                gkeys: gkeys
                    .unwrap_or_else(|| self.gather.as_ref().map_or(0, |g| g.0.device_ptr(s).0)),
            };
            b.arg(&ws);
        } else {
            b.arg(&p);
        }
        // SAFETY: the parameter struct matches the kernel's; every pointer is a live allocation of
        // the size the kernel indexes (checked shapes above; schedule/doc buffers owned by self;
        // the TMA maps describe exactly the q, k, v allocations).
        unsafe { b.launch(self.cfg) }.map_err(drv("launch attention"))?;
        Ok(())
    }
}

/// The forward kernel and tiles for head dim `d`, `sk` keys and `mask` on `dev` (`tma = false`:
/// kernels that read q / k / v without TMA descriptors).
fn plan_tile(
    dev: &CudaDevice,
    d: usize,
    sk: usize,
    mask: &MaskSpec,
    tma: bool,
    gather: bool,
) -> TileCfg {
    let mut tile = TileCfg::choose(d, sk, dev.cc);
    let (bound, nbr2d) = match &mask {
        MaskSpec::Expr(bm) => (Some(*bm), bm.nbr2d()),
        _ => (None, None),
    };
    let heavy = bound.is_some_and(|bm| bm.cuda_program_is_heavy());
    if !tma && tile.kernel == FwdKernel::WarpSpecialized {
        tile = TileCfg::choose_wgmma(d, nbr2d.is_some());
    }
    // Heavy programs (2-D neighborhoods, documents whose keys are not runs) read a bit table
    // on their Partial tiles (below) on the warp-specialized kernel with one consumer
    // warpgroup, 64-key tiles and two blocks per SM; 2-D neighborhoods in patch order where
    // one helps (`mask/patch.rs`: the TMA loads patch tiles as 5-D boxes). n 1k
    // neighborhood2d 32 x 32, 13 x 13 (row order), H100, D 64 / D 128 ms: 0.199 / 0.152
    // against 0.245 / 0.193 for its default tiles, 0.240 / 0.179 for 2 x 64, and 0.327 /
    // 0.254 on the wgmma kernel. `LONGATTN_CUDA_HEAVY=0` keeps the default tiles,
    // `LONGATTN_CUDA_HEAVY=wgmma` takes the wgmma kernel (tuning runs).
    let heavy_env = std::env::var("LONGATTN_CUDA_HEAVY").unwrap_or_default();
    if tile.kernel == FwdKernel::WarpSpecialized && heavy && heavy_env != "0" {
        if heavy_env == "wgmma" {
            tile = TileCfg::choose_wgmma(d, nbr2d.is_some());
        } else if std::env::var("LONGATTN_CUDA_WS").is_err() && kernel_dim(&tile, d) != 256 {
            // (D 256 keeps its tiles: two blocks of one consumer would not fit shared
            // memory.)
            tile = TileCfg::warp_specialized(1, 64, 2);
        }
    }
    // A gathered selection's producers need more registers than three consumers leave them
    // (attn_fwd_ws.cu, LA_GATHER): D 64 takes two.
    if gather && tile.kernel == FwdKernel::WarpSpecialized && tile.warps == 16 {
        tile = TileCfg::warp_specialized(2, 128, 1);
    }
    tile
}

/// The query and key tiles (rows, keys) of the forward kernel a gathered selection
/// ([`FwdPlan::with_gather`]) runs on for head dim `d` and `sk` keys under `mask`: the
/// selection's tiles must be these.
pub fn gather_tiles(
    dev: &CudaDevice,
    d: usize,
    sk: usize,
    mask: &MaskSpec,
) -> Result<(usize, usize)> {
    let tile = plan_tile(dev, d, sk, mask, true, true);
    if tile.kernel != FwdKernel::WarpSpecialized {
        return Err(unsupported(format!(
            "gathered keys run in the Hopper warp-specialized forward (sm_90, D up to 256); D {d} takes the {:?} kernel here (use the CPU backend)",
            tile.kernel
        )));
    }
    Ok((tile.br, tile.bc))
}

/// Kernel constants of the logits (forward and backward): a logit is `s * scale_log2` in log2
/// units, or with soft-cap `c`: `cap_post * tanh(s * cap_pre) * scale_log2` with
/// `cap_pre = scale / c`, `cap_post = c`, `scale_log2 = log2 e`.
pub(crate) fn logit_consts(params: &AttnParams, d: usize) -> (f32, f32, f32) {
    let scale = params.scale_for(d);
    let log2e = std::f32::consts::LOG2_E;
    match params.softcap {
        Some(c) => (log2e, scale / c, c),
        None => (scale * log2e, 0.0, 0.0),
    }
}

/// The Hopper forward's softmax step (wg_softmax.cuh), `LONGATTN_CUDA_FWD_SOFTMAX`: `lazy` (the
/// default since 2026-12-06: `fused`, and a stale row reference kept while no logit exceeds it by
/// more than 8 in log2 units, skipping the rescale of O and its two exponentials; H100, two calls
/// in opposite orders: +2% to +5% over `fused` on 18 of 20 points, -6% and +9% on the other two,
/// docs/PERF.md),
/// `fused` (the default from 2026-12-05: the scale applied in the exponent's FFMA, one FMUL per
/// logit fewer, O rescaled every tile) or `plain` (logits scaled before the softmax).
pub(super) const FWD_SOFTMAX_DEFAULT: &str = "lazy";

fn fwd_softmax() -> String {
    std::env::var("LONGATTN_CUDA_FWD_SOFTMAX").unwrap_or_else(|_| FWD_SOFTMAX_DEFAULT.into())
}

/// `LONGATTN_CUDA_FWD_DESC`: how the warp-specialized forward forms its wgmma descriptors,
/// `add` (the default since 2026-12-06: one add per operand from the buffer's descriptor;
/// H100: +1% to +6% over `address`, docs/PERF.md) or `address` (from each operand's address, as
/// before; see [`kernel_build`]).
fn fwd_desc_add() -> bool {
    std::env::var("LONGATTN_CUDA_FWD_DESC").as_deref() != Ok("address")
}

/// `LONGATTN_CUDA_FWD_OSTAGE`: whether the warp-specialized forward writes O through shared
/// memory (whole rows a warp store; the default since 2026-12-06, H100: D 128 +0.3% to +5.8%,
/// D 64 within 0.5%, docs/PERF.md) or from registers (`0`).
fn fwd_o_stage() -> bool {
    std::env::var("LONGATTN_CUDA_FWD_OSTAGE").as_deref() != Ok("0")
}

/// Whether the warp-specialized forward takes D 256 and the padded head dims ([`ws_dim`]): the
/// default since the selftest passed them on an H100 (D 256 at 0.87x FA4 against the mma.sync
/// kernel's 0.24x, 2026-12-06, docs/PERF.md); `LONGATTN_CUDA_WS_WIDE=0` keeps them on mma.sync.
fn ws_wide() -> bool {
    std::env::var("LONGATTN_CUDA_WS_WIDE").map_or(true, |v| v != "0")
}

/// The head dim the warp-specialized kernel runs a tensor's head dim `d` at: 64 and 128 as they
/// are; with `wide`, 256 too and the other multiples of 16 between 64 and 256 padded to the next
/// of them (D 96 -> 128, D 192 -> 256: the TMA reads the columns past `d` as zeros); `None` for
/// the rest (the mma.sync kernel, also below 64).
fn ws_dim(d: usize, wide: bool) -> Option<usize> {
    match d {
        64 | 128 => Some(d),
        _ if !wide => None,
        256 => Some(d),
        _ if !d.is_multiple_of(16) || !(64..=256).contains(&d) => None,
        _ if d < 128 => Some(128),
        _ => Some(256),
    }
}

/// The head dim the kernel of `tile` is compiled for: [`ws_dim`] on the warp-specialized kernel
/// (which pads), the tensor's own elsewhere.
pub(crate) fn kernel_dim(tile: &TileCfg, d: usize) -> usize {
    match tile.kernel {
        FwdKernel::WarpSpecialized => ws_dim(d, true).unwrap_or(d),
        _ => d,
    }
}

/// Source, entry point, variant tag and defines of the forward kernel of `tile` for `program`
/// (the mask's `la_mask`) and the Hopper softmax step `softmax` ([`fwd_softmax`]); the plan adds
/// what depends on the mask's layout (patch order, bit tables, grid order).
pub(super) fn kernel_build(
    tile: &TileCfg,
    dtype: DType,
    d: usize,
    params: &AttnParams,
    program: &str,
    softmax: &str,
) -> (String, &'static str, &'static str, Vec<(String, String)>) {
    let wrappers = &*super::wgmma::WRAPPERS;
    let (src, entry, tag) = match tile.kernel {
        FwdKernel::MmaSync => (
            format!("{COMMON}\n{MMA_TILE}\n{PARAMS}\n{program}\n{FWD}"),
            "la_attn_fwd",
            "",
        ),
        FwdKernel::Wgmma => (
            format!(
                "{COMMON}\n{WGMMA}\n{wrappers}\n{PARAMS}\n{program}\n{TOKENS}\n{WG_SOFTMAX}\n{FWD_WG}"
            ),
            "la_attn_fwd_wg",
            "_wg",
        ),
        FwdKernel::WarpSpecialized => (
            format!("{COMMON}\n{WGMMA}\n{wrappers}\n{TMA}\n{PARAMS}\n{program}\n{TOKENS}\n{WG_SOFTMAX}\n{FWD_WS}"),
            "la_attn_fwd_ws",
            "_ws",
        ),
    };
    // Warpgroups that compute (the warp-specialized kernel adds a producer warpgroup).
    let nwg = match tile.kernel {
        FwdKernel::WarpSpecialized => tile.warps / 4 - 1,
        _ => tile.warps / 4,
    };
    let mut defines = vec![
        ("LA_F16".into(), ((dtype == DType::F16) as u8).to_string()),
        ("LA_D".into(), kernel_dim(tile, d).to_string()),
        ("LA_DO".into(), d.to_string()),
        ("LA_BR".into(), tile.br.to_string()),
        ("LA_BC".into(), tile.bc.to_string()),
        ("LA_WARPS".into(), tile.warps.to_string()),
        ("LA_MT".into(), tile.mt.to_string()),
        ("LA_MINB".into(), tile.min_blocks.to_string()),
        ("LA_QREGS".into(), (tile.qregs as u8).to_string()),
        ("LA_NWG".into(), nwg.to_string()),
        (
            "LA_SOFTCAP".into(),
            (params.softcap.is_some() as u8).to_string(),
        ),
        // The Hopper kernels' softmax applies the scale in its exponent's FFMA when the row
        // maximum of the raw dot products is the maximum of the logits (wg_softmax.cuh).
        (
            "LA_FUSED_SCALE".into(),
            ((params.softcap.is_none() && params.scale_for(d) > 0.0 && softmax != "plain") as u8)
                .to_string(),
        ),
        ("LA_LAZY".into(), ((softmax == "lazy") as u8).to_string()),
    ];
    // The warp-specialized kernel forms its wgmma descriptors by one add from the buffers'
    // (`LA_DESC_ADD` in attn_fwd_ws.cu) unless `LONGATTN_CUDA_FWD_DESC=address`, or where ptxas
    // would spill: three consumers (D 64) under a mask evaluated element by element (no interval
    // program), 16 bytes with the descriptors kept live.
    if tile.kernel == FwdKernel::WarpSpecialized {
        let spills = nwg == 3 && !program.contains("#define LA_MASK_INTERVAL 1");
        let add = fwd_desc_add() && !spills;
        defines.push(("LA_DESC_ADD".into(), (add as u8).to_string()));
        // The epilogue through the item's Q stage (`LA_O_STAGE`, unless
        // `LONGATTN_CUDA_FWD_OSTAGE=0`; two Q stages, i.e. up to D 128; not with skip-softmax on
        // three consumers, where ptxas spills 4 bytes).
        let o_spills = nwg == 3 && params.skip_below.is_some();
        if fwd_o_stage() && kernel_dim(tile, d) <= 128 && !o_spills {
            defines.push(("LA_O_STAGE".into(), "1".into()));
        }
    }
    // Skip-softmax: a step of the warp-specialized kernel only (the plan refuses it elsewhere).
    if params.skip_below.is_some() && tile.kernel == FwdKernel::WarpSpecialized {
        defines.push(("LA_SKIP".into(), "1".into()));
        // `LONGATTN_CUDA_SKIP_VOTES=late` (opt-in, not measured yet): the votes on the previous
        // tile read after the next Q K^T is issued (`LA_SKIP_LATE`).
        if std::env::var("LONGATTN_CUDA_SKIP_VOTES").as_deref() == Ok("late") {
            defines.push(("LA_SKIP_LATE".into(), "1".into()));
        }
    }
    (src, entry, tag, defines)
}

/// Tensors a kernel reads through TMA descriptors: address and strides must be multiples of 16
/// bytes (a plan made with `FwdPlan::with_tma(.., false)` reads without them).
pub(crate) fn check_tma(op: &'static str, tensors: &[(&str, &DevTensor)]) -> Result<()> {
    for (name, t) in tensors {
        if !t.tma_aligned() {
            return Err(unsupported(format!(
                "{op}: tensor `{name}`: address or strides {:?} are not multiples of 16 bytes, which this plan's kernel (TMA) needs",
                t.strides
            )));
        }
    }
    Ok(())
}

/// Checks device tensors against a plan's problem (shape and dtype, each named) and the LSE
/// buffer's length (`lse` = [B, Hq, Sq]).
pub(crate) fn check_launch(
    op: &'static str,
    dtype: DType,
    tensors: &[(&str, &DevTensor, [usize; 4])],
    lse_len: usize,
    lse: [usize; 3],
) -> Result<()> {
    for (name, t, want) in tensors {
        if t.shape != *want || t.dtype != dtype {
            return Err(Error::Shape {
                op,
                tensor: name.to_string(),
                got: t.shape.to_vec(),
                expected: format!("{want:?} in {dtype} (the plan's problem)"),
            });
        }
    }
    if lse_len < lse.iter().product() {
        return Err(Error::Shape {
            op,
            tensor: "lse".into(),
            got: vec![lse_len],
            expected: format!("{lse:?}"),
        });
    }
    Ok(())
}

/// Element mask of an explicit block mask: the user's tile table (1 = allowed).
const BLOCK_PROGRAM: &str = r#"template <typename P>
__device__ __forceinline__ bool la_mask(const P& p, int b, int h, int i, int j) {
    const int bb = b % p.blk_batch, hh = h % p.blk_heads;
    return p.blk[(((i64)bb * p.blk_heads + hh) * p.blk_qtiles + i / p.blk_tq) * p.blk_ktiles + j / p.blk_tk] != 0;
}
"#;

/// The device program of a gated mask: the expression's `la_mask` renamed `la_mask_expr`, and
/// `la_mask` = the expression && the kept-tile lookup of [`BLOCK_PROGRAM`] (the gate's table at
/// its own tiles: `mask & gate`, pair for pair).
pub(crate) fn gated_program(expr_source: &str) -> String {
    let renamed = expr_source.replacen("bool la_mask(", "bool la_mask_expr(", 1);
    let gate = BLOCK_PROGRAM.replacen("bool la_mask(", "bool la_mask_gate(", 1);
    format!(
        "{renamed}{gate}template <typename P>\n__device__ __forceinline__ bool la_mask(const P& p, int b, int h, int i, int j) {{\n    return la_mask_expr(p, b, h, i, j) && la_mask_gate(p, b, h, i, j);\n}}\n"
    )
}

/// `p.blk` / `p.blk_dims` of an explicit schedule's table ([`BLOCK_PROGRAM`]): its tiles, tile
/// counts, batch rows and heads.
fn blk_dims(s: &BlockSchedule) -> [i32; 6] {
    [
        s.tile_q as i32,
        s.tile_k as i32,
        s.q_tiles as i32,
        s.k_tiles as i32,
        s.batch as i32,
        s.heads as i32,
    ]
}

/// The element program of no mask, under the name a composed program gives its mask part.
pub(crate) const ALL_PAIRS: &str = "template <typename P>\n__device__ __forceinline__ bool la_mask(const P&, int, int, int, int) { return true; }\n";

/// The device program of a gathered-key selection ([`DevMask::gathered`]): the mask's `la_mask`
/// renamed `la_mask_expr`, and `la_mask` = the mask && the selection row's key bit, read from
/// `p.blk` (`blk_dims` = tile_q, 8, selection rows per head, bytes per row, batch, heads).
/// No interval program: every Partial tile tests its pairs.
pub(crate) fn keys_program(expr_source: &str) -> String {
    let renamed = expr_source.replacen("bool la_mask(", "bool la_mask_expr(", 1);
    format!(
        "{renamed}template <typename P>\n__device__ __forceinline__ bool la_mask(const P& p, int b, int h, int i, int j) {{\n    const int bb = b % p.blk_batch, hh = h % p.blk_heads;\n    const unsigned char* row = p.blk + (((i64)bb * p.blk_heads + hh) * p.blk_qtiles + i / p.blk_tq) * p.blk_ktiles;\n    return la_mask_expr(p, b, h, i, j) && ((row[j >> 3] >> (j & 7)) & 1);\n}}\n"
    )
}

/// The kernel-tile schedule of a gated mask: the tiles both the expression's schedule `e` and
/// the re-tiled gate `g` list (same tiles; `g` may hold batch rows and heads), Full where both
/// are Full, Partial otherwise.
fn gate_tiles(e: &BlockSchedule, g: &BlockSchedule) -> Result<BlockSchedule> {
    let (batch, heads) = (e.batch.max(g.batch), g.heads);
    let mut rows = Vec::with_capacity(batch * heads * e.q_tiles);
    for b in 0..batch {
        for h in 0..heads {
            for qt in 0..e.q_tiles {
                let ge = g.row(b, h, qt);
                let row: Vec<TileEntry> = e
                    .row(b, h, qt)
                    .iter()
                    .filter_map(|x| {
                        let y = ge.binary_search_by_key(&x.k_tile, |y| y.k_tile).ok()?;
                        let full = x.kind == TileKind::Full && ge[y].kind == TileKind::Full;
                        Some(TileEntry {
                            k_tile: x.k_tile,
                            kind: if full {
                                TileKind::Full
                            } else {
                                TileKind::Partial
                            },
                        })
                    })
                    .collect();
                rows.push(row);
            }
        }
    }
    BlockSchedule::from_rows(e.tile_q, e.tile_k, e.sq, e.sk, batch, heads, rows)
}

/// CSR offsets and entries (`k_tile << 1 | partial`).
fn encode(s: &BlockSchedule) -> (Vec<u32>, Vec<u32>) {
    let rows = s.batch * s.heads * s.q_tiles;
    let mut offs = Vec::with_capacity(rows + 1);
    let mut ents = Vec::with_capacity(s.entries().len());
    offs.push(0u32);
    for r in 0..rows {
        let (b, rest) = (r / (s.heads * s.q_tiles), r % (s.heads * s.q_tiles));
        let (h, qt) = (rest / s.q_tiles, rest % s.q_tiles);
        for e in s.row(b, h, qt) {
            ents.push(e.k_tile << 1 | (e.kind == TileKind::Partial) as u32);
        }
        offs.push(ents.len() as u32);
    }
    (offs, ents)
}

/// Re-tiles an explicit block schedule to the kernel's tiles: a kernel tile is Full when every
/// user tile it overlaps is listed, absent when none is, Partial otherwise (its elements then
/// look the user's tile up). Also returns the user's dense tile table.
fn retile(s: &BlockSchedule, br: usize, bc: usize) -> Result<(BlockSchedule, Vec<u8>)> {
    let (uq, uk) = (s.q_tiles, s.k_tiles);
    let mut table = vec![0u8; s.batch * s.heads * uq * uk];
    for b in 0..s.batch {
        for h in 0..s.heads {
            for qt in 0..uq {
                for e in s.row(b, h, qt) {
                    table[((b * s.heads + h) * uq + qt) * uk + e.k_tile as usize] = 1;
                }
            }
        }
    }
    if s.tile_q == br && s.tile_k == bc {
        return Ok((s.clone(), table));
    }
    let kq = s.sq.div_ceil(br);
    let kk = s.sk.div_ceil(bc);
    let mut rows = Vec::with_capacity(s.batch * s.heads * kq);
    for b in 0..s.batch {
        for h in 0..s.heads {
            let t = &table[(b * s.heads + h) * uq * uk..][..uq * uk];
            for qt in 0..kq {
                let (r0, r1) = (qt * br, ((qt + 1) * br).min(s.sq));
                let (u0, u1) = (r0 / s.tile_q, (r1 - 1) / s.tile_q);
                let mut row = Vec::new();
                for kt in 0..kk {
                    let (c0, c1) = (kt * bc, ((kt + 1) * bc).min(s.sk));
                    let (w0, w1) = (c0 / s.tile_k, (c1 - 1) / s.tile_k);
                    let mut on = 0;
                    for u in u0..=u1 {
                        on += t[u * uk + w0..=u * uk + w1]
                            .iter()
                            .filter(|&&x| x != 0)
                            .count();
                    }
                    let all = (u1 - u0 + 1) * (w1 - w0 + 1);
                    if on > 0 {
                        row.push(TileEntry {
                            k_tile: kt as u32,
                            kind: if on == all {
                                TileKind::Full
                            } else {
                                TileKind::Partial
                            },
                        });
                    }
                }
                rows.push(row);
            }
        }
    }
    let out = BlockSchedule::from_rows(br, bc, s.sq, s.sk, s.batch, s.heads, rows)?;
    Ok((out, table))
}

/// [`crate::forward`] on the GPU: copies the inputs, runs, copies the output (in the input
/// dtype) and LSE back.
pub fn forward(
    dev: &Arc<CudaDevice>,
    q: &TensorView,
    k: &TensorView,
    v: &TensorView,
    params: &AttnParams,
    mask: MaskSpec,
) -> Result<AttnOutput> {
    let dims = validate("cuda attention", q, k, v)?;
    let plan = FwdPlan::new(dev, dims, q.dtype(), params, mask)?;
    run_host(dev, &plan, q, k, v)
}

/// Runs `plan` on host tensors: copies the inputs, launches, copies the output (in the input
/// dtype) and LSE back.
pub(crate) fn run_host(
    dev: &Arc<CudaDevice>,
    plan: &FwdPlan,
    q: &TensorView,
    k: &TensorView,
    v: &TensorView,
) -> Result<AttnOutput> {
    let dims = plan.dims;
    let (qd, kd, vd) = (
        DevTensor::upload(dev, "q", q)?,
        DevTensor::upload(dev, "k", k)?,
        DevTensor::upload(dev, "v", v)?,
    );
    let mut o = DevTensor::alloc(dev, [dims.batch, dims.sq, dims.hq, dims.d], q.dtype())?;
    let mut lse = dev
        .stream()
        .alloc_zeros::<f32>(dims.batch * dims.hq * dims.sq)
        .map_err(drv("alloc"))?;
    plan.launch(&qd, &kd, &vd, &mut o, &mut lse)?;
    dev.synchronize()?;
    let out = o.download(dev)?;
    let lse = dev.stream().clone_dtoh(&lse).map_err(drv("copy to host"))?;
    Ok(AttnOutput { out, lse })
}

/// The forward of a gathered selection under `mask` on the GPU ([`FwdPlan::with_gather`]):
/// copies the inputs, runs, copies the output and LSE back.
pub fn forward_gathered(
    dev: &Arc<CudaDevice>,
    q: &TensorView,
    k: &TensorView,
    v: &TensorView,
    params: &AttnParams,
    mask: MaskSpec,
    sel: &TileKeys,
) -> Result<AttnOutput> {
    let dims = validate("cuda attention", q, k, v)?;
    let plan = FwdPlan::with_gather(dev, dims, q.dtype(), params, mask, sel)?;
    run_host(dev, &plan, q, k, v)
}

/// [`crate::forward_with_map`] on the GPU ([`FwdPlan::with_map`]): the output, LSE and the
/// block-pooled attention map copied back.
pub fn forward_with_map(
    dev: &Arc<CudaDevice>,
    q: &TensorView,
    k: &TensorView,
    v: &TensorView,
    params: &AttnParams,
    mask: MaskSpec,
    block: usize,
) -> Result<(AttnOutput, crate::AttnMap)> {
    let dims = validate("cuda attention", q, k, v)?;
    let plan = FwdPlan::with_map(dev, dims, q.dtype(), params, mask, block)?;
    let (qd, kd, vd) = (
        DevTensor::upload(dev, "q", q)?,
        DevTensor::upload(dev, "k", k)?,
        DevTensor::upload(dev, "v", v)?,
    );
    let mut o = DevTensor::alloc(dev, [dims.batch, dims.sq, dims.hq, dims.d], q.dtype())?;
    let s = dev.stream();
    let alloc = |n: usize| s.alloc_zeros::<f32>(n.max(1)).map_err(drv("alloc"));
    let mut lse = alloc(dims.batch * dims.hq * dims.sq)?;
    let shape = plan.map_shape().unwrap_or_default();
    let n = shape.iter().product();
    let (mut mass, mut max) = (alloc(n)?, alloc(n)?);
    plan.launch_map_on(s, &qd, &kd, &vd, &mut o, &mut lse, &mut mass, &mut max)?;
    dev.synchronize()?;
    let out = o.download(dev)?;
    let host = |x: &CudaSlice<f32>| -> Result<Vec<f32>> {
        let mut v = s.clone_dtoh(x).map_err(drv("copy to host"))?;
        v.truncate(n);
        Ok(v)
    };
    let map = crate::AttnMap {
        block,
        batch: dims.batch,
        heads: dims.hq,
        q_blocks: shape[2],
        k_blocks: shape[3],
        mass: host(&mass)?,
        max: host(&max)?,
    };
    let lse = s.clone_dtoh(&lse).map_err(drv("copy to host"))?;
    Ok((AttnOutput { out, lse }, map))
}

/// The byte layout of a C parameter struct as the kernels declare it (tests: the Rust structs
/// are checked field by field against it). Knows the types the parameter structs use: pointers,
/// `i64`, `int`, `float`, arrays of those with a number or `LA_MASK_CONSTS` as length; natural
/// alignment, as both compilers lay out plain structs. Returns every field's (name, offset) and
/// the struct's size.
#[cfg(test)]
pub(crate) fn c_struct_layout(src: &str, name: &str) -> (Vec<(String, usize)>, usize) {
    let start = src
        .find(&format!("struct {name} {{"))
        .unwrap_or_else(|| panic!("no struct {name}"));
    let body = &src[start..];
    let body = &body[body.find('{').unwrap() + 1..body.find("};").unwrap()];
    let code: String = body
        .lines()
        .map(|l| l.split("//").next().unwrap())
        .collect::<Vec<_>>()
        .join(" ");
    let (mut fields, mut off, mut align) = (Vec::new(), 0usize, 1usize);
    for decl in code.split(';').map(str::trim).filter(|d| !d.is_empty()) {
        let (size, names) = match decl.rfind('*') {
            Some(star) => (8, &decl[star + 1..]),
            None => {
                let (ty, names) = decl.split_once(' ').unwrap();
                let size = match ty {
                    "i64" | "double" => 8,
                    "int" | "float" => 4,
                    _ => panic!("{name}: unknown type in `{decl}`"),
                };
                (size, names)
            }
        };
        for n in names.split(',').map(str::trim) {
            let (n, count) = match n.split_once('[') {
                Some((n, len)) => {
                    let len = len.trim_end_matches(']').trim();
                    let count = if len == "LA_MASK_CONSTS" {
                        MASK_CONSTS
                    } else {
                        len.parse().unwrap()
                    };
                    (n.trim(), count)
                }
                None => (n, 1),
            };
            off = off.next_multiple_of(size);
            align = align.max(size);
            fields.push((n.to_string(), off));
            off += size * count;
        }
    }
    (fields, off.next_multiple_of(align))
}

/// Checks a Rust parameter struct's field offsets (`rust`: field name and offset) and size
/// against the C declaration: a Rust field matches the C field of the same name (case aside),
/// or for arrays standing for several C fields (`q_s: [i64; 3]` for `q_sb, q_ss, q_sh`,
/// `blk_dims` for `blk_tq, ...`) the first of them, at the same offset. With the sizes equal,
/// a C field missing or added anywhere shifts the fields after it (the callers also count the
/// C fields).
#[cfg(test)]
pub(crate) fn check_layout(src: &str, name: &str, rust: &[(&str, usize)], rust_size: usize) {
    let (c, c_size) = c_struct_layout(src, name);
    assert_eq!(
        c_size, rust_size,
        "{name}: C {c_size} bytes, Rust {rust_size}"
    );
    let alias = |r: &str| match r {
        "q_s" | "k_s" | "v_s" | "o_s" => format!("{}b", r),
        "blk_dims" => "blk_tq".to_string(),
        _ => r.to_string(),
    };
    for &(r, off) in rust {
        let want = alias(r);
        let cf = c
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(&want))
            .unwrap_or_else(|| panic!("{name}: no C field for Rust `{r}`"));
        assert_eq!(cf.1, off, "{name}.{r}: C offset {}, Rust {off}", cf.1);
    }
}

/// `(field name, offset)` of each listed field of a struct.
#[cfg(test)]
macro_rules! offsets {
    ($t:ty; $($f:ident),* $(,)?) => {
        vec![$((stringify!($f), std::mem::offset_of!($t, $f))),*]
    };
}
#[cfg(test)]
pub(crate) use offsets;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Rng;

    /// The Hopper forward kernels compile under NVRTC for sm_90a (no GPU needed, only
    /// `libnvrtc`; skipped, and said so, without it): warp-specialized tiles of D 64, 128 and 256
    /// (and D 96 / 192 padded to 128 / 256) and
    /// the wgmma kernel, bf16 / f16, each softmax step ([`fwd_softmax`]: the scale in the
    /// exponent's FFMA only for scale > 0 without soft-cap), element and interval mask programs.
    #[test]
    fn hopper_forward_kernels_compile_with_nvrtc() {
        let Some((element, interval)) = super::super::compile::test_programs() else {
            return;
        };
        // The plan's two program forms: the element program alone, and with the interval
        // program after it (which defines LA_MASK_INTERVAL itself).
        let interval = element.clone() + &interval;
        let tiles = [
            (TileCfg::warp_specialized(3, 128, 1), 64),
            (TileCfg::warp_specialized(2, 128, 1), 128),
            (TileCfg::warp_specialized(1, 64, 2), 128),
            (TileCfg::warp_specialized(2, 64, 1), 256),
            (TileCfg::warp_specialized(2, 128, 1), 96),
            (TileCfg::warp_specialized(2, 64, 1), 192),
            (TileCfg::choose_wgmma(64, false), 64),
            (TileCfg::choose_wgmma(128, false), 128),
        ];
        let params = [
            AttnParams::default(),
            AttnParams {
                softcap: Some(30.0),
                ..Default::default()
            },
            AttnParams {
                scale: Some(-0.1),
                ..Default::default()
            },
        ];
        let mut n = 0;
        for (tile, d) in tiles {
            for dtype in [DType::BF16, DType::F16] {
                for (pi, params) in params.iter().enumerate() {
                    for (prog, softmax) in [
                        (&element, "plain"),
                        (&interval, "plain"),
                        (&element, "lazy"),
                        (&interval, "fused"),
                    ] {
                        let (src, _, tag, defines) =
                            kernel_build(&tile, dtype, d, params, prog, softmax);
                        let fused = defines
                            .iter()
                            .any(|(k, v)| k == "LA_FUSED_SCALE" && v == "1");
                        assert_eq!(
                            fused,
                            pi == 0 && softmax != "plain",
                            "LA_FUSED_SCALE only for scale > 0, no soft-cap"
                        );
                        let name = format!("test_fwd{tag}_d{d}_{}", dtype.name());
                        if let Err(e) =
                            super::super::compile::compile(&name, &src, "sm_90a", &defines)
                        {
                            panic!("{name} {defines:?}: {e}");
                        }
                        n += 1;
                    }
                }
            }
        }
        assert_eq!(n, 192);
    }

    /// The warp-specialized kernel's epilogue and descriptor variants compile for every tile,
    /// bf16 / f16, without spills or serialized wgmma (NVRTC; skipped without `libnvrtc`): the
    /// defaults with and without skip-softmax, which stage the epilogue (`LA_O_STAGE`) up to
    /// D 128 except with skip-softmax on three consumers, and descriptors formed from the
    /// addresses (`LONGATTN_CUDA_FWD_DESC=address`, `LA_DESC_ADD` 0).
    #[test]
    fn warp_specialized_variants_compile_clean() {
        let Some((element, interval)) = super::super::compile::test_programs() else {
            return;
        };
        let program = element + &interval;
        for (tile, d) in ws_test_tiles() {
            for dtype in [DType::BF16, DType::F16] {
                for (skip, address) in [(None, false), (Some(0.01), false), (None, true)] {
                    let params = AttnParams {
                        skip_below: skip,
                        ..Default::default()
                    };
                    let (src, _, tag, mut defines) =
                        kernel_build(&tile, dtype, d, &params, &program, FWD_SOFTMAX_DEFAULT);
                    let staged = defines.iter().any(|(k, v)| k == "LA_O_STAGE" && v == "1");
                    let three_skip = tile.warps == 16 && skip.is_some();
                    assert_eq!(staged, d <= 128 && !three_skip, "{tag} d{d}");
                    if address {
                        for (k, v) in defines.iter_mut() {
                            if k == "LA_DESC_ADD" {
                                *v = "0".into();
                            }
                        }
                    }
                    let name = format!(
                        "test_fwd{tag}_skip{}_addr{}_d{d}_{}",
                        skip.is_some() as u8,
                        address as u8,
                        dtype.name()
                    );
                    super::super::compile::assert_ptxas_clean(&name, &src, &defines);
                }
            }
        }
        // A schedule without Partial tiles (full masks): its program is an interval one, so
        // three consumers take the descriptors by one add, clean.
        for (tile, d) in [
            (TileCfg::warp_specialized(3, 128, 1), 64),
            (TileCfg::warp_specialized(2, 128, 1), 128),
        ] {
            let (src, _, tag, defines) = kernel_build(
                &tile,
                DType::BF16,
                d,
                &AttnParams::default(),
                NO_MASK,
                FWD_SOFTMAX_DEFAULT,
            );
            assert!(
                defines.contains(&("LA_DESC_ADD".into(), "1".into())),
                "{tag} d{d}: {defines:?}"
            );
            let name = format!("test_fwd{tag}_nomask_d{d}");
            super::super::compile::assert_ptxas_clean(&name, &src, &defines);
        }
    }

    /// A gated mask at the kernel's tiles (`retile` of the gate, then `gate_tiles` with the
    /// expression's schedule): a tile is Full only when every pair of `mask & gate` in it is
    /// allowed, and every tile holding an allowed pair is listed; gates of other tile sizes than
    /// the kernel's (smaller, larger, not dividing), per head, Sq != Sk.
    #[test]
    fn gated_kernel_tiles_cover_mask_and_gate() {
        let mut rng = Rng::new(17);
        for &(t, sq, sk, text) in &[
            (32, 300, 300, "causal"),
            (48, 200, 333, "causal & (sinks(4) | window(50,0))"),
            (128, 257, 257, "window(20,20) | strided(7)"),
            (100, 129, 400, "causal & power(16)"),
        ] {
            let hq = 2;
            let bound = crate::mask::MaskExpr::parse(text)
                .unwrap()
                .bind(crate::mask::MaskShape { batch: 1, sq, sk }, None)
                .unwrap();
            let (qt, kt) = (sq.div_ceil(t), sk.div_ceil(t));
            let table: Vec<u8> = (0..hq * qt * kt).map(|_| rng.below(2) as u8).collect();
            let gated = bound
                .schedule(t, t)
                .unwrap()
                .gated(&table, [1, hq, qt, kt])
                .unwrap();
            for (br, bc) in [(128, 128), (64, 176), (128, 64)] {
                let (g, back) = retile(&gated, br, bc).unwrap();
                let s = gate_tiles(&bound.schedule(br, bc).unwrap(), &g).unwrap();
                assert_eq!(s.heads, hq);
                for h in 0..hq {
                    for kq in 0..s.q_tiles {
                        let (r0, r1) = s.q_range(kq);
                        for kk in 0..s.k_tiles {
                            let (c0, c1) = s.k_range(kk);
                            let on = |i: usize, j: usize| {
                                bound.allowed(0, i, j)
                                    && back[(h * qt + i / t) * kt + j / t] != 0
                                    && table[(h * qt + i / t) * kt + j / t] != 0
                            };
                            let n = (r0..r1)
                                .flat_map(|i| (c0..c1).map(move |j| (i, j)))
                                .filter(|&(i, j)| on(i, j))
                                .count();
                            let got = s.row(0, h, kq).iter().find(|e| e.k_tile as usize == kk);
                            if n > 0 {
                                assert!(
                                    got.is_some(),
                                    "`{text}` gate {t}: tile ({kq}, {kk}) of head {h} dropped"
                                );
                            }
                            if got.is_some_and(|e| e.kind == TileKind::Full) {
                                assert_eq!(
                                    n,
                                    (r1 - r0) * (c1 - c0),
                                    "`{text}` gate {t}: tile ({kq}, {kk}) Full"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// The gated program (the expression's `la_mask` renamed, ANDed with the gate's table
    /// lookup) compiles in the warp-specialized kernel (NVRTC; skipped without `libnvrtc`).
    #[test]
    fn gated_kernels_compile_with_nvrtc() {
        let Some((element, _)) = super::super::compile::test_programs() else {
            return;
        };
        let prog = gated_program(&element);
        assert_eq!(prog.matches("bool la_mask(").count(), 1, "{prog}");
        assert!(prog.contains("la_mask_expr(p, b, h, i, j) && la_mask_gate(p, b, h, i, j)"));
        for tile in [
            TileCfg::warp_specialized(2, 128, 1),
            TileCfg::choose_wgmma(128, false),
        ] {
            compile_d128(&tile, &prog, "test_gated");
        }
    }

    /// Compiles the bf16 D 128 forward of `tile` with mask program `prog` (NVRTC, sm_90a),
    /// panicking with the compiler's message.
    fn compile_d128(tile: &TileCfg, prog: &str, prefix: &str) {
        let params = AttnParams::default();
        let (src, _, tag, defines) = kernel_build(tile, DType::BF16, 128, &params, prog, "fused");
        let name = format!("{prefix}{tag}");
        super::super::compile::assert_compiles(&name, &src, "sm_90a", &defines);
    }

    /// Every atom's device function compiles (NVRTC, sm_90a; skipped without `libnvrtc`): one
    /// element program holding them all, in the warp-specialized kernel.
    #[test]
    fn atom_kernels_compile_with_nvrtc() {
        if super::super::compile::test_programs().is_none() {
            return;
        }
        let e = crate::mask::MaskExpr::parse(
            "causal & (window(3,0) | sinks(2) | prefix(5) | chunk(4) | strided(3) | power(8) \
             | radial(16,4) | neighborhood(5) | neighborhood2d(15,20,3,5,1,2)) | !document | full",
        )
        .unwrap();
        let docs = crate::mask::DocIds {
            q: (0..300).map(|t| t / 7).collect(),
            k: (0..300).map(|t| t / 5).collect(),
        };
        let bm = e
            .bind(crate::mask::MaskShape::square(300), Some(docs))
            .unwrap();
        let prog = bm.cuda_program().source;
        compile_d128(&TileCfg::warp_specialized(2, 128, 1), &prog, "test_atoms");
    }

    /// `LaFwdParams` and `LaWsParams` are laid out as the kernels declare them (they are passed
    /// by value: one field off shifts every field after it).
    #[test]
    fn parameter_structs_match_the_kernels() {
        let rust = offsets!(LaFwdParams; q, k, v, o, lse, q_s, k_s, v_s, o_s, b, sq, sk, hq, hk,
            scale_log2, cap_pre, cap_post, sched_off, sched_ent, sched_batch, sched_heads,
            q_tiles, pad0, qdoc, kdoc, blk, blk_dims, dlo, dhi, mbits, mbix, mgrp, mc);
        check_layout(
            PARAMS,
            "LaFwdParams",
            &rust,
            std::mem::size_of::<LaFwdParams>(),
        );
        let (c, _) = c_struct_layout(PARAMS, "LaFwdParams");
        assert_eq!(c.len(), 5 + 12 + 8 + 2 + 4 + 2 + 1 + 6 + 2 + 3 + 1);
        let size = |s: usize| format!("sizeof(LaFwdParams) == {s},");
        assert!(PARAMS.contains(&size(std::mem::size_of::<LaFwdParams>())));
        let ws = format!(
            "sizeof(LaWsParams) == {},",
            std::mem::size_of::<LaWsParams>()
        );
        assert!(FWD_WS.contains(&ws), "attn_fwd_ws.cu must assert {ws}");
        assert_eq!(std::mem::offset_of!(LaWsParams, p), 3 * 128);
        // `work` right after the common parameters, as the kernel declares it.
        assert_eq!(
            std::mem::offset_of!(LaWsParams, work),
            3 * 128 + std::mem::size_of::<LaFwdParams>()
        );
        // Then the skip-softmax counters' pointer and threshold, as declared.
        assert_eq!(
            std::mem::offset_of!(LaWsParams, skip_stats),
            3 * 128 + std::mem::size_of::<LaFwdParams>() + 8
        );
        assert_eq!(
            std::mem::offset_of!(LaWsParams, skip_log2),
            3 * 128 + std::mem::size_of::<LaFwdParams>() + 16
        );
        let decl = "const u32* work;\n    // Skip-softmax (LA_SKIP)";
        assert!(
            FWD_WS.contains(decl),
            "attn_fwd_ws.cu: skip fields after `work`"
        );
        assert!(FWD_WS.contains("unsigned long long* skip_stats;\n    float skip_log2;\n"));
        // Then the map's fields, as declared.
        assert_eq!(
            std::mem::offset_of!(LaWsParams, map_scratch),
            3 * 128 + std::mem::size_of::<LaFwdParams>() + 24
        );
        assert_eq!(
            std::mem::offset_of!(LaWsParams, map_cap),
            3 * 128 + std::mem::size_of::<LaFwdParams>() + 24 + 3 * 8 + 3 * 4
        );
        assert!(FWD_WS.contains("float2* map_scratch;\n    float* map_mass;\n    float* map_max;\n    int map_block, map_qb, map_kb, map_cap;\n"));
        // Then the gathered keys' list, the last field.
        assert_eq!(
            std::mem::offset_of!(LaWsParams, gkeys),
            3 * 128 + std::mem::size_of::<LaFwdParams>() + 24 + 3 * 8 + 4 * 4
        );
        assert!(FWD_WS.contains("int map_block, map_qb, map_kb, map_cap;\n    // Gathered keys (LA_GATHER): the chunks' key lists, LA_BC keys a chunk.\n    const u32* gkeys;\n};"));
    }

    /// The warp-specialized tile configs and their head dims (three consumers at D 64, two at
    /// D 128, one with two blocks per SM, two with 64-key tiles at D 256).
    fn ws_test_tiles() -> [(TileCfg, usize); 4] {
        [
            (TileCfg::warp_specialized(3, 128, 1), 64),
            (TileCfg::warp_specialized(2, 128, 1), 128),
            (TileCfg::warp_specialized(1, 64, 2), 128),
            (TileCfg::warp_specialized(2, 64, 1), 256),
        ]
    }

    /// The skip-softmax variant (LA_SKIP) of every warp-specialized tile config compiles, with
    /// the element and interval programs, the fused and lazy softmax steps, and soft-cap; ptxas
    /// keeps its wgmma asynchronous (C7519 "wgmma.mma_async instructions are serialized": a
    /// branch around a wgmma on a value the compiler cannot prove uniform serializes every wgmma
    /// of the kernel; CUDA 12's ptxas also notes a harmless injected warpgroup.arrive under the
    /// same code, the default variant's too) and spills nothing, like the default variant.
    #[test]
    fn skip_kernels_compile_with_nvrtc() {
        let Some((element, interval)) = super::super::compile::test_programs() else {
            return;
        };
        let interval = element.clone() + &interval;
        let mut n = 0;
        for (tile, d) in ws_test_tiles() {
            for (prog, softmax, cap, skip, late) in [
                (&element, "fused", None, false, false),
                (&element, "fused", None, true, false),
                (&element, "fused", None, true, true),
                (&interval, "lazy", None, true, false),
                (&interval, "fused", Some(20.0), true, false),
            ] {
                let params = AttnParams {
                    softcap: cap,
                    skip_below: skip.then_some(0.01),
                    ..Default::default()
                };
                let (src, _, tag, mut defines) =
                    kernel_build(&tile, DType::BF16, d, &params, prog, softmax);
                if late {
                    defines.push(("LA_SKIP_LATE".into(), "1".into()));
                }
                assert_eq!(defines.iter().any(|(k, _)| k == "LA_SKIP"), skip);
                let name = format!("test_fwd{tag}_skip{}{}_d{d}", skip as u8, late as u8);
                super::super::compile::assert_ptxas_clean(&name, &src, &defines);
                n += 1;
            }
        }
        assert_eq!(n, 20);
    }

    /// Compiles `define` = 1 on each of `tiles` with the element program, the interval program
    /// and the interval program with skip-softmax (`skip` decides which (D, skip-softmax) pairs
    /// the host builds), asserting ptxas keeps every wgmma asynchronous and spills nothing;
    /// returns the number of variants built (None without `libnvrtc`).
    fn assert_ws_variants_clean(
        define: &str,
        tiles: &[(TileCfg, usize)],
        skip: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let (element, interval) = super::super::compile::test_programs()?;
        let interval = element.clone() + &interval;
        let mut n = 0;
        for &(tile, d) in tiles {
            for (prog, sk) in [(&element, false), (&interval, false), (&interval, true)] {
                if sk && !skip(d) {
                    continue;
                }
                let params = AttnParams {
                    skip_below: sk.then_some(0.01),
                    ..Default::default()
                };
                let (src, _, tag, mut defines) =
                    kernel_build(&tile, DType::BF16, d, &params, prog, &fwd_softmax());
                defines.push((define.into(), "1".into()));
                let name = format!("test_fwd{tag}_{define}_skip{}_d{d}", sk as u8);
                super::super::compile::assert_ptxas_clean(&name, &src, &defines);
                n += 1;
            }
        }
        Some(n)
    }

    /// The pooled-map variant (LA_MAP) of every warp-specialized tile config compiles, alone
    /// and with skip-softmax, the element and interval programs, without spills or serialized
    /// wgmma (NVRTC; skipped without `libnvrtc`).
    #[test]
    fn map_kernels_compile_with_nvrtc() {
        if let Some(n) = assert_ws_variants_clean("LA_MAP", &ws_test_tiles(), |_| true) {
            assert_eq!(n, 12);
        }
    }

    /// The gathered-key variant (`LA_GATHER`) of every warp-specialized tile shape, with the
    /// element and interval programs and with skip-softmax, without spills or serialized wgmma
    /// (NVRTC; skipped without `libnvrtc`).
    #[test]
    fn gather_kernels_compile_with_nvrtc() {
        // (D 64 gathers with two consumers: plan_tile; skip-softmax at D 256 is refused by the
        // host, FwdPlan::build: its consumers would spill.)
        let mut tiles = ws_test_tiles();
        tiles[0].0 = TileCfg::warp_specialized(2, 128, 1);
        if let Some(n) = assert_ws_variants_clean("LA_GATHER", &tiles, |d| d != 256) {
            assert_eq!(n, 11);
        }
    }

    /// Tuning aid, run by hand: writes the warp-specialized forward's CUBIN (bf16, D 128, the
    /// default tile) for `full` and `causal`, without and with skip-softmax, to
    /// `$LONGATTN_DUMP_CUBIN`, to read its SASS with `nvdisasm` without a GPU:
    /// `LONGATTN_DUMP_CUBIN=/tmp/cub cargo test -p longattn --lib dump_forward -- --ignored`.
    #[test]
    #[ignore = "a tuning aid that writes files, not a check: run by hand with LONGATTN_DUMP_CUBIN (docs/PERF.md)"]
    fn dump_forward_cubins() {
        let Some(dir) = super::super::compile::dump_dir() else {
            return;
        };
        for mask in ["full", "causal"] {
            let bm = crate::mask::MaskExpr::parse(mask)
                .unwrap()
                .bind(crate::mask::MaskShape::square(4096), None)
                .unwrap();
            let program = bm.cuda_program().source;
            for skip in [false, true] {
                let params = AttnParams {
                    skip_below: skip.then_some(0.01),
                    ..Default::default()
                };
                let tile = TileCfg::warp_specialized(2, 128, 1);
                let (src, _, tag, defines) = kernel_build(
                    &tile,
                    DType::BF16,
                    128,
                    &params,
                    &program,
                    FWD_SOFTMAX_DEFAULT,
                );
                let file = format!("{mask}_fwd{tag}_skip{}", skip as u8);
                super::super::compile::dump_cubin(&dir, &file, &src, &defines);
            }
        }
    }

    /// Head dims between 64 and 256 run padded on Hopper's warp-specialized kernel; others, and
    /// other GPUs, keep the mma.sync kernel at their own head dim.
    #[test]
    fn head_dims_pad_to_the_warp_specialized_kernels() {
        for (d, want) in [
            (16, None),
            (32, None),
            (48, None),
            (64, Some(64)),
            (80, Some(128)),
            (96, Some(128)),
            (128, Some(128)),
            (144, Some(256)),
            (192, Some(256)),
            (256, Some(256)),
            (100, None),
            (272, None),
        ] {
            assert_eq!(ws_dim(d, true), want, "D {d}");
            let narrow = TileCfg::choose_with(d, 4096, (9, 0), false);
            if d != 64 && d != 128 {
                assert_eq!(ws_dim(d, false), None, "D {d}");
                assert_eq!(
                    narrow.kernel,
                    FwdKernel::MmaSync,
                    "D {d} without the wide dims"
                );
            }
            let t = TileCfg::choose_with(d, 4096, (9, 0), true);
            match want {
                Some(k) => {
                    assert_eq!(t.kernel, FwdKernel::WarpSpecialized, "D {d}");
                    assert_eq!(kernel_dim(&t, d), k, "D {d}");
                    assert!(t.smem(k) <= 227 * 1024, "D {d}: {} bytes", t.smem(k));
                }
                None => assert_eq!(t.kernel, FwdKernel::MmaSync, "D {d}"),
            }
            let a = TileCfg::choose(d, 4096, (8, 0));
            assert_eq!(a.kernel, FwdKernel::MmaSync, "D {d} on sm_80");
            assert_eq!(kernel_dim(&a, d), d);
        }
    }

    /// Every item once; block loads within one item of each other; groups started in order.
    #[test]
    fn work_lists_cover_every_item_balanced_and_in_group_order() {
        let causal = |_: usize, qt: usize| qt + 1;
        let uneven = |bh: usize, qt: usize| (bh * 7 + qt * 13) % 11;
        let cases: [(usize, usize, usize, usize); 7] = [
            (16, 128, 3, 132),
            (16, 512, 1, 264),
            (1, 1, 1, 1),
            (7, 5, 16, 132),
            (3, 113, 2, 65),
            (64, 32, 12, 264),
            (5, 9, 5, 1),
        ];
        for &(pairs, q_tiles, group, blocks) in &cases {
            for (name, cost) in [
                ("causal", &causal as &dyn Fn(usize, usize) -> usize),
                ("uneven", &uneven),
            ] {
                let w = ws_work_list(pairs, q_tiles, group, blocks, cost);
                let what =
                    format!("{name} pairs {pairs} q_tiles {q_tiles} group {group} blocks {blocks}");
                let (off, items) = w.split_at(blocks + 1);
                assert_eq!(off[0], 0, "{what}");
                assert_eq!(off[blocks] as usize, pairs * q_tiles, "{what}");
                let mut seen = vec![false; pairs * q_tiles];
                let mut loads = Vec::new();
                for x in 0..blocks {
                    assert!(off[x] <= off[x + 1], "{what}");
                    let mine = &items[off[x] as usize..off[x + 1] as usize];
                    let mut load = 0;
                    let mut last_group = 0;
                    for &t in mine {
                        let (bh, qt) = (t as usize / q_tiles, t as usize % q_tiles);
                        assert!(
                            !std::mem::replace(&mut seen[t as usize], true),
                            "{what}: item {t} twice"
                        );
                        load += cost(bh, qt) + 1;
                        // A block never goes back to an earlier group.
                        assert!(
                            bh / group >= last_group,
                            "{what}: block {x} goes back a group"
                        );
                        last_group = bh / group;
                    }
                    loads.push(load);
                }
                assert!(seen.iter().all(|&s| s), "{what}: an item is missing");
                let most = (0..pairs)
                    .flat_map(|bh| (0..q_tiles).map(move |qt| (bh, qt)))
                    .map(|(bh, qt)| cost(bh, qt) + 1)
                    .max()
                    .unwrap();
                let (lo, hi) = (loads.iter().min().unwrap(), loads.iter().max().unwrap());
                assert!(
                    hi - lo <= most,
                    "{what}: loads {lo}..{hi}, largest item {most}"
                );
            }
        }
    }

    /// Re-tiling keeps the element semantics: absent kernel tiles hold no allowed element, Full
    /// ones only allowed elements, Partial ones some of each (user tiles of awkward sizes).
    #[test]
    fn retile_matches_the_block_mask() {
        let mut rng = Rng::new(7);
        let cases: [(usize, usize, usize); 4] = [
            (32, 300, 200),
            (48, 129, 1000),
            (100, 1, 513),
            (128, 640, 128),
        ];
        for &(t, sq, sk) in &cases {
            let (qt, kt) = (sq.div_ceil(t), sk.div_ceil(t));
            let table: Vec<u8> = (0..qt * kt).map(|_| rng.below(3).min(1) as u8).collect();
            let s = BlockSchedule::from_block_mask(&table, [1, 1, qt, kt], t, t, sq, sk).unwrap();
            let (r, back) = retile(&s, 128, 64).unwrap();
            assert_eq!(back, table);
            for qtile in 0..r.q_tiles {
                let row = r.row(0, 0, qtile);
                for ktile in 0..r.k_tiles {
                    let (mut on, mut off) = (0, 0);
                    for i in qtile * 128..((qtile + 1) * 128).min(sq) {
                        for j in ktile * 64..((ktile + 1) * 64).min(sk) {
                            if table[(i / t) * kt + j / t] != 0 {
                                on += 1;
                            } else {
                                off += 1;
                            }
                        }
                    }
                    let kind = row
                        .iter()
                        .find(|e| e.k_tile as usize == ktile)
                        .map(|e| e.kind);
                    match kind {
                        None => assert_eq!(on, 0, "tile {qtile},{ktile} dropped allowed pairs"),
                        Some(TileKind::Full) => assert_eq!(off, 0, "tile {qtile},{ktile}"),
                        Some(TileKind::Partial) => {
                            assert!(on > 0 && off > 0, "tile {qtile},{ktile}")
                        }
                    }
                }
            }
        }
    }
}
