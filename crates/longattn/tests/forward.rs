//! The CPU forward kernel against the f64 oracle: every instruction-set path, every dtype,
//! awkward sizes, decode shapes, Sq != Sk, GQA/MQA, Dv != D, soft-cap, strided views, schedules
//! with Partial tiles, fully masked rows, explicit block masks, and bad input.
use longattn::cpu::Isa;
use longattn::mask::BlockSchedule;
use longattn::reference::attention_f64;
use longattn::testing::{
    brute_force_schedule, compare, out_tolerance, random_tensor, FnMask, AWKWARD_SIZES,
    LSE_TOLERANCE,
};
use longattn::{forward, AttnParams, DType, MaskSpec, TensorView};

#[derive(Clone, Copy, Debug)]
struct Case {
    batch: usize,
    sq: usize,
    sk: usize,
    hq: usize,
    hk: usize,
    d: usize,
    dv: usize,
    softcap: Option<f32>,
}

impl Case {
    fn new(sq: usize, sk: usize, d: usize) -> Case {
        Case {
            batch: 1,
            sq,
            sk,
            hq: 2,
            hk: 1,
            d,
            dv: d,
            softcap: None,
        }
    }
}

fn isas() -> Vec<Isa> {
    Isa::ALL.iter().copied().filter(|i| i.available()).collect()
}

/// Runs one case with a predicate mask (None = full) on every ISA and compares with the oracle.
fn check(
    c: Case,
    dtype: DType,
    mask: Option<&(dyn Fn(usize, usize, usize) -> bool + Sync)>,
    seed: u64,
) {
    let q = random_tensor(dtype, &[c.batch, c.sq, c.hq, c.d], 1.0, seed);
    let k = random_tensor(dtype, &[c.batch, c.sk, c.hk, c.d], 1.0, seed + 1);
    let v = random_tensor(dtype, &[c.batch, c.sk, c.hk, c.dv], 1.0, seed + 2);
    let (qv, kv, vv) = (
        q.view("q").unwrap(),
        k.view("k").unwrap(),
        v.view("v").unwrap(),
    );
    let params = AttnParams {
        softcap: c.softcap,
        ..Default::default()
    };
    let reference = match mask {
        None => attention_f64(&qv, &kv, &vv, &params, &|_, _, _, _| true).unwrap(),
        Some(f) => attention_f64(&qv, &kv, &vv, &params, &|b, _, i, j| f(b, i, j)).unwrap(),
    };
    let sched = mask.map(|f| brute_force_schedule(64, 64, c.batch, c.sq, c.sk, f).unwrap());
    let rows = mask.map(FnMask);
    for isa in isas() {
        let p = AttnParams {
            isa: Some(isa),
            ..params.clone()
        };
        let spec = match (&sched, &rows) {
            (Some(s), Some(r)) => MaskSpec::Schedule {
                schedule: s,
                rows: Some(r),
            },
            _ => MaskSpec::Full,
        };
        let got = forward(&qv, &kv, &vv, &p, spec).unwrap();
        assert_eq!(got.out.shape, vec![c.batch, c.sq, c.hq, c.dv]);
        assert_eq!(got.out.dtype(), dtype);
        let (eo, el) = compare(&got.out, &got.lse, &reference);
        assert!(
            eo <= out_tolerance(dtype) && el <= LSE_TOLERANCE,
            "{isa:?} {dtype} {c:?}: out error {eo:.3e} (tol {:.1e}), lse error {el:.3e}",
            out_tolerance(dtype)
        );
    }
}

const DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

#[test]
fn awkward_lengths_full_all_paths() {
    for (n, &s) in AWKWARD_SIZES.iter().enumerate().filter(|(_, &s)| s <= 1023) {
        for dt in DTYPES {
            check(Case::new(s, s, 64), dt, None, 10 + n as u64);
        }
    }
}

#[test]
fn long_4224_causal() {
    let causal = |_: usize, i: usize, j: usize| j <= i;
    let mut c = Case::new(4224, 4224, 64);
    c.hq = 1;
    check(c, DType::BF16, Some(&causal), 7);
}

#[test]
fn decode_and_unequal_lengths() {
    for (sq, sk) in [
        (1, 1),
        (1, 7),
        (1, 1023),
        (7, 113),
        (65, 63),
        (113, 7),
        (63, 65),
    ] {
        for dt in DTYPES {
            check(Case::new(sq, sk, 128), dt, None, sq as u64 * 31 + sk as u64);
        }
    }
}

#[test]
fn head_dims_and_value_dims() {
    for (d, dv) in [
        (1, 1),
        (7, 5),
        (16, 16),
        (64, 32),
        (80, 80),
        (96, 128),
        (128, 64),
        (256, 256),
        (33, 200),
    ] {
        for dt in DTYPES {
            let mut c = Case::new(65, 113, d);
            c.dv = dv;
            check(c, dt, None, d as u64 * 7 + dv as u64);
        }
    }
}

#[test]
fn gqa_mqa_and_batches() {
    for (hq, hk) in [(6, 2), (4, 1), (3, 3)] {
        for dt in [DType::F32, DType::BF16] {
            let mut c = Case::new(70, 90, 64);
            (c.hq, c.hk, c.batch) = (hq, hk, 2);
            check(c, dt, None, hq as u64 * 13 + hk as u64);
        }
    }
}

#[test]
fn softcap() {
    for dt in DTYPES {
        let mut c = Case::new(65, 130, 64);
        c.softcap = Some(5.0);
        check(c, dt, None, 99);
        // Large logits: the cap must bound them.
        let mut c = Case::new(7, 63, 128);
        c.softcap = Some(0.5);
        check(c, dt, None, 98);
    }
}

#[test]
fn masks_with_partial_tiles_and_empty_rows() {
    let causal = |_: usize, i: usize, j: usize| j <= i;
    let bottom_right = |_: usize, i: usize, j: usize| j + 113 <= i + 200; // causal with Sq != Sk
    let band = |_: usize, i: usize, j: usize| j + 3 >= i && j <= i + 1 && j % 3 != 1;
    // Rows 10..20 see nothing: out 0, LSE -inf.
    let holes = |_: usize, i: usize, j: usize| !(10..20).contains(&i) && !(i + j).is_multiple_of(5);
    let docs = |b: usize, i: usize, j: usize| (i + b * 7) / 37 == (j + b * 7) / 37;
    for dt in DTYPES {
        check(Case::new(130, 130, 64), dt, Some(&causal), 1);
        check(Case::new(113, 200, 64), dt, Some(&bottom_right), 2);
        check(Case::new(129, 129, 128), dt, Some(&band), 3);
        check(Case::new(65, 77, 64), dt, Some(&holes), 4);
        let mut c = Case::new(150, 150, 64);
        c.batch = 2;
        check(c, dt, Some(&docs), 5);
    }
}

#[test]
fn fully_masked_everything() {
    let none = |_: usize, _: usize, _: usize| false;
    let q = random_tensor(DType::F32, &[1, 9, 1, 16], 1.0, 1);
    let k = random_tensor(DType::F32, &[1, 9, 1, 16], 1.0, 2);
    let qv = q.view("q").unwrap();
    let kv = k.view("k").unwrap();
    let sched = brute_force_schedule(64, 64, 1, 9, 9, &none).unwrap();
    assert_eq!(sched.entries().len(), 0);
    let out = forward(
        &qv,
        &kv,
        &kv,
        &AttnParams::default(),
        MaskSpec::Schedule {
            schedule: &sched,
            rows: None,
        },
    )
    .unwrap();
    assert!(out.out.data.to_f32_vec().iter().all(|&x| x == 0.0));
    assert!(out.lse.iter().all(|&x| x == f32::NEG_INFINITY));
}

#[test]
fn schedules_with_other_tile_sizes_and_block_masks() {
    // A brute-force schedule with tile sizes that are not the kernel's (48 x 80).
    let causal = |_: usize, i: usize, j: usize| j <= i;
    let (q, k, v) = (
        random_tensor(DType::F32, &[1, 200, 2, 64], 1.0, 1),
        random_tensor(DType::F32, &[1, 200, 2, 64], 1.0, 2),
        random_tensor(DType::F32, &[1, 200, 2, 64], 1.0, 3),
    );
    let (qv, kv, vv) = (
        q.view("q").unwrap(),
        k.view("k").unwrap(),
        v.view("v").unwrap(),
    );
    let p = AttnParams::default();
    let reference = attention_f64(&qv, &kv, &vv, &p, &|_, _, i, j| j <= i).unwrap();
    let sched = brute_force_schedule(48, 80, 1, 200, 200, &causal).unwrap();
    let rows = FnMask(causal);
    let got = forward(
        &qv,
        &kv,
        &vv,
        &p,
        MaskSpec::Schedule {
            schedule: &sched,
            rows: Some(&rows),
        },
    )
    .unwrap();
    let (eo, el) = compare(&got.out, &got.lse, &reference);
    assert!(
        eo < out_tolerance(DType::F32) && el < LSE_TOLERANCE,
        "{eo} {el}"
    );

    // Explicit block mask [1, 2 heads, 4, 4] over 50 x 50 tiles: head 0 block-diagonal, head 1 all.
    let mut bm = vec![0u8; 2 * 16];
    for t in 0..4 {
        bm[t * 4 + t] = 1;
    }
    bm[16..].fill(1);
    let sched = BlockSchedule::from_block_mask(&bm, [1, 2, 4, 4], 50, 50, 200, 200).unwrap();
    let got = forward(
        &qv,
        &kv,
        &vv,
        &p,
        MaskSpec::Schedule {
            schedule: &sched,
            rows: None,
        },
    )
    .unwrap();
    let reference =
        attention_f64(&qv, &kv, &vv, &p, &|_, h, i, j| h == 1 || i / 50 == j / 50).unwrap();
    let (eo, el) = compare(&got.out, &got.lse, &reference);
    assert!(
        eo < out_tolerance(DType::F32) && el < LSE_TOLERANCE,
        "{eo} {el}"
    );
}

#[test]
fn strided_views_read_packed_qkv() {
    // One buffer [B, S, 3, H, D] holding q, k, v interleaved (as a fused QKV projection writes it).
    let (b, s, h, d) = (2, 77, 2, 32);
    let buf = random_tensor(DType::BF16, &[b * s * 3 * h * d], 1.0, 5);
    let data = match &buf.data {
        longattn::tensor::Buffer::BF16(x) => x.as_slice(),
        _ => unreachable!(),
    };
    let strides = [s * 3 * h * d, 3 * h * d, d, 1];
    let view =
        |which: usize| TensorView::strided(&data[which * h * d..], [b, s, h, d], strides).unwrap();
    let (qv, kv, vv) = (view(0), view(1), view(2));
    let p = AttnParams::default();
    let reference = attention_f64(&qv, &kv, &vv, &p, &|_, _, _, _| true).unwrap();
    for isa in isas() {
        let got = forward(
            &qv,
            &kv,
            &vv,
            &AttnParams {
                isa: Some(isa),
                ..p.clone()
            },
            MaskSpec::Full,
        )
        .unwrap();
        let (eo, el) = compare(&got.out, &got.lse, &reference);
        assert!(
            eo < out_tolerance(DType::BF16) && el < LSE_TOLERANCE,
            "{isa:?} {eo} {el}"
        );
    }
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let t = |shape: &[usize], dt| random_tensor(dt, shape, 1.0, 1);
    let q = t(&[1, 8, 4, 64], DType::F32);
    let k = t(&[1, 8, 3, 64], DType::F32);
    let e = forward(
        &q.view("q").unwrap(),
        &k.view("k").unwrap(),
        &k.view("v").unwrap(),
        &AttnParams::default(),
        MaskSpec::Full,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("multiple") && e.contains('q'), "{e}");
    let k2 = t(&[1, 8, 2, 32], DType::F32);
    let e = forward(
        &q.view("q").unwrap(),
        &k2.view("k").unwrap(),
        &k2.view("v").unwrap(),
        &AttnParams::default(),
        MaskSpec::Full,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("`k`") && e.contains("[1, 8, 2, 32]"), "{e}");
    let kb = t(&[1, 8, 2, 64], DType::BF16);
    let e = forward(
        &q.view("q").unwrap(),
        &kb.view("k").unwrap(),
        &kb.view("v").unwrap(),
        &AttnParams::default(),
        MaskSpec::Full,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("dtype bf16"), "{e}");
    let kf = t(&[1, 8, 2, 64], DType::F32);
    let e = forward(
        &q.view("q").unwrap(),
        &kf.view("k").unwrap(),
        &kf.view("v").unwrap(),
        &AttnParams {
            softcap: Some(-1.0),
            ..Default::default()
        },
        MaskSpec::Full,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("softcap"), "{e}");
    // A schedule for other lengths.
    let s = BlockSchedule::full(64, 64, 9, 8).unwrap();
    let e = forward(
        &q.view("q").unwrap(),
        &kf.view("k").unwrap(),
        &kf.view("v").unwrap(),
        &AttnParams::default(),
        MaskSpec::Schedule {
            schedule: &s,
            rows: None,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("sq 9"), "{e}");
    // A view that reaches past its buffer.
    let small = vec![0.5f32; 10];
    assert!(TensorView::contiguous(small.as_slice(), [1, 3, 1, 4]).is_err());
}

#[test]
fn nan_propagates_to_its_rows_only() {
    let q = random_tensor(DType::F32, &[1, 4, 1, 16], 1.0, 1);
    let k = random_tensor(DType::F32, &[1, 4, 1, 16], 1.0, 2);
    let mut qd = q.data.to_f32_vec();
    qd[16] = f32::NAN; // row 1
    let qv = TensorView::contiguous(qd.as_slice(), [1, 4, 1, 16]).unwrap();
    assert_eq!(qv.find_non_finite().map(|x| x.0), Some(16));
    let kv = k.view("k").unwrap();
    let out = forward(&qv, &kv, &kv, &AttnParams::default(), MaskSpec::Full).unwrap();
    let o = out.out.data.to_f32_vec();
    assert!(o[16..32].iter().all(|x| x.is_nan()));
    assert!(o[..16].iter().chain(&o[32..]).all(|x| x.is_finite()));
}

/// Logits that rise along the keys (by about 28 in base 2 over a 256-key group), jump by 43 at one
/// chunk and fall again: the one-pass softmax step (running max kept while sum p <= LAZY_SUM) must
/// redo its rows with the new max, on every path, at awkward lengths.
#[test]
fn rising_and_jumping_logits_rescale_on_every_path() {
    for (n, sk) in [(7usize, 1023usize), (65, 700), (113, 4224)] {
        for dtype in DTYPES {
            let d = 64;
            let q = random_tensor(dtype, &[1, n, 1, d], 1.0, 40);
            let k = random_tensor(dtype, &[1, sk, 1, d], 1.0, 41);
            let v = random_tensor(dtype, &[1, sk, 1, d], 1.0, 42);
            // Dim 0 carries the ramp: q[i][0] = 4, k[j][0] = ramp(j), scale 1/8 -> +ramp / 2.
            let mut qd = q.data.to_f32_vec();
            let mut kd = k.data.to_f32_vec();
            qd.chunks_mut(d).for_each(|r| r[0] = 4.0);
            for (j, r) in kd.chunks_mut(d).enumerate() {
                let jump = if (300..364).contains(&j) { 60.0 } else { 0.0 };
                r[0] = (j % 512) as f32 * 0.15 + jump;
            }
            let q = longattn::Tensor::new(longattn::tensor::Buffer::from_f32(dtype, &qd), q.shape)
                .unwrap();
            let k = longattn::Tensor::new(longattn::tensor::Buffer::from_f32(dtype, &kd), k.shape)
                .unwrap();
            let (qv, kv, vv) = (
                q.view("q").unwrap(),
                k.view("k").unwrap(),
                v.view("v").unwrap(),
            );
            let params = AttnParams::default();
            let reference = attention_f64(&qv, &kv, &vv, &params, &|_, _, _, _| true).unwrap();
            for isa in isas() {
                let p = AttnParams {
                    isa: Some(isa),
                    ..params.clone()
                };
                let got = forward(&qv, &kv, &vv, &p, MaskSpec::Full).unwrap();
                let (eo, el) = compare(&got.out, &got.lse, &reference);
                assert!(
                    eo <= out_tolerance(dtype) && el <= LSE_TOLERANCE,
                    "{isa:?} {dtype} n {n} sk {sk}: out error {eo:.3e}, lse error {el:.3e}"
                );
            }
        }
    }
}
