//! `longattn cp run`, `longattn cp bench` and `longattn cp decode`: context parallelism on this
//! machine's CPU cores, ranks as threads.
//!
//! `cp decode` is tree decode: the file contract of `longattn run` with Sq <= Sk (the queries
//! the last positions), the keys and values split over --ranks P ranks (near-equal shards, or
//! the lengths of `--shards 100,0,37`, empty shards allowed), each rank's partial (out, LSE)
//! gathered by every rank and merged by LSE; the output equals single-rank `run`'s.
//!
//! `cp run` has the file contract of `longattn run` (the same input tensors q, k, v, optional
//! q_doc / k_doc and `do` with --backward; the same outputs out, lse, dq, dk, dv in the input
//! dtype): the sequence is placed over --ranks P ranks by the scheme's plan, each rank (a thread)
//! computes its rows through `longattn::cp`, and the rows are written back in sequence order.
//! `--scheme auto` picks by the cost model of `longattn::cp::scheme` and says which and why;
//! `--scheme usp` runs the Ulysses x ring hybrid with the degree U the cost model picks, or the
//! one `--usp U` gives.
//!
//! Attention over one sequence under a mask (`--mask`, default causal): single-rank on one
//! thread (T1) and on every thread (Tall), then P ranks (`--ranks`) of one scheme (`--scheme`:
//! the ring over the mask-aware plan, all-gather of K / V, Ulysses, pass-Q or USP;
//! `longattn::cp`), each
//! rank a thread running its blocks on a one-thread pool, exchanging data through the in-process
//! transport (TP, the slowest rank between two barriers). Prints the plan's scheduled work per
//! rank (max / mean), T1, Tall, TP, the speedup T1 / TP, the scaling efficiency T1 / (P TP),
//! each rank's compute time, and the largest difference of the output from single-rank's
//! (checked: it must stay below 1e-4).
use crate::bench::median;
use crate::common::{check_finite, fmt_len, parse_len, pool};
use crate::maskglue::{bind_input_mask, bind_mask, equal_docs, TILE};
use anyhow::{bail, Context, Result};
use longattn::attention::{forward, AttnParams, MaskSpec};
use longattn::cp::{self, CostModel, Cp, CpMask, LocalQkv, Plan, ThreadTransport, Transport};
use longattn::testing::Rng;
use longattn::TensorView;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(clap::Subcommand, Debug)]
pub enum Cmd {
    /// Attention over the tensors of a safetensors file (the contract of `longattn run`) with the
    /// sequence split over ranks.
    Run(RunArgs),
    /// Scaling of a context-parallel scheme with ranks as threads on this CPU.
    Bench(BenchArgs),
    /// Tree decode: the keys and values of the input sharded over ranks, every rank's partial
    /// (out, LSE) gathered and merged (`longattn::cp::tree`); writes what `longattn run` writes.
    Decode(DecodeArgs),
    /// NCCL on this machine's GPUs: the library loads, a communicator of the launched job (a world
    /// of one without a launcher) initialises, and its send / receive, all-gather, all-to-all
    /// and all-reduce give what the host computes. Prints PASS / FAIL lines.
    NcclCheck(NcclCheckArgs),
    /// The one-GPU loopback: P ranks as streams of one GPU, the ring pass-KV forward (zigzag
    /// placement) through the CUDA kernel with device-to-device copies overlapped with the
    /// compute, against the single-GPU forward (and the f64 oracle on a small case). Prints
    /// PASS / FAIL lines and per-step timings.
    LoopbackCheck(crate::cp_loopback::LoopbackArgs),
}

#[derive(clap::Args, Debug)]
pub struct NcclCheckArgs {
    /// Values per rank in each collective.
    #[arg(long, default_value_t = 4099)]
    len: usize,
    /// Seconds a rank waits for the others (rendezvous, the unique id's exchange, NCCL's init
    /// and each wait for the collectives).
    #[arg(long, default_value_t = 60.0)]
    timeout: f64,
    /// Seconds of the fault check a world of one runs after the collectives: a second rank that
    /// takes the unique id but never enters NCCL's init must cost rank 0 an error naming it
    /// after this timeout, not a hang (0 skips the check).
    #[arg(long, default_value_t = 3.0)]
    fault_timeout: f64,
}

/// A context-parallel scheme.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// Ring pass-KV over the mask-aware plan (zigzag for causal).
    Ring,
    /// Ring pass-KV over the fixed zigzag placement (2P equal chunks), whatever the mask.
    Zigzag,
    /// All-gather of K / V.
    Allgather,
    /// All-to-all over heads (the query heads must be a multiple of the ranks).
    Ulysses,
    /// Pass-Q: K / V stay, the queries travel and their partial results come back.
    Passq,
    /// Ulysses inside groups of U ranks, the ring across the P / U groups; U by the cost model
    /// unless --usp gives it.
    Usp,
    /// The least estimated time of ring, all-gather, Ulysses, pass-Q and USP
    /// (`longattn::cp::scheme`).
    Auto,
}

/// How the ranks exchange data.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportArg {
    /// Ranks as threads of this process (in-memory channels).
    Threads,
    /// Ranks as processes (this one is one of them), over TCP: joins from torchrun's
    /// environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), e.g.
    /// `torchrun --no-python --nproc-per-node=4 longattn cp run ... --transport tcp`.
    Tcp,
    /// Ranks as streams of one GPU exchanging by device copies.
    Loopback,
    /// Ranks as processes on GPUs, through NCCL.
    Nccl,
}

impl Scheme {
    /// The library's scheme and its plan; `auto` asks the cost model, and so does `usp` for
    /// its degree U unless `usp` (--usp) forces it (the estimates returned for the report).
    fn resolve(
        self,
        usp: Option<usize>,
        mask: &CpMask,
        p: usize,
        per_rank: usize,
        dims: cp::scheme::Dims,
    ) -> Result<(cp::Scheme, Plan, Vec<cp::Estimate>)> {
        let model = CostModel::default();
        let s = match (self, usp) {
            (Scheme::Usp | Scheme::Auto, Some(u)) => {
                if u == 0 || !p.is_multiple_of(u) {
                    bail!("--usp {u}: the Ulysses degree U must divide the {p} ranks (P = U x R)");
                }
                cp::Scheme::Usp(u)
            }
            (_, Some(u)) => bail!(
                "--usp {u} sets USP's Ulysses degree: it goes with --scheme usp (or auto), not {}",
                format!("{self:?}").to_lowercase()
            ),
            (Scheme::Usp, None) => return Ok(model.choose_usp(mask, p, per_rank, dims)?),
            (Scheme::Auto, None) => return Ok(model.choose(mask, p, per_rank, dims)?),
            (Scheme::Ring, None) => cp::Scheme::Ring,
            (Scheme::Zigzag, None) => cp::Scheme::Zigzag,
            (Scheme::Allgather, None) => cp::Scheme::AllGather,
            (Scheme::Ulysses, None) => cp::Scheme::Ulysses,
            (Scheme::Passq, None) => cp::Scheme::PassQ,
        };
        Ok((s, s.plan(mask, p, per_rank)?, Vec::new()))
    }
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Input file with q [B,S,Hq,D], k [B,S,Hk,D], v [B,S,Hk,Dv] (f32/bf16/f16; one sequence
    /// length for queries and keys) and optional i32 q_doc, k_doc [B,S].
    #[arg(long)]
    input: PathBuf,
    /// Mask expression, e.g. `causal & window(1024,0)`.
    #[arg(long, default_value = "full")]
    mask: String,
    /// Output file: out [B,S,Hq,Dv] (input dtype) and lse [B,Hq,S] (f32); with --backward also
    /// dq, dk, dv.
    #[arg(long)]
    output: PathBuf,
    /// Overwrite the output file if it exists.
    #[arg(long)]
    force: bool,
    /// Also run the backward pass: reads `do` [B,S,Hq,Dv] from the input file.
    #[arg(long)]
    backward: bool,
    #[arg(long, value_enum, default_value_t = Scheme::Auto)]
    scheme: Scheme,
    /// USP's Ulysses degree U (a divisor of the ranks and the query heads): forces it instead
    /// of the cost model's choice (with --scheme usp or auto).
    #[arg(long)]
    usp: Option<usize>,
    /// Ranks P (>= 1); with `--transport tcp` the job's WORLD_SIZE (given or not).
    #[arg(long)]
    ranks: Option<usize>,
    #[arg(long, value_enum, default_value_t = TransportArg::Threads)]
    transport: TransportArg,
    /// Chunks per rank of the mask-aware plan (2 gives zigzag for causal).
    #[arg(long, default_value_t = 2)]
    chunks_per_rank: usize,
    /// Multiplier of q.k (default 1/sqrt(D)).
    #[arg(long)]
    scale: Option<f32>,
    /// Logit soft-cap c: s -> c * tanh(s / c).
    #[arg(long)]
    softcap: Option<f32>,
    /// Seconds a rank waits for a peer before it reports it.
    #[arg(long, default_value_t = 60.0)]
    timeout: f64,
    /// Compute even if q/k/v (and do) hold NaN or Inf.
    #[arg(long)]
    allow_nonfinite: bool,
}

#[derive(clap::Args, Debug)]
pub struct DecodeArgs {
    /// Input file with q [B,Sq,Hq,D] (the new queries, Sq <= Sk: the last positions),
    /// k [B,Sk,Hk,D], v [B,Sk,Hk,Dv] (f32/bf16/f16) and optional i32 q_doc [B,Sq], k_doc [B,Sk].
    #[arg(long)]
    input: PathBuf,
    /// Mask expression (queries aligned bottom-right), e.g. `causal & window(1024,0)`.
    #[arg(long, default_value = "full")]
    mask: String,
    /// Output file: out [B,Sq,Hq,Dv] (input dtype) and lse [B,Hq,Sq] (f32).
    #[arg(long)]
    output: PathBuf,
    /// Overwrite the output file if it exists.
    #[arg(long)]
    force: bool,
    /// Ranks P (>= 1); the keys are split into P near-equal shards unless --shards says.
    #[arg(long)]
    ranks: usize,
    /// The keys of each rank, comma-separated (P lengths adding up to Sk; 0 for an empty
    /// shard), e.g. `100,0,37`.
    #[arg(long)]
    shards: Option<String>,
    /// Multiplier of q.k (default 1/sqrt(D)).
    #[arg(long)]
    scale: Option<f32>,
    /// Logit soft-cap c: s -> c * tanh(s / c).
    #[arg(long)]
    softcap: Option<f32>,
    /// Seconds a rank waits for a peer before it reports it.
    #[arg(long, default_value_t = 60.0)]
    timeout: f64,
    /// Compute even if q/k/v hold NaN or Inf.
    #[arg(long)]
    allow_nonfinite: bool,
}

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Sequence length (e.g. 16k); at least ranks x chunks per rank.
    #[arg(long, default_value = "16k")]
    len: String,
    /// Ranks (threads).
    #[arg(long, default_value_t = 2)]
    ranks: usize,
    #[arg(long, value_enum, default_value_t = Scheme::Ring)]
    scheme: Scheme,
    /// USP's Ulysses degree U (with --scheme usp; the cost model's otherwise).
    #[arg(long)]
    usp: Option<usize>,
    /// Mask expression (docs/MASKS.md).
    #[arg(long, default_value = "causal")]
    mask: String,
    /// For `document` masks: split the sequence into this many equal documents.
    #[arg(long)]
    docs: Option<usize>,
    /// Chunks per rank of the plan (2 gives zigzag for causal).
    #[arg(long, default_value_t = 2)]
    chunks_per_rank: usize,
    #[arg(long, default_value_t = 8)]
    heads: usize,
    #[arg(long)]
    kv_heads: Option<usize>,
    #[arg(long, default_value_t = 64)]
    dim: usize,
    /// Timed repetitions of each configuration (the median is reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

pub fn main(a: Args) -> Result<()> {
    match a.cmd {
        Cmd::Run(r) => run(r),
        Cmd::Bench(b) => bench(b),
        Cmd::Decode(d) => decode(d),
        Cmd::NcclCheck(c) => nccl_check(c),
        Cmd::LoopbackCheck(c) => crate::cp_loopback::main(c),
    }
}

/// The variable that marks a process started again by [`nccl_ready`] (read and removed at once,
/// so that programs this one starts do not inherit it).
const NCCL_RESTARTED: &str = "LONGATTN_NCCL_RESTARTED";

/// NCCL ready in this process: its version. When the library was found at a file that cudarc
/// opens only through a `libnccl.so` link (`longattn::cp::nccl`), the process starts itself
/// again, once, with the link's folder first on LD_LIBRARY_PATH (the dynamic loader reads the
/// variable at start only). It cannot loop: the restarted process carries a mark, and a marked
/// process that would need another restart fails with the reason instead.
fn nccl_ready() -> Result<i32> {
    use longattn::cp::nccl::{prepare, Loaded};
    let restarted = std::env::var_os(NCCL_RESTARTED).is_some();
    // SAFETY (edition 2021, safe): called on the main thread before any other thread runs.
    std::env::remove_var(NCCL_RESTARTED);
    match prepare()? {
        Loaded::Ready { version } => Ok(version),
        Loaded::Restart { dir, file } => {
            if restarted {
                bail!(
                    "NCCL at {} still does not load by name with {} (holding the link libnccl.so) first on LD_LIBRARY_PATH",
                    file.display(),
                    dir.display()
                );
            }
            eprintln!(
                "NCCL at {}: starting again with {} (the link libnccl.so) first on LD_LIBRARY_PATH",
                file.display(),
                dir.display()
            );
            let mut ld = dir.into_os_string();
            if let Some(old) = std::env::var_os("LD_LIBRARY_PATH").filter(|o| !o.is_empty()) {
                ld.push(":");
                ld.push(old);
            }
            let exe = std::env::current_exe().context("the path of this program")?;
            use std::os::unix::process::CommandExt;
            // exec keeps the process id (a launcher such as torchrun keeps watching it).
            let e = std::process::Command::new(&exe)
                .args(std::env::args_os().skip(1))
                .env("LD_LIBRARY_PATH", ld)
                .env(NCCL_RESTARTED, "1")
                .exec();
            bail!("starting {} again: {e}", exe.display())
        }
    }
}

fn nccl_check(a: NcclCheckArgs) -> Result<()> {
    use longattn::cp::nccl::NcclComm;
    if !(a.timeout.is_finite() && a.timeout > 0.0) {
        bail!(
            "--timeout {}: expected a positive number of seconds",
            a.timeout
        );
    }
    if a.len == 0 {
        bail!("--len 0: the collectives need at least one value");
    }
    let timeout = Duration::from_secs_f64(a.timeout);
    let version = nccl_ready()?;
    // A launched job, or a world of one.
    let job = match std::env::var_os("RANK") {
        Some(_) => cp::Job::from_env()?,
        None => cp::Job {
            rank: 0,
            world: 1,
            local_rank: 0,
            master: "127.0.0.1:0".into(),
        },
    };
    let (r, p, n) = (job.rank, job.world, a.len);
    println!("PASS rank {r} of {p}: nccl loads (version {version})");
    let dev = longattn::cuda::CudaDevice::open(job.local_rank)
        .with_context(|| format!("rank {r}: GPU {} (LOCAL_RANK)", job.local_rank))?;
    let stream = dev.stream().clone();
    let fp = fingerprint(&[format!("nccl-check {n}")]);
    let t = cp::join(&job, fp, timeout)?;
    let comm = NcclComm::new(stream.clone(), &t, timeout)?;
    println!(
        "PASS rank {r} of {p}: nccl communicator on GPU {} ({})",
        job.local_rank, dev.name
    );
    let cu = longattn::cuda::drv("nccl-check");
    // Values exact in f32 and their sums too: multiples of 1/4 below 2^20.
    let x = |s: usize| -> Vec<f32> {
        (0..n)
            .map(|i| (s + 1) as f32 * 0.5 + (i % 97) as f32 * 0.25)
            .collect()
    };
    let mut failed = 0;
    let mut report = |what: &str, got: &[f32], want: &[f32]| {
        let worst = got
            .iter()
            .zip(want)
            .map(|(g, w)| (g - w).abs())
            .fold(0f32, f32::max);
        if got.len() == want.len() && worst == 0.0 {
            println!("PASS rank {r} of {p}: nccl {what} ({} values)", want.len());
        } else {
            failed += 1;
            println!(
                "FAIL rank {r} of {p}: nccl {what}: {} values, expected {}, largest difference {worst}",
                got.len(),
                want.len()
            );
        }
    };
    // all-reduce
    let dx = stream.clone_htod(&x(r)).map_err(&cu)?;
    let mut out = stream.alloc_zeros::<f32>(n).map_err(&cu)?;
    comm.all_reduce_sum(&dx, &mut out)?;
    let want: Vec<f32> = (0..n).map(|i| (0..p).map(|s| x(s)[i]).sum()).collect();
    report("all-reduce", &stream.clone_dtoh(&out).map_err(&cu)?, &want);
    // all-gather
    let mut all = stream.alloc_zeros::<f32>(p * n).map_err(&cu)?;
    comm.all_gather(&dx, &mut all)?;
    let want: Vec<f32> = (0..p).flat_map(x).collect();
    report("all-gather", &stream.clone_dtoh(&all).map_err(&cu)?, &want);
    // all-to-all: chunk j of rank s holds s * 1000 + j * 10 + (i % 7)
    let chunk = |s: usize, j: usize| -> Vec<f32> {
        (0..n).map(|i| (s * 1000 + j * 10 + i % 7) as f32).collect()
    };
    let send: Vec<f32> = (0..p).flat_map(|j| chunk(r, j)).collect();
    let dsend = stream.clone_htod(&send).map_err(&cu)?;
    let mut drecv = stream.alloc_zeros::<f32>(p * n).map_err(&cu)?;
    comm.all_to_all(&dsend, &mut drecv)?;
    let want: Vec<f32> = (0..p).flat_map(|s| chunk(s, r)).collect();
    report(
        "all-to-all",
        &stream.clone_dtoh(&drecv).map_err(&cu)?,
        &want,
    );
    // send / receive around the ring (two ranks or more)
    if p > 1 {
        let (next, prev) = ((r + 1) % p, (r + p - 1) % p);
        let mut got = stream.alloc_zeros::<f32>(n).map_err(&cu)?;
        comm.send_recv(&dx, next, &mut got, prev)?;
        report(
            "send / receive ring",
            &stream.clone_dtoh(&got).map_err(&cu)?,
            &x(prev),
        );
    }
    comm.wait("the checks' collectives")?;
    // Every rank done before any leaves (the host transport).
    t.barrier()?;
    drop(comm);
    if p == 1 && a.fault_timeout > 0.0 {
        failed += nccl_absent_peer(&dev, a.fault_timeout)?;
    }
    if failed > 0 {
        bail!("rank {r} of {p}: {failed} NCCL check(s) failed");
    }
    Ok(())
}

/// The fault check of a world of one: two ranks as threads of this process over the threads
/// transport, rank 1 takes the unique id and never enters NCCL's init (a rank that stalls or
/// died after the rendezvous). Rank 0's init must fail within the timeout (and some slack for
/// the abort) with an error that says what did not complete. Returns the failures (0 or 1).
fn nccl_absent_peer(dev: &longattn::cuda::CudaDevice, secs: f64) -> Result<usize> {
    use longattn::cp::nccl::{NcclComm, ID_BYTES, ID_TAG};
    use longattn::cp::transport::{ThreadTransport, Transport};
    let timeout = Duration::from_secs_f64(secs);
    let mut ranks = ThreadTransport::group(2, timeout + Duration::from_secs(30))?.into_iter();
    let (t0, t1) = (ranks.next().expect("rank 0"), ranks.next().expect("rank 1"));
    let stream = dev.stream().clone();
    let absent = std::thread::spawn(move || {
        let mut id = vec![0u8; ID_BYTES];
        let got = t1.recv(0, ID_TAG, &mut id);
        // Hold the id (and the transport) until rank 0 has given up: rank 0's abort message.
        let mut why = vec![0u8; 0];
        let _ = t1.recv(0, longattn::cp::transport::ABORT_TAG, &mut why);
        got
    });
    let start = std::time::Instant::now();
    let res = NcclComm::new(stream, &t0, timeout);
    let took = start.elapsed().as_secs_f64();
    drop(t0);
    let _ = absent.join();
    let slack = 10.0;
    Ok(match res {
        Err(e) if took <= secs + slack && e.to_string().contains("communicator init") => {
            println!(
                "PASS rank 0 of 1: a second rank that never enters NCCL's init: error after {took:.2} s (timeout {secs} s): {e}"
            );
            0
        }
        Err(e) => {
            println!(
                "FAIL rank 0 of 1: a second rank that never enters NCCL's init: after {took:.2} s (timeout {secs} s, slack {slack} s): {e}"
            );
            1
        }
        Ok(_) => {
            println!(
                "FAIL rank 0 of 1: NCCL's init of two ranks completed after {took:.2} s with the second rank absent"
            );
            1
        }
    })
}

/// The shard bounds of `sk` keys over `p` ranks: `--shards` lengths, or near-equal shards.
fn shard_bounds(shards: Option<&str>, p: usize, sk: usize) -> Result<Vec<usize>> {
    let lens: Vec<usize> = match shards {
        None => (0..p).map(|r| (r + 1) * sk / p - r * sk / p).collect(),
        Some(text) => text
            .split(',')
            .map(|x| {
                x.trim()
                    .parse()
                    .with_context(|| format!("--shards `{text}`: `{x}` is not a length"))
            })
            .collect::<Result<_>>()?,
    };
    let total: usize = lens.iter().sum();
    if lens.len() != p || total != sk {
        bail!(
            "--shards gives {} ranks {} keys; expected --ranks {p} shards adding up to the {sk} keys",
            lens.len(),
            total
        );
    }
    Ok(std::iter::once(0)
        .chain(lens.iter().scan(0, |acc, &l| {
            *acc += l;
            Some(*acc)
        }))
        .collect())
}

/// The checks `cp run` and `cp decode` share, then the input file: a positive timeout, no output
/// overwritten without `--force`, finite inputs (unless allowed), no `block_mask` (`op` takes a
/// mask expression).
fn read_checked(
    input: &std::path::Path,
    output: &std::path::Path,
    timeout: f64,
    force: bool,
    allow_nonfinite: bool,
    op: &str,
) -> Result<longattn::io::Inputs> {
    if !(timeout.is_finite() && timeout > 0.0) {
        bail!("--timeout {timeout}: expected a positive number of seconds");
    }
    if output.exists() && !force {
        bail!(
            "{}: output file already exists (pass --force to overwrite it)",
            output.display()
        );
    }
    let inputs = longattn::io::read_inputs(input)?;
    if !allow_nonfinite {
        check_finite(&inputs).with_context(|| format!("{}", input.display()))?;
    }
    if inputs.block_mask.is_some() {
        bail!(
            "{}: the file holds a `block_mask`; {op} takes a mask expression (--mask) only",
            input.display()
        );
    }
    Ok(inputs)
}

fn decode(a: DecodeArgs) -> Result<()> {
    if a.ranks == 0 {
        bail!("--ranks 0: tree decode needs at least one rank");
    }
    let inputs = read_checked(
        &a.input,
        &a.output,
        a.timeout,
        a.force,
        a.allow_nonfinite,
        "cp decode",
    )?;
    let dims = inputs.dims()?;
    let (b, sq, sk, hq, hk, d, dv) = (
        dims.batch, dims.sq, dims.sk, dims.hq, dims.hk, dims.d, dims.dv,
    );
    if sq > sk {
        bail!(
            "{}: q has {sq} tokens and k / v {sk}: decode queries are the last positions of the keys (Sq <= Sk)",
            a.input.display()
        );
    }
    let bounds = shard_bounds(a.shards.as_deref(), a.ranks, sk)?;
    let docs = inputs.q_doc.clone().zip(inputs.k_doc.clone());
    let bound =
        bind_mask(&a.mask, b, sq, sk, docs).with_context(|| format!("--mask `{}`", a.mask))?;
    let mask = CpMask::new(bound, TILE)?;
    let (q, k, v) = (
        inputs.q.data.to_f32_vec(),
        inputs.k.data.to_f32_vec(),
        inputs.v.data.to_f32_vec(),
    );
    let params = AttnParams {
        scale: a.scale,
        softcap: a.softcap,
        isa: None,
        skip_below: None,
    };
    let t0 = Instant::now();
    let res = cp::tree_decode_threads(
        &mask,
        (&q, &k, &v),
        (b, sq, sk, hq, hk, d, dv),
        &bounds,
        &params,
        Duration::from_secs_f64(a.timeout),
    )?;
    let secs = t0.elapsed().as_secs_f64();
    let recv: Vec<String> = res.traffic.iter().map(|x| x.received.to_string()).collect();
    eprintln!("bytes received per rank: {}", recv.join(" "));
    let dtype = inputs.dtype();
    let out = longattn::Tensor::new(
        longattn::tensor::Buffer::from_f32(dtype, &res.out),
        vec![b, sq, hq, dv],
    )?;
    longattn::io::write_outputs(&a.output, &out, &res.lse, [b, hq, sq], a.force)?;
    let lens: Vec<String> = bounds
        .windows(2)
        .map(|w| (w[1] - w[0]).to_string())
        .collect();
    eprintln!(
        "{}: B {b} Sq {sq} Sk {sk} Hq {hq} Hk {hk} D {d} Dv {dv} {dtype} mask `{}`: tree decode over {} ranks (threads), keys per rank {}: {:.3} ms -> {}",
        a.input.display(),
        mask.bound.expr(),
        a.ranks,
        lens.join(","),
        secs * 1e3,
        a.output.display()
    );
    Ok(())
}

fn run(a: RunArgs) -> Result<()> {
    let job = match a.transport {
        TransportArg::Threads => None,
        TransportArg::Tcp => Some(cp::Job::from_env()?),
        TransportArg::Loopback => return run_loopback(a),
        TransportArg::Nccl => {
            let name = format!("{:?}", a.transport).to_lowercase();
            bail!("--transport {name}: not built yet for the schemes, which run on host buffers (`threads` runs ranks as threads of this process, `tcp` as processes, `loopback` as streams of one GPU; `longattn cp nccl-check` checks NCCL's communicator on the GPUs)");
        }
    };
    let ranks = match (&job, a.ranks) {
        (None, Some(p)) => p,
        (None, None) => bail!("--ranks P is needed with --transport threads"),
        (Some(j), None) => j.world,
        (Some(j), Some(p)) if p == j.world => p,
        (Some(j), Some(p)) => bail!(
            "--ranks {p} but the job has WORLD_SIZE={} processes (leave --ranks out with --transport tcp)",
            j.world
        ),
    };
    if ranks == 0 {
        bail!("--ranks 0: context parallelism needs at least one rank");
    }
    // With processes only rank 0 writes the output (and checks that it may).
    let writer = job.as_ref().is_none_or(|j| j.rank == 0);
    if a.chunks_per_rank == 0 {
        bail!("--chunks-per-rank 0: every rank needs at least one chunk");
    }
    let inputs = read_checked(
        &a.input,
        &a.output,
        a.timeout,
        a.force || !writer,
        a.allow_nonfinite,
        "cp run",
    )?;
    let dims = inputs.dims()?;
    if dims.sq != dims.sk {
        bail!(
            "{}: q has {} tokens and k / v {}: context parallelism splits one sequence, queries and keys alike (Sq = Sk)",
            a.input.display(),
            dims.sq,
            dims.sk
        );
    }
    let bound = bind_input_mask(&a.mask, &inputs, &a.input)?;
    let dout = match a.backward {
        false => None,
        true => {
            let t = longattn::io::read_dout(&a.input, &inputs)?;
            if !a.allow_nonfinite {
                if let Some((index, value)) = t.view("do")?.find_non_finite() {
                    bail!(
                        "{}: tensor `do` holds a non-finite value ({value}) at flat index {index} (pass --allow-nonfinite to compute anyway)",
                        a.input.display()
                    );
                }
            }
            Some(t.data.to_f32_vec())
        }
    };
    let (b, n, hq, hk, d, dv) = (dims.batch, dims.sq, dims.hq, dims.hk, dims.d, dims.dv);
    let mask = CpMask::new(bound, TILE)?;
    let (scheme, plan, estimates) = a
        .scheme
        .resolve(
            a.usp,
            &mask,
            ranks,
            a.chunks_per_rank,
            (b, n, hq, hk, d, dv),
        )
        .with_context(|| {
            let name = format!("{:?}", a.scheme).to_lowercase();
            format!("--scheme {name} over --ranks {ranks}")
        })?;
    for e in &estimates {
        eprintln!(
            "cost model: {:<9} compute {:.3} ms, receives {} bytes in {} rounds, estimate {:.3} ms",
            e.scheme.label(),
            e.compute_s * 1e3,
            e.bytes,
            e.rounds,
            e.total_s * 1e3
        );
    }
    let (q, k, v) = (
        inputs.q.data.to_f32_vec(),
        inputs.k.data.to_f32_vec(),
        inputs.v.data.to_f32_vec(),
    );
    let whole = cp::Whole {
        q: &q,
        k: &k,
        v: &v,
        dout: dout.as_deref(),
        dims: (b, n, hq, hk, d, dv),
    };
    let params = AttnParams {
        scale: a.scale,
        softcap: a.softcap,
        isa: None,
        skip_below: None,
    };
    let bwd = longattn::BackwardParams {
        deterministic: true,
        ..Default::default()
    };
    let timeout = Duration::from_secs_f64(a.timeout);
    let t0 = Instant::now();
    let res = match &job {
        None => cp::run_threads(scheme, &plan, &mask, &whole, &params, &bwd, timeout)?,
        Some(j) => {
            // What every rank must agree on: the shapes, the data, the mask, the scheme and its
            // plan, the options.
            let fp = fingerprint(&[
                format!(
                    "{:?} {} {:?} {:?}",
                    whole.dims,
                    mask.bound.expr(),
                    scheme,
                    plan.chunks()
                ),
                format!(
                    "{:?} {:?} {} {}",
                    a.scale, a.softcap, a.backward, a.chunks_per_rank
                ),
            ])
            .wrapping_add(data_hash(&[&q, &k, &v, dout.as_deref().unwrap_or(&[])]));
            let t = cp::Counted::new(cp::join(j, fp, timeout)?);
            match cp::run_process(&t, scheme, &plan, &mask, &whole, &params, &bwd)? {
                Some(res) => res,
                None => {
                    eprintln!(
                        "rank {} of {}: done in {:.3} ms (rank 0 writes the output)",
                        j.rank,
                        j.world,
                        t0.elapsed().as_secs_f64() * 1e3
                    );
                    return Ok(());
                }
            }
        }
    };
    let secs = t0.elapsed().as_secs_f64();
    let recv: Vec<String> = res.traffic.iter().map(|x| x.received.to_string()).collect();
    eprintln!("bytes received per rank: {}", recv.join(" "));
    let dtype = inputs.dtype();
    let tensor = |x: &[f32], shape: Vec<usize>| {
        longattn::Tensor::new(longattn::tensor::Buffer::from_f32(dtype, x), shape)
    };
    let out = tensor(&res.out, vec![b, n, hq, dv])?;
    let lse_shape = [b, hq, n];
    match &res.grads {
        None => longattn::io::write_outputs(&a.output, &out, &res.lse, lse_shape, a.force)?,
        Some((dq, dk, dv_)) => {
            let grads = longattn::backward::Grads {
                dq: tensor(dq, vec![b, n, hq, d])?,
                dk: tensor(dk, vec![b, n, hk, d])?,
                dv: tensor(dv_, vec![b, n, hk, dv])?,
            };
            longattn::io::write_backward_outputs(
                &a.output, &out, &res.lse, lse_shape, &grads, a.force,
            )?;
        }
    }
    eprintln!(
        "{}: B {b} S {n} Hq {hq} Hk {hk} D {d} Dv {dv} {dtype} mask `{}`: {} over {} ranks ({}), {} chunks, work max / mean {:.3}: {:.3} ms{} -> {}",
        a.input.display(),
        mask.bound.expr(),
        scheme.label(),
        plan.world,
        if job.is_some() { "processes, tcp" } else { "threads" },
        plan.chunks(),
        plan.imbalance(),
        secs * 1e3,
        if a.backward { " (forward + backward)" } else { "" },
        a.output.display()
    );
    Ok(())
}

/// `cp run --transport loopback`: the ranks as streams of GPU 0, the ring pass-KV forward over
/// the zigzag placement (`longattn::cp::loopback`), causal or full masks, bf16 / f16 inputs;
/// writes what `run` writes (the output merged in f32, rounded to the input dtype once).
fn run_loopback(a: RunArgs) -> Result<()> {
    let p = match a.ranks {
        Some(0) | None => {
            bail!("--transport loopback needs --ranks P (>= 1): the streams of the GPU")
        }
        Some(p) => p,
    };
    if a.backward {
        bail!(
            "--transport loopback runs the forward only (the loopback backward is not built yet)"
        );
    }
    if !matches!(a.scheme, Scheme::Ring | Scheme::Zigzag | Scheme::Auto) || a.usp.is_some() {
        bail!("--transport loopback runs the ring over the zigzag placement (--scheme ring, zigzag or auto)");
    }
    let inputs = read_checked(
        &a.input,
        &a.output,
        a.timeout,
        a.force,
        a.allow_nonfinite,
        "cp run",
    )?;
    let dims = inputs.dims()?;
    let (b, n, hq, d) = (dims.batch, dims.sq, dims.hq, dims.d);
    let bound = bind_input_mask(&a.mask, &inputs, &a.input)?;
    let causal = match bound.expr().to_string().as_str() {
        "causal" => true,
        "full" => false,
        other => bail!(
            "--mask `{other}`: --transport loopback runs the causal and full masks (other masks run with --transport threads or tcp)"
        ),
    };
    let dtype = inputs.dtype();
    if !matches!(dtype, longattn::DType::BF16 | longattn::DType::F16) {
        bail!(
            "{}: dtype {dtype}: --transport loopback runs the CUDA kernels, which take bf16 or f16",
            a.input.display()
        );
    }
    if dims.sq != dims.sk {
        bail!(
            "{}: q has {} tokens and k / v {}: the ring splits one sequence (Sq = Sk)",
            a.input.display(),
            dims.sq,
            dims.sk
        );
    }
    let dev = longattn::cuda::CudaDevice::open(0).context("--transport loopback")?;
    let mask = CpMask::new(bound, TILE)?;
    let plan = cp::zigzag_plan(&mask, p)?;
    let params = AttnParams {
        scale: a.scale,
        softcap: a.softcap,
        isa: None,
        skip_below: None,
    };
    let (q, k, v) = (
        inputs.q.view("q")?,
        inputs.k.view("k")?,
        inputs.v.view("v")?,
    );
    let res = cp::loopback::run_device(&dev, &plan, causal, (&q, &k, &v), &params, 1)?;
    let out = longattn::Tensor::new(
        longattn::tensor::Buffer::from_f32(dtype, &res.out),
        vec![b, n, hq, d],
    )?;
    longattn::io::write_outputs(&a.output, &out, &res.lse, [b, hq, n], a.force)?;
    eprintln!(
        "{}: B {b} S {n} Hq {hq} Hk {} D {d} {dtype} mask `{}`: ring over {p} ranks (streams of {}), {} blocks: {:.3} ms on the device -> {}",
        a.input.display(),
        dims.hk,
        mask.bound.expr(),
        dev.name,
        res.blocks,
        res.total_ms,
        a.output.display()
    );
    Ok(())
}

/// FNV-1a over strings: a job's description as one number.
fn fingerprint(parts: &[String]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for p in parts {
        for &b in p.as_bytes().iter().chain([0u8].iter()) {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// FNV-1a over the bits of f32 buffers (the ranks read the same file: the same numbers).
fn data_hash(bufs: &[&[f32]]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in bufs {
        for x in b.iter() {
            h = (h ^ x.to_bits() as u64).wrapping_mul(0x0100_0000_01b3);
        }
        h = (h ^ b.len() as u64).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn bench(a: BenchArgs) -> Result<()> {
    let n = parse_len(&a.len).with_context(|| format!("--len `{}`: not a length", a.len))?;
    let (p, h, d) = (a.ranks, a.heads, a.dim);
    let hk = a.kv_heads.unwrap_or(h);
    if p == 0 || a.reps == 0 || h == 0 || d == 0 || hk == 0 || h % hk != 0 {
        bail!("--ranks, --reps, --heads, --dim must be >= 1 and --kv-heads divide --heads");
    }
    let docs = match a.docs {
        Some(0) => bail!("--docs must be >= 1"),
        Some(k) => Some((equal_docs(1, n, k), equal_docs(1, n, k))),
        None => None,
    };
    let bound =
        bind_mask(&a.mask, 1, n, n, docs).with_context(|| format!("--mask `{}`", a.mask))?;
    let gen = |seed: u64, len: usize| -> Vec<f32> {
        let mut r = Rng::new(seed);
        (0..len).map(|_| r.normal() as f32).collect()
    };
    let (q, k, v) = (gen(1, n * h * d), gen(2, n * hk * d), gen(3, n * hk * d));
    let params = AttnParams::default();
    let single = || -> Result<(Vec<f32>, f64)> {
        let t0 = Instant::now();
        let o = forward(
            &TensorView::contiguous(&q[..], [1, n, h, d])?,
            &TensorView::contiguous(&k[..], [1, n, hk, d])?,
            &TensorView::contiguous(&v[..], [1, n, hk, d])?,
            &params,
            MaskSpec::Expr(&bound),
        )?;
        Ok((o.out.data.to_f32_vec(), t0.elapsed().as_secs_f64()))
    };
    let one = pool(Some(1))?;
    let all = pool(None)?;
    let mut want = Vec::new();
    let mut t1 = Vec::new();
    let mut tall = Vec::new();
    for _ in 0..a.reps {
        let (o, t) = one.install(single)?;
        t1.push(t);
        want = o;
        tall.push(all.install(single)?.1);
    }
    let (t1, tall) = (median(t1), median(tall));

    let mask = CpMask::new(bound.clone(), TILE)?;
    let (scheme, plan, _) =
        a.scheme
            .resolve(a.usp, &mask, p, a.chunks_per_rank, (1, n, h, hk, d, d))?;
    let run = |cp: &Cp, x: &LocalQkv, prm: &AttnParams| scheme.forward(cp, x, prm);
    // P ranks: shards prepared outside the timing; each rank times its run between barriers.
    let mut tp = Vec::new();
    let mut shares = vec![0.0; p];
    let mut received = vec![0u64; p];
    let mut worst = 0f32;
    for _ in 0..a.reps {
        let group = ThreadTransport::group(p, Duration::from_secs(600))?;
        let results = std::thread::scope(|s| {
            let hs: Vec<_> = group
                .into_iter()
                .map(|t| {
                    let (q, k, v, params, plan, mask) = (&q, &k, &v, &params, &plan, &mask);
                    s.spawn(move || -> Result<(Vec<f32>, f64, f64, u64)> {
                        let t = cp::Counted::new(t);
                        let r = t.rank();
                        let (lq, lk, lv) = (
                            plan.shard(q, 1, (h, d), r),
                            plan.shard(k, 1, (hk, d), r),
                            plan.shard(v, 1, (hk, d), r),
                        );
                        let x = LocalQkv {
                            q: &lq,
                            k: &lk,
                            v: &lv,
                            dims: (1, plan.rows_of(r), h, hk, d, d),
                        };
                        let pl = pool(Some(1))?;
                        t.barrier()?;
                        let t0 = Instant::now();
                        let (o, _) = pl.install(|| run(&Cp { t: &t, plan, mask }, &x, params))?;
                        let mine = t0.elapsed().as_secs_f64();
                        t.barrier()?;
                        let total = t0.elapsed().as_secs_f64();
                        Ok((o, mine, total, t.traffic().received))
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().expect("rank thread"))
                .collect::<Vec<_>>()
        });
        let mut span: f64 = 0.0;
        for (r, res) in results.into_iter().enumerate() {
            let (o, mine, total, got) = res?;
            received[r] = got;
            let w = plan.shard(&want, 1, (h, d), r);
            worst = o
                .iter()
                .zip(&w)
                .map(|(x, y)| (x - y).abs())
                .fold(worst, f32::max);
            shares[r] += mine / a.reps as f64;
            span = span.max(total);
        }
        tp.push(span);
    }
    let tp = median(tp);
    println!(
        "cp bench: `{}`, n {}, heads {h} / {hk}, dim {d}, {:?} over {p} ranks (threads), {} chunks per rank, {} reps (medians)",
        a.mask,
        fmt_len(n),
        scheme,
        a.chunks_per_rank,
        a.reps
    );
    let work: Vec<String> = plan.rank_work().iter().map(|w| format!("{w}")).collect();
    println!(
        "plan: scheduled pairs per rank {} (max / mean {:.3})",
        work.join(" "),
        plan.imbalance()
    );
    println!("single rank, 1 thread    T1   {t1:8.3} s");
    println!(
        "single rank, {} threads  Tall {tall:8.3} s",
        all.current_num_threads()
    );
    println!("{p} ranks x 1 thread      TP   {tp:8.3} s");
    println!(
        "speedup T1 / TP {:.2}x, vs Tall {:.2}x, efficiency T1 / (P TP) {:.0}%",
        t1 / tp,
        tall / tp,
        100.0 * t1 / (p as f64 * tp)
    );
    let shares: Vec<String> = shares.iter().map(|s| format!("{s:.3}")).collect();
    println!("compute per rank (s): {}", shares.join(" "));
    let received: Vec<String> = received.iter().map(|b| b.to_string()).collect();
    println!(
        "bytes received per rank (one run, barriers included): {}",
        received.join(" ")
    );
    println!("largest |cp - single rank| over the output: {worst:.2e}");
    if worst.is_nan() || worst > 1e-4 {
        bail!(
            "the {:?} output differs from single-rank by {worst:.2e}",
            scheme
        );
    }
    Ok(())
}
