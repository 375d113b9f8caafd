//! Tokenizer tests.
//!
//! Ground truth:
//! - `tests/data/tokenizer_reference.json`, written by `scripts/tokenizer_reference.py`: ids from
//!   independent implementations fed the GGUF vocabulary — Hugging Face `tokenizers` configured as
//!   SmolLM2's tokenizer.json (BPE + Digits + ByteLevel) for SmolLM2; Google's `sentencepiece` (BPE
//!   with byte fallback, special/user-defined pieces split out first as llama.cpp does) for Gemma-3,
//!   each cross-checked with `transformers` loading the GGUF file (see the script for the two known
//!   differences). Hand-written strings, byte ranges of the Gutenberg books (ids), and the first
//!   40 kB of every book (id count + FNV-1a hash). Checked when the fixtures are present.
//! - hand-made tiny vocabularies (synthesized GGUF files): merges in rank order, score order, byte
//!   fallback, special tokens — small enough to verify by hand.
//! - round trips `decode(encode(s)) == s` on every real book (CRLF, non-ASCII, ISO-8859 bytes read
//!   lossily).
use longattn::model::fixtures;
use longattn::model::gguf::Gguf;
use longattn::model::tokenizer::{bytes_to_unicode, Tokenizer};
use serde_json::Value;

mod common;
use common::{array, s, Builder};

fn str_array(items: &[&str]) -> Vec<u8> {
    let mut elems = Vec::new();
    for it in items {
        elems.extend(s(it));
    }
    array(8, items.len() as u64, &elems)
}

fn i32_array(items: &[i32]) -> Vec<u8> {
    let elems: Vec<u8> = items.iter().flat_map(|v| v.to_le_bytes()).collect();
    array(5, items.len() as u64, &elems)
}

fn f32_array(items: &[f32]) -> Vec<u8> {
    let elems: Vec<u8> = items.iter().flat_map(|v| v.to_le_bytes()).collect();
    array(6, items.len() as u64, &elems)
}

/// A byte-level BPE vocabulary: the 256 byte characters, then `extra` tokens, with `merges`.
fn tiny_bpe(extra: &[&str], merges: &[&str], special: &[&str]) -> Tokenizer {
    let b2u = bytes_to_unicode();
    let mut tokens: Vec<String> = special.iter().map(|t| t.to_string()).collect();
    tokens.extend(b2u.iter().map(|c| c.to_string()));
    tokens.extend(extra.iter().map(|t| t.to_string()));
    let types: Vec<i32> = (0..tokens.len())
        .map(|i| if i < special.len() { 3 } else { 1 })
        .collect();
    let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    let bytes = Builder::new()
        .kv("general.architecture", 8, s("llama"))
        .kv("tokenizer.ggml.model", 8, s("gpt2"))
        .kv("tokenizer.ggml.pre", 8, s("smollm"))
        .kv("tokenizer.ggml.tokens", 9, str_array(&refs))
        .kv("tokenizer.ggml.token_type", 9, i32_array(&types))
        .kv("tokenizer.ggml.merges", 9, str_array(merges))
        .build();
    Tokenizer::from_gguf(&Gguf::from_bytes(&bytes, "tiny-bpe").unwrap()).unwrap()
}

fn ids_of(t: &Tokenizer, toks: &[&str]) -> Vec<u32> {
    toks.iter()
        .map(|x| t.token_id(x).unwrap_or_else(|| panic!("no token {x:?}")))
        .collect()
}

#[test]
fn bpe_applies_merges_in_rank_order() {
    // "abc": with "b c" ranked first, b+c merge, then "a bc" gives "abc".
    let t = tiny_bpe(&["bc", "ab", "abc"], &["b c", "a b", "a bc"], &[]);
    assert_eq!(t.encode("abc"), ids_of(&t, &["abc"]));
    // Same vocabulary, "a b" first: "ab" + "c", and no "ab c" merge exists.
    let t = tiny_bpe(&["bc", "ab", "abc"], &["a b", "b c", "a bc"], &[]);
    assert_eq!(t.encode("abc"), ids_of(&t, &["ab", "c"]));
    // All occurrences of the best pair merge, left to right: "aaa" -> "aa" "a".
    let t = tiny_bpe(&["aa"], &["a a"], &[]);
    assert_eq!(t.encode("aaa"), ids_of(&t, &["aa", "a"]));
    assert_eq!(t.encode("aaaa"), ids_of(&t, &["aa", "aa"]));
}

#[test]
fn bpe_pretokenizer_splits_words_digits_and_spaces() {
    // " ab" is one piece ("Ġ" + letters), so "Ġa" can merge; digits are single pieces, so "1 2"
    // never merges across them; the run of spaces before a word leaves one space to the word.
    let t = tiny_bpe(
        &["Ġa", "Ġab", "12", "ĠĠ"],
        &["Ġ a", "Ġa b", "1 2", "Ġ Ġ"],
        &[],
    );
    assert_eq!(t.encode(" ab"), ids_of(&t, &["Ġab"]));
    assert_eq!(t.encode("12"), ids_of(&t, &["1", "2"]));
    assert_eq!(t.encode("   ab"), ids_of(&t, &["ĠĠ", "Ġab"]));
    assert_eq!(t.encode("ab  "), ids_of(&t, &["a", "b", "ĠĠ"]));
    // Non-ASCII: the UTF-8 bytes of 'é' (C3 A9) as byte-level characters "Ã" "©".
    assert_eq!(t.encode("é"), ids_of(&t, &["Ã", "©"]));
    assert_eq!(t.decode(&t.encode("é \r\n x")), "é \r\n x");
}

#[test]
fn special_tokens_are_matched_first_longest_first() {
    let t = tiny_bpe(&["ab"], &["a b"], &["<s>", "<s>x"]);
    let want: Vec<u32> = [
        vec![t.token_id("ab").unwrap()],
        ids_of(&t, &["<s>x"]),
        vec![t.token_id("ab").unwrap()],
        ids_of(&t, &["<s>"]),
    ]
    .concat();
    assert_eq!(t.encode("ab<s>xab<s>"), want);
    assert_eq!(t.decode(&want), "ab<s>xab<s>");
}

fn tiny_spm(pieces: &[(&str, f32, i32)]) -> Tokenizer {
    let mut tokens: Vec<&str> = vec!["<unk>", "<s>", "</s>"];
    let mut scores = vec![0.0, 0.0, 0.0];
    let mut types = vec![2, 3, 3];
    let byte_names: Vec<String> = (0..256).map(|b| format!("<0x{b:02X}>")).collect();
    for b in &byte_names {
        tokens.push(b);
        scores.push(0.0);
        types.push(6);
    }
    for (p, sc, ty) in pieces {
        tokens.push(p);
        scores.push(*sc);
        types.push(*ty);
    }
    let bytes = Builder::new()
        .kv("general.architecture", 8, s("gemma3"))
        .kv("tokenizer.ggml.model", 8, s("llama"))
        .kv("tokenizer.ggml.tokens", 9, str_array(&tokens))
        .kv("tokenizer.ggml.scores", 9, f32_array(&scores))
        .kv("tokenizer.ggml.token_type", 9, i32_array(&types))
        .kv("tokenizer.ggml.add_space_prefix", 7, vec![0])
        .kv(
            "tokenizer.ggml.bos_token_id",
            4,
            1u32.to_le_bytes().to_vec(),
        )
        .build();
    Tokenizer::from_gguf(&Gguf::from_bytes(&bytes, "tiny-spm").unwrap()).unwrap()
}

#[test]
fn spm_merges_by_score_with_byte_fallback() {
    let p = [
        ("a", -1.0, 1),
        ("b", -1.0, 1),
        ("c", -1.0, 1),
        ("▁", -1.0, 1),
        ("ab", -3.0, 1),
        ("bc", -2.0, 1),
        ("▁a", -4.0, 1),
        ("\n\n", 0.0, 4),
    ];
    let t = tiny_spm(&p);
    // "bc" (score -2) beats "ab" (-3); then "a" + "bc" = "abc" is no piece.
    assert_eq!(t.encode("abc"), ids_of(&t, &["a", "bc"]));
    // With "ab" scored higher, "ab" + "c".
    let mut p2 = p;
    p2[4].1 = -1.5;
    assert_eq!(tiny_spm(&p2).encode("abc"), ids_of(&t, &["ab", "c"]));
    // Merges look up the concatenated text: with an "abc" piece, "a" + "bc" becomes it.
    let mut p3 = p.to_vec();
    p3.push(("abc", -9.0, 1));
    let t3 = tiny_spm(&p3);
    assert_eq!(t3.encode("abc"), ids_of(&t3, &["abc"]));
    // A space becomes "▁" and merges with "a"; in " ab", "ab" (-3) wins over "▁a" (-4).
    assert_eq!(t.encode("c a"), ids_of(&t, &["c", "▁a"]));
    assert_eq!(t.encode("c ab"), ids_of(&t, &["c", "▁", "ab"]));
    // 'é' is no piece: its UTF-8 bytes through <0xC3> <0xA9>.
    assert_eq!(t.encode("aé"), ids_of(&t, &["a", "<0xC3>", "<0xA9>"]));
    assert_eq!(t.decode(&t.encode("aé c\n\nb")), "aé c\n\nb");
    // A user-defined piece is split out of the raw text.
    assert_eq!(t.encode("a\n\nb"), ids_of(&t, &["a", "\n\n", "b"]));
    assert_eq!(t.bos(), Some(1));
    assert!(t.add_bos());
}

#[test]
fn unsupported_tokenizers_are_named() {
    let base = |model: &str, pre: &str| {
        Builder::new()
            .kv("tokenizer.ggml.model", 8, s(model))
            .kv("tokenizer.ggml.pre", 8, s(pre))
            .kv("tokenizer.ggml.tokens", 9, str_array(&["a"]))
            .kv("tokenizer.ggml.merges", 9, str_array(&[]))
            .build()
    };
    let e = Tokenizer::from_gguf(&Gguf::from_bytes(&base("bert", "x"), "t").unwrap())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("unsupported tokenizer model `bert`"), "{e}");
    let e = Tokenizer::from_gguf(&Gguf::from_bytes(&base("gpt2", "qwen2"), "t").unwrap())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("unsupported pre-tokenizer `qwen2`"), "{e}");
    let e = Tokenizer::from_gguf(&Gguf::from_bytes(&Builder::new().build(), "t").unwrap())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("tokenizer.ggml.model"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// The real models, when present.

fn real(name: &str) -> Option<Tokenizer> {
    let p = match name {
        "smollm2" => fixtures::smollm2_path(),
        "gemma3" => fixtures::gemma3_path(),
        _ => unreachable!(),
    };
    match p {
        Ok(p) => Some(Tokenizer::from_gguf(&Gguf::open(&p).unwrap()).unwrap()),
        Err(e) => {
            eprintln!("skipping {name}: {e}");
            None
        }
    }
}

/// FNV-1a 64 over the ids as little-endian u32 bytes (as `scripts/tokenizer_reference.py`).
fn fnv1a64(ids: &[u32]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in ids.iter().flat_map(|i| i.to_le_bytes()) {
        h = (h ^ b as u64).wrapping_mul(0x100000001b3);
    }
    h
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn real_tokenizers_match_reference_ids() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/tokenizer_reference.json"
    );
    let r: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    for m in r["models"].as_array().unwrap() {
        let name = m["model"].as_str().unwrap();
        let Some(t) = real(name) else { continue };
        let mut n = 0;
        for c in m["strings"].as_array().unwrap() {
            let text = c["text"].as_str().unwrap();
            assert_eq!(t.encode(text), ids(&c["ids"]), "{name}: {text:?}");
            n += 1;
        }
        match fixtures::books_dir() {
            Ok(dir) => {
                for c in m["books"].as_array().unwrap() {
                    let book = c["book"].as_str().unwrap();
                    let start = c["start"].as_u64().unwrap() as usize;
                    let len = c["len"].as_u64().unwrap() as usize;
                    let bytes = std::fs::read(dir.join(book)).unwrap();
                    let text = String::from_utf8_lossy(&bytes[start..start + len]);
                    assert_eq!(t.encode(&text), ids(&c["ids"]), "{name}: {book}[{start}..]");
                    n += 1;
                }
                // Every book's first 40 kB (and ISO-8859 bytes): count and FNV-1a hash of the ids.
                for c in m["hashed"].as_array().unwrap() {
                    let book = c["book"].as_str().unwrap();
                    let start = c["start"].as_u64().unwrap() as usize;
                    let len = c["len"].as_u64().unwrap() as usize;
                    let bytes = std::fs::read(dir.join(book)).unwrap();
                    let end = (start + len).min(bytes.len());
                    let got = t.encode(&String::from_utf8_lossy(&bytes[start..end]));
                    assert_eq!(
                        (got.len() as u64, format!("{:016x}", fnv1a64(&got))),
                        (
                            c["count"].as_u64().unwrap(),
                            c["fnv1a64"].as_str().unwrap().to_string()
                        ),
                        "{name}: {book}[{start}..{end}]"
                    );
                    n += 1;
                }
            }
            Err(e) => eprintln!("skipping book ranges: {e}"),
        }
        assert!(n >= 30, "{name}: only {n} reference cases");
    }
}

#[test]
fn real_vocabulary_words_map_to_their_index() {
    if let Some(t) = real("smollm2") {
        assert_eq!(t.vocab_size(), 49152);
        assert_eq!((t.bos(), t.eos(), t.add_bos()), (Some(1), Some(2), false));
        // A vocabulary entry "Ġword" is the word with a leading space.
        for w in ["the", "world", "Alice", "whale", "because"] {
            let id = t.token_id(&format!("Ġ{w}")).unwrap();
            assert_eq!(t.encode(&format!(" {w}")), vec![id], "{w}");
            assert_eq!(t.decode(&[id]), format!(" {w}"));
        }
        assert_eq!(t.encode("<|im_start|>"), vec![1]);
    }
    if let Some(t) = real("gemma3") {
        assert_eq!(t.vocab_size(), 262144);
        assert_eq!((t.bos(), t.eos(), t.add_bos()), (Some(2), Some(1), true));
        for w in ["the", "world", "Alice", "whale", "because"] {
            let id = t.token_id(&format!("▁{w}")).unwrap();
            assert_eq!(t.encode(&format!(" {w}")), vec![id], "{w}");
            assert_eq!(t.decode(&[id]), format!(" {w}"));
        }
        assert_eq!(t.encode("<start_of_turn>"), vec![105]);
        assert_eq!(t.encode("\r"), vec![t.token_id("<0x0D>").unwrap()]);
    }
}

#[test]
fn real_books_round_trip() {
    let dir = match fixtures::books_dir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("skipping: {e}");
            return;
        }
    };
    let toks: Vec<(&str, Tokenizer)> = ["smollm2", "gemma3"]
        .into_iter()
        .filter_map(|n| real(n).map(|t| (n, t)))
        .collect();
    let mut n_crlf = 0;
    let mut n_lossy = 0;
    for book in fixtures::BOOKS {
        let bytes = std::fs::read(dir.join(book)).unwrap();
        // Books are read as bytes and decoded lossily (two hold ISO-8859 bytes).
        let text = String::from_utf8_lossy(&bytes);
        n_crlf += text.contains("\r\n") as usize;
        n_lossy += text.contains('\u{FFFD}') as usize;
        for (name, t) in &toks {
            let ids = t.encode(&text);
            assert!(
                ids.len() > text.len() / 8,
                "{name} {book}: {} ids",
                ids.len()
            );
            assert!(
                t.decode(&ids) == text,
                "{name} {book}: decode(encode(text)) differs"
            );
        }
    }
    assert!(
        n_crlf >= 3 && n_lossy >= 1,
        "books changed: {n_crlf} CRLF, {n_lossy} lossy"
    );
}
