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
    fatal: Option<String>,
    version: Option<String>,
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
    let script = dir.join("peer_torch.py");
    std::fs::write(&script, SCRIPT).with_context(|| format!("{}", script.display()))?;
    let job_path = dir.join("peer_job.json");
    let job = Job {
        threads,
        reps,
        min_time,
        configs,
    };
    std::fs::write(&job_path, serde_json::to_vec_pretty(&job)?)?;
    let mut child = Command::new("python3")
        .arg(&script)
        .arg(&job_path)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot start python3")?;
    let stdout = child.stdout.take().context("no stdout from python3")?;
    let mut version = String::from("unknown");
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        let l: Line = match serde_json::from_str(&line) {
            Ok(l) => l,
            Err(_) => continue, // stray output of torch
        };
        if let Some(f) = l.fatal {
            let _ = child.wait();
            bail!("{f}");
        }
        if let Some(v) = l.version {
            version = v;
        }
        if let Some(id) = l.id {
            on_result(
                id,
                PeerResult {
                    time_s: l.time_s,
                    error: l.error,
                },
            );
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("the torch peer exited with {status}");
    }
    Ok(version)
}
