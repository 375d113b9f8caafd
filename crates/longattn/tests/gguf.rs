//! GGUF reader tests.
//!
//! Ground truth:
//! - dequantizers: `tests/data/gguf_reference.json`, written by `scripts/gguf_reference.py` from
//!   llama.cpp's Python package `gguf` (0.19.0, `gguf.quants.dequantize`): seeded random blocks of
//!   every type it implements, plus per-row statistics of real tensors (checked when the model files
//!   are in the cache). Q8_1 and Q8_K (absent from that package) are checked by hand below.
//! - malformed inputs: files synthesized here by a small GGUF writer, then truncated or corrupted.
use longattn::model::fixtures;
use longattn::model::gguf::{dequantize_into, GgmlType, Gguf, MetaValue};
use longattn::testing::Rng;
use serde_json::Value;

mod common;
use common::{array, s, u32v, Builder};

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn hex_f32(s: &str) -> Vec<f32> {
    hex(s)
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn reference() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/gguf_reference.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn type_by_name(name: &str) -> GgmlType {
    (0..64)
        .map(GgmlType::from_id)
        .find(|t| t.name() == name)
        .unwrap_or_else(|| panic!("unknown type name {name}"))
}

#[test]
fn dequantizers_match_gguf_python_on_random_blocks() {
    let r = reference();
    let cases = r["synthetic"].as_array().unwrap();
    let mut seen = Vec::new();
    for c in cases {
        let ty = type_by_name(c["type"].as_str().unwrap());
        let src = hex(c["bytes"].as_str().unwrap());
        let want = hex_f32(c["values"].as_str().unwrap());
        assert!(
            want.iter().any(|v| *v != 0.0),
            "{ty}: reference is all zeros"
        );
        let mut got = vec![f32::NAN; want.len()];
        dequantize_into(ty, &src, &mut got).unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            // Same f32 operations in the same order up to fused multiply-adds: allow 1 ulp-ish.
            let tol = 1e-6 * w.abs().max(1e-3);
            assert!((g - w).abs() <= tol, "{ty}[{i}]: got {g}, reference {w}");
        }
        seen.push(ty);
    }
    for ty in [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q2K,
        GgmlType::Q3K,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
    ] {
        assert!(seen.contains(&ty), "no reference case for {ty}");
    }
}

/// Q8_1 and Q8_K are y = d * q (d f16 resp. f32): computed by hand.
#[test]
fn q8_1_and_q8_k_by_hand() {
    let mut b = Vec::new();
    b.extend_from_slice(&half::f16::from_f32(0.5).to_le_bytes());
    b.extend_from_slice(&half::f16::from_f32(123.0).to_le_bytes()); // s: not used
    b.extend((0..32).map(|i| (i as i8 - 16) as u8));
    let mut y = vec![0f32; 32];
    dequantize_into(GgmlType::Q8_1, &b, &mut y).unwrap();
    for (i, v) in y.iter().enumerate() {
        assert_eq!(*v, 0.5 * (i as f32 - 16.0));
    }
    let mut b = Vec::new();
    b.extend_from_slice(&0.25f32.to_le_bytes());
    b.extend((0..256).map(|i| (i as u8).wrapping_sub(128)));
    b.extend_from_slice(&[0u8; 32]);
    let mut y = vec![0f32; 256];
    dequantize_into(GgmlType::Q8K, &b, &mut y).unwrap();
    for (i, v) in y.iter().enumerate() {
        assert_eq!(*v, 0.25 * ((i as u8).wrapping_sub(128) as i8) as f32);
    }
}

#[test]
fn dequantize_into_rejects_wrong_lengths_and_unknown_types() {
    let mut y = vec![0f32; 32];
    let e = dequantize_into(GgmlType::Q4_0, &[0u8; 17], &mut y).unwrap_err();
    assert!(e.to_string().contains("Q4_0"), "{e}");
    let e = dequantize_into(GgmlType::from_id(16), &[0u8; 66], &mut y).unwrap_err();
    assert!(e.to_string().contains("IQ2_XXS"), "{e}");
}

/// A small valid file with every metadata value type, nested arrays, alignment 64, an F32 and a
/// Q8_0 tensor.
fn sample() -> (Builder, Vec<f32>, Vec<f32>) {
    let f32_vals: Vec<f32> = (0..6).map(|i| i as f32 * 0.75 - 1.0).collect();
    let f32_data: Vec<u8> = f32_vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    // Q8_0: two rows of one block; d = 0.125, q = i - 10 (row 0), 20 - i (row 1).
    let mut q8 = Vec::new();
    let mut q8_vals = Vec::new();
    for r in 0..2 {
        q8.extend_from_slice(&half::f16::from_f32(0.125).to_le_bytes());
        for i in 0..32i32 {
            let q = if r == 0 { i - 10 } else { 20 - i };
            q8.push(q as i8 as u8);
            q8_vals.push(0.125 * q as f32);
        }
    }
    let mut strs = Vec::new();
    strs.extend(s("a"));
    strs.extend(s("béta"));
    let mut nested = Vec::new();
    nested.extend(array(5, 2, &[1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]));
    let b = Builder::new()
        .kv("general.architecture", 8, s("llama"))
        .kv("general.alignment", 4, u32v(64))
        .kv("t.u8", 0, vec![200])
        .kv("t.i8", 1, vec![0xfe])
        .kv("t.u16", 2, 60000u16.to_le_bytes().to_vec())
        .kv("t.i16", 3, (-300i16).to_le_bytes().to_vec())
        .kv("llama.block_count", 4, u32v(30))
        .kv("t.i32", 5, (-7i32).to_le_bytes().to_vec())
        .kv("t.f32", 6, 1.5f32.to_le_bytes().to_vec())
        .kv("t.bool", 7, vec![1])
        .kv("t.u64", 10, (1u64 << 40).to_le_bytes().to_vec())
        .kv("t.i64", 11, (-5i64).to_le_bytes().to_vec())
        .kv("t.f64", 12, 2.25f64.to_le_bytes().to_vec())
        .kv("t.strs", 9, array(8, 2, &strs))
        .kv(
            "t.f32s",
            9,
            array(6, 2, &[0, 0, 0x80, 0x3f, 0, 0, 0, 0xc0]), // 1.0, -2.0
        )
        .kv("t.nested", 9, array(9, 1, &nested))
        .tensor("w.f32", &[3, 2], 0, f32_data)
        .tensor("w.q8", &[32, 2], 8, q8);
    let mut b = b;
    b.alignment = 64;
    (b, f32_vals, q8_vals)
}

#[test]
fn synthesized_file_parses_every_value_type() {
    let (b, f32_vals, q8_vals) = sample();
    let g = Gguf::from_bytes(&b.build(), "sample").unwrap();
    assert_eq!(g.version(), 3);
    assert_eq!(g.architecture(), "llama");
    assert_eq!(g.alignment(), 64);
    assert_eq!(g.data_start() % 64, 0);
    assert_eq!(g.meta("t.u8"), Some(&MetaValue::U8(200)));
    assert_eq!(g.meta("t.i8"), Some(&MetaValue::I8(-2)));
    assert_eq!(g.meta("t.u16"), Some(&MetaValue::U16(60000)));
    assert_eq!(g.meta("t.i16"), Some(&MetaValue::I16(-300)));
    assert_eq!(g.meta("t.i32"), Some(&MetaValue::I32(-7)));
    assert_eq!(g.meta("t.u64"), Some(&MetaValue::U64(1 << 40)));
    assert_eq!(g.meta("t.i64"), Some(&MetaValue::I64(-5)));
    assert_eq!(g.meta("t.f64"), Some(&MetaValue::F64(2.25)));
    assert!(g.meta_bool("t.bool").unwrap());
    assert_eq!(g.meta_f32("t.f32").unwrap(), 1.5);
    assert_eq!(g.arch_u32("block_count").unwrap(), 30);
    assert_eq!(g.meta_u32("t.u16").unwrap(), 60000);
    assert_eq!(g.meta_str_array("t.strs").unwrap(), vec!["a", "béta"]);
    assert_eq!(g.meta_f32_array("t.f32s").unwrap(), vec![1.0, -2.0]);
    assert_eq!(
        g.meta("t.nested"),
        Some(&MetaValue::Array(vec![MetaValue::Array(vec![
            MetaValue::I32(1),
            MetaValue::I32(-1)
        ])]))
    );
    // Typed getters: clear errors naming the key.
    let e = g.meta_u32("missing.key").unwrap_err().to_string();
    assert!(e.contains("missing.key") && e.contains("missing"), "{e}");
    let e = g.meta_u32("t.i32").unwrap_err().to_string();
    assert!(e.contains("t.i32"), "{e}");
    let e = g.meta_str("t.f32").unwrap_err().to_string();
    assert!(e.contains("t.f32") && e.contains("string"), "{e}");

    let t = g.tensor("w.f32").unwrap();
    assert_eq!(t.dims, vec![3, 2]);
    assert_eq!(t.ggml_type, GgmlType::F32);
    assert_eq!(g.dequantize("w.f32").unwrap(), f32_vals);
    assert_eq!(g.tensor("w.q8").unwrap().offset, 64);
    assert_eq!(g.dequantize("w.q8").unwrap(), q8_vals);
    assert_eq!(g.dequantize_rows("w.q8", 1, 1).unwrap(), q8_vals[32..]);
    let e = g.dequantize_rows("w.q8", 1, 2).unwrap_err().to_string();
    assert!(e.contains("w.q8") && e.contains("2 rows"), "{e}");
    let e = g.dequantize("nope").unwrap_err().to_string();
    assert!(e.contains("`nope` not found"), "{e}");
}

#[test]
fn every_truncation_is_an_error() {
    let bytes = sample().0.build();
    for n in 0..bytes.len() {
        // The trailing alignment padding of the last tensor is not needed; everything before it is.
        let r = Gguf::from_bytes(&bytes[..n], "trunc");
        if n < bytes.len() - 128 + 68 {
            let e = r
                .expect_err(&format!("prefix of {n} bytes parsed"))
                .to_string();
            assert!(
                e.contains("truncated") || e.contains("not a GGUF") || e.contains("fit"),
                "prefix {n}: {e}"
            );
        }
    }
}

fn err_of(bytes: &[u8]) -> String {
    Gguf::from_bytes(bytes, "bad").unwrap_err().to_string()
}

#[test]
fn malformed_headers_give_clear_errors() {
    let (b, _, _) = sample();
    let good = b.build();
    // Magic and version.
    let mut x = good.clone();
    x[0] = b'X';
    assert!(err_of(&x).contains("not a GGUF file"));
    for v in [1u32, 4, u32::MAX] {
        let mut b2 = b.clone();
        b2.version = v;
        assert!(err_of(&b2.build()).contains(&format!("unsupported GGUF version {v}")));
    }
    // Absurd counts must fail before allocating.
    let mut x = good.clone();
    x[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(err_of(&x).contains("tensor count"), "{}", err_of(&x));
    let mut x = good.clone();
    x[16..24].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    assert!(err_of(&x).contains("metadata count"));
    // A huge string length.
    let huge = Builder::new().kv("k", 8, {
        let mut v = (u64::MAX - 3).to_le_bytes().to_vec();
        v.extend_from_slice(b"abc");
        v
    });
    assert!(err_of(&huge.build()).contains("string length"));
    // A huge array.
    let arr = Builder::new().kv("k", 9, array(4, 1 << 60, &[0; 8]));
    assert!(err_of(&arr.build()).contains("array of 1152921504606846976 elements"));
    // Unknown value type, bad bool, deep nesting.
    assert!(
        err_of(&Builder::new().kv("k", 13, vec![0; 8]).build()).contains("unknown value type 13")
    );
    assert!(err_of(&Builder::new().kv("k", 7, vec![2]).build()).contains("bool byte 2"));
    let mut deep = array(4, 1, &[1, 0, 0, 0]);
    for _ in 0..5 {
        deep = array(9, 1, &deep);
    }
    assert!(err_of(&Builder::new().kv("k", 9, deep).build()).contains("nested deeper"));
    // Duplicate keys.
    let dup = Builder::new().kv("k", 4, u32v(1)).kv("k", 4, u32v(2));
    assert!(err_of(&dup.build()).contains("duplicate metadata key `k`"));
    // Bad alignment.
    let al = Builder::new().kv("general.alignment", 4, u32v(48));
    assert!(err_of(&al.build()).contains("general.alignment"));
}

#[test]
fn malformed_tensor_tables_give_clear_errors() {
    let data = vec![0u8; 24];
    let one = |dims: &[u64], ty: u32| Builder::new().tensor("t", dims, ty, data.clone());
    Gguf::from_bytes(&one(&[6], 0).build(), "ok").unwrap();
    assert!(err_of(&one(&[1, 1, 1, 1, 6], 0).build()).contains("5 dimensions"));
    assert!(err_of(&one(&[6, 0], 0).build()).contains("invalid dimension 0"));
    assert!(err_of(&one(&[1 << 40, 1 << 40], 0).build()).contains("overflows"));
    // Needs more bytes than the file has.
    assert!(err_of(&one(&[9], 0).build()).contains("truncated GGUF: tensor `t`"));
    // Quantized row length not a multiple of the block.
    assert!(err_of(&one(&[16], 8).build()).contains("not a multiple of the block size 32"));
    // Offsets past the end and misaligned.
    let b = one(&[6], 0);
    assert!(err_of(&b.build_with(Some(&[1 << 62]))).contains("truncated GGUF"));
    assert!(err_of(&b.build_with(Some(&[u64::MAX - 31]))).contains("truncated GGUF"));
    assert!(err_of(&b.build_with(Some(&[4]))).contains("not a multiple of the alignment"));
    // An unsupported type parses (the table is fine) and fails by name when dequantized.
    let g = Gguf::from_bytes(&one(&[256], 23).build(), "iq").unwrap();
    let e = g.dequantize("t").unwrap_err().to_string();
    assert!(e.contains("IQ4_XS") && e.contains("`t`"), "{e}");
    let g = Gguf::from_bytes(&one(&[6], 200).build(), "unknown").unwrap();
    assert!(g
        .dequantize("t")
        .unwrap_err()
        .to_string()
        .contains("type 200"));
    // Duplicate tensor names.
    let dup = one(&[6], 0).tensor("t", &[6], 0, data.clone());
    assert!(err_of(&dup.build()).contains("duplicate tensor name `t`"));
}

#[test]
fn random_corruptions_never_panic() {
    let good = sample().0.build();
    let mut rng = Rng::new(7);
    let mut n_ok = 0;
    for _ in 0..3000 {
        let mut x = good.clone();
        for _ in 0..1 + rng.below(4) {
            let i = rng.below(x.len());
            x[i] = rng.next_u64() as u8;
        }
        if let Ok(g) = Gguf::from_bytes(&x, "fuzz") {
            n_ok += 1;
            for t in g.tensors().to_vec() {
                let _ = g.dequantize(&t.name);
            }
        }
    }
    // Most single-byte flips land in tensor data or values and leave the file valid.
    assert!(n_ok > 100, "only {n_ok} corrupted files parsed");
}

#[test]
fn missing_file_says_how_to_fetch() {
    let e = Gguf::open(std::path::Path::new("/nonexistent/x.gguf"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("/nonexistent/x.gguf") && e.contains("longattn fetch"),
        "{e}"
    );
}

// ---------------------------------------------------------------------------------------------
// The real files, when present.

fn real_path(file: &str) -> Option<std::path::PathBuf> {
    let p = match file {
        "smollm2" => fixtures::smollm2_path(),
        "gemma3" => fixtures::gemma3_path(),
        _ => unreachable!(),
    };
    match p {
        Ok(p) => Some(p),
        Err(e) => {
            eprintln!("skipping: {e}");
            None
        }
    }
}

#[test]
fn real_files_match_gguf_python_row_statistics() {
    let r = reference();
    for f in r["real"].as_array().unwrap() {
        let Some(path) = real_path(f["file"].as_str().unwrap()) else {
            continue;
        };
        let g = Gguf::open(&path).unwrap();
        assert_eq!(g.architecture(), f["architecture"].as_str().unwrap());
        assert_eq!(g.tensors().len() as u64, f["n_tensors"].as_u64().unwrap());
        for t in f["tensors"].as_array().unwrap() {
            let name = t["name"].as_str().unwrap();
            let info = g.tensor(name).unwrap();
            assert_eq!(info.ggml_type.name(), t["type"].as_str().unwrap());
            let dims: Vec<usize> = t["dims"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            assert_eq!(info.dims, dims, "{name}");
            for row in t["rows"].as_array().unwrap() {
                let ri = row["row"].as_u64().unwrap() as usize;
                let y = g.dequantize_rows(name, ri, 1).unwrap();
                let sum: f64 = y.iter().map(|&v| v as f64).sum();
                let sumsq: f64 = y.iter().map(|&v| v as f64 * v as f64).sum();
                let want_sumsq = row["sumsq"].as_f64().unwrap();
                let want_sum = row["sum"].as_f64().unwrap();
                assert!(want_sumsq > 0.0, "{name} row {ri}: zero reference");
                assert!(
                    (sumsq - want_sumsq).abs() <= 1e-6 * want_sumsq,
                    "{name} row {ri}: sumsq {sumsq} vs {want_sumsq}"
                );
                assert!(
                    (sum - want_sum).abs() <= 1e-6 * want_sumsq.sqrt() * (y.len() as f64).sqrt(),
                    "{name} row {ri}: sum {sum} vs {want_sum}"
                );
                let vals = hex_f32(row["values"].as_str().unwrap());
                for (p, w) in row["positions"].as_array().unwrap().iter().zip(vals) {
                    let v = y[p.as_u64().unwrap() as usize];
                    assert!(
                        (v - w).abs() <= 1e-6 * w.abs().max(1e-6),
                        "{name}[{ri},{p}]"
                    );
                }
            }
        }
    }
}

#[test]
fn real_files_report_architecture_and_shapes() {
    if let Some(p) = real_path("smollm2") {
        let g = Gguf::open(&p).unwrap();
        assert_eq!(g.architecture(), "llama");
        assert_eq!(g.arch_u32("block_count").unwrap(), 30);
        assert_eq!(g.arch_u32("embedding_length").unwrap(), 576);
        assert_eq!(g.arch_u32("attention.head_count").unwrap(), 9);
        assert_eq!(g.arch_u32("attention.head_count_kv").unwrap(), 3);
        assert_eq!(g.arch_f32("rope.freq_base").unwrap(), 1e5);
        assert_eq!(g.meta_str("tokenizer.ggml.model").unwrap(), "gpt2");
        assert_eq!(
            g.tensor("token_embd.weight").unwrap().dims,
            vec![576, 49152]
        );
        assert_eq!(
            g.tensor("blk.0.attn_k.weight").unwrap().dims,
            vec![576, 192]
        );
        // Every tensor dequantizes (all types of the file are supported) to finite values.
        for t in g.tensors() {
            let (_, rows) = t.rows();
            let y = g.dequantize_rows(&t.name, rows - 1, 1).unwrap();
            assert!(y.iter().all(|v| v.is_finite()), "{}", t.name);
        }
    }
    if let Some(p) = real_path("gemma3") {
        let g = Gguf::open(&p).unwrap();
        assert_eq!(g.architecture(), "gemma3");
        assert_eq!(g.arch_u32("block_count").unwrap(), 18);
        assert_eq!(g.arch_u32("attention.key_length").unwrap(), 256);
        assert_eq!(g.arch_u32("attention.sliding_window").unwrap(), 512);
        assert_eq!(g.arch_u32("context_length").unwrap(), 32768);
        assert_eq!(g.meta_str("tokenizer.ggml.model").unwrap(), "llama");
        assert_eq!(
            g.tensor("token_embd.weight").unwrap().dims,
            vec![640, 262144]
        );
        assert_eq!(
            g.tensor("blk.0.attn_q.weight").unwrap().dims,
            vec![640, 1024]
        );
        for t in g.tensors() {
            let (_, rows) = t.rows();
            let y = g.dequantize_rows(&t.name, rows - 1, 1).unwrap();
            assert!(y.iter().all(|v| v.is_finite()), "{}", t.name);
        }
    }
}
