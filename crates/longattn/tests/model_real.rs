//! The forward on the real models and real text (fixtures from `scripts/fetch_fixtures.sh`; each
//! test skips with a message when they are absent). Kept to a few hundred tokens so the suite
//! stays within CI's minutes; the 4096-token agreement of `exact` and `causal` is measured with
//! `longattn eval` and recorded in docs/QUALITY.md.
use longattn::model::fixtures;
use longattn::model::gguf::Gguf;
use longattn::model::tokenizer::Tokenizer;
use longattn::model::{from_spec, ops, LoadOptions, Model};
use std::path::PathBuf;
use std::sync::OnceLock;

const N: usize = 256;

fn fixture(p: longattn::Result<PathBuf>) -> Option<PathBuf> {
    match p {
        Ok(p) => Some(p),
        Err(e) => {
            eprintln!("SKIPPED (fixture absent): {e}");
            None
        }
    }
}

struct Fixture {
    gguf: Gguf,
    model: Model,
    ids: Vec<u32>,
}

/// The model and the first N tokens of a book (BOS first when the model wants it), loaded once.
fn load(
    path: Option<PathBuf>,
    cell: &'static OnceLock<Option<Fixture>>,
) -> Option<&'static Fixture> {
    cell.get_or_init(|| {
        let path = path?;
        let book = fixture(fixtures::book_path("carroll-alice.txt"))?;
        let gguf = Gguf::open(&path).expect("open gguf");
        let model = Model::load(&gguf, LoadOptions::default()).expect("load model");
        let tok = Tokenizer::from_gguf(&gguf).expect("tokenizer");
        let text = String::from_utf8_lossy(&std::fs::read(book).unwrap()).replace("\r\n", "\n");
        let mut ids: Vec<u32> = if tok.add_bos() {
            tok.bos().into_iter().collect()
        } else {
            vec![]
        };
        // Skip the Gutenberg header: the text of the first chapter.
        let start = text.find("CHAPTER I.").unwrap_or(0);
        ids.extend(tok.encode(&text[start..]));
        ids.truncate(N);
        assert_eq!(ids.len(), N);
        Some(Fixture { gguf, model, ids })
    })
    .as_ref()
}

fn smollm2() -> Option<&'static Fixture> {
    static C: OnceLock<Option<Fixture>> = OnceLock::new();
    load(fixture(fixtures::smollm2_path()), &C)
}
fn gemma3() -> Option<&'static Fixture> {
    static C: OnceLock<Option<Fixture>> = OnceLock::new();
    load(fixture(fixtures::gemma3_path()), &C)
}

/// Per-position NLL of ids[1..] and the logits of the last position, prompt fed in `chunk`s.
fn nll(m: &Model, ids: &[u32], spec: &str, chunk: usize) -> (Vec<f64>, Vec<f32>) {
    let attn = from_spec(spec).unwrap();
    let mut cache = m.new_cache(64).unwrap();
    let s = cache.add_sequence();
    let (mut out, mut last) = (Vec::new(), Vec::new());
    let mut pos = 0;
    for part in ids.chunks(chunk) {
        let h = m.forward(&mut cache, s, part, attn.as_ref(), None).unwrap();
        let lg = m.logits(&h);
        let v = m.cfg.vocab;
        for r in 0..part.len() {
            if pos + r + 1 < ids.len() {
                out.push(ops::nll(&lg[r * v..(r + 1) * v], ids[pos + r + 1] as usize));
            }
        }
        last = lg[(part.len() - 1) * v..].to_vec();
        pos += part.len();
    }
    (out, last)
}

fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len() as f64
}

#[test]
fn smollm2_loss_far_below_uniform_and_worse_without_unpermute() {
    let Some(f) = smollm2() else { return };
    let uniform = (f.model.cfg.vocab as f64).ln();
    let good = mean(&nll(&f.model, &f.ids, "causal", 128).0);
    assert!(good < 0.45 * uniform, "nll {good} vs uniform {uniform}");
    let raw = Model::load(
        &f.gguf,
        LoadOptions {
            unpermute_qk: false,
        },
    )
    .unwrap();
    let bad = mean(&nll(&raw, &f.ids, "causal", 128).0);
    eprintln!(
        "SmolLM2 {N} tokens: nll {good:.4} (uniform {uniform:.3}), without un-permutation {bad:.4}"
    );
    assert!(bad > good + 0.5, "without un-permutation: {bad} vs {good}");
}

#[test]
fn smollm2_exact_reference_equals_kernel_causal() {
    let Some(f) = smollm2() else { return };
    let a = nll(&f.model, &f.ids, "exact", 100).0;
    let b = nll(&f.model, &f.ids, "causal", 100).0;
    let d = (mean(&a) - mean(&b)).abs();
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    eprintln!("exact vs causal: mean nll differs by {d:.2e}, worst position by {worst:.2e}");
    assert!(d < 1e-4 && worst < 1e-3, "mean {d}, worst {worst}");
    // A window/sink mask is applied: it changes the loss, but only a little at this length.
    let c = mean(&nll(&f.model, &f.ids, "causal & (sinks(4) | window(32,0))", 100).0);
    assert!((c - mean(&b)).abs() > 1e-3);
}

#[test]
fn smollm2_stable_across_thread_counts() {
    let Some(f) = smollm2() else { return };
    let pool = |n| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .unwrap()
    };
    let ids = &f.ids[..160];
    let a = pool(1).install(|| nll(&f.model, ids, "causal", 64));
    let b = pool(2).install(|| nll(&f.model, ids, "causal", 64));
    let d =
        a.0.iter()
            .zip(&b.0)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
    assert!(d < 1e-5, "1 vs 2 threads: worst position differs by {d}");
}

#[test]
fn smollm2_cached_decode_equals_full_recompute() {
    let Some(f) = smollm2() else { return };
    let ids = &f.ids[..120];
    // One pass over all 120 tokens vs 100 prefilled then 20 decoded one by one from the cache.
    let full = nll(&f.model, ids, "causal", 120);
    let mut cache = f.model.new_cache(16).unwrap();
    let s = cache.add_sequence();
    let attn = from_spec("causal").unwrap();
    f.model
        .forward(&mut cache, s, &ids[..100], attn.as_ref(), None)
        .unwrap();
    let mut h = Vec::new();
    for &t in &ids[100..] {
        h = f
            .model
            .forward(&mut cache, s, &[t], attn.as_ref(), None)
            .unwrap();
    }
    let last = f.model.logits(&h);
    let d = last
        .iter()
        .zip(&full.1)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(d < 2e-3, "decode vs recompute logits differ by {d}");
    assert_eq!(ops::argmax(&last), ops::argmax(&full.1));
}

#[test]
fn gemma3_loss_far_below_uniform_and_exact_equals_causal() {
    let Some(f) = gemma3() else { return };
    let uniform = (f.model.cfg.vocab as f64).ln();
    let ids = &f.ids[..192];
    let a = mean(&nll(&f.model, ids, "exact", 96).0);
    let b = mean(&nll(&f.model, ids, "causal", 96).0);
    eprintln!(
        "Gemma-3 {} tokens: nll exact {a:.5}, causal {b:.5} (uniform {uniform:.3})",
        ids.len()
    );
    assert!(b < 0.45 * uniform, "nll {b} vs uniform {uniform}");
    assert!((a - b).abs() < 1e-4, "exact {a} vs causal {b}");
}

#[test]
fn bad_token_ids_and_lengths_are_refused() {
    let Some(f) = smollm2() else { return };
    let attn = from_spec("causal").unwrap();
    let mut cache = f.model.new_cache(64).unwrap();
    let s = cache.add_sequence();
    let e = f
        .model
        .forward(&mut cache, s, &[1, 49152], attn.as_ref(), None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("token id 49152") && e.contains("out of range"),
        "{e}"
    );
    let too_long = vec![1u32; f.model.cfg.context + 1];
    let e = f
        .model
        .forward(&mut cache, s, &too_long, attn.as_ref(), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("context of 8192"), "{e}");
}
