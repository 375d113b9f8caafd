//! `longattn eval`: next-token negative log-likelihood of a model on a text (or token ids) under
//! an attention method; `--task passkey`: a pass key hidden in real filler text, retrieved by
//! greedy decoding, accuracy per (length, depth); `--task copy`: a span of random tokens
//! repeated, the second copy scored teacher-forced; `--task multikey`: several keys, one asked
//! (both in [`tasks`]). `--kl` with `--kv`: the KL divergence of the compressed cache's next-token
//! distributions from the full cache's, computed alongside in the same run.
//!
//! `--attention` takes `exact`, a mask expression, or a sparse spec (`topmass(gamma=0.9)`, see
//! `longattn::sparse`): the prefill of every layer (or of `--sparse-layers`) then goes through the
//! sparse selection, and the report gives the achieved density (overall and per layer) and, with
//! `--recall`, the attention mass recall per (layer, head).
use crate::common::{parse_len, parse_list, peak_rss_kib};
use crate::lm::{self, Loaded};
use crate::plot;
use anyhow::{bail, Context, Result};
use longattn::kv::press::runner::PressAttention;
use longattn::model::{from_spec_with, ops, Attention, Model, SparseOptions, SparseStats};
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

mod tasks;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The model (GGUF).
    #[arg(long)]
    model: PathBuf,
    /// `nll` (default), `passkey`, `copy` (random tokens repeated, the second copy scored) or
    /// `multikey` (several keys in the filler, one asked).
    #[arg(long, default_value = "nll")]
    task: String,
    /// Text file (nll: the text evaluated; passkey: the filler; default: a book of the cache).
    #[arg(long)]
    text: Option<PathBuf>,
    /// Whitespace-separated token ids instead of a text (nll).
    #[arg(long, conflicts_with = "text")]
    ids: Option<PathBuf>,
    /// Tokens evaluated (nll; default: the whole text, up to the model's context).
    #[arg(long)]
    tokens: Option<usize>,
    /// `exact` (plain reference attention), a mask expression applied in every layer, or a
    /// sparse spec (`topmass(gamma=0.9)`, `vertical_slash(v=64,s=64)`, ...) for the prefill.
    #[arg(long, default_value = "causal")]
    attention: String,
    /// Sparse spec only: the layers whose prefill is sparse (e.g. `2,5,8`; default: all).
    #[arg(long)]
    sparse_layers: Option<String>,
    /// Sparse spec only: measure the attention mass recall of every (layer, head) (one extra
    /// dense attention per sparse call).
    #[arg(long)]
    recall: bool,
    /// Prompt tokens per forward call (a sparse prefill selects over one call's queries).
    #[arg(long, default_value_t = lm::CHUNK)]
    chunk: usize,
    /// KV-cache compression (nll): a press such as `snapkv(budget=0.2,window=32)`,
    /// `streaming(sinks=4,window=1020)`, `h2o(budget=0.2)`, `a2sf(budget=0.2,f=0.95)`,
    /// `tova(budget=0.2)`, `knorm(budget=0.2)`, `pyramid(budget=0.2,beta=5)` (SnapKV with budgets
    /// decreasing over the layers), `duo(sinks=4,window=256,ratio=0.5)` (head roles probed on
    /// the model; `roles=FILE` from `longattn kv roles`), applied as the cache grows; quantized
    /// pages `kivi(bits=4|2,group=32,residual=32)` or with a width per group that follows its
    /// recent attention `zipvl(lo=2,hi=4,mass=0.9,f=0.95)`; query-aware page selection
    /// `quest(budget=0.2,page=16)`; composed with `+` (`snapkv(budget=0.2)+kivi(bits=4)`:
    /// eviction first, then quantization; `h2o(budget=0.2)+merge`: what the press evicts is
    /// folded into one residual slot per head, LOOK-M style; `quest(budget=0.2)+kivi(bits=4)`:
    /// Quest's pages over quantized entries; `h2o(budget=0.5)+quest(budget=0.2)`: Quest's pages
    /// over the kept entries, the press scoring what the queries attended; `h2o(budget=0.2)+share`:
    /// the budget shared over the layers, what sliding-window layers cannot hold going to the
    /// others). Layers with a sliding window (Gemma-3's local layers) always drop the entries
    /// no later query can see.
    #[arg(long)]
    kv: Option<String>,
    /// Tokens per forward under `--kv` (1: token by token, decode-time compression).
    #[arg(long, default_value_t = 1)]
    kv_chunk: usize,
    /// How a group's query heads are reduced into one score under `--kv`: mean, max or sum.
    #[arg(long, default_value = "mean")]
    kv_reduce: String,
    /// Passkey under `--kv`: `inside` (the whole prompt, question included, is prefilled and
    /// compressed once: the question sits in the observation window) or `after` (the context is
    /// prefilled and compressed once, then the question is asked). `--kv-chunk` is nll's.
    #[arg(long, default_value = "inside")]
    kv_protocol: String,
    /// nll under `--kv`: also run the full cache on the same tokens in the same chunks and report
    /// KL(p_full || p_kv) of the next-token distributions (per bucket and mean) and the full
    /// cache's NLL.
    #[arg(long)]
    kl: bool,
    /// Predicted positions per bucket of `nll_by_bucket`.
    #[arg(long, default_value_t = 512)]
    bucket: usize,
    /// Write the result as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Passkey, multikey: prompt lengths in tokens (1k = 1024); copy: tokens of each copy.
    #[arg(long, default_value = "1k,2k,4k")]
    lengths: String,
    /// Passkey: depths of the key in the filler, fractions in [0, 1].
    #[arg(long, default_value = "0,0.25,0.5,0.75,1")]
    depths: String,
    /// Passkey: trials per (length, depth) (different keys and filler offsets); copy, multikey:
    /// trials per length.
    #[arg(long, default_value_t = 2)]
    trials: usize,
    /// Seed of the keys, names, random tokens and filler offsets (passkey, copy, multikey).
    #[arg(long, default_value_t = 1234)]
    seed: u64,
    /// Copy: tokens of filler text before the first copy (its depth).
    #[arg(long, default_value_t = 0)]
    copy_prefix: usize,
    /// Multikey: facts ("The pass key of NAME is NUMBER.") spread over the filler (2: the most
    /// at which SmolLM2's full cache comes near 80% at 1k-2k, docs/QUALITY.md).
    #[arg(long, default_value_t = 2)]
    keys: usize,
    /// Passkey: heat map PNG (default: beside `--json`, its name with `.png`; none without
    /// either).
    #[arg(long)]
    png: Option<PathBuf>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Serialize)]
struct Bucket {
    start: usize,
    end: usize,
    nll: f64,
    /// With `--kl`: the full cache's NLL and KL(p_full || p_kv), mean over the bucket.
    nll_full: Option<f64>,
    kl: Option<f64>,
}

#[derive(Serialize)]
struct NllReport {
    model: String,
    text: String,
    tokens: usize,
    nll_mean: f64,
    ppl: f64,
    nll_by_bucket: Vec<Bucket>,
    attention: String,
    /// The `--kv` spec, if any, and its tokens per forward.
    kv: Option<String>,
    kv_chunk: Option<usize>,
    /// With `--kl`: KL(p_full || p_kv) of the next-token distributions, mean over the predicted
    /// positions, and the full cache's NLL on the same tokens and chunks.
    kl_mean: Option<f64>,
    nll_full_mean: Option<f64>,
    /// Bytes of K/V pages the cache held at its largest (after a forward, before compression).
    kv_bytes: usize,
    /// Bytes of K/V pages the uncompressed cache holds for the same tokens.
    kv_bytes_full: usize,
    /// The same two counting only the entries held (no unfilled page tails).
    kv_bytes_entries: usize,
    kv_bytes_entries_full: usize,
    /// Quantized entries at the end, `[bits, entries]` per width over every (layer, KV head)
    /// (specs with `kivi` or `zipvl`).
    kv_quantized_by_bits: Option<Vec<(u32, usize)>>,
    seconds: f64,
    load_seconds: f64,
    matmul_seconds: f64,
    matmul_gflops: f64,
    peak_rss_mib: Option<f64>,
    threads: usize,
    sparse: Option<SparseJson>,
}

/// What a sparse spec selected, in the JSON reports.
#[derive(Serialize)]
struct SparseJson {
    spec: String,
    /// Allowed pairs inside the selection / allowed pairs of the mask, over all sparse layers.
    density: f64,
    /// Mean of the per-layer densities.
    density_mean_layer: f64,
    density_per_layer: Vec<LayerJson>,
    /// Mean and worst head of the mass recall (with `--recall`).
    recall_mean: Option<f64>,
    recall_worst: Option<f64>,
    /// The same for the best selection with as many tiles per query tile (with `--recall`).
    best_recall_mean: Option<f64>,
    best_recall_worst: Option<f64>,
    select_seconds: f64,
    attend_seconds: f64,
}

#[derive(Serialize)]
struct LayerJson {
    layer: usize,
    density: f64,
    calls: usize,
    fallbacks: usize,
    /// Per query head (with `--recall`).
    recall: Option<Vec<f64>>,
    best_recall: Option<Vec<f64>>,
}

fn sparse_json(st: &SparseStats) -> SparseJson {
    let layers: Vec<LayerJson> = st
        .layers
        .iter()
        .map(|l| LayerJson {
            layer: l.layer,
            density: l.density(),
            calls: l.calls,
            fallbacks: l.fallbacks,
            recall: l.head_recall(),
            best_recall: l.head_best_recall(),
        })
        .collect();
    let mean = layers.iter().map(|l| l.density).sum::<f64>() / layers.len().max(1) as f64;
    let (recall, best) = (st.recall(), st.best_recall());
    SparseJson {
        spec: st.spec.clone(),
        density: st.density(),
        density_mean_layer: mean,
        density_per_layer: layers,
        recall_mean: recall.map(|r| r.0),
        recall_worst: recall.map(|r| r.1),
        best_recall_mean: best.map(|r| r.0),
        best_recall_worst: best.map(|r| r.1),
        select_seconds: st.select_seconds,
        attend_seconds: st.attend_seconds,
    }
}

/// The attention a report names: the press's (it wraps the model's attention) or the model's.
fn attention_spec(press: Option<&PressAttention>, attn: &dyn Attention) -> String {
    press.map_or_else(|| attn.spec(), |p| p.spec())
}

/// The attention method of `--attention` with the sparse options, checked against the model.
fn attention(a: &Args, m: &Model) -> Result<Box<dyn Attention>> {
    let layers = match &a.sparse_layers {
        Some(t) => Some(parse_list(t, "layer", |x| x.parse::<usize>().ok())?),
        None => None,
    };
    if let Some(l) = layers.iter().flatten().find(|&&l| l >= m.cfg.layers) {
        bail!(
            "--sparse-layers: layer {l} does not exist (the model has layers 0..{})",
            m.cfg.layers
        );
    }
    let opts = (layers.is_some() || a.recall).then_some(SparseOptions {
        layers,
        recall: a.recall,
    });
    from_spec_with(&a.attention, opts).context("--attention")
}

/// Prints the sparse statistics (density, recall) when the method is sparse.
fn print_sparse(s: &SparseJson) {
    println!(
        "  sparse `{}`: density {:.4} (mean over layers {:.4}); select {:.2} s, attention {:.2} s",
        s.spec, s.density, s.density_mean_layer, s.select_seconds, s.attend_seconds
    );
    if let (Some(m), Some(w)) = (s.recall_mean, s.recall_worst) {
        println!("  mass recall: mean {m:.4}, worst (layer, head) {w:.4}");
    }
    if let (Some(m), Some(w)) = (s.best_recall_mean, s.best_recall_worst) {
        println!("  best selection of equal size: mean {m:.4}, worst {w:.4}");
    }
}

pub fn main(a: Args) -> Result<()> {
    if a.chunk == 0 {
        bail!("--chunk must be >= 1");
    }
    let pool = crate::common::pool(a.threads)?;
    if a.kl && a.task != "nll" {
        bail!("--kl applies to --task nll (the text's next-token distributions)");
    }
    pool.install(|| match a.task.as_str() {
        "nll" => nll(&a),
        "passkey" => passkey(&a),
        "copy" => tasks::copy(&a),
        "multikey" => tasks::multikey(&a),
        t => bail!("--task {t}: known tasks are nll, passkey, copy and multikey"),
    })
}

fn default_book() -> Result<PathBuf> {
    Ok(longattn::model::fixtures::book_path("austen-emma.txt")?)
}

/// `nf` filler tokens from `offset` for a prompt of `len` tokens, or an error naming the shortfall.
fn filler_span(filler: &[u32], offset: usize, nf: usize, len: usize) -> Result<&[u32]> {
    if filler.len() < offset + nf {
        bail!(
            "the filler text holds {} tokens, {} needed for length {len}",
            filler.len(),
            offset + nf
        );
    }
    Ok(&filler[offset..offset + nf])
}

/// The filler of the retrieval tasks: `--text`, or the cache's default book, as token ids.
fn filler_ids(a: &Args, lm: &lm::Loaded) -> Result<Vec<u32>> {
    let book = match &a.text {
        Some(p) => p.clone(),
        None => default_book()?,
    };
    lm.encode_plain(&lm::read_text(&book)?)
}

fn nll(a: &Args) -> Result<()> {
    let mut press = match &a.kv {
        Some(spec) => {
            if a.kv_chunk == 0 {
                bail!("--kv-chunk must be >= 1");
            }
            Some(lm::press_of(&a.attention, spec, &a.kv_reduce)?)
        }
        None => None,
    };
    if a.kl && press.is_none() {
        bail!("--kl compares a compressed cache with the full cache: give --kv SPEC");
    }
    let lm = lm::load(&a.model)?;
    if let Some(p) = press.as_mut() {
        crate::kv::attach_roles(p, &lm)?;
    }
    let m = &lm.model;
    let attn = attention(a, m)?;
    let (mut ids, source) = match (&a.ids, &a.text) {
        (Some(p), _) => (lm::read_ids(p)?, p.display().to_string()),
        (None, Some(p)) => (lm.encode(&lm::read_text(p)?)?, p.display().to_string()),
        (None, None) => bail!("give --text FILE or --ids FILE"),
    };
    let n = a.tokens.unwrap_or(ids.len().min(m.cfg.context));
    if n < 2 {
        bail!("--tokens {n}: at least 2 tokens are needed to predict one");
    }
    if ids.len() < n {
        bail!(
            "{source} holds only {} tokens, {n} asked (--tokens)",
            ids.len()
        );
    }
    lm::check_context(m, n)?;
    ids.truncate(n);
    m.check_tokens(&ids)?;
    if a.bucket == 0 {
        bail!("--bucket must be >= 1");
    }
    let vocab = m.cfg.vocab;
    // nll[t] = -log p(ids[t + 1] | ids[..=t]) for t in 0..n-1.
    let mut nlls = vec![0.0f64; n - 1];
    // --kl: the full cache, fed the same chunks alongside; its NLL and the KL per position.
    let mut full = match a.kl {
        true => {
            let mut c = m.new_cache(lm::PAGE)?;
            let s = c.add_sequence();
            Some((c, s))
        }
        false => None,
    };
    let (mut nlls_full, mut kls) = (vec![0.0f64; n - 1], vec![0.0f64; n - 1]);
    let mut cache = m.new_cache(lm::PAGE)?;
    let seq = cache.add_sequence();
    let pb = lm::bar(n as u64, "tokens");
    ops::reset_matmul_stats();
    longattn::cpu::reset_skip_stats();
    let t0 = Instant::now();
    let d = m.cfg.d_model;
    let mut each = |start: usize, h: &[f32]| -> Result<()> {
        let rows = h.len() / d;
        let hf = match full.as_mut() {
            Some((c, s)) => {
                let h = m.forward(c, *s, &ids[start..start + rows], attn.as_ref(), None)?;
                m.drop_dead(c, *s)?;
                Some(h)
            }
            None => None,
        };
        // Logits in slices of 128 rows: memory 128 x vocab (twice with --kl).
        for r0 in (0..rows).step_by(128) {
            let r1 = (r0 + 128).min(rows);
            let lg = m.logits(&h[r0 * d..r1 * d]);
            let lf = hf.as_ref().map(|hf| m.logits(&hf[r0 * d..r1 * d]));
            for r in r0..r1 {
                let t = start + r;
                if t + 1 < n {
                    let row = (r - r0) * vocab..(r - r0 + 1) * vocab;
                    nlls[t] = ops::nll(&lg[row.clone()], ids[t + 1] as usize);
                    if let Some(lf) = &lf {
                        nlls_full[t] = ops::nll(&lf[row.clone()], ids[t + 1] as usize);
                        kls[t] = ops::kl(&lf[row.clone()], &lg[row]);
                    }
                }
            }
        }
        Ok(())
    };
    let (peak, end) = match &press {
        Some(p) => lm::prefill_pressed(
            m,
            &mut cache,
            seq,
            &ids,
            p,
            a.kv_chunk,
            Some(&pb),
            &mut each,
        )?,
        None => {
            let peak = lm::prefill(
                m,
                &mut cache,
                seq,
                &ids,
                attn.as_ref(),
                a.chunk,
                Some(&pb),
                &mut each,
            )?;
            (peak, cache.memory())
        }
    };
    let secs = t0.elapsed().as_secs_f64();
    pb.finish_and_clear();
    let by_bits = match &press {
        Some(p) if p.press().kivi.is_some() => Some(cache.quantized_by_bits(seq)?),
        _ => None,
    };
    let (mm_s, mm_flops) = ops::matmul_stats();
    let avg = |x: &[f64]| x.iter().sum::<f64>() / x.len() as f64;
    let mean = avg(&nlls);
    let buckets: Vec<Bucket> = (0..nlls.len())
        .step_by(a.bucket)
        .map(|s| {
            let e = (s + a.bucket).min(nlls.len());
            Bucket {
                start: s,
                end: e,
                nll: avg(&nlls[s..e]),
                nll_full: a.kl.then(|| avg(&nlls_full[s..e])),
                kl: a.kl.then(|| avg(&kls[s..e])),
            }
        })
        .collect();
    let rep = NllReport {
        model: a.model.display().to_string(),
        text: source,
        tokens: n,
        nll_mean: mean,
        ppl: mean.exp(),
        nll_by_bucket: buckets,
        attention: attention_spec(press.as_ref(), &*attn),
        kv: press.as_ref().map(|p| p.press().to_string()),
        kv_chunk: press.as_ref().map(|_| a.kv_chunk),
        kl_mean: a.kl.then(|| avg(&kls)),
        nll_full_mean: a.kl.then(|| avg(&nlls_full)),
        kv_bytes: peak.bytes_in_use,
        kv_bytes_full: end.bytes_full_in_use,
        kv_bytes_entries: peak.bytes_entries,
        kv_bytes_entries_full: end.bytes_full,
        kv_quantized_by_bits: by_bits,
        seconds: secs,
        load_seconds: lm.load_s,
        matmul_seconds: mm_s,
        matmul_gflops: mm_flops / mm_s.max(1e-12) / 1e9,
        peak_rss_mib: peak_rss_kib().map(|k| k as f64 / 1024.0),
        threads: rayon::current_num_threads(),
        sparse: attn.sparse_stats().as_ref().map(sparse_json),
    };
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&rep)?)
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    println!(
        "{} tokens, attention `{}`: nll {:.5} nats, ppl {:.3} ({:.2} s; matmul {:.2} s at {:.1} GFLOP/s; uniform baseline ln(vocab) = {:.3})",
        n,
        rep.attention,
        mean,
        rep.ppl,
        secs,
        mm_s,
        rep.matmul_gflops,
        (vocab as f64).ln()
    );
    println!(
        "  KV cache: {:.2} MiB of pages at most ({:.1}% of the full cache's {:.2} MiB)",
        rep.kv_bytes as f64 / 1048576.0,
        100.0 * rep.kv_bytes as f64 / rep.kv_bytes_full.max(1) as f64,
        rep.kv_bytes_full as f64 / 1048576.0
    );
    if let Some(by) = &rep.kv_quantized_by_bits {
        let parts: Vec<String> = by.iter().map(|(b, n)| format!("{n} at {b} bits")).collect();
        println!("  quantized entries: {}", parts.join(", "));
    }
    if let (Some(kl), Some(nf)) = (rep.kl_mean, rep.nll_full_mean) {
        println!(
            "  KL(full || kv) {kl:.6} nats per position; the full cache in the same chunks: nll {nf:.5}"
        );
    }
    for b in &rep.nll_by_bucket {
        print!("  positions {:>6}..{:<6} nll {:.4}", b.start, b.end, b.nll);
        if let (Some(kl), Some(nf)) = (b.kl, b.nll_full) {
            print!("  full {nf:.4}  KL {kl:.6}");
        }
        println!();
    }
    if let Some(mib) = rep.peak_rss_mib {
        println!("  peak RSS {mib:.0} MiB");
    }
    if let Some(s) = &rep.sparse {
        print_sparse(s);
        let (tested, dropped) = longattn::cpu::skip_stats();
        if tested > 0 {
            println!(
                "  skip-softmax: {dropped} of {tested} key groups dropped ({:.1}%)",
                100.0 * dropped as f64 / tested as f64
            );
        }
    }
    Ok(())
}

/// The filler-and-key prompt (after the passkey retrieval test of the landmark-attention paper,
/// 2023): intro, filler with the key sentence at `depth` of the filler, question. Exactly `len`
/// tokens; also the question's length (the prompt's last tokens).
fn passkey_prompt(
    lm: &Loaded,
    filler: &[u32],
    offset: usize,
    len: usize,
    depth: f64,
    key: u32,
) -> Result<(Vec<u32>, usize)> {
    let intro = lm.encode(
        "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n\n",
    )?;
    let needle = lm.encode_plain(&format!(
        "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
    ))?;
    let question = lm.encode_plain("\n\nWhat is the pass key? The pass key is")?;
    let fixed = intro.len() + needle.len() + question.len();
    if len <= fixed + 16 {
        bail!("passkey length {len} is too short for the prompt ({fixed} fixed tokens)");
    }
    let nf = len - fixed;
    let f = filler_span(filler, offset, nf, len)?;
    let at = ((nf as f64) * depth).round() as usize;
    let mut p = intro;
    p.extend_from_slice(&f[..at]);
    p.extend(needle);
    p.extend_from_slice(&f[at..]);
    let nq = question.len();
    p.extend(question);
    Ok((p, nq))
}

/// Where the question stands when the cache is compressed (`--kv-protocol`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KvProtocol {
    /// The context is prefilled and compressed, then the question is asked: the press cannot
    /// know the question.
    After,
    /// The whole prompt, question included, is prefilled and compressed (the question sits in
    /// the presses' observation window).
    Inside,
}

impl KvProtocol {
    fn parse(s: &str) -> Result<KvProtocol> {
        match s {
            "inside" => Ok(KvProtocol::Inside),
            "after" => Ok(KvProtocol::After),
            x => bail!("--kv-protocol {x}: expected `inside` or `after`"),
        }
    }
}

/// One passkey prompt under a press: the greedy answer (up to 8 tokens) and the key's
/// teacher-forced log-probability (a second run of the same protocol that feeds the key's
/// tokens), with the cache's memory after compression. The part the protocol compresses is
/// prefilled in one forward and compressed once; the question (protocol `after`) and the answer
/// are appended uncompressed.
fn passkey_pressed(
    m: &longattn::model::llm::Model,
    prompt: &[u32],
    nq: usize,
    key_ids: &[u32],
    press: &PressAttention,
    proto: KvProtocol,
    stop: Option<u32>,
) -> Result<(Vec<u32>, f64, longattn::kv::KvMemory)> {
    let d = m.cfg.d_model;
    // Prefill as the protocol says; the hidden state of the prompt's last token.
    let prefill = |cache: &mut longattn::kv::PagedKvCache, seq| -> Result<Vec<f32>> {
        press.reset(); // a new cache: its sequence ids start again
        let ctx = match proto {
            KvProtocol::After => &prompt[..prompt.len() - nq],
            KvProtocol::Inside => prompt,
        };
        // One forward over the part to compress, then one compression (kvpress's protocol).
        let mut last = Vec::new();
        lm::prefill_pressed(m, cache, seq, ctx, press, ctx.len(), None, |_, h| {
            last = h[h.len() - d..].to_vec();
            Ok(())
        })?;
        if proto == KvProtocol::After {
            let h = m.forward(cache, seq, &prompt[prompt.len() - nq..], press, None)?;
            last = h[h.len() - d..].to_vec();
        }
        Ok(last)
    };
    // Greedy answer.
    let mut cache = m.new_cache(lm::PAGE)?;
    let seq = cache.add_sequence();
    let mut hidden = prefill(&mut cache, seq)?;
    let mem = cache.memory();
    let mut out = Vec::new();
    for _ in 0..8 {
        let t = ops::argmax(&m.logits(&hidden)) as u32;
        out.push(t);
        if Some(t) == stop || cache.len(seq)? >= m.cfg.context {
            break;
        }
        hidden = m.forward(&mut cache, seq, &[t], press, None)?;
    }
    // Teacher-forced log-probability of the key's tokens.
    let mut cache = m.new_cache(lm::PAGE)?;
    let seq = cache.add_sequence();
    let first = prefill(&mut cache, seq)?;
    let mut logp = -ops::nll(&m.logits(&first), key_ids[0] as usize);
    if key_ids.len() > 1 {
        let h = m.forward(&mut cache, seq, &key_ids[..key_ids.len() - 1], press, None)?;
        for (i, &t) in key_ids[1..].iter().enumerate() {
            logp -= ops::nll(&m.logits(&h[i * d..(i + 1) * d]), t as usize);
        }
    }
    Ok((out, logp, mem))
}

#[derive(Serialize)]
struct PasskeyReport {
    model: String,
    attention: String,
    lengths: Vec<usize>,
    depths: Vec<f64>,
    trials: usize,
    /// Accuracy `[length][depth]`.
    accuracy: Vec<Vec<f64>>,
    sparse: Option<SparseJson>,
    /// The `--kv` spec and protocol, if any.
    kv: Option<String>,
    kv_protocol: Option<String>,
    /// Under `--kv`: the key's teacher-forced log-probability, mean per `[length][depth]`.
    key_logprob: Option<Vec<Vec<f64>>>,
    /// Under `--kv`: the cache's bytes in use after compression / the full cache's, over all
    /// prompts.
    kv_bytes: Option<usize>,
    kv_bytes_full: Option<usize>,
}

fn passkey(a: &Args) -> Result<()> {
    let lengths = parse_list(&a.lengths, "length", parse_len)?;
    let depths = parse_list(&a.depths, "depth", |x| {
        x.parse::<f64>().ok().filter(|d| (0.0..=1.0).contains(d))
    })?;
    if a.trials == 0 || lengths.is_empty() || depths.is_empty() {
        bail!("--trials, --lengths and --depths must be non-empty");
    }
    let mut press = match &a.kv {
        Some(spec) => {
            let proto = KvProtocol::parse(&a.kv_protocol)?;
            Some((lm::press_of(&a.attention, spec, &a.kv_reduce)?, proto))
        }
        None => None,
    };
    let lm = lm::load(&a.model)?;
    if let Some((p, _)) = press.as_mut() {
        crate::kv::attach_roles(p, &lm)?;
    }
    let m = &lm.model;
    let attn = attention(a, m)?;
    for &l in &lengths {
        lm::check_context(m, l + 8)?;
    }
    let filler = filler_ids(a, &lm)?;
    let mut rng = longattn::testing::Rng::new(a.seed);
    let total = lengths.len() * depths.len() * a.trials;
    let pb = lm::bar(total as u64, "prompts");
    let mut acc = vec![vec![0usize; depths.len()]; lengths.len()];
    let mut logp = vec![vec![0.0f64; depths.len()]; lengths.len()];
    let (mut bytes, mut bytes_full) = (0usize, 0usize);
    let max_len = *lengths.iter().max().unwrap_or(&0);
    for (li, &len) in lengths.iter().enumerate() {
        for (di, &depth) in depths.iter().enumerate() {
            for _ in 0..a.trials {
                let key = 10000 + rng.below(90000) as u32;
                let offset = rng.below(filler.len().saturating_sub(max_len + 64).max(1));
                let (prompt, nq) = passkey_prompt(&lm, &filler, offset, len, depth, key)?;
                let out = match &press {
                    Some((p, proto)) => {
                        let key_ids = lm.encode_plain(&format!(" {key}"))?;
                        let (out, lp, mem) =
                            passkey_pressed(m, &prompt, nq, &key_ids, p, *proto, lm.tok.eos())?;
                        logp[li][di] += lp / a.trials as f64;
                        bytes += mem.bytes_in_use;
                        bytes_full += mem.bytes_full_in_use;
                        out
                    }
                    None => {
                        let mut cache = m.new_cache(lm::PAGE)?;
                        let seq = cache.add_sequence();
                        m.generate(
                            &mut cache,
                            seq,
                            &prompt,
                            8,
                            lm.tok.eos(),
                            attn.as_ref(),
                            a.chunk,
                            |_| {},
                        )?
                    }
                };
                let text = lm.tok.decode(&out);
                if text.contains(&key.to_string()) {
                    acc[li][di] += 1;
                }
                pb.inc(1);
            }
        }
    }
    pb.finish_and_clear();
    let spec = match &press {
        Some((p, proto)) => format!("{} ({proto:?} protocol)", p.spec()).to_lowercase(),
        None => attn.spec(),
    };
    println!(
        "passkey retrieval, attention `{spec}`, {} trials per cell (accuracy):",
        a.trials
    );
    print!("{:>8}", "len\\depth");
    for d in &depths {
        print!(" {d:>6.2}");
    }
    println!();
    let mut grid = Vec::new();
    for (li, &len) in lengths.iter().enumerate() {
        print!("{len:>9}");
        let mut row = Vec::new();
        for c in &acc[li] {
            let f = *c as f64 / a.trials as f64;
            print!(" {f:>6.2}");
            row.push(f);
        }
        println!();
        grid.push(row);
    }
    let rows: Vec<String> = lengths.iter().map(|l| l.to_string()).collect();
    let cols: Vec<String> = depths.iter().map(|d| format!("{d:.2}")).collect();
    match a
        .png
        .clone()
        .or_else(|| a.json.as_ref().map(|j| j.with_extension("png")))
    {
        Some(png) => {
            plot::heat_map_png(
                &png,
                &format!("passkey accuracy, attention `{spec}`"),
                "prompt length (tokens)",
                "depth of the key",
                &rows,
                &cols,
                &grid,
            )?;
            eprintln!("heat map: {}", png.display());
        }
        None => eprintln!("heat map: none (--png PATH or --json PATH)"),
    }
    let rep = PasskeyReport {
        model: a.model.display().to_string(),
        attention: attn.spec(),
        lengths,
        depths,
        trials: a.trials,
        accuracy: grid,
        sparse: attn.sparse_stats().as_ref().map(sparse_json),
        kv: press.as_ref().map(|(p, _)| p.press().to_string()),
        kv_protocol: press.as_ref().map(|(_, x)| format!("{x:?}").to_lowercase()),
        key_logprob: press.as_ref().map(|_| logp.clone()),
        kv_bytes: press.as_ref().map(|_| bytes),
        kv_bytes_full: press.as_ref().map(|_| bytes_full),
    };
    if press.is_some() {
        println!("key log-probability (teacher-forced), per cell:");
        for (li, &len) in rep.lengths.iter().enumerate() {
            let row: Vec<String> = logp[li].iter().map(|x| format!("{x:>7.2}")).collect();
            println!("{len:>9} {}", row.join(" "));
        }
        println!(
            "kv memory after compression: {:.1}% of the full cache ({bytes} / {bytes_full} bytes over all prompts)",
            100.0 * bytes as f64 / bytes_full.max(1) as f64
        );
    }
    if let Some(s) = &rep.sparse {
        print_sparse(s);
    }
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&rep)?)
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    Ok(())
}
