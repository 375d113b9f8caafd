//! `longattn kv roles`: the head role table of a model for `duo(...)` (DuoAttention /
//! RazorAttention, training-free): the copy / induction probe of `longattn::kv::roles` run on the
//! model, the retrieval heads chosen by ratio or threshold, the table written as JSON for
//! `--kv 'duo(sinks=4,window=256,roles=FILE)'`.
use crate::lm;
use anyhow::{bail, Context, Result};
use longattn::kv::press::runner::PressAttention;
use longattn::kv::press::Press;
use longattn::kv::roles::{self, HeadRoles, RoleSelect};
use std::path::{Path, PathBuf};

/// Tokens of each copy of the probe's random sequence (default).
pub const PROBE_COPY: usize = 256;
/// Seed of the probe's random tokens (default).
pub const PROBE_SEED: u64 = 1;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Subcommand, Debug)]
enum Cmd {
    /// Probe a model's heads (a repeated random sequence) and save the role table as JSON.
    Roles(RolesArgs),
}

#[derive(clap::Args, Debug)]
struct RolesArgs {
    /// The model (GGUF).
    #[arg(long)]
    model: PathBuf,
    /// Where the role table goes (JSON).
    #[arg(long)]
    output: PathBuf,
    /// Fraction of KV heads made retrieval heads (the top scores); default 0.5.
    #[arg(long, conflicts_with = "threshold")]
    ratio: Option<f64>,
    /// Instead of a ratio: every KV head whose retrieval score is at least this.
    #[arg(long)]
    threshold: Option<f64>,
    /// Tokens per copy of the probe's random sequence.
    #[arg(long, default_value_t = PROBE_COPY)]
    copy_len: usize,
    /// Seed of the probe's random tokens.
    #[arg(long, default_value_t = PROBE_SEED)]
    seed: u64,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

pub fn main(a: Args) -> Result<()> {
    match a.cmd {
        Cmd::Roles(r) => {
            let pool = crate::common::pool(r.threads)?;
            pool.install(|| roles_cmd(&r))
        }
    }
}

/// The selection of `--ratio` / `--threshold` (ratio 0.5 when neither is given).
fn select(ratio: Option<f64>, threshold: Option<f64>) -> RoleSelect {
    match (ratio, threshold) {
        (_, Some(t)) => RoleSelect::Threshold(t),
        (r, None) => RoleSelect::Ratio(r.unwrap_or(0.5)),
    }
}

/// Runs the probe on a loaded model (BOS first when the model wants it).
pub fn probe(lm: &lm::Loaded, select: RoleSelect, copy_len: usize, seed: u64) -> Result<HeadRoles> {
    let m = &lm.model;
    let prefix: Vec<u32> = if lm.add_bos {
        lm.tok.bos().into_iter().collect()
    } else {
        Vec::new()
    };
    lm::check_context(m, prefix.len() + 2 * copy_len)?;
    roles::probe(m, &prefix, copy_len, seed, select).context("head role probe")
}

/// Reads a role table written by `kv roles` and checks it against the model.
pub fn read_roles(path: &Path, layers: usize, kv_heads: usize) -> Result<HeadRoles> {
    let b = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let r: HeadRoles = serde_json::from_slice(&b)
        .with_context(|| format!("{}: not a role table (longattn kv roles)", path.display()))?;
    r.check(layers, kv_heads)
        .with_context(|| format!("{}", path.display()))?;
    Ok(r)
}

/// One line per layer: the roles (R retrieval, s streaming) and the scores.
pub fn print_roles(r: &HeadRoles) {
    println!(
        "head roles ({}): {:.1}% of {} KV heads are retrieval heads",
        r.select,
        100.0 * r.retrieval_fraction(),
        r.layers * r.kv_heads
    );
    for (l, (s, k)) in r.scores.iter().zip(&r.retrieval).enumerate() {
        let cells: Vec<String> = s
            .iter()
            .zip(k)
            .map(|(x, &ret)| format!("{}{x:.3}", if ret { 'R' } else { 's' }))
            .collect();
        println!("  layer {l:>2}: {}", cells.join(" "));
    }
}

fn roles_cmd(a: &RolesArgs) -> Result<()> {
    let sel = select(a.ratio, a.threshold);
    sel.check().context("--ratio / --threshold")?;
    if a.copy_len < 2 {
        bail!("--copy-len {}: at least 2 tokens per copy", a.copy_len);
    }
    let lm = lm::load(&a.model)?;
    let r = probe(&lm, sel, a.copy_len, a.seed)?;
    print_roles(&r);
    std::fs::write(&a.output, serde_json::to_string_pretty(&r)?)
        .with_context(|| format!("cannot write {}", a.output.display()))?;
    eprintln!("role table: {}", a.output.display());
    Ok(())
}

/// Gives a `duo` press its head roles: the table of `roles=FILE` (chosen again when the spec
/// gives ratio or threshold), or the probe run on the model now (the spec's ratio or threshold,
/// ratio 0.5 when neither). Nothing for any other press.
pub fn attach_roles(p: &mut PressAttention, lm: &lm::Loaded) -> Result<()> {
    let spec = p.press().clone();
    let Some(Press::Duo { select, .. }) = spec.evict else {
        return Ok(());
    };
    let c = &lm.model.cfg;
    let roles = match &spec.roles {
        Some(path) => {
            let r = read_roles(Path::new(path), c.layers, c.kv_heads).context("--kv roles=")?;
            match select {
                Some(s) => r.reselect(s)?,
                None => r,
            }
        }
        None => probe(
            lm,
            select.unwrap_or(RoleSelect::Ratio(0.5)),
            PROBE_COPY.min(c.context.saturating_sub(1) / 2),
            PROBE_SEED,
        )?,
    };
    eprintln!(
        "duo: {} of {} KV heads are retrieval heads ({})",
        roles.retrieval.iter().flatten().filter(|&&r| r).count(),
        roles.layers * roles.kv_heads,
        roles.select
    );
    p.set_roles(roles)?;
    Ok(())
}
