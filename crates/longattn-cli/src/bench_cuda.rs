//! `longattn bench --backend cuda`: the GPU suite, our kernels and the peers in one run.
//!
//! Per configuration (mask x length x head dim x dtype; batch = tokens / n, query heads = model
//! dim / D, as in the peer figures of shared/BENCHMARKS.md):
//! 1. seeded random inputs in [-1, 1) (never zeros), uploaded once (each of q, k, v is
//!    tokens x model dim x 2 bytes = 64 MiB by default, larger than the 50 MB L2, so repeated
//!    calls do not run from cache);
//! 2. the plan (kernel variant + block schedule) is built; the schedule build is timed on its own
//!    (median of 3) and the kernel's compile/load time reported;
//! 3. one warm-up launch whose output is CHECKED on batch row 0, the first and last heads and
//!    `--check-rows` rows against the f64 oracle (a failing config is not timed);
//! 4. timing by `triton.testing.do_bench`'s protocol, which times the peers (`time_like_do_bench`:
//!    an L2 flush before every timed launch, warm-up and run counts from an estimate, events
//!    read after the last run; `--sustain S`: S seconds of warm-up on both sides), median;
//!    useful TFLOP/s = 4 * Hq * D * (allowed pairs over the batch) / time.
//!
//! With `--compare torch` the peers (`peer_torch_cuda.py`) run afterwards in the same process run
//! on the same GPU: SDPA FLASH_ATTENTION and CUDNN_ATTENTION (full / causal) and FlexAttention
//! (compiled, `create_block_mask` on the same mask; its build time reported too).
use crate::bench::{mask_expr, median, Args, MASKS};
use crate::common::{
    check_dq_rows, check_rows, fmt_len, now_utc, parse_len, parse_list, random_inputs, spread_rows,
    tolerance,
};
use crate::maskglue::bind_mask;
use crate::peer;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use longattn::attention::Dims;
use longattn::cuda::backward::BwdPlan;
use longattn::cuda::{CudaDevice, DevTensor, FwdPlan};
use longattn::{AttnOutput, AttnParams, DType, MaskSpec};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;

const PEER_SCRIPT: &str = include_str!("peer_torch_cuda.py");
const PEERS: [&str; 4] = ["sdpa_flash", "sdpa_cudnn", "flex", "fa4"];

#[derive(Serialize, Clone, Debug, Default)]
struct Row {
    id: usize,
    mask: String,
    expr: String,
    n: usize,
    d: usize,
    dtype: String,
    batch: usize,
    heads: usize,
    kv_heads: usize,
    status: String,
    note: String,
    density: f64,
    check_rel_err: Option<f64>,
    check_lse_err: Option<f64>,
    time_ms: Option<f64>,
    tflops: Option<f64>,
    schedule_ms: Option<f64>,
    tiles_full: usize,
    tiles_partial: usize,
    /// Peer -> median ms (or the error).
    peers_ms: BTreeMap<String, f64>,
    peer_notes: BTreeMap<String, String>,
    flex_build_ms: Option<f64>,
    /// Backward runs: the deterministic mode's median ms (the main columns are the fast mode's).
    det_ms: Option<f64>,
    /// `--map`: the forward that also writes the pooled map, and the plain forward timed in
    /// turns with it (median ms each), and the map's largest error against the f64 oracle's
    /// pooled probabilities over the checked rows' blocks.
    map_ms: Option<(f64, f64)>,
    map_err: Option<f64>,
    /// Our useful TFLOP/s over each peer's.
    ratios: BTreeMap<String, f64>,
    /// `--sandwich`: our median ms before and after the peers (`time_ms` is their mean).
    passes_ms: Vec<f64>,
    #[serde(skip)]
    useful_flops: f64,
}

#[derive(Serialize)]
struct PeerCfg {
    id: usize,
    batch: usize,
    heads: usize,
    kv_heads: usize,
    n: usize,
    d: usize,
    dtype: String,
    mask: String,
    window: usize,
    docs: usize,
    grid: usize,
    kernel: usize,
    decode: bool,
}

#[derive(Serialize)]
struct PeerJob<'a> {
    /// Time `.backward()` instead of the forward.
    backward: bool,
    /// The peers to time (names of `PEERS`).
    peers: Vec<String>,
    /// `--sustain`: seconds of back-to-back launches before each peer's timing.
    sustain_s: f64,
    configs: &'a [PeerCfg],
}

pub fn main(a: &Args) -> Result<()> {
    let masks: Vec<String> = match &a.masks {
        Some(s) => parse_list(s, "mask", |x| {
            MASKS.iter().find(|m| m.0 == x).map(|m| m.0.to_string())
        })?,
        None => [
            "full",
            "causal",
            "sliding_window",
            "document",
            "neighborhood2d",
        ]
        .map(String::from)
        .to_vec(),
    };
    let lens = match &a.lens {
        Some(s) => parse_list(s, "length", parse_len)?,
        None if a.quick => vec![4096],
        None => vec![1024, 4096, 16384, 65536],
    };
    let dims = match &a.dims {
        Some(s) => parse_list(s, "head dim", |x| x.parse().ok().filter(|&d: &usize| d > 0))?,
        None => vec![64, 128],
    };
    let dtypes = match &a.dtypes {
        Some(s) => parse_list(s, "dtype", DType::parse)?,
        None => vec![DType::BF16],
    };
    let compare = match a.compare.as_deref() {
        None => false,
        Some("torch") => true,
        Some(x) => bail!("--compare {x}: the only peer is `torch`"),
    };
    let peers: Vec<String> = match &a.peers {
        Some(s) => parse_list(s, "peer", |x| {
            PEERS.iter().find(|p| **p == x).map(|p| p.to_string())
        })
        .with_context(|| format!("--peers: known peers are {}", PEERS.join(", ")))?,
        None => PEERS.map(String::from).to_vec(),
    };
    if a.peers.is_some() && !compare {
        bail!("--peers chooses among the peers of --compare torch; add --compare torch");
    }
    if a.sandwich && !compare {
        bail!(
            "--sandwich times ours again after the peers of --compare torch; add --compare torch"
        );
    }
    let dev = CudaDevice::open(a.device)?;
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    println!(
        "device: {} (sm_{}{}, {} SMs); tokens per config {}, model dim {}",
        dev.name, dev.cc.0, dev.cc.1, dev.sms, a.tokens, a.model_dim
    );

    let mut configs = Vec::new();
    for &n in &lens {
        for m in &masks {
            for &d in &dims {
                for &dt in &dtypes {
                    configs.push((m.clone(), n, d, dt));
                }
            }
        }
    }
    let pb = ProgressBar::new(configs.len() as u64);
    pb.set_style(
        ProgressStyle::with_template("[{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut rows = Vec::new();
    let mut peer_cfgs = Vec::new();
    for (id, (m, n, d, dt)) in configs.into_iter().enumerate() {
        pb.set_message(format!("{m} n={} D={d} {dt}", fmt_len(n)));
        let hq = (a.model_dim / d).max(1);
        let hk = a.kv_heads.unwrap_or(hq);
        let batch = (a.tokens / n).max(1);
        let mut row = Row {
            id,
            mask: m.clone(),
            n,
            d,
            dtype: dt.to_string(),
            batch,
            heads: hq,
            kv_heads: hk,
            ..Default::default()
        };
        match mask_expr(&m, n) {
            Err(e) => {
                row.status = "skipped".into();
                row.note = e;
            }
            Ok((expr, docs)) => {
                row.expr = expr.clone();
                if let Err(e) = run_one(&dev, a, &mut row, &expr, docs) {
                    row.status = "error".into();
                    row.note = format!("{e:#}");
                }
                let (window, grid, kernel) = peer_geometry(&expr);
                peer_cfgs.push(PeerCfg {
                    id,
                    batch,
                    heads: hq,
                    kv_heads: hk,
                    n,
                    d,
                    dtype: dt.to_string(),
                    mask: m.clone(),
                    window,
                    docs: docs.unwrap_or(0),
                    grid,
                    kernel,
                    decode: false,
                });
            }
        }
        pb.println(format!(
            "{:<15} n {:>6} D {:>3} B {:>2} H {:>2}: {} {}",
            row.mask,
            fmt_len(n),
            d,
            batch,
            hq,
            row.status,
            row.tflops
                .map(|t| format!("{t:.1} TFLOP/s ({:.3} ms)", row.time_ms.unwrap_or(0.0)))
                .unwrap_or_else(|| row.note.clone())
        ));
        rows.push(row);
        pb.inc(1);
    }
    pb.finish_and_clear();

    // Decode: batch 32, 8k tokens, 32 query / 8 KV heads, D 128 (the target problem).
    let dcfg = longattn::cuda::decode::DecodeBenchConfig::default();
    let decode_id = rows.len() + 1_000_000;
    let mut decode_rows = match a.backward {
        true => Vec::new(),
        false => match longattn::cuda::decode::bench(&dev, &dcfg) {
            Ok(r) => r,
            Err(e) => {
                println!("decode bench failed: {e}");
                Vec::new()
            }
        },
    };
    let mut decode_sdpa_ms = None;
    peer_cfgs.extend((!a.backward).then_some(PeerCfg {
        id: decode_id,
        batch: dcfg.batch,
        heads: dcfg.hq,
        kv_heads: dcfg.hk,
        n: dcfg.len,
        d: dcfg.d,
        dtype: dcfg.dtype.to_string(),
        mask: "full".into(),
        window: 0,
        docs: 0,
        grid: 0,
        kernel: 0,
        decode: true,
    }));

    let mut torch_version = None;
    if compare {
        println!(
            "running the peers ({}) on {} ...",
            peers.join(", "),
            dev.name
        );
        // Our device memory is released before the peers start (each config freed its own).
        let dir = a.out.join(".peer");
        std::fs::create_dir_all(&dir)?;
        let by_id: BTreeMap<usize, usize> =
            rows.iter().enumerate().map(|(i, r)| (r.id, i)).collect();
        let v = peer::run_script(
            &dir,
            "peer_torch_cuda.py",
            PEER_SCRIPT,
            &PeerJob {
                backward: a.backward,
                peers: peers.clone(),
                sustain_s: a.sustain,
                configs: &peer_cfgs,
            },
            |l| {
                let (Some(id), Some(p)) = (
                    l.get("id").and_then(|x| x.as_u64()),
                    l.get("peer").and_then(|x| x.as_str()),
                ) else {
                    return;
                };
                if id as usize == decode_id {
                    decode_sdpa_ms = l.get("ms").and_then(|x| x.as_f64());
                    return;
                }
                let Some(&i) = by_id.get(&(id as usize)) else {
                    return;
                };
                let r = &mut rows[i];
                if let Some(ms) = l.get("ms").and_then(|x| x.as_f64()) {
                    r.peers_ms.insert(p.into(), ms);
                    if let Some(t) = r.tflops {
                        let theirs = r.useful_flops / (ms * 1e-3) / 1e12;
                        r.ratios.insert(p.into(), t / theirs);
                    }
                }
                if let Some(e) = l.get("error").and_then(|x| x.as_str()) {
                    r.peer_notes.insert(p.into(), e.chars().take(160).collect());
                }
                if let Some(b) = l.get("build_ms").and_then(|x| x.as_f64()) {
                    r.flex_build_ms = Some(b);
                }
            },
        );
        match v {
            Ok(v) => torch_version = Some(v),
            Err(e) => println!("peer run failed: {e:#}"),
        }
        if a.sandwich {
            sandwich(&dev, a, &mut rows);
        }
    }
    decode_rows.sort_by_key(|r| r.name.clone());
    report(a, &dev, &rows, torch_version)?;
    if a.backward {
        return Ok(());
    }
    report_decode(a, &dcfg, &decode_rows, decode_sdpa_ms)
}

fn report_decode(
    a: &Args,
    cfg: &longattn::cuda::decode::DecodeBenchConfig,
    rows: &[longattn::cuda::decode::DecodeBenchRow],
    sdpa_ms: Option<f64>,
) -> Result<()> {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "\ndecode: batch {}, {} tokens, {} query / {} KV heads, D {}, {} (bytes = K + V + q + o)\n",
        cfg.batch, cfg.len, cfg.hq, cfg.hk, cfg.d, cfg.dtype
    );
    let _ = writeln!(md, "| kernel | splits | ms (median) | GB/s | vs SDPA |");
    let _ = writeln!(md, "|---|---|---|---|---|");
    let bytes = rows
        .iter()
        .find(|r| r.name == "contiguous")
        .map(|r| r.bytes);
    for r in rows {
        let vs = sdpa_ms
            .filter(|_| !r.name.starts_with("copy"))
            .map(|s| format!("{:.2}", s / r.ms_median))
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            md,
            "| {} | {} | {:.4} | {:.0} | {vs} |",
            r.name, r.num_splits, r.ms_median, r.gbps
        );
    }
    if let (Some(ms), Some(b)) = (sdpa_ms, bytes) {
        let _ = writeln!(
            md,
            "| PyTorch SDPA (contiguous, GQA) | - | {ms:.4} | {:.0} | 1.00 |",
            b as f64 / (ms * 1e-3) / 1e9
        );
    }
    print!("{md}");
    let mut all = std::fs::read_to_string(a.out.join("report_cuda.md")).unwrap_or_default();
    all.push_str(&md);
    std::fs::write(a.out.join("report_cuda.md"), all)?;
    Ok(())
}

/// Window / grid / kernel of an expression, for the peer's mask_mod.
fn peer_geometry(expr: &str) -> (usize, usize, usize) {
    let nums = |s: &str| -> Vec<usize> {
        s.split(|c: char| !c.is_ascii_digit())
            .filter_map(|x| x.parse().ok())
            .collect()
    };
    if let Some(r) = expr.split("window(").nth(1) {
        return (nums(r).first().copied().unwrap_or(0), 0, 0);
    }
    if let Some(r) = expr.strip_prefix("neighborhood2d(") {
        let v = nums(r);
        return (0, v[0], v[2]);
    }
    (0, 0, 0)
}

/// `--sandwich`: every timed attention config again (same inputs: the seed follows the config's
/// id; the decode rows are timed once), ours then the mean of the two passes, TFLOP/s and the
/// ratios to the peers recomputed from it. A second pass that fails leaves the first pass's
/// figures and says so.
fn sandwich(dev: &std::sync::Arc<CudaDevice>, a: &Args, rows: &mut [Row]) {
    println!("timing ours again after the peers (--sandwich) ...");
    for r in rows.iter_mut().filter(|r| r.time_ms.is_some()) {
        let mut again = Row {
            time_ms: None,
            ..r.clone()
        };
        let before = r.time_ms.unwrap_or(0.0);
        let pass = mask_expr(&r.mask, r.n)
            .map_err(|e| anyhow::anyhow!(e))
            .and_then(|(expr, docs)| run_one(dev, a, &mut again, &expr, docs));
        match pass {
            Ok(()) => {
                let after = again.time_ms.unwrap_or(before);
                let ms = 0.5 * (before + after);
                r.passes_ms = vec![before, after];
                r.time_ms = Some(ms);
                r.tflops = Some(r.useful_flops / (ms * 1e-3) / 1e12);
                if let (Some(d0), Some(d1)) = (r.det_ms, again.det_ms) {
                    r.det_ms = Some(0.5 * (d0 + d1));
                }
                for (p, theirs_ms) in &r.peers_ms {
                    r.ratios.insert(p.clone(), theirs_ms / ms);
                }
                println!(
                    "{:<15} n {:>6} D {:>3} {}: ours {before:.3} ms before, {after:.3} ms after the peers",
                    r.mask,
                    fmt_len(r.n),
                    r.d,
                    r.dtype
                );
            }
            Err(e) => println!(
                "{} n {} D {} {}: second pass failed, first pass kept: {e:#}",
                r.mask,
                fmt_len(r.n),
                r.d,
                r.dtype
            ),
        }
    }
}

fn run_one(
    dev: &std::sync::Arc<CudaDevice>,
    a: &Args,
    row: &mut Row,
    expr: &str,
    docs: Option<usize>,
) -> Result<()> {
    let dt = DType::parse(&row.dtype).context("dtype")?;
    let (n, d, batch, hq, hk) = (row.n, row.d, row.batch, row.heads, row.kv_heads);
    let inputs = random_inputs(dt, batch, n, n, hq, hk, d, a.seed + row.id as u64, docs)?;
    let ids = inputs.q_doc.clone().zip(inputs.k_doc.clone());
    let mask = bind_mask(expr, batch, n, n, ids)?;
    let dims = Dims {
        batch,
        sq: n,
        sk: n,
        hq,
        hk,
        d,
        dv: d,
    };
    let params = AttnParams::default();
    let spec = if expr == "full" {
        MaskSpec::Full
    } else {
        MaskSpec::Expr(&mask)
    };
    let plan = FwdPlan::new(dev, dims, dt, &params, spec)?;
    let sched: Vec<f64> = (0..3)
        .map(|_| FwdPlan::new(dev, dims, dt, &params, spec).map(|p| p.schedule_seconds))
        .collect::<longattn::Result<_>>()?;
    row.schedule_ms = Some(median(sched) * 1e3);
    (row.tiles_full, row.tiles_partial) = plan.tile_counts;
    let pairs: u64 = (0..batch).map(|b| mask.allowed_pairs(b)).sum();
    row.density = pairs as f64 / (batch * n * n) as f64;
    // Backward: 2.5x the forward's FLOPs (five products instead of two).
    row.useful_flops =
        4.0 * hq as f64 * d as f64 * pairs as f64 * if a.backward { 2.5 } else { 1.0 };

    let (q, k, v) = (
        DevTensor::upload(dev, "q", &inputs.q.view("q")?)?,
        DevTensor::upload(dev, "k", &inputs.k.view("k")?)?,
        DevTensor::upload(dev, "v", &inputs.v.view("v")?)?,
    );
    let mut o = DevTensor::alloc(dev, [batch, n, hq, d], dt)?;
    let mut lse = dev.alloc_f32(batch * hq * n)?;
    plan.launch(&q, &k, &v, &mut o, &mut lse)?;
    dev.synchronize()?;
    let got = AttnOutput {
        out: o.download(dev)?,
        lse: dev.download(&lse)?,
    };
    let rows_checked = spread_rows(n, a.check_rows);
    let chk = check_rows(&inputs, &mask, &params, &got, &rows_checked, &[0, hq - 1])?;
    row.check_rel_err = Some(chk.rel_err);
    row.check_lse_err = Some(chk.lse_err);
    if !(chk.rel_err <= tolerance(dt) && chk.lse_err <= 1e-3) {
        row.status = "FAILED".into();
        row.note = format!("rel err {:.2e}, lse err {:.2e}", chk.rel_err, chk.lse_err);
        return Ok(());
    }
    let ms = if a.backward {
        let dout = longattn::testing::random_tensor(
            dt,
            &[batch, n, hq, d],
            1.0,
            a.seed ^ 0xd0 ^ row.id as u64,
        );
        let dod = DevTensor::upload(dev, "do", &dout.view("do")?)?;
        let plan_of = |deterministic: bool| {
            BwdPlan::new(
                dev,
                dims,
                dt,
                &params,
                spec,
                &longattn::BackwardParams {
                    deterministic,
                    ..Default::default()
                },
            )
        };
        let (fast, det) = (plan_of(false)?, plan_of(true)?);
        let (mut dq, mut dk, mut dv) = (
            DevTensor::alloc(dev, [batch, n, hq, d], dt)?,
            DevTensor::alloc(dev, [batch, n, hk, d], dt)?,
            DevTensor::alloc(dev, [batch, n, hk, d], dt)?,
        );
        // dQ rows of both modes against the f64 gradient oracle (cost grows with n^2: to 16k).
        // A plan built for a timing experiment (`LONGATTN_CUDA_BWD_KNOCK`: parts of the kernel
        // dropped) gives wrong gradients on purpose: not checked, and said so.
        for bp in [&fast, &det] {
            bp.launch(&q, &k, &v, &o, &lse, &dod, &mut dq, &mut dk, &mut dv)?;
            dev.synchronize()?;
            if bp.timing_experiment() {
                row.note = "timing experiment (LONGATTN_CUDA_BWD_KNOCK): dq not checked".into();
                continue;
            }
            if n > 16384 {
                row.note = "dq not checked here (n > 16k; the selftest covers it)".into();
                continue;
            }
            let rows_checked = spread_rows(n, a.check_rows.min(8));
            let (qv, kv, vv) = (
                inputs.q.view("q")?,
                inputs.k.view("k")?,
                inputs.v.view("v")?,
            );
            let got_dq = dq.download(dev)?;
            let e = check_dq_rows(
                &qv,
                &kv,
                &vv,
                &dout.view("do")?,
                &params,
                &mask,
                &got_dq,
                &rows_checked,
                &[0, hq - 1],
            )?;
            row.check_rel_err = Some(row.check_rel_err.unwrap_or(0.0).max(e));
            if e.is_nan() || e > longattn::testing::grad_tolerance(dt) {
                row.status = "FAILED".into();
                row.note = format!("dq rel err {e:.2e}");
                return Ok(());
            }
        }
        let mut time = |bp: &BwdPlan| -> Result<f64> {
            time_like_do_bench(dev, a, || {
                bp.launch(&q, &k, &v, &o, &lse, &dod, &mut dq, &mut dk, &mut dv)
            })
        };
        // Fast mode first: the row's launches 3 to 8 are its first run and its five estimate
        // runs (after the two checks), where profilers skip to with `--launch-skip 4`.
        let fast_ms = time(&fast)?;
        row.det_ms = Some(time(&det)?);
        fast_ms
    } else {
        let ms = time_like_do_bench(dev, a, || plan.launch(&q, &k, &v, &mut o, &mut lse))?;
        if let Some(block) = a.map {
            let mp = FwdPlan::with_map(dev, dims, dt, &params, spec, block)?;
            let shape = mp.map_shape().unwrap_or_default();
            let cells: usize = shape.iter().product();
            let (mut mass, mut max) = (dev.alloc_f32(cells)?, dev.alloc_f32(cells)?);
            let s = dev.stream().clone();
            mp.launch_map_on(&s, &q, &k, &v, &mut o, &mut lse, &mut mass, &mut max)?;
            dev.synchronize()?;
            row.map_err = Some(check_map_rows(
                &inputs,
                &mask,
                &params,
                (&dev.download(&mass)?, &dev.download(&max)?),
                shape,
                block,
            )?);
            // In turns, so that the clock's drift weighs on both alike.
            let (mut plain, mut with) = (Vec::new(), Vec::new());
            for i in 0..6 {
                for m in [i % 2 == 1, i % 2 == 0] {
                    let t = if m {
                        time_like_do_bench(dev, a, || {
                            mp.launch_map_on(&s, &q, &k, &v, &mut o, &mut lse, &mut mass, &mut max)
                        })?
                    } else {
                        time_like_do_bench(dev, a, || plan.launch(&q, &k, &v, &mut o, &mut lse))?
                    };
                    if m { &mut with } else { &mut plain }.push(t);
                }
            }
            row.map_ms = Some((median(with), median(plain)));
        }
        ms
    };
    row.time_ms = Some(ms);
    row.tflops = Some(row.useful_flops / (ms * 1e-3) / 1e12);
    row.status = "ok".into();
    Ok(())
}

/// The largest error of a GPU map against the f64 oracle's probabilities pooled the same way,
/// over the map blocks of a few query blocks (first, middle, last) of heads 0 and Hq - 1 and
/// batch row 0: mass and max, each absolute (both lie in [0, 1]).
fn check_map_rows(
    inputs: &longattn::io::Inputs,
    mask: &longattn::mask::BoundMask,
    params: &AttnParams,
    (mass, max): (&[f32], &[f32]),
    [_, hq, nqb, nkb]: [usize; 4],
    block: usize,
) -> Result<f64> {
    let (q, k) = (&inputs.q, &inputs.k);
    let (sq, d, sk, hk) = (q.shape[1], q.shape[3], k.shape[1], k.shape[2]);
    let f64s = |t: &longattn::Tensor| -> Vec<f64> {
        t.data.to_f32_vec().into_iter().map(f64::from).collect()
    };
    let (qf, kf) = (f64s(q), f64s(k));
    let scale = params.scale_for(d) as f64;
    let mut worst = 0f64;
    let mut qbs = vec![0, nqb / 2, nqb - 1];
    qbs.dedup();
    for h in [0, hq - 1] {
        let kh = h / (hq / hk);
        for &qb in &qbs {
            let rows = (qb * block)..((qb + 1) * block).min(sq);
            let nrows = rows.len() as f64;
            let (mut sum, mut top) = (vec![0f64; nkb], vec![0f64; nkb]);
            for i in rows {
                let qi = &qf[(i * hq + h) * d..][..d];
                let logits: Vec<f64> = (0..sk)
                    .map(|j| {
                        if !mask.allowed(0, i, j) {
                            return f64::NEG_INFINITY;
                        }
                        let kj = &kf[(j * hk + kh) * d..][..d];
                        scale * qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>()
                    })
                    .collect();
                let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                if m == f64::NEG_INFINITY {
                    continue;
                }
                let z: f64 = logits.iter().map(|&x| (x - m).exp()).sum();
                for (j, &x) in logits.iter().enumerate() {
                    let p = (x - m).exp() / z;
                    sum[j / block] += p / nrows;
                    top[j / block] = top[j / block].max(p);
                }
            }
            for kb in 0..nkb {
                let at = (h * nqb + qb) * nkb + kb;
                worst = worst
                    .max((mass[at] as f64 - sum[kb]).abs())
                    .max((max[at] as f64 - top[kb]).abs());
            }
        }
    }
    Ok(worst)
}

/// Bytes zeroed before every timed run to flush L2, as `triton.testing.do_bench` does.
const FLUSH_BYTES: usize = 256 << 20;
/// `do_bench`'s span of timed runs, in ms (its `rep`, as the peers call it).
const REP_MS: f64 = 100.0;

/// Our time of one config, in ms, by `triton.testing.do_bench`'s protocol, which times the
/// peers (`peer_torch_cuda.py`), so that both sides put the same load on the device before and
/// while they are timed (under sustained load the power cap lowers the clock: a side timed
/// longer, or without the flushes' pauses, runs slower). One run and a synchronization; five
/// runs each after an L2 flush estimate a run's time t (flushes included, as there); the
/// warm-up, `do_bench_counts(t, ..).0` runs back to back; then `.1` timed runs, each after a
/// flush, enqueued without synchronizing; the median. The warm-up is 25 ms, or `--sustain`
/// seconds.
fn time_like_do_bench(
    dev: &CudaDevice,
    a: &Args,
    mut launch: impl FnMut() -> longattn::Result<()>,
) -> Result<f64> {
    let mut flush = dev.scratch(FLUSH_BYTES)?;
    launch()?;
    dev.synchronize()?;
    let five = dev.time_ms(|| {
        for _ in 0..5 {
            dev.zero(&mut flush)?;
            launch()?;
        }
        Ok(())
    })?;
    let (warm, runs) = do_bench_counts(five / 5.0, warmup_ms(a.sustain), REP_MS, a.reps);
    for _ in 0..warm {
        launch()?;
    }
    Ok(median(dev.time_runs(runs, &mut flush, launch)?))
}

/// `do_bench`'s warm-up in ms: 25, or `--sustain` seconds (the peer script takes the same).
fn warmup_ms(sustain_s: f64) -> f64 {
    (1000.0 * sustain_s).max(25.0)
}

/// `do_bench`'s run counts for an estimated run of `estimate_ms`: max(1, warmup / t) warm-up
/// runs and max(1, rep / t) timed runs (truncated, as Python's `int`), here at least `min_runs`
/// (`--reps`). The estimate includes the flushes (~0.1 ms), so t is never near 0; the counts
/// are capped all the same (10^7 warm-up runs, 10^4 timed ones, whose events are held).
fn do_bench_counts(
    estimate_ms: f64,
    warmup_ms: f64,
    rep_ms: f64,
    min_runs: usize,
) -> (usize, usize) {
    let t = estimate_ms.max(1e-6);
    let count = |span: f64, cap: usize| ((span / t) as usize).clamp(1, cap);
    (
        count(warmup_ms, 10_000_000),
        count(rep_ms, 10_000).max(min_runs),
    )
}

fn report(a: &Args, dev: &CudaDevice, rows: &[Row], torch: Option<String>) -> Result<()> {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "longattn bench --backend cuda{}, {} on {} (torch {}), {} tokens per config, model dim {}\n",
        if a.backward { " --backward (TFLOP/s count 2.5x the forward's FLOPs)" } else { "" },
        now_utc(),
        dev.name,
        torch.as_deref().unwrap_or("not run"),
        a.tokens,
        a.model_dim
    );
    let _ = writeln!(
        md,
        "| mask | n | D | B x H | ours ms | ours TFLOP/s | FA2 (SDPA flash) | cuDNN | Flex | FA4 | ours/FA2 | ours/cuDNN | ours/Flex | ours/FA4 | schedule ms | Flex build ms | check |"
    );
    let _ = writeln!(
        md,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    let tf = |r: &Row, p: &str| -> String {
        r.peers_ms
            .get(p)
            .map(|ms| format!("{:.0}", r.useful_flops / (ms * 1e-3) / 1e12))
            .unwrap_or_else(|| "-".into())
    };
    let ra = |r: &Row, p: &str| {
        r.ratios
            .get(p)
            .map(|x| format!("{x:.2}"))
            .unwrap_or_else(|| "-".into())
    };
    for r in rows {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {}x{} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.mask,
            fmt_len(r.n),
            r.d,
            r.batch,
            r.heads,
            r.time_ms
                .map(|x| format!("{x:.3}"))
                .unwrap_or_else(|| r.status.clone()),
            r.tflops
                .map(|x| format!("{x:.0}"))
                .unwrap_or_else(|| "-".into()),
            tf(r, PEERS[0]),
            tf(r, PEERS[1]),
            tf(r, PEERS[2]),
            tf(r, PEERS[3]),
            ra(r, PEERS[0]),
            ra(r, PEERS[1]),
            ra(r, PEERS[2]),
            ra(r, PEERS[3]),
            r.schedule_ms
                .map(|x| format!("{x:.3}"))
                .unwrap_or_else(|| "-".into()),
            r.flex_build_ms
                .map(|x| format!("{x:.2}"))
                .unwrap_or_else(|| "-".into()),
            r.check_rel_err
                .map(|x| format!("{x:.1e}"))
                .unwrap_or_else(|| r.note.clone()),
        );
    }
    for r in rows.iter().filter(|r| r.det_ms.is_some()) {
        let _ = writeln!(
            md,
            "\n{} n {} D {}: deterministic mode {:.3} ms ({:.0} TFLOP/s), fast mode {:.3} ms",
            r.mask,
            fmt_len(r.n),
            r.d,
            r.det_ms.unwrap_or(0.0),
            r.useful_flops / (r.det_ms.unwrap_or(1.0) * 1e-3) / 1e12,
            r.time_ms.unwrap_or(0.0)
        );
    }
    for r in rows.iter() {
        if let (Some((with, plain)), Some(err)) = (r.map_ms, r.map_err) {
            let _ = writeln!(
                md,
                "\n{} n {} D {}: forward with the pooled map {:.3} ms, without {:.3} ms (in turns, medians of 6): +{:.1}%; map max error vs f64 {:.1e}",
                r.mask,
                fmt_len(r.n),
                r.d,
                with,
                plain,
                100.0 * (with / plain - 1.0),
                err
            );
        }
    }
    for p in PEERS {
        let v: Vec<(f64, &Row)> = rows
            .iter()
            .filter(|r| r.mask == "full" || r.mask == "causal")
            .filter_map(|r| r.ratios.get(p).map(|&x| (x, r)))
            .collect();
        if let Some(summary) = ratio_summary(&v) {
            let _ = writeln!(md, "\ngeometric mean ours/{p} over full+causal: {summary}");
        }
    }
    if let Some(line) = longest_against_16k(rows) {
        let _ = writeln!(md, "\n{line}");
    }
    if let Some(line) = in_process_against_fa4(rows) {
        let _ = writeln!(md, "\n{line}");
    }
    let notes: Vec<String> = rows
        .iter()
        .flat_map(|r| {
            r.peer_notes
                .iter()
                .map(move |(p, e)| format!("- {} n {} D {}: {p}: {e}", r.mask, r.n, r.d))
        })
        .collect();
    if !notes.is_empty() {
        let _ = writeln!(md, "\npeer notes:\n{}", notes.join("\n"));
    }
    print!("{md}");
    std::fs::write(a.out.join("report_cuda.md"), &md)?;
    std::fs::write(
        a.out.join("report_cuda.json"),
        serde_json::to_vec_pretty(rows)?,
    )?;
    Ok(())
}

/// Our TFLOP/s at the longest length run against 16k, per (mask, D, dtype) timed at both (issue
/// 14's floor: the forward at 64k within 5% of 16k), e.g. "n 64k against 16k (TFLOP/s): full D
/// 64 -0.9%, causal D 64 +4.8%"; `None` when no config has both lengths.
fn longest_against_16k(rows: &[Row]) -> Option<String> {
    const BASE: usize = 16384;
    let longest = rows
        .iter()
        .filter(|r| r.tflops.is_some())
        .map(|r| r.n)
        .max()?;
    if longest <= BASE {
        return None;
    }
    let at = |r: &Row, n: usize| {
        rows.iter()
            .find(|x| x.n == n && x.mask == r.mask && x.d == r.d && x.dtype == r.dtype)
            .and_then(|x| x.tflops)
    };
    let parts: Vec<String> = rows
        .iter()
        .filter(|r| r.n == longest)
        .filter_map(|r| {
            let (long, base) = (at(r, longest)?, at(r, BASE)?);
            Some(format!(
                "{} D {} {:+.1}%",
                r.mask,
                r.d,
                100.0 * (long / base - 1.0)
            ))
        })
        .collect();
    (!parts.is_empty()).then(|| {
        format!(
            "n {} against 16k (TFLOP/s): {}",
            fmt_len(longest),
            parts.join(", ")
        )
    })
}

/// Peer name of our kernels timed inside the peers' process (`peer_torch_cuda.py`: the Python
/// package's `flash_attn_func` on FA4's tensors, just before and just after FA4, same
/// `do_bench`), where that process can import the package.
const OURS_PY: &str = "ours_py";

/// "ours timed in the peers' process ...: geometric mean ours/FA4 G (N configs; lowest L at
/// ...); speed of ours timed from Rust against in-process R": the ratio with both sides timed
/// by one timer in one process (full and causal configs that have both times), and how our own
/// harness's times compare with the in-process ones (geometric mean of Python ms / Rust ms, a
/// speed ratio). None when no row has both.
fn in_process_against_fa4(rows: &[Row]) -> Option<String> {
    let mut rust_vs_py = Vec::new();
    let v: Vec<(f64, &Row)> = rows
        .iter()
        .filter(|r| r.mask == "full" || r.mask == "causal")
        .filter_map(|r| {
            let (py, fa4) = (r.peers_ms.get(OURS_PY)?, r.peers_ms.get("fa4")?);
            rust_vs_py.push(py / r.time_ms?);
            Some((fa4 / py, r))
        })
        .collect();
    Some(format!(
        "ours timed in the peers' process (the Python package, before and after FA4, same do_bench): geometric mean ours/fa4 {}; speed of ours timed from Rust against in-process {:.3}",
        ratio_summary(&v)?,
        geo_mean(&rust_vs_py),
    ))
}

/// Geometric mean of `x` (non-empty, positive).
fn geo_mean(x: &[f64]) -> f64 {
    (x.iter().map(|v| v.ln()).sum::<f64>() / x.len() as f64).exp()
}

/// "G (N configs; lowest L at MASK n LEN D D)" over per-config ratios; `None` when empty.
fn ratio_summary(v: &[(f64, &Row)]) -> Option<String> {
    let &(lo, w) = v.iter().min_by(|a, b| a.0.total_cmp(&b.0))?;
    let ratios: Vec<f64> = v.iter().map(|x| x.0).collect();
    Some(format!(
        "{:.3} ({} configs; lowest {lo:.3} at {} n {} D {})",
        geo_mean(&ratios),
        v.len(),
        w.mask,
        fmt_len(w.n),
        w.d
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The in-process ratio is FA4's time over ours-in-Python per config; the second figure
    /// compares our Rust-timed ms with the in-process ones; rows without both are left out.
    #[test]
    fn in_process_ratio_against_fa4() {
        let row = |mask: &str, n: usize, rust: f64, py: Option<f64>, fa4: f64| {
            let mut r = Row {
                mask: mask.into(),
                n,
                d: 64,
                time_ms: Some(rust),
                ..Default::default()
            };
            r.peers_ms.insert("fa4".into(), fa4);
            if let Some(py) = py {
                r.peers_ms.insert(OURS_PY.into(), py);
            }
            r
        };
        let rows = vec![
            row("full", 4096, 1.10, Some(1.00), 1.02),
            row("causal", 4096, 0.50, Some(0.55), 0.50),
            row("full", 16384, 4.0, None, 3.9),
            row("window", 4096, 1.0, Some(1.0), 1.0),
        ];
        let line = in_process_against_fa4(&rows).unwrap();
        // ratios 1.02 and 0.909..: geometric mean 0.963; Python / Rust 0.909.. and 1.1: 1.0
        assert!(
            line.contains(
                "geometric mean ours/fa4 0.963 (2 configs; lowest 0.909 at causal n 4k D 64)"
            ),
            "{line}"
        );
        assert!(
            line.ends_with("from Rust against in-process 1.000"),
            "{line}"
        );
        assert_eq!(in_process_against_fa4(&rows[2..3]), None);
    }

    /// The longest length against 16k: per (mask, D) timed at both, signed percent; nothing
    /// without a length above 16k or without its 16k partner.
    #[test]
    fn longest_length_is_set_against_16k() {
        let row = |mask: &str, n: usize, d: usize, tflops: f64| Row {
            mask: mask.into(),
            n,
            d,
            dtype: "bf16".into(),
            tflops: Some(tflops),
            ..Default::default()
        };
        let rows = vec![
            row("full", 4096, 64, 510.0),
            row("full", 16384, 64, 570.0),
            row("causal", 16384, 64, 538.0),
            row("full", 65536, 64, 565.0),
            row("causal", 65536, 64, 564.0),
            row("full", 65536, 128, 691.0),
        ];
        assert_eq!(
            longest_against_16k(&rows).as_deref(),
            Some("n 64k against 16k (TFLOP/s): full D 64 -0.9%, causal D 64 +4.8%")
        );
        assert_eq!(longest_against_16k(&rows[..3]), None);
        assert_eq!(longest_against_16k(&rows[5..]), None);
    }

    /// The run counts follow `triton.testing.do_bench` (n_warmup = max(1, int(warmup / t)),
    /// n_repeat = max(1, int(rep / t))), ours with at least `--reps` timed runs; the warm-up is
    /// 25 ms or `--sustain` seconds.
    #[test]
    fn run_counts_follow_do_bench() {
        for (t, warm, min, want) in [
            (0.85, 25.0, 3, (29, 117)),  // 4k D 128: 117 runs of ~0.85 ms in 100 ms
            (3.1, 25.0, 3, (8, 32)),     // 16k
            (52.0, 25.0, 3, (1, 3)),     // 64k: do_bench would time 1 run, we time 3
            (52.0, 25.0, 1, (1, 1)),     // with --reps 1 exactly do_bench's
            (3.1, 2000.0, 3, (645, 32)), // --sustain 2
            (0.0, 25.0, 3, (10_000_000, 10_000)), // a zero estimate: the caps
        ] {
            assert_eq!(
                do_bench_counts(t, warm, REP_MS, min),
                want,
                "t {t} warm {warm}"
            );
        }
        assert_eq!(warmup_ms(0.0), 25.0);
        assert_eq!(warmup_ms(0.01), 25.0);
        assert_eq!(warmup_ms(2.0), 2000.0);
    }
}
