//! `eval --task copy` and `--task multikey`: two retrieval probes beside passkey, each with and
//! without `--kv SPEC`.
//!
//! Copy (the repeated-random-tokens probe of induction-head studies, Olsson et al. 2022): an
//! optional filler prefix, then N token ids drawn uniformly (with replacement, seeded) from the
//! ordinary vocabulary, then the same N ids again. The second copy's tokens 1..N-1 are scored
//! teacher-forced (token 0 cannot be told from the first copy): mean NLL and top-1 accuracy per
//! trial. Under `--kv` the prompt runs as `--task nll` does (`--kv-chunk` tokens per forward,
//! compressed after each), so the first copy has been through compression when it is copied.
//!
//! Multikey (RULER's multi-key needle, 2024, in passkey's wording): K facts "The pass key of NAME
//! is NUMBER." at depths (i + 1/2) / K of Gutenberg filler, then a question about one of them.
//! Greedy exact match (the first number of 8 generated tokens is the key) and the key's
//! teacher-forced log-probability; `--kv` with passkey's protocols (`--kv-protocol inside|after`).
use super::{
    attention, attention_spec, filler_ids, filler_span, passkey_pressed, Args, KvProtocol,
};
use crate::common::{parse_len, parse_list};
use crate::lm::{self, Loaded};
use anyhow::{bail, Result};
use longattn::model::tokenizer::Tokenizer;
use longattn::model::{ops, Attention, Model};
use longattn::testing::Rng;
use serde::Serialize;
use std::time::Instant;

/// The ids a random-token probe draws from: ordinary tokens ([`Tokenizer::is_ordinary`]) inside
/// the model's vocabulary (`vocab`, which may be smaller or larger than the tokenizer's).
pub(super) fn ordinary_pool(tok: &Tokenizer, vocab: usize) -> Vec<u32> {
    (0..vocab.min(tok.vocab_size()) as u32)
        .filter(|&i| tok.is_ordinary(i))
        .collect()
}

/// The copy prompt: `prefix`, then `n` ids drawn uniformly from `pool` (with replacement), then
/// the same `n` ids again. Returns the prompt and where the second copy starts.
pub(super) fn copy_prompt(
    prefix: &[u32],
    pool: &[u32],
    n: usize,
    rng: &mut Rng,
) -> (Vec<u32>, usize) {
    let span: Vec<u32> = (0..n).map(|_| pool[rng.below(pool.len())]).collect();
    let mut p = prefix.to_vec();
    p.extend_from_slice(&span);
    let second = p.len();
    p.extend_from_slice(&span);
    (p, second)
}

#[derive(Serialize)]
struct CopyTrial {
    /// Tokens of each copy.
    length: usize,
    trial: usize,
    /// Where the first and the second copy start.
    first: usize,
    second: usize,
    /// Mean NLL and top-1 accuracy over the second copy's tokens 1..N-1 (teacher-forced).
    nll: f64,
    accuracy: f64,
    /// Under `--kv`: bytes of pages held at the largest, and the full cache's for the prompt.
    kv_bytes: Option<usize>,
    kv_bytes_full: Option<usize>,
}

#[derive(Serialize)]
struct CopyReport {
    model: String,
    attention: String,
    kv: Option<String>,
    kv_chunk: Option<usize>,
    copy_prefix: usize,
    seed: u64,
    lengths: Vec<usize>,
    trials: usize,
    /// Per length: mean over trials of the trials' NLL and accuracy.
    nll: Vec<f64>,
    accuracy: Vec<f64>,
    per_trial: Vec<CopyTrial>,
    seconds: f64,
}

/// Parses `--lengths` and checks `--trials` for copy and multikey.
fn lengths_and_trials(a: &Args, task: &str) -> Result<Vec<usize>> {
    let lengths = parse_list(&a.lengths, "length", parse_len)?;
    if a.trials == 0 || lengths.is_empty() {
        bail!("--task {task}: --trials and --lengths must be non-empty");
    }
    Ok(lengths)
}

/// The press of `--kv` (with the head roles a `duo` press needs), if any.
fn press(a: &Args, lm: &Loaded) -> Result<Option<longattn::kv::press::runner::PressAttention>> {
    match &a.kv {
        None => Ok(None),
        Some(spec) => {
            let mut p = lm::press_of(&a.attention, spec, &a.kv_reduce)?;
            crate::kv::attach_roles(&mut p, lm)?;
            Ok(Some(p))
        }
    }
}

pub(super) fn copy(a: &Args) -> Result<()> {
    let lengths = lengths_and_trials(a, "copy")?;
    if let Some(&n) = lengths.iter().find(|&&n| n < 2) {
        bail!("--task copy: length {n} is too short (at least 2 tokens per copy)");
    }
    if a.kv.is_some() && a.kv_chunk == 0 {
        bail!("--kv-chunk must be >= 1");
    }
    // Spec errors before the model loads.
    if let Some(spec) = &a.kv {
        lm::press_of(&a.attention, spec, &a.kv_reduce)?;
    }
    let lm = lm::load(&a.model)?;
    let press = press(a, &lm)?;
    let m = &lm.model;
    let attn = attention(a, m)?;
    let bos: Vec<u32> = lm.tok.bos().filter(|_| lm.add_bos).into_iter().collect();
    for &n in &lengths {
        lm::check_context(m, bos.len() + a.copy_prefix + 2 * n)?;
    }
    let filler = match a.copy_prefix {
        0 => Vec::new(),
        _ => filler_ids(a, &lm)?,
    };
    if filler.len() < a.copy_prefix {
        bail!(
            "--copy-prefix {}: the filler text holds only {} tokens",
            a.copy_prefix,
            filler.len()
        );
    }
    let pool = ordinary_pool(&lm.tok, m.cfg.vocab);
    if pool.is_empty() {
        bail!("the tokenizer marks no token of the model's vocabulary as ordinary text");
    }
    let mut rng = Rng::new(a.seed);
    let pb = lm::bar((lengths.len() * a.trials) as u64, "prompts");
    let t0 = Instant::now();
    let (d, vocab) = (m.cfg.d_model, m.cfg.vocab);
    let mut per_trial = Vec::new();
    for &n in &lengths {
        for trial in 0..a.trials {
            let off = rng.below(filler.len() - a.copy_prefix + 1);
            let mut prefix = bos.clone();
            prefix.extend_from_slice(&filler[off..off + a.copy_prefix]);
            let first = prefix.len();
            let (prompt, second) = copy_prompt(&prefix, &pool, n, &mut rng);
            // Rows t in [second, second + n - 1) predict the second copy's tokens 1..n-1.
            let (lo, hi) = (second, second + n - 1);
            let (mut nll, mut hits) = (0.0f64, 0usize);
            let mut each = |start: usize, h: &[f32]| -> Result<()> {
                let rows = h.len() / d;
                let (r_lo, r_hi) = (
                    lo.max(start) - start,
                    hi.min(start + rows).max(start) - start,
                );
                for r0 in (r_lo..r_hi).step_by(128) {
                    let r1 = (r0 + 128).min(r_hi);
                    let lg = m.logits(&h[r0 * d..r1 * d]);
                    for r in r0..r1 {
                        let row = &lg[(r - r0) * vocab..(r - r0 + 1) * vocab];
                        let next = prompt[start + r + 1] as usize;
                        nll += ops::nll(row, next);
                        hits += (ops::argmax(row) == next) as usize;
                    }
                }
                Ok(())
            };
            let mut cache = m.new_cache(lm::PAGE)?;
            let seq = cache.add_sequence();
            let mem = match &press {
                Some(p) => {
                    p.reset(); // a new cache: its sequence ids start again
                    let (peak, end) = lm::prefill_pressed(
                        m, &mut cache, seq, &prompt, p, a.kv_chunk, None, &mut each,
                    )?;
                    Some((peak.bytes_in_use, end.bytes_full_in_use))
                }
                None => {
                    lm::prefill(
                        m,
                        &mut cache,
                        seq,
                        &prompt,
                        attn.as_ref(),
                        a.chunk,
                        None,
                        &mut each,
                    )?;
                    None
                }
            };
            per_trial.push(CopyTrial {
                length: n,
                trial,
                first,
                second,
                nll: nll / (n - 1) as f64,
                accuracy: hits as f64 / (n - 1) as f64,
                kv_bytes: mem.map(|x| x.0),
                kv_bytes_full: mem.map(|x| x.1),
            });
            pb.inc(1);
        }
    }
    pb.finish_and_clear();
    let mean_of = |n: usize, f: fn(&CopyTrial) -> f64| {
        let v: Vec<f64> = per_trial.iter().filter(|t| t.length == n).map(f).collect();
        v.iter().sum::<f64>() / v.len() as f64
    };
    let rep = CopyReport {
        model: a.model.display().to_string(),
        attention: attention_spec(press.as_ref(), &*attn),
        kv: press.as_ref().map(|p| p.press().to_string()),
        kv_chunk: press.as_ref().map(|_| a.kv_chunk),
        copy_prefix: a.copy_prefix,
        seed: a.seed,
        nll: lengths.iter().map(|&n| mean_of(n, |t| t.nll)).collect(),
        accuracy: lengths
            .iter()
            .map(|&n| mean_of(n, |t| t.accuracy))
            .collect(),
        lengths,
        trials: a.trials,
        per_trial,
        seconds: t0.elapsed().as_secs_f64(),
    };
    println!(
        "copy probe, attention `{}`, {} filler tokens before the first copy, {} trials per length \
         (second copy, tokens 1..N-1, teacher-forced; uniform baseline nll ln(vocab) = {:.3}):",
        rep.attention,
        a.copy_prefix,
        a.trials,
        (vocab as f64).ln()
    );
    for (i, n) in rep.lengths.iter().enumerate() {
        let trials: Vec<String> = rep
            .per_trial
            .iter()
            .filter(|t| t.length == *n)
            .map(|t| format!("{:.3}/{:.3}", t.nll, t.accuracy))
            .collect();
        println!(
            "  N {n:>6}: nll {:.4}, top-1 accuracy {:.4} (per trial nll/accuracy: {})",
            rep.nll[i],
            rep.accuracy[i],
            trials.join(" ")
        );
    }
    let held: Vec<(usize, usize)> = rep
        .per_trial
        .iter()
        .filter_map(|t| Some((t.kv_bytes?, t.kv_bytes_full?)))
        .collect();
    if !held.is_empty() {
        let (b, f) = held.iter().fold((0, 0), |(x, y), (b, f)| (x + b, y + f));
        println!(
            "  KV cache: pages held at the largest {:.1}% of the full cache's (over all prompts)",
            100.0 * b as f64 / f.max(1) as f64
        );
    }
    write_json(a, &rep)
}

fn write_json(a: &Args, rep: &impl Serialize) -> Result<()> {
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(rep)?)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", p.display()))?;
    }
    Ok(())
}

/// Names of the multikey facts: none occurs in austen-emma.txt, the default filler (Ezra, Gideon,
/// Juno and Matthias do in other books of the cache).
pub(super) const NAMES: [&str; 16] = [
    "Arjun", "Beatrix", "Casimir", "Dagny", "Ezra", "Freya", "Gideon", "Hedda", "Ignatius", "Juno",
    "Kasper", "Linnea", "Matthias", "Nadia", "Osric", "Priya",
];

/// The multikey prompt: intro, `len` tokens in all with the facts `(name, key)` at depths
/// (i + 1/2) / K of the filler (in the order given), then the question about `facts[ask]`.
/// Returns the prompt and the question's length (its last tokens).
pub(super) fn multikey_prompt(
    tok: &Tokenizer,
    add_bos: bool,
    filler: &[u32],
    offset: usize,
    len: usize,
    facts: &[(&str, u32)],
    ask: usize,
) -> Result<(Vec<u32>, usize)> {
    let mut intro: Vec<u32> = tok.bos().filter(|_| add_bos).into_iter().collect();
    intro.extend(tok.encode(
        "There are several pass keys hidden inside a lot of irrelevant text. Find them and memorize them.\n\n",
    ));
    let needles: Vec<Vec<u32>> = facts
        .iter()
        .map(|(name, key)| tok.encode(&format!("\nThe pass key of {name} is {key}.\n")))
        .collect();
    let name = facts[ask].0;
    let question = tok.encode(&format!(
        "\n\nWhat is the pass key of {name}? The pass key of {name} is"
    ));
    let fixed = intro.len() + needles.iter().map(Vec::len).sum::<usize>() + question.len();
    if len <= fixed + 16 {
        bail!(
            "multikey length {len} is too short for {} facts ({fixed} fixed tokens)",
            facts.len()
        );
    }
    let nf = len - fixed;
    let f = filler_span(filler, offset, nf, len)?;
    let k = facts.len() as f64;
    let mut p = intro;
    let mut at = 0;
    for (i, needle) in needles.into_iter().enumerate() {
        let next = ((nf as f64) * (i as f64 + 0.5) / k).round() as usize;
        p.extend_from_slice(&f[at..next]);
        p.extend(needle);
        at = next;
    }
    p.extend_from_slice(&f[at..]);
    let nq = question.len();
    p.extend(question);
    Ok((p, nq))
}

/// The first run of ASCII digits in `s`.
fn first_number(s: &str) -> Option<&str> {
    let start = s.find(|c: char| c.is_ascii_digit())?;
    let rest = &s[start..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    Some(&rest[..end])
}

/// The full cache's greedy answer (up to 8 tokens) and the key's teacher-forced
/// log-probability (a second prefill of the prompt with the key's tokens but the last appended).
fn answer_full(
    m: &Model,
    prompt: &[u32],
    key_ids: &[u32],
    attn: &dyn Attention,
    chunk: usize,
    stop: Option<u32>,
) -> Result<(Vec<u32>, f64)> {
    let mut cache = m.new_cache(lm::PAGE)?;
    let seq = cache.add_sequence();
    let out = m.generate(&mut cache, seq, prompt, 8, stop, attn, chunk, |_| {})?;
    let mut ids = prompt.to_vec();
    ids.extend_from_slice(&key_ids[..key_ids.len() - 1]);
    let first = prompt.len() - 1; // the row predicting key_ids[0]
    let (d, vocab) = (m.cfg.d_model, m.cfg.vocab);
    let mut logp = 0.0;
    let mut cache = m.new_cache(lm::PAGE)?;
    let seq = cache.add_sequence();
    lm::prefill(m, &mut cache, seq, &ids, attn, chunk, None, |start, h| {
        let rows = h.len() / d;
        let r_lo = first.max(start) - start;
        if r_lo < rows {
            let lg = m.logits(&h[r_lo * d..]);
            for r in r_lo..rows {
                let want = key_ids[start + r - first] as usize;
                logp -= ops::nll(&lg[(r - r_lo) * vocab..(r - r_lo + 1) * vocab], want);
            }
        }
        Ok(())
    })?;
    Ok((out, logp))
}

#[derive(Serialize)]
struct MultikeyTrial {
    length: usize,
    trial: usize,
    /// The asked fact: its name, key, index among the facts and depth in the filler.
    name: String,
    key: u32,
    asked: usize,
    depth: f64,
    /// The greedy answer's text, and whether its first number is the key.
    answer: String,
    correct: bool,
    /// The key's teacher-forced log-probability (" NUMBER" after the question).
    logprob: f64,
}

#[derive(Serialize)]
struct MultikeyReport {
    model: String,
    attention: String,
    kv: Option<String>,
    kv_protocol: Option<String>,
    keys: usize,
    seed: u64,
    lengths: Vec<usize>,
    trials: usize,
    /// Per length: exact-match accuracy and mean log-probability of the key over trials.
    accuracy: Vec<f64>,
    key_logprob: Vec<f64>,
    per_trial: Vec<MultikeyTrial>,
    /// Under `--kv`: the cache's bytes in use after compression / the full cache's, over all
    /// prompts.
    kv_bytes: Option<usize>,
    kv_bytes_full: Option<usize>,
    seconds: f64,
}

pub(super) fn multikey(a: &Args) -> Result<()> {
    let lengths = lengths_and_trials(a, "multikey")?;
    if a.keys == 0 || a.keys > NAMES.len() {
        bail!(
            "--keys {}: expected 1..={} facts (one name each)",
            a.keys,
            NAMES.len()
        );
    }
    let proto = match &a.kv {
        Some(spec) => {
            lm::press_of(&a.attention, spec, &a.kv_reduce)?;
            Some(KvProtocol::parse(&a.kv_protocol)?)
        }
        None => None,
    };
    let lm = lm::load(&a.model)?;
    let press = press(a, &lm)?;
    let m = &lm.model;
    let attn = attention(a, m)?;
    for &l in &lengths {
        lm::check_context(m, l + 8)?;
    }
    let filler = filler_ids(a, &lm)?;
    let max_len = *lengths.iter().max().unwrap_or(&0);
    let mut rng = Rng::new(a.seed);
    let pb = lm::bar((lengths.len() * a.trials) as u64, "prompts");
    let t0 = Instant::now();
    let (mut bytes, mut bytes_full) = (0usize, 0usize);
    let mut per_trial = Vec::new();
    for &len in &lengths {
        for trial in 0..a.trials {
            // K names in a random order, K distinct keys, one fact asked.
            let mut names = NAMES.to_vec();
            for i in (1..names.len()).rev() {
                names.swap(i, rng.below(i + 1));
            }
            let mut facts: Vec<(&str, u32)> = Vec::new();
            for &name in &names[..a.keys] {
                let key = loop {
                    let k = 10000 + rng.below(90000) as u32;
                    if facts.iter().all(|f| f.1 != k) {
                        break k;
                    }
                };
                facts.push((name, key));
            }
            let ask = rng.below(a.keys);
            let offset = rng.below(filler.len().saturating_sub(max_len + 64).max(1));
            let (prompt, nq) =
                multikey_prompt(&lm.tok, lm.add_bos, &filler, offset, len, &facts, ask)?;
            let (name, key) = facts[ask];
            let key_ids = lm.encode_plain(&format!(" {key}"))?;
            let (out, logprob) = match (&press, proto) {
                (Some(p), Some(proto)) => {
                    let (out, lp, mem) =
                        passkey_pressed(m, &prompt, nq, &key_ids, p, proto, lm.tok.eos())?;
                    bytes += mem.bytes_in_use;
                    bytes_full += mem.bytes_full_in_use;
                    (out, lp)
                }
                _ => answer_full(m, &prompt, &key_ids, attn.as_ref(), a.chunk, lm.tok.eos())?,
            };
            let answer = lm.tok.decode(&out);
            per_trial.push(MultikeyTrial {
                length: len,
                trial,
                name: name.to_string(),
                key,
                asked: ask,
                depth: (ask as f64 + 0.5) / a.keys as f64,
                correct: first_number(&answer) == Some(&key.to_string()),
                answer,
                logprob,
            });
            pb.inc(1);
        }
    }
    pb.finish_and_clear();
    let of_len = |l: usize| per_trial.iter().filter(move |t| t.length == l);
    let accuracy: Vec<f64> = lengths
        .iter()
        .map(|&l| of_len(l).filter(|t| t.correct).count() as f64 / a.trials as f64)
        .collect();
    let key_logprob: Vec<f64> = lengths
        .iter()
        .map(|&l| of_len(l).map(|t| t.logprob).sum::<f64>() / a.trials as f64)
        .collect();
    let rep = MultikeyReport {
        model: a.model.display().to_string(),
        attention: attention_spec(press.as_ref(), &*attn),
        kv: press.as_ref().map(|p| p.press().to_string()),
        kv_protocol: proto.map(|x| format!("{x:?}").to_lowercase()),
        keys: a.keys,
        seed: a.seed,
        accuracy,
        key_logprob,
        lengths: lengths.clone(),
        trials: a.trials,
        per_trial,
        kv_bytes: press.as_ref().map(|_| bytes),
        kv_bytes_full: press.as_ref().map(|_| bytes_full),
        seconds: t0.elapsed().as_secs_f64(),
    };
    println!(
        "multikey, attention `{}`{}, {} facts, {} trials per length:",
        rep.attention,
        rep.kv_protocol
            .as_ref()
            .map(|p| format!(" ({p} protocol)"))
            .unwrap_or_default(),
        a.keys,
        a.trials
    );
    for (i, l) in rep.lengths.iter().enumerate() {
        let answers: Vec<String> = rep
            .per_trial
            .iter()
            .filter(|t| t.length == *l)
            .map(|t| format!("{}{}", t.key, if t.correct { "" } else { "(x)" }))
            .collect();
        println!(
            "  length {l:>6}: accuracy {:.2}, key log-probability {:.3} (keys asked: {})",
            rep.accuracy[i],
            rep.key_logprob[i],
            answers.join(" ")
        );
    }
    if let (Some(b), Some(f)) = (rep.kv_bytes, rep.kv_bytes_full) {
        println!(
            "  kv memory after compression: {:.1}% of the full cache ({b} / {f} bytes over all prompts)",
            100.0 * b as f64 / f.max(1) as f64
        );
    }
    write_json(a, &rep)
}

#[cfg(test)]
mod tests {
    use super::*;
    use longattn::model::fixtures;
    use longattn::model::gguf::Gguf;

    #[test]
    fn copy_prompt_repeats_a_seeded_span_from_the_pool() {
        let pool: Vec<u32> = (100..160).collect();
        let prefix = [1u32, 7, 7, 9];
        for n in [1usize, 2, 17, 300] {
            let (p, second) = copy_prompt(&prefix, &pool, n, &mut Rng::new(42));
            assert_eq!(p.len(), prefix.len() + 2 * n);
            assert_eq!(&p[..prefix.len()], &prefix);
            assert_eq!(second, prefix.len() + n);
            assert_eq!(p[prefix.len()..second], p[second..], "second copy = first");
            assert!(p[prefix.len()..].iter().all(|t| pool.contains(t)));
            let (q, _) = copy_prompt(&prefix, &pool, n, &mut Rng::new(42));
            assert_eq!(p, q, "same seed, same prompt");
        }
        let (a, _) = copy_prompt(&[], &pool, 64, &mut Rng::new(1));
        let (b, _) = copy_prompt(&[], &pool, 64, &mut Rng::new(2));
        assert_ne!(a, b, "another seed, another span");
    }

    fn tokenizer_or_skip() -> Option<Tokenizer> {
        match fixtures::smollm2_path() {
            Ok(p) => Some(Tokenizer::from_gguf(&Gguf::open(&p).unwrap()).unwrap()),
            Err(e) => {
                eprintln!("SKIPPED (fixture absent): {e}");
                None
            }
        }
    }

    #[test]
    fn ordinary_pool_has_no_special_tokens() {
        let Some(tok) = tokenizer_or_skip() else {
            return;
        };
        let pool = ordinary_pool(&tok, tok.vocab_size());
        assert!(pool.len() > tok.vocab_size() * 9 / 10, "{}", pool.len());
        for special in ["<|im_start|>", "<|im_end|>", "<|endoftext|>"] {
            let id = tok.token_id(special).expect(special);
            assert!(!pool.contains(&id), "{special} ({id}) in the pool");
        }
        for id in [tok.bos(), tok.eos()].into_iter().flatten() {
            assert!(!pool.contains(&id), "{id}");
        }
        // A smaller model vocabulary bounds the pool.
        assert!(ordinary_pool(&tok, 1000).iter().all(|&i| i < 1000));
    }

    #[test]
    fn multikey_prompt_holds_every_fact_once_and_asks_one() {
        let Some(tok) = tokenizer_or_skip() else {
            return;
        };
        let book = fixtures::book_path("carroll-alice.txt").unwrap();
        let text = String::from_utf8_lossy(&std::fs::read(book).unwrap()).replace("\r\n", "\n");
        let filler = tok.encode(&text);
        let facts = [("Dagny", 31416u32), ("Osric", 27182), ("Priya", 14142)];
        for (ask, len) in [(0usize, 400usize), (2, 1000)] {
            let (p, nq) = multikey_prompt(&tok, true, &filler, 50, len, &facts, ask).unwrap();
            assert_eq!(p.len(), len);
            let s = tok.decode(&p);
            for (name, key) in facts {
                let fact = format!("The pass key of {name} is {key}.");
                assert_eq!(s.matches(&fact).count(), 1, "{fact}");
                assert_eq!(s.matches(&key.to_string()).count(), 1, "{key}");
            }
            let q = tok.decode(&p[p.len() - nq..]);
            let name = facts[ask].0;
            assert_eq!(
                q,
                format!("\n\nWhat is the pass key of {name}? The pass key of {name} is")
            );
            // The facts in order, spread through the filler.
            let at: Vec<usize> = facts
                .iter()
                .map(|(n, _)| s.find(&format!("pass key of {n} is")).unwrap())
                .collect();
            assert!(at.windows(2).all(|w| w[0] < w[1]), "{at:?}");
        }
        let e = multikey_prompt(&tok, true, &filler, 0, 60, &facts, 0).unwrap_err();
        assert!(e.to_string().contains("too short"), "{e}");
        assert_eq!(first_number(" 31416.\n"), Some("31416"));
        assert_eq!(first_number(" 3141 6"), Some("3141"));
        assert_eq!(first_number(" none"), None);
    }
}
