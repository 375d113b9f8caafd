//! Shared glue of the model subcommands: loading a GGUF model with its tokenizer, reading token
//! ids or text, the chunked forward with a progress bar.
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use longattn::kv::press::runner::PressAttention;
use longattn::kv::{KvMemory, PagedKvCache, SeqId};
use longattn::model::gguf::Gguf;
use longattn::model::tokenizer::Tokenizer;
use longattn::model::{Attention, LoadOptions, Model};
use std::path::Path;
use std::time::Instant;

/// Prompt tokens per forward call (memory O(chunk x vocab) for the logits).
pub const CHUNK: usize = 512;
/// Tokens per KV page.
pub const PAGE: usize = 64;

pub struct Loaded {
    pub model: Model,
    pub tok: Tokenizer,
    /// Prepend BOS to texts (`tokenizer.ggml.add_bos_token`).
    pub add_bos: bool,
    pub load_s: f64,
}

pub fn load(path: &Path) -> Result<Loaded> {
    if !path.exists() {
        bail!(
            "{}: model file not found; {}",
            path.display(),
            longattn::model::fixtures::HOW_TO_FETCH
        );
    }
    let t0 = Instant::now();
    let g = Gguf::open(path)?;
    let model = Model::load(&g, LoadOptions::default())
        .with_context(|| format!("{}: cannot load the model", path.display()))?;
    let tok = Tokenizer::from_gguf(&g)
        .with_context(|| format!("{}: cannot build the tokenizer", path.display()))?;
    let add_bos = tok.add_bos();
    Ok(Loaded {
        model,
        tok,
        add_bos,
        load_s: t0.elapsed().as_secs_f64(),
    })
}

impl Loaded {
    /// Token ids of a text (BOS first when the model wants it).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        if self.add_bos {
            ids.extend(self.tok.bos());
        }
        ids.extend(self.encode_plain(text)?);
        Ok(ids)
    }
    /// Token ids of a text, no BOS.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.tok.encode(text))
    }
}

/// Reads a text file (lossy UTF-8: one of the books is ISO-8859), CRLF normalized to LF.
pub fn read_text(path: &Path) -> Result<String> {
    let b = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(String::from_utf8_lossy(&b).replace("\r\n", "\n"))
}

/// Whitespace-separated token ids.
pub fn read_ids(path: &Path) -> Result<Vec<u32>> {
    let s =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    s.split_whitespace()
        .enumerate()
        .map(|(i, w)| {
            w.parse::<u32>()
                .with_context(|| format!("{}: item {i} `{w}` is not a token id", path.display()))
        })
        .collect()
}

pub fn bar(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "[{{elapsed_precise}}] {{bar:30}} {{pos}}/{{len}} {what} ({{per_sec}}, eta {{eta}})"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb
}

/// Runs `tokens` through the model in chunks of `chunk` tokens into `seq`, calling
/// `each(start, hidden)` with the final hidden states of every chunk. After each chunk the
/// sliding-window layers free what no later query sees ([`Model::drop_dead`]). Returns the
/// largest memory the cache held (after a forward, before that).
#[allow(clippy::too_many_arguments)]
pub fn prefill(
    m: &Model,
    cache: &mut PagedKvCache,
    seq: SeqId,
    tokens: &[u32],
    attn: &dyn Attention,
    chunk: usize,
    pb: Option<&ProgressBar>,
    mut each: impl FnMut(usize, &[f32]) -> Result<()>,
) -> Result<KvMemory> {
    let mut start = 0;
    let mut peak: Option<KvMemory> = None;
    for part in tokens.chunks(chunk.max(1)) {
        let h = m.forward(cache, seq, part, attn, None)?;
        each(start, &h)?;
        start += part.len();
        peak = Some(larger(peak, cache.memory()));
        m.drop_dead(cache, seq)?;
        if let Some(pb) = pb {
            pb.inc(part.len() as u64);
        }
    }
    Ok(peak.unwrap_or_else(|| cache.memory()))
}

/// The larger of two memory readings (bytes in use, then entries).
fn larger(peak: Option<KvMemory>, mem: KvMemory) -> KvMemory {
    match peak {
        Some(p) if (p.bytes_in_use, p.bytes_entries) >= (mem.bytes_in_use, mem.bytes_entries) => p,
        _ => mem,
    }
}

/// Runs `tokens` through the model under a press, `chunk` tokens per forward (1: token by
/// token), compressing after every forward with room for the next chunk; calls
/// `each(start, hidden)` per chunk. Returns the largest memory the cache held (after a forward,
/// before its compression) and the memory at the end.
#[allow(clippy::too_many_arguments)]
pub fn prefill_pressed(
    m: &Model,
    cache: &mut PagedKvCache,
    seq: SeqId,
    tokens: &[u32],
    attn: &PressAttention,
    chunk: usize,
    pb: Option<&ProgressBar>,
    mut each: impl FnMut(usize, &[f32]) -> Result<()>,
) -> Result<(KvMemory, KvMemory)> {
    let mut start = 0;
    let mut peak: Option<KvMemory> = None;
    let parts: Vec<&[u32]> = tokens.chunks(chunk.max(1)).collect();
    for (i, part) in parts.iter().enumerate() {
        let h = m.forward(cache, seq, part, attn, None)?;
        each(start, &h)?;
        start += part.len();
        peak = Some(larger(peak, cache.memory()));
        let next = parts.get(i + 1).map_or(0, |p| p.len());
        attn.compress(cache, seq, next)?;
        if let Some(pb) = pb {
            pb.inc(part.len() as u64);
        }
    }
    Ok((peak.unwrap_or_else(|| cache.memory()), cache.memory()))
}

/// The press of `--kv SPEC` over the attention `--attention MASK` (`--kv-reduce`): the checks
/// `eval` and `generate` share (a mask expression, not `exact`; the spec and the reduction).
/// A `duo(...)` press gets its head roles once the model is loaded ([`crate::kv::attach_roles`]).
pub fn press_of(
    attention: &str,
    kv: &str,
    reduce: &str,
) -> Result<longattn::kv::press::runner::PressAttention> {
    if attention.trim() == "exact" {
        bail!("--kv runs through the paged cache's kernel: give --attention a mask expression (default causal), not exact");
    }
    let p = longattn::kv::spec::KvSpec::parse(kv).context("--kv")?;
    let r = longattn::kv::score::Reduce::parse(reduce).context("--kv-reduce")?;
    longattn::kv::press::runner::PressAttention::with_spec(attention, p, r).context("--attention")
}

/// Errors when `n` tokens do not fit in the model's context.
pub fn check_context(m: &Model, n: usize) -> Result<()> {
    if n > m.cfg.context {
        bail!(
            "{n} tokens asked, more than the model's context of {} tokens",
            m.cfg.context
        );
    }
    Ok(())
}
