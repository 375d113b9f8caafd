//! `longattn kv roles`: the head role table of a model for `duo(...)` (DuoAttention /
//! RazorAttention, training-free): the copy / induction probe of `longattn::kv::roles` run on the
//! model, the retrieval heads chosen by ratio or threshold, the table written as JSON for
//! `--kv 'duo(sinks=4,window=256,roles=FILE)'`.
//!
//! `longattn kv bench`: one layer's decode on the GPU under compression (full paged cache,
//! per-head cache, Quest, eviction; `longattn::kv::cuda::bench`), with PyTorch SDPA and
//! FlashInfer's paged decode on the full cache in the same run (`peer_kv_cuda.py`).
//!
//! `longattn kv keep`: one prefill-time compression as kvpress does it (the context prefilled in
//! one forward, every layer compressed once, nothing re-encoded), written as JSON: per (layer,
//! KV head) the kept positions and the values the press ranked, the token ids, the cache's
//! memory, and optionally the NLL of the tokens that follow the context, appended uncompressed
//! (`scripts/kvpress_compare.py` runs kvpress on the same ids and compares).
use crate::lm;
use anyhow::{bail, Context, Result};
use longattn::kv::press::runner::PressAttention;
use longattn::kv::press::Press;
use longattn::kv::roles::{self, HeadRoles, RoleSelect};
use longattn::model::ops;
use serde::Serialize;
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
    /// Time decode under compression on the GPU (eviction, Quest) against the full cache and peers.
    Bench(BenchArgs),
    /// Prefill a context, compress it once under a press, write the kept sets as JSON.
    Keep(KeepArgs),
}

#[derive(clap::Args, Debug)]
struct KeepArgs {
    /// The model (GGUF).
    #[arg(long)]
    model: PathBuf,
    /// Text file, tokenized with the model's tokenizer (BOS first when the model wants it).
    #[arg(long, conflicts_with = "ids")]
    text: Option<PathBuf>,
    /// Whitespace-separated token ids instead of a text.
    #[arg(long)]
    ids: Option<PathBuf>,
    /// Token ids skipped at the start of the text or ids.
    #[arg(long, default_value_t = 0)]
    skip: usize,
    /// Tokens of context, prefilled in one forward and compressed once.
    #[arg(long)]
    tokens: usize,
    /// Tokens after the context scored by next-token NLL (appended uncompressed).
    #[arg(long, default_value_t = 0)]
    score: usize,
    /// The press, e.g. `snapkv(budget=0.2,window=64,pool=avg)` (an eviction press alone).
    #[arg(long)]
    kv: String,
    /// How a group's query heads are reduced into one score: mean, max or sum.
    #[arg(long, default_value = "mean")]
    kv_reduce: String,
    /// The model's attention mask.
    #[arg(long, default_value = "causal")]
    attention: String,
    /// Where the JSON goes.
    #[arg(long)]
    json: PathBuf,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

/// One (layer, KV head) of `kv keep`'s JSON.
#[derive(Serialize)]
struct KeptHead {
    layer: usize,
    kv_head: usize,
    /// Positions held after the compression (increasing).
    kept: Vec<u32>,
    /// The value each context position was ranked by (null: kept whatever its score; empty for
    /// presses without scores).
    ranks: Vec<f32>,
}

#[derive(Serialize)]
struct KeepReport {
    model: String,
    kv: String,
    kv_reduce: String,
    attention: String,
    /// Context tokens compressed and tokens scored after them.
    tokens: usize,
    score: usize,
    /// The token ids: the context, then the scored tokens.
    ids: Vec<u32>,
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
    heads: Vec<KeptHead>,
    /// Bytes of the pages in use before and after the compression, and of the entries held after.
    kv_bytes_full: usize,
    kv_bytes: usize,
    kv_bytes_entries: usize,
    pages_freed: usize,
    /// Next-token NLL of each scored token (ids[tokens + i] given everything before), and the mean.
    nll: Vec<f64>,
    nll_mean: Option<f64>,
}

#[derive(clap::Args, Debug)]
struct BenchArgs {
    /// Problems as BATCHxLEN, comma separated (LEN like 8k, 128k).
    #[arg(long, default_value = "32x8k,1x128k,8x128k")]
    configs: String,
    /// Query heads / KV heads / head dim.
    #[arg(long, default_value_t = 32)]
    heads: usize,
    #[arg(long, default_value_t = 8)]
    kv_heads: usize,
    #[arg(long, default_value_t = 128)]
    dim: usize,
    /// Fraction kept by eviction and attended by Quest.
    #[arg(long, default_value_t = 0.2)]
    budget: f64,
    /// KIVI group (tokens per quantized page; also the residual) of the int4 / int2 rows.
    #[arg(long, default_value_t = 32)]
    kivi_group: usize,
    /// Peers on the full cache in the same run (sdpa, flashinfer; `none` for none).
    #[arg(long, default_value = "sdpa,flashinfer")]
    compare: String,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// Rows as JSON lines.
    #[arg(long)]
    json: Option<PathBuf>,
}

const PEER_SCRIPT: &str = include_str!("peer_kv_cuda.py");

#[derive(serde::Serialize)]
struct PeerJob {
    peers: Vec<String>,
    configs: Vec<PeerCfg>,
}

#[derive(serde::Serialize)]
struct PeerCfg {
    id: usize,
    batch: usize,
    len: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
    page: usize,
}

fn bench_cmd(a: &BenchArgs) -> Result<()> {
    let mut cfgs = Vec::new();
    for c in a
        .configs
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
    {
        let (b, l) = c
            .split_once('x')
            .with_context(|| format!("config `{c}`: expected BATCHxLEN, e.g. 8x128k"))?;
        let batch: usize = b
            .parse()
            .ok()
            .filter(|&b| b > 0)
            .with_context(|| format!("config `{c}`: batch `{b}` is not a positive integer"))?;
        let len = crate::common::parse_len(l)
            .filter(|&l| l > 0)
            .with_context(|| {
                format!("config `{c}`: length `{l}` is not a length like 8192 or 128k")
            })?;
        cfgs.push(longattn::kv::cuda::KvBenchConfig {
            batch,
            len,
            hq: a.heads,
            hk: a.kv_heads,
            d: a.dim,
            budget: a.budget,
            kivi_group: a.kivi_group,
            ..Default::default()
        });
    }
    if !(a.budget > 0.0 && a.budget <= 1.0) {
        bail!("--budget {}: must be in (0, 1]", a.budget);
    }
    let dev = longattn::cuda::CudaDevice::open(a.device)?;
    let mut all = Vec::new();
    for (i, c) in cfgs.iter().enumerate() {
        eprintln!("kv bench {}x{} ...", c.batch, c.len);
        let rows = longattn::kv::cuda::bench(&dev, c)?;
        all.push((i, c.clone(), rows));
        dev.synchronize()?;
    }
    let peers: Vec<String> = a
        .compare
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty() && s != "none")
        .collect();
    let mut peer_ms: std::collections::BTreeMap<(usize, String), Result<f64, String>> =
        Default::default();
    if !peers.is_empty() {
        let dir = std::env::temp_dir().join(format!("longattn-kv-peer-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let job = PeerJob {
            peers: peers.clone(),
            configs: cfgs
                .iter()
                .enumerate()
                .map(|(id, c)| PeerCfg {
                    id,
                    batch: c.batch,
                    len: c.len,
                    heads: c.hq,
                    kv_heads: c.hk,
                    d: c.d,
                    page: c.page,
                })
                .collect(),
        };
        let r = crate::peer::run_script(&dir, "peer_kv_cuda.py", PEER_SCRIPT, &job, |l| {
            let (Some(id), Some(p)) = (
                l.get("id").and_then(|x| x.as_u64()),
                l.get("peer").and_then(|x| x.as_str()),
            ) else {
                return;
            };
            let v = match (l.get("ms").and_then(|x| x.as_f64()), l.get("error")) {
                (Some(ms), _) => Ok(ms),
                (None, Some(e)) => Err(e.as_str().unwrap_or("error").chars().take(200).collect()),
                _ => return,
            };
            peer_ms.insert((id as usize, p.to_string()), v);
        });
        match r {
            Ok(v) => println!("peers: {v}"),
            Err(e) => println!("peer run failed: {e:#}"),
        }
    }
    let mut json = String::new();
    for (i, c, rows) in &all {
        println!(
            "\n{} x {} tokens, {} / {} heads, D {}, {} (device {}):\n",
            c.batch, c.len, c.hq, c.hk, c.d, c.dtype, dev.name
        );
        println!("| kernel | ms | GB/s (bytes read) | cache MiB | vs full paged |");
        println!("|---|---|---|---|---|");
        for r in rows {
            let gbs = if r.bytes > 0 {
                format!("{:.0}", r.bytes as f64 / (r.ms * 1e-3) / 1e9)
            } else {
                "-".into()
            };
            println!(
                "| {} | {:.4} | {gbs} | {:.0} | {:.2}x |",
                r.name,
                r.ms,
                r.cache_bytes as f64 / (1 << 20) as f64,
                r.speedup
            );
            json.push_str(&serde_json::to_string(&serde_json::json!({
                "batch": c.batch, "len": c.len, "row": r,
            }))?);
            json.push('\n');
        }
        let full = rows.first().map(|r| r.ms).unwrap_or(f64::NAN);
        for p in &peers {
            match peer_ms.get(&(*i, p.clone())) {
                Some(Ok(ms)) => {
                    println!(
                        "| peer {p} (full cache) | {ms:.4} | - | - | ours full paged / {p}: {:.3}x |",
                        ms / full
                    );
                    json.push_str(&serde_json::to_string(&serde_json::json!({
                        "batch": c.batch, "len": c.len, "peer": p, "ms": ms, "ours_over_peer": ms / full,
                    }))?);
                    json.push('\n');
                }
                Some(Err(e)) => println!("| peer {p} | error: {e} | | | |"),
                None => println!("| peer {p} | no result | | | |"),
            }
        }
    }
    if let Some(path) = &a.json {
        if path.exists() {
            bail!("{} exists: not overwritten", path.display());
        }
        std::fs::write(path, json)?;
    }
    Ok(())
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
        Cmd::Bench(b) => bench_cmd(&b),
        Cmd::Roles(r) => {
            let pool = crate::common::pool(r.threads)?;
            pool.install(|| roles_cmd(&r))
        }
        Cmd::Keep(k) => {
            let pool = crate::common::pool(k.threads)?;
            pool.install(|| keep_cmd(&k))
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

fn keep_cmd(a: &KeepArgs) -> Result<()> {
    let mut press = lm::press_of(&a.attention, &a.kv, &a.kv_reduce)?;
    let spec = press.press().clone();
    if spec.evict.is_none() || spec.kivi.is_some() || spec.quest.is_some() {
        bail!(
            "--kv {spec}: `kv keep` takes one eviction press (streaming, h2o, a2sf, snapkv, pyramid, duo, tova, knorm), nothing composed"
        );
    }
    if a.tokens < 2 {
        bail!("--tokens {}: at least 2 tokens of context", a.tokens);
    }
    let lm = lm::load(&a.model)?;
    attach_roles(&mut press, &lm)?;
    let m = &lm.model;
    let (all, source) = match (&a.ids, &a.text) {
        (Some(p), _) => (lm::read_ids(p)?, p.display().to_string()),
        (None, Some(p)) => (lm.encode(&lm::read_text(p)?)?, p.display().to_string()),
        (None, None) => bail!("give --text FILE or --ids FILE"),
    };
    let need = a.skip + a.tokens + a.score;
    if all.len() < need {
        bail!(
            "{source} holds {} tokens, {need} needed (--skip {} + --tokens {} + --score {})",
            all.len(),
            a.skip,
            a.tokens,
            a.score
        );
    }
    let ids = all[a.skip..need].to_vec();
    lm::check_context(m, ids.len())?;
    m.check_tokens(&ids)?;
    let (ctx, cont) = ids.split_at(a.tokens);
    let c = &m.cfg;
    let mut cache = m.new_cache(lm::PAGE)?;
    let seq = cache.add_sequence();
    // One forward over the context (every layer attends the whole context), then one
    // compression of every layer: kvpress's prefill-time protocol.
    let h = m.forward(&mut cache, seq, ctx, &press, None)?;
    let before = cache.memory();
    let plan = press.plan(&cache, seq, 0)?;
    let pos_before: Vec<Vec<u32>> = (0..c.layers * c.kv_heads)
        .map(|i| cache.positions(seq, i / c.kv_heads, i % c.kv_heads))
        .collect::<longattn::Result<_>>()?;
    let rep = press.compress(&mut cache, seq, 0)?;
    let after = cache.memory();
    let mut heads = Vec::with_capacity(c.layers * c.kv_heads);
    for (i, keep) in plan.keeps.iter().enumerate() {
        let (layer, kv_head) = (i / c.kv_heads, i % c.kv_heads);
        let kept = cache.positions(seq, layer, kv_head)?;
        let planned: Vec<u32> = keep.iter().map(|&e| pos_before[i][e]).collect();
        if kept != planned {
            bail!("layer {layer} KV head {kv_head}: the cache holds other entries than planned");
        }
        heads.push(KeptHead {
            layer,
            kv_head,
            kept,
            ranks: plan.ranks.get(i).cloned().unwrap_or_default(),
        });
    }
    // NLL of the scored tokens: the context's last hidden state predicts cont[0], the forward
    // over cont[..score - 1] (through the compressed cache, not compressed again) the rest.
    let d = c.d_model;
    let mut nll = Vec::with_capacity(cont.len());
    if let Some(&first) = cont.first() {
        nll.push(ops::nll(&m.logits(&h[h.len() - d..]), first as usize));
        if cont.len() > 1 {
            let hc = m.forward(&mut cache, seq, &cont[..cont.len() - 1], &press, None)?;
            for (r, &t) in cont[1..].iter().enumerate() {
                nll.push(ops::nll(&m.logits(&hc[r * d..(r + 1) * d]), t as usize));
            }
        }
    }
    let nll_mean = (!nll.is_empty()).then(|| nll.iter().sum::<f64>() / nll.len() as f64);
    let report = KeepReport {
        model: a.model.display().to_string(),
        kv: spec.to_string(),
        kv_reduce: a.kv_reduce.clone(),
        attention: a.attention.clone(),
        tokens: a.tokens,
        score: a.score,
        ids: ids.clone(),
        layers: c.layers,
        kv_heads: c.kv_heads,
        head_dim: c.head_dim,
        heads,
        kv_bytes_full: before.bytes_in_use,
        kv_bytes: after.bytes_in_use,
        kv_bytes_entries: after.bytes_entries,
        pages_freed: rep.pages_freed,
        nll,
        nll_mean,
    };
    std::fs::write(&a.json, serde_json::to_string(&report)?)
        .with_context(|| format!("cannot write {}", a.json.display()))?;
    println!(
        "{spec}: {} context tokens, {} of {} entries kept ({:.1}%), KV pages {:.2} of {:.2} MiB{}",
        a.tokens,
        rep.kept.iter().sum::<usize>(),
        a.tokens * c.layers * c.kv_heads,
        100.0 * rep.kept.iter().sum::<usize>() as f64 / (a.tokens * c.layers * c.kv_heads) as f64,
        after.bytes_in_use as f64 / 1048576.0,
        before.bytes_in_use as f64 / 1048576.0,
        match nll_mean {
            Some(x) => format!("; NLL of the next {} tokens {x:.5}", a.score),
            None => String::new(),
        }
    );
    Ok(())
}
