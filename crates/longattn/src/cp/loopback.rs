//! The one-GPU loopback: P ranks as streams of one GPU, exchanging by device-to-device copies,
//! running the ring pass-KV forward through the CUDA kernel. What it is for: the kernels, the
//! double buffering and the overlap of copies with compute run (and are timed per step) on a
//! machine with one GPU.
//!
//! The ring is written once as a *program* ([`ring_program`]): a list of [`Op`]s on named
//! streams (rank r's compute stream and its copy stream) with events between them, which two
//! executors run:
//! - [`run_host`], the plain reference: the ops in program order on the CPU, every block through
//!   `attention::forward` (any dtype, f32 in the tests), the merge in f32 ([`merge_host`]); it
//!   also checks that every block reads the keys it names (the buffers' contents are tracked);
//! - [`run_device`]: the same ops as CUDA calls: a block is our forward kernel
//!   ([`FwdPlan::launch_on`]) on the rank's query chunk and the key chunk in the buffer it holds,
//!   then `la_cp_merge` (`cuda/kernels/cp_merge.cu`) into the rank's f32 running result; a copy
//!   is a `cuMemcpyDtoDAsync` on the rank's copy stream; waits and records are CUDA events.
//!   Every buffer, plan and event is made before the first step (no per-step allocation).
//!
//! The program (zigzag placement: 2P chunks, rank r holds chunks r and 2P - 1 - r): at step s
//! rank r holds in its buffer `s % 2` the keys and values of rank `(r - s) mod P` and computes
//! every (query chunk, key chunk) block the mask needs (causal: key chunk < query chunk Full,
//! equal chunks the square causal block, later chunks skipped; full: every block Full), while
//! its copy stream fetches rank `r - 1`'s buffer `s % 2` into its own buffer `(s + 1) % 2` (the
//! double buffer). The copy into rank r's buffer `(s + 1) % 2` at step s waits for:
//! - rank r's compute of step s - 1 (which read that buffer);
//! - rank r + 1's copy of step s - 1 (which read that buffer: r + 1 fetches from r);
//! - rank r - 1's copy of step s - 1 (which filled the buffer `s % 2` being read);
//!
//! and rank r's compute of step s waits for its copy of step s - 1. `program_is_race_free`
//! (tests) checks with vector clocks that every pair of conflicting accesses is ordered.
//!
//! The merge of a block's partial (o_i, lse_i) into the running (o, lse), in f32:
//! `lse = M + ln(sum_i exp(lse_i - M))`, `o = sum_i exp(lse_i - lse) o_i` (M the largest
//! lse_i), done one block at a time.
//!
//! Timings (events around every compute step and copy): per (step, rank) the compute time, the
//! copy time and the exposed wait: the gap on the compute stream between the end of step s - 1
//! and the start of step s (the wait for the copy, plus launch gaps).
use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{sys as cu, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};

use super::plan::Plan;
use crate::attention::{AttnParams, Dims, MaskSpec};
use crate::cuda::forward::gather_u16;
use crate::cuda::{drv, CudaDevice, DevTensor, FwdPlan};
use crate::error::{Error, Result};
use crate::mask::{BoundMask, MaskExpr, MaskShape};
use crate::tensor::{DType, TensorView};

const OP: &str = "cp loopback";

fn bad(msg: String) -> Error {
    Error::Param { op: OP, msg }
}

/// The mask of one (query chunk, key chunk) block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlockKind {
    /// Every pair.
    Full,
    /// The square causal block (query chunk = key chunk).
    Causal,
}

/// Whether query chunk `a` needs key chunk `b` (chunks in sequence order), and with which mask.
pub fn block_kind(causal: bool, a: usize, b: usize) -> Option<BlockKind> {
    match (causal, b.cmp(&a)) {
        (false, _) | (true, std::cmp::Ordering::Less) => Some(BlockKind::Full),
        (true, std::cmp::Ordering::Equal) => Some(BlockKind::Causal),
        (true, std::cmp::Ordering::Greater) => None,
    }
}

/// A stream of the loopback: rank r's compute stream or its copy stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stream {
    Compute(usize),
    Copy(usize),
}

/// What an event marks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mark {
    ComputeStart,
    ComputeEnd,
    CopyStart,
    CopyEnd,
}

/// An event of the program: one per (mark, rank, step), recorded once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Event {
    pub mark: Mark,
    pub rank: usize,
    pub step: usize,
}

fn ev(mark: Mark, rank: usize, step: usize) -> Event {
    Event { mark, rank, step }
}

/// One operation of the ring program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// `on` waits until `event` has happened.
    Wait { on: Stream, event: Event },
    /// `event` happens once the work queued on `on` so far is done.
    Record { on: Stream, event: Event },
    /// On rank `rank`'s compute stream: its query chunk `q_chunk` against key chunk `k_chunk`
    /// (a chunk of rank `origin`, held in the rank's buffer `buf`), merged into its result.
    Block {
        rank: usize,
        q_chunk: usize,
        k_chunk: usize,
        origin: usize,
        buf: usize,
        kind: BlockKind,
    },
    /// On rank `rank`'s copy stream: rank `from`'s buffer `src` into its own buffer `dst`; the
    /// source holds `rows` rows (those of the rank whose keys it holds; the rest is padding).
    Copy {
        rank: usize,
        from: usize,
        src: usize,
        dst: usize,
        rows: usize,
    },
}

impl Op {
    pub fn stream(&self) -> Stream {
        match *self {
            Op::Wait { on, .. } | Op::Record { on, .. } => on,
            Op::Block { rank, .. } => Stream::Compute(rank),
            Op::Copy { rank, .. } => Stream::Copy(rank),
        }
    }
}

/// The ring pass-KV forward over `plan` (module header), as a program.
pub fn ring_program(plan: &Plan, causal: bool) -> Vec<Op> {
    let p = plan.world;
    let mut ops = Vec::new();
    for s in 0..p {
        let (cur, nxt) = (s % 2, (s + 1) % 2);
        // The next step's keys first: the copies start as early as their waits allow.
        if s + 1 < p {
            for r in 0..p {
                let (prev, next) = ((r + p - 1) % p, (r + 1) % p);
                let on = Stream::Copy(r);
                if s > 0 {
                    for event in [
                        ev(Mark::ComputeEnd, r, s - 1),
                        ev(Mark::CopyEnd, next, s - 1),
                        ev(Mark::CopyEnd, prev, s - 1),
                    ] {
                        ops.push(Op::Wait { on, event });
                    }
                }
                ops.push(Op::Record {
                    on,
                    event: ev(Mark::CopyStart, r, s),
                });
                ops.push(Op::Copy {
                    rank: r,
                    from: prev,
                    src: cur,
                    dst: nxt,
                    // rank r - 1 holds rank r - 1 - s's keys at step s
                    rows: plan.rows_of((prev + p - s) % p),
                });
                ops.push(Op::Record {
                    on,
                    event: ev(Mark::CopyEnd, r, s),
                });
            }
        }
        for r in 0..p {
            let origin = (r + p - s) % p;
            let on = Stream::Compute(r);
            if s > 0 {
                ops.push(Op::Wait {
                    on,
                    event: ev(Mark::CopyEnd, r, s - 1),
                });
            }
            ops.push(Op::Record {
                on,
                event: ev(Mark::ComputeStart, r, s),
            });
            for (a, _) in plan.chunks_of(r) {
                for (b, _) in plan.chunks_of(origin) {
                    if let Some(kind) = block_kind(causal, a, b) {
                        ops.push(Op::Block {
                            rank: r,
                            q_chunk: a,
                            k_chunk: b,
                            origin,
                            buf: cur,
                            kind,
                        });
                    }
                }
            }
            ops.push(Op::Record {
                on,
                event: ev(Mark::ComputeEnd, r, s),
            });
        }
    }
    ops
}

/// The shapes of a loopback run: batch, sequence, heads (query, key / value), head dim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub batch: usize,
    pub n: usize,
    pub hq: usize,
    pub hk: usize,
    pub d: usize,
}

impl Shape {
    fn of(q: &TensorView, k: &TensorView, v: &TensorView) -> Result<Shape> {
        let [b, n, hq, d] = q.shape;
        let [kb, kn, hk, kd] = k.shape;
        if v.shape != k.shape || kb != b || kn != n || kd != d || hk == 0 || !hq.is_multiple_of(hk)
        {
            return Err(bad(format!(
                "q {:?}, k {:?}, v {:?}: the loopback ring splits one sequence of queries and keys alike (q [B, n, Hq, D], k = v [B, n, Hk, D], Hk dividing Hq)",
                q.shape, k.shape, v.shape
            )));
        }
        if q.dtype() != k.dtype() || k.dtype() != v.dtype() {
            return Err(bad("q, k and v must share one dtype".into()));
        }
        Ok(Shape {
            batch: b,
            n,
            hq,
            hk,
            d,
        })
    }
}

/// The rows `ranges` (start, length) of a `[B, n, w]` buffer, concatenated per batch:
/// `[B, sum of lengths, w]`.
fn gather_rows<T: Copy>(
    x: &[T],
    b: usize,
    n: usize,
    w: usize,
    ranges: &[(usize, usize)],
) -> Vec<T> {
    let mut out = Vec::with_capacity(b * ranges.iter().map(|r| r.1).sum::<usize>() * w);
    for bi in 0..b {
        for &(s, len) in ranges {
            out.extend_from_slice(&x[(bi * n + s) * w..(bi * n + s + len) * w]);
        }
    }
    out
}

/// Rank r's chunks as (start, length) in the sequence, in its local order.
fn rank_ranges(plan: &Plan, r: usize) -> Vec<(usize, usize)> {
    plan.chunks_of(r)
        .iter()
        .map(|&(g, _)| (plan.range(g).0, plan.len(g)))
        .collect()
}

/// The first local row of chunk `g` at its owner.
fn local_row(plan: &Plan, g: usize) -> usize {
    let owner = plan.owner[g];
    plan.chunks_of(owner)
        .iter()
        .find(|c| c.0 == g)
        .map(|c| c.1)
        .expect("a chunk is among its owner's")
}

/// The block's mask bound to its shape (`len` x `len` for the causal block).
fn block_mask(kind: BlockKind, batch: usize, sq: usize, sk: usize) -> Result<Option<BoundMask>> {
    match kind {
        BlockKind::Full => Ok(None),
        BlockKind::Causal => MaskExpr::parse("causal")?
            .bind(MaskShape { batch, sq, sk }, None)
            .map(Some),
    }
}

/// `(o, lse) <- merge((o, lse), (o_part, lse_part))` for the rows `row0 .. row0 + len` of a
/// rank's running result (module header; the formula of `cuda/kernels/cp_merge.cu`):
/// `M = max(lse, lse_part)`, `lse' = M + ln(exp(lse - M) + exp(lse_part - M))`,
/// `o' = exp(lse - lse') o + exp(lse_part - lse') o_part`. Layouts: o `[B, rows, H, D]`, lse
/// `[B, H, rows]`, o_part `[B, len, H, D]`, lse_part `[B, H, len]`.
#[allow(clippy::too_many_arguments)]
pub fn merge_host(
    o: &mut [f32],
    lse: &mut [f32],
    o_part: &[f32],
    lse_part: &[f32],
    (b, h, d): (usize, usize, usize),
    rows: usize,
    row0: usize,
    len: usize,
) {
    for bi in 0..b {
        for hi in 0..h {
            for i in 0..len {
                let lp = lse_part[(bi * h + hi) * len + i];
                if lp == f32::NEG_INFINITY {
                    continue;
                }
                let la = &mut lse[(bi * h + hi) * rows + row0 + i];
                let m = la.max(lp);
                let (e0, e1) = ((*la - m).exp(), (lp - m).exp());
                let s = e0 + e1;
                let (w0, w1) = (e0 / s, e1 / s);
                let oa = &mut o[((bi * rows + row0 + i) * h + hi) * d..][..d];
                let op = &o_part[((bi * len + i) * h + hi) * d..][..d];
                for (x, &y) in oa.iter_mut().zip(op) {
                    *x = w0 * *x + w1 * y;
                }
                *la = m + s.ln();
            }
        }
    }
}

/// A loopback run's result: the output `[B, n, Hq, D]` and LSE `[B, Hq, n]` in sequence order,
/// f32 (merged in f32; [`run_device`] times too).
#[derive(Clone, Debug)]
pub struct LoopbackOut {
    pub out: Vec<f32>,
    pub lse: Vec<f32>,
    /// `steps[s][r]`: rank r's step s (device runs only; empty on the host).
    pub steps: Vec<Vec<StepTime>>,
    /// From the first event to the last (ms; device runs only).
    pub total_ms: f64,
    /// Host wall time to queue the program's operations (ms; device runs only): when it nears
    /// `total_ms`, the launches, not the GPU, set the pace.
    pub enqueue_ms: f64,
    /// Kernel launches: blocks (forward + merge each) of the program.
    pub blocks: usize,
}

/// One rank's step (ms).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepTime {
    /// From the step's start to its end on the compute stream.
    pub compute_ms: f64,
    /// The copy of the next step's keys and values (0 on the last step).
    pub copy_ms: f64,
    /// The gap on the compute stream before this step (0 on the first).
    pub wait_ms: f64,
}

/// Puts each rank's rows (`out` `[B, rows, Hq, D]`, `lse` `[B, Hq, rows]`) back in sequence
/// order.
fn assemble(plan: &Plan, s: Shape, per_rank: &[(Vec<f32>, Vec<f32>)]) -> (Vec<f32>, Vec<f32>) {
    let (b, n, hq, d) = (s.batch, s.n, s.hq, s.d);
    let mut out = vec![0f32; b * n * hq * d];
    let mut lse = vec![f32::NEG_INFINITY; b * hq * n];
    for (r, (o, l)) in per_rank.iter().enumerate() {
        let rows = plan.rows_of(r);
        for (g, at) in plan.chunks_of(r) {
            let (g0, len) = (plan.range(g).0, plan.len(g));
            for bi in 0..b {
                let w = hq * d;
                out[(bi * n + g0) * w..(bi * n + g0 + len) * w]
                    .copy_from_slice(&o[(bi * rows + at) * w..(bi * rows + at + len) * w]);
                for hi in 0..hq {
                    lse[(bi * hq + hi) * n + g0..][..len]
                        .copy_from_slice(&l[(bi * hq + hi) * rows + at..][..len]);
                }
            }
        }
    }
    (out, lse)
}

/// A key / value buffer of the host run: keys, values, and the rank whose rows they are.
type HostKv = (Vec<f32>, Vec<f32>, Option<usize>);

/// The program run on the CPU in program order (module header): q `[B, n, Hq, D]`, k / v
/// `[B, n, Hk, D]` (any dtype; blocks through `attention::forward`, the merge in f32). Errors
/// when a block would read keys other than those it names (a wrong program).
pub fn run_host(
    plan: &Plan,
    ops: &[Op],
    q: &TensorView,
    k: &TensorView,
    v: &TensorView,
    params: &AttnParams,
) -> Result<LoopbackOut> {
    let s = Shape::of(q, k, v)?;
    let (b, n, hq, hk, d) = (s.batch, s.n, s.hq, s.hk, s.d);
    if plan.n != n {
        return Err(bad(format!(
            "the plan places {} tokens, the inputs hold {n}",
            plan.n
        )));
    }
    let p = plan.world;
    let dtype = q.dtype();
    // The values in [B, S, H, D] order.
    let whole = |t: &TensorView| -> Vec<f32> {
        let [tb, ts, th, td] = t.shape;
        let mut x = Vec::with_capacity(tb * ts * th * td);
        for bi in 0..tb {
            for si in 0..ts {
                for hi in 0..th {
                    x.extend((0..td).map(|di| t.get(bi, si, hi, di)));
                }
            }
        }
        x
    };
    let (qf, kf, vf) = (whole(q), whole(k), whole(v));
    let cap = (0..p).map(|r| plan.rows_of(r)).max().unwrap_or(0);
    // Per rank: its queries, its two key / value buffers [B, cap, Hk, D] with the rank whose
    // rows they hold, its running result.
    let mut qs = Vec::new();
    let mut bufs: Vec<[HostKv; 2]> = Vec::new();
    let mut acc = Vec::new();
    for r in 0..p {
        let rr = rank_ranges(plan, r);
        let rows = plan.rows_of(r);
        qs.push(gather_rows(&qf, b, n, hq * d, &rr));
        // Padding rows are NaN: a block that reads one fails the tests.
        let pad = |x: Vec<f32>| -> Vec<f32> {
            let mut y = vec![f32::NAN; b * cap * hk * d];
            for bi in 0..b {
                y[bi * cap * hk * d..][..rows * hk * d]
                    .copy_from_slice(&x[bi * rows * hk * d..][..rows * hk * d]);
            }
            y
        };
        let (kr, vr) = (
            pad(gather_rows(&kf, b, n, hk * d, &rr)),
            pad(gather_rows(&vf, b, n, hk * d, &rr)),
        );
        let empty = vec![f32::NAN; b * cap * hk * d];
        bufs.push([(kr, vr, Some(r)), (empty.clone(), empty, None)]);
        acc.push((
            vec![0f32; b * rows * hq * d],
            vec![f32::NEG_INFINITY; b * hq * rows],
        ));
    }
    let mut blocks = 0;
    for op in ops {
        match *op {
            Op::Wait { .. } | Op::Record { .. } => {}
            Op::Copy {
                rank,
                from,
                src,
                dst,
                rows,
            } => {
                // Only the rows the op names, as the device copies them: the rest of the
                // destination is poisoned (NaN), so a block reading past them fails the tests.
                let (sk, sv, held) = bufs[from][src].clone();
                if held.map(|h| plan.rows_of(h)) != Some(rows) {
                    return Err(bad(format!(
                        "program: rank {rank} copies {rows} rows of rank {from}'s buffer {src}, which holds rank {held:?}'s"
                    )));
                }
                let (tk, tv, to) = &mut bufs[rank][dst];
                tk.fill(f32::NAN);
                tv.fill(f32::NAN);
                let w = hk * d;
                for bi in 0..b {
                    let r = bi * cap * w..(bi * cap + rows) * w;
                    tk[r.clone()].copy_from_slice(&sk[r.clone()]);
                    tv[r.clone()].copy_from_slice(&sv[r]);
                }
                *to = held;
            }
            Op::Block {
                rank,
                q_chunk,
                k_chunk,
                origin,
                buf,
                kind,
            } => {
                let (kb, vb, held) = &bufs[rank][buf];
                if *held != Some(origin) || plan.owner[k_chunk] != origin {
                    return Err(bad(format!(
                        "program: rank {rank}'s block ({q_chunk}, {k_chunk}) reads buffer {buf}, which holds rank {held:?}'s keys, not rank {origin}'s"
                    )));
                }
                let (lq, lk) = (plan.len(q_chunk), plan.len(k_chunk));
                let (qa, kb0) = (local_row(plan, q_chunk), local_row(plan, k_chunk));
                let rows = plan.rows_of(rank);
                let qc = gather_rows(&qs[rank], b, rows, hq * d, &[(qa, lq)]);
                let kc = gather_rows(kb, b, cap, hk * d, &[(kb0, lk)]);
                let vc = gather_rows(vb, b, cap, hk * d, &[(kb0, lk)]);
                let store = |x: &[f32]| crate::tensor::Buffer::from_f32(dtype, x);
                let (qt, kt, vt) = (store(&qc), store(&kc), store(&vc));
                fn view(x: &crate::tensor::Buffer, shape: [usize; 4]) -> Result<TensorView<'_>> {
                    TensorView::contiguous(x.as_slice(), shape)
                }
                let bm = block_mask(kind, b, lq, lk)?;
                let spec = match &bm {
                    None => MaskSpec::Full,
                    Some(m) => MaskSpec::Expr(m),
                };
                let part = crate::attention::forward(
                    &view(&qt, [b, lq, hq, d])?,
                    &view(&kt, [b, lk, hk, d])?,
                    &view(&vt, [b, lk, hk, d])?,
                    params,
                    spec,
                )?;
                let (o, l) = &mut acc[rank];
                merge_host(
                    o,
                    l,
                    &part.out.data.to_f32_vec(),
                    &part.lse,
                    (b, hq, d),
                    rows,
                    qa,
                    lq,
                );
                blocks += 1;
            }
        }
    }
    let (out, lse) = assemble(plan, s, &acc);
    Ok(LoopbackOut {
        out,
        lse,
        steps: Vec::new(),
        total_ms: 0.0,
        enqueue_ms: 0.0,
        blocks,
    })
}

/// The CUDA source of the merge kernel.
fn merge_source() -> String {
    format!(
        "{}\n{}",
        include_str!("../cuda/kernels/common.cuh"),
        include_str!("../cuda/kernels/cp_merge.cu")
    )
}

/// A view of rows `row0 .. row0 + rows` of a `[B, cap, h, d]` device buffer at `base`.
///
/// # Safety
/// `base` must address a live allocation of `B cap h d` 16-bit elements that outlives the view.
#[allow(clippy::too_many_arguments)]
unsafe fn rows_view(
    stream: &Arc<CudaStream>,
    name: &str,
    base: u64,
    (batch, cap, h, d): (usize, usize, usize, usize),
    row0: usize,
    rows: usize,
    dtype: DType,
) -> Result<DevTensor> {
    let ptr = base + (2 * row0 * h * d) as u64;
    // SAFETY: forwarded; the view's last element is row (B - 1, row0 + rows - 1) < cap.
    unsafe {
        DevTensor::borrow(
            stream,
            name,
            ptr,
            [batch, rows, h, d],
            [cap * h * d, h * d, d, 1],
            dtype,
        )
    }
}

/// The ring program on one GPU (module header): q `[B, n, Hq, D]`, k / v `[B, n, Hk, D]` in
/// bf16 or f16 on the host, the mask full or causal, over `plan` (the zigzag placement, or any
/// plan whose chunks keep sequence order). Runs the program `runs` times (>= 1; the first warms
/// up when there are several) and returns the last run's result and timings.
pub fn run_device(
    dev: &Arc<CudaDevice>,
    plan: &Plan,
    causal: bool,
    (q, k, v): (&TensorView, &TensorView, &TensorView),
    params: &AttnParams,
    runs: usize,
) -> Result<LoopbackOut> {
    let s = Shape::of(q, k, v)?;
    let (b, n, hq, hk, d) = (s.batch, s.n, s.hq, s.hk, s.d);
    let dtype = q.dtype();
    if !matches!(dtype, DType::BF16 | DType::F16) {
        return Err(bad(format!(
            "dtype {dtype}: the CUDA kernels take bf16 or f16"
        )));
    }
    if plan.n != n || runs == 0 {
        return Err(bad(format!(
            "the plan places {} tokens, the inputs hold {n}; runs {runs} (>= 1)",
            plan.n
        )));
    }
    let p = plan.world;
    let ops = ring_program(plan, causal);
    let stream = dev.stream().clone();
    let ctx = stream.context().clone();
    let new_stream = || ctx.new_stream().map_err(drv("cp loopback: new stream"));
    let compute: Vec<Arc<CudaStream>> = (0..p).map(|_| new_stream()).collect::<Result<_>>()?;
    let copy: Vec<Arc<CudaStream>> = (0..p).map(|_| new_stream()).collect::<Result<_>>()?;
    let on = |st: Stream| match st {
        Stream::Compute(r) => &compute[r],
        Stream::Copy(r) => &copy[r],
    };
    // The kernels: one forward plan per (query rows, key rows, mask) the program meets.
    let mut plans: HashMap<(usize, usize, BlockKind), FwdPlan> = HashMap::new();
    for op in &ops {
        if let Op::Block {
            q_chunk,
            k_chunk,
            kind,
            ..
        } = *op
        {
            let key = (plan.len(q_chunk), plan.len(k_chunk), kind);
            if plans.contains_key(&key) {
                continue;
            }
            let dims = Dims {
                batch: b,
                sq: key.0,
                sk: key.1,
                hq,
                hk,
                d,
                dv: d,
            };
            let bm = block_mask(kind, b, key.0, key.1)?;
            let spec = match &bm {
                None => MaskSpec::Full,
                Some(m) => MaskSpec::Expr(m),
            };
            plans.insert(key, FwdPlan::new(dev, dims, dtype, params, spec)?);
        }
    }
    let f16 = (dtype == DType::F16) as usize;
    let merge = dev.function(
        &format!("cp_merge_{}", dtype.name()),
        "la_cp_merge",
        &merge_source(),
        &[("LA_F16".to_string(), f16.to_string())],
        0,
    )?;
    // Buffers, all made here: per rank its queries, two key / value buffers of the largest
    // shard, a partial (out, LSE) per local query chunk and the f32 running result.
    let cap = (0..p).map(|r| plan.rows_of(r)).max().unwrap_or(0);
    let (qb, kb, vb) = (
        gather_u16("q", q)?,
        gather_u16("k", k)?,
        gather_u16("v", v)?,
    );
    let alloc16 = |len: usize| -> Result<CudaSlice<u16>> {
        stream.alloc_zeros::<u16>(len.max(1)).map_err(drv("alloc"))
    };
    let mut q_local = Vec::new();
    // Each rank's own keys and values (`home`, kept for every run: the ring overwrites both
    // buffers) and its two buffers.
    let mut home: Vec<(CudaSlice<u16>, CudaSlice<u16>)> = Vec::new();
    let mut kv: Vec<[(CudaSlice<u16>, CudaSlice<u16>); 2]> = Vec::new();
    let mut parts: Vec<HashMap<usize, (DevTensor, CudaSlice<f32>)>> = Vec::new();
    let mut acc: Vec<(CudaSlice<f32>, CudaSlice<f32>)> = Vec::new();
    for r in 0..p {
        let rr = rank_ranges(plan, r);
        let rows = plan.rows_of(r);
        q_local.push(dev.upload(&gather_rows(&qb, b, n, hq * d, &rr))?);
        let pad = |x: Vec<u16>| -> Vec<u16> {
            let mut y = vec![0u16; b * cap * hk * d];
            for bi in 0..b {
                y[bi * cap * hk * d..][..rows * hk * d]
                    .copy_from_slice(&x[bi * rows * hk * d..][..rows * hk * d]);
            }
            y
        };
        home.push((
            dev.upload(&pad(gather_rows(&kb, b, n, hk * d, &rr)))?,
            dev.upload(&pad(gather_rows(&vb, b, n, hk * d, &rr)))?,
        ));
        let m = b * cap * hk * d;
        kv.push([(alloc16(m)?, alloc16(m)?), (alloc16(m)?, alloc16(m)?)]);
        let mut mine = HashMap::new();
        for (g, _) in plan.chunks_of(r) {
            let len = plan.len(g);
            let o = DevTensor::alloc(dev, [b, len, hq, d], dtype)?;
            let l = dev.alloc_f32(b * hq * len)?;
            mine.insert(g, (o, l));
        }
        parts.push(mine);
        acc.push((
            dev.alloc_f32(b * rows * hq * d)?,
            dev.alloc_f32(b * hq * rows)?,
        ));
    }
    let mut events = HashMap::new();
    for op in &ops {
        if let Op::Record { event, .. } = *op {
            let e = ctx
                .new_event(Some(cu::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(drv("cp loopback: event"))?;
            events.insert(event, e);
        }
    }
    let neg_inf: Vec<Vec<f32>> = (0..p)
        .map(|r| vec![f32::NEG_INFINITY; b * hq * plan.rows_of(r)])
        .collect();
    dev.synchronize()?;
    let mut result = Ok(());
    let mut enqueue_ms = 0.0;
    for _ in 0..runs {
        result = (|| -> Result<()> {
            // Every rank's buffer 0 holds its own keys and values, its running result is
            // (0, -inf); done before the first step is queued (the program's first copies read
            // the buffers 0 without a wait).
            for r in 0..p {
                let (o, l) = &mut acc[r];
                let reset = drv("cp loopback: reset");
                stream.memset_zeros(o).map_err(&reset)?;
                stream.memcpy_htod(&neg_inf[r], l).map_err(&reset)?;
                let (hk_, hv) = &home[r];
                let (k0, v0) = &mut kv[r][0];
                stream.memcpy_dtod(hk_, k0).map_err(&reset)?;
                stream.memcpy_dtod(hv, v0).map_err(&reset)?;
            }
            stream.synchronize().map_err(drv("cp loopback: reset"))?;
            let t0 = std::time::Instant::now();
            for op in &ops {
                match *op {
                    Op::Wait { on: st, event } => on(st)
                        .wait(&events[&event])
                        .map_err(drv("cp loopback: wait"))?,
                    Op::Record { on: st, event } => events[&event]
                        .record(on(st))
                        .map_err(drv("cp loopback: record"))?,
                    Op::Copy {
                        rank,
                        from,
                        src,
                        dst,
                        rows,
                    } => {
                        // The rows the source holds, in each batch (batches `cap` rows apart).
                        let len = ((b - 1) * cap + rows) * hk * d;
                        let st = &copy[rank];
                        let (a, z) = kv.split_at_mut(rank.max(from));
                        let (to, fr) = if rank > from {
                            (&mut z[0], &a[from])
                        } else if rank < from {
                            (&mut a[rank], &z[0])
                        } else {
                            return Err(bad("program: a rank copies from itself".into()));
                        };
                        let (fk, fv) = &fr[src];
                        let (tk, tv) = &mut to[dst];
                        st.memcpy_dtod(&fk.slice(..len), &mut tk.slice_mut(..len))
                            .map_err(drv("cp loopback: copy"))?;
                        st.memcpy_dtod(&fv.slice(..len), &mut tv.slice_mut(..len))
                            .map_err(drv("cp loopback: copy"))?;
                    }
                    Op::Block {
                        rank,
                        q_chunk,
                        k_chunk,
                        buf,
                        kind,
                        ..
                    } => {
                        let st = &compute[rank];
                        let (lq, lk) = (plan.len(q_chunk), plan.len(k_chunk));
                        let (qa, kb0) = (local_row(plan, q_chunk), local_row(plan, k_chunk));
                        let rows = plan.rows_of(rank);
                        let fp = &plans[&(lq, lk, kind)];
                        let (kbuf, vbuf) = &kv[rank][buf];
                        // SAFETY: the buffers are this function's, alive until it returns
                        // (after the device is synchronized); the views lie inside them.
                        let (qv, kv_, vv) = unsafe {
                            (
                                rows_view(
                                    st,
                                    "q",
                                    q_local[rank].device_ptr(st).0,
                                    (b, rows, hq, d),
                                    qa,
                                    lq,
                                    dtype,
                                )?,
                                rows_view(
                                    st,
                                    "k",
                                    kbuf.device_ptr(st).0,
                                    (b, cap, hk, d),
                                    kb0,
                                    lk,
                                    dtype,
                                )?,
                                rows_view(
                                    st,
                                    "v",
                                    vbuf.device_ptr(st).0,
                                    (b, cap, hk, d),
                                    kb0,
                                    lk,
                                    dtype,
                                )?,
                            )
                        };
                        let (po, pl) = parts[rank]
                            .get_mut(&q_chunk)
                            .expect("a partial buffer per local chunk");
                        fp.launch_on(st, &qv, &kv_, &vv, po, pl)?;
                        // The merge (formula in cp_merge.cu and the module header).
                        let (o, l) = &mut acc[rank];
                        let warps = b * hq * lq;
                        let cfg = LaunchConfig {
                            grid_dim: (warps.div_ceil(4) as u32, 1, 1),
                            block_dim: (128, 1, 1),
                            shared_mem_bytes: 0,
                        };
                        let dims = [b, hq, rows, qa, lq, d].map(|x| x as i32);
                        let mut lb = st.launch_builder(&merge);
                        lb.arg(o).arg(l).arg(&*po.data).arg(&*pl);
                        for x in &dims {
                            lb.arg(x);
                        }
                        // SAFETY: the arguments match `la_cp_merge`'s; o / l hold the rank's
                        // [B, rows, Hq, D] / [B, Hq, rows], the partials [B, lq, Hq, D] /
                        // [B, Hq, lq], and rows qa .. qa + lq lie inside the rank's rows.
                        unsafe { lb.launch(cfg) }.map_err(drv("launch cp merge"))?;
                    }
                }
            }
            enqueue_ms = t0.elapsed().as_secs_f64() * 1e3;
            Ok(())
        })();
        // Every stream done before anything is read or freed, on success or failure.
        let synced = ctx.synchronize().map_err(drv("cp loopback: synchronize"));
        result = result.and(synced);
        if result.is_err() {
            break;
        }
    }
    result?;
    let ms = |a: Event, z: Event| -> Result<f64> {
        Ok(events[&a]
            .elapsed_ms(&events[&z])
            .map_err(drv("cp loopback: timing"))? as f64)
    };
    let mut steps = Vec::with_capacity(p);
    for st in 0..p {
        let mut row = Vec::with_capacity(p);
        for r in 0..p {
            let compute_ms = ms(ev(Mark::ComputeStart, r, st), ev(Mark::ComputeEnd, r, st))?;
            let copy_ms = if st + 1 < p {
                ms(ev(Mark::CopyStart, r, st), ev(Mark::CopyEnd, r, st))?
            } else {
                0.0
            };
            let wait_ms = if st > 0 {
                ms(
                    ev(Mark::ComputeEnd, r, st - 1),
                    ev(Mark::ComputeStart, r, st),
                )?
            } else {
                0.0
            };
            row.push(StepTime {
                compute_ms,
                copy_ms,
                wait_ms,
            });
        }
        steps.push(row);
    }
    // From the earliest start to the latest end.
    let first = (0..p)
        .map(|r| ev(Mark::ComputeStart, r, 0))
        .chain((0..p).filter(|_| p > 1).map(|r| ev(Mark::CopyStart, r, 0)));
    let mut total_ms: f64 = 0.0;
    for a in first {
        for r in 0..p {
            total_ms = total_ms.max(ms(a, ev(Mark::ComputeEnd, r, p - 1))?);
        }
    }
    let mut per_rank = Vec::with_capacity(p);
    for (o, l) in &acc {
        per_rank.push((dev.download(o)?, dev.download(l)?));
    }
    for (r, (o, l)) in per_rank.iter_mut().enumerate() {
        let rows = plan.rows_of(r);
        o.truncate(b * rows * hq * d);
        l.truncate(b * hq * rows);
    }
    let (out, lse) = assemble(plan, s, &per_rank);
    let blocks = ops.iter().filter(|o| matches!(o, Op::Block { .. })).count();
    Ok(LoopbackOut {
        out,
        lse,
        steps,
        total_ms,
        enqueue_ms,
        blocks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cp::{zigzag_plan, CpMask};
    use crate::testing::Rng;

    fn cp_mask(causal: bool, n: usize) -> CpMask {
        let text = if causal { "causal" } else { "full" };
        let bm = MaskExpr::parse(text)
            .unwrap()
            .bind(
                MaskShape {
                    batch: 1,
                    sq: n,
                    sk: n,
                },
                None,
            )
            .unwrap();
        CpMask::new(bm, 16).unwrap()
    }

    /// Accesses of an op to the key / value buffers: (rank, buffer, writes).
    fn accesses(op: &Op) -> Vec<(usize, usize, bool)> {
        match *op {
            Op::Block { rank, buf, .. } => vec![(rank, buf, false)],
            Op::Copy {
                rank,
                from,
                src,
                dst,
                ..
            } => vec![(from, src, false), (rank, dst, true)],
            _ => Vec::new(),
        }
    }

    /// The pairs of ops of `ops` (over `p` ranks) that touch one buffer, one of them writing,
    /// and are not ordered by the streams and events, the later in issue order after the
    /// earlier (vector clocks over the issue order, CUDA's semantics: a wait orders what follows
    /// on its stream after everything queued before the record). Panics on an event waited
    /// before it is recorded.
    fn races(ops: &[Op], p: usize) -> Vec<String> {
        let idx = |s: Stream| match s {
            Stream::Compute(r) => r,
            Stream::Copy(r) => p + r,
        };
        let mut vc = vec![vec![0usize; 2 * p]; 2 * p];
        let mut recorded: HashMap<Event, Vec<usize>> = HashMap::new();
        // (op, its stream, its sequence number, its clock)
        let mut work: Vec<(Op, usize, usize, Vec<usize>)> = Vec::new();
        for op in ops {
            let s = idx(op.stream());
            match *op {
                Op::Wait { event, .. } => {
                    let e = recorded
                        .get(&event)
                        .unwrap_or_else(|| panic!("P {p}: {event:?} waited before recorded"));
                    for (x, &y) in vc[s].iter_mut().zip(e) {
                        *x = (*x).max(y);
                    }
                }
                Op::Record { event, .. } => {
                    assert!(recorded.insert(event, vc[s].clone()).is_none());
                }
                _ => {
                    vc[s][s] += 1;
                    work.push((*op, s, vc[s][s], vc[s].clone()));
                }
            }
        }
        let mut out = Vec::new();
        for (i, (a, sa, na, _)) in work.iter().enumerate() {
            for (bop, _, _, cb) in &work[i + 1..] {
                let conflict = accesses(a).iter().any(|x| {
                    accesses(bop)
                        .iter()
                        .any(|y| x.0 == y.0 && x.1 == y.1 && (x.2 || y.2))
                });
                if conflict && cb[*sa] < *na {
                    out.push(format!("{a:?} not ordered before {bop:?}"));
                }
            }
        }
        out
    }

    /// The ring program has no race for any P; without its waits it has (the check sees them).
    #[test]
    fn program_is_race_free() {
        for p in [1, 2, 3, 4, 5, 8] {
            for causal in [true, false] {
                let plan = zigzag_plan(&cp_mask(causal, 16 * p + 3), p).unwrap();
                let ops = ring_program(&plan, causal);
                assert_eq!(races(&ops, p), Vec::<String>::new(), "P {p}");
                if p > 1 {
                    let unordered: Vec<Op> = ops
                        .iter()
                        .filter(|o| !matches!(o, Op::Wait { .. }))
                        .copied()
                        .collect();
                    assert!(!races(&unordered, p).is_empty(), "P {p}");
                }
                // Each of the copy's three waits is needed from P = 3 on.
                if p >= 3 {
                    for mark in [Mark::ComputeEnd, Mark::CopyEnd] {
                        let fewer: Vec<Op> = ops
                            .iter()
                            .filter(|o| {
                                !matches!(o, Op::Wait { on: Stream::Copy(_), event } if event.mark == mark)
                            })
                            .copied()
                            .collect();
                        assert!(!races(&fewer, p).is_empty(), "P {p} without {mark:?}");
                    }
                }
            }
        }
    }

    /// Every (query chunk, key chunk) pair the mask needs is computed once, by the query
    /// chunk's owner, and none it does not need.
    #[test]
    fn program_covers_the_needed_blocks_once() {
        for p in [1, 2, 3, 5, 8] {
            for causal in [true, false] {
                let plan = zigzag_plan(&cp_mask(causal, 7 * p + 2 * p), p).unwrap();
                let mut seen = HashMap::new();
                for op in ring_program(&plan, causal) {
                    if let Op::Block {
                        rank,
                        q_chunk,
                        k_chunk,
                        ..
                    } = op
                    {
                        assert_eq!(plan.owner[q_chunk], rank);
                        *seen.entry((q_chunk, k_chunk)).or_insert(0) += 1;
                    }
                }
                let nc = plan.chunks();
                for a in 0..nc {
                    for b in 0..nc {
                        let want = usize::from(!causal || b <= a);
                        assert_eq!(seen.get(&(a, b)).copied().unwrap_or(0), want, "P {p}");
                        // (the plan's schedule is tile-grained: it may need more, never less)
                        assert!(want == 0 || plan.needs(a, b), "the plan agrees");
                    }
                }
            }
        }
    }

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut r = Rng::new(seed);
        (0..n).map(|_| r.normal() as f32).collect()
    }

    /// The program run on the host equals single-rank attention (f32: to rounding) for P in
    /// {1, 2, 3, 4, 5, 8}, awkward lengths, GQA, causal and full; and the f64 oracle.
    #[test]
    fn host_run_equals_single_rank_and_the_oracle() {
        let (b, hq, hk, d) = (2, 4, 2, 16);
        for p in [1, 2, 3, 4, 5, 8] {
            for n in [2 * p, 63, 113] {
                if n < 2 * p {
                    continue;
                }
                for causal in [true, false] {
                    let seed = (p * 1000 + n) as u64 + causal as u64;
                    let (q, k, v) = (
                        rand(b * n * hq * d, seed),
                        rand(b * n * hk * d, seed + 1),
                        rand(b * n * hk * d, seed + 2),
                    );
                    let qv = TensorView::contiguous(&q[..], [b, n, hq, d]).unwrap();
                    let kv = TensorView::contiguous(&k[..], [b, n, hk, d]).unwrap();
                    let vv = TensorView::contiguous(&v[..], [b, n, hk, d]).unwrap();
                    let params = AttnParams::default();
                    let bm = MaskExpr::parse(if causal { "causal" } else { "full" })
                        .unwrap()
                        .bind(
                            MaskShape {
                                batch: b,
                                sq: n,
                                sk: n,
                            },
                            None,
                        )
                        .unwrap();
                    let plan = zigzag_plan(&CpMask::new(bm.clone(), 16).unwrap(), p).unwrap();
                    let got = run_host(&plan, &ring_program(&plan, causal), &qv, &kv, &vv, &params)
                        .unwrap();
                    let want =
                        crate::attention::forward(&qv, &kv, &vv, &params, MaskSpec::Expr(&bm))
                            .unwrap();
                    let w = want.out.data.to_f32_vec();
                    let scale = w.iter().fold(0f32, |a, x| a.max(x.abs()));
                    let e = got
                        .out
                        .iter()
                        .zip(&w)
                        .fold(0f32, |a, (x, y)| a.max((x - y).abs()))
                        / scale;
                    let el = got
                        .lse
                        .iter()
                        .zip(&want.lse)
                        .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
                    assert!(
                        e < 2e-5 && el < 1e-4,
                        "P {p} n {n} causal {causal}: {e} {el}"
                    );
                    if n == 63 {
                        let r = crate::reference::attention_f64(
                            &qv,
                            &kv,
                            &vv,
                            &params,
                            &|_, _, i, j| !causal || j <= i,
                        )
                        .unwrap();
                        let t = crate::Tensor::new(
                            crate::tensor::Buffer::from_f32(DType::F32, &got.out),
                            vec![b, n, hq, d],
                        )
                        .unwrap();
                        let (eo, el) = crate::testing::compare(&t, &got.lse, &r);
                        assert!(eo < 2e-5 && el < 1e-4, "oracle P {p}: {eo} {el}");
                    }
                }
            }
        }
    }

    /// The merge of two halves of the keys equals attention over all of them (the formula),
    /// and a partial row without keys (-inf) changes nothing.
    #[test]
    fn merge_host_of_two_halves_is_the_whole() {
        let (b, n, h, d) = (1, 7, 2, 16);
        let (q, k, v) = (
            rand(n * h * d, 5),
            rand(2 * n * h * d, 6),
            rand(2 * n * h * d, 7),
        );
        fn view(x: &[f32], shape: [usize; 4]) -> TensorView<'_> {
            TensorView::contiguous(x, shape).unwrap()
        }
        let params = AttnParams::default();
        let fwd = |k: &[f32], v: &[f32], s| {
            crate::attention::forward(
                &view(&q, [b, n, h, d]),
                &view(k, [b, s, h, d]),
                &view(v, [b, s, h, d]),
                &params,
                MaskSpec::Full,
            )
            .unwrap()
        };
        let whole = fwd(&k, &v, 2 * n);
        let half = n * h * d;
        let (a, z) = (
            fwd(&k[..half], &v[..half], n),
            fwd(&k[half..], &v[half..], n),
        );
        let mut o = vec![0f32; n * h * d];
        let mut l = vec![f32::NEG_INFINITY; h * n];
        for part in [&a, &z] {
            merge_host(
                &mut o,
                &mut l,
                &part.out.data.to_f32_vec(),
                &part.lse,
                (b, h, d),
                n,
                0,
                n,
            );
        }
        let none = vec![f32::NEG_INFINITY; h * n];
        let before = (o.clone(), l.clone());
        merge_host(
            &mut o,
            &mut l,
            &vec![7.0; n * h * d],
            &none,
            (b, h, d),
            n,
            0,
            n,
        );
        assert_eq!((o.clone(), l.clone()), before);
        let w = whole.out.data.to_f32_vec();
        for (x, y) in o.iter().zip(&w) {
            assert!((x - y).abs() < 1e-5, "{x} {y}");
        }
        for (x, y) in l.iter().zip(&whole.lse) {
            assert!((x - y).abs() < 1e-5, "{x} {y}");
        }
    }

    /// Without a GPU the device run is a clear error, never a panic.
    #[test]
    fn the_device_run_needs_a_device_or_says_why() {
        match crate::cuda::try_default_device() {
            Err(why) => assert!(why.contains("CUDA") || why.contains("cuda"), "{why}"),
            Ok(dev) => {
                // On a GPU: a small causal ring (run twice: the second starts from the kept
                // keys) against the host run (the CLI checks more).
                let (b, n, hq, hk, d, p) = (1, 67, 2, 1, 64, 3);
                let tq = crate::testing::random_tensor(DType::BF16, &[b, n, hq, d], 1.0, 1);
                let tk = crate::testing::random_tensor(DType::BF16, &[b, n, hk, d], 1.0, 2);
                let tv = crate::testing::random_tensor(DType::BF16, &[b, n, hk, d], 1.0, 3);
                let (qv, kv, vv) = (
                    tq.view("q").unwrap(),
                    tk.view("k").unwrap(),
                    tv.view("v").unwrap(),
                );
                let plan = zigzag_plan(&cp_mask(true, n), p).unwrap();
                let params = AttnParams::default();
                let got = run_device(&dev, &plan, true, (&qv, &kv, &vv), &params, 2).unwrap();
                let want =
                    run_host(&plan, &ring_program(&plan, true), &qv, &kv, &vv, &params).unwrap();
                let e = got
                    .out
                    .iter()
                    .zip(&want.out)
                    .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
                assert!(e < 0.05, "{e}");
            }
        }
    }
}
