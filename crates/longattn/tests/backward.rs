//! The backward pass: the f64 gradient oracle against finite differences, then every fast path
//! (each instruction set, both modes) against the oracle on seeded random inputs: awkward sizes,
//! decode, Sq != Sk, GQA/MQA, Dv != D, soft-cap, masks (expressions, explicit block masks, a
//! caller schedule with odd tile sizes), fully masked rows; determinism; bad inputs.
use longattn::cpu::Isa;
use longattn::mask::{BlockSchedule, BoundMask, DocIds, MaskExpr, MaskShape};
use longattn::reference::{attention_backward_f64, attention_backward_f64_rows, attention_f64};
use longattn::testing::{
    brute_force_schedule, compare_grad, grad_tolerance, random_tensor, FnMask, Rng, AWKWARD_SIZES,
};
use longattn::{backward, forward, AttnParams, BackwardParams, DType, Error, MaskSpec, Tensor};

/// Bottom-right aligned causal: key j is visible from query i when j <= i + sk - sq.
fn causal(sq: usize, sk: usize) -> impl Fn(usize, usize, usize, usize) -> bool {
    move |_, _, i, j| j + sq <= i + sk
}

// ---------------------------------------------------------------------------------------------
// The oracle against central finite differences of L = sum(out * dO).

#[test]
fn oracle_matches_finite_differences() {
    // (batch, sq, sk, hq, hk, d, dv, softcap, mask)
    type Allowed = Box<dyn Fn(usize, usize, usize, usize) -> bool>;
    #[allow(clippy::type_complexity)]
    let cases: Vec<(
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        Option<f32>,
        Allowed,
    )> = vec![
        (1, 3, 5, 2, 1, 3, 2, None, Box::new(|_, _, _, _| true)),
        (2, 4, 4, 2, 2, 2, 3, Some(1.5), Box::new(causal(4, 4))),
        // Sq > Sk with causal: query 0 sees no key (a fully masked row).
        (1, 4, 3, 3, 1, 3, 3, None, Box::new(causal(4, 3))),
        // A head- and batch-dependent pattern.
        (
            2,
            3,
            4,
            2,
            1,
            2,
            2,
            Some(0.8),
            Box::new(|b, h, i, j| !(b + h + i + j).is_multiple_of(3)),
        ),
    ];
    for (n, (bn, sq, sk, hq, hk, d, dv, cap, allowed)) in cases.into_iter().enumerate() {
        let seed = 10 * n as u64;
        let q = random_tensor(DType::F32, &[bn, sq, hq, d], 1.0, seed);
        let k = random_tensor(DType::F32, &[bn, sk, hk, d], 1.0, seed + 1);
        let v = random_tensor(DType::F32, &[bn, sk, hk, dv], 1.0, seed + 2);
        let dout = random_tensor(DType::F32, &[bn, sq, hq, dv], 1.0, seed + 3);
        let p = AttnParams {
            softcap: cap,
            ..Default::default()
        };
        let dov = dout.view("do").unwrap();
        let g = attention_backward_f64(
            &q.view("q").unwrap(),
            &k.view("k").unwrap(),
            &v.view("v").unwrap(),
            &dov,
            &p,
            &*allowed,
        )
        .unwrap();
        let loss = |q: &Tensor, k: &Tensor, v: &Tensor| -> f64 {
            let o = attention_f64(
                &q.view("q").unwrap(),
                &k.view("k").unwrap(),
                &v.view("v").unwrap(),
                &p,
                &*allowed,
            )
            .unwrap();
            let dov = dout.data.to_f32_vec();
            o.out.iter().zip(&dov).map(|(&a, &b)| a * b as f64).sum()
        };
        // Perturb one element of one tensor by +-h; the step is measured after rounding to f32.
        let fd = |which: usize, idx: usize| -> f64 {
            let mut ts = [q.clone(), k.clone(), v.clone()];
            let x = ts[which].data.to_f32_vec();
            let (xp, xm) = (x[idx] + 1e-3, x[idx] - 1e-3);
            let set = |val: f32, ts: &mut [Tensor; 3]| {
                let mut y = x.clone();
                y[idx] = val;
                ts[which].data = longattn::tensor::Buffer::from_f32(DType::F32, &y);
            };
            set(xp, &mut ts);
            let lp = loss(&ts[0], &ts[1], &ts[2]);
            set(xm, &mut ts);
            let lm = loss(&ts[0], &ts[1], &ts[2]);
            (lp - lm) / (xp as f64 - xm as f64)
        };
        for (which, grad) in [(0, &g.dq), (1, &g.dk), (2, &g.dv)] {
            let scale = grad.iter().fold(1e-30f64, |a, &x| a.max(x.abs()));
            for (idx, &an) in grad.iter().enumerate() {
                let num = fd(which, idx);
                assert!(
                    (num - an).abs() <= 1e-5 * scale,
                    "case {n} tensor {which} index {idx}: analytic {an:.8e}, finite difference {num:.8e}"
                );
            }
        }
    }
}

/// The row-restricted oracle (spot checks of long sequences) gives the full oracle's dQ on the
/// rows it keeps and nothing elsewhere.
#[test]
fn row_restricted_oracle_matches_on_its_rows() {
    let (bn, sq, sk, hq, hk, d) = (2, 13, 17, 4, 2, 8);
    let q = random_tensor(DType::F32, &[bn, sq, hq, d], 1.0, 71);
    let k = random_tensor(DType::F32, &[bn, sk, hk, d], 1.0, 72);
    let v = random_tensor(DType::F32, &[bn, sk, hk, d], 1.0, 73);
    let dout = random_tensor(DType::F32, &[bn, sq, hq, d], 1.0, 74);
    let p = AttnParams {
        softcap: Some(2.0),
        ..Default::default()
    };
    let (qv, kv, vv, dv) = (
        q.view("q").unwrap(),
        k.view("k").unwrap(),
        v.view("v").unwrap(),
        dout.view("do").unwrap(),
    );
    let allowed = causal(sq, sk);
    let full = attention_backward_f64(&qv, &kv, &vv, &dv, &p, &allowed).unwrap();
    let keep = |b: usize, h: usize, i: usize| b == 1 && h % 2 == 1 && i.is_multiple_of(4);
    let part = attention_backward_f64_rows(&qv, &kv, &vv, &dv, &p, &allowed, &keep).unwrap();
    let mut kept = 0;
    for b in 0..bn {
        for i in 0..sq {
            for h in 0..hq {
                for x in 0..d {
                    let at = ((b * sq + i) * hq + h) * d + x;
                    if keep(b, h, i) {
                        assert!(full.dq[at] != 0.0);
                        assert!(
                            (part.dq[at] - full.dq[at]).abs() <= 1e-12 * full.dq[at].abs().max(1.0)
                        );
                        kept += 1;
                    } else {
                        assert_eq!(part.dq[at], 0.0, "row ({b}, {h}, {i}) was not selected");
                    }
                }
            }
        }
    }
    assert_eq!(kept, 2 * 4 * d);
}

// ---------------------------------------------------------------------------------------------
// Fast paths against the oracle.

/// The mask of one case.
enum Mask<'a> {
    Full,
    Expr(&'a BoundMask),
    /// A caller schedule with an element mask (`FnMask`) or none (every listed tile Full).
    Schedule(&'a BlockSchedule, Option<&'a dyn longattn::mask::RowMask>),
}

struct Case {
    batch: usize,
    sq: usize,
    sk: usize,
    hq: usize,
    hk: usize,
    d: usize,
    dv: usize,
    dtype: DType,
    softcap: Option<f32>,
    seed: u64,
}

impl Case {
    fn new(sq: usize, sk: usize, dtype: DType) -> Case {
        Case {
            batch: 1,
            sq,
            sk,
            hq: 2,
            hk: 1,
            d: 64,
            dv: 64,
            dtype,
            softcap: None,
            seed: (sq * 1000 + sk) as u64,
        }
    }
}

struct Inputs {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dout: Tensor,
}

fn inputs(c: &Case) -> Inputs {
    Inputs {
        q: random_tensor(c.dtype, &[c.batch, c.sq, c.hq, c.d], 1.0, c.seed),
        k: random_tensor(c.dtype, &[c.batch, c.sk, c.hk, c.d], 1.0, c.seed + 1),
        v: random_tensor(c.dtype, &[c.batch, c.sk, c.hk, c.dv], 1.0, c.seed + 2),
        dout: random_tensor(c.dtype, &[c.batch, c.sq, c.hq, c.dv], 1.0, c.seed + 3),
    }
}

fn spec<'a>(m: &'a Mask<'a>) -> MaskSpec<'a> {
    match m {
        Mask::Full => MaskSpec::Full,
        Mask::Expr(b) => MaskSpec::Expr(b),
        Mask::Schedule(s, rows) => MaskSpec::Schedule {
            schedule: s,
            rows: *rows,
        },
    }
}

/// Forward (our kernel: out and LSE as a training step has them), backward on `isas` in both
/// modes, each gradient against the oracle.
fn check(
    c: &Case,
    mask: &Mask,
    allowed: &dyn Fn(usize, usize, usize, usize) -> bool,
    isas: &[Isa],
) {
    let x = inputs(c);
    let (qv, kv, vv, dov) = (
        x.q.view("q").unwrap(),
        x.k.view("k").unwrap(),
        x.v.view("v").unwrap(),
        x.dout.view("do").unwrap(),
    );
    let p0 = AttnParams {
        softcap: c.softcap,
        ..Default::default()
    };
    let want = attention_backward_f64(&qv, &kv, &vv, &dov, &p0, allowed).unwrap();
    let tol = grad_tolerance(c.dtype);
    for &isa in isas.iter().filter(|i| i.available()) {
        let p = AttnParams {
            isa: Some(isa),
            ..p0.clone()
        };
        let fwd = forward(&qv, &kv, &vv, &p, spec(mask)).unwrap();
        let ov = fwd.out.view("out").unwrap();
        for deterministic in [false, true] {
            let g = backward(
                &qv,
                &kv,
                &vv,
                &ov,
                &fwd.lse,
                &dov,
                &p,
                spec(mask),
                &BackwardParams {
                    deterministic,
                    ..Default::default()
                },
            )
            .unwrap();
            assert_eq!(g.dq.dtype(), c.dtype);
            let floor = want.dv.iter().fold(0.0f64, |a, &x| a.max(x.abs()));
            for (name, got, r) in [
                ("dq", &g.dq, &want.dq),
                ("dk", &g.dk, &want.dk),
                ("dv", &g.dv, &want.dv),
            ] {
                let e = compare_grad(got, r, floor);
                assert!(
                    e <= tol,
                    "{name} {isa:?} det={deterministic} {} b{} sq{} sk{} hq{} hk{} d{} dv{} cap {:?}: error {e:.3e} > {tol:.1e}",
                    c.dtype, c.batch, c.sq, c.sk, c.hq, c.hk, c.d, c.dv, c.softcap
                );
            }
        }
    }
}

const ALL: &[Isa] = &Isa::ALL;
const BEST: &[Isa] = &[Isa::Avx512, Isa::Amx];

fn bind(expr: &str, batch: usize, sq: usize, sk: usize, docs: Option<DocIds>) -> BoundMask {
    MaskExpr::parse(expr)
        .unwrap()
        .bind(MaskShape { batch, sq, sk }, docs)
        .unwrap()
}

#[test]
fn awkward_sizes_full_and_causal() {
    for &n in AWKWARD_SIZES.iter().filter(|&&n| n <= 1023) {
        for dt in [DType::F32, DType::BF16] {
            let c = Case::new(n, n, dt);
            // The scalar path only on the small sizes (it is the slow reference path).
            let isas = if n <= 113 { ALL } else { BEST };
            check(&c, &Mask::Full, &|_, _, _, _| true, isas);
            let b = bind("causal", 1, n, n, None);
            check(&c, &Mask::Expr(&b), &|_, _, i, j| b.allowed(0, i, j), isas);
        }
    }
}

#[test]
fn decode_and_unequal_lengths() {
    // (sq, sk): decode; Sq < Sk; Sq > Sk (causal then leaves the first rows fully masked).
    for (sq, sk) in [(1, 300), (65, 200), (200, 65), (7, 130)] {
        for dt in [DType::F32, DType::BF16] {
            let c = Case::new(sq, sk, dt);
            check(&c, &Mask::Full, &|_, _, _, _| true, ALL);
            let b = bind("causal", 1, sq, sk, None);
            check(&c, &Mask::Expr(&b), &causal(sq, sk), ALL);
        }
    }
}

#[test]
fn gqa_mqa_dv_softcap_batch() {
    for dt in [DType::F32, DType::BF16] {
        // GQA 4:2, batch 2, Dv != D (padding of both head dims).
        let mut c = Case::new(113, 150, dt);
        (c.batch, c.hq, c.hk, c.d, c.dv) = (2, 4, 2, 40, 72);
        let b = bind("causal", 2, 113, 150, None);
        check(&c, &Mask::Expr(&b), &|bb, _, i, j| b.allowed(bb, i, j), ALL);
        // MQA 3:1 with soft-cap, D 128.
        let mut c = Case::new(100, 100, dt);
        (c.hq, c.hk, c.d, c.dv, c.softcap) = (3, 1, 128, 128, Some(2.0));
        check(&c, &Mask::Full, &|_, _, _, _| true, ALL);
        // Soft-cap that really caps (large logits), causal.
        let mut c = Case::new(70, 70, dt);
        c.softcap = Some(0.5);
        let b = bind("causal", 1, 70, 70, None);
        check(&c, &Mask::Expr(&b), &causal(70, 70), BEST);
    }
}

/// A block map gating a mask expression (`BlockSchedule::gated`: an external gate, per head):
/// the backward through that schedule with the expression as its row mask matches the oracle of
/// `mask & gate`, so gate distillation and sparse fine-tuning train through it.
#[test]
fn gated_schedules_through_the_backward() {
    let (batch, hq, sq, sk) = (2, 2, 150, 170);
    let b = bind("causal & (sinks(4) | window(60,0))", batch, sq, sk, None);
    let (tq, tk) = (32, 48);
    let (nq, nk) = (sq.div_ceil(tq), sk.div_ceil(tk));
    let table: Vec<u8> = (0..batch * hq * nq * nk)
        .map(|i| ((i * 11) % 7 < 4) as u8)
        .collect();
    let s = b
        .schedule(tq, tk)
        .unwrap()
        .gated(&table, [batch, hq, nq, nk])
        .unwrap();
    assert_eq!((s.batch, s.heads), (batch, hq));
    for dt in [DType::F32, DType::BF16] {
        let mut c = Case::new(sq, sk, dt);
        (c.batch, c.hq, c.hk, c.seed) = (batch, hq, 1, 91);
        let rows = Some(&b as &dyn longattn::mask::RowMask);
        check(
            &c,
            &Mask::Schedule(&s, rows),
            &|bb, h, i, j| {
                b.allowed(bb, i, j) && table[((bb * hq + h) * nq + i / tq) * nk + j / tk] != 0
            },
            ALL,
        );
    }
}

#[test]
fn masks_through_the_schedule() {
    let (batch, n) = (2, 200);
    let ids: Vec<i32> = (0..batch)
        .flat_map(|b| (0..n).map(move |i| ((i + 13 * b) / 45) as i32))
        .collect();
    for (k, expr) in [
        "causal & window(50,0)",
        "causal & document",
        "causal & (sinks(4) | window(30,0))",
        "chunk(64) & !window(2,2)",
        "causal & (sinks(2) | window(20,0) | power(16))",
        "radial(40,12)",
    ]
    .iter()
    .enumerate()
    {
        let docs = expr.contains("document").then(|| DocIds {
            q: ids.clone(),
            k: ids.clone(),
        });
        let b = bind(expr, batch, n, n, docs);
        for dt in [DType::F32, DType::BF16] {
            let mut c = Case::new(n, n, dt);
            (c.batch, c.seed) = (batch, 77 + k as u64);
            check(&c, &Mask::Expr(&b), &|bb, _, i, j| b.allowed(bb, i, j), ALL);
        }
    }
}

#[test]
fn caller_schedules() {
    let (sq, sk) = (150, 170);
    for dt in [DType::F32, DType::BF16] {
        let c = Case::new(sq, sk, dt);
        // Explicit block mask (every listed tile Full, no element mask), 32 x 64 tiles.
        let (qt, kt) = (sq.div_ceil(32), sk.div_ceil(64));
        let mut rng = Rng::new(3);
        let bm: Vec<u8> = (0..qt * kt).map(|_| (rng.below(3) != 0) as u8).collect();
        let s = BlockSchedule::from_block_mask(&bm, [1, 1, qt, kt], 32, 64, sq, sk).unwrap();
        let allowed = |_: usize, _: usize, i: usize, j: usize| bm[(i / 32) * kt + j / 64] != 0;
        check(&c, &Mask::Schedule(&s, None), &allowed, ALL);
        // Odd tile sizes (48 x 80: key tiles cross 64-key chunks) with an element mask.
        let f = |_: usize, i: usize, j: usize| {
            j < sk && !(i * 7 + j * 3).is_multiple_of(5) && j <= i + 40
        };
        let s = brute_force_schedule(48, 80, 1, sq, sk, &f).unwrap();
        let rows = FnMask(f);
        check(
            &c,
            &Mask::Schedule(&s, Some(&rows)),
            &|_, _, i, j| f(0, i, j),
            ALL,
        );
    }
}

#[test]
fn fully_masked_rows_have_zero_gradient() {
    // Sq > Sk causal: queries 0..sq-sk see no key.
    let (sq, sk) = (100, 30);
    for dt in [DType::F32, DType::BF16] {
        let c = Case::new(sq, sk, dt);
        let x = inputs(&c);
        let (qv, kv, vv, dov) = (
            x.q.view("q").unwrap(),
            x.k.view("k").unwrap(),
            x.v.view("v").unwrap(),
            x.dout.view("do").unwrap(),
        );
        let b = bind("causal", 1, sq, sk, None);
        let p = AttnParams::default();
        let f = forward(&qv, &kv, &vv, &p, MaskSpec::Expr(&b)).unwrap();
        let ov = f.out.view("out").unwrap();
        let g = backward(
            &qv,
            &kv,
            &vv,
            &ov,
            &f.lse,
            &dov,
            &p,
            MaskSpec::Expr(&b),
            &Default::default(),
        )
        .unwrap();
        let dq = g.dq.data.to_f32_vec();
        let row = c.hq * c.d;
        assert!(dq[..(sq - sk) * row].iter().all(|&x| x == 0.0));
        assert!(dq[(sq - sk) * row..].iter().any(|&x| x != 0.0));
    }
}

// ---------------------------------------------------------------------------------------------
// Determinism.

fn run_once(c: &Case, x: &Inputs, deterministic: bool, mask: MaskSpec) -> [Vec<f32>; 3] {
    let (qv, kv, vv, dov) = (
        x.q.view("q").unwrap(),
        x.k.view("k").unwrap(),
        x.v.view("v").unwrap(),
        x.dout.view("do").unwrap(),
    );
    let p = AttnParams::default();
    let f = forward(&qv, &kv, &vv, &p, mask).unwrap();
    let ov = f.out.view("out").unwrap();
    let _ = c;
    let g = backward(
        &qv,
        &kv,
        &vv,
        &ov,
        &f.lse,
        &dov,
        &p,
        mask,
        &BackwardParams {
            deterministic,
            ..Default::default()
        },
    )
    .unwrap();
    [
        g.dq.data.to_f32_vec(),
        g.dk.data.to_f32_vec(),
        g.dv.data.to_f32_vec(),
    ]
}

#[test]
fn deterministic_mode_is_bit_identical_and_fast_mode_agrees() {
    for dt in [DType::F32, DType::BF16] {
        let mut c = Case::new(700, 700, dt);
        (c.hq, c.hk) = (4, 2);
        let x = inputs(&c);
        let b = bind("causal", 1, 700, 700, None);
        let a = run_once(&c, &x, true, MaskSpec::Expr(&b));
        let a2 = run_once(&c, &x, true, MaskSpec::Expr(&b));
        // And with one thread: the ranges do not depend on the thread count.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let a1 = pool.install(|| run_once(&c, &x, true, MaskSpec::Expr(&b)));
        for t in 0..3 {
            assert!(a[t]
                .iter()
                .zip(&a2[t])
                .all(|(x, y)| x.to_bits() == y.to_bits()));
            assert!(a[t]
                .iter()
                .zip(&a1[t])
                .all(|(x, y)| x.to_bits() == y.to_bits()));
        }
        let f = run_once(&c, &x, false, MaskSpec::Expr(&b));
        // dK, dV are computed the same way in both modes; dQ only in a different order.
        assert_eq!(f[1], a[1]);
        assert_eq!(f[2], a[2]);
        let scale = a[0].iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let e = a[0]
            .iter()
            .zip(&f[0])
            .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            (e / scale) as f64 <= grad_tolerance(dt),
            "fast vs deterministic dq: {e}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Bad inputs: errors, never panics.

/// The error of a call that must fail (without printing its gradients when it does not).
fn err(r: longattn::Result<longattn::Grads>) -> Error {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e,
    }
}

#[test]
fn bad_inputs_are_errors() {
    let c = Case::new(70, 90, DType::F32);
    let x = inputs(&c);
    let (qv, kv, vv, dov) = (
        x.q.view("q").unwrap(),
        x.k.view("k").unwrap(),
        x.v.view("v").unwrap(),
        x.dout.view("do").unwrap(),
    );
    let p = AttnParams::default();
    let b = bind("causal", 1, 70, 90, None);
    let f = forward(&qv, &kv, &vv, &p, MaskSpec::Expr(&b)).unwrap();
    let ov = f.out.view("out").unwrap();
    let bp = BackwardParams::default();
    let run = |out: &longattn::TensorView,
               lse: &[f32],
               dout: &longattn::TensorView,
               m: MaskSpec| { backward(&qv, &kv, &vv, out, lse, dout, &p, m, &bp) };
    let ok = run(&ov, &f.lse, &dov, MaskSpec::Expr(&b));
    assert!(ok.is_ok());
    // do of the wrong shape (names the tensor).
    let wrong = random_tensor(DType::F32, &[1, 70, 2, 32], 1.0, 5);
    let e = err(run(
        &ov,
        &f.lse,
        &wrong.view("do").unwrap(),
        MaskSpec::Expr(&b),
    ));
    assert!(
        matches!(&e, Error::Shape { tensor, .. } if tensor == "do"),
        "{e}"
    );
    let e = err(run(
        &wrong.view("out").unwrap(),
        &f.lse,
        &dov,
        MaskSpec::Expr(&b),
    ));
    assert!(
        matches!(&e, Error::Shape { tensor, .. } if tensor == "out"),
        "{e}"
    );
    // do of another dtype.
    let dbf = random_tensor(DType::BF16, &[1, 70, 2, 64], 1.0, 5);
    let e = err(run(
        &ov,
        &f.lse,
        &dbf.view("do").unwrap(),
        MaskSpec::Expr(&b),
    ));
    assert!(
        matches!(&e, Error::DType { tensor, .. } if tensor == "do"),
        "{e}"
    );
    // LSE of the wrong length / missing.
    for lse in [&f.lse[1..], &[][..]] {
        let e = err(run(&ov, lse, &dov, MaskSpec::Expr(&b)));
        assert!(
            matches!(&e, Error::Shape { tensor, .. } if tensor == "lse"),
            "{e}"
        );
    }
    // NaN in the LSE.
    let mut lse = f.lse.clone();
    lse[17] = f32::NAN;
    let e = err(run(&ov, &lse, &dov, MaskSpec::Expr(&b)));
    assert!(
        matches!(&e, Error::NonFinite { tensor, .. } if tensor == "lse"),
        "{e}"
    );
    // -inf on a row with keys.
    let mut lse = f.lse.clone();
    lse[3] = f32::NEG_INFINITY;
    assert!(run(&ov, &lse, &dov, MaskSpec::Expr(&b)).is_err());
    // The LSE of a different mask (full vs causal, both ways): row sums of P are not 1.
    let f_full = forward(&qv, &kv, &vv, &p, MaskSpec::Full).unwrap();
    let e = err(run(&ov, &f_full.lse, &dov, MaskSpec::Expr(&b)));
    assert!(e.to_string().contains("does not belong"), "{e}");
    let e = err(run(&ov, &f.lse, &dov, MaskSpec::Full));
    assert!(e.to_string().contains("does not belong"), "{e}");
    // The LSE of other inputs (shifted down by 3).
    let lse: Vec<f32> = f.lse.iter().map(|l| l - 3.0).collect();
    let e = err(run(&ov, &lse, &dov, MaskSpec::Expr(&b)));
    assert!(e.to_string().contains("does not belong"), "{e}");
    // A finite LSE on a fully masked row (Sq > Sk causal: row 0 sees nothing).
    let c2 = Case::new(40, 20, DType::F32);
    let x2 = inputs(&c2);
    let (q2, k2, v2, d2) = (
        x2.q.view("q").unwrap(),
        x2.k.view("k").unwrap(),
        x2.v.view("v").unwrap(),
        x2.dout.view("do").unwrap(),
    );
    let b2 = bind("causal", 1, 40, 20, None);
    let f2 = forward(&q2, &k2, &v2, &p, MaskSpec::Expr(&b2)).unwrap();
    assert_eq!(f2.lse[0], f32::NEG_INFINITY);
    let mut lse = f2.lse.clone();
    lse[0] = 1.0;
    let o2 = f2.out.view("out").unwrap();
    let e = err(backward(
        &q2,
        &k2,
        &v2,
        &o2,
        &lse,
        &d2,
        &p,
        MaskSpec::Expr(&b2),
        &bp,
    ));
    assert!(e.to_string().contains("no allowed key"), "{e}");
    // A mask bound to other lengths.
    let b3 = bind("causal", 1, 71, 90, None);
    assert!(run(&ov, &f.lse, &dov, MaskSpec::Expr(&b3)).is_err());
}

#[test]
fn nan_in_dout_propagates_to_its_row() {
    let c = Case::new(80, 80, DType::F32);
    let x = inputs(&c);
    let mut dvals = x.dout.data.to_f32_vec();
    dvals[(5 * c.hq) * c.dv] = f32::NAN; // query 5, head 0
    let dout = Tensor::new(
        longattn::tensor::Buffer::from_f32(DType::F32, &dvals),
        x.dout.shape.clone(),
    )
    .unwrap();
    let (qv, kv, vv, dov) = (
        x.q.view("q").unwrap(),
        x.k.view("k").unwrap(),
        x.v.view("v").unwrap(),
        dout.view("do").unwrap(),
    );
    let p = AttnParams::default();
    let f = forward(&qv, &kv, &vv, &p, MaskSpec::Full).unwrap();
    let ov = f.out.view("out").unwrap();
    let g = backward(
        &qv,
        &kv,
        &vv,
        &ov,
        &f.lse,
        &dov,
        &p,
        MaskSpec::Full,
        &Default::default(),
    )
    .unwrap();
    let dq = g.dq.data.to_f32_vec();
    assert!(dq[(5 * c.hq) * c.d].is_nan());
    assert!(dq[(6 * c.hq) * c.d].is_finite());
    assert!(g.dv.data.to_f32_vec()[0].is_nan());
}
