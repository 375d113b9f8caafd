//! `longattn cp bench`: context parallelism on this machine's CPU cores, ranks as threads.
//!
//! Attention over one sequence under a mask (`--mask`, default causal): single-rank on one
//! thread (T1) and on every thread (Tall), then P ranks (`--ranks`) of one scheme (`--scheme`:
//! the ring over the mask-aware plan, all-gather of K / V, or Ulysses; `longattn::cp`), each
//! rank a thread running its blocks on a one-thread pool, exchanging data through the in-process
//! transport (TP, the slowest rank between two barriers). Prints the plan's scheduled work per
//! rank (max / mean), T1, Tall, TP, the speedup T1 / TP, the scaling efficiency T1 / (P TP),
//! each rank's compute time, and the largest difference of the output from single-rank's
//! (checked: it must stay below 1e-4).
use crate::common::{fmt_len, parse_len, pool};
use crate::maskglue::{bind_mask, equal_docs};
use anyhow::{bail, Context, Result};
use longattn::attention::{forward, AttnParams, MaskSpec};
use longattn::cp::{self, Cp, CpMask, LocalQkv, ThreadTransport, Transport};
use longattn::testing::Rng;
use longattn::TensorView;
use std::time::{Duration, Instant};

#[derive(clap::Subcommand, Debug)]
pub enum Cmd {
    /// Scaling of a context-parallel scheme with ranks as threads on this CPU.
    Bench(BenchArgs),
}

/// A context-parallel scheme.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// Ring pass-KV over the mask-aware plan (zigzag for causal).
    Ring,
    /// All-gather of K / V.
    Allgather,
    /// All-to-all over heads (the query heads must be a multiple of the ranks).
    Ulysses,
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

fn median(mut x: Vec<f64>) -> f64 {
    x.sort_by(|a, b| a.total_cmp(b));
    x[x.len() / 2]
}

pub fn main(a: Args) -> Result<()> {
    match a.cmd {
        Cmd::Bench(b) => bench(b),
    }
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

    let mask = CpMask::new(bound.clone(), 64)?;
    let plan = cp::plan(&mask.sched, p, a.chunks_per_rank)?;
    let run = match a.scheme {
        Scheme::Ring => cp::ring_forward,
        Scheme::Allgather => cp::gather_forward,
        Scheme::Ulysses => cp::ulysses_forward,
    };
    // P ranks: shards prepared outside the timing; each rank times its run between barriers.
    let mut tp = Vec::new();
    let mut shares = vec![0.0; p];
    let mut worst = 0f32;
    for _ in 0..a.reps {
        let group = ThreadTransport::group(p, Duration::from_secs(600))?;
        let results = std::thread::scope(|s| {
            let hs: Vec<_> = group
                .into_iter()
                .map(|t| {
                    let (q, k, v, params, plan, mask) = (&q, &k, &v, &params, &plan, &mask);
                    s.spawn(move || -> Result<(Vec<f32>, f64, f64)> {
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
                        Ok((o, mine, t0.elapsed().as_secs_f64()))
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().expect("rank thread"))
                .collect::<Vec<_>>()
        });
        let mut span: f64 = 0.0;
        for (r, res) in results.into_iter().enumerate() {
            let (o, mine, total) = res?;
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
        a.scheme,
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
    println!("largest |cp - single rank| over the output: {worst:.2e}");
    if worst.is_nan() || worst > 1e-4 {
        bail!(
            "the {:?} output differs from single-rank by {worst:.2e}",
            a.scheme
        );
    }
    Ok(())
}
