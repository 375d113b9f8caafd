//! End-to-end tests of `longattn eval`, `generate`, `capture` and `bench --data` on SmolLM2 (each
//! skips with a message when the fixtures are absent). Short runs: tens of tokens.
use longattn::model::fixtures;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_longattn"))
}

mod common;

fn tmp(name: &str) -> PathBuf {
    common::tmp("model", name)
}

fn ok(o: Output) -> String {
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "failed: {e}");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn fails_with(o: Output, want: &str) {
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "expected failure, got success");
    assert!(!e.contains("panicked"), "panic: {e}");
    assert!(e.contains(want), "expected `{want}` in: {e}");
}

/// `longattn eval` over the first 80 tokens of `book` with `extra` arguments: its JSON.
fn eval_80(model: &Path, book: &Path, name: &str, extra: &[&str]) -> serde_json::Value {
    let json = tmp(name);
    ok(bin()
        .args(["eval", "--model"])
        .arg(model)
        .arg("--text")
        .arg(book)
        .args(["--tokens", "80"])
        .args(extra)
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap());
    serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap()
}

fn fixtures_or_skip() -> Option<(PathBuf, PathBuf)> {
    match (
        fixtures::smollm2_path(),
        fixtures::book_path("carroll-alice.txt"),
    ) {
        (Ok(m), Ok(b)) => Some((m, b)),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("SKIPPED (fixture absent): {e}");
            None
        }
    }
}

#[test]
fn eval_writes_the_json_contract() {
    let Some((model, book)) = fixtures_or_skip() else {
        return;
    };
    let json = tmp("eval.json");
    let out = ok(bin()
        .args(["eval", "--model"])
        .arg(&model)
        .arg("--text")
        .arg(&book)
        .args(["--tokens", "96", "--bucket", "40", "--attention"])
        .arg("causal & (sinks(4) | window(32,0))")
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap());
    assert!(out.contains("96 tokens"), "{out}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(v["tokens"], 96);
    assert_eq!(v["attention"], "causal & (sinks(4) | window(32,0))");
    let nll = v["nll_mean"].as_f64().unwrap();
    assert!(nll > 0.5 && nll < 8.0, "nll {nll}");
    assert!((v["ppl"].as_f64().unwrap() - nll.exp()).abs() < 1e-6 * nll.exp());
    let b = v["nll_by_bucket"].as_array().unwrap();
    // 95 predicted positions in buckets of 40: [0,40) [40,80) [80,95).
    assert_eq!(b.len(), 3);
    assert_eq!(
        (b[2]["start"].as_u64(), b[2]["end"].as_u64()),
        (Some(80), Some(95))
    );
    let mean = (b[0]["nll"].as_f64().unwrap() * 40.0
        + b[1]["nll"].as_f64().unwrap() * 40.0
        + b[2]["nll"].as_f64().unwrap() * 15.0)
        / 95.0;
    assert!((mean - nll).abs() < 1e-9);
    assert!(v["seconds"].as_f64().unwrap() > 0.0);

    // The same positions from an ids file give the same loss.
    let ids = ok(bin()
        .args(["tokenize", "--model"])
        .arg(&model)
        .arg("--text")
        .arg(&book)
        .args(["--limit", "96"])
        .output()
        .unwrap());
    let idf = tmp("ids.txt");
    std::fs::write(&idf, ids).unwrap();
    let json2 = tmp("eval2.json");
    ok(bin()
        .args(["eval", "--model"])
        .arg(&model)
        .arg("--ids")
        .arg(&idf)
        .args(["--tokens", "96", "--attention"])
        .arg("causal & (sinks(4) | window(32,0))")
        .arg("--json")
        .arg(&json2)
        .output()
        .unwrap());
    let v2: serde_json::Value = serde_json::from_slice(&std::fs::read(&json2).unwrap()).unwrap();
    assert!((v2["nll_mean"].as_f64().unwrap() - nll).abs() < 1e-9);
}

#[test]
fn capture_then_bench_and_run_on_real_qkv() {
    let Some((model, book)) = fixtures_or_skip() else {
        return;
    };
    let st = tmp("qkv.safetensors");
    ok(bin()
        .args(["capture", "--model"])
        .arg(&model)
        .arg("--text")
        .arg(&book)
        .args(["--tokens", "130", "--layers", "0,29", "--force", "--output"])
        .arg(&st)
        .output()
        .unwrap());
    let inp = longattn::io::read_captured(&st, None).unwrap();
    assert_eq!(inp.iter().map(|x| x.0).collect::<Vec<_>>(), vec![0, 29]);
    assert_eq!(inp[0].1.q.shape, vec![1, 130, 9, 64]);
    assert_eq!(inp[0].1.k.shape, vec![1, 130, 3, 64]);
    let rep = tmp("bench");
    let out = ok(bin()
        .args(["bench", "--data"])
        .arg(&st)
        .args(["--min-time", "0", "--reps", "1", "--out"])
        .arg(&rep)
        .output()
        .unwrap());
    assert!(out.contains("causal L29"), "{out}");
    assert!(!out.contains("FAILED"), "{out}");
    let o = tmp("out.safetensors");
    ok(bin()
        .args(["run", "--layer", "29", "--mask", "causal", "--input"])
        .arg(&st)
        .arg("--output")
        .arg(&o)
        .output()
        .unwrap());
    fails_with(
        bin()
            .args(["run", "--layer", "5", "--mask", "causal", "--input"])
            .arg(&st)
            .arg("--output")
            .arg(tmp("o2.safetensors"))
            .output()
            .unwrap(),
        "layer 5 is not in the file",
    );
}

#[test]
fn generate_and_bad_input() {
    let Some((model, book)) = fixtures_or_skip() else {
        return;
    };
    let out = ok(bin()
        .args(["generate", "--model"])
        .arg(&model)
        .args(["--prompt", "The capital of France is", "--max-new", "6"])
        .output()
        .unwrap());
    assert!(out.starts_with("The capital of France is"), "{out}");
    assert!(out.len() > "The capital of France is".len());
    let short = tmp("short.txt");
    std::fs::write(&short, "Only a few words.").unwrap();
    fails_with(
        bin()
            .args(["eval", "--model"])
            .arg(&model)
            .arg("--text")
            .arg(&short)
            .args(["--tokens", "100"])
            .output()
            .unwrap(),
        "holds only",
    );
    let ids = tmp("bad_ids.txt");
    std::fs::write(&ids, "1 2 3 60000").unwrap();
    fails_with(
        bin()
            .args(["eval", "--model"])
            .arg(&model)
            .arg("--ids")
            .arg(&ids)
            .output()
            .unwrap(),
        "token id 60000 at index 3 is out of range",
    );
    fails_with(
        bin()
            .args(["eval", "--model"])
            .arg(&model)
            .arg("--text")
            .arg(&book)
            .args(["--tokens", "9000"])
            .output()
            .unwrap(),
        "context of 8192",
    );
    fails_with(
        bin()
            .args(["eval", "--model", "/nonexistent/m.gguf", "--text"])
            .arg(&book)
            .output()
            .unwrap(),
        "longattn fetch",
    );
}

/// `eval --kv`: budget 1.0 is the full cache bit for bit, streaming under decode-time eviction
/// gives the NLL of the sinks-and-window mask with a fraction of the memory, bad specs are refused.
#[test]
fn eval_kv_sanity_and_bad_input() {
    let Some((model, book)) = fixtures_or_skip() else {
        return;
    };
    let eval = |name: &str, extra: &[&str]| eval_80(&model, &book, name, extra);
    let full = eval("full.json", &[]);
    let one = eval("one.json", &["--kv", "h2o(budget=1)", "--kv-chunk", "80"]);
    assert_eq!(
        one["nll_mean"], full["nll_mean"],
        "budget 1.0 is the full cache"
    );
    assert_eq!(one["kv_bytes"], one["kv_bytes_full"]);
    let stream = eval("stream.json", &["--kv", "streaming(sinks=4,window=24)"]);
    let mask = eval(
        "mask.json",
        &["--attention", "causal & (sinks(4) | window(23,0))"],
    );
    let (a, b) = (
        stream["nll_mean"].as_f64().unwrap(),
        mask["nll_mean"].as_f64().unwrap(),
    );
    assert!((a - b).abs() < 1e-5, "streaming {a} vs mask {b}");
    assert_eq!(stream["kv"], "streaming(sinks=4,window=24)");
    let (kb, kf) = (
        stream["kv_bytes"].as_u64().unwrap(),
        stream["kv_bytes_full"].as_u64().unwrap(),
    );
    assert!(kb > 0 && kb < kf, "kv_bytes {kb} of {kf}");
    assert_eq!(kf, full["kv_bytes_full"].as_u64().unwrap());
    // Quest with budget 1 and no-op quantization are the full cache bit for bit.
    for spec in [
        "quest(budget=1,page=16)",
        "kivi(bits=16)",
        "h2o(budget=1)+quest(budget=1,page=16)",
    ] {
        let r = eval("noop.json", &["--kv", spec, "--kv-chunk", "80"]);
        assert_eq!(r["nll_mean"], full["nll_mean"], "{spec}");
    }
    // int4 pages hold less than the full cache and stay close to its NLL.
    let q4 = eval("q4.json", &["--kv", "kivi(bits=4)", "--kv-chunk", "16"]);
    let (kb, kf) = (
        q4["kv_bytes"].as_u64().unwrap(),
        q4["kv_bytes_full"].as_u64().unwrap(),
    );
    assert!(kb < kf, "kivi(bits=4): kv_bytes {kb} of {kf}");
    let (a, b) = (
        q4["nll_mean"].as_f64().unwrap(),
        full["nll_mean"].as_f64().unwrap(),
    );
    assert!(
        a != b && (a - b).abs() < 0.1,
        "kivi(bits=4) {a} vs full {b}"
    );
    assert_eq!(q4["kv"], "kivi(bits=4,group=32,residual=32)");
    // 80 entries per head: one group of 32 quantized in each of the model's (layer, KV head).
    let by = q4["kv_quantized_by_bits"].as_array().unwrap();
    assert_eq!(by.len(), 1, "{by:?}");
    assert_eq!(by[0][0], 4);
    let groups = by[0][1].as_u64().unwrap();
    assert!(groups > 0 && groups % 32 == 0, "{by:?}");
    assert!(full["kv_quantized_by_bits"].is_null());
    // ZipVL quantizes the same entries, each group at 2 or 4 bits.
    let zip = eval(
        "zip.json",
        &["--kv", "zipvl(lo=2,hi=4,mass=0.5)", "--kv-chunk", "16"],
    );
    let zby = zip["kv_quantized_by_bits"].as_array().unwrap();
    let total: u64 = zby.iter().map(|x| x[1].as_u64().unwrap()).sum();
    assert_eq!(total, groups, "{zby:?}");
    assert!(zby.iter().all(|x| x[0] == 2 || x[0] == 4), "{zby:?}");
    let run = |args: &[&str]| {
        bin()
            .args(["eval", "--model"])
            .arg(&model)
            .arg("--text")
            .arg(&book)
            .args(["--tokens", "20"])
            .args(args)
            .output()
            .unwrap()
    };
    fails_with(run(&["--kv", "h2o(budget=2)"]), "outside (0, 1]");
    fails_with(run(&["--kv", "zip(budget=0.2)"]), "unknown press `zip`");
    fails_with(run(&["--kv", "kivi(bits=3)"]), "bits must be 2 or 4");
    fails_with(
        run(&["--kv", "quest(budget=0.2)+h2o(budget=0.2)+merge"]),
        "no `merge`",
    );
    fails_with(
        run(&["--kv", "h2o(budget=0.2)", "--kv-reduce", "median"]),
        "mean, max or sum",
    );
    fails_with(
        run(&["--kv", "h2o(budget=0.2)", "--attention", "exact"]),
        "not exact",
    );
}

/// `eval --task passkey --kv`: budget 1.0 answers as the full cache does (same accuracy grid)
/// under both protocols, with the key's log-probability and the memory reported; a real budget
/// keeps that share of the cache; an unknown protocol is refused.
#[test]
fn eval_passkey_kv_protocols() {
    let Some((model, book)) = fixtures_or_skip() else {
        return;
    };
    let run = |name: &str, extra: &[&str]| -> serde_json::Value {
        let json = tmp(name);
        ok(bin()
            .args(["eval", "--task", "passkey", "--model"])
            .arg(&model)
            .arg("--text")
            .arg(&book)
            .args(["--lengths", "300", "--depths", "0,1", "--trials", "1"])
            .args(extra)
            .arg("--json")
            .arg(&json)
            .output()
            .unwrap());
        serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap()
    };
    let png = tmp("pk-dense.png");
    let _ = std::fs::remove_file(&png);
    let dense = run("pk-dense.json", &[]);
    // The heat map goes beside --json when --png is not given (not into the working directory).
    assert!(png.exists(), "no heat map at {}", png.display());
    for proto in ["inside", "after"] {
        let full = run(
            &format!("pk-full-{proto}.json"),
            &["--kv", "snapkv(budget=1,window=16)", "--kv-protocol", proto],
        );
        assert_eq!(full["accuracy"], dense["accuracy"], "{proto}");
        assert_eq!(full["kv_bytes"], full["kv_bytes_full"], "{proto}");
        let lp = full["key_logprob"][0].as_array().unwrap();
        assert!(lp.iter().all(|x| x.as_f64().unwrap() < 0.0), "{lp:?}");
        let half = run(
            &format!("pk-half-{proto}.json"),
            &[
                "--kv",
                "snapkv(budget=0.5,window=16)",
                "--kv-protocol",
                proto,
            ],
        );
        let (b, f) = (
            half["kv_bytes"].as_f64().unwrap(),
            half["kv_bytes_full"].as_f64().unwrap(),
        );
        // Pages of 16 entries per head: the kept half rounds up to whole pages.
        assert!(b < 0.7 * f && b > 0.4 * f, "{proto}: {b} of {f}");
        assert_eq!(half["kv_protocol"], proto);
    }
    let o = bin()
        .args(["eval", "--task", "passkey", "--model"])
        .arg(&model)
        .args(["--kv", "h2o(budget=0.5)", "--kv-protocol", "before"])
        .output()
        .unwrap();
    fails_with(o, "--kv-protocol before: expected `inside` or `after`");
}

/// `generate --kv`: budget 1 writes the full cache's text token for token; a streaming window
/// on a 600-token book prompt keeps about its share of the cache; bad specs are refused.
#[test]
fn generate_kv_matches_the_full_cache_and_frees_memory() {
    let Some((model, book)) = fixtures_or_skip() else {
        return;
    };
    let gen = |extra: &[&str]| -> Output {
        bin()
            .args(["generate", "--model"])
            .arg(&model)
            .arg("--prompt-file")
            .arg(&book)
            .args(["--prompt-tokens", "300", "--max-new", "12"])
            .args(extra)
            .output()
            .unwrap()
    };
    let full = ok(gen(&[]));
    let same = ok(gen(&["--kv", "h2o(budget=1)"]));
    assert_eq!(full, same);
    let o = gen(&["--kv", "streaming(sinks=4,window=60)"]);
    let e = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{e}");
    let share: f64 = e
        .split("MiB in use, ")
        .nth(1)
        .and_then(|x| x.split('%').next())
        .and_then(|x| x.trim().parse().ok())
        .unwrap_or_else(|| panic!("no memory line in: {e}"));
    assert!(share < 35.0, "{share}% of the full cache kept: {e}");
    fails_with(gen(&["--kv", "h2o(budget=0)"]), "outside (0, 1]");
    fails_with(
        gen(&["--kv", "h2o(budget=0.5)", "--attention", "exact"]),
        "not exact",
    );
}

/// `kv roles` writes the role table; `eval --kv duo(...)`: every head retrieval is the full cache
/// bit for bit, every head streaming is `streaming(...)` bit for bit (roles probed on the fly),
/// the saved table frees memory; `generate --kv duo(...)` with every head retrieval is the full
/// cache's text; bad input is refused.
#[test]
fn kv_roles_and_duo() {
    let Some((model, book)) = fixtures_or_skip() else {
        return;
    };
    let roles = tmp("roles.json");
    let out = ok(bin()
        .args(["kv", "roles", "--model"])
        .arg(&model)
        .arg("--output")
        .arg(&roles)
        .args(["--ratio", "0.25", "--copy-len", "48"])
        .output()
        .unwrap());
    assert!(out.contains("retrieval heads"), "{out}");
    let t: serde_json::Value = serde_json::from_slice(&std::fs::read(&roles).unwrap()).unwrap();
    let (layers, hk) = (
        t["layers"].as_u64().unwrap() as usize,
        t["kv_heads"].as_u64().unwrap() as usize,
    );
    let flags: Vec<bool> = t["retrieval"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_bool().unwrap()))
        .collect();
    assert_eq!(flags.len(), layers * hk);
    assert_eq!(
        flags.iter().filter(|&&x| x).count(),
        (0.25 * (layers * hk) as f64).ceil() as usize
    );
    assert_eq!(t["select"], "ratio=0.25");
    let eval = |name: &str, extra: &[&str]| eval_80(&model, &book, name, extra);
    let r = roles.display().to_string();
    let full = eval("duo-full.json", &["--kv", "h2o(budget=1)"]);
    let all = eval(
        "duo-all.json",
        &["--kv", &format!("duo(sinks=4,window=24,roles={r},ratio=1)")],
    );
    assert_eq!(all["nll_mean"], full["nll_mean"], "every head retrieval");
    assert_eq!(all["kv_bytes"], all["kv_bytes_full"]);
    let none = eval("duo-none.json", &["--kv", "duo(sinks=4,window=24,ratio=0)"]);
    let stream = eval("duo-stream.json", &["--kv", "streaming(sinks=4,window=24)"]);
    assert_eq!(none["nll_mean"], stream["nll_mean"], "every head streaming");
    assert_eq!(none["kv_bytes"], stream["kv_bytes"]);
    let saved = eval(
        "duo-saved.json",
        &["--kv", &format!("duo(sinks=4,window=24,roles={r})")],
    );
    let (kb, kf, ks) = (
        saved["kv_bytes"].as_u64().unwrap(),
        saved["kv_bytes_full"].as_u64().unwrap(),
        stream["kv_bytes"].as_u64().unwrap(),
    );
    assert!(ks < kb && kb < kf, "duo {kb}, streaming {ks}, full {kf}");
    // generate --kv duo (the same press construction): every head retrieval is the full cache's
    // text; the saved table generates.
    let gen = |spec: &str| -> String {
        ok(bin()
            .args(["generate", "--model"])
            .arg(&model)
            .arg("--prompt-file")
            .arg(&book)
            .args(["--prompt-tokens", "120", "--max-new", "8", "--kv", spec])
            .output()
            .unwrap())
    };
    assert_eq!(
        gen(&format!("duo(sinks=4,window=24,roles={r},ratio=1)")),
        gen("h2o(budget=1)"),
        "generate: every head retrieval"
    );
    gen(&format!("duo(sinks=4,window=24,roles={r})"));
    let run = |args: &[&str]| bin().args(args).output().unwrap();
    let m = model.display().to_string();
    let bad = tmp("bad-roles.json");
    std::fs::write(
        &bad,
        r#"{"layers":2,"kv_heads":1,"scores":[[0.1],[0.2]],"retrieval":[[true],[false]],"select":"ratio=0.5","prefix":0,"copy_len":4}"#,
    )
    .unwrap();
    let b = bad.display().to_string();
    fails_with(
        run(&["kv", "roles", "--model", &m, "--output", &r, "--ratio", "2"]),
        "outside [0, 1]",
    );
    let ev = |spec: &str| {
        let book = book.display().to_string();
        run(&[
            "eval", "--model", &m, "--text", &book, "--tokens", "20", "--kv", spec,
        ])
    };
    fails_with(
        ev(&format!("duo(window=8,roles={b})")),
        &format!("the model has {layers} x {hk}"),
    );
    fails_with(ev("duo(window=8,roles=/nonexistent/r.json)"), "cannot read");
    fails_with(ev("duo(window=8,ratio=0.5,threshold=0.2)"), "not both");
}

/// `kv keep`: one prefill-time compression written as JSON (kept positions per (layer, KV head),
/// the ranked values, the ids, memory, the NLL of the tokens after the context); budget 1 scores
/// the tokens as `eval` does; bad input is refused.
#[test]
fn kv_keep_writes_kept_sets_and_scores() {
    let Some((model, book)) = fixtures_or_skip() else {
        return;
    };
    let keep = |name: &str, spec: &str| -> serde_json::Value {
        let json = tmp(name);
        ok(bin()
            .args(["kv", "keep", "--model"])
            .arg(&model)
            .arg("--text")
            .arg(&book)
            .args([
                "--skip", "7", "--tokens", "63", "--score", "9", "--kv", spec,
            ])
            .arg("--json")
            .arg(&json)
            .output()
            .unwrap());
        serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap()
    };
    let r = keep("snap.json", "snapkv(budget=0.5,window=8,pool=avg)");
    assert_eq!(r["kv"], "snapkv(budget=0.5,window=8,kernel=5,pool=avg)");
    let (layers, hk) = (
        r["layers"].as_u64().unwrap(),
        r["kv_heads"].as_u64().unwrap(),
    );
    let heads = r["heads"].as_array().unwrap();
    assert_eq!(heads.len() as u64, layers * hk);
    assert_eq!(r["ids"].as_array().unwrap().len(), 63 + 9);
    for h in heads {
        let kept: Vec<u64> = h["kept"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        assert_eq!(kept.len(), 32, "ceil(0.5 x 63) kept");
        assert!(kept.windows(2).all(|w| w[0] < w[1]) && kept[31] == 62);
        assert!((55..63).all(|p| kept.contains(&p)), "the window is kept");
        let ranks = h["ranks"].as_array().unwrap();
        assert_eq!(ranks.len(), 63);
        // The window is forced (null = +inf); the others are the pooled attention, and the
        // kept older entries rank at least as high as the dropped ones.
        assert!(ranks[55..].iter().all(|x| x.is_null()));
        let v = |j: usize| ranks[j].as_f64().unwrap();
        let kept_min = (0..55)
            .filter(|j| kept.contains(&(*j as u64)))
            .map(v)
            .fold(f64::INFINITY, f64::min);
        let dropped_max = (0..55)
            .filter(|j| !kept.contains(&(*j as u64)))
            .map(v)
            .fold(f64::NEG_INFINITY, f64::max);
        assert!(kept_min >= dropped_max && dropped_max > 0.0);
    }
    // One page of 64 holds the 63 positions before and the 32 after; the entries are exact
    // (f32 K and V of every kept entry).
    let (kb, kf) = (
        r["kv_bytes"].as_u64().unwrap(),
        r["kv_bytes_full"].as_u64().unwrap(),
    );
    assert!(kb > 0 && kb <= kf, "kv_bytes {kb} of {kf}");
    let d = r["head_dim"].as_u64().unwrap();
    assert_eq!(
        r["kv_bytes_entries"].as_u64().unwrap(),
        layers * hk * 32 * d * 2 * 4
    );
    assert_eq!(r["nll"].as_array().unwrap().len(), 9);
    // Budget 1 keeps everything: the scored tokens' NLL is eval's at the same positions.
    let full = keep("full.json", "knorm(budget=1)");
    assert_eq!(full["kv_bytes"], full["kv_bytes_full"]);
    let ids = tmp("keep_ids.txt");
    let text: Vec<String> = full["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.to_string())
        .collect();
    std::fs::write(&ids, text.join(" ")).unwrap();
    let ej = tmp("keep_eval.json");
    ok(bin()
        .args(["eval", "--model"])
        .arg(&model)
        .arg("--ids")
        .arg(&ids)
        .args(["--bucket", "1", "--json"])
        .arg(&ej)
        .output()
        .unwrap());
    let e: serde_json::Value = serde_json::from_slice(&std::fs::read(&ej).unwrap()).unwrap();
    let buckets = e["nll_by_bucket"].as_array().unwrap();
    for (i, x) in full["nll"].as_array().unwrap().iter().enumerate() {
        let (a, b) = (
            x.as_f64().unwrap(),
            buckets[62 + i]["nll"].as_f64().unwrap(),
        );
        assert!(
            (a - b).abs() < 1e-4,
            "scored token {i}: kv keep {a} vs eval {b}"
        );
    }
    let run = |spec: &str, tokens: &str| {
        bin()
            .args(["kv", "keep", "--model"])
            .arg(&model)
            .arg("--text")
            .arg(&book)
            .args(["--tokens", tokens, "--kv", spec, "--json"])
            .arg(tmp("bad.json"))
            .output()
            .unwrap()
    };
    fails_with(run("kivi(bits=4)", "40"), "one eviction press");
    fails_with(
        run("h2o(budget=0.2,score=max)", "40"),
        "not one of sum, mean",
    );
    fails_with(
        run("h2o(budget=0.2)", "100000000"),
        "tokens, 100000000 needed",
    );
}

/// `longattn eval --task TASK --model M --text T ARGS...`.
fn eval_task(
    task: &str,
    model: &std::path::Path,
    book: &std::path::Path,
    args: &[&str],
) -> std::process::Output {
    bin()
        .args(["eval", "--task", task, "--model"])
        .arg(model)
        .arg("--text")
        .arg(book)
        .args(args)
        .output()
        .unwrap()
}

/// [`eval_task`] with `base` then `extra` arguments, which must succeed; its JSON report
/// (written to the temporary file `name`).
fn eval_task_json(
    task: &str,
    (model, book): (&std::path::Path, &std::path::Path),
    name: &str,
    base: &[&str],
    extra: &[&str],
) -> serde_json::Value {
    let json = tmp(name);
    let mut args = base.to_vec();
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--json", json.to_str().unwrap()]);
    ok(eval_task(task, model, book, &args));
    serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap()
}

/// `eval --kv --kl`: a press that keeps everything is the full cache run alongside (KL exactly 0
/// in every bucket, the same NLL bit for bit, itself the dense run's in the same chunks); a real
/// budget moves the distributions; `--kl` without `--kv`, or outside `--task nll`, is refused.
#[test]
fn eval_kl_is_zero_for_a_press_that_keeps_everything() {
    let Some((model, book)) = fixtures_or_skip() else {
        return;
    };
    let eval = |name: &str, extra: &[&str]| eval_80(&model, &book, name, extra);
    let dense = eval("kl-dense.json", &["--chunk", "16", "--bucket", "20"]);
    let one = eval(
        "kl-one.json",
        &[
            "--kv",
            "h2o(budget=1)",
            "--kv-chunk",
            "16",
            "--kl",
            "--bucket",
            "20",
        ],
    );
    assert!(one["kl_mean"].as_f64().unwrap().abs() < 1e-9, "{one}");
    assert_eq!(one["nll_mean"], one["nll_full_mean"]);
    assert_eq!(one["nll_full_mean"], dense["nll_mean"]);
    assert_eq!(one["kv_chunk"], 16);
    let buckets = one["nll_by_bucket"].as_array().unwrap();
    assert_eq!(buckets.len(), 4);
    for (b, d) in buckets
        .iter()
        .zip(dense["nll_by_bucket"].as_array().unwrap())
    {
        assert!(b["kl"].as_f64().unwrap().abs() < 1e-9, "{b}");
        assert_eq!(b["nll_full"], d["nll"]);
    }
    assert!(dense["kl_mean"].is_null() && dense["nll_by_bucket"][0]["kl"].is_null());
    let cut = eval(
        "kl-cut.json",
        &[
            "--kv",
            "streaming(sinks=4,window=12)",
            "--kv-chunk",
            "8",
            "--kl",
        ],
    );
    let kl = cut["kl_mean"].as_f64().unwrap();
    assert!(
        kl > 1e-3,
        "a 16-entry window moves the distributions: KL {kl}"
    );
    let run = |args: &[&str]| {
        bin()
            .args(["eval", "--model"])
            .arg(&model)
            .arg("--text")
            .arg(&book)
            .args(["--tokens", "20"])
            .args(args)
            .output()
            .unwrap()
    };
    fails_with(run(&["--kl"]), "give --kv SPEC");
    fails_with(
        run(&["--kl", "--task", "passkey", "--kv", "h2o(budget=0.5)"]),
        "--kl applies to --task nll",
    );
}

/// `eval --task copy`: the JSON per trial and per length; `h2o(budget=1)` token by token in
/// chunks of 8 is the full cache in the same chunks bit for bit; a window shorter than the copy
/// loses it; bad arguments are refused with the argument named.
#[test]
fn eval_copy_probe() {
    let Some((model, book)) = fixtures_or_skip() else {
        return;
    };
    let run = |args: &[&str]| eval_task("copy", &model, &book, args);
    let copy = |name: &str, extra: &[&str]| {
        let base = ["--lengths", "40", "--trials", "2", "--copy-prefix", "30"];
        eval_task_json("copy", (&model, &book), name, &base, extra)
    };
    let full = copy("copy-full.json", &["--chunk", "8"]);
    let trials = full["per_trial"].as_array().unwrap();
    assert_eq!(trials.len(), 2);
    for t in trials {
        assert_eq!(t["first"], 30, "no BOS for SmolLM2, then 30 filler tokens");
        assert_eq!(t["second"], 70);
        let acc = t["accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc), "{t}");
        assert!(t["kv_bytes"].is_null());
    }
    // Induction: the second copy is far better predicted than the uniform ln(vocab) = 10.8.
    assert!(full["nll"][0].as_f64().unwrap() < 6.0, "{full}");
    let one = copy(
        "copy-one.json",
        &["--kv", "h2o(budget=1)", "--kv-chunk", "8"],
    );
    assert_eq!(one["nll"], full["nll"]);
    assert_eq!(one["accuracy"], full["accuracy"]);
    assert_eq!(one["kv"], "h2o(budget=1)");
    assert_eq!(
        one["per_trial"][0]["kv_bytes"],
        one["per_trial"][0]["kv_bytes_full"]
    );
    let win = copy(
        "copy-win.json",
        &["--kv", "streaming(sinks=4,window=12)", "--kv-chunk", "8"],
    );
    assert!(win["accuracy"][0].as_f64().unwrap() < full["accuracy"][0].as_f64().unwrap());
    fails_with(run(&["--lengths", "1"]), "too short (at least 2 tokens");
    fails_with(
        run(&["--lengths", "40", "--trials", "0"]),
        "must be non-empty",
    );
    let tiny = tmp("tiny.txt");
    std::fs::write(&tiny, "A short filler.").unwrap();
    let o = eval_task(
        "copy",
        &model,
        &tiny,
        &["--lengths", "40", "--copy-prefix", "50"],
    );
    fails_with(o, "--copy-prefix 50: the filler text holds only");
    fails_with(run(&["--lengths", "5k"]), "more than the model's context");
    fails_with(
        run(&[
            "--lengths",
            "40",
            "--kv",
            "h2o(budget=0.5)",
            "--kv-chunk",
            "0",
        ]),
        "--kv-chunk must be >= 1",
    );
}

/// `eval --task multikey`: the reference answer is the asked fact's key; `snapkv(budget=1)` under
/// both protocols answers as the full cache; bad arguments are refused.
#[test]
fn eval_multikey() {
    let Some((model, book)) = fixtures_or_skip() else {
        return;
    };
    let run = |args: &[&str]| eval_task("multikey", &model, &book, args);
    let mk = |name: &str, extra: &[&str]| {
        let base = ["--lengths", "300", "--trials", "2", "--keys", "3"];
        eval_task_json("multikey", (&model, &book), name, &base, extra)
    };
    let full = mk("mk-full.json", &[]);
    assert_eq!(full["keys"], 3);
    let trials = full["per_trial"].as_array().unwrap();
    assert_eq!(trials.len(), 2);
    for t in trials {
        let key = t["key"].as_u64().unwrap();
        assert!((10000..100000).contains(&key), "{t}");
        let digits: String = t["answer"]
            .as_str()
            .unwrap()
            .chars()
            .skip_while(|c| !c.is_ascii_digit())
            .take_while(char::is_ascii_digit)
            .collect();
        let correct = digits == key.to_string();
        assert_eq!(t["correct"].as_bool().unwrap(), correct, "{t}");
        assert!(t["logprob"].as_f64().unwrap() < 0.0);
        assert!(t["asked"].as_u64().unwrap() < 3);
    }
    for proto in ["inside", "after"] {
        let one = mk(
            &format!("mk-one-{proto}.json"),
            &["--kv", "snapkv(budget=1,window=16)", "--kv-protocol", proto],
        );
        assert_eq!(one["accuracy"], full["accuracy"], "{proto}");
        assert_eq!(one["kv_protocol"], proto);
        for (a, b) in one["key_logprob"]
            .as_array()
            .unwrap()
            .iter()
            .zip(full["key_logprob"].as_array().unwrap())
        {
            let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
            assert!((a - b).abs() < 1e-3, "{proto}: {a} vs {b}");
        }
        for (x, y) in one["per_trial"].as_array().unwrap().iter().zip(trials) {
            assert_eq!(x["key"], y["key"], "same seed, same facts");
            assert_eq!(x["answer"], y["answer"], "{proto}");
        }
    }
    fails_with(run(&["--keys", "0"]), "--keys 0: expected 1..=16");
    fails_with(run(&["--keys", "17"]), "--keys 17");
    fails_with(
        run(&["--lengths", "60", "--keys", "4"]),
        "too short for 4 facts",
    );
    fails_with(
        run(&["--kv", "h2o(budget=0.5)", "--kv-protocol", "before"]),
        "--kv-protocol before: expected `inside` or `after`",
    );
    fails_with(run(&["--kv", "zip(budget=0.2)"]), "unknown press `zip`");
}
