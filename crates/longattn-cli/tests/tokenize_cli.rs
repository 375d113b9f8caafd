//! End-to-end tests of `longattn tokenize` and `longattn fetch` (argument checks only: a real fetch
//! needs the network and runs in `.ci/run` before the tests).
use longattn::model::fixtures;
use longattn::model::gguf::Gguf;
use longattn::model::tokenizer::Tokenizer;
use std::path::PathBuf;
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_longattn"))
}

mod common;

fn tmp(name: &str) -> PathBuf {
    common::tmp("tok", name)
}

fn fails_with(o: Output, want: &str) {
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "expected failure, got success: {e}");
    assert!(!e.contains("panicked"), "panic: {e}");
    assert!(e.contains(want), "expected `{want}` in: {e}");
}

fn ids_of(o: &Output) -> Vec<u32> {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout.clone())
        .unwrap()
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect()
}

#[test]
fn tokenize_prints_the_library_ids() {
    let model = match fixtures::smollm2_path() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("skipping: {e}");
            return;
        }
    };
    // CRLF, an ISO-8859 byte (0xE8, read as U+FFFD) and non-ASCII UTF-8.
    let text = tmp("t.txt");
    std::fs::write(&text, b"Hello world\r\n\xe8 na\xc3\xafve 123 <|im_end|>").unwrap();
    let t = Tokenizer::from_gguf(&Gguf::open(&model).unwrap()).unwrap();
    let want = t.encode("Hello world\r\n\u{FFFD} naïve 123 <|im_end|>");
    let m = model.to_str().unwrap();
    let tx = text.to_str().unwrap();
    let o = bin()
        .args(["tokenize", "--model", m, "--text", tx])
        .output()
        .unwrap();
    assert_eq!(ids_of(&o), want);
    let o = bin()
        .args([
            "tokenize", "--model", m, "--text", tx, "--limit", "4", "--bos",
        ])
        .output()
        .unwrap();
    assert_eq!(ids_of(&o), [&[1], &want[..3]].concat());
}

#[test]
fn tokenize_bad_inputs_fail_cleanly() {
    let text = tmp("u.txt");
    std::fs::write(&text, "hi").unwrap();
    let tx = text.to_str().unwrap();
    fails_with(
        bin()
            .args(["tokenize", "--model", "/nonexistent/m.gguf", "--text", tx])
            .output()
            .unwrap(),
        "longattn fetch",
    );
    // A text file given as the model.
    fails_with(
        bin()
            .args(["tokenize", "--model", tx, "--text", tx])
            .output()
            .unwrap(),
        "not a GGUF file",
    );
    if let Ok(model) = fixtures::smollm2_path() {
        fails_with(
            bin()
                .args(["tokenize", "--model", model.to_str().unwrap()])
                .args(["--text", "/nonexistent/t.txt"])
                .output()
                .unwrap(),
            "cannot read text",
        );
    }
}

#[test]
fn fetch_rejects_unknown_targets() {
    fails_with(
        bin().args(["fetch", "weights"]).output().unwrap(),
        "unknown fetch target `weights`",
    );
}
