//! `longattn selftest --backend cuda`: the GPU correctness matrix (forward, backward, decode,
//! linear attention, the sparse estimator, bad input) against the CPU path / f64 oracle; a pass/fail table, non-zero
//! exit on any failure.
use anyhow::{bail, Result};
use indicatif::{ProgressBar, ProgressStyle};
use longattn::cuda::selftest::{
    backward_cases, check_backward, check_errors, check_forward, check_linear, check_linear_errors,
    check_mask_constants, check_sparse, check_sparse_errors, forward_cases, linear_cases,
    sparse_cases, CaseResult,
};
use longattn::cuda::{CompileSource, CudaDevice};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Backend to test: `cuda` (the CPU path is tested by `cargo test`).
    #[arg(long, default_value = "cuda")]
    backend: String,
    /// GPU ordinal.
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// A small subset (for compute-sanitizer, which is slow).
    #[arg(long)]
    quick: bool,
    /// Only cases whose group and name ("backward bf16 B1 Sq7 ...", "kv kivi ...") contain this
    /// text: `--filter backward`, `--filter kv`, `--filter D128`.
    #[arg(long)]
    filter: Option<String>,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub fn main(a: Args) -> Result<()> {
    if a.backend != "cuda" {
        bail!(
            "selftest --backend {}: only `cuda` has a device selftest (the CPU path is tested by `cargo test --workspace`)",
            a.backend
        );
    }
    let dev = CudaDevice::open(a.device)?;
    let (free, total) = dev.mem_info()?;
    println!(
        "device {}: {} (sm_{}{}, {} SMs, {:.1} of {:.1} GiB free), kernels for {}",
        dev.ordinal,
        dev.name,
        dev.cc.0,
        dev.cc.1,
        dev.sms,
        free as f64 / (1u64 << 30) as f64,
        total as f64 / (1u64 << 30) as f64,
        dev.arch()
    );
    let keep = |name: &str| a.filter.as_ref().is_none_or(|f| name.contains(f.as_str()));
    // Forward and backward case names do not carry their group: the filter reads "group name".
    let cases: Vec<_> = forward_cases(a.quick)
        .into_iter()
        .filter(|c| keep(&format!("forward {}", c.name())))
        .collect();
    let pb = ProgressBar::new(cases.len() as u64);
    pb.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut results: Vec<CaseResult> = Vec::new();
    for (n, c) in cases.iter().enumerate() {
        pb.set_message(c.name());
        results.push(check_forward(&dev, c, 1000 + 17 * n as u64));
        pb.inc(1);
    }
    pb.finish_and_clear();
    let bcases: Vec<_> = backward_cases(a.quick)
        .into_iter()
        .filter(|c| keep(&format!("backward {}", c.name())))
        .collect();
    let pb = ProgressBar::new(bcases.len() as u64);
    for (n, c) in bcases.iter().enumerate() {
        pb.set_message(format!("backward {}", c.name()));
        results.push(check_backward(&dev, c, 5000 + 13 * n as u64));
        pb.inc(1);
    }
    pb.finish_and_clear();
    results.extend(
        longattn::cuda::decode::selftest(&dev)?
            .into_iter()
            .filter(|r| keep(&r.name)),
    );
    // Named `mask constants: ...`; run when the filter could match that prefix.
    if keep("mask constants") {
        results.extend(check_mask_constants(&dev));
    }
    results.extend(check_errors(&dev).into_iter().filter(|r| keep(&r.name)));
    // Linear attention (group `linear`, every case named `linear ...`: `--filter linear`).
    let lcases: Vec<_> = linear_cases(a.quick)
        .into_iter()
        .filter(|c| keep(&c.name()))
        .collect();
    let pb = ProgressBar::new(lcases.len() as u64);
    for (n, c) in lcases.iter().enumerate() {
        pb.set_message(c.name());
        results.push(check_linear(&dev, c, 9000 + 29 * n as u64));
        pb.inc(1);
    }
    pb.finish_and_clear();
    results.extend(
        check_linear_errors(&dev)
            .into_iter()
            .filter(|r| keep(&r.name)),
    );
    // KV-cache compression on the device (group `kv`, every case named `kv ...`).
    let kv_asked = a.filter.as_ref().is_none_or(|f| {
        f.starts_with("kv") || ["quest", "evict", "per-head"].iter().any(|k| f.contains(k))
    });
    if kv_asked {
        results.extend(
            longattn::kv::cuda::selftest(&dev)
                .into_iter()
                .filter(|r| keep(&r.name)),
        );
    }
    // KIVI pages (group `kv`, cases named `kv kivi ...`).
    if kv_asked || a.filter.as_ref().is_some_and(|f| f.contains("kivi")) {
        results.extend(
            longattn::kv::kivi_cuda::selftest(&dev)
                .into_iter()
                .filter(|r| keep(&r.name)),
        );
    }
    // The device sparse estimator (group `sparse`, every case named `sparse ...`).
    let scases: Vec<_> = sparse_cases(a.quick)
        .into_iter()
        .filter(|c| keep(&c.name()))
        .collect();
    let pb = ProgressBar::new(scases.len() as u64);
    for (n, c) in scases.iter().enumerate() {
        pb.set_message(c.name());
        results.push(check_sparse(&dev, c, 12000 + 31 * n as u64));
        pb.inc(1);
    }
    pb.finish_and_clear();
    results.extend(
        check_sparse_errors(&dev)
            .into_iter()
            .filter(|r| keep(&r.name)),
    );
    // Skip-softmax in the forward (group `skip`, every case named `skip ...`).
    results.extend(longattn::sparse::skip_check::selftest(
        &dev,
        a.quick,
        &|n| keep(n),
    ));

    println!(
        "{:<10} {:<62} {:>6} {:>10} {:>10} {:>10}  detail",
        "group", "case", "result", "err", "tol", "lse err"
    );
    for r in &results {
        println!(
            "{:<10} {:<62} {:>6} {:>10.3e} {:>10.3e} {:>10.3e}  {}",
            r.group,
            r.name,
            if r.passed { "pass" } else { "FAIL" },
            r.err,
            r.tol,
            r.lse_err,
            r.detail
        );
    }
    let recs = dev.compile_records();
    let (mut cold, mut warm) = ((0, 0.0), (0, 0.0));
    for r in &recs {
        let e = if r.source == CompileSource::Compiled {
            &mut cold
        } else {
            &mut warm
        };
        e.0 += 1;
        e.1 += r.seconds;
    }
    println!(
        "kernel variants: {} compiled by NVRTC in {:.2} s ({:.3} s each), {} read from the disk cache in {:.3} s",
        cold.0,
        cold.1,
        cold.1 / cold.0.max(1) as f64,
        warm.0,
        warm.1
    );
    if let Some(p) = &a.json {
        let rows: Vec<serde_json::Value> = results
            .iter()
            .map(|r| {
                serde_json::json!({"group": r.group, "case": r.name, "passed": r.passed,
                    "err": finite(r.err), "tol": r.tol, "lse_err": finite(r.lse_err), "detail": r.detail})
            })
            .collect();
        std::fs::write(p, serde_json::to_vec_pretty(&rows)?)?;
    }
    let failed = results.iter().filter(|r| !r.passed).count();
    println!(
        "{} cases: {} passed, {failed} failed",
        results.len(),
        results.len() - failed
    );
    if failed > 0 {
        bail!("{failed} selftest case(s) failed");
    }
    Ok(())
}

fn finite(x: f64) -> serde_json::Value {
    if x.is_finite() {
        serde_json::json!(x)
    } else {
        serde_json::json!(null)
    }
}
