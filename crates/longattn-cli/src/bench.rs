//! `longattn bench`: the benchmark suite, in the spirit of the Long-Context Attention Benchmark.
//!
//! For each configuration (mask x sequence length x head dim x dtype), in one process:
//! 1. seeded random inputs (uniform in [-1, 1), never zeros), `B x n x H x D`, Sq = Sk = n;
//! 2. the block schedule is built a few times and its median build time kept (reported as a
//!    percentage of the attention time);
//! 3. a warm-up call of the fast path on the whole problem, whose output is CHECKED against the
//!    f64 oracle (`longattn::reference::attention_f64` with the mask's `allowed`) on batch row 0,
//!    the first and last query heads, and `--check-rows` query rows spread over the sequence
//!    (first and last included); a config whose error exceeds the tolerance (f32 1e-4, bf16 2e-2,
//!    f16 4e-3, relative to max |out| of the checked rows) FAILS and is not timed;
//! 4. timing: max(--reps, ceil(--min-time / warm-up time)) calls (at most 50), median;
//!    useful GFLOP/s = 4 * B * Hq * allowed_pairs * D / time.
//!
//! Memory: the process's peak RSS (VmHWM) is read before and after each config. VmHWM cannot be
//! reset, so the growth shows only when a config raises the peak of the whole run (configs run in
//! the order given, small to large lengths); the analytical bytes of q, k, v, out and lse are
//! reported beside it.
use crate::common::{
    check_rows, cpu_model, fmt_len, now_utc, parse_len, parse_list, peak_rss_kib, pool,
    random_inputs, spread_rows, tolerance,
};
use crate::maskglue::{bind_mask, TILE};
use crate::peer::{self, PeerConfig, DENSE_MASK_MAX};
use crate::plot;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use longattn::mask::BoundMask as Mask;
use longattn::{AttnParams, DType};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

/// The masks of the suite: name and description.
pub(crate) const MASKS: &[(&str, &str)] = &[
    ("full", "full"),
    ("causal", "causal"),
    ("sliding_window", "causal & window(W,0), W = min(1024, n/4)"),
    ("document", "causal & document, 8 equal documents"),
    (
        "neighborhood2d",
        "neighborhood2d(S,S,K,K) on an S x S grid (n = S^2), K = 13 (S >= 64) or S/4 odd",
    ),
    (
        "sinks_window",
        "causal & (sinks(4) | window(W,0)), W = min(1024, n/4)",
    ),
];

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A ~1 minute smoke version of the suite (lengths 1k, head dim 64, shorter timing).
    #[arg(long)]
    pub(crate) quick: bool,
    /// Comma-separated masks: full, causal, sliding_window, document, neighborhood2d, sinks_window.
    #[arg(long)]
    pub(crate) masks: Option<String>,
    /// Comma-separated sequence lengths (1k = 1024). Default 1k,4k,16k.
    #[arg(long)]
    pub(crate) lens: Option<String>,
    /// Comma-separated head dims. Default 64,128.
    #[arg(long)]
    pub(crate) dims: Option<String>,
    /// Comma-separated dtypes: f32, bf16, f16. Default f32,bf16.
    #[arg(long)]
    pub(crate) dtypes: Option<String>,
    /// Query heads.
    #[arg(long, default_value_t = 8)]
    pub(crate) heads: usize,
    /// Key/value heads (default: --heads).
    #[arg(long)]
    pub(crate) kv_heads: Option<usize>,
    /// Batch rows.
    #[arg(long, default_value_t = 1)]
    pub(crate) batch: usize,
    /// Minimum timed repetitions per config.
    #[arg(long, default_value_t = 3)]
    pub(crate) reps: usize,
    /// Time each config at least this long, in seconds (default 0.5; 0.1 with --quick). The CPU
    /// suites; the dense GPU suite times as `triton.testing.do_bench` does (100 ms of runs; a
    /// longer warm-up with --sustain).
    #[arg(long)]
    pub(crate) min_time: Option<f64>,
    /// Query rows checked against the f64 oracle (per checked head).
    #[arg(long, default_value_t = 24)]
    pub(crate) check_rows: usize,
    /// Report folder.
    #[arg(long, default_value = "bench-report")]
    pub(crate) out: PathBuf,
    /// Worker threads (default: all cores); also given to the peer.
    #[arg(long)]
    pub(crate) threads: Option<usize>,
    /// Run a peer in the same run: `torch` (PyTorch CPU scaled_dot_product_attention).
    #[arg(long)]
    pub(crate) compare: Option<String>,
    /// `--backend cuda --compare torch`: the peers to time, of sdpa_flash, sdpa_cudnn, flex and
    /// fa4 (FlashAttention-4's `flash_attn.cute`, full and causal, when importable); default all.
    #[arg(long)]
    pub(crate) peers: Option<String>,
    /// `--backend cuda --compare torch`: time our attention configs again after the peers and
    /// report ours as the mean of the two passes (each in the JSON report; the decode rows once),
    /// so that a clock drifting over the run weighs on both sides alike.
    #[arg(long)]
    pub(crate) sandwich: bool,
    /// `--backend cuda`: before each config's timed launches, ours (fast and deterministic mode
    /// apart) and every peer's run back to back for this many seconds, so that timing starts at
    /// the clock the power cap settles into under sustained load rather than at the boost clock
    /// a short burst still gets (default 0: the burst protocol of the earlier tables).
    #[arg(long, default_value_t = 0.0)]
    pub(crate) sustain: f64,
    /// `--backend cuda` forward rows: also time the forward that writes the block-pooled
    /// attention map at this block (a multiple of 64), against the plain forward, and check the
    /// map's rows against the f64 probabilities.
    #[arg(long)]
    pub(crate) map: Option<usize>,
    /// Seed of the random inputs.
    #[arg(long, default_value_t = 42)]
    pub(crate) seed: u64,
    /// `cpu` or `cuda` (the GPU suite: bf16, SDPA FLASH / cuDNN and FlexAttention as peers).
    #[arg(long, default_value = "cpu")]
    pub(crate) backend: String,
    /// GPU ordinal (with --backend cuda).
    #[arg(long, default_value_t = 0)]
    pub(crate) device: usize,
    /// GPU suite: tokens per config (batch = tokens / n, at least 1).
    #[arg(long, default_value_t = 16384)]
    pub(crate) tokens: usize,
    /// GPU suite: model dim (query heads = model dim / D unless --heads is given explicitly).
    #[arg(long, default_value_t = 2048)]
    pub(crate) model_dim: usize,
    /// Real q/k/v from `longattn capture` instead of random inputs: every captured layer (or
    /// `--layers`) under each mask; lengths, head dim, heads and dtype come from the file.
    #[arg(long)]
    pub(crate) data: Option<PathBuf>,
    /// Comma-separated layers of `--data` (default: all in the file).
    #[arg(long, requires = "data")]
    pub(crate) layers: Option<String>,
    /// Time the backward pass (dQ, dK, dV from a seeded random dO) instead of the forward: fast
    /// mode (the GFLOP/s column) and deterministic mode beside it. Useful FLOPs are 2.5x the
    /// forward's; the peer times `.backward()` of its SDPA. The check compares dQ of the checked
    /// rows with the f64 gradient oracle.
    #[arg(long)]
    pub(crate) backward: bool,
    /// Benchmark linear attention of this spec on the CPU instead (e.g. `simple_gla`,
    /// `elu+normalized`; see `longattn::linear::spec`): uses --lens, --dims (K = V), --dtypes
    /// (default f32), --heads, --kv-heads, --batch, --threads, --reps, --min-time, --backward.
    #[arg(long)]
    pub(crate) linear: Option<String>,
    /// Benchmark dynamic sparse prefill instead: sparse specs separated by `;` (e.g.
    /// `flexprefill(gamma=0.7);proxy(gamma=0.9)`), each against the dense forward under the
    /// first of --masks (default causal), on --data's captured layers or random inputs; with
    /// --backend cuda: the device estimator on `sparse::structured_qk` inputs (32 / 8 heads,
    /// D 128, lengths 4k..128k by default), and with --compare torch FlexAttention on the same
    /// blocks.
    #[arg(long)]
    pub(crate) sparse: Option<String>,
    /// With --sparse: also the exact mass recall of each selection (f64 oracle: small inputs).
    #[arg(long)]
    pub(crate) recall: bool,
    /// With --sparse --backend cuda: the q / k generator, `structured` (sinks, hub columns,
    /// diagonals: `sparse::structured_qk`), `sharp` (peaked rows whose heavy keys nearby
    /// queries share: `sparse::structured_qk_sharp`) or `planted` (every 5th 64-key group near, the
    /// others' logits ~7 nats below: `sparse::skip_check::planted_near_far`, where skip-softmax
    /// can drop most tiles).
    #[arg(long, default_value = "structured")]
    pub(crate) inputs: String,
    /// `--backend cuda`: time gathered keys instead (`sparse::gather`): per length and key
    /// probability P of this list (e.g. `0.05,0.1,0.2`), a seeded selection (the sink tile and
    /// the local band whole, each earlier key with probability P, shared by the heads) under
    /// `causal` through the gathered forward, against our dense causal forward timed in turn
    /// with it (--lens, default 16k,64k,128k; --dims, default 128; 32 / 8 heads).
    #[arg(long)]
    pub(crate) gather: Option<String>,
}

#[derive(Serialize, Clone, Debug)]
struct Row {
    mask: String,
    /// The captured layer of `--data` (None: random inputs).
    layer: Option<usize>,
    expr: String,
    n: usize,
    d: usize,
    dtype: String,
    batch: usize,
    heads: usize,
    kv_heads: usize,
    /// "ok", "FAILED" (correctness), "error" or "skipped".
    status: String,
    note: String,
    density: f64,
    allowed_pairs: u64,
    check_rel_err: Option<f64>,
    check_lse_err: Option<f64>,
    tolerance: f64,
    time_s: Option<f64>,
    reps: usize,
    gflops: Option<f64>,
    schedule_build_s: Option<f64>,
    schedule_pct: Option<f64>,
    peak_rss_before_mib: Option<f64>,
    peak_rss_after_mib: Option<f64>,
    io_bytes: u64,
    torch_time_s: Option<f64>,
    torch_gflops: Option<f64>,
    /// ours / torch in useful GFLOP/s (> 1: we are faster).
    ratio_vs_torch: Option<f64>,
    torch_note: Option<String>,
    /// "forward" or "backward".
    pass: String,
    /// Backward only: the deterministic mode's median time and useful GFLOP/s.
    det_time_s: Option<f64>,
    det_gflops: Option<f64>,
}

#[derive(Serialize)]
struct Report<'a> {
    date: String,
    command: String,
    cpu: String,
    cores: usize,
    threads: usize,
    tile: usize,
    torch_version: Option<String>,
    results: &'a [Row],
}

/// The expression of mask `name` at length `n`, and how many documents it needs.
pub(crate) fn mask_expr(
    name: &str,
    n: usize,
) -> std::result::Result<(String, Option<usize>), String> {
    let w = (n / 4).clamp(1, 1024);
    Ok(match name {
        "full" => ("full".into(), None),
        "causal" => ("causal".into(), None),
        "sliding_window" => (format!("causal & window({w},0)"), None),
        "document" => {
            if n < 8 {
                return Err("needs n >= 8 for 8 documents".into());
            }
            ("causal & document".into(), Some(8))
        }
        "neighborhood2d" => {
            let s = (n as f64).sqrt().round() as usize;
            if s * s != n {
                return Err(format!("n = {n} is not a square grid"));
            }
            let k = if s >= 64 { 13 } else { ((s / 4) | 1).max(1) };
            (format!("neighborhood2d({s},{s},{k},{k})"), None)
        }
        "sinks_window" => (format!("causal & (sinks(4) | window({w},0))"), None),
        _ => return Err(format!("unknown mask `{name}`")),
    })
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

struct Plan {
    masks: Vec<String>,
    lens: Vec<usize>,
    dims: Vec<usize>,
    dtypes: Vec<DType>,
    min_time: f64,
}

fn plan(a: &Args) -> Result<Plan> {
    let masks = match &a.masks {
        Some(s) => parse_list(s, "mask", |x| {
            MASKS.iter().find(|m| m.0 == x).map(|m| m.0.to_string())
        })
        .with_context(|| {
            format!(
                "known masks: {}",
                MASKS.iter().map(|m| m.0).collect::<Vec<_>>().join(", ")
            )
        })?,
        None => MASKS.iter().map(|m| m.0.to_string()).collect(),
    };
    let lens = match &a.lens {
        Some(s) => parse_list(s, "length", parse_len)?,
        None if a.quick => vec![1024],
        None => vec![1024, 4096, 16384],
    };
    let dims = match &a.dims {
        Some(s) => parse_list(s, "head dim", |x| x.parse().ok().filter(|&d: &usize| d > 0))?,
        None if a.quick => vec![64],
        None => vec![64, 128],
    };
    let dtypes = match &a.dtypes {
        Some(s) => parse_list(s, "dtype", DType::parse)?,
        None => vec![DType::F32, DType::BF16],
    };
    let min_time = a.min_time.unwrap_or(if a.quick { 0.1 } else { 0.5 });
    if masks.is_empty() || lens.is_empty() || dims.is_empty() || dtypes.is_empty() {
        bail!("--masks, --lens, --dims and --dtypes must each name at least one value");
    }
    if !(min_time >= 0.0 && min_time.is_finite()) {
        bail!("--min-time must be a number >= 0");
    }
    Ok(Plan {
        masks,
        lens,
        dims,
        dtypes,
        min_time,
    })
}

pub fn main(a: Args) -> Result<()> {
    if a.sustain != 0.0
        && (a.backend != "cuda"
            || a.sparse.is_some()
            || a.linear.is_some()
            || !(0.0..=600.0).contains(&a.sustain))
    {
        bail!(
            "--sustain {}: seconds from 0 to 600, for the dense GPU suite (--backend cuda)",
            a.sustain
        );
    }
    if a.sandwich && (a.backend != "cuda" || a.sparse.is_some() || a.linear.is_some()) {
        bail!("--sandwich belongs to the dense GPU suite (--backend cuda --compare torch)");
    }
    if let Some(specs) = &a.sparse {
        return crate::bench_sparse::main(&a, specs);
    }
    if let Some(list) = &a.gather {
        return crate::bench_sparse::gather(&a, list);
    }
    if let Some(spec) = &a.linear {
        if a.backend != "cpu" {
            bail!(
                "--linear runs on the CPU only (drop --backend {})",
                a.backend
            );
        }
        return crate::bench_linear::main(&a, spec);
    }
    match a.backend.as_str() {
        "cpu" => {}
        "cuda" => return crate::bench_cuda::main(&a),
        other => bail!("--backend {other}: expected `cpu` or `cuda`"),
    }
    let mut p = plan(&a)?;
    let mut hq = a.heads;
    let mut hk = a.kv_heads.unwrap_or(hq);
    // Captured layers replace the random inputs: one config per (mask, layer).
    let captured = match &a.data {
        None => Vec::new(),
        Some(path) => {
            if a.compare.is_some() {
                bail!("--compare runs the peer on random inputs only; drop it with --data");
            }
            let layers = match &a.layers {
                Some(s) => Some(parse_list(s, "layer", |x| x.parse::<usize>().ok())?),
                None => None,
            };
            if a.batch != 1 {
                bail!("--data holds batch 1; drop --batch");
            }
            let c = longattn::io::read_captured(path, layers.as_deref())?;
            let d0 = c[0].1.dims()?;
            if d0.sq != d0.sk {
                bail!(
                    "{}: captured q and k lengths differ ({} vs {})",
                    path.display(),
                    d0.sq,
                    d0.sk
                );
            }
            hq = d0.hq;
            hk = d0.hk;
            p.lens = vec![d0.sq];
            p.dims = vec![d0.d];
            p.dtypes = vec![c[0].1.dtype()];
            if a.masks.is_none() {
                p.masks = ["causal", "sliding_window", "sinks_window", "full"]
                    .map(String::from)
                    .to_vec();
            }
            c
        }
    };
    if hq == 0 || hk == 0 || a.batch == 0 || a.reps == 0 {
        bail!("--heads, --kv-heads, --batch and --reps must be >= 1");
    }
    if !hq.is_multiple_of(hk) {
        bail!("--heads {hq} must be a multiple of --kv-heads {hk}");
    }
    let compare_torch = match a.compare.as_deref() {
        None => false,
        Some("torch") => true,
        Some(x) => bail!("--compare {x}: the only peer is `torch`"),
    };
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    let peer_dir = a.out.join(".peer");
    if compare_torch {
        std::fs::create_dir_all(&peer_dir)?;
    }
    let pool = pool(a.threads)?;
    let threads = pool.current_num_threads();

    // Lengths ascending so that the peak-RSS growth reads per config.
    let mut configs = Vec::new();
    for &n in &p.lens {
        for m in &p.masks {
            for &d in &p.dims {
                for &dt in &p.dtypes {
                    if captured.is_empty() {
                        configs.push((m.clone(), n, d, dt, None));
                    }
                    for ci in 0..captured.len() {
                        configs.push((m.clone(), n, d, dt, Some(ci)));
                    }
                }
            }
        }
    }
    configs.sort_by_key(|c| c.1);

    let pb = ProgressBar::new(configs.len() as u64);
    pb.set_style(
        ProgressStyle::with_template("[{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    println!(
        "{:<15} {:>6} {:>4} {:>5} {:>8} {:>11} {:>9} {:>8} {:>7} {:>9}",
        "mask", "n", "D", "dtype", "status", "time ms", "GFLOP/s", "density", "sched%", "check"
    );
    let mut rows: Vec<Row> = Vec::new();
    let mut peer_jobs: Vec<PeerConfig> = Vec::new();
    for (id, (mname, n, d, dt, ci)) in configs.iter().enumerate() {
        let data = ci.map(|c| &captured[c]);
        pb.set_message(format!("{mname} n={} D={d} {dt}", fmt_len(*n)));
        let io_bytes =
            (a.batch * n * (2 * hq + 2 * hk) * d * dt.size() + a.batch * hq * n * 4) as u64;
        let mut row = Row {
            mask: mname.clone(),
            layer: data.map(|x| x.0),
            expr: String::new(),
            n: *n,
            d: *d,
            dtype: dt.to_string(),
            batch: a.batch,
            heads: hq,
            kv_heads: hk,
            status: "ok".into(),
            note: String::new(),
            density: 0.0,
            allowed_pairs: 0,
            check_rel_err: None,
            check_lse_err: None,
            tolerance: tolerance(*dt),
            time_s: None,
            reps: 0,
            gflops: None,
            schedule_build_s: None,
            schedule_pct: None,
            peak_rss_before_mib: None,
            peak_rss_after_mib: None,
            io_bytes,
            torch_time_s: None,
            torch_gflops: None,
            ratio_vs_torch: None,
            torch_note: None,
            pass: if a.backward { "backward" } else { "forward" }.into(),
            det_time_s: None,
            det_gflops: None,
        };
        let r = pool.install(|| {
            bench_one(
                &a,
                &p,
                id,
                &mut row,
                *n,
                *d,
                *dt,
                hq,
                hk,
                data.map(|x| &x.1),
            )
        });
        match r {
            Ok(Some(mask)) if compare_torch => {
                let kind = match mname.as_str() {
                    "full" => Some(("none", None)),
                    "causal" => Some(("causal", None)),
                    _ if *n <= DENSE_MASK_MAX => {
                        let f = peer_dir.join(format!("mask_{id}.bin"));
                        write_dense_mask(&mask, *n, &f)?;
                        Some(("file", Some(f)))
                    }
                    _ => {
                        row.torch_note = Some(format!(
                            "skipped: torch needs a dense boolean mask, not built for n > {DENSE_MASK_MAX}"
                        ));
                        None
                    }
                };
                if let Some((k, f)) = kind {
                    peer_jobs.push(PeerConfig {
                        id,
                        batch: a.batch,
                        heads: hq,
                        kv_heads: hk,
                        n: *n,
                        d: *d,
                        dtype: dt.to_string(),
                        mask: k.into(),
                        mask_file: f,
                        backward: a.backward,
                    });
                }
            }
            Ok(_) => {}
            Err(e) => {
                row.status = "error".into();
                row.note = format!("{e:#}");
            }
        }
        pb.suspend(|| println!("{}", table_line(&row)));
        if !row.note.is_empty() && row.status != "ok" {
            pb.suspend(|| println!("    {}: {}", row.status, row.note));
        }
        rows.push(row);
        pb.inc(1);
    }
    pb.finish_and_clear();

    let mut torch_version = None;
    if compare_torch {
        match peer::torch_available() {
            Err(msg) => eprintln!("{msg}"),
            Ok(()) if peer_jobs.is_empty() => eprintln!("torch: no configuration to compare"),
            Ok(()) => {
                eprintln!(
                    "running the torch peer on {} configurations ...",
                    peer_jobs.len()
                );
                let pb = ProgressBar::new(peer_jobs.len() as u64);
                let v = peer::run(
                    &peer_dir,
                    threads,
                    a.reps,
                    p.min_time,
                    &peer_jobs,
                    |id, r| {
                        if let Some(row) = rows.get_mut(id) {
                            match (r.time_s, r.error) {
                                (Some(t), _) if t > 0.0 => {
                                    let flops = useful_flops(row);
                                    row.torch_time_s = Some(t);
                                    row.torch_gflops = Some(flops / t / 1e9);
                                    row.ratio_vs_torch = row.time_s.map(|ours| t / ours);
                                }
                                (_, e) => {
                                    row.torch_note = Some(e.unwrap_or_else(|| "no timing".into()))
                                }
                            }
                        }
                        pb.inc(1);
                    },
                );
                pb.finish_and_clear();
                match v {
                    Ok(v) => torch_version = Some(v),
                    Err(e) => eprintln!("torch peer: {e:#}"),
                }
                print_peer_summary(&rows);
            }
        }
        let _ = std::fs::remove_dir_all(&peer_dir);
    }

    let report = Report {
        date: now_utc(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        cpu: cpu_model(),
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        threads,
        tile: TILE,
        torch_version,
        results: &rows,
    };
    write_report(&a, &report)?;
    eprintln!("report: {}", a.out.display());
    let failed = rows
        .iter()
        .filter(|r| r.status == "FAILED" || r.status == "error")
        .count();
    if failed > 0 {
        bail!(
            "{failed} of {} configurations failed (see above and {}/report.md)",
            rows.len(),
            a.out.display()
        );
    }
    Ok(())
}

/// Forward: 4 B Hq (allowed pairs) D; backward: 2.5x that (five products instead of two).
fn useful_flops(r: &Row) -> f64 {
    let fwd = 4.0 * r.heads as f64 * r.allowed_pairs as f64 * r.d as f64;
    if r.pass == "backward" {
        2.5 * fwd
    } else {
        fwd
    }
}

/// Runs one config into `row`; returns the bound mask when it was timed.
#[allow(clippy::too_many_arguments)]
fn bench_one(
    a: &Args,
    p: &Plan,
    id: usize,
    row: &mut Row,
    n: usize,
    d: usize,
    dt: DType,
    hq: usize,
    hk: usize,
    data: Option<&longattn::io::Inputs>,
) -> Result<Option<Mask>> {
    let (expr, docs) = match mask_expr(&row.mask, n) {
        Ok(x) => x,
        Err(why) => {
            row.status = "skipped".into();
            row.note = why;
            return Ok(None);
        }
    };
    row.expr = expr.clone();
    if data.is_some() && docs.is_some() {
        row.status = "skipped".into();
        row.note = "captured data holds no document ids".into();
        return Ok(None);
    }
    let inputs = match data {
        Some(x) => x.clone(),
        None => random_inputs(
            dt,
            a.batch,
            n,
            n,
            hq,
            hk,
            d,
            a.seed ^ (id as u64) << 8,
            docs,
        )?,
    };
    let docs = inputs.q_doc.clone().zip(inputs.k_doc.clone());
    let mask = bind_mask(&expr, a.batch, n, n, docs)?;
    row.density = mask.density();
    row.allowed_pairs = (0..a.batch).map(|b| mask.allowed_pairs(b)).sum();

    let mut sched_times = Vec::new();
    for _ in 0..3 {
        let t0 = Instant::now();
        let s = mask.schedule(TILE, TILE)?;
        sched_times.push(t0.elapsed().as_secs_f64());
        drop(s);
    }
    let sched = median(sched_times);
    row.schedule_build_s = Some(sched);

    let (q, k, v) = (
        inputs.q.view("q")?,
        inputs.k.view("k")?,
        inputs.v.view("v")?,
    );
    let params = AttnParams::default();
    row.peak_rss_before_mib = peak_rss_kib().map(|x| x as f64 / 1024.0);
    let t0 = Instant::now();
    let out = longattn::forward(&q, &k, &v, &params, longattn::MaskSpec::Expr(&mask))?;
    let warm = t0.elapsed().as_secs_f64();

    let heads: Vec<usize> = if hq > 1 { vec![0, hq - 1] } else { vec![0] };
    let c = check_rows(
        &inputs,
        &mask,
        &params,
        &out,
        &spread_rows(n, a.check_rows),
        &heads,
    )?;
    row.check_rel_err = Some(c.rel_err);
    row.check_lse_err = Some(c.lse_err);
    if !(c.rel_err <= row.tolerance && c.lse_err <= row.tolerance) {
        row.status = "FAILED".into();
        row.note = format!(
            "CORRECTNESS CHECK FAILED on {} rows: out error {:.3e}, lse error {:.3e} > tolerance {:.1e}",
            c.rows, c.rel_err, c.lse_err, row.tolerance
        );
        return Ok(None);
    }

    if a.backward {
        bench_backward(a, p, id, row, &inputs, &mask, out)?;
        row.schedule_pct = row.time_s.map(|t| 100.0 * sched / t);
        return Ok(Some(mask));
    }
    // The warm-up output is released before the timed calls, so the peak memory is inputs + one
    // output (the memory target's measure).
    drop(out);
    let reps = a
        .reps
        .max(((p.min_time / warm.max(1e-9)).ceil() as usize).min(50));
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t0 = Instant::now();
        let o = longattn::forward(&q, &k, &v, &params, longattn::MaskSpec::Expr(&mask))?;
        times.push(t0.elapsed().as_secs_f64());
        drop(o);
    }
    row.peak_rss_after_mib = peak_rss_kib().map(|x| x as f64 / 1024.0);
    let t = median(times);
    row.reps = reps;
    row.time_s = Some(t);
    row.gflops = Some(useful_flops(row) / t / 1e9);
    row.schedule_pct = Some(100.0 * sched / t);
    Ok(Some(mask))
}

/// The backward of one config: dO seeded, a warm-up call whose dQ on the checked rows is compared
/// with the f64 gradient oracle, then fast mode and deterministic mode timed alike.
fn bench_backward(
    a: &Args,
    p: &Plan,
    id: usize,
    row: &mut Row,
    inputs: &longattn::io::Inputs,
    mask: &Mask,
    fwd: longattn::AttnOutput,
) -> Result<()> {
    let (q, k, v) = (
        inputs.q.view("q")?,
        inputs.k.view("k")?,
        inputs.v.view("v")?,
    );
    let dout = longattn::testing::random_tensor(
        inputs.q.dtype(),
        &fwd.out.shape,
        1.0,
        a.seed ^ (id as u64) << 8 ^ 0xd0,
    );
    let (ov, dov) = (fwd.out.view("out")?, dout.view("do")?);
    let params = AttnParams::default();
    let run = |deterministic: bool| {
        longattn::backward(
            &q,
            &k,
            &v,
            &ov,
            &fwd.lse,
            &dov,
            &params,
            longattn::MaskSpec::Expr(mask),
            &longattn::BackwardParams {
                deterministic,
                ..Default::default()
            },
        )
    };
    let t0 = Instant::now();
    let g = run(false)?;
    let warm = t0.elapsed().as_secs_f64();
    // dQ of row i depends on row i only: the oracle restricted to the checked rows and heads.
    let (n, hq) = (q.seq(), q.heads());
    let rows = spread_rows(n, a.check_rows);
    let heads: Vec<usize> = if hq > 1 { vec![0, hq - 1] } else { vec![0] };
    let err = crate::common::check_dq_rows(&q, &k, &v, &dov, &params, mask, &g.dq, &rows, &heads)?;
    drop(g);
    row.check_rel_err = Some(err);
    row.tolerance = longattn::testing::grad_tolerance(inputs.q.dtype());
    if err.is_nan() || err > row.tolerance {
        row.status = "FAILED".into();
        row.note = format!(
            "CORRECTNESS CHECK FAILED: dq error {err:.3e} on {} rows > tolerance {:.1e}",
            rows.len(),
            row.tolerance
        );
        return Ok(());
    }
    let reps = a
        .reps
        .max(((p.min_time / warm.max(1e-9)).ceil() as usize).min(50));
    let time = |deterministic: bool| -> Result<f64> {
        let mut times = Vec::with_capacity(reps);
        for _ in 0..reps {
            let t0 = Instant::now();
            let g = run(deterministic)?;
            times.push(t0.elapsed().as_secs_f64());
            drop(g);
        }
        Ok(median(times))
    };
    let t = time(false)?;
    let td = time(true)?;
    row.peak_rss_after_mib = peak_rss_kib().map(|x| x as f64 / 1024.0);
    row.reps = reps;
    row.time_s = Some(t);
    row.gflops = Some(useful_flops(row) / t / 1e9);
    row.det_time_s = Some(td);
    row.det_gflops = Some(useful_flops(row) / td / 1e9);
    Ok(())
}

fn write_dense_mask(mask: &Mask, n: usize, path: &std::path::Path) -> Result<()> {
    let mut m = vec![0u8; n * n];
    for i in 0..n {
        for j in 0..n {
            m[i * n + j] = mask.allowed(0, i, j) as u8;
        }
    }
    std::fs::write(path, m).with_context(|| format!("{}", path.display()))
}

fn opt(x: Option<f64>, f: impl Fn(f64) -> String) -> String {
    x.map_or_else(|| "-".into(), f)
}

fn table_line(r: &Row) -> String {
    format!(
        "{:<15} {:>6} {:>4} {:>5} {:>8} {:>11} {:>9} {:>8} {:>7} {:>9}",
        match r.layer {
            Some(l) => format!("{} L{l}", r.mask),
            None => r.mask.clone(),
        },
        fmt_len(r.n),
        r.d,
        r.dtype,
        r.status,
        opt(r.time_s, |t| format!("{:.3}", t * 1e3)),
        opt(r.gflops, |g| format!("{g:.1}")),
        format!("{:.4}", r.density),
        opt(r.schedule_pct, |s| format!("{s:.2}")),
        opt(r.check_rel_err, |e| format!("{e:.1e}")),
    )
}

/// Geometric mean of ours/torch over the full and causal configs, per dtype.
fn geomeans(rows: &[Row]) -> BTreeMap<String, (f64, usize)> {
    let mut acc: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    for r in rows {
        if let (Some(x), true) = (r.ratio_vs_torch, r.mask == "full" || r.mask == "causal") {
            let e = acc.entry(r.dtype.clone()).or_default();
            e.0 += x.ln();
            e.1 += 1;
        }
    }
    acc.into_iter()
        .map(|(k, (s, c))| (k, ((s / c as f64).exp(), c)))
        .collect()
}

/// Geometric mean of ours/torch over the full and causal configs of every dtype.
fn geomean_all(rows: &[Row]) -> Option<(f64, usize)> {
    let x: Vec<f64> = rows
        .iter()
        .filter(|r| r.mask == "full" || r.mask == "causal")
        .filter_map(|r| r.ratio_vs_torch)
        .collect();
    (!x.is_empty()).then(|| {
        let s: f64 = x.iter().map(|r| r.ln()).sum();
        ((s / x.len() as f64).exp(), x.len())
    })
}

fn print_peer_summary(rows: &[Row]) {
    println!("\nours vs torch (useful GFLOP/s; ratio > 1: longattn is faster)");
    println!(
        "{:<15} {:>6} {:>4} {:>5} {:>10} {:>10} {:>8}",
        "mask", "n", "D", "dtype", "ours", "torch", "ratio"
    );
    for r in rows {
        if r.torch_gflops.is_none() && r.torch_note.is_none() {
            continue;
        }
        let tail = match (&r.torch_gflops, &r.torch_note) {
            (Some(g), _) => format!(
                "{:>10} {:>10.1} {:>8}{}",
                opt(r.gflops, |x| format!("{x:.1}")),
                g,
                opt(r.ratio_vs_torch, |x| format!("{x:.2}")),
                opt(r.det_gflops, |x| format!("   deterministic {x:.1}"))
            ),
            (None, Some(n)) => format!("torch {n}"),
            _ => String::new(),
        };
        println!(
            "{:<15} {:>6} {:>4} {:>5} {tail}",
            r.mask,
            fmt_len(r.n),
            r.d,
            r.dtype
        );
    }
    for (dt, (g, c)) in geomeans(rows) {
        println!("geometric mean ours/torch, {dt}, full + causal ({c} configs): {g:.2}");
    }
    if let Some((g, c)) = geomean_all(rows) {
        println!("geometric mean ours/torch, all dtypes, full + causal ({c} configs): {g:.2}");
    }
}

fn write_report(a: &Args, rep: &Report) -> Result<()> {
    let out = &a.out;
    std::fs::write(out.join("results.json"), serde_json::to_vec_pretty(rep)?)
        .with_context(|| format!("cannot write {}/results.json", out.display()))?;

    // One plot per mask: one line per (dtype, D), plus torch's where measured.
    let mut images = Vec::new();
    let mut by_mask: BTreeMap<&str, Vec<&Row>> = BTreeMap::new();
    for r in rep.results {
        by_mask.entry(&r.mask).or_default().push(r);
    }
    for (m, rs) in &by_mask {
        let mut series: BTreeMap<String, Vec<(usize, f64)>> = BTreeMap::new();
        for r in rs {
            if let Some(g) = r.gflops {
                series
                    .entry(format!("longattn {} D{}", r.dtype, r.d))
                    .or_default()
                    .push((r.n, g));
            }
            if let Some(g) = r.torch_gflops {
                series
                    .entry(format!("torch {} D{}", r.dtype, r.d))
                    .or_default()
                    .push((r.n, g));
            }
        }
        if series.is_empty() {
            continue;
        }
        let name = format!("{m}.png");
        let expr = rs
            .iter()
            .map(|r| r.expr.as_str())
            .find(|e| !e.is_empty())
            .unwrap_or(m);
        let title = format!(
            "{m}: {expr} (B{} H{} {} threads)",
            a.batch, rs[0].heads, rep.threads
        );
        let series: Vec<(String, Vec<(usize, f64)>)> = series.into_iter().collect();
        plot::line_plot(&out.join(&name), &title, &series)?;
        images.push(name);
    }

    let mut md = String::new();
    let _ = writeln!(md, "# longattn bench\n");
    let _ = writeln!(md, "- date: {}", rep.date);
    let _ = writeln!(md, "- command: `{}`", rep.command);
    let _ = writeln!(
        md,
        "- CPU: {} ({} cores), {} threads",
        rep.cpu, rep.cores, rep.threads
    );
    let _ = writeln!(md, "- schedule tile: {0}x{0}", rep.tile);
    if let Some(v) = &rep.torch_version {
        let _ = writeln!(md, "- peer: PyTorch {v} `scaled_dot_product_attention` (CPU), same threads and timing protocol");
    }
    let _ = writeln!(
        md,
        "\nUseful GFLOP/s = 4 * B * Hq * allowed pairs * D / median time. `check` is the max error of the checked rows against the f64 oracle, relative to max |out|. `sched %` is the block-schedule build time as a percentage of the attention time. Peak RSS is the process's VmHWM after the config (it cannot be reset; it grows only when a config raises the run's peak); `io MiB` is the analytical size of q, k, v, out and lse.\n"
    );
    if rep.results.iter().any(|r| r.pass == "backward") {
        let _ = writeln!(md, "Backward pass: useful FLOPs are 2.5x the forward's; GFLOP/s is the fast mode, `det GFLOP/s` the deterministic mode; `check` is the dQ error of the checked rows against the f64 gradient oracle.\n");
    }
    let _ = writeln!(md, "| mask | expr | n | D | dtype | status | time ms | GFLOP/s | density | sched % | check | peak RSS MiB | io MiB | torch GFLOP/s | ours/torch | det GFLOP/s |");
    let _ = writeln!(
        md,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for r in rep.results {
        let _ = writeln!(
            md,
            "| {} | `{}` | {} | {} | {} | {} | {} | {} | {:.4} | {} | {} | {} | {:.1} | {} | {} | {} |",
            r.mask,
            r.expr,
            fmt_len(r.n),
            r.d,
            r.dtype,
            r.status,
            opt(r.time_s, |t| format!("{:.3}", t * 1e3)),
            opt(r.gflops, |g| format!("{g:.1}")),
            r.density,
            opt(r.schedule_pct, |s| format!("{s:.2}")),
            opt(r.check_rel_err, |e| format!("{e:.1e}")),
            opt(r.peak_rss_after_mib, |m| format!("{m:.0}")),
            r.io_bytes as f64 / (1 << 20) as f64,
            opt(r.torch_gflops, |g| format!("{g:.1}")),
            opt(r.ratio_vs_torch, |x| format!("{x:.2}")),
            opt(r.det_gflops, |g| format!("{g:.1}")),
        );
    }
    let notes: Vec<&Row> = rep
        .results
        .iter()
        .filter(|r| !r.note.is_empty() || r.torch_note.is_some())
        .collect();
    if !notes.is_empty() {
        let _ = writeln!(md, "\n## Notes\n");
        for r in notes {
            let torch = r
                .torch_note
                .as_deref()
                .map(|t| format!(" (torch: {t})"))
                .unwrap_or_default();
            let _ = writeln!(
                md,
                "- {} n={} D={} {}: {} {}{torch}",
                r.mask,
                fmt_len(r.n),
                r.d,
                r.dtype,
                r.status,
                r.note
            );
        }
    }
    let gm = geomeans(rep.results);
    if !gm.is_empty() {
        let _ = writeln!(md, "\n## Against torch\n");
        for (dt, (g, c)) in gm {
            let _ = writeln!(
                md,
                "- geometric mean ours/torch, {dt}, full + causal ({c} configs): {g:.2}"
            );
        }
        if let Some((g, c)) = geomean_all(rep.results) {
            let _ = writeln!(
                md,
                "- geometric mean ours/torch, all dtypes, full + causal ({c} configs): {g:.2}"
            );
        }
    }
    if !images.is_empty() {
        let _ = writeln!(md, "\n## Plots\n");
        for i in images {
            let _ = writeln!(md, "![{i}]({i})");
        }
    }
    std::fs::write(out.join("report.md"), md)
        .with_context(|| format!("cannot write {}/report.md", out.display()))?;
    Ok(())
}
