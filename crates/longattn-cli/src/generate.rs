//! `longattn generate`: greedy decoding with the paged KV cache; reports prefill and decode speed.
use crate::common::peak_rss_kib;
use crate::lm;
use anyhow::{bail, Context, Result};
use longattn::model::{from_spec, ops};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The model (GGUF).
    #[arg(long)]
    model: PathBuf,
    /// The prompt text.
    #[arg(long, required_unless_present = "prompt_file")]
    prompt: Option<String>,
    /// Read the prompt from a file instead (e.g. a book, to time a long prefill).
    #[arg(long, conflicts_with = "prompt")]
    prompt_file: Option<PathBuf>,
    /// Keep only the first N tokens of the prompt.
    #[arg(long)]
    prompt_tokens: Option<usize>,
    /// New tokens at most (stops early at end-of-sequence).
    #[arg(long, default_value_t = 64)]
    max_new: usize,
    /// `exact` or a mask expression applied in every layer.
    #[arg(long, default_value = "causal")]
    attention: String,
    /// KV-cache compression while generating (the specs of `eval --kv`, e.g.
    /// `snapkv(budget=0.2,window=32)`, `streaming(sinks=4,window=1020)`, `kivi(bits=4)`,
    /// `zipvl(lo=2,hi=4,mass=0.9)`,
    /// `duo(sinks=4,window=256,roles=FILE)`): the prompt is prefilled in chunks with the press
    /// applied as the cache grows, then the press runs after every new token.
    #[arg(long)]
    kv: Option<String>,
    /// How a group's query heads are reduced into one score under `--kv`: mean, max or sum.
    #[arg(long, default_value = "mean")]
    kv_reduce: String,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

pub fn main(a: Args) -> Result<()> {
    let pool = crate::common::pool(a.threads)?;
    pool.install(|| run(&a))
}

fn run(a: &Args) -> Result<()> {
    let attn = from_spec(&a.attention).context("--attention")?;
    let mut press = match &a.kv {
        Some(spec) => Some(lm::press_of(&a.attention, spec, &a.kv_reduce)?),
        None => None,
    };
    let lm = lm::load(&a.model)?;
    if let Some(p) = press.as_mut() {
        crate::kv::attach_roles(p, &lm)?;
    }
    let m = &lm.model;
    let text = match (&a.prompt, &a.prompt_file) {
        (Some(t), _) => t.clone(),
        (None, Some(p)) => lm::read_text(p)?,
        (None, None) => bail!("give --prompt TEXT or --prompt-file FILE"),
    };
    let mut prompt = lm.encode(&text)?;
    if let Some(n) = a.prompt_tokens {
        if prompt.len() < n {
            bail!(
                "the prompt holds {} tokens, {n} asked (--prompt-tokens)",
                prompt.len()
            );
        }
        prompt.truncate(n);
    }
    if prompt.is_empty() {
        bail!("the prompt is empty");
    }
    lm::check_context(m, prompt.len() + a.max_new)?;
    let mut cache = m.new_cache(lm::PAGE)?;
    let seq = cache.add_sequence();
    let t0 = Instant::now();
    let mut first: Option<Instant> = None;
    let mut prefill_mm = (0.0, 0.0);
    let mut out = std::io::stdout();
    if a.prompt_file.is_none() {
        print!("{text}");
    }
    ops::reset_matmul_stats();
    let mut show = |t: u32| {
        // Decoding one token at a time; multi-byte characters may print as U+FFFD.
        print!("{}", lm.tok.decode(&[t]));
        let _ = out.flush();
    };
    let toks = if let Some(p) = &press {
        let d = m.cfg.d_model;
        let mut hidden = Vec::new();
        lm::prefill_pressed(m, &mut cache, seq, &prompt, p, lm::CHUNK, None, |_, h| {
            hidden = h[h.len() - d..].to_vec();
            Ok(())
        })?;
        first = Some(Instant::now());
        prefill_mm = ops::matmul_stats();
        let mut toks = Vec::new();
        for _ in 0..a.max_new {
            let t = ops::argmax(&m.logits(&hidden)) as u32;
            toks.push(t);
            show(t);
            if Some(t) == lm.tok.eos() {
                break;
            }
            hidden = m.forward(&mut cache, seq, &[t], p, None)?;
            p.compress(&mut cache, seq, 1)?;
        }
        toks
    } else {
        m.generate(
            &mut cache,
            seq,
            &prompt,
            a.max_new,
            lm.tok.eos(),
            attn.as_ref(),
            lm::CHUNK,
            |t| {
                if first.is_none() {
                    first = Some(Instant::now());
                    prefill_mm = ops::matmul_stats();
                }
                show(t);
            },
        )?
    };
    println!();
    if press.is_some() {
        let mem = cache.memory();
        eprintln!(
            "kv cache: {:.2} MiB in use, {:.1}% of the full cache's {:.2} MiB",
            mem.bytes_in_use as f64 / 1048576.0,
            100.0 * mem.bytes_in_use as f64 / mem.bytes_full_in_use.max(1) as f64,
            mem.bytes_full_in_use as f64 / 1048576.0
        );
    }
    let end = Instant::now();
    let prefill = first.map_or(0.0, |f| (f - t0).as_secs_f64());
    let decode = first.map_or(0.0, |f| (end - f).as_secs_f64());
    eprintln!(
        "prompt {} tokens: prefill {:.2} s ({:.1} tok/s); {} new tokens: decode {:.2} s ({:.1} tok/s); peak RSS {} MiB",
        prompt.len(),
        prefill,
        prompt.len() as f64 / prefill.max(1e-9),
        toks.len(),
        decode,
        (toks.len().saturating_sub(1)) as f64 / decode.max(1e-9),
        peak_rss_kib().map_or("?".into(), |k| format!("{:.0}", k as f64 / 1024.0))
    );
    eprintln!(
        "prefill matmuls: {:.2} s at {:.1} GFLOP/s ({:.0} GFLOP)",
        prefill_mm.0,
        prefill_mm.1 / prefill_mm.0.max(1e-12) / 1e9,
        prefill_mm.1 / 1e9
    );
    Ok(())
}
