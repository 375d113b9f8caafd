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
    /// Run the matrix in this many processes at once (each compiles its own kernel variants
    /// with NVRTC and runs its share of the cases on the same GPU; the table is merged). On a
    /// fresh machine compiling dominates (~1.4 s a variant, one at a time): `--jobs 8` on 16
    /// cores cuts it several-fold.
    #[arg(long, default_value_t = 1)]
    jobs: usize,
    /// One process of `--jobs` (internal): this share `K/N` of the cases and groups.
    #[arg(long, hide = true)]
    shard: Option<String>,
}

/// Shard `k` of `n` owns `unit` (a case name, or a group that runs as a whole): by a hash of the
/// name, fixed across runs (FNV-1a).
fn owned(unit: &str, shard: Option<(u64, u64)>) -> bool {
    shard.is_none_or(|(k, n)| {
        let h = unit.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        h % n == k
    })
}

/// `--jobs N`: starts N processes of this binary on shares of the matrix, waits for them, and
/// prints their merged table (and each one's compile summary); fails when any case or process
/// failed.
fn run_jobs(a: &Args) -> Result<()> {
    let exe = std::env::current_exe()?;
    let dir = std::env::temp_dir().join(format!("longattn-selftest-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut children = Vec::new();
    for k in 0..a.jobs {
        let mut cmd = std::process::Command::new(&exe);
        cmd.args(["selftest", "--backend", "cuda", "--device"])
            .arg(a.device.to_string())
            .arg("--shard")
            .arg(format!("{k}/{}", a.jobs))
            .arg("--json")
            .arg(dir.join(format!("{k}.json")));
        if a.quick {
            cmd.arg("--quick");
        }
        if let Some(f) = &a.filter {
            cmd.arg("--filter").arg(f);
        }
        let log = std::fs::File::create(dir.join(format!("{k}.log")))?;
        cmd.stdout(log.try_clone()?).stderr(log);
        children.push(cmd.spawn()?);
    }
    // Each process's rows, its compile summary, and for one that wrote none the end of its log.
    let (mut rows, mut summaries, mut broken) = (Vec::new(), Vec::new(), Vec::new());
    for (k, mut c) in children.into_iter().enumerate() {
        let st = c.wait()?;
        let log = std::fs::read_to_string(dir.join(format!("{k}.log"))).unwrap_or_default();
        summaries.extend(
            log.lines()
                .filter(|l| l.starts_with("kernel variants:") || l.starts_with("device "))
                .map(|l| format!("[{k}] {l}")),
        );
        match std::fs::read(dir.join(format!("{k}.json"))) {
            Ok(b) => rows.extend(serde_json::from_slice::<Vec<serde_json::Value>>(&b)?),
            Err(_) => {
                broken.push(format!("process {k} ({st}) wrote no results"));
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                for l in tail.into_iter().rev() {
                    println!("[{k}] {l}");
                }
            }
        }
    }
    let num = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::INFINITY);
    let results: Vec<CaseResult> = rows
        .iter()
        .map(|r| CaseResult {
            group: group_name(r["group"].as_str().unwrap_or("")),
            name: r["case"].as_str().unwrap_or("").to_string(),
            passed: r["passed"].as_bool().unwrap_or(false),
            err: num(&r["err"]),
            tol: num(&r["tol"]),
            lse_err: num(&r["lse_err"]),
            detail: r["detail"].as_str().unwrap_or("").to_string(),
        })
        .collect();
    for l in &summaries {
        println!("{l}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    finish(a, &results, &broken)
}

/// The groups' names as static strings (results read back from a process's JSON).
fn group_name(g: &str) -> &'static str {
    const GROUPS: &[&str] = &[
        "forward",
        "backward",
        "decode",
        "mask consts",
        "bad input",
        "linear",
        "kv",
        "sparse",
        "skip",
        "map",
        "gather",
        "columns",
    ];
    GROUPS.iter().find(|&&x| x == g).copied().unwrap_or("other")
}

pub fn main(a: Args) -> Result<()> {
    if a.backend != "cuda" {
        bail!(
            "selftest --backend {}: only `cuda` has a device selftest (the CPU path is tested by `cargo test --workspace`)",
            a.backend
        );
    }
    if a.jobs == 0 {
        bail!("--jobs must be >= 1");
    }
    let shard = match &a.shard {
        None => None,
        Some(t) => {
            let parsed = t
                .split_once('/')
                .and_then(|(k, n)| Some((k.parse::<u64>().ok()?, n.parse::<u64>().ok()?)));
            match parsed {
                Some((k, n)) if n >= 1 && k < n => Some((k, n)),
                _ => bail!("--shard {t}: expected K/N with K < N"),
            }
        }
    };
    if a.jobs > 1 && shard.is_none() {
        return run_jobs(&a);
    }
    // A process of `--jobs` ends with its parent (a `timeout` that kills the parent must not
    // leave shares running on the GPU): it checks every second that its parent is the same.
    #[cfg(unix)]
    if shard.is_some() {
        let parent = std::os::unix::process::parent_id();
        std::thread::spawn(move || loop {
            std::thread::sleep(std::time::Duration::from_secs(1));
            if std::os::unix::process::parent_id() != parent {
                eprintln!("selftest share: the parent process ended; stopping");
                std::process::exit(3);
            }
        });
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
    // A case runs when the filter matches it and this process owns it (`--jobs`); a group that
    // runs as a whole (decode, kv, bad input, ...) runs in the one process that owns its name.
    // Seeds follow a case's place in the whole matrix, whatever the filter or share.
    let matches = |name: &str| a.filter.as_ref().is_none_or(|f| name.contains(f.as_str()));
    let keep = |name: &str| matches(name) && owned(name, shard);
    let whole = |group: &str| owned(group, shard);
    let style = ProgressStyle::with_template("{bar:40} {pos}/{len} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    let mut results: Vec<CaseResult> = Vec::new();
    // Forward and backward case names do not carry their group: the filter reads "group name".
    let cases: Vec<_> = forward_cases(a.quick)
        .into_iter()
        .enumerate()
        .filter(|(_, c)| keep(&format!("forward {}", c.name())))
        .collect();
    let pb = ProgressBar::new(cases.len() as u64).with_style(style.clone());
    for (n, c) in &cases {
        pb.set_message(c.name());
        results.push(check_forward(&dev, c, 1000 + 17 * *n as u64));
        pb.inc(1);
    }
    pb.finish_and_clear();
    let bcases: Vec<_> = backward_cases(a.quick)
        .into_iter()
        .enumerate()
        .filter(|(_, c)| keep(&format!("backward {}", c.name())))
        .collect();
    let pb = ProgressBar::new(bcases.len() as u64).with_style(style.clone());
    for (n, c) in &bcases {
        pb.set_message(format!("backward {}", c.name()));
        results.push(check_backward(&dev, c, 5000 + 13 * *n as u64));
        pb.inc(1);
    }
    pb.finish_and_clear();
    if whole("decode") {
        results.extend(
            longattn::cuda::decode::selftest(&dev)?
                .into_iter()
                .filter(|r| matches(&r.name)),
        );
    }
    // Named `mask constants: ...`; run when the filter could match that prefix.
    if matches("mask constants") && whole("mask constants") {
        results.extend(check_mask_constants(&dev));
    }
    if whole("bad input") {
        results.extend(check_errors(&dev).into_iter().filter(|r| matches(&r.name)));
    }
    // Linear attention (group `linear`, every case named `linear ...`: `--filter linear`).
    let lcases: Vec<_> = linear_cases(a.quick)
        .into_iter()
        .enumerate()
        .filter(|(_, c)| keep(&c.name()))
        .collect();
    let pb = ProgressBar::new(lcases.len() as u64).with_style(style.clone());
    for (n, c) in &lcases {
        pb.set_message(c.name());
        results.push(check_linear(&dev, c, 9000 + 29 * *n as u64));
        pb.inc(1);
    }
    pb.finish_and_clear();
    if whole("linear errors") {
        results.extend(
            check_linear_errors(&dev)
                .into_iter()
                .filter(|r| matches(&r.name)),
        );
    }
    // KV-cache compression on the device (group `kv`, every case named `kv ...`).
    let kv_asked = a.filter.as_ref().is_none_or(|f| {
        f.starts_with("kv") || ["quest", "evict", "per-head"].iter().any(|k| f.contains(k))
    });
    if kv_asked && whole("kv") {
        results.extend(
            longattn::kv::cuda::selftest(&dev)
                .into_iter()
                .filter(|r| matches(&r.name)),
        );
    }
    // Press scores (group `kv`, cases named `kv scores ...`).
    if (kv_asked || a.filter.as_ref().is_some_and(|f| f.contains("scores"))) && whole("kv scores") {
        results.extend(
            longattn::kv::score_cuda::selftest(&dev)
                .into_iter()
                .filter(|r| matches(&r.name)),
        );
    }
    // KIVI pages (group `kv`, cases named `kv kivi ...`).
    if (kv_asked || a.filter.as_ref().is_some_and(|f| f.contains("kivi"))) && whole("kivi") {
        results.extend(
            longattn::kv::kivi_cuda::selftest(&dev)
                .into_iter()
                .filter(|r| matches(&r.name)),
        );
    }
    // The device sparse estimator (group `sparse`, every case named `sparse ...`).
    let scases: Vec<_> = sparse_cases(a.quick)
        .into_iter()
        .enumerate()
        .filter(|(_, c)| keep(&c.name()))
        .collect();
    let pb = ProgressBar::new(scases.len() as u64).with_style(style);
    for (n, c) in &scases {
        pb.set_message(c.name());
        results.push(check_sparse(&dev, c, 12000 + 31 * *n as u64));
        pb.inc(1);
    }
    pb.finish_and_clear();
    if whole("sparse errors") {
        results.extend(
            check_sparse_errors(&dev)
                .into_iter()
                .filter(|r| matches(&r.name)),
        );
    }
    // Skip-softmax in the forward (group `skip`, every case named `skip ...`).
    results.extend(longattn::sparse::skip_check::selftest(
        &dev,
        a.quick,
        &|n| keep(n),
    ));
    // The forward's pooled attention map (group `map`, every case named `map ...`).
    results.extend(longattn::cuda::selftest::map_selftest(
        &dev,
        a.quick,
        &|n| keep(n),
    ));
    // Gathered keys in the forward (group `gather`, every case named `gather ...`).
    results.extend(longattn::cuda::selftest::gather_selftest(
        &dev,
        a.quick,
        &|n| keep(n),
    ));
    // `columns` in the gathered form on the device (group `columns`, cases named `columns ...`).
    results.extend(longattn::cuda::selftest::columns_selftest(
        &dev,
        a.quick,
        &|n| keep(n),
    ));

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
    finish(&a, &results, &[])
}

/// Prints the table, writes `--json`, and fails when a case (or a `--jobs` process) failed.
fn finish(a: &Args, results: &[CaseResult], broken: &[String]) -> Result<()> {
    println!(
        "{:<10} {:<62} {:>6} {:>10} {:>10} {:>10}  detail",
        "group", "case", "result", "err", "tol", "lse err"
    );
    for r in results {
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
    for b in broken {
        println!("{b}");
    }
    let failed = results.iter().filter(|r| !r.passed).count();
    println!(
        "{} cases: {} passed, {failed} failed",
        results.len(),
        results.len() - failed
    );
    if failed > 0 || !broken.is_empty() {
        bail!(
            "{failed} selftest case(s) failed{}",
            if broken.is_empty() {
                String::new()
            } else {
                format!(", {} process(es) broke", broken.len())
            }
        );
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

#[cfg(test)]
mod tests {
    /// Every group the library's device selftests report keeps its name when read back from a
    /// worker process's JSON (an unknown one reads as "other").
    #[test]
    fn the_library_groups_keep_their_names() {
        let src = [
            include_str!("../../longattn/src/cuda/selftest.rs"),
            include_str!("../../longattn/src/cuda/decode.rs"),
            include_str!("../../longattn/src/sparse/skip_check.rs"),
            include_str!("../../longattn/src/kv/score_cuda.rs"),
            include_str!("../../longattn/src/kv/kivi_cuda.rs"),
            include_str!("../../longattn/src/kv/cuda.rs"),
        ]
        .concat();
        let mut seen = 0;
        for pat in [
            "CaseResult::checked(\"",
            "CaseResult::refused(\"",
            "group: \"",
        ] {
            for (at, _) in src.match_indices(pat) {
                let rest = &src[at + pat.len()..];
                let g = &rest[..rest.find('"').unwrap()];
                assert_eq!(super::group_name(g), g, "group `{g}`");
                seen += 1;
            }
        }
        assert!(seen >= 10, "only {seen} groups found");
    }
}
