//! `--compare torch`: PyTorch's CPU `scaled_dot_product_attention` run by an embedded Python
//! script (`peer_torch.py`) with the same shapes, dtypes, threads and timing protocol.
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const SCRIPT: &str = include_str!("peer_torch.py");

/// The largest length for which a dense boolean mask is handed to torch (n*n bytes).
pub const DENSE_MASK_MAX: usize = 4096;

#[derive(Serialize, Clone, Debug)]
pub struct PeerConfig {
    pub id: usize,
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub n: usize,
    pub d: usize,
    pub dtype: String,
    /// "none", "causal" or "file".
    pub mask: String,
    pub mask_file: Option<PathBuf>,
    /// Time the backward (`.backward()` of the SDPA output) instead of the forward.
    pub backward: bool,
}

#[derive(Serialize)]
struct Job<'a> {
    threads: usize,
    reps: usize,
    min_time: f64,
    configs: &'a [PeerConfig],
}

#[derive(Deserialize, Debug, Default)]
struct Line {
    id: Option<usize>,
    time_s: Option<f64>,
    error: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct PeerResult {
    pub time_s: Option<f64>,
    pub error: Option<String>,
}

/// Whether `python3 -c "import torch"` works; the reason otherwise.
pub fn torch_available() -> std::result::Result<(), String> {
    match Command::new("python3")
        .args(["-c", "import torch"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => Ok(()),
        Ok(_) => Err("torch is not installed (pip install torch); skipping the peer".into()),
        Err(e) => Err(format!(
            "python3 cannot be started ({e}); skipping the peer"
        )),
    }
}

/// Runs every config; `on_result` is called as each finishes. Returns torch's version.
pub fn run(
    dir: &Path,
    threads: usize,
    reps: usize,
    min_time: f64,
    configs: &[PeerConfig],
    mut on_result: impl FnMut(usize, PeerResult),
) -> Result<String> {
    let job = Job {
        threads,
        reps,
        min_time,
        configs,
    };
    run_script(dir, "peer_torch.py", SCRIPT, &job, |line| {
        let l: Line = serde_json::from_value(line).unwrap_or_default();
        if let Some(id) = l.id {
            on_result(
                id,
                PeerResult {
                    time_s: l.time_s,
                    error: l.error,
                },
            );
        }
    })
}

/// Writes `script` and `job` (as JSON) into `dir`, runs `python3 script job.json` and hands each
/// JSON line of its output to `on_line`. A line `{"fatal": msg}` stops with that error; a line
/// `{"version": v}` gives the returned version. Other output (torch's warnings) is skipped.
pub fn run_script(
    dir: &Path,
    name: &str,
    script: &str,
    job: &impl Serialize,
    mut on_line: impl FnMut(serde_json::Value),
) -> Result<String> {
    let path = dir.join(name);
    std::fs::write(&path, script).with_context(|| format!("{}", path.display()))?;
    let job_path = dir.join(format!("{name}.job.json"));
    std::fs::write(&job_path, serde_json::to_vec_pretty(job)?)?;
    let mut child = Command::new("python3")
        .arg(&path)
        .arg(&job_path)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot start python3")?;
    let stdout = child.stdout.take().context("no stdout from python3")?;
    let mut version = String::from("unknown");
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue; // stray output of torch
        };
        if let Some(f) = v.get("fatal").and_then(|f| f.as_str()) {
            let _ = child.wait();
            bail!("{f}");
        }
        if let Some(ver) = v.get("version").and_then(|f| f.as_str()) {
            version = ver.to_string();
        }
        on_line(v);
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("the torch peer `{name}` exited with {status}");
    }
    Ok(version)
}
