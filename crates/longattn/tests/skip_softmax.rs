//! Skip-softmax (`AttnParams::skip_below`) in the CPU forward: exact when nothing qualifies, within
//! its bound when groups are dropped, V of dropped groups never read, refused where it does not
//! run, on every instruction-set path.
use longattn::cpu::Isa;
use longattn::mask::{MaskExpr, MaskShape};
use longattn::reference::attention_f64;
use longattn::tensor::Buffer;
use longattn::testing::{compare, out_tolerance, random_tensor, AWKWARD_SIZES};
use longattn::{backward, forward, AttnParams, BackwardParams, DType, MaskSpec, Tensor};

fn isas() -> Vec<Isa> {
    Isa::ALL.iter().copied().filter(|i| i.available()).collect()
}

fn params(isa: Isa, skip: Option<f32>) -> AttnParams {
    AttnParams {
        isa: Some(isa),
        skip_below: skip,
        ..Default::default()
    }
}

/// A threshold no group can meet (2^-126: logits would need to fall 87 nats below the running
/// maximum) gives the exact forward bit for bit, on random inputs of awkward sizes.
#[test]
fn a_threshold_nothing_meets_is_the_exact_forward() {
    for (n, &sq) in AWKWARD_SIZES.iter().enumerate().take(6) {
        let sk = AWKWARD_SIZES[(n + 2) % 6].max(65);
        for dtype in [DType::F32, DType::BF16] {
            let q = random_tensor(dtype, &[1, sq, 2, 64], 1.0, 11 + n as u64);
            let k = random_tensor(dtype, &[1, sk, 1, 64], 1.0, 12 + n as u64);
            let v = random_tensor(dtype, &[1, sk, 1, 64], 1.0, 13 + n as u64);
            let (q, k, v) = (
                q.view("q").unwrap(),
                k.view("k").unwrap(),
                v.view("v").unwrap(),
            );
            for isa in isas() {
                let exact = forward(&q, &k, &v, &params(isa, None), MaskSpec::Full).unwrap();
                let got = forward(
                    &q,
                    &k,
                    &v,
                    &params(isa, Some(f32::MIN_POSITIVE)),
                    MaskSpec::Full,
                )
                .unwrap();
                assert_eq!(got.lse, exact.lse, "{isa:?} {dtype} sq {sq} sk {sk}");
                assert_eq!(
                    got.out.data.to_f32_vec(),
                    exact.out.data.to_f32_vec(),
                    "{isa:?} {dtype} sq {sq} sk {sk}"
                );
            }
        }
    }
}

/// Inputs with the structure skip-softmax exploits: every query sees the first 64 keys (a
/// "sink" block) `gap` nats above every other key. With lambda = e^-10 and gap 40, every group
/// after a query block's first is dropped; values from key 256 on are NaN, so a single read of
/// them would show in the output. The result equals the oracle over the sink block alone, and LSE stays
/// within ln(1 + Sk lambda) of the exact one (causal and full, Sq != Sk).
#[test]
fn dropped_groups_never_read_their_values() {
    let (d, sq, sk, gap) = (64usize, 113usize, 1500usize, 40.0f32);
    // q = e_0 * a, k_j = e_0 * (a for j < 64, else a - gap * sqrt(d) / a): logits
    // q.k / sqrt(d) differ by `gap` between the sink block and the rest.
    let a = 4.0f32;
    let mut qd = vec![0.0f32; sq * d];
    for i in 0..sq {
        qd[i * d] = a;
        qd[i * d + 1 + i % (d - 1)] = 0.25; // rows differ a little
    }
    let mut kd = vec![0.0f32; sk * d];
    let mut vd = vec![f32::NAN; sk * d];
    for j in 0..sk {
        kd[j * d] = if j < 64 {
            a
        } else {
            a - gap * (d as f32).sqrt() / a
        };
        kd[j * d + 1 + j % (d - 1)] = 0.5;
        // The first group of a query block (up to 4 chunks of 64 keys) is always computed (no
        // running maximum yet): its values are finite; from key 256 on they are NaN.
        if j < 256 {
            for x in 0..d {
                vd[j * d + x] = ((j * 7 + x * 3) % 17) as f32 / 17.0 - 0.5;
            }
        }
    }
    let t = |x: &[f32], s: usize| {
        Tensor::new(Buffer::from_f32(DType::F32, x), vec![1, s, 1, d]).unwrap()
    };
    let (qt, kt, vt) = (t(&qd, sq), t(&kd, sk), t(&vd, sk));
    let (q, k, v) = (
        qt.view("q").unwrap(),
        kt.view("k").unwrap(),
        vt.view("v").unwrap(),
    );
    // The oracle over the sink block only (V there is finite); causal with Sq < Sk is aligned at
    // the end, so every row sees all 64 sink keys.
    let sink_only =
        attention_f64(&q, &k, &v, &AttnParams::default(), &|_, _, _, j| j < 64).unwrap();
    let lambda = (-10.0f32).exp();
    let causal = MaskExpr::parse("causal")
        .unwrap()
        .bind(MaskShape { batch: 1, sq, sk }, None)
        .unwrap();
    for isa in isas() {
        for (name, mask) in [
            ("full", MaskSpec::Full),
            ("causal", MaskSpec::Expr(&causal)),
        ] {
            let got = forward(&q, &k, &v, &params(isa, Some(lambda)), mask).unwrap();
            let (err, _) = compare(&got.out, &got.lse, &sink_only);
            assert!(
                err < 1e-5,
                "{isa:?} {name}: out differs from the sink-only oracle by {err}"
            );
            assert!(
                got.out.data.to_f32_vec().iter().all(|x| x.is_finite()),
                "{isa:?} {name}"
            );
            // Against the exact LSE (V does not enter it): within ln(1 + Sk lambda).
            let exact = attention_f64(&q, &k, &k, &AttnParams::default(), &|_, _, i, j| {
                name == "full" || j <= i + (sk - sq)
            })
            .unwrap();
            let bound = (1.0 + sk as f64 * lambda as f64).ln() + 1e-5;
            for (i, (&g, &e)) in got.lse.iter().zip(&exact.lse).enumerate() {
                assert!(
                    (g as f64 - e).abs() <= bound,
                    "{isa:?} {name} row {i}: lse {g} vs {e}, bound {bound}"
                );
            }
            // Without skipping the NaN values are read.
            let plain = forward(&q, &k, &v, &params(isa, None), mask).unwrap();
            assert!(
                plain.out.data.to_f32_vec().iter().any(|x| x.is_nan()),
                "{isa:?} {name}"
            );
        }
    }
}

/// On random inputs with a moderate threshold the output stays within the bound the dropped mass
/// allows: |out - exact| <= 2 max|v| Sk lambda (relative to a row's largest term each dropped
/// key weighs < lambda, and the row's sum is at least 1 of those units).
#[test]
fn random_inputs_stay_within_the_dropped_mass_bound() {
    let (sq, sk, d) = (130, 1023, 32);
    for (seed, std) in [(5u64, 1.0), (6, 3.0)] {
        let q = random_tensor(DType::F32, &[2, sq, 2, d], std, seed);
        let k = random_tensor(DType::F32, &[2, sk, 2, d], std, seed + 1);
        let v = random_tensor(DType::F32, &[2, sk, 2, d], 1.0, seed + 2);
        let (q, k, v) = (
            q.view("q").unwrap(),
            k.view("k").unwrap(),
            v.view("v").unwrap(),
        );
        let exact = attention_f64(&q, &k, &v, &AttnParams::default(), &|_, _, _, _| true).unwrap();
        let vmax = v
            .typed::<f32>()
            .unwrap()
            .iter()
            .fold(0.0f32, |m, x| m.max(x.abs())) as f64;
        for lambda in [1e-4f32, 1e-2] {
            for isa in isas() {
                let got = forward(&q, &k, &v, &params(isa, Some(lambda)), MaskSpec::Full).unwrap();
                let o = got.out.data.to_f32_vec();
                let worst = o
                    .iter()
                    .zip(&exact.out)
                    .map(|(&a, &b)| (a as f64 - b).abs())
                    .fold(0.0, f64::max);
                let bound = 2.0 * vmax * sk as f64 * lambda as f64 + out_tolerance(DType::F32);
                assert!(
                    worst <= bound,
                    "{isa:?} std {std} lambda {lambda}: {worst} > {bound}"
                );
            }
        }
    }
}

#[test]
fn bad_thresholds_and_paths_without_it_are_refused() {
    let q = random_tensor(DType::F32, &[1, 7, 1, 16], 1.0, 1);
    let (qv, kv, vv) = (
        q.view("q").unwrap(),
        q.view("k").unwrap(),
        q.view("v").unwrap(),
    );
    for l in [0.0f32, 1.0, -0.5, f32::NAN, 2.0] {
        let e = forward(&qv, &kv, &vv, &params(Isa::Scalar, Some(l)), MaskSpec::Full)
            .unwrap_err()
            .to_string();
        assert!(e.contains("skip_below") && e.contains("(0, 1)"), "{l}: {e}");
    }
    let p = params(Isa::Scalar, Some(0.01));
    let out = forward(&qv, &kv, &vv, &p, MaskSpec::Full).unwrap();
    let ov = out.out.view("out").unwrap();
    let e = backward(
        &qv,
        &kv,
        &vv,
        &ov,
        &out.lse,
        &ov,
        &p,
        MaskSpec::Full,
        &BackwardParams::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("skip-softmax") && e.contains("backward"), "{e}");
}
