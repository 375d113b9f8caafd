//! `longattn capture`: post-RoPE q/k/v of chosen layers on real text, written as safetensors
//! `q.<layer>` `[1, N, Hq, D]`, `k.<layer>` and `v.<layer>` `[1, N, Hk, D]` (f16 or f32): the
//! input of `longattn run --layer L` and `longattn bench --data`.
use crate::common::parse_list;
use crate::lm;
use anyhow::{bail, Context, Result};
use longattn::model::{from_spec, Captured};
use longattn::DType;
use safetensors::tensor::{Dtype, TensorView as StView};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The model (GGUF).
    #[arg(long)]
    model: PathBuf,
    /// The text.
    #[arg(long)]
    text: PathBuf,
    /// Tokens captured.
    #[arg(long)]
    tokens: usize,
    /// Comma-separated layer indices.
    #[arg(long)]
    layers: String,
    /// Output safetensors file.
    #[arg(long)]
    output: PathBuf,
    /// f16 or f32.
    #[arg(long, default_value = "f16")]
    dtype: String,
    /// Replace an existing output file.
    #[arg(long)]
    force: bool,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

pub fn main(a: Args) -> Result<()> {
    let pool = crate::common::pool(a.threads)?;
    pool.install(|| run(&a))
}

fn run(a: &Args) -> Result<()> {
    let dtype = match DType::parse(&a.dtype) {
        Some(d @ (DType::F16 | DType::F32)) => d,
        _ => bail!("--dtype {}: use f16 or f32", a.dtype),
    };
    if a.output.exists() && !a.force {
        bail!("{} exists (pass --force to replace it)", a.output.display());
    }
    let lm = lm::load(&a.model)?;
    let m = &lm.model;
    let layers = parse_list(&a.layers, "layer", |x| x.parse::<usize>().ok())?;
    if let Some(&l) = layers.iter().find(|&&l| l >= m.cfg.layers) {
        bail!(
            "--layers: layer {l} does not exist (the model has {} layers)",
            m.cfg.layers
        );
    }
    let ids = lm.encode(&lm::read_text(&a.text)?)?;
    let n = a.tokens;
    if n == 0 || ids.len() < n {
        bail!(
            "{} holds {} tokens, {n} asked (--tokens)",
            a.text.display(),
            ids.len()
        );
    }
    lm::check_context(m, n)?;
    let (hq, hk, d) = (m.cfg.heads, m.cfg.kv_heads, m.cfg.head_dim);
    // Per captured layer: q [N, Hq, D], k and v [N, Hk, D], filled chunk by chunk.
    let mut store: BTreeMap<usize, [Vec<f32>; 3]> = layers
        .iter()
        .map(|&l| (l, [Vec::new(), Vec::new(), Vec::new()]))
        .collect();
    let attn = from_spec("causal")?;
    let mut cache = m.new_cache(lm::PAGE)?;
    let seq = cache.add_sequence();
    let pb = lm::bar(n as u64, "tokens");
    for part in ids[..n].chunks(lm::CHUNK) {
        let mut cb = |c: Captured| {
            if let Some(s) = store.get_mut(&c.layer) {
                s[0].extend_from_slice(c.q);
                s[1].extend_from_slice(c.k);
                s[2].extend_from_slice(c.v);
            }
        };
        m.forward(&mut cache, seq, part, attn.as_ref(), Some(&mut cb))?;
        pb.inc(part.len() as u64);
    }
    pb.finish_and_clear();
    let to_bytes = |x: &[f32]| -> Vec<u8> {
        match dtype {
            DType::F16 => x
                .iter()
                .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                .collect(),
            _ => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    };
    let st_dtype = if dtype == DType::F16 {
        Dtype::F16
    } else {
        Dtype::F32
    };
    let mut bufs: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (l, [q, k, v]) in &store {
        bufs.push((format!("q.{l}"), vec![1, n, hq, d], to_bytes(q)));
        bufs.push((format!("k.{l}"), vec![1, n, hk, d], to_bytes(k)));
        bufs.push((format!("v.{l}"), vec![1, n, hk, d], to_bytes(v)));
    }
    let views: Vec<(String, StView)> = bufs
        .iter()
        .map(|(name, shape, b)| Ok((name.clone(), StView::new(st_dtype, shape.clone(), b)?)))
        .collect::<Result<_>>()?;
    let mut meta = std::collections::HashMap::new();
    meta.insert("model".to_string(), a.model.display().to_string());
    meta.insert("text".to_string(), a.text.display().to_string());
    meta.insert(
        "content".to_string(),
        "post-RoPE q/k/v, [1, N, H, D]".to_string(),
    );
    safetensors::serialize_to_file(views, &Some(meta), &a.output)
        .with_context(|| format!("cannot write {}", a.output.display()))?;
    println!(
        "wrote {}: layers {:?}, {n} tokens, q [1, {n}, {hq}, {d}], k/v [1, {n}, {hk}, {d}], {}",
        a.output.display(),
        layers,
        dtype
    );
    Ok(())
}
