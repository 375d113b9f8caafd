//! End-to-end tests of the `longattn` binary.
use half::bf16;
use longattn::io::{read_outputs, write_inputs, Inputs};
use longattn::reference::attention_f64;
use longattn::tensor::Buffer;
use longattn::{AttnParams, DType, Tensor};
use safetensors::tensor::{Dtype as StDtype, TensorView as StView};
use std::path::PathBuf;
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_longattn"))
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("longattn-cli-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let p = d.join(name);
    let _ = std::fs::remove_file(&p);
    p
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Fails unless the command failed cleanly (non-zero exit, no panic) with `want` in its message.
fn fails_with(o: Output, want: &str) {
    let e = stderr(&o);
    assert!(!o.status.success(), "expected failure, got success: {e}");
    assert!(!e.contains("panicked"), "panic: {e}");
    assert!(e.contains(want), "expected `{want}` in: {e}");
}

fn det(n: usize, seed: f32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32 * 0.731 + seed) * 1.37).sin())
        .collect()
}

fn inputs(dtype: DType, b: usize, sq: usize, sk: usize, hq: usize, hk: usize, d: usize) -> Inputs {
    let mk = |shape: Vec<usize>, s: f32| {
        let n = shape.iter().product();
        Tensor::new(Buffer::from_f32(dtype, &det(n, s)), shape).unwrap()
    };
    Inputs {
        q: mk(vec![b, sq, hq, d], 0.1),
        k: mk(vec![b, sk, hk, d], 0.2),
        v: mk(vec![b, sk, hk, d], 0.3),
        q_doc: None,
        k_doc: None,
        block_mask: None,
    }
}

fn raw_file(name: &str, ts: &[(&str, StDtype, Vec<usize>, Vec<u8>)]) -> PathBuf {
    let views: Vec<(String, StView)> = ts
        .iter()
        .map(|(n, d, s, b)| (n.to_string(), StView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let p = tmp(name);
    std::fs::write(&p, safetensors::serialize(views, &None).unwrap()).unwrap();
    p
}

fn run_args(input: &PathBuf, output: &PathBuf, extra: &[&str]) -> Output {
    bin()
        .arg("run")
        .arg("--input")
        .arg(input)
        .arg("--output")
        .arg(output)
        .args(extra)
        .output()
        .unwrap()
}

fn check_run(dtype: DType, mask: &str, tol: f64) {
    let x = inputs(dtype, 2, 37, 37, 4, 2, 16);
    let input = tmp(&format!("in-{dtype}-{mask}.safetensors"));
    let output = tmp(&format!("out-{dtype}-{mask}.safetensors"));
    write_inputs(&input, &x, true).unwrap();
    let o = run_args(&input, &output, &["--mask", mask, "--threads", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (out, lse, lse_shape) = read_outputs(&output).unwrap();
    assert_eq!(out.dtype(), dtype);
    assert_eq!(out.shape, vec![2, 37, 4, 16]);
    assert_eq!(lse_shape, vec![2, 4, 37]);
    let causal = mask == "causal";
    let r = attention_f64(
        &x.q.view("q").unwrap(),
        &x.k.view("k").unwrap(),
        &x.v.view("v").unwrap(),
        &AttnParams::default(),
        &|_, _, i, j| !causal || j <= i,
    )
    .unwrap();
    let got = out.data.to_f32_vec();
    let max_ref = r.out.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let err = got
        .iter()
        .zip(&r.out)
        .fold(0.0f64, |m, (&g, &w)| m.max((g as f64 - w).abs()));
    assert!(
        err / max_ref <= tol,
        "{dtype} {mask}: out error {err} / {max_ref}"
    );
    for (&g, &w) in lse.iter().zip(&r.lse) {
        assert!(
            (g as f64 - w).abs() <= tol * w.abs().max(1.0),
            "lse {g} vs {w}"
        );
    }
}

#[test]
fn run_matches_the_oracle_f32() {
    check_run(DType::F32, "full", 1e-4);
}

#[test]
fn run_matches_the_oracle_bf16() {
    check_run(DType::BF16, "full", 2e-2);
}

#[test]
fn mask_prints_causal() {
    let o = bin()
        .args([
            "mask", "causal", "--sq", "256", "--sk", "256", "--tile", "64",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(s.contains("causal"), "{s}");
    // 4 x 4 tiles: a lower triangle with partial tiles on the diagonal.
    let lines: Vec<&str> = s.lines().filter(|l| l.len() == 4).collect();
    assert_eq!(lines.len(), 4, "{s}");
}

#[test]
fn mask_png_is_written() {
    let p = tmp("mask.png");
    let o = bin()
        .args(["mask", "causal", "--sq", "300", "--sk", "300", "--png"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let b = std::fs::read(&p).unwrap();
    assert_eq!(&b[1..4], b"PNG");
}

#[test]
fn mask_parse_error_has_position() {
    let o = bin()
        .args(["mask", "causal & windw(3,0)", "--sq", "8", "--sk", "8"])
        .output()
        .unwrap();
    fails_with(o, "position 9");
}

#[test]
fn run_missing_tensor() {
    let p = raw_file(
        "missing.safetensors",
        &[
            ("q", StDtype::F32, vec![1, 2, 1, 2], vec![0; 16]),
            ("k", StDtype::F32, vec![1, 2, 1, 2], vec![0; 16]),
        ],
    );
    fails_with(
        run_args(&p, &tmp("o1.safetensors"), &[]),
        "missing tensor `v`",
    );
}

#[test]
fn run_truncated_file() {
    let x = inputs(DType::F32, 1, 4, 4, 1, 1, 4);
    let p = tmp("trunc.safetensors");
    write_inputs(&p, &x, true).unwrap();
    let b = std::fs::read(&p).unwrap();
    std::fs::write(&p, &b[..b.len() - 7]).unwrap();
    fails_with(
        run_args(&p, &tmp("o2.safetensors"), &[]),
        "not a valid safetensors file",
    );
}

#[test]
fn run_missing_file() {
    fails_with(
        run_args(&tmp("nope.safetensors"), &tmp("o3.safetensors"), &[]),
        "cannot read",
    );
}

#[test]
fn run_dtype_mismatch() {
    let p = raw_file(
        "mixed.safetensors",
        &[
            ("q", StDtype::F32, vec![1, 2, 1, 2], vec![0; 16]),
            ("k", StDtype::BF16, vec![1, 2, 1, 2], vec![0; 8]),
            ("v", StDtype::F32, vec![1, 2, 1, 2], vec![0; 16]),
        ],
    );
    fails_with(
        run_args(&p, &tmp("o4.safetensors"), &[]),
        "`k` has dtype bf16, expected f32",
    );
}

#[test]
fn run_heads_not_multiple() {
    let x = inputs(DType::F32, 1, 4, 4, 3, 2, 4);
    let p = tmp("heads.safetensors");
    write_inputs(&p, &x, true).unwrap();
    fails_with(
        run_args(&p, &tmp("o5.safetensors"), &[]),
        "multiple of key/value heads",
    );
}

#[test]
fn run_document_without_doc_ids() {
    let x = inputs(DType::F32, 1, 4, 4, 1, 1, 4);
    let p = tmp("nodocs.safetensors");
    write_inputs(&p, &x, true).unwrap();
    fails_with(
        run_args(&p, &tmp("o6.safetensors"), &["--mask", "causal & document"]),
        "q_doc",
    );
}

#[test]
fn run_nonfinite_input() {
    let mut x = inputs(DType::BF16, 1, 4, 4, 1, 1, 4);
    if let Buffer::BF16(v) = &mut x.v.data {
        v[5] = bf16::NAN;
    }
    let p = tmp("nan.safetensors");
    write_inputs(&p, &x, true).unwrap();
    fails_with(
        run_args(&p, &tmp("o7.safetensors"), &[]),
        "tensor `v` holds a non-finite value (NaN) at flat index 5",
    );
    let out = tmp("o7b.safetensors");
    let o = run_args(&p, &out, &["--allow-nonfinite"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn run_refuses_to_overwrite() {
    let x = inputs(DType::F32, 1, 4, 4, 1, 1, 4);
    let p = tmp("ow.safetensors");
    write_inputs(&p, &x, true).unwrap();
    let out = tmp("ow-out.safetensors");
    std::fs::write(&out, b"keep me").unwrap();
    fails_with(run_args(&p, &out, &[]), "--force");
    assert_eq!(std::fs::read(&out).unwrap(), b"keep me");
    let o = run_args(&p, &out, &["--force"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(read_outputs(&out).is_ok());
}

#[test]
fn bench_quick_writes_a_report() {
    let dir = tmp("bench-report");
    let _ = std::fs::remove_dir_all(&dir);
    let o = bin()
        .args([
            "bench",
            "--quick",
            "--lens",
            "64,128",
            "--dims",
            "16",
            "--masks",
            "full",
            "--heads",
            "2",
            "--min-time",
            "0",
            "--reps",
            "1",
            "--out",
        ])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let j: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("results.json")).unwrap()).unwrap();
    let rows = j["results"].as_array().unwrap();
    assert_eq!(rows.len(), 4); // 2 lengths x 2 dtypes
    assert!(rows
        .iter()
        .all(|r| r["status"] == "ok" && r["gflops"].as_f64().unwrap() > 0.0));
    assert!(dir.join("report.md").exists());
    assert!(dir.join("full.png").exists());
}

#[test]
fn bench_backward_writes_a_report() {
    let dir = tmp("bench-backward-report");
    let _ = std::fs::remove_dir_all(&dir);
    let o = bin()
        .args([
            "bench",
            "--backward",
            "--lens",
            "200",
            "--dims",
            "32",
            "--masks",
            "full,causal",
            "--heads",
            "2",
            "--min-time",
            "0",
            "--reps",
            "1",
            "--out",
        ])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let j: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("results.json")).unwrap()).unwrap();
    let rows = j["results"].as_array().unwrap();
    assert_eq!(rows.len(), 4); // 2 masks x 2 dtypes
    assert!(rows.iter().all(|r| r["status"] == "ok"
        && r["pass"] == "backward"
        && r["gflops"].as_f64().unwrap() > 0.0
        && r["det_gflops"].as_f64().unwrap() > 0.0
        && r["check_rel_err"].as_f64().unwrap() <= r["tolerance"].as_f64().unwrap()));
}

#[test]
fn bench_rejects_unknown_mask() {
    let o = bin().args(["bench", "--masks", "fulll"]).output().unwrap();
    fails_with(o, "invalid mask `fulll`");
}

#[test]
fn run_causal_matches_the_oracle() {
    check_run(DType::F32, "causal", 1e-4);
    check_run(DType::BF16, "causal", 2e-2);
}

/// An explicit block mask in the input file: head 0 block-diagonal over 16 x 16 tiles, head 1
/// its complement (whole tiles), batch-shared; checked against the oracle on the same predicate.
#[test]
fn run_with_a_block_mask_matches_the_oracle() {
    let (b, s, hq, d, tile): (usize, usize, usize, usize, usize) = (2, 40, 2, 16, 16);
    let tiles = s.div_ceil(tile);
    let mut x = inputs(DType::F32, b, s, s, hq, 1, d);
    let mut m = vec![0u8; hq * tiles * tiles];
    for qt in 0..tiles {
        for kt in 0..tiles {
            m[qt * tiles + kt] = (qt == kt) as u8;
            m[(tiles + qt) * tiles + kt] = (qt != kt) as u8;
        }
    }
    x.block_mask = Some((m, [1, hq, tiles, tiles]));
    let input = tmp("in-blocks.safetensors");
    let output = tmp("out-blocks.safetensors");
    write_inputs(&input, &x, true).unwrap();
    let o = run_args(&input, &output, &["--block-tile", "16"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (out, lse, _) = read_outputs(&output).unwrap();
    let allowed = |h: usize, i: usize, j: usize| (i / tile == j / tile) == (h == 0);
    let r = attention_f64(
        &x.q.view("q").unwrap(),
        &x.k.view("k").unwrap(),
        &x.v.view("v").unwrap(),
        &AttnParams::default(),
        &|_, h, i, j| allowed(h, i, j),
    )
    .unwrap();
    let (eo, el) = longattn::testing::compare(&out, &lse, &r);
    assert!(eo <= 1e-5 && el <= 1e-4, "out {eo}, lse {el}");
    // A wrong tile size gives a clear error naming the block mask.
    fails_with(
        run_args(&input, &output, &["--block-tile", "8", "--force"]),
        "block_mask",
    );
    // With an expression the block mask gates it (an external gate): `causal & blocks`, the
    // causal diagonal tiles exact.
    let o = run_args(
        &input,
        &output,
        &["--block-tile", "16", "--mask", "causal", "--force"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("`causal` & block_mask"),
        "{}",
        stderr(&o)
    );
    let (out, lse, _) = read_outputs(&output).unwrap();
    let r = attention_f64(
        &x.q.view("q").unwrap(),
        &x.k.view("k").unwrap(),
        &x.v.view("v").unwrap(),
        &AttnParams::default(),
        &|_, h, i, j| j <= i && allowed(h, i, j),
    )
    .unwrap();
    let (eo, el) = longattn::testing::compare(&out, &lse, &r);
    assert!(eo <= 1e-5 && el <= 1e-4, "gated: out {eo}, lse {el}");
}

/// `run --attention-map 64`: the output holds `map_mass` and `map_max` (f32 [B, Hq, query
/// blocks, key blocks]) equal to the oracle's pooled probabilities under the mask; the CUDA
/// backend and a block that is not a multiple of 64 are refused by name.
#[test]
fn run_writes_the_pooled_attention_map() {
    let (b, s, hq, d) = (2, 150, 2, 16);
    let x = inputs(DType::F32, b, s, s, hq, 1, d);
    let input = tmp("in-map.safetensors");
    let output = tmp("out-map.safetensors");
    write_inputs(&input, &x, true).unwrap();
    let o = run_args(
        &input,
        &output,
        &["--attention-map", "64", "--mask", "causal & window(90,0)"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let bytes = std::fs::read(&output).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (mass, max) = longattn::reference::attention_map_f64(
        &x.q.view("q").unwrap(),
        &x.k.view("k").unwrap(),
        &x.v.view("v").unwrap(),
        &AttnParams::default(),
        &|_, _, i, j| j <= i && i <= j + 90,
        64,
    )
    .unwrap();
    for (name, want) in [("map_mass", &mass), ("map_max", &max)] {
        let t = st.tensor(name).unwrap();
        assert_eq!(t.dtype(), StDtype::F32);
        assert_eq!(t.shape(), [b, hq, 3, 3]);
        let got: Vec<f32> = t
            .data()
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        for (g, w) in got.iter().zip(want.iter()) {
            assert!((*g as f64 - w).abs() <= 2e-5, "{name}: {g} vs {w}");
        }
    }
    fails_with(
        run_args(&input, &output, &["--attention-map", "100", "--force"]),
        "multiple of 64",
    );
    fails_with(
        run_args(
            &input,
            &output,
            &["--attention-map", "64", "--backend", "cuda", "--force"],
        ),
        // The Hopper forward writes the map on CUDA; here no driver (or, on a GPU, f32 inputs,
        // which the CUDA kernels refuse): an error that names CUDA.
        "CUDA",
    );
}

/// `run --sparse`: the output holds the selected `block_mask` (0 / 1 / 2) and tile sizes, and
/// `out` / `lse` equal the oracle on `mask & selected tiles` read back from that table.
#[test]
fn run_sparse_writes_its_selection_and_matches_the_oracle() {
    let (b, s, hq, d) = (2, 70, 4, 16);
    let x = inputs(DType::F32, b, s, s, hq, 2, d);
    let input = tmp("in-sparse.safetensors");
    let output = tmp("out-sparse.safetensors");
    write_inputs(&input, &x, true).unwrap();
    let spec = [
        "--sparse",
        "moba(block=16,topk=2,dense_below=0)",
        "--mask",
        "causal",
    ];
    let o = run_args(&input, &output, &spec);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("density"), "{}", stderr(&o));
    let bytes = std::fs::read(&output).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tiles = s.div_ceil(16);
    let table = st.tensor("block_mask").unwrap();
    assert_eq!(table.dtype(), StDtype::U8);
    assert_eq!(table.shape(), &[b, hq, tiles, tiles]);
    let table = table.data().to_vec();
    for name in ["block_tile_q", "block_tile_k"] {
        let t = st.tensor(name).unwrap();
        assert_eq!((t.dtype(), t.shape()), (StDtype::I32, &[1usize][..]));
        assert_eq!(t.data(), &16i32.to_le_bytes());
    }
    // Causal at 16 x 16 tiles: diagonal tiles partial (2), tiles below whole (1), above never.
    for (idx, &m) in table.iter().enumerate() {
        let (qt, kt) = ((idx / tiles) % tiles, idx % tiles);
        let want: &[u8] = match kt.cmp(&qt) {
            std::cmp::Ordering::Greater => &[0],
            std::cmp::Ordering::Equal => &[2],
            std::cmp::Ordering::Less => &[0, 1],
        };
        assert!(want.contains(&m), "tile ({qt}, {kt}) marked {m}");
    }
    assert!(
        table.contains(&0) && table.contains(&1),
        "nothing skipped or nothing whole"
    );
    let (out, lse, _) = read_outputs(&output).unwrap();
    let r = attention_f64(
        &x.q.view("q").unwrap(),
        &x.k.view("k").unwrap(),
        &x.v.view("v").unwrap(),
        &AttnParams::default(),
        &|bb, h, i, j| j <= i && table[((bb * hq + h) * tiles + i / 16) * tiles + j / 16] != 0,
    )
    .unwrap();
    let (eo, el) = longattn::testing::compare(&out, &lse, &r);
    assert!(eo <= 1e-5 && el <= 1e-4, "out {eo}, lse {el}");
    // With the default dense_below (1024) the 70 keys fall back to every tile of the mask.
    let dflt = [
        "--sparse",
        "moba(block=16,topk=2)",
        "--mask",
        "causal",
        "--force",
    ];
    let o = run_args(&input, &output, &dflt);
    assert!(stderr(&o).contains("dense fallback"), "{}", stderr(&o));
    let bytes = std::fs::read(&output).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let all = st.tensor("block_mask").unwrap().data().to_vec();
    for (idx, &m) in all.iter().enumerate() {
        let (qt, kt) = ((idx / tiles) % tiles, idx % tiles);
        assert_eq!(
            m,
            (kt <= qt) as u8 * (1 + (kt == qt) as u8),
            "tile ({qt}, {kt})"
        );
    }
    // Skip-softmax reports what it dropped (tested groups, at least); without it, nothing.
    let o = run_args(
        &input,
        &output,
        &[
            "--sparse",
            "skip(factor=7,dense_below=0)",
            "--mask",
            "causal",
            "--force",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("skip-softmax: "), "{}", stderr(&o));
    assert!(!stderr(&run_args(&input, &output, &dflt)).contains("skip-softmax"));
    // Bad specs are clear errors.
    fails_with(
        run_args(&input, &output, &["--sparse", "dense(k=1)", "--force"]),
        "unknown method `dense`",
    );
    fails_with(
        run_args(
            &input,
            &output,
            &["--sparse", "topmass(gamma=2)", "--force"],
        ),
        "`gamma` must be in (0, 1]",
    );
}

/// `run --sparse` with the file's document ids: the selection is the library's per-document
/// one (`sparse::select` under the same bound mask); a mask whose pairs cross documents is
/// refused by name.
#[test]
fn run_sparse_selects_per_document() {
    use longattn::mask::{DocIds, MaskExpr, MaskShape};
    let (b, s, hq, hk, d) = (2, 150, 4, 2, 16);
    let rnd =
        |shape: &[usize], seed| longattn::testing::random_tensor(DType::F32, shape, 1.0, seed);
    let lens: [&[usize]; 2] = [&[1, 63, 65, 21], &[113, 7, 30]];
    let ids: Vec<i32> = lens
        .iter()
        .flat_map(|row| {
            row.iter()
                .enumerate()
                .flat_map(|(id, &n)| std::iter::repeat_n(id as i32, n))
        })
        .collect();
    let x = Inputs {
        q: rnd(&[b, s, hq, d], 21),
        k: rnd(&[b, s, hk, d], 22),
        v: rnd(&[b, s, hk, d], 23),
        q_doc: Some(ids.clone()),
        k_doc: Some(ids.clone()),
        block_mask: None,
    };
    let input = tmp("in-sparse-docs.safetensors");
    let output = tmp("out-sparse-docs.safetensors");
    write_inputs(&input, &x, true).unwrap();
    let text = "vertical_slash(v=4,s=2,block=16,last=16,sink=1,local=4,dense_below=0)";
    let mask = "causal & document";
    let o = run_args(&input, &output, &["--sparse", text, "--mask", mask]);
    assert!(o.status.success(), "{}", stderr(&o));
    let bytes = std::fs::read(&output).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let got = st.tensor("block_mask").unwrap().data().to_vec();
    let bound = MaskExpr::parse(mask)
        .unwrap()
        .bind(
            MaskShape {
                batch: b,
                sq: s,
                sk: s,
            },
            Some(DocIds {
                q: ids.clone(),
                k: ids,
            }),
        )
        .unwrap();
    let spec = longattn::SparseSpec::parse(text).unwrap();
    let (q, k) = (x.q.view("q").unwrap(), x.k.view("k").unwrap());
    let sel = longattn::sparse::select(
        &q,
        &k,
        &AttnParams::default(),
        &spec,
        longattn::MaskSpec::Expr(&bound),
    )
    .unwrap();
    assert_eq!(got, sel.block_mask());
    assert!(sel.report.density() < 1.0);
    fails_with(
        run_args(
            &input,
            &output,
            &["--sparse", text, "--mask", "causal | document", "--force"],
        ),
        "other than as a conjunct",
    );
}

/// An input file with `do` (seeded random, the shape of out).
fn backward_input(
    name: &str,
    dtype: DType,
    causal_sq_sk: (usize, usize),
) -> (PathBuf, Inputs, Tensor) {
    let (sq, sk) = causal_sq_sk;
    let x = inputs(dtype, 2, sq, sk, 4, 2, 16);
    let dout = longattn::testing::random_tensor(dtype, &[2, sq, 4, 16], 1.0, 9);
    let t = |name: &str, t: &Tensor| {
        let dt = match t.dtype() {
            DType::F32 => StDtype::F32,
            DType::BF16 => StDtype::BF16,
            DType::F16 => StDtype::F16,
        };
        (
            name.to_string(),
            dt,
            t.shape.clone(),
            t.data.bytes().to_vec(),
        )
    };
    let ts = [t("q", &x.q), t("k", &x.k), t("v", &x.v), t("do", &dout)];
    let ts: Vec<(&str, StDtype, Vec<usize>, Vec<u8>)> = ts
        .iter()
        .map(|(n, d, s, b)| (n.as_str(), *d, s.clone(), b.clone()))
        .collect();
    (raw_file(name, &ts), x, dout)
}

#[test]
fn run_backward_matches_the_gradient_oracle() {
    for (dtype, det) in [(DType::F32, false), (DType::BF16, true)] {
        let (input, x, dout) =
            backward_input(&format!("bwd-in-{dtype}.safetensors"), dtype, (37, 50));
        let output = tmp(&format!("bwd-out-{dtype}.safetensors"));
        let mut extra = vec!["--mask", "causal", "--threads", "2", "--backward"];
        if det {
            extra.push("--deterministic");
        }
        let o = run_args(&input, &output, &extra);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(
            read_outputs(&output).is_ok(),
            "out and lse are still written"
        );
        let g = longattn::io::read_grads(&output).unwrap();
        let want = longattn::reference::attention_backward_f64(
            &x.q.view("q").unwrap(),
            &x.k.view("k").unwrap(),
            &x.v.view("v").unwrap(),
            &dout.view("do").unwrap(),
            &AttnParams::default(),
            &|_, _, i, j| j + 37 <= i + 50, // causal, bottom-right aligned
        )
        .unwrap();
        let tol = longattn::testing::grad_tolerance(dtype);
        for (name, got, r) in [
            ("dq", &g.dq, &want.dq),
            ("dk", &g.dk, &want.dk),
            ("dv", &g.dv, &want.dv),
        ] {
            assert_eq!(got.dtype(), dtype);
            let e = longattn::testing::compare_grad(got, r, 0.0);
            assert!(e <= tol, "{dtype} {name}: error {e:.3e}");
        }
    }
}

#[test]
fn run_backward_bad_do() {
    // Missing `do`.
    let x = inputs(DType::F32, 1, 8, 8, 2, 1, 16);
    let input = tmp("bwd-missing.safetensors");
    write_inputs(&input, &x, true).unwrap();
    let o = run_args(&input, &tmp("bwd-missing-out.safetensors"), &["--backward"]);
    fails_with(o, "missing tensor `do`");
    // `do` of the wrong shape.
    let dout = longattn::testing::random_tensor(DType::F32, &[1, 8, 2, 15], 1.0, 1);
    let ts: Vec<(&str, StDtype, Vec<usize>, Vec<u8>)> =
        [("q", &x.q), ("k", &x.k), ("v", &x.v), ("do", &dout)]
            .iter()
            .map(|(n, t)| (*n, StDtype::F32, t.shape.clone(), t.data.bytes().to_vec()))
            .collect();
    let input = raw_file("bwd-shape.safetensors", &ts);
    let o = run_args(&input, &tmp("bwd-shape-out.safetensors"), &["--backward"]);
    fails_with(
        o,
        "tensor `do` has shape [1, 8, 2, 15], expected [1, 8, 2, 16]",
    );
    // NaN in `do`.
    let mut vals = vec![0.5f32; 8 * 2 * 16];
    vals[3] = f32::NAN;
    let dn = Tensor::new(Buffer::from_f32(DType::F32, &vals), vec![1, 8, 2, 16]).unwrap();
    let ts: Vec<(&str, StDtype, Vec<usize>, Vec<u8>)> =
        [("q", &x.q), ("k", &x.k), ("v", &x.v), ("do", &dn)]
            .iter()
            .map(|(n, t)| (*n, StDtype::F32, t.shape.clone(), t.data.bytes().to_vec()))
            .collect();
    let input = raw_file("bwd-nan.safetensors", &ts);
    let o = run_args(&input, &tmp("bwd-nan-out.safetensors"), &["--backward"]);
    fails_with(o, "tensor `do` holds a non-finite value");
    // --deterministic without --backward.
    let o = run_args(
        &input,
        &tmp("bwd-det-out.safetensors"),
        &["--deterministic"],
    );
    assert!(!o.status.success());
}

fn f32_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn read_f32(path: &PathBuf, name: &str) -> (Vec<f32>, Vec<usize>) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), StDtype::F32, "{name}");
    let x = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (x, t.shape().to_vec())
}

/// `run --linear simple_gla --backward` with varlen, an initial state and a final-state gradient:
/// out and state against the f64 oracle, every gradient against the oracle's backward.
#[test]
fn run_linear_matches_the_oracle() {
    use longattn::linear::{reference, Core, Decay};
    let (t, h, hk, d) = (45usize, 4usize, 2usize, 8usize);
    let (q, k, v) = (
        det(t * h * d, 0.1),
        det(t * hk * d, 0.2),
        det(t * hk * d, 0.3),
    );
    let g: Vec<f32> = (0..t * h)
        .map(|i| -0.01 - 0.2 * ((i * 7 % 13) as f32 / 13.0))
        .collect();
    let cu = [0i32, 20, 20, 45];
    let s0 = det(3 * h * d * d, 0.4);
    let dout = det(t * h * d, 0.5);
    let dstate = det(3 * h * d * d, 0.6);
    let cu_bytes: Vec<u8> = cu.iter().flat_map(|v| v.to_le_bytes()).collect();
    let input = raw_file(
        "linear-in.safetensors",
        &[
            ("q", StDtype::F32, vec![1, t, h, d], f32_bytes(&q)),
            ("k", StDtype::F32, vec![1, t, hk, d], f32_bytes(&k)),
            ("v", StDtype::F32, vec![1, t, hk, d], f32_bytes(&v)),
            ("g", StDtype::F32, vec![1, t, h], f32_bytes(&g)),
            ("cu_seqlens", StDtype::I32, vec![4], cu_bytes),
            (
                "initial_state",
                StDtype::F32,
                vec![3, h, d, d],
                f32_bytes(&s0),
            ),
            ("do", StDtype::F32, vec![1, t, h, d], f32_bytes(&dout)),
            (
                "d_state",
                StDtype::F32,
                vec![3, h, d, d],
                f32_bytes(&dstate),
            ),
        ],
    );
    let output = tmp("linear-out.safetensors");
    let o = run_args(
        &input,
        &output,
        &[
            "--linear",
            "simple_gla(chunk=16)",
            "--backward",
            "--threads",
            "2",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    fn view(x: &[f32], t: usize, hh: usize, d: usize) -> longattn::TensorView<'_> {
        longattn::TensorView::contiguous(x, [1, t, hh, d]).unwrap()
    }
    let core = Core {
        q: view(&q, t, h, d),
        k: view(&k, t, hk, d),
        v: view(&v, t, hk, d),
        decay: Decay::Token(&g),
        scale: 1.0 / (d as f32).sqrt(),
        initial_state: Some(&s0),
        cu_seqlens: Some(&cu),
    };
    let want = reference::forward_f64(&core).unwrap();
    let d64 = |x: &[f32]| -> Vec<f64> { x.iter().map(|&a| a as f64).collect() };
    let grads = reference::backward_f64(&core, &d64(&dout), Some(&d64(&dstate))).unwrap();
    let close = |name: &str, want: &[f64], shape: Vec<usize>| {
        let (got, s) = read_f32(&output, name);
        assert_eq!(s, shape, "{name} shape");
        let m = want.iter().fold(1e-30f64, |a, &x| a.max(x.abs()));
        let e = got
            .iter()
            .zip(want)
            .fold(0.0f64, |a, (&x, &y)| a.max((x as f64 - y).abs()));
        assert!(e / m <= 2e-5, "{name}: error {e} / {m}");
    };
    close("out", &want.out, vec![1, t, h, d]);
    close("state", &want.state, vec![3, h, d, d]);
    close("dq", &grads.dq, vec![1, t, h, d]);
    close("dk", &grads.dk, vec![1, t, hk, d]);
    close("dv", &grads.dv, vec![1, t, hk, d]);
    close("dg", grads.dg.as_ref().unwrap(), vec![1, t, h]);
    close("d_initial_state", &grads.d_initial_state, vec![3, h, d, d]);
}

/// `run --linear` errors: an unknown spec atom and a missing gate name the problem, no panic.
#[test]
fn run_linear_errors() {
    let x = inputs(DType::F32, 1, 9, 9, 2, 2, 4);
    let input = tmp("linear-err.safetensors");
    write_inputs(&input, &x, true).unwrap();
    fails_with(
        run_args(&input, &tmp("le1.safetensors"), &["--linear", "softmax"]),
        "unknown atom `softmax`",
    );
    fails_with(
        run_args(&input, &tmp("le2.safetensors"), &["--linear", "gla"]),
        "needs the log decay `g`",
    );
    fails_with(
        run_args(
            &input,
            &tmp("le3.safetensors"),
            &["--linear", "elu", "--backward"],
        ),
        "`do`",
    );
    let o = run_args(
        &input,
        &tmp("le4.safetensors"),
        &["--linear", "elu+normalized"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        read_f32(&tmp_keep("le4.safetensors"), "state").1,
        vec![1, 2, 4, 5]
    );
}

/// The path of a temporary file without removing it.
fn tmp_keep(name: &str) -> PathBuf {
    std::env::temp_dir()
        .join(format!("longattn-cli-{}", std::process::id()))
        .join(name)
}

/// `bench --linear` prints a row per configuration with its check against the oracle.
#[test]
fn bench_linear_prints_rows() {
    let o = bin()
        .args([
            "bench",
            "--linear",
            "simple_gla",
            "--lens",
            "100",
            "--dims",
            "16",
            "--heads",
            "2",
            "--reps",
            "1",
            "--min-time",
            "0",
            "--threads",
            "2",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(s.contains("matmul ceiling"), "{s}");
    let row = s.lines().last().unwrap();
    let check: f64 = row.split_whitespace().last().unwrap().parse().unwrap();
    assert!(check <= 2e-5, "{row}");
}

/// A `cp run` input: seeded random q [2, n, hq, 16], k / v [2, n, hk, 16], do, and document ids
/// (lengths 9, 4, 13, ... cycling) in every batch row.
fn cp_input(name: &str, n: usize, hq: usize, hk: usize) -> PathBuf {
    let t = |shape: Vec<usize>, seed: u64| {
        let x = longattn::testing::random_tensor(DType::F32, &shape, 1.0, seed);
        (shape, x.data.bytes().to_vec())
    };
    let (q, k, v, dout) = (
        t(vec![2, n, hq, 16], 31),
        t(vec![2, n, hk, 16], 32),
        t(vec![2, n, hk, 16], 33),
        t(vec![2, n, hq, 16], 34),
    );
    let lens = [9, 4, 13];
    let ids: Vec<i32> = (0..2 * n)
        .map(|i| {
            let (mut pos, mut d) = (i % n, 0);
            while pos >= lens[d % 3] {
                pos -= lens[d % 3];
                d += 1;
            }
            d as i32
        })
        .collect();
    let ids: Vec<u8> = ids.iter().flat_map(|x| x.to_le_bytes()).collect();
    raw_file(
        name,
        &[
            ("q", StDtype::F32, q.0, q.1),
            ("k", StDtype::F32, k.0, k.1),
            ("v", StDtype::F32, v.0, v.1),
            ("do", StDtype::F32, dout.0, dout.1),
            ("q_doc", StDtype::I32, vec![2, n], ids.clone()),
            ("k_doc", StDtype::I32, vec![2, n], ids),
        ],
    )
}

fn cp_run(input: &PathBuf, output: &PathBuf, extra: &[&str]) -> Output {
    bin()
        .args(["cp", "run", "--input"])
        .arg(input)
        .arg("--output")
        .arg(output)
        .args(extra)
        .output()
        .unwrap()
}

/// Largest |got - want| relative to max(1, max |want|).
fn rel_diff(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(1f32, |m, x| m.max(x.abs()));
    got.iter()
        .zip(want)
        .map(|(g, w)| if g == w { 0.0 } else { (g - w).abs() / scale })
        .fold(
            0f32,
            |m, e| if e.is_nan() { f32::INFINITY } else { m.max(e) },
        )
}

/// `cp run --backward` over P = 1, 2, 3 ranks writes what single-rank `run --backward` writes
/// (out, lse, dq, dk, dv) for three masks and every scheme (Ulysses where the heads divide; USP
/// with the cost model's U and with U forced by --usp).
#[test]
fn cp_run_matches_single_rank_run() {
    let n = 37;
    let input = cp_input("cp-in.safetensors", n, 6, 2);
    for mask in [
        "causal",
        "causal & window(5,0) | sinks(2)",
        "causal & document",
    ] {
        let single = tmp("cp-single.safetensors");
        let o = run_args(
            &input,
            &single,
            &["--mask", mask, "--backward", "--threads", "1"],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let names = ["out", "lse", "dq", "dk", "dv"];
        let want: Vec<Vec<f32>> = names.iter().map(|x| read_f32(&single, x).0).collect();
        for p in ["1", "2", "3"] {
            // U = P at two ranks, U = 1 (the ring through the views) otherwise.
            let forced = if p == "2" { "2" } else { "1" };
            for scheme in [
                "ring",
                "zigzag",
                "allgather",
                "ulysses",
                "passq",
                "usp",
                "usp-forced",
                "auto",
            ] {
                let output = tmp("cp-out.safetensors");
                let mut args = vec!["--mask", mask, "--backward", "--ranks", p, "--scheme"];
                match scheme {
                    "usp-forced" => args.extend(["usp", "--usp", forced]),
                    s => args.push(s),
                }
                let o = cp_run(&input, &output, &args);
                assert!(o.status.success(), "{mask} {p} {scheme}: {}", stderr(&o));
                for (name, w) in names.iter().zip(&want) {
                    let (got, _) = read_f32(&output, name);
                    let e = rel_diff(&got, w);
                    assert!(e <= 1e-5, "{mask}, P {p}, {scheme}: {name} differs by {e}");
                }
                if scheme == "auto" {
                    assert!(stderr(&o).contains("cost model: ring"), "{}", stderr(&o));
                }
                if scheme == "usp-forced" {
                    let said = format!("usp(U={forced}) over {p} ranks");
                    assert!(stderr(&o).contains(&said), "{}", stderr(&o));
                }
            }
        }
    }
}

#[test]
fn cp_run_bad_inputs_are_clear_errors() {
    let input = cp_input("cp-bad-in.safetensors", 20, 3, 1);
    let out = tmp("cp-bad-out.safetensors");
    fails_with(
        cp_run(&input, &out, &["--ranks", "0"]),
        "--ranks 0: context parallelism needs at least one rank",
    );
    fails_with(
        cp_run(&input, &out, &["--ranks", "2", "--scheme", "spiral"]),
        "invalid value 'spiral' for '--scheme",
    );
    fails_with(
        cp_run(&input, &out, &["--ranks", "2", "--scheme", "ulysses"]),
        "3 query heads cannot be split over 2 ranks",
    );
    fails_with(
        cp_run(
            &input,
            &out,
            &["--ranks", "2", "--scheme", "usp", "--usp", "2"],
        ),
        "usp: 3 query heads cannot be split over 2 ranks",
    );
    fails_with(
        cp_run(
            &input,
            &out,
            &["--ranks", "2", "--scheme", "usp", "--usp", "4"],
        ),
        "--usp 4: the Ulysses degree U must divide the 2 ranks",
    );
    fails_with(
        cp_run(
            &input,
            &out,
            &["--ranks", "2", "--scheme", "ring", "--usp", "2"],
        ),
        "--usp 2 sets USP's Ulysses degree: it goes with --scheme usp (or auto), not ring",
    );
    fails_with(
        cp_run(&input, &out, &["--ranks", "2", "--transport", "nccl"]),
        "--transport nccl: not built yet",
    );
    // The loopback runs the CUDA kernels: f32 input is refused before any GPU is looked for.
    fails_with(
        cp_run(&input, &out, &["--ranks", "2", "--transport", "loopback"]),
        "dtype f32: --transport loopback runs the CUDA kernels, which take bf16 or f16",
    );
    fails_with(
        cp_run(
            &input,
            &out,
            &["--ranks", "2", "--transport", "loopback", "--backward"],
        ),
        "--transport loopback runs the forward only",
    );
    fails_with(
        cp_run(&input, &out, &["--ranks", "11", "--scheme", "ring"]),
        "20 tokens cannot be cut into 2 chunks for each of 11 ranks",
    );
    // Queries and keys of different lengths.
    let x = inputs(DType::F32, 1, 8, 12, 2, 1, 16);
    let uneven = tmp("cp-uneven.safetensors");
    write_inputs(&uneven, &x, true).unwrap();
    fails_with(
        cp_run(&uneven, &out, &["--ranks", "2"]),
        "q has 8 tokens and k / v 12",
    );
}

/// `cp decode` (tree decode) writes what single-rank `run` writes, for near-equal shards and for
/// uneven shards with an empty one, under masks with Sq < Sk; bad shard lists are clear errors.
#[test]
fn cp_decode_matches_single_rank_run() {
    let x = inputs(DType::F32, 2, 5, 77, 4, 2, 16);
    let input = tmp("cp-decode-in.safetensors");
    write_inputs(&input, &x, true).unwrap();
    let decode = |output: &PathBuf, extra: &[&str]| {
        bin()
            .args(["cp", "decode", "--input"])
            .arg(&input)
            .arg("--output")
            .arg(output)
            .args(extra)
            .output()
            .unwrap()
    };
    for mask in ["full", "causal & window(20,0) | sinks(3)"] {
        let single = tmp("cp-decode-single.safetensors");
        let o = run_args(&input, &single, &["--mask", mask, "--threads", "1"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let want: Vec<Vec<f32>> = ["out", "lse"]
            .iter()
            .map(|n| read_f32(&single, n).0)
            .collect();
        for extra in [
            &["--ranks", "1"][..],
            &["--ranks", "4"],
            &["--ranks", "3", "--shards", "40,0,37"],
        ] {
            let output = tmp("cp-decode-out.safetensors");
            let mut args = vec!["--mask", mask, "--force"];
            args.extend(extra);
            let o = decode(&output, &args);
            assert!(o.status.success(), "{mask} {extra:?}: {}", stderr(&o));
            assert!(stderr(&o).contains("tree decode over"), "{}", stderr(&o));
            for (name, w) in ["out", "lse"].iter().zip(&want) {
                let e = rel_diff(&read_f32(&output, name).0, w);
                assert!(e <= 1e-5, "{mask} {extra:?}: {name} differs by {e}");
            }
        }
    }
    let out = tmp("cp-decode-bad.safetensors");
    fails_with(
        decode(&out, &["--ranks", "2", "--shards", "40,30", "--force"]),
        "--shards gives 2 ranks 70 keys; expected --ranks 2 shards adding up to the 77 keys",
    );
    fails_with(
        decode(&out, &["--ranks", "2", "--shards", "40,x", "--force"]),
        "`x` is not a length",
    );
    fails_with(
        decode(&out, &["--ranks", "0"]),
        "--ranks 0: tree decode needs at least one rank",
    );
}

/// `bench --sparse`: one row per spec against the dense forward, the skip share for skip specs;
/// unknown specs, a GPU backend and several masks are refused by name.
#[test]
fn bench_sparse_reports_every_spec_and_refuses_bad_input() {
    let o = bin()
        .args([
            "bench",
            "--sparse",
            "topmass(gamma=0.9,block=64,dense_below=0);skip(factor=10,dense_below=0)",
            "--lens",
            "1k",
            "--dims",
            "32",
            "--heads",
            "2",
            "--min-time",
            "0.01",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let rows: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("random n 1k D 32"))
        .collect();
    assert_eq!(rows.len(), 2, "{out}");
    assert!(rows[0].contains("topmass(gamma=0.9"), "{out}");
    // The skip row reports the share of groups dropped (a percentage), the topmass row none.
    assert!(
        rows[1].contains("skip(factor=10") && rows[1].trim_end().ends_with('%'),
        "{out}"
    );
    assert!(rows[0].trim_end().ends_with('-'), "{out}");
    fails_with(
        bin()
            .args(["bench", "--sparse", "bogus(x=1)"])
            .output()
            .unwrap(),
        "unknown method `bogus`",
    );
    fails_with(
        bin()
            .args(["bench", "--sparse", "topmass", "--backend", "cuda"])
            .output()
            .unwrap(),
        "no CUDA estimator",
    );
    fails_with(
        bin()
            .args(["bench", "--sparse", "topmass", "--backend", "tpu"])
            .output()
            .unwrap(),
        "runs on `cpu` or `cuda`",
    );
    fails_with(
        bin()
            .args(["bench", "--sparse", "topmass", "--masks", "causal,full"])
            .output()
            .unwrap(),
        "one mask expression",
    );
}

/// Starts `cp run --transport tcp` as `world` processes with torchrun's environment (rank r's
/// extra arguments from `extra(r)`); returns each rank's output, in rank order.
fn cp_run_tcp(
    input: &PathBuf,
    output: &PathBuf,
    world: usize,
    extra: impl Fn(usize) -> Vec<String>,
) -> Vec<Output> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let children: Vec<_> = (0..world)
        .map(|r| {
            bin()
                .args(["cp", "run", "--transport", "tcp", "--input"])
                .arg(input)
                .arg("--output")
                .arg(output)
                .args(extra(r))
                .env("RANK", r.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("LOCAL_RANK", r.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect()
}

/// Ranks as processes over TCP (the environment torchrun sets) write what single-rank `run`
/// writes, forward and backward, for P = 2 and 3.
#[test]
fn cp_run_over_tcp_processes_matches_single_rank_run() {
    let input = cp_input("cp-tcp-in.safetensors", 41, 6, 2);
    let mask = "causal & window(9,0) | sinks(2)";
    let single = tmp("cp-tcp-single.safetensors");
    let o = run_args(
        &input,
        &single,
        &["--mask", mask, "--backward", "--threads", "1"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let names = ["out", "lse", "dq", "dk", "dv"];
    let want: Vec<Vec<f32>> = names.iter().map(|x| read_f32(&single, x).0).collect();
    for (world, scheme) in [(2, "ring"), (3, "allgather"), (3, "zigzag")] {
        let output = tmp("cp-tcp-out.safetensors");
        let outs = cp_run_tcp(&input, &output, world, |_| {
            [
                "--mask",
                mask,
                "--backward",
                "--scheme",
                scheme,
                "--timeout",
                "30",
            ]
            .map(String::from)
            .to_vec()
        });
        for (r, o) in outs.iter().enumerate() {
            assert!(o.status.success(), "P {world} rank {r}: {}", stderr(o));
        }
        assert!(
            stderr(&outs[0]).contains("(processes, tcp)"),
            "{}",
            stderr(&outs[0])
        );
        for (name, w) in names.iter().zip(&want) {
            let (got, _) = read_f32(&output, name);
            let e = rel_diff(&got, w);
            assert!(e <= 1e-5, "P {world} {scheme}: {name} differs by {e}");
        }
    }
}

/// A rank given other inputs is refused on every rank by the rendezvous; a rank that never
/// starts is named on the others within the timeout; --ranks must match WORLD_SIZE.
#[test]
fn cp_run_over_tcp_refuses_mismatched_and_missing_ranks() {
    let input = cp_input("cp-tcp-bad-in.safetensors", 30, 3, 1);
    let out = tmp("cp-tcp-bad-out.safetensors");
    let outs = cp_run_tcp(&input, &out, 2, |r| {
        let mask = if r == 0 { "causal" } else { "full" };
        ["--mask", mask, "--timeout", "20"]
            .map(String::from)
            .to_vec()
    });
    for o in &outs {
        assert!(!o.status.success());
        assert!(
            stderr(o).contains("job differs from rank 0's"),
            "{}",
            stderr(o)
        );
    }
    // World 3, only ranks 0 and 1 started (rank 2's process exits at once: --ranks is wrong).
    let t0 = std::time::Instant::now();
    let outs = cp_run_tcp(&input, &out, 3, |r| {
        let mut v: Vec<String> = ["--mask", "causal", "--timeout", "2"]
            .map(String::from)
            .to_vec();
        if r == 2 {
            v.extend(["--ranks", "5"].map(String::from));
        }
        v
    });
    assert!(t0.elapsed() < std::time::Duration::from_secs(20));
    assert!(
        stderr(&outs[2]).contains("--ranks 5 but the job has WORLD_SIZE=3"),
        "{}",
        stderr(&outs[2])
    );
    for o in &outs[..2] {
        assert!(!o.status.success());
        assert!(
            stderr(o).contains("rank(s) [2] did not join"),
            "{}",
            stderr(o)
        );
    }
    // No environment: a clear error naming the variable.
    let o = bin()
        .args(["cp", "run", "--transport", "tcp", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(&out)
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("RANK is not set"), "{}", stderr(&o));
}

/// `selftest --jobs`: bad counts and shares are refused by name; without a GPU every share
/// fails to open the device and the merged run says so and fails (never a silent pass).
#[test]
fn selftest_jobs_refuse_bad_input_and_fail_without_a_gpu() {
    fails_with(
        bin().args(["selftest", "--jobs", "0"]).output().unwrap(),
        "--jobs must be >= 1",
    );
    fails_with(
        bin().args(["selftest", "--shard", "3/2"]).output().unwrap(),
        "--shard 3/2: expected K/N with K < N",
    );
    if longattn::cuda::CudaDevice::open(0).is_ok() {
        eprintln!("skipped: a CUDA device is present (the GPU-less path is what this checks)");
        return;
    }
    let o = bin().args(["selftest", "--jobs", "2"]).output().unwrap();
    assert!(!o.status.success());
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        out.contains("process 0") && out.contains("wrote no results"),
        "{out}"
    );
    // The share's own error, shown with its number.
    assert!(out.contains("[0] error: cuda"), "{out}");
    assert!(stderr(&o).contains("2 process(es) broke"), "{}", stderr(&o));
}

/// `bench --sandwich` belongs to the dense GPU suite with its peers: elsewhere, or without
/// `--compare torch`, a clear error before any device is opened.
#[test]
fn bench_sandwich_needs_the_gpu_suite_with_peers() {
    for (args, want) in [
        (vec!["bench", "--sandwich"], "dense GPU suite"),
        (
            vec![
                "bench",
                "--backend",
                "cuda",
                "--sandwich",
                "--sparse",
                "skip(factor=1)",
            ],
            "dense GPU suite",
        ),
        (
            vec!["bench", "--backend", "cuda", "--sandwich"],
            "add --compare torch",
        ),
    ] {
        let o = bin().args(&args).output().unwrap();
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(stderr(&o).contains(want), "{args:?}: {}", stderr(&o));
    }
}

/// `bench --sustain S` takes seconds from 0 to 600 and belongs to the dense GPU suite: out of
/// range, not a number, or elsewhere, a clear error before any device is opened.
#[test]
fn bench_sustain_is_checked_before_any_device() {
    for args in [
        vec!["bench", "--sustain", "2"],
        vec!["bench", "--backend", "cuda", "--sustain", "700"],
        vec!["bench", "--backend", "cuda", "--sustain", "nan"],
        vec!["bench", "--backend", "cuda", "--sustain", "inf"],
        vec![
            "bench",
            "--backend",
            "cuda",
            "--sustain",
            "1",
            "--linear",
            "simple_gla",
        ],
    ] {
        let o = bin().args(&args).output().unwrap();
        assert!(!o.status.success(), "{args:?} succeeded");
        let e = stderr(&o);
        assert!(
            e.contains("--sustain") && e.contains("seconds from 0 to 600"),
            "{args:?}: {e}"
        );
    }
}
