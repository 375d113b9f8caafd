//! One switch over the schemes, the cost model that picks one (`auto`), and the whole-sequence
//! driver that runs a scheme with ranks as threads ([`run_threads`], what `longattn cp run` does).
//!
//! The cost model ([`CostModel::estimate`]) gives each scheme a time per rank for the forward from
//! three parts, each counted from the plan and the shapes (nothing measured at run time):
//! - compute: the most scheduled (query, key) pairs any rank computes, times `Hq 2 (D + Dv)`
//!   flops a pair, at `flops` per second (ring, zigzag, all-gather and pass-Q compute the plan's
//!   blocks, so their peak is the plan's heaviest rank; Ulysses runs the whole mask for `Hq / P`
//!   heads, exactly `1 / P` of the work);
//! - communication: the bytes a rank receives at `bytes_per_s`, plus `latency` per dependent
//!   round of messages (the ring: P - 1 steps; pass-Q: P - 1 steps of two rounds, queries there
//!   and results back; all-gather: one collective for K, one for V; Ulysses: four all-to-alls,
//!   q / k / v there and the output back; USP with degree U: Ulysses' four all-to-alls over U
//!   ranks, each a member's piece, plus the ring's halo over the P / U groups of K / V for
//!   Hq / U heads, and the ring plan's heaviest group's work divided by U);
//! - overlap: with `overlap` (a transport that moves the next step's data while this step
//!   computes) the ring and pass-Q hide their transfers behind their compute
//!   (`max(compute, transfer)`); the threads transport as built does not, nor do the
//!   collectives (`compute + transfer`).
//!
//! With the defaults (a rank of 50 GFLOP/s, links of 10 GB/s, 20 us per round, no overlap) this
//! picks Ulysses for dense masks with as many key / value heads as query heads when the heads
//! divide by P (it receives `~(P - 1) / P^2` of the sequence's q / k / v / out, against the
//! ring's `(P - 1) / P` of its K / V, and balances perfectly), all-gather for GQA with few key /
//! value heads at small P (the same bytes as the ring in fewer rounds), and the ring when its
//! queries need only some key chunks (sliding windows: it fetches only the chunks a rank needs),
//! and USP when the query heads divide by a group of the ranks but not by all of them (8 ranks,
//! 4 heads: U = 4, R = 2). `auto` weighs USP for every U with 1 < U < P that divides P;
//! `choose_usp` picks U for `--scheme usp` among all divisors (U = 1 the ring, U = P Ulysses).
use super::block::{copy_rows, same_heads, Cp, CpMask, GradIn, LocalQkv, Rows};
use super::plan::{even_bounds, plan, Plan};
use super::ring::Grads;
use super::transport::{Counted, ThreadTransport, Traffic, Transport};
use super::usp::{self, usp_plan};
use super::{gather, passq, ring, ulysses};
use crate::attention::AttnParams;
use crate::backward::BackwardParams;
use crate::error::{Error, Result};
use std::time::Duration;

/// A context-parallel scheme.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// Ring pass-KV over the mask-aware plan.
    Ring,
    /// Ring pass-KV over the fixed zigzag placement (2P equal chunks, rank r holds chunks r and
    /// 2P - 1 - r), whatever the mask.
    Zigzag,
    /// All-gather of K / V over the mask-aware plan.
    AllGather,
    /// All-to-all over heads.
    Ulysses,
    /// Pass-Q over the mask-aware plan: the queries travel, K / V stay.
    PassQ,
    /// USP with Ulysses degree U (the field): Ulysses inside groups of U ranks, the ring across
    /// the P / U groups, over [`usp_plan`].
    Usp(usize),
}

impl Scheme {
    pub const ALL: [Scheme; 5] = [
        Scheme::Ring,
        Scheme::Zigzag,
        Scheme::AllGather,
        Scheme::Ulysses,
        Scheme::PassQ,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scheme::Ring => "ring",
            Scheme::Zigzag => "zigzag",
            Scheme::AllGather => "allgather",
            Scheme::Ulysses => "ulysses",
            Scheme::PassQ => "passq",
            Scheme::Usp(_) => "usp",
        }
    }

    /// The name with the degrees that are part of the scheme (`usp(U=2)`).
    pub fn label(self) -> String {
        match self {
            Scheme::Usp(u) => format!("usp(U={u})"),
            s => s.name().to_string(),
        }
    }

    /// The scheme of a name (`ring`, `zigzag`, `allgather`, `ulysses`, `passq`; USP is
    /// [`Scheme::Usp`] with its degree, or [`CostModel::choose_usp`]).
    pub fn parse(s: &str) -> Result<Scheme> {
        Scheme::ALL
            .into_iter()
            .find(|x| x.name() == s)
            .ok_or_else(|| Error::Param {
                op: "context parallelism",
                msg: format!(
                    "unknown scheme `{s}` (expected one of {})",
                    Scheme::ALL.map(|x| x.name()).join(", ")
                ),
            })
    }

    /// The placement this scheme runs over: the fixed zigzag one for [`Scheme::Zigzag`], the
    /// balanced plan with `per_rank` chunks per rank otherwise.
    pub fn plan(self, mask: &CpMask, world: usize, per_rank: usize) -> Result<Plan> {
        match self {
            Scheme::Zigzag => zigzag_plan(mask, world),
            Scheme::Usp(u) => usp_plan(mask, world, u, per_rank),
            _ => plan(&mask.sched, world, per_rank),
        }
    }

    /// This rank's forward: `(out [B, rows, Hq, Dv], lse [B, Hq, rows])`, local row order. On
    /// an error the rank tells its peers why ([`Transport::abort`]) before returning it.
    pub fn forward(
        self,
        cp: &Cp,
        x: &LocalQkv,
        params: &AttnParams,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let res = match self {
            Scheme::Ring | Scheme::Zigzag => ring::ring_forward(cp, x, params),
            Scheme::AllGather => gather::gather_forward(cp, x, params),
            Scheme::Ulysses => ulysses::ulysses_forward(cp, x, params),
            Scheme::PassQ => passq::passq_forward(cp, x, params),
            Scheme::Usp(u) => usp::usp_forward(cp, u, x, params),
        };
        res.inspect_err(|e| cp.t.abort(&e.to_string()))
    }

    /// This rank's backward: `(dq, dk, dv)`, local row order (an error aborts, as in
    /// [`Scheme::forward`]).
    pub fn backward(self, cp: &Cp, x: &LocalQkv, g: &GradIn, params: &AttnParams) -> Result<Grads> {
        let res = match self {
            Scheme::Ring | Scheme::Zigzag => ring::ring_backward(cp, x, g, params),
            Scheme::AllGather => gather::gather_backward(cp, x, g, params),
            Scheme::Ulysses => ulysses::ulysses_backward(cp, x, g, params),
            Scheme::PassQ => passq::passq_backward(cp, x, g, params),
            Scheme::Usp(u) => usp::usp_backward(cp, u, x, g, params),
        };
        res.inspect_err(|e| cp.t.abort(&e.to_string()))
    }
}

/// The zigzag placement of the whole sequence over `world` ranks: 2P near-equal chunks, rank r
/// holding chunks r and 2P - 1 - r (what [`plan`] finds for a causal mask with two chunks per
/// rank), for any mask.
pub fn zigzag_plan(mask: &CpMask, world: usize) -> Result<Plan> {
    let n = mask.sched.sq;
    if world == 0 || n < 2 * world {
        return Err(Error::Param {
            op: "cp plan",
            msg: format!(
                "zigzag cuts {n} tokens into 2P = {} chunks: needs at least one rank and 2P tokens",
                2 * world
            ),
        });
    }
    let owner = (0..2 * world).map(|g| g.min(2 * world - 1 - g)).collect();
    Plan::new(&mask.sched, even_bounds(n, 2 * world), owner, world)
}

/// The shapes of one attention: (B, n, Hq, Hk, D, Dv).
pub type Dims = (usize, usize, usize, usize, usize, usize);

/// The rates the cost model assumes (module header); the defaults describe a CPU rank or a
/// modest link, and only their ratios matter for the choice.
#[derive(Clone, Copy, Debug)]
pub struct CostModel {
    /// Attention flops per second of one rank.
    pub flops: f64,
    /// Bytes per second a rank receives.
    pub bytes_per_s: f64,
    /// Seconds per dependent round of messages.
    pub latency: f64,
    /// Whether the ring's transfers overlap its compute.
    pub overlap: bool,
}

impl Default for CostModel {
    fn default() -> Self {
        CostModel {
            flops: 50e9,
            bytes_per_s: 10e9,
            latency: 20e-6,
            overlap: false,
        }
    }
}

/// A scheme's estimated forward time per rank and its parts (seconds, bytes).
#[derive(Clone, Copy, Debug)]
pub struct Estimate {
    pub scheme: Scheme,
    pub compute_s: f64,
    /// Bytes the busiest rank receives.
    pub bytes: u64,
    pub rounds: usize,
    pub total_s: f64,
}

impl CostModel {
    /// The estimate of `scheme` on `plan` (module header); `None` when the scheme cannot run
    /// these shapes (Ulysses with query heads not a multiple of P).
    pub fn estimate(
        &self,
        scheme: Scheme,
        plan: &Plan,
        mask: &CpMask,
        dims: Dims,
    ) -> Option<Estimate> {
        let (b, _, hq, hk, d, dv) = dims;
        let p = plan.world;
        // The plan counts pairs over the schedule's (batch, heads) rows; per query head:
        let per_head = hq as f64 / mask.sched.heads as f64 * (b / mask.sched.batch) as f64;
        let flop = |pairs: f64| pairs * per_head * 2.0 * (d + dv) as f64;
        let rank_max = *plan.rank_work().iter().max().unwrap_or(&0) as f64;
        let total: f64 = plan.rank_work().iter().sum::<u64>() as f64;
        let rows = plan.max_rows() as u64;
        let (b, hq, hk, d, dv) = (b as u64, hq as u64, hk as u64, d as u64, dv as u64);
        let kv_row = 4 * b * hk * (d + dv);
        // Key / value heads a rank receives when its `hp` query heads of groups of `g` arrive
        // by an all-to-all (the three cases of `ulysses`).
        let kv_heads = |hp: u64, g: u64| {
            if hp.is_multiple_of(g) {
                hp / g
            } else if g.is_multiple_of(hp) {
                1
            } else {
                hp
            }
        };
        // Bytes of one row a rank's head group receives in Ulysses' all-to-alls: q, k, v of its
        // heads there and its out (with the LSE) back.
        let a2a_row =
            |hp: u64| 4 * b * (hp * (d + dv) + kv_heads(hp, hq / hk) * (d + dv) + hp * (dv + 1));
        // (compute flops, bytes received, of which the ring's steps (hidden under overlap),
        // dependent rounds)
        let (compute, bytes, ringed, rounds) = match scheme {
            Scheme::Ring | Scheme::Zigzag => {
                let x = ring::ring_bytes(plan, kv_row);
                (flop(rank_max), x, x, p - 1)
            }
            Scheme::PassQ => {
                let x = passq::passq_bytes(plan, 4 * b * hq * d, 4 * b * hq * (dv + 1));
                (flop(rank_max), x, x, 2 * (p - 1))
            }
            Scheme::AllGather => (
                flop(rank_max),
                (p as u64 - 1) * rows * kv_row,
                0,
                2 * (p > 1) as usize,
            ),
            Scheme::Ulysses => {
                let p64 = p as u64;
                if hq % p64 != 0 {
                    return None;
                }
                (
                    flop(total / p as f64),
                    (p64 - 1) * rows * a2a_row(hq / p64),
                    0,
                    4 * (p > 1) as usize,
                )
            }
            Scheme::Usp(u) => {
                let u64_ = u as u64;
                if u == 0 || !p.is_multiple_of(u) || !hq.is_multiple_of(u64_) {
                    return None;
                }
                // The ring plan over the P / U groups (what `usp_plan` cuts): each member
                // computes its group's blocks for Hq / U heads; the all-to-alls inside the
                // group move a member's piece, the ring the halo of K / V for its heads.
                let per_rank = (plan.chunks() / p).max(1);
                let rp = super::plan::plan(&mask.sched, p / u, per_rank).ok()?;
                if (0..rp.chunks()).any(|c| rp.len(c) < u) {
                    return None;
                }
                let hp = hq / u64_;
                let ring_max = *rp.rank_work().iter().max().unwrap_or(&0) as f64;
                let piece = rp.max_rows().div_ceil(u) as u64;
                let ringed = ring::ring_bytes(&rp, 4 * b * kv_heads(hp, hq / hk) * (d + dv));
                (
                    flop(ring_max) / u as f64,
                    (u64_ - 1) * piece * a2a_row(hp) + ringed,
                    ringed,
                    4 * (u > 1) as usize + p / u - 1,
                )
            }
        };
        let compute_s = compute / self.flops;
        let (move_s, hidden_s) = (
            bytes as f64 / self.bytes_per_s,
            ringed as f64 / self.bytes_per_s,
        );
        let total_s = if self.overlap {
            compute_s.max(hidden_s) + (move_s - hidden_s) + rounds as f64 * self.latency
        } else {
            compute_s + move_s + rounds as f64 * self.latency
        };
        Some(Estimate {
            scheme,
            compute_s,
            bytes,
            rounds,
            total_s,
        })
    }

    /// The scheme of least estimated time (ties: the earlier of ring, all-gather, Ulysses,
    /// pass-Q, then USP by increasing U; USP only with 1 < U < P, as U = 1 is the ring and
    /// U = P Ulysses) and its plan (`per_rank` chunks per rank), with every estimate for the
    /// report.
    pub fn choose(
        &self,
        mask: &CpMask,
        world: usize,
        per_rank: usize,
        dims: Dims,
    ) -> Result<(Scheme, Plan, Vec<Estimate>)> {
        let balanced = plan(&mask.sched, world, per_rank)?;
        let hybrids = (2..world)
            .filter(|&u| world.is_multiple_of(u))
            .map(Scheme::Usp);
        let mut all = Vec::new();
        for s in [
            Scheme::Ring,
            Scheme::AllGather,
            Scheme::Ulysses,
            Scheme::PassQ,
        ]
        .into_iter()
        .chain(hybrids)
        {
            all.extend(self.estimate(s, &balanced, mask, dims));
        }
        let best = least(&all).expect("the ring always runs");
        let chosen = match best {
            Scheme::Usp(u) => usp_plan(mask, world, u, per_rank)?,
            _ => balanced,
        };
        Ok((best, chosen, all))
    }

    /// USP's degrees for `world` ranks: the Ulysses degree U (a divisor of P and of the query
    /// heads, U = 1 and U = P included) of least estimated time, ties to the smaller U, and its
    /// plan ([`usp_plan`]), with the estimate of every U that can run.
    pub fn choose_usp(
        &self,
        mask: &CpMask,
        world: usize,
        per_rank: usize,
        dims: Dims,
    ) -> Result<(Scheme, Plan, Vec<Estimate>)> {
        let balanced = plan(&mask.sched, world, per_rank)?;
        let all: Vec<Estimate> = (1..=world)
            .filter(|&u| world.is_multiple_of(u))
            .filter_map(|u| self.estimate(Scheme::Usp(u), &balanced, mask, dims))
            .collect();
        let best = least(&all).ok_or_else(|| Error::Param {
            op: "context parallelism",
            msg: format!(
                "usp: no Ulysses degree U fits {world} ranks with {} query heads and {} tokens",
                dims.2, dims.1
            ),
        })?;
        let Scheme::Usp(u) = best else {
            unreachable!("only USP estimated")
        };
        Ok((best, usp_plan(mask, world, u, per_rank)?, all))
    }
}

/// The scheme of the least estimated time (the first of equal ones).
fn least(all: &[Estimate]) -> Option<Scheme> {
    all.iter()
        .min_by(|a, b| a.total_s.total_cmp(&b.total_s))
        .map(|e| e.scheme)
}

/// Whole-sequence tensors (f32, contiguous): `q [B, n, Hq, D]`, `k [B, n, Hk, D]`,
/// `v [B, n, Hk, Dv]`, and for a backward `dout [B, n, Hq, Dv]`.
pub struct Whole<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub dout: Option<&'a [f32]>,
    pub dims: Dims,
}

/// What [`run_threads`] returns, in whole-sequence layouts: `out [B, n, Hq, Dv]`,
/// `lse [B, Hq, n]`, and the gradients `(dq, dk, dv)` when `dout` was given.
pub struct WholeOut {
    pub out: Vec<f32>,
    pub lse: Vec<f32>,
    pub grads: Option<Grads>,
    /// What each rank sent and received (forward and backward together; the agreement check's
    /// few words included).
    pub traffic: Vec<Traffic>,
}

/// Runs `scheme` over `plan` with `plan.world` ranks as threads of this process (the in-process
/// transport, every wait under `timeout`): each rank takes its shard of `x`, runs the forward
/// (and the backward when `x.dout` is given), and the ranks' rows are put back in sequence order.
/// A failing rank's error is returned (one that names its own problem rather than a peer's).
pub fn run_threads(
    scheme: Scheme,
    plan: &Plan,
    mask: &CpMask,
    x: &Whole,
    params: &AttnParams,
    bwd: &BackwardParams,
    timeout: Duration,
) -> Result<WholeOut> {
    check_whole(plan, x)?;
    let parts = on_threads(plan.world, timeout, |t| {
        let part = rank_part(&t, scheme, plan, mask, x, params, bwd)?;
        Ok((part, t.traffic()))
    })?;
    let (parts, traffic): (Vec<RankPart>, Vec<Traffic>) = parts.into_iter().unzip();
    Ok(assemble(plan, x, &parts, traffic))
}

/// Runs `scheme` as one rank of a job whose ranks are processes (`t`, e.g. a
/// [`TcpTransport`](super::launch::TcpTransport) counted): every rank holds the whole `x` (read
/// from the same file) and computes its shard; the other ranks then send their rows and their
/// traffic to rank 0, which puts the rows back in sequence order. Rank 0 returns the whole
/// result, the others `None`.
pub fn run_process<T: Transport>(
    t: &Counted<T>,
    scheme: Scheme,
    plan: &Plan,
    mask: &CpMask,
    x: &Whole,
    params: &AttnParams,
    bwd: &BackwardParams,
) -> Result<Option<WholeOut>> {
    check_whole(plan, x)?;
    if t.world() != plan.world {
        return Err(t.err(format!(
            "the plan is for {} ranks, the job has {}",
            plan.world,
            t.world()
        )));
    }
    // (A scheme that fails tells the peers why itself: `Scheme::forward` / `backward`.)
    let part = rank_part(t, scheme, plan, mask, x, params, bwd)?;
    let (b, _, hq, hk, d, dv) = x.dims;
    // The rows of rank r as f32 buffers, in a fixed order: out, lse, then dq, dk, dv.
    let shapes = |r: usize| -> Vec<usize> {
        let rows = plan.rows_of(r);
        let mut v = vec![b * rows * hq * dv, b * hq * rows];
        if x.dout.is_some() {
            v.extend([b * rows * hq * d, b * rows * hk * d, b * rows * hk * dv]);
        }
        v
    };
    let bytes = |x: &[f32]| -> Vec<u8> { x.iter().flat_map(|v| v.to_le_bytes()).collect() };
    const TAG: u32 = 0xfffe_0000;
    let r = t.rank();
    if r != 0 {
        let mut bufs = vec![&part.0, &part.1];
        if let Some((dq, dk, dv_)) = &part.2 {
            bufs.extend([dq, dk, dv_]);
        }
        for (i, buf) in bufs.into_iter().enumerate() {
            t.send(0, TAG + i as u32, &bytes(buf))?;
        }
        let tr = t.traffic();
        let words: Vec<u8> = [tr.sent, tr.received, tr.messages]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        t.send(0, TAG + 16, &words)?;
        return Ok(None);
    }
    let mut parts = vec![part];
    let mut traffic = vec![t.traffic()];
    for from in 1..plan.world {
        let mut got = Vec::new();
        for (i, n) in shapes(from).into_iter().enumerate() {
            let mut raw = vec![0u8; 4 * n];
            t.recv(from, TAG + i as u32, &mut raw)?;
            got.push(
                raw.chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                    .collect::<Vec<f32>>(),
            );
        }
        let mut words = [0u8; 24];
        t.recv(from, TAG + 16, &mut words)?;
        let w = |i: usize| u64::from_le_bytes(words[8 * i..8 * i + 8].try_into().expect("8 bytes"));
        traffic.push(Traffic {
            sent: w(0),
            received: w(1),
            messages: w(2),
        });
        let mut it = got.into_iter();
        let (o, l) = (it.next().expect("out"), it.next().expect("lse"));
        let g = x.dout.map(|_| {
            (
                it.next().expect("dq"),
                it.next().expect("dk"),
                it.next().expect("dv"),
            )
        });
        parts.push((o, l, g));
    }
    Ok(Some(assemble(plan, x, &parts, traffic)))
}

/// One rank's rows: out, LSE and (with a backward) dq, dk, dv, in the rank's local layout.
type RankPart = (Vec<f32>, Vec<f32>, Option<Grads>);

/// Checks that `x` matches its dims and the plan.
fn check_whole(plan: &Plan, x: &Whole) -> Result<()> {
    let (b, n, hq, hk, d, dv) = x.dims;
    let want = [b * n * hq * d, b * n * hk * d, b * n * hk * dv];
    let got = [x.q.len(), x.k.len(), x.v.len()];
    if got != want || x.dout.is_some_and(|g| g.len() != b * n * hq * dv) || n != plan.n {
        return Err(Error::Param {
            op: "context parallelism",
            msg: format!(
                "q / k / v hold {got:?} values (expected {want:?} for B {b}, n {n}, heads {hq} / {hk}, dims {d} / {dv}), dout {:?}, plan of {} tokens",
                x.dout.map(|g| g.len()),
                plan.n
            ),
        });
    }
    Ok(())
}

/// The work of rank `t.rank()`: its shard of `x`, the scheme's forward and (with `x.dout`) its
/// backward.
fn rank_part(
    t: &dyn Transport,
    scheme: Scheme,
    plan: &Plan,
    mask: &CpMask,
    x: &Whole,
    params: &AttnParams,
    bwd: &BackwardParams,
) -> Result<RankPart> {
    let (b, _, hq, hk, d, dv) = x.dims;
    let r = t.rank();
    let shard = |y: &[f32], h: usize, w: usize| plan.shard(y, b, (h, w), r);
    let (lq, lk, lv) = (shard(x.q, hq, d), shard(x.k, hk, d), shard(x.v, hk, dv));
    let local = LocalQkv {
        q: &lq,
        k: &lk,
        v: &lv,
        dims: (b, plan.rows_of(r), hq, hk, d, dv),
    };
    let cp = Cp { t, plan, mask };
    let (o, l) = scheme.forward(&cp, &local, params)?;
    let grads = match x.dout {
        None => None,
        Some(dout) => {
            let ld = shard(dout, hq, dv);
            let g = GradIn {
                out: &o,
                lse: &l,
                dout: &ld,
                bwd: *bwd,
            };
            Some(scheme.backward(&cp, &local, &g, params)?)
        }
    };
    Ok((o, l, grads))
}

/// The ranks' rows (rank order) put back in sequence order.
fn assemble(plan: &Plan, x: &Whole, parts: &[RankPart], traffic: Vec<Traffic>) -> WholeOut {
    let (b, n, hq, hk, d, dv) = x.dims;
    let mut out = vec![0f32; b * n * hq * dv];
    let mut lse = vec![0f32; b * hq * n];
    let mut grads = x.dout.map(|_| {
        (
            vec![0f32; b * n * hq * d],
            vec![0f32; b * n * hk * d],
            vec![0f32; b * n * hk * dv],
        )
    });
    for (r, (o, l, g)) in parts.iter().enumerate() {
        let rows = plan.rows_of(r);
        let runs: Vec<_> = plan.runs_of(r).into_iter().map(|u| u.rev()).collect();
        let put = |src: &[f32], dst: &mut [f32], l: Rows| {
            copy_rows(
                (src, l.with_rows(rows)),
                (dst, l.with_rows(n)),
                &runs,
                &same_heads(l.h),
                false,
            )
        };
        put(o, &mut out, Rows::new(b, n, hq, dv));
        put(l, &mut lse, Rows::lse(b, hq, n));
        if let (Some((dq, dk, dv_)), Some((gq, gk, gv))) = (g, grads.as_mut()) {
            put(dq, gq, Rows::new(b, n, hq, d));
            put(dk, gk, Rows::new(b, n, hk, d));
            put(dv_, gv, Rows::new(b, n, hk, dv));
        }
    }
    WholeOut {
        out,
        lse,
        grads,
        traffic,
    }
}

/// Whether an error reports another rank's failure rather than naming a problem itself.
/// Runs `f` on every rank of a [`ThreadTransport`] group of `world` ranks, each a thread of this
/// process with its transport counted, and returns the ranks' results in rank order. A rank whose
/// thread panics reports an `Error::Comm`; when ranks fail, the error returned is a rank's own
/// complaint rather than a peer's report of it ([`secondhand`]).
pub(crate) fn on_threads<T: Send>(
    world: usize,
    timeout: Duration,
    f: impl Fn(Counted<ThreadTransport>) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    let group = ThreadTransport::group(world, timeout)?;
    let f = &f;
    let results: Vec<Result<T>> = std::thread::scope(|s| {
        let hs: Vec<_> = group
            .into_iter()
            .map(|t| s.spawn(move || f(Counted::new(t))))
            .collect();
        hs.into_iter()
            .enumerate()
            .map(|(r, h)| {
                h.join().unwrap_or_else(|_| {
                    Err(Error::Comm {
                        rank: r,
                        world,
                        msg: "the rank's thread panicked".into(),
                    })
                })
            })
            .collect()
    });
    let mut parts = Vec::with_capacity(world);
    let mut first_err: Option<Error> = None;
    for res in results {
        match res {
            Ok(x) => parts.push(x),
            // A rank's own complaint beats a peer's report of it ("refused its inputs", "left").
            Err(e) => {
                if first_err
                    .as_ref()
                    .is_none_or(|f| secondhand(f) && !secondhand(&e))
                {
                    first_err = Some(e);
                }
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(parts),
    }
}

pub(crate) fn secondhand(e: &Error) -> bool {
    matches!(e, Error::Comm { msg, .. }
        if msg.contains("refused its inputs") || msg.contains("left the group") || msg.contains("gave up"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mask::{MaskExpr, MaskShape};

    fn mask(expr: &str, n: usize) -> CpMask {
        let b = MaskExpr::parse(expr)
            .unwrap()
            .bind(MaskShape::square(n), None)
            .unwrap();
        CpMask::new(b, 64).unwrap()
    }

    /// The choices the module header describes, at 16k tokens, D = Dv = 128.
    #[test]
    fn cost_model_picks_by_shape_and_mask() {
        let n = 16384;
        let m = CostModel::default();
        let pick = |expr: &str, p: usize, hq: usize, hk: usize| {
            m.choose(&mask(expr, n), p, 2, (1, n, hq, hk, 128, 128))
                .unwrap()
                .0
        };
        // Dense, as many key / value heads as query heads, heads divisible: Ulysses.
        assert_eq!(pick("causal", 4, 32, 32), Scheme::Ulysses);
        assert_eq!(pick("full", 8, 32, 32), Scheme::Ulysses);
        // Heads not divisible: never Ulysses.
        assert_ne!(pick("causal", 3, 32, 32), Scheme::Ulysses);
        // GQA with two key / value heads at four ranks, dense: all-gather.
        assert_eq!(pick("full", 4, 32, 2), Scheme::AllGather);
        // A sliding window: the ring fetches a halo, far less than any other scheme moves.
        assert_eq!(pick("causal & window(512,0)", 4, 32, 2), Scheme::Ring);
        assert_eq!(pick("causal & window(512,0)", 8, 32, 32), Scheme::Ring);
        // One rank: nothing to move, the ring (first of the ties).
        assert_eq!(pick("causal", 1, 32, 2), Scheme::Ring);
        // Every estimate's parts add up as the header says (no overlap by default).
        let mk = mask("causal", n);
        let pl = plan(&mk.sched, 4, 2).unwrap();
        for s in [Scheme::Ring, Scheme::AllGather, Scheme::Ulysses] {
            let e = m.estimate(s, &pl, &mk, (1, n, 32, 8, 128, 128)).unwrap();
            let want = e.compute_s + e.bytes as f64 / m.bytes_per_s + e.rounds as f64 * m.latency;
            assert!((e.total_s - want).abs() <= 1e-12 * want, "{s:?}");
            assert!(e.bytes > 0 && e.compute_s > 0.0, "{s:?}");
        }
        let six = m.estimate(Scheme::Ulysses, &pl, &mk, (1, n, 6, 6, 64, 64));
        assert!(
            six.is_none(),
            "6 query heads over 4 ranks: Ulysses cannot run"
        );
    }

    /// USP in the cost model: `choose_usp` takes the U that moves least for the mask, and
    /// `auto` takes USP where Ulysses cannot split the heads over every rank but can over a
    /// group.
    #[test]
    fn cost_model_picks_usp_degrees() {
        let n = 16384;
        let m = CostModel::default();
        let usp = |expr: &str, p: usize, hq: usize, hk: usize| {
            let dims = (1, n, hq, hk, 128, 128);
            let (s, pl, all) = m.choose_usp(&mask(expr, n), p, 2, dims).unwrap();
            let Scheme::Usp(u) = s else { panic!("{s:?}") };
            assert_eq!(pl.world, p);
            assert_eq!(pl.chunks(), 2 * p, "two pieces of each ring chunk per rank");
            // Every U that divides P and the heads was estimated; the least was taken.
            let us: Vec<usize> = (1..=p)
                .filter(|&u| p.is_multiple_of(u) && hq.is_multiple_of(u))
                .collect();
            assert_eq!(all.len(), us.len());
            let best = all.iter().map(|e| e.total_s).fold(f64::INFINITY, f64::min);
            assert_eq!(all.iter().find(|e| e.scheme == s).unwrap().total_s, best);
            u
        };
        // Dense causal, heads to spare: all-to-all over every rank (Ulysses' end).
        assert_eq!(usp("causal", 8, 32, 32), 8);
        // A sliding window: the ring's halo is cheaper than any all-to-all (the ring's end).
        assert_eq!(usp("causal & window(512,0)", 8, 32, 32), 1);
        // Four heads over eight ranks: Ulysses over four, the ring over two.
        assert_eq!(usp("causal", 8, 4, 4), 4);
        // Heads 6 over P = 6: U = 1, 2, 3, 6 all estimated.
        assert!([1, 2, 3, 6].contains(&usp("full", 6, 6, 2)));
        let auto = |expr: &str, p: usize, hq: usize, hk: usize| {
            let (s, pl, all) = m
                .choose(&mask(expr, n), p, 2, (1, n, hq, hk, 128, 128))
                .unwrap();
            assert!(all.iter().any(|e| matches!(e.scheme, Scheme::Usp(_))));
            assert_eq!(
                pl,
                s.plan(&mask(expr, n), p, 2).unwrap(),
                "{s:?}: its own plan"
            );
            s
        };
        // `auto` weighs the hybrid: where Ulysses cannot take every rank, it takes a group.
        assert_eq!(auto("causal", 8, 4, 4), Scheme::Usp(4));
        assert_eq!(auto("causal", 4, 2, 2), Scheme::Usp(2));
        assert_eq!(auto("causal", 6, 6, 6), Scheme::Ulysses);
    }

    #[test]
    fn scheme_names_round_trip_and_unknown_is_an_error() {
        for s in Scheme::ALL {
            assert_eq!(Scheme::parse(s.name()).unwrap(), s);
        }
        let e = Scheme::parse("spiral").unwrap_err().to_string();
        assert!(
            e.contains("unknown scheme `spiral`") && e.contains("ulysses"),
            "{e}"
        );
        let e = zigzag_plan(&mask("causal", 5), 3).unwrap_err().to_string();
        assert!(e.contains("zigzag cuts 5 tokens into 2P = 6 chunks"), "{e}");
    }
}
