//! The forward on small synthetic models (seeded random weights; no fixtures needed): the exact
//! reference path against the kernel, chunked prefill and KV-cache decode against a full
//! recompute, thread counts, sliding-window layers, bad input.
use super::*;
use crate::error::Result;
use crate::testing::Rng;
use std::collections::HashMap;

struct Synthetic {
    arch: &'static str,
    ints: HashMap<String, u64>,
    floats: HashMap<String, f32>,
    tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
}

impl WeightSource for Synthetic {
    fn architecture(&self) -> String {
        self.arch.into()
    }
    fn meta_int(&self, key: &str) -> Option<u64> {
        self.ints.get(key).copied()
    }
    fn meta_float(&self, key: &str) -> Option<f32> {
        self.floats.get(key).copied()
    }
    fn dims(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors.get(name).map(|t| t.0.clone())
    }
    fn tensor_f32(&self, name: &str) -> Result<Vec<f32>> {
        self.tensors
            .get(name)
            .map(|t| t.1.clone())
            .ok_or_else(|| crate::Error::Param {
                op: "synthetic",
                msg: format!("no tensor {name}"),
            })
    }
}

const VOCAB: usize = 61;

fn synthetic(arch: &'static str, seed: u64) -> Synthetic {
    let (layers, d, heads, kv, hd, ffn) = (3usize, 32usize, 4usize, 2usize, 8usize, 48usize);
    let mut rng = Rng::new(seed);
    let mut tensors = HashMap::new();
    let mut add = |name: String, dims: Vec<usize>, std: f64, mean: f64| {
        let n = dims.iter().product();
        let v = (0..n).map(|_| (mean + std * rng.normal()) as f32).collect();
        tensors.insert(name, (dims, v));
    };
    add("token_embd.weight".into(), vec![d, VOCAB], 1.0, 0.0);
    add("output_norm.weight".into(), vec![d], 0.1, 1.0);
    for l in 0..layers {
        let n = |s: &str| format!("blk.{l}.{s}.weight");
        let s = 1.0 / (d as f64).sqrt();
        add(n("attn_norm"), vec![d], 0.1, 1.0);
        add(n("attn_q"), vec![d, heads * hd], 2.0 * s, 0.0);
        add(n("attn_k"), vec![d, kv * hd], 2.0 * s, 0.0);
        add(n("attn_v"), vec![d, kv * hd], s, 0.0);
        add(n("attn_output"), vec![heads * hd, d], s, 0.0);
        add(n("ffn_norm"), vec![d], 0.1, 1.0);
        add(n("ffn_gate"), vec![d, ffn], s, 0.0);
        add(n("ffn_up"), vec![d, ffn], s, 0.0);
        add(n("ffn_down"), vec![ffn, d], 1.0 / (ffn as f64).sqrt(), 0.0);
        if arch == "gemma3" {
            add(n("attn_q_norm"), vec![hd], 0.1, 1.0);
            add(n("attn_k_norm"), vec![hd], 0.1, 1.0);
            add(n("post_attention_norm"), vec![d], 0.1, 1.0);
            add(n("post_ffw_norm"), vec![d], 0.1, 1.0);
        }
    }
    let mut ints = HashMap::new();
    for (k, v) in [
        ("block_count", layers),
        ("embedding_length", d),
        ("attention.head_count", heads),
        ("attention.head_count_kv", kv),
        ("attention.key_length", hd),
        ("feed_forward_length", ffn),
        ("context_length", 400),
    ] {
        ints.insert(format!("{arch}.{k}"), v as u64);
    }
    if arch == "gemma3" {
        ints.insert("gemma3.attention.sliding_window".into(), 24);
    }
    let mut floats = HashMap::new();
    floats.insert(format!("{arch}.rope.freq_base"), 10000.0);
    floats.insert(format!("{arch}.attention.layer_norm_rms_epsilon"), 1e-5);
    Synthetic {
        arch,
        ints,
        floats,
        tensors,
    }
}

fn tokens(n: usize, seed: u64) -> Vec<u32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.below(VOCAB) as u32).collect()
}

/// Logits of every position, the prompt fed in chunks of `chunk`.
fn run(m: &Model, toks: &[u32], spec: &str, chunk: usize, page: usize) -> Vec<f32> {
    let attn = from_spec(spec).unwrap();
    let mut cache = m.new_cache(page).unwrap();
    let s = cache.add_sequence();
    let mut out = Vec::new();
    for part in toks.chunks(chunk) {
        let h = m.forward(&mut cache, s, part, attn.as_ref(), None).unwrap();
        out.extend(m.logits(&h));
    }
    out
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn exact_reference_and_kernel_causal_agree() {
    for arch in ["llama", "gemma3"] {
        let m = Model::load(&synthetic(arch, 1), LoadOptions::default()).unwrap();
        let t = tokens(150, 2);
        let a = run(&m, &t, "exact", 64, 16);
        let b = run(&m, &t, "causal", 64, 16);
        let e = max_diff(&a, &b);
        assert!(e < 2e-4, "{arch}: exact vs causal logits differ by {e}");
        // A mask that changes the attention changes the logits (the spec is really applied).
        let c = run(&m, &t, "causal & window(4,0)", 64, 16);
        assert!(
            max_diff(&a, &c) > 1e-2,
            "{arch}: window(4,0) changed nothing"
        );
    }
}

#[test]
fn chunked_prefill_and_decode_equal_one_shot() {
    for arch in ["llama", "gemma3"] {
        let m = Model::load(&synthetic(arch, 3), LoadOptions::default()).unwrap();
        let t = tokens(97, 4);
        let one = run(&m, &t, "causal", 97, 64);
        for (chunk, page) in [(1, 16), (13, 16), (40, 256)] {
            let e = max_diff(&one, &run(&m, &t, "causal", chunk, page));
            assert!(e < 2e-4, "{arch} chunk {chunk} page {page}: {e}");
        }
    }
}

/// `generate` frees the dead entries of a windowed model's window layers as it goes (the same
/// tokens as a cache that keeps everything), and leaves a press's cache to the press.
#[test]
fn generate_frees_dead_window_entries_unless_a_press_owns_the_cache() {
    use crate::kv::press::{runner::PressAttention, Press};
    use crate::kv::score::Reduce;
    let m = Model::load(&synthetic("gemma3", 5), LoadOptions::default()).unwrap();
    let attn = from_spec("causal").unwrap();
    let prompt = tokens(50, 6);
    let mut cache = m.new_cache(16).unwrap();
    let s = cache.add_sequence();
    let got = m
        .generate(&mut cache, s, &prompt, 12, None, attn.as_ref(), 7, |_| {})
        .unwrap();
    let mem = cache.memory();
    assert!(mem.bytes_entries < mem.bytes_full, "{mem:?}");
    // Greedy tokens as with every entry kept: the drop is exact.
    let mut seq = prompt.clone();
    for &g in &got {
        let l = run(&m, &seq, "causal", seq.len(), 16);
        assert_eq!(ops::argmax(&l[l.len() - VOCAB..]) as u32, g);
        seq.push(g);
    }
    // A press evicts (and drops) in its own `compress`, which the caller runs: without it the
    // cache holds every entry.
    let press = PressAttention::new(
        "causal",
        Press::parse("h2o(budget=1)").unwrap(),
        Reduce::Mean,
    )
    .unwrap();
    let mut cache = m.new_cache(16).unwrap();
    let s = cache.add_sequence();
    m.generate(&mut cache, s, &prompt, 4, None, &press, 7, |_| {})
        .unwrap();
    let mem = cache.memory();
    assert_eq!(mem.bytes_entries, mem.bytes_full, "{mem:?}");
}

#[test]
fn greedy_decode_with_cache_equals_full_recompute() {
    let m = Model::load(&synthetic("llama", 5), LoadOptions::default()).unwrap();
    let attn = from_spec("causal").unwrap();
    let prompt = tokens(20, 6);
    let mut cache = m.new_cache(16).unwrap();
    let s = cache.add_sequence();
    let got = m
        .generate(&mut cache, s, &prompt, 8, None, attn.as_ref(), 7, |_| {})
        .unwrap();
    // Recompute: each step re-runs the whole prefix in a fresh cache.
    let mut seq = prompt.clone();
    for &g in &got {
        let l = run(&m, &seq, "exact", seq.len(), 16);
        let last = &l[l.len() - VOCAB..];
        assert_eq!(ops::argmax(last) as u32, g);
        seq.push(g);
    }
}

#[test]
fn stable_across_thread_counts() {
    let m = Model::load(&synthetic("gemma3", 7), LoadOptions::default()).unwrap();
    let t = tokens(130, 8);
    let pool = |n| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .unwrap()
    };
    let a = pool(1).install(|| run(&m, &t, "causal & (sinks(2) | window(30,0))", 64, 32));
    let b = pool(2).install(|| run(&m, &t, "causal & (sinks(2) | window(30,0))", 64, 32));
    let e = max_diff(&a, &b);
    assert!(e < 1e-5, "1 vs 2 threads: {e}");
}

#[test]
fn gemma_local_layers_use_the_sliding_window() {
    let src = synthetic("gemma3", 9);
    let m = Model::load(&src, LoadOptions::default()).unwrap();
    assert_eq!(m.cfg.layer_window(0), Some(24));
    assert_eq!(m.cfg.layer_window(5), None);
    let t = tokens(80, 10);
    // On local layers the model's window of 24 keys always applies: a user window wider than
    // every sequence here changes nothing, one narrower than 24 changes the result.
    let a = run(&m, &t, "causal", 80, 16);
    let b = run(&m, &t, "causal & window(200,0)", 80, 16);
    assert!(max_diff(&a, &b) < 1e-5);
    let c = run(&m, &t, "causal & window(10,0)", 80, 16);
    assert!(max_diff(&a, &c) > 1e-3);
}

#[test]
fn bad_input_gives_clear_errors() {
    let m = Model::load(&synthetic("llama", 11), LoadOptions::default()).unwrap();
    let attn = from_spec("causal").unwrap();
    let mut cache = m.new_cache(16).unwrap();
    let s = cache.add_sequence();
    let e = m
        .forward(&mut cache, s, &[1, 2, VOCAB as u32], attn.as_ref(), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("out of range"), "{e}");
    let long = tokens(401, 1);
    let e = m
        .forward(&mut cache, s, &long, attn.as_ref(), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("context of 400"), "{e}");
    let mut src = synthetic("llama", 11);
    src.arch = "mamba";
    let e = Model::load(&src, LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("unsupported architecture `mamba`"), "{e}");
    assert!(from_spec("causal & windo(3,0)").is_err());
}

/// Logits of every position and the sparse statistics, the prompt in chunks of `chunk`.
fn run_sparse(
    m: &Model,
    toks: &[u32],
    spec: &str,
    opts: SparseOptions,
    chunk: usize,
) -> (Vec<f32>, SparseStats) {
    let attn = from_spec_with(spec, Some(opts)).unwrap();
    let mut cache = m.new_cache(16).unwrap();
    let s = cache.add_sequence();
    let mut out = Vec::new();
    for part in toks.chunks(chunk) {
        let h = m.forward(&mut cache, s, part, attn.as_ref(), None).unwrap();
        out.extend(m.logits(&h));
    }
    (out, attn.sparse_stats().unwrap())
}

#[test]
fn sparse_prefill_with_every_block_equals_causal() {
    // gamma = 1 keeps every tile of the model's mask (Gemma-3's local layers: causal & window).
    for arch in ["llama", "gemma3"] {
        let m = Model::load(&synthetic(arch, 21), LoadOptions::default()).unwrap();
        let t = tokens(113, 22);
        let causal = run(&m, &t, "causal", 40, 16);
        let opts = SparseOptions {
            layers: None,
            recall: true,
        };
        let spec = "topmass(gamma=1,block=16,dense_below=0)";
        let (sparse, st) = run_sparse(&m, &t, spec, opts, 40);
        let e = max_diff(&causal, &sparse);
        assert!(e < 2e-4, "{arch}: sparse with every block vs causal: {e}");
        assert_eq!(st.layers.len(), 3);
        assert_eq!(st.density(), 1.0);
        let (mean, worst) = st.recall().unwrap();
        assert!(
            (mean - 1.0).abs() < 1e-5 && (worst - 1.0).abs() < 1e-5,
            "{arch}"
        );
        let (bm, bw) = st.best_recall().unwrap();
        assert!(
            (bm - 1.0).abs() < 1e-5 && (bw - 1.0).abs() < 1e-5,
            "{arch}: best {bm} {bw}"
        );
        for l in &st.layers {
            assert_eq!((l.calls, l.fallbacks), (3, 0), "{arch} layer {}", l.layer);
        }
    }
}

#[test]
fn sparse_prefill_statistics_match_the_selection_and_the_oracle_recall() {
    use crate::attention::{AttnParams, MaskSpec};
    use crate::mask::{MaskExpr, MaskShape};
    use crate::tensor::TensorView;
    let m = Model::load(&synthetic("llama", 23), LoadOptions::default()).unwrap();
    let (n, c) = (113, &m.cfg);
    let t = tokens(n, 24);
    let spec_text = "moba(block=16,topk=2,dense_below=0)";
    let attn = from_spec_with(
        spec_text,
        Some(SparseOptions {
            layers: Some(vec![1]),
            recall: true,
        }),
    )
    .unwrap();
    let mut cache = m.new_cache(16).unwrap();
    let s = cache.add_sequence();
    // Layer 1's q and k as the sparse run computed them (one call: the whole prompt).
    let mut qk: Option<(Vec<f32>, Vec<f32>)> = None;
    let mut cap = |x: Captured| {
        if x.layer == 1 {
            qk = Some((x.q.to_vec(), x.k.to_vec()));
        }
    };
    let h = m
        .forward(&mut cache, s, &t, attn.as_ref(), Some(&mut cap))
        .unwrap();
    let st = attn.sparse_stats().unwrap();
    assert_eq!(st.layers.len(), 1, "only the chosen layer is sparse");
    let l = &st.layers[0];
    assert_eq!((l.layer, l.calls, l.fallbacks), (1, 1, 0));
    // The same selection made directly, and its recall from the f64 oracle.
    let (q, k) = qk.unwrap();
    let qv = TensorView::contiguous(&q[..], [1, n, c.heads, c.head_dim]).unwrap();
    let kv = TensorView::contiguous(&k[..], [1, n, c.kv_heads, c.head_dim]).unwrap();
    let bound = MaskExpr::parse("causal")
        .unwrap()
        .bind(
            MaskShape {
                batch: 1,
                sq: n,
                sk: n,
            },
            None,
        )
        .unwrap();
    let p = AttnParams {
        scale: Some(c.attn_scale),
        ..Default::default()
    };
    let spec = crate::SparseSpec::parse(spec_text).unwrap();
    let sel = crate::sparse::select(&qv, &kv, &p, &spec, MaskSpec::Expr(&bound)).unwrap();
    assert_eq!(l.selected, sel.report.selected);
    assert_eq!(l.allowed, sel.report.allowed);
    assert!(l.density() > 0.1 && l.density() < 0.9, "{}", l.density());
    let oracle = crate::sparse::mass_recall(&qv, &kv, &p, &sel).unwrap();
    let got = l.head_recall().unwrap();
    for (h, (g, o)) in got.iter().zip(&oracle.per_head).enumerate() {
        assert!((g - o).abs() < 1e-4, "head {h}: recall {g} vs oracle {o}");
        assert!(*o < 0.999, "head {h}: recall {o} with tiles dropped");
    }
    // The best selection of equal size, against the same computation made directly.
    let best = crate::sparse::best_recall(&qv, &kv, &p, &sel).unwrap();
    let mine = l.head_best_recall().unwrap();
    for (h, (g, b)) in mine.iter().zip(&best.per_head).enumerate() {
        assert!((g - b).abs() < 1e-9, "head {h}: best recall {g} vs {b}");
        assert!(
            *b >= got[h] - 1e-4,
            "head {h}: best {b} below the selection's {}",
            got[h]
        );
    }
    // The selection changed the model's output (layers 0 and 2 dense).
    let dense = run(&m, &t, "causal", n, 16);
    assert!(max_diff(&dense, &m.logits(&h)) > 1e-3);
}

#[test]
fn sparse_decode_steps_are_dense_and_short_prefills_fall_back() {
    let m = Model::load(&synthetic("llama", 25), LoadOptions::default()).unwrap();
    let t = tokens(97, 26);
    // Chunks of 40: 40, 80 and 97 keys; dense_below = 50 makes the first a fallback.
    let spec = "relthresh(alpha=0.5,block=16,dense_below=50)";
    let attn = from_spec_with(spec, Some(SparseOptions::default())).unwrap();
    let mut cache = m.new_cache(16).unwrap();
    let s = cache.add_sequence();
    let out = m
        .generate(&mut cache, s, &t, 5, None, attn.as_ref(), 40, |_| {})
        .unwrap();
    assert_eq!(out.len(), 5);
    let st = attn.sparse_stats().unwrap();
    for l in &st.layers {
        // Three prefill calls (decode steps are not sparse), the first one dense.
        assert_eq!((l.calls, l.fallbacks), (3, 1), "layer {}", l.layer);
    }
    assert!(st.density() < 1.0 && st.density() > 0.0);
}

#[test]
fn sparse_options_and_specs_are_checked() {
    let e = from_spec_with("causal", Some(SparseOptions::default()))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("need a sparse spec"), "{e}");
    let e = from_spec("topmass(gamma=2)").err().unwrap().to_string();
    assert!(e.contains("`gamma` must be in (0, 1]"), "{e}");
    let spec = crate::SparseSpec::parse("moba").unwrap();
    let a = SparseAttention::new(
        spec,
        SparseOptions {
            layers: Some(vec![0, 3]),
            recall: false,
        },
    )
    .unwrap();
    let e = a.check_layers(3).unwrap_err().to_string();
    assert!(e.contains("layer 3") && e.contains("0..3"), "{e}");
    assert!(a.check_layers(4).is_ok());
    // A dense method has no sparse statistics.
    assert!(from_spec("causal").unwrap().sparse_stats().is_none());
}

/// Logits of every position under a press: `first` tokens as one chunk, then one at a time, the
/// cache compressed after each forward with room for the next chunk.
fn run_press(
    m: &Model,
    toks: &[u32],
    press: &str,
    first: usize,
    page: usize,
) -> (Vec<f32>, crate::kv::KvMemory) {
    run_press_roles(m, toks, press, first, page, None)
}

/// As [`run_press`] with a head role table for `duo`.
fn run_press_roles(
    m: &Model,
    toks: &[u32],
    press: &str,
    first: usize,
    page: usize,
    roles: Option<crate::kv::roles::HeadRoles>,
) -> (Vec<f32>, crate::kv::KvMemory) {
    use crate::kv::press::runner::PressAttention;
    use crate::kv::score::Reduce;
    use crate::kv::spec::KvSpec;
    let mut attn =
        PressAttention::with_spec("causal", KvSpec::parse(press).unwrap(), Reduce::Mean).unwrap();
    if let Some(r) = roles {
        attn.set_roles(r).unwrap();
    }
    let mut cache = m.new_cache(page).unwrap();
    let s = cache.add_sequence();
    let mut out = Vec::new();
    let mut at = 0;
    while at < toks.len() {
        let n = if at == 0 { first.max(1) } else { 1 };
        let part = &toks[at..(at + n).min(toks.len())];
        let h = m.forward(&mut cache, s, part, &attn, None).unwrap();
        out.extend(m.logits(&h));
        at += part.len();
        attn.compress(&mut cache, s, 1).unwrap();
    }
    (out, cache.memory())
}

/// Budget 1 is the full cache bit for bit, logits and memory. The full cache frees what the
/// sliding-window layers can no longer see after every forward (`Model::drop_dead`), as every
/// press does before it ranks: on gemma3, whose window layers attend over 24 keys, both hold
/// fewer entries than every position, and the same ones.
#[test]
fn kv_press_budget_one_is_the_full_cache_bit_for_bit() {
    for arch in ["llama", "gemma3"] {
        let m = Model::load(&synthetic(arch, 7), LoadOptions::default()).unwrap();
        let t = tokens(60, 8);
        // The plain run with the same chunks: 25, then one at a time.
        let attn = from_spec("causal").unwrap();
        let mut cache = m.new_cache(16).unwrap();
        let s = cache.add_sequence();
        let mut want = Vec::new();
        let mut at = 0;
        while at < t.len() {
            let n = if at == 0 { 25 } else { 1 };
            let h = m
                .forward(&mut cache, s, &t[at..at + n], attn.as_ref(), None)
                .unwrap();
            want.extend(m.logits(&h));
            at += n;
            let freed = m.drop_dead(&mut cache, s).unwrap();
            assert!(arch == "gemma3" || freed == 0, "{arch}: freed {freed}");
        }
        let full_mem = cache.memory();
        if arch == "gemma3" {
            assert!(full_mem.bytes_entries < full_mem.bytes_full, "{full_mem:?}");
        } else {
            assert_eq!(full_mem.bytes_entries, full_mem.bytes_full);
        }
        // Without the drop: the same logits to rounding (the kernels walk other page runs).
        let mut kept = run(&m, &t[..25], "causal", 25, 16);
        let mut c2 = m.new_cache(16).unwrap();
        let s2 = c2.add_sequence();
        m.forward(&mut c2, s2, &t[..25], attn.as_ref(), None)
            .unwrap();
        for &tok in &t[25..] {
            let h = m.forward(&mut c2, s2, &[tok], attn.as_ref(), None).unwrap();
            kept.extend(m.logits(&h));
        }
        let e = max_diff(&kept, &want);
        assert!(
            e < 1e-4,
            "{arch}: dropping dead entries moved the logits by {e}"
        );
        for press in [
            "h2o(budget=1)",
            "snapkv(budget=1,window=4)",
            "tova(budget=1)",
            "knorm(budget=1)",
            "a2sf(budget=1,f=0.9)",
            "snapkv(budget=1,window=4)+merge",
            "kivi(bits=16)",
            "h2o(budget=1)+kivi(bits=16)",
            "quest(budget=1,page=4)",
        ] {
            let (got, mem) = run_press(&m, &t, press, 25, 16);
            assert!(
                got == want,
                "{arch} {press}: logits differ from the full cache by {}",
                max_diff(&got, &want)
            );
            if !press.contains("kivi") {
                assert_eq!(mem.bytes_entries, full_mem.bytes_entries, "{arch} {press}");
            }
        }
        // A real budget changes the logits and holds less.
        let (got, mem) = run_press(&m, &t, "h2o(budget=0.3)", 25, 16);
        assert!(
            max_diff(&got, &want) > 1e-3,
            "{arch}: h2o(budget=0.3) changed nothing"
        );
        assert!(mem.bytes_entries * 2 < mem.bytes_full, "{arch}: {mem:?}");
        // Merging what h2o evicts changes its logits, not its memory.
        let (merged, mem_m) = run_press(&m, &t, "h2o(budget=0.3)+merge", 25, 16);
        assert!(
            max_diff(&merged, &got) > 1e-5,
            "{arch}: merge changed nothing"
        );
        if arch == "gemma3" {
            // A slot carries the position of an evicted entry: once that position leaves a
            // window it is dropped with the dead entries, so the entry counts may differ by a
            // slot per head; the pages do not.
            assert_eq!(mem_m.pages_in_use, mem.pages_in_use, "{arch}");
        } else {
            assert_eq!(mem_m, mem, "{arch}");
        }
    }
}

#[test]
fn kv_quantized_pages_in_the_model_stay_close_and_hold_less() {
    for arch in ["llama", "gemma3"] {
        let m = Model::load(&synthetic(arch, 11), LoadOptions::default()).unwrap();
        let t = tokens(60, 12);
        let (want, full) = run_press(&m, &t, "kivi(bits=16)", 25, 16);
        let mut errs = Vec::new();
        for spec in [
            "kivi(bits=4,group=8,residual=4)",
            "kivi(bits=2,group=8,residual=4)",
        ] {
            let (got, mem) = run_press(&m, &t, spec, 25, 16);
            let e = max_diff(&got, &want);
            assert!(e > 0.0, "{arch} {spec}: nothing quantized");
            assert!(mem.bytes_quantized > 0 && mem.bytes_in_use < full.bytes_in_use);
            errs.push(e);
        }
        assert!(
            errs[0] < errs[1],
            "{arch}: int4 / int2 logit errors {errs:?}"
        );
        // ZipVL with mass 1 puts every group at its high width: KIVI at that width bit for bit.
        // Otherwise the groups split between the widths (how depends on where the recent
        // attention sits): memory between int2's and int4's.
        let (int4, m4) = run_press(&m, &t, "kivi(bits=4,group=8,residual=4)", 25, 16);
        let (_, m2) = run_press(&m, &t, "kivi(bits=2,group=8,residual=4)", 25, 16);
        let (all_hi, mh) = run_press(&m, &t, "zipvl(lo=2,hi=4,mass=1,group=8,residual=4)", 25, 16);
        assert!(
            all_hi == int4,
            "{arch}: zipvl(mass=1) differs from kivi(bits=4)"
        );
        assert_eq!(mh, m4, "{arch}");
        let (mixed, mm) = run_press(
            &m,
            &t,
            "zipvl(lo=2,hi=4,mass=0.5,group=8,residual=4)",
            25,
            16,
        );
        assert!(
            m2.bytes_quantized <= mm.bytes_quantized && mm.bytes_quantized <= m4.bytes_quantized,
            "{arch}: zipvl bytes {} not between int2 {} and int4 {}",
            mm.bytes_quantized,
            m2.bytes_quantized,
            m4.bytes_quantized
        );
        assert!(max_diff(&mixed, &want) > 0.0);
        // Quest drops nothing but attends fewer keys.
        let (got, mem) = run_press(&m, &t, "quest(budget=0.2,page=4)", 25, 16);
        assert!(
            max_diff(&got, &want) > 1e-4,
            "{arch}: quest changed nothing"
        );
        assert_eq!(mem.bytes_entries, full.bytes_entries);
        // Eviction then quantization: fewer entries, quantized.
        let (_, mem) = run_press(
            &m,
            &t,
            "h2o(budget=0.5)+kivi(bits=4,group=8,residual=4)",
            25,
            16,
        );
        // (On gemma3 both runs hold only the 23 entries its window layers still see, and the
        // press's half of 60 is more than that.)
        let cut = if arch == "gemma3" { 1 } else { 2 };
        assert!(mem.bytes_quantized > 0 && mem.bytes_entries * cut < full.bytes_entries);
    }
}

#[test]
fn kv_streaming_eviction_equals_the_sinks_and_window_mask() {
    for arch in ["llama", "gemma3"] {
        let m = Model::load(&synthetic(arch, 9), LoadOptions::default()).unwrap();
        let t = tokens(70, 10);
        for (sinks, window) in [(2, 9), (0, 16), (4, 1)] {
            let (got, mem) = run_press(
                &m,
                &t,
                &format!("streaming(sinks={sinks},window={window})"),
                1,
                16,
            );
            let mask = format!("causal & (sinks({sinks}) | window({},0))", window - 1);
            let want = run(&m, &t, &mask, 1, 16);
            let e = max_diff(&got, &want);
            assert!(
                e < 2e-4,
                "{arch} S {sinks} W {window}: logits differ by {e}"
            );
            assert!(mem.bytes_entries < mem.bytes_full);
        }
    }
}

#[test]
fn head_role_probe_on_the_model_and_duo_under_it() {
    use crate::kv::roles::{probe, RoleSelect};
    for arch in ["llama", "gemma3"] {
        let m = Model::load(&synthetic(arch, 21), LoadOptions::default()).unwrap();
        let r = probe(&m, &[3], 37, 5, RoleSelect::Ratio(0.5)).unwrap();
        assert_eq!((r.layers, r.kv_heads), (3, 2));
        r.check(3, 2).unwrap();
        assert!(r.scores.iter().flatten().all(|&x| (0.0..=1.0).contains(&x)));
        assert!(r.scores.iter().flatten().any(|&x| x > 0.0));
        assert_eq!(r.retrieval.iter().flatten().filter(|&&x| x).count(), 3);
        // Seeded: the same table again; another seed gives other scores.
        assert_eq!(probe(&m, &[3], 37, 5, RoleSelect::Ratio(0.5)).unwrap(), r);
        assert_ne!(
            probe(&m, &[3], 37, 6, RoleSelect::Ratio(0.5))
                .unwrap()
                .scores,
            r.scores
        );
        let t = tokens(60, 22);
        let (want, full) = run_press(&m, &t, "h2o(budget=1)", 25, 16);
        // Every head a retrieval head: the full cache bit for bit.
        let all = r.reselect(RoleSelect::Ratio(1.0)).unwrap();
        let (got, mem) = run_press_roles(&m, &t, "duo(sinks=2,window=4)", 25, 16, Some(all));
        assert!(got == want, "{arch}: duo with every head retrieval");
        assert_eq!(mem, full);
        // Half the heads streaming: less memory than the full cache, more than all streaming.
        let (half, mem_half) = run_press_roles(&m, &t, "duo(sinks=2,window=4)", 25, 16, Some(r));
        let none = probe(&m, &[3], 37, 5, RoleSelect::Ratio(0.0)).unwrap();
        let (_, mem_none) = run_press_roles(&m, &t, "duo(sinks=2,window=4)", 25, 16, Some(none));
        assert!(max_diff(&half, &want) > 1e-4, "{arch}: duo changed nothing");
        // Entries held at the end (60 positions): a retrieval head all it can still see (60;
        // 23 in gemma3's layers of 24-key windows), a streaming head its 2 sinks and 4 - 1
        // newest (gemma3: its sinks are out of the window and dropped, 3).
        let (retr, strm) = if arch == "gemma3" { (23, 3) } else { (60, 5) };
        assert_eq!(
            mem_half.bytes_entries,
            (3 * retr + 3 * strm) * 2 * 8 * 4,
            "{arch}"
        );
        assert_eq!(mem_none.bytes_entries, 6 * strm * 2 * 8 * 4, "{arch}");
        assert!(mem_none.bytes_in_use < mem_half.bytes_in_use);
        assert!(mem_half.bytes_in_use < full.bytes_in_use);
    }
}
