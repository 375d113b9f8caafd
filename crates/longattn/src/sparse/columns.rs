//! Query-tile columns (`columns`) in the gathered form: the selection as whole key tiles and
//! gathered keys ([`TileKeys`]), what the CUDA forward's gathered variant computes at the cost
//! of the keys kept. The plain reference ([`reference`], f64) and the device estimator
//! ([`ColumnsPlan`], `cuda/kernels/sparse_columns.cu`) share these semantics.
//!
//! Per (batch row b, query head h, query tile qt of the kernel's `tile_q` rows r0 .. r1 - 1; the
//! whole batch row one document):
//! ```text
//!   sampled rows  i_s = r0 + floor((s + 1) (r1 - r0) / R) - 1, s < R   (R = `rows`; repeats and
//!                 rows before r0 dropped), n of them
//!   p_ij = softmax over the allowed keys of logit(q_i . k_j)           (mask: the candidates)
//!   m_j  = 1/n sum_{i sampled} p_ij                                     (the tile's mean softmax)
//!   bin(m) = clamp(floor(16 (log2 m + 24)), 0, NBIN - 1)               (2^(1/16) steps)
//!   cut B = the largest bin with sum_{j: bin(m_j) >= B} m_j >= gamma sum_j m_j
//!   keys  = { j : m_j > 0, bin(m_j) >= B } | { j < sink }   (in candidate tiles, not in band tiles)
//!   band tiles = the candidate key tiles meeting [p_r0 - (local - 1), p_(r1-1)]  (computed whole;
//!                p_i = i + Sk - Sq; none for local = 0)
//! ```
//! The element-level `columns` of the CPU selector ([`super::estimate`]) keeps exactly the
//! heaviest keys and the band per row; here the cut is rounded down to its bin (every key of
//! the cut's bin kept: masses within 4.4% of each other) and the band to whole tiles (about one
//! tile more per query tile), a superset of the same pattern.
//!
//! A query tile whose keys number more than half its candidate keys computes every candidate
//! tile whole instead (a gathered chunk costs about twice a tile: docs/PERF.md), which also
//! bounds the key lists' memory by half the candidates. The check (`check` > 0): over the last
//! query tile's rows i with allowed keys, t = mean_i sum_{j computed for i} p_ij; t < check:
//! every query tile of (b, h) computes every candidate tile whole (the sampled rows do not speak
//! for the others).
use std::ops::RangeInclusive;
use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};

use super::gather::{TileKeys, GATHERED, PAD};
use super::{estimate, Method, SparseSpec};
use crate::attention::{AttnParams, Dims, MaskSpec};
use crate::cuda::forward::{LaFwdParams, COMMON, PARAMS};
use crate::cuda::{drv, CudaDevice, DevTensor, FwdPlan};
use crate::error::{Error, Result};
use crate::mask::{BlockSchedule, RowMask, TileKind};
use crate::tensor::{DType, TensorView};

const SRC: &str = include_str!("../cuda/kernels/sparse_columns.cu");
const OP: &str = "columns (gathered)";

/// Mass bins: 16 per octave over [2^-24, 1] (`CL_NBIN`).
pub(crate) const NBIN: usize = 384;

fn param(msg: String) -> Error {
    Error::Param { op: OP, msg }
}

/// The bin of a mass m > 0.
pub(crate) fn bin(m: f64) -> usize {
    (16.0 * (m.log2() + 24.0))
        .floor()
        .clamp(0.0, (NBIN - 1) as f64) as usize
}

/// The band's key tiles of query tile `qt`: those meeting [p_r0 - (local - 1), p_(r1-1)].
pub(crate) fn band_tiles(
    qt: usize,
    (tq, tk): (usize, usize),
    (sq, sk): (usize, usize),
    local: usize,
) -> Option<RangeInclusive<usize>> {
    let pos = |i: usize| i as i64 + sk as i64 - sq as i64;
    let (p0, p1) = (pos(qt * tq), pos(((qt + 1) * tq).min(sq) - 1));
    let lo = (p0 - (local as i64 - 1)).max(0);
    let hi = p1.min(sk as i64 - 1);
    (local > 0 && lo <= hi).then(|| lo as usize / tk..=hi as usize / tk)
}

/// The arguments of the gathered form.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ColumnsArgs {
    pub gamma: f64,
    pub rows: usize,
    pub sink: usize,
    pub local: usize,
    pub check: f64,
    /// The sampled rows' products from int8 Q and K (`int8=1`).
    pub int8: bool,
}

impl ColumnsArgs {
    /// The `columns` spec's arguments, or the error naming what the gathered form does not take.
    pub fn of(spec: &SparseSpec) -> Result<ColumnsArgs> {
        spec.check()?;
        let Method::Columns {
            gamma,
            rows,
            sink,
            local,
            check,
            check_gamma,
            int8,
            ..
        } = spec.method
        else {
            return Err(param(format!("`{spec}` is not `columns`")));
        };

        if check_gamma > 0.0 {
            return Err(param(format!(
                "`{spec}`: `check_gamma` (selecting again) runs on the CPU's element-level selector only (--backend cpu)"
            )));
        }
        if rows > 64 {
            return Err(param(format!(
                "`{spec}`: the gathered form samples at most 64 rows per query tile, got rows={rows}"
            )));
        }
        if spec.with.is_some() || spec.dense_last > 0 || spec.skip.is_some() {
            return Err(param(format!(
                "`{spec}`: unions (`A + B`), `dense_last` and skip-softmax are not taken by the gathered form"
            )));
        }
        let big = |x: usize| x.min(i32::MAX as usize);
        Ok(ColumnsArgs {
            gamma,
            rows,
            sink: big(sink),
            local: big(local),
            check,
            int8,
        })
    }
}

/// The plain reference (f64): the selection of `args` over q `[B, Sq, Hq, D]`, k `[B, Sk, Hk,
/// D]` at the candidates `cand` (the mask's schedule at the kernel's tiles; `rows` its element
/// rule), for every (batch row, query head).
pub fn reference(
    q: &TensorView,
    k: &TensorView,
    params: &AttnParams,
    args: &ColumnsArgs,
    cand: &BlockSchedule,
    rows: Option<&dyn RowMask>,
) -> Result<TileKeys> {
    let dims = super::dims_of(q, k)?;
    let ctx = super::cuda::check_ctx([q, k], dims, params, cand, rows);
    let (mut tiles, mut keys) = (Vec::new(), Vec::new());
    for b in 0..dims.batch {
        for h in 0..dims.hq {
            let (per, t) = estimate::columns_gathered(
                &ctx,
                (b, h),
                &super::Doc::whole(&dims),
                (args.gamma, args.rows, args.sink, args.local, args.int8),
            );
            let fails = args.check > 0.0 && t.is_some_and(|t| t < args.check);
            for (qt, (ts, ks)) in per.into_iter().enumerate() {
                if fails {
                    tiles.push(cand.row(b, h, qt).iter().map(|e| e.k_tile).collect());
                    keys.push(Vec::new());
                } else {
                    tiles.push(ts);
                    keys.push(ks);
                }
            }
        }
    }
    TileKeys::new(
        (cand.tile_q, cand.tile_k),
        (dims.sq, dims.sk),
        (dims.batch, dims.hq),
        tiles,
        keys,
    )
}

/// Field for field `ClParams` in `sparse_columns.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct ClParams {
    lse: u64,
    cut: u64,
    nkeys: u64,
    gkeys: u64,
    kbase: u64,
    lim: u64,
    cap: u64,
    chk: u64,
    cnt: u64,
    off: u64,
    ent: u64,
    bins: u64,
    bbase: u64,
    chkp: u64,
    gamma: f32,
    check: f32,
    sink: i32,
    local: i32,
    vec: i32,
    nchunk: i32,
}

// SAFETY: plain-old-data with the C layout of the kernel's `ClParams`.
unsafe impl cudarc::driver::DeviceRepr for ClParams {}

struct Kernels {
    hist: CudaFunction,
    emit: CudaFunction,
    emit_stored: CudaFunction,
    check_lse: CudaFunction,
    check: CudaFunction,
    lower: CudaFunction,
    scan: CudaFunction,
    /// `int8=1`: sparse_lowbit.cu's quantizers (key mean in two steps, int8 keys, int8 queries).
    quant: Option<[CudaFunction; 4]>,
}

struct Scratch {
    cand_off: CudaSlice<u32>,
    cand_ent: CudaSlice<u32>,
    lse: CudaSlice<f32>,
    cut: CudaSlice<i32>,
    nkeys: CudaSlice<u32>,
    gkeys: CudaSlice<u32>,
    kbase: CudaSlice<u32>,
    lim: CudaSlice<u32>,
    cap: CudaSlice<u32>,
    /// The check's per-block (mass sum, rows) and per-(block, row) partial (max, sum).
    chk: CudaSlice<f32>,
    chkp: CudaSlice<f32>,
    cnt: CudaSlice<u32>,
    off: CudaSlice<u32>,
    ent: CudaSlice<u32>,
    /// The keys' codes from the mass pass and where each row's start (None: the key lists'
    /// pass recomputes the probabilities).
    bins: Option<(CudaSlice<u16>, CudaSlice<u64>)>,
    /// `int8=1`: the int8 queries and keys (`sparse::cuda::LbScratch`).
    lb: Option<super::cuda::LbScratch>,
}

/// `columns` on the device: the estimator's kernels and scratch, and the gathered forward that
/// runs through what they write, all on the caller's stream with no host synchronisation.
///
/// ```text
///   ColumnsPlan::new(dev, dims, dtype, params, spec, mask)
///   plan.launch_on(stream, q, k, v, out, lse)   // estimate -> key lists -> gathered forward
///   plan.selection()                            // what it computed, as TileKeys (host)
/// ```
pub struct ColumnsPlan {
    dev: Arc<CudaDevice>,
    fwd: FwdPlan,
    dims: Dims,
    args: ColumnsArgs,
    /// The mask's schedule at the kernel's tiles (the candidates).
    cand: BlockSchedule,
    /// The estimator's kernels and scratch (None under the dense fallback).
    est: Option<(Kernels, Scratch)>,
    /// Fewer keys than the spec's `dense_below` (default [`super::cuda::CUDA_DENSE_BELOW`]):
    /// no estimate, every candidate tile through the gathered forward's own rows.
    pub fallback: bool,
    /// Forward rows (B Hq q_tiles) and the bound on their entries.
    rows: usize,
    bound: usize,
    /// Dynamic shared memory of cl_hist, cl_emit, cl_check.
    smem: [usize; 3],
}

/// Key tiles per window of candidate kinds in the kernels' shared memory (`CL_KW`).
const KINDS_WINDOW: usize = 32;

/// The check's key chunks: `CL_CHUNK` = one window of kinds each.
fn check_chunks(sk: usize, bc: usize) -> usize {
    sk.div_ceil(KINDS_WINDOW * bc)
}

/// The estimator's source: the mask's device program, the selection helpers, sparse_vs.cu's
/// tiles and kinds, sparse_lowbit.cu's int8 quantizers, then sparse_columns.cu.
fn kernel_source(mask_program: &str) -> String {
    format!(
        "{COMMON}\n{PARAMS}\n{mask_program}\n{}\n{}\n{}\n{SRC}",
        super::cuda::SELECT,
        super::cuda::SRC,
        super::cuda::SRC_LB
    )
}

/// The estimator's defines: storage type, head dim, the forward's tiles, soft-cap, and
/// (sampled rows, product chains, int8 estimate).
fn kernel_defines(
    dtype: DType,
    d: usize,
    (br, bc): (usize, usize),
    softcap: bool,
    (rows, chains, int8): (usize, usize, bool),
) -> Vec<(String, String)> {
    vec![
        ("LA_F16".into(), ((dtype == DType::F16) as u8).to_string()),
        ("LA_D".into(), d.to_string()),
        ("LA_BR".into(), br.to_string()),
        ("LA_BC".into(), bc.to_string()),
        ("LA_SOFTCAP".into(), (softcap as u8).to_string()),
        ("CL_R".into(), rows.to_string()),
        ("CL_CHAINS".into(), chains.to_string()),
        ("CL_INT8".into(), (int8 as u8).to_string()),
        ("LB_D32".into(), (d.div_ceil(32) * 32).to_string()),
        ("LA_GATHERED_BIT".into(), format!("{GATHERED}u")),
        ("LA_PAD".into(), format!("{PAD}u")),
    ]
}

/// Independent accumulator chains per logit fragment in the estimator's Q K^T products
/// (`CL_CHAINS`): 1, or 2 with `LONGATTN_COLUMNS_CHAINS=2` (the even and odd 16-wide steps of
/// the head dimension summed apart, then added: twice the tensor-core operations in flight per
/// warp, 16 more registers). A tuning knob for the device runs (docs/PERF.md).
fn product_chains() -> usize {
    match std::env::var("LONGATTN_COLUMNS_CHAINS").as_deref() {
        Ok("2") => 2,
        _ => 1,
    }
}

/// Most bytes of stored key codes (beyond them the key lists' pass recomputes the probabilities).
const CODES_MAX_BYTES: usize = 8 << 30;

/// Where each forward row's key codes start (`[rows + 1]`, in codes): row `(b Hq + h) q_tiles + qt`
/// holds its candidates' keys `0 .. min(Sk, end of its last candidate tile)` rounded up to 64
/// (cl_hist writes exactly those). None when `LONGATTN_COLUMNS_EMIT=recompute` or the codes would
/// pass [`CODES_MAX_BYTES`]: then the key lists' pass recomputes the probabilities instead.
fn code_offsets(
    cand: &BlockSchedule,
    dims: &Dims,
    (bc, q_tiles): (usize, usize),
) -> Option<Vec<u64>> {
    if std::env::var("LONGATTN_COLUMNS_EMIT").is_ok_and(|v| v == "recompute") {
        return None;
    }
    let mut off = vec![0u64];
    for b in 0..dims.batch {
        for h in 0..dims.hq {
            for qt in 0..q_tiles {
                let end = cand
                    .row(b, h, qt)
                    .last()
                    .map_or(0, |e| (e.k_tile as usize * bc + bc).min(dims.sk));
                let at = off.last().unwrap() + end.div_ceil(64) as u64 * 64;
                off.push(at);
            }
        }
    }
    (2 * *off.last().unwrap() as usize <= CODES_MAX_BYTES).then_some(off)
}

impl ColumnsPlan {
    pub fn new(
        dev: &Arc<CudaDevice>,
        dims: Dims,
        dtype: DType,
        params: &AttnParams,
        spec: &SparseSpec,
        mask: MaskSpec,
    ) -> Result<ColumnsPlan> {
        let args = ColumnsArgs::of(spec)?;
        // (The gathered form, like every device estimator, takes the batch row whole.)
        super::cuda::refuse_documents(&mask)?;
        if params.skip_below.is_some() {
            return Err(param(
                "skip-softmax with the gathered form (use one or the other)".into(),
            ));
        }
        let (br, bc) = crate::cuda::gather_tiles(dev, dims.d, dims.sk, &mask)?;
        if !bc.is_multiple_of(64) {
            // (The estimator's 64-key sub-tiles each lie in one key tile.)
            return Err(param(format!(
                "key tiles of {bc}: the estimator takes key tiles of a multiple of 64 keys"
            )));
        }
        let q_tiles = dims.sq.div_ceil(br);
        let k_tiles = dims.sk.div_ceil(bc);
        // Every key tile kept whole: the forward's work lists weigh rows by the mask's tiles.
        let all = TileKeys::new(
            (br, bc),
            (dims.sq, dims.sk),
            (1, 1),
            vec![(0..k_tiles as u32).collect(); q_tiles],
            vec![Vec::new(); q_tiles],
        )?;
        let fwd = FwdPlan::with_gather(dev, dims, dtype, params, mask, &all)?;
        let fallback = dims.sk < spec.dense_below_or(super::cuda::CUDA_DENSE_BELOW);
        if fwd.uses_mask_bits() {
            return Err(param(
                "masks whose Partial tiles read a bit table (2-D neighborhoods, dealt documents) cannot take a device-written schedule yet".into(),
            ));
        }
        let cand = fwd.mask_schedule().clone();
        if (cand.tile_q, cand.tile_k) != (br, bc) {
            return Err(param(format!(
                "the mask's schedule is at {}x{} tiles, the gathered forward's at {br}x{bc}",
                cand.tile_q, cand.tile_k
            )));
        }
        let bh = dims.batch * dims.hq;
        if bh > 65535 || q_tiles > 65535 {
            return Err(param(format!(
                "grid: batch x heads {bh} and query tiles {q_tiles} must be <= 65535"
            )));
        }
        // The candidates' CSR (the schedule's own batch / head sharing).
        let (mut cand_off, mut cand_ent) = (vec![0u32], Vec::new());
        for b in 0..cand.batch {
            for h in 0..cand.heads {
                for qt in 0..q_tiles {
                    cand_ent.extend(
                        cand.row(b, h, qt)
                            .iter()
                            .map(|e| e.k_tile << 1 | (e.kind == TileKind::Partial) as u32),
                    );
                    cand_off.push(cand_ent.len() as u32);
                }
            }
        }
        // Per forward row: half its candidate keys (lim), the list's room (lim rounded up to a
        // chunk) and where it starts.
        let rows = bh * q_tiles;
        let (mut lim, mut cap, mut kbase) = (Vec::new(), Vec::new(), Vec::new());
        let (mut at, mut bound) = (0usize, 0usize);
        for r in 0..rows {
            let (b, h, qt) = (r / (dims.hq * q_tiles), r / q_tiles % dims.hq, r % q_tiles);
            let row = cand.row(b, h, qt);
            let keys: usize = row
                .iter()
                .map(|e| (e.k_tile as usize * bc + bc).min(dims.sk) - e.k_tile as usize * bc)
                .sum();
            let l = keys / 2;
            let c = l.div_ceil(bc) * bc;
            lim.push(l as u32);
            cap.push(c as u32);
            kbase.push(at as u32);
            at += c;
            bound += row.len() + c / bc;
            if at / bc >= 1 << 30 || at > u32::MAX as usize {
                return Err(param(format!(
                    "the key lists would hold more than 2^30 chunks or 2^32 keys ({rows} query tiles)"
                )));
            }
        }
        let d = dims.d;
        let rr = args.rows;
        let t = 64 / rr;
        // sizeof(ClSmem) and some: q and k tiles (64 rows of D + 8 16-bit words), row table,
        // LSE, the probabilities [64][65], the kinds' window [64][CL_KW], its cursors and the
        // tiles' row counts [3][64], the window start and the key extent, the rows' int8 scale
        // and q . mu [2][64].
        let base = 2 * 2 * 64 * (d + 8)
            + 2 * 64 * 4
            + 64 * 65 * 4
            + 64 * KINDS_WINDOW
            + 3 * 64 * 4
            + 4
            + 4
            + 2 * 64 * 4
            + 64;
        let smem = [base + t * NBIN * 4, base + t * 4, base + 64];
        if smem[0] > dev.smem_optin {
            return Err(param(format!(
                "rows={rr} at head dim {d}: the estimator's shared memory ({} bytes) exceeds the device's {}",
                smem[0], dev.smem_optin
            )));
        }
        if fallback {
            return Ok(ColumnsPlan {
                dev: dev.clone(),
                fwd,
                dims,
                args,
                cand,
                est: None,
                fallback,
                rows,
                bound,
                smem,
            });
        }
        let bbase = code_offsets(&cand, &dims, (bc, q_tiles));
        let chains = product_chains();
        // The check's blocks per (batch row, head): 64-row halves of the last tile x key chunks.
        let check_blocks = br.div_ceil(64) * check_chunks(dims.sk, bc);
        if args.int8 && bbase.is_none() {
            return Err(param(format!(
                "`{spec}`: the int8 estimate needs the stored key codes (not LONGATTN_COLUMNS_EMIT=recompute, at most {} GiB of them)",
                CODES_MAX_BYTES >> 30
            )));
        }
        let src = kernel_source(fwd.mask_program());
        let d32 = d.div_ceil(32) * 32;
        let defines = kernel_defines(
            dtype,
            d,
            (br, bc),
            params.softcap.is_some(),
            (rr, chains, args.int8),
        );
        let variant = format!(
            "sparse_columns_{}_d{d}_{br}x{bc}_r{rr}_c{chains}{}",
            dtype.name(),
            if args.int8 { "_int8" } else { "" }
        );
        let f = |entry: &str, smem: usize| dev.function(&variant, entry, &src, &defines, smem);
        let k = Kernels {
            hist: f("cl_hist", smem[0])?,
            emit: f("cl_emit", smem[1])?,
            emit_stored: f("cl_emit_stored", 0)?,
            check_lse: f("cl_check_lse", smem[2])?,
            check: f("cl_check", smem[2])?,
            lower: f("cl_lower", 0)?,
            scan: f("sp_scan", 0)?,
            quant: match args.int8 {
                false => None,
                true => Some([
                    f("sp_lb_mean_part", 0)?,
                    f("sp_lb_mean", 0)?,
                    f("sp_lb_quant_k", 0)?,
                    f("sp_lb_quant_q", 0)?,
                ]),
            },
        };
        let s = dev.stream();
        let zf = |n: usize| s.alloc_zeros::<f32>(n.max(1)).map_err(drv("alloc"));
        let zu = |n: usize| s.alloc_zeros::<u32>(n.max(1)).map_err(drv("alloc"));
        let sc = Scratch {
            cand_off: dev.upload(&cand_off)?,
            cand_ent: if cand_ent.is_empty() {
                zu(1)?
            } else {
                dev.upload(&cand_ent)?
            },
            lse: zf(rows * rr)?,
            cut: s.alloc_zeros::<i32>(rows.max(1)).map_err(drv("alloc"))?,
            nkeys: zu(rows)?,
            gkeys: zu(at)?,
            kbase: dev.upload(&kbase)?,
            lim: dev.upload(&lim)?,
            cap: dev.upload(&cap)?,
            chk: zf(bh * check_blocks * 2)?,
            chkp: zf(bh * check_blocks * 128)?,
            cnt: zu(rows)?,
            off: zu(rows + 1)?,
            ent: zu(bound)?,
            bins: match bbase {
                Some(bb) => Some((
                    s.alloc_zeros::<u16>(bb[rows] as usize)
                        .map_err(drv("alloc"))?,
                    dev.upload(&bb)?,
                )),
                None => None,
            },
            lb: match args.int8 {
                false => None,
                true => Some(super::cuda::LbScratch::alloc(s, &dims, d32, 1)?),
            },
        };
        Ok(ColumnsPlan {
            dev: dev.clone(),
            fwd,
            dims,
            args,
            cand,
            est: Some((k, sc)),
            fallback,
            rows,
            bound,
            smem,
        })
    }

    /// The kernel's tiles (query, key).
    pub fn tiles(&self) -> (usize, usize) {
        (self.cand.tile_q, self.cand.tile_k)
    }

    /// Bytes of the estimator's device buffers (the key lists most of them).
    pub fn scratch_bytes(&self) -> usize {
        let Some((_, sc)) = &self.est else {
            return 0;
        };
        4 * (sc.cand_off.len()
            + sc.cand_ent.len()
            + sc.lse.len()
            + sc.cut.len()
            + sc.nkeys.len()
            + sc.gkeys.len()
            + sc.kbase.len()
            + sc.lim.len()
            + sc.cap.len()
            + sc.chk.len()
            + sc.chkp.len()
            + sc.cnt.len()
            + sc.off.len()
            + sc.ent.len())
            + sc.bins
                .as_ref()
                .map_or(0, |(b, o)| 2 * b.len() + 8 * o.len())
    }

    /// Estimate and write the forward's rows and key lists on `s` (no host synchronisation).
    pub fn launch_select_on(
        &mut self,
        s: &Arc<CudaStream>,
        q: &DevTensor,
        k: &DevTensor,
    ) -> Result<()> {
        self.stages(s, q, k, &mut |_, f| f())
    }

    /// [`Self::launch_select_on`] with each stage timed by CUDA events: (stage, ms).
    pub fn profile_select_on(
        &mut self,
        s: &Arc<CudaStream>,
        q: &DevTensor,
        k: &DevTensor,
    ) -> Result<Vec<(&'static str, f64)>> {
        let mut times = Vec::new();
        self.stages(s, q, k, &mut |name, f| {
            let t = super::cuda::time_on(s, f)?;
            times.push((name, t));
            Ok(())
        })?;
        Ok(times)
    }

    fn stages(
        &mut self,
        s: &Arc<CudaStream>,
        q: &DevTensor,
        k: &DevTensor,
        around: &mut super::cuda::Around,
    ) -> Result<()> {
        let Some((kern, sc)) = &mut self.est else {
            return Ok(());
        };
        let ptr_u = |x: &CudaSlice<u32>| x.device_ptr(s).0;
        let ptr_f = |x: &CudaSlice<f32>| x.device_ptr(s).0;
        // The estimator reads the mask's candidates (the forward's rows are written below).
        let p: LaFwdParams = self.fwd.params_for(s, q, k).with_schedule(
            (ptr_u(&sc.cand_off), ptr_u(&sc.cand_ent)),
            (self.cand.batch, self.cand.heads),
        );
        let cp = ClParams {
            lse: ptr_f(&sc.lse),
            cut: sc.cut.device_ptr(s).0,
            nkeys: ptr_u(&sc.nkeys),
            gkeys: ptr_u(&sc.gkeys),
            kbase: ptr_u(&sc.kbase),
            lim: ptr_u(&sc.lim),
            cap: ptr_u(&sc.cap),
            chk: ptr_f(&sc.chk),
            chkp: ptr_f(&sc.chkp),
            cnt: ptr_u(&sc.cnt),
            off: ptr_u(&sc.off),
            ent: ptr_u(&sc.ent),
            bins: sc.bins.as_ref().map_or(0, |(b, _)| b.device_ptr(s).0),
            bbase: sc.bins.as_ref().map_or(0, |(_, o)| o.device_ptr(s).0),
            gamma: self.args.gamma as f32,
            check: self.args.check as f32,
            sink: self.args.sink as i32,
            local: self.args.local as i32,
            vec: (q.tma_aligned() && k.tma_aligned()) as i32,
            nchunk: check_chunks(self.dims.sk, self.cand.tile_k) as i32,
        };
        let d = &self.dims;
        let bh = (d.batch * d.hq) as u32;
        let q_tiles = d.sq.div_ceil(self.cand.tile_q) as u32;
        let groups = q_tiles.div_ceil((64 / self.args.rows) as u32);
        let cfg = |grid: (u32, u32, u32), threads: u32, smem: usize| LaunchConfig {
            grid_dim: grid,
            block_dim: (threads, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let smem = self.smem;
        // SAFETY (every launch below): the parameter structs match the kernels'; every pointer
        // is a live allocation of the size the kernels index (scratch sized in `new` from the
        // same dims; q / k are device tensors of these dims, the forward plan's contract).
        let launch = |f: &CudaFunction, c: LaunchConfig, extra: Option<i32>| -> Result<()> {
            let mut b = s.launch_builder(f);
            b.arg(&p);
            b.arg(&cp);
            if let Some(x) = &extra {
                b.arg(x);
            }
            unsafe { b.launch(c) }
                .map(|_| ())
                .map_err(drv("launch columns estimator"))
        };
        around("zero check", &mut || {
            s.memset_zeros(&mut sc.chk).map_err(drv("memset"))
        })?;
        let lp = sc.lb.as_ref().map(|l| l.params(s, d)).unwrap_or_default();
        if let Some(fq) = &kern.quant {
            let f = [&fq[0], &fq[1], &fq[2], &fq[3]];
            super::cuda::LbScratch::quantize(s, f, &p, &lp, d, around)?;
        }
        around("LSE + mass bins", &mut || {
            let mut b = s.launch_builder(&kern.hist);
            b.arg(&p);
            b.arg(&cp);
            b.arg(&lp);
            // SAFETY: as above; `lp` points at the int8 buffers sized for these dims (cl_hist
            // reads them under CL_INT8 only).
            unsafe { b.launch(cfg((groups, bh, 1), 256, smem[0])) }
                .map(|_| ())
                .map_err(drv("launch columns estimator"))
        })?;
        if sc.bins.is_some() {
            around("key lists (stored)", &mut || {
                launch(
                    &kern.emit_stored,
                    cfg((q_tiles.div_ceil(8), bh, 1), 256, 0),
                    None,
                )
            })?;
        } else {
            around("key lists", &mut || {
                launch(&kern.emit, cfg((groups, bh, 1), 256, smem[1]), None)
            })?;
        }
        if self.args.check > 0.0 {
            let halves = self.cand.tile_q.div_ceil(64) as u32;
            let grid = (halves, cp.nchunk as u32, bh);
            around("check: LSE", &mut || {
                launch(&kern.check_lse, cfg(grid, 256, smem[2]), None)
            })?;
            around("check", &mut || {
                launch(&kern.check, cfg(grid, 256, smem[2]), None)
            })?;
        }
        around("rows: count", &mut || {
            launch(&kern.lower, cfg((q_tiles, bh, 1), 128, 0), Some(0))
        })?;
        let rows = self.rows as i32;
        let sp = super::cuda::scan_params(cp.cnt, cp.off);
        around("scan", &mut || {
            let mut b = s.launch_builder(&kern.scan);
            b.arg(&sp);
            b.arg(&rows);
            // SAFETY: as above (sp_scan reads cnt [rows] and writes off [rows + 1]).
            unsafe { b.launch(cfg((1, 1, 1), 1024, 0)) }
                .map(|_| ())
                .map_err(drv("launch columns estimator"))
        })?;
        around("rows: write", &mut || {
            launch(&kern.lower, cfg((q_tiles, bh, 1), 128, 0), Some(1))
        })?;
        Ok(())
    }

    /// The gathered forward through the rows and lists the last selection wrote.
    pub fn launch_attention_on(
        &self,
        s: &Arc<CudaStream>,
        q: &DevTensor,
        k: &DevTensor,
        v: &DevTensor,
        o: &mut DevTensor,
        lse: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let Some((_, sc)) = &self.est else {
            // The dense fallback: the plan's own rows, every candidate tile.
            return self
                .fwd
                .launch_sched_on(s, q, k, v, o, lse, None, None, None);
        };
        let sched = (sc.off.device_ptr(s).0, sc.ent.device_ptr(s).0);
        let gkeys = sc.gkeys.device_ptr(s).0;
        self.fwd
            .launch_sched_on(s, q, k, v, o, lse, Some(sched), None, Some(gkeys))
    }

    /// Estimate, write the rows and run the gathered forward, all queued on `s`.
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

    /// What the last selection computes, as whole tiles and gathered keys (synchronises).
    pub fn selection(&self) -> Result<TileKeys> {
        let d = &self.dims;
        let Some((_, sc)) = &self.est else {
            let rows = (0..self.rows).map(|r| {
                let (b, h, qt) = (
                    r / (d.hq * self.cand.q_tiles),
                    r / self.cand.q_tiles % d.hq,
                    r % self.cand.q_tiles,
                );
                self.cand.row(b, h, qt).iter().map(|e| e.k_tile).collect()
            });
            return TileKeys::new(
                self.tiles(),
                (d.sq, d.sk),
                (d.batch, d.hq),
                rows.collect(),
                vec![Vec::new(); self.rows],
            );
        };
        let off = self.dev.download(&sc.off)?;
        let ent = self.dev.download(&sc.ent)?;
        let gk = self.dev.download(&sc.gkeys)?;
        let n = off[self.rows] as usize;
        if n > self.bound {
            return Err(param(format!(
                "the device rows hold {n} entries, more than their bound {}",
                self.bound
            )));
        }
        let bc = self.cand.tile_k;
        let (mut tiles, mut keys) = (Vec::new(), Vec::new());
        for r in 0..self.rows {
            let (mut t, mut ks) = (Vec::new(), Vec::new());
            for &e in &ent[off[r] as usize..off[r + 1] as usize] {
                if e & GATHERED != 0 {
                    let c = ((e & !GATHERED) >> 1) as usize;
                    let chunk = gk.get(c * bc..(c + 1) * bc).ok_or_else(|| {
                        param(format!("chunk {c} past the key lists ({} keys)", gk.len()))
                    })?;
                    ks.extend(chunk.iter().copied().filter(|&j| j != PAD));
                } else {
                    t.push(e >> 1);
                }
            }
            tiles.push(t);
            keys.push(ks);
        }
        TileKeys::new(self.tiles(), (d.sq, d.sk), (d.batch, d.hq), tiles, keys)
    }

    /// The mask's schedule at the kernel's tiles (the candidates).
    pub fn candidates(&self) -> &BlockSchedule {
        &self.cand
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mask::{MaskExpr, MaskShape};
    use crate::sparse::synthetic::structured_qk;

    fn spec(s: &str) -> ColumnsArgs {
        ColumnsArgs::of(&SparseSpec::parse(s).unwrap()).unwrap()
    }

    /// Independently of the estimator: p_ij in f64 for (h, i) under causal (scale 1/sqrt(D)).
    fn probs(q: &TensorView, k: &TensorView, h: usize, i: usize, off: i64) -> Vec<f64> {
        let (d, sk, g) = (q.shape[3], k.shape[1], h / (q.shape[2] / k.shape[2]));
        let l: Vec<f64> = (0..sk)
            .map(|j| {
                if j as i64 > i as i64 + off {
                    return f64::NEG_INFINITY;
                }
                (0..d)
                    .map(|c| q.get(0, i, h, c) as f64 * k.get(0, j, g, c) as f64)
                    .sum::<f64>()
                    / (d as f64).sqrt()
            })
            .collect();
        let m = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = l.iter().map(|x| (x - m).exp()).sum();
        l.iter().map(|x| (x - m).exp() / z).collect()
    }

    /// Structured inputs at awkward sizes (Sq != Sk too): every query tile that gathers keeps
    /// its band tiles and sinks, and its whole tiles and keys hold at least gamma of its
    /// sampled rows' mean softmax; a tile keeping more than half its candidate keys runs them
    /// all whole.
    #[test]
    fn reference_keeps_gamma_of_the_sampled_mass() {
        for (sq, sk, rows, gamma) in [(1023, 1023, 4, 0.9), (65, 700, 8, 0.7), (300, 300, 1, 0.8)] {
            let (q, k) = structured_qk(DType::F32, 1, sq, sk, 2, 1, 64, 11);
            let (qv, kv) = (q.view("q").unwrap(), k.view("k").unwrap());
            let bm = MaskExpr::parse("causal")
                .unwrap()
                .bind(MaskShape { batch: 1, sq, sk }, None)
                .unwrap();
            let cand = bm.schedule(128, 128).unwrap();
            let a = spec(&format!(
                "columns(gamma={gamma},rows={rows},sink=4,local=64)"
            ));
            let sel = reference(&qv, &kv, &AttnParams::default(), &a, &cand, Some(&bm)).unwrap();
            let off = sk as i64 - sq as i64;
            let (mut gathered, mut whole) = (0, 0);
            for h in 0..2 {
                for qt in 0..sq.div_ceil(128) {
                    let (r0, r1) = (qt * 128, ((qt + 1) * 128).min(sq));
                    let all: Vec<u32> = cand.row(0, h, qt).iter().map(|e| e.k_tile).collect();
                    if sel.keys_of(0, h, qt).is_empty() && sel.tiles_of(0, h, qt) == all.as_slice()
                    {
                        whole += 1;
                        continue;
                    }
                    gathered += 1;
                    let band = band_tiles(qt, (128, 128), (sq, sk), 64).unwrap();
                    for kt in band {
                        assert!(
                            sel.tiles_of(0, h, qt).contains(&(kt as u32)),
                            "band tile {kt} of {qt}"
                        );
                    }
                    for j in 0..4 {
                        assert!(sel.keeps(0, h, r1 - 1, j), "sink {j} of {qt}");
                    }
                    let sampled = estimate::sampled_rows(&(r0..r1), rows);
                    let mut mean = vec![0.0; sk];
                    for &i in &sampled {
                        for (m, p) in mean.iter_mut().zip(probs(&qv, &kv, h, i, off)) {
                            *m += p / sampled.len() as f64;
                        }
                    }
                    let total: f64 = mean.iter().sum();
                    let kept: f64 = (0..sk)
                        .filter(|&j| sel.keeps(0, h, r1 - 1, j))
                        .map(|j| mean[j])
                        .sum();
                    assert!(
                        kept >= gamma * total * (1.0 - 1e-9),
                        "tile {qt} head {h}: {kept} of {total}"
                    );
                    let n = sel.keys_of(0, h, qt).len();
                    let cand_keys: usize = all
                        .iter()
                        .map(|&t| (t as usize * 128 + 128).min(sk) - t as usize * 128)
                        .sum();
                    assert!(n <= cand_keys / 2, "{n} keys of {cand_keys}");
                }
            }
            assert!(
                gathered > 0,
                "Sq {sq}: no query tile gathered ({whole} whole)"
            );
        }
    }

    /// Gaussian inputs at gamma = 1 keep every key: each tile runs its candidates whole; a check
    /// no selection can pass (1.0 + margin: never met) makes every tile whole too.
    #[test]
    fn whole_tiles_when_the_keys_would_cost_more_or_the_check_fails() {
        let q = crate::testing::random_tensor(DType::F32, &[1, 400, 2, 64], 1.0, 3);
        let k = crate::testing::random_tensor(DType::F32, &[1, 400, 1, 64], 1.0, 4);
        let (qv, kv) = (q.view("q").unwrap(), k.view("k").unwrap());
        let bm = MaskExpr::parse("causal")
            .unwrap()
            .bind(MaskShape::square(400), None)
            .unwrap();
        let cand = bm.schedule(128, 128).unwrap();
        for s in [
            "columns(gamma=1,rows=4,sink=4,local=0)",
            "columns(gamma=0.3,rows=4,sink=4,local=0,check=1)",
        ] {
            let sel =
                reference(&qv, &kv, &AttnParams::default(), &spec(s), &cand, Some(&bm)).unwrap();
            for h in 0..2 {
                for qt in 0..4 {
                    let all: Vec<u32> = cand.row(0, h, qt).iter().map(|e| e.k_tile).collect();
                    assert_eq!(sel.tiles_of(0, h, qt), all.as_slice(), "{s}: tile {qt}");
                    assert!(sel.keys_of(0, h, qt).is_empty(), "{s}: tile {qt}");
                }
            }
        }
    }

    #[test]
    fn other_methods_and_options_are_refused_by_name() {
        for (s, want) in [
            ("topmass(gamma=0.9)", "is not `columns`"),
            ("columns(check=0.9,check_gamma=0.5)", "check_gamma"),
            ("columns(rows=65)", "at most 64"),
            ("columns(rows=4,dense_last=64)", "dense_last"),
        ] {
            let e = ColumnsArgs::of(&SparseSpec::parse(s).unwrap())
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{s}: {e}");
        }
    }

    /// `ClParams` field for field as `sparse_columns.cu` declares it (order and offsets).
    #[test]
    fn parameter_struct_matches_the_kernels() {
        let mut at = SRC.find("struct ClParams {").unwrap();
        for f in [
            "float* lse;",
            "int* cut;",
            "u32* nkeys;",
            "u32* gkeys;",
            "const u32* kbase;",
            "const u32* lim;",
            "const u32* cap;",
            "float* chk;",
            "u32* cnt;",
            "u32* off;",
            "u32* ent;",
            "u16* bins;",
            "const u64* bbase;",
            "float* chkp;",
            "float gamma, check;",
            "int sink, local;",
            "int vec;",
            "int nchunk;",
            "};",
        ] {
            at += SRC[at..]
                .find(f)
                .unwrap_or_else(|| panic!("`{f}` after offset {at}"));
        }
        assert_eq!(std::mem::offset_of!(ClParams, gamma), 14 * 8);
        assert_eq!(std::mem::offset_of!(ClParams, vec), 14 * 8 + 16);
        assert_eq!(std::mem::offset_of!(ClParams, nchunk), 14 * 8 + 20);
        assert_eq!(std::mem::size_of::<ClParams>(), 136);
        // The kinds window the Rust side sizes shared memory and the check's chunks by.
        assert!(SRC.contains(&format!("#define CL_KW {KINDS_WINDOW} ")));
    }

    /// The bins: 16 per octave, masses at or below 2^-24 in bin 0, 1 (and 1 - 2^-17) in the last.
    #[test]
    fn bins_are_sixteen_per_octave() {
        assert_eq!(bin(1.0), NBIN - 1);
        assert_eq!(bin(0.5), NBIN - 16);
        assert_eq!(bin(2f64.powi(-24)), 0);
        assert_eq!(bin(1e-30), 0);
        assert_eq!(bin(2f64.powf(-23.0 + 1.0 / 16.0)), 17);
    }
}

#[cfg(test)]
mod compile_tests {
    use super::*;

    /// The estimator's kernels as the plan assembles them (the mask program first, the lowbit
    /// quantizers among them) compile with NVRTC: bf16 / f16, the int8 estimate on and off, both
    /// mass paths (rows 4 in registers, rows 3 through shared memory), two product chains, D 64
    /// / 96 / 128 / 256, soft-cap (skipped without `libnvrtc`).
    #[test]
    fn columns_kernels_compile_with_nvrtc() {
        let Some((program, _)) = crate::cuda::compile::test_programs() else {
            return;
        };
        let src = kernel_source(&program);
        for (dtype, d, tiles, softcap, knobs) in [
            (DType::BF16, 128, (128, 128), false, (4, 1, false)),
            (DType::BF16, 128, (128, 128), false, (4, 1, true)),
            (DType::F16, 64, (128, 128), true, (3, 2, true)),
            (DType::BF16, 96, (128, 128), false, (8, 1, true)),
            (DType::BF16, 256, (64, 64), true, (4, 2, true)),
        ] {
            let defines = kernel_defines(dtype, d, tiles, softcap, knobs);
            let name = format!("test_columns_{}_d{d}_{knobs:?}", dtype.name());
            crate::cuda::compile::assert_compiles(&name, &src, "sm_90a", &defines);
        }
    }
}

#[cfg(test)]
mod cpu_route {
    use super::*;
    use crate::mask::{MaskExpr, MaskShape};
    use crate::reference::attention_f64;
    use crate::sparse::synthetic::structured_qk;
    use crate::testing::{compare, random_tensor};

    /// `columns(...,gathered=1)` through the CPU selector and forward computes exactly the pairs
    /// of the plain reference's selection (mask & (tiles | keys)): the f64 oracle over those
    /// pairs, at awkward sizes, Sq != Sk, GQA, with and without a check.
    #[test]
    fn the_cpu_route_computes_the_reference_pairs() {
        for (sq, sk, spec) in [
            (700, 700, "columns(gamma=0.9,rows=4,block=128,sink=4,local=64,gathered=1,dense_below=0)"),
            (113, 650, "columns(gamma=0.8,rows=8,block=128,sink=2,local=32,check=0.5,gathered=1,dense_below=0)"),
            (1, 300, "columns(gamma=0.9,rows=1,block=128,sink=4,local=0,gathered=1,dense_below=0)"),
            (650, 650, "columns(gamma=0.9,rows=4,block=128,sink=4,local=64,gathered=1,int8=1,dense_below=0)"),
        ] {
            let (q, k) = structured_qk(DType::F32, 1, sq, sk, 4, 2, 32, 7);
            let v = random_tensor(DType::F32, &[1, sk, 2, 32], 1.0, 9);
            let (qv, kv, vv) = (q.view("q").unwrap(), k.view("k").unwrap(), v.view("v").unwrap());
            let bm = MaskExpr::parse("causal")
                .unwrap()
                .bind(MaskShape { batch: 1, sq, sk }, None)
                .unwrap();
            let sp = SparseSpec::parse(spec).unwrap();
            let params = AttnParams::default();
            let (got, _) = super::super::forward(&qv, &kv, &vv, &params, &sp, MaskSpec::Expr(&bm)).unwrap();
            let cand = bm.schedule(128, 128).unwrap();
            let args = ColumnsArgs::of(&sp).unwrap();
            let sel = reference(&qv, &kv, &params, &args, &cand, Some(&bm)).unwrap();
            let keeps = |b: usize, h: usize, i: usize, j: usize| bm.allowed(b, i, j) && sel.keeps(b, h, i, j);
            let want = attention_f64(&qv, &kv, &vv, &params, &keeps).unwrap();
            let (e, l) = compare(&got.out, &got.lse, &want);
            assert!(e < 1e-5 && l < 1e-5, "{spec} Sq {sq} Sk {sk}: out {e:e}, lse {l:e}");
        }
    }
}
