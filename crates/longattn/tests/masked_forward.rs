//! Every mask atom and a few compositions, through `MaskSpec::Expr` (the kernel builds the
//! schedule and evaluates Partial tiles with the bound mask's row bits), against the f64 oracle
//! evaluating `BoundMask::allowed` element by element, on every instruction-set path.
use longattn::cpu::Isa;
use longattn::mask::{DocIds, MaskExpr, MaskShape};
use longattn::reference::attention_f64;
use longattn::testing::{compare, out_tolerance, random_tensor, LSE_TOLERANCE};
use longattn::{forward, AttnParams, DType, MaskSpec};

fn check(expr: &str, batch: usize, sq: usize, sk: usize, dtype: DType, seed: u64) {
    let (hq, hk, d) = (2, 1, 64);
    let q = random_tensor(dtype, &[batch, sq, hq, d], 1.0, seed);
    let k = random_tensor(dtype, &[batch, sk, hk, d], 1.0, seed + 1);
    let v = random_tensor(dtype, &[batch, sk, hk, d], 1.0, seed + 2);
    let (qv, kv, vv) = (
        q.view("q").unwrap(),
        k.view("k").unwrap(),
        v.view("v").unwrap(),
    );
    // Documents: runs of 37 tokens, shifted per batch row; the last batch row gets scattered ids.
    let ids = |len: usize| -> Vec<i32> {
        (0..batch)
            .flat_map(|b| {
                (0..len).map(move |i| {
                    if b == 1 {
                        (i * 7 % 5) as i32
                    } else {
                        ((i + 11 * b) / 37) as i32
                    }
                })
            })
            .collect()
    };
    let e = MaskExpr::parse(expr).unwrap();
    let docs = e.uses_documents().then(|| DocIds {
        q: ids(sq),
        k: ids(sk),
    });
    let bound = e.bind(MaskShape { batch, sq, sk }, docs).unwrap();
    let p = AttnParams::default();
    let reference = attention_f64(&qv, &kv, &vv, &p, &|b, _, i, j| bound.allowed(b, i, j)).unwrap();
    for isa in Isa::ALL.iter().copied().filter(|i| i.available()) {
        let p = AttnParams {
            isa: Some(isa),
            ..Default::default()
        };
        let got = forward(&qv, &kv, &vv, &p, MaskSpec::Expr(&bound)).unwrap();
        let (eo, el) = compare(&got.out, &got.lse, &reference);
        assert!(
            eo <= out_tolerance(dtype) && el <= LSE_TOLERANCE,
            "`{expr}` {isa:?} {dtype} b{batch} sq{sq} sk{sk}: out error {eo:.3e}, lse error {el:.3e}"
        );
    }
}

#[test]
fn every_atom_through_the_kernel() {
    let exprs = [
        "full",
        "causal",
        "window(20,5)",
        "sinks(3)",
        "prefix(70)",
        "chunk(50)",
        "strided(3)",
        "document",
        "causal & document",
        "causal & (sinks(4) | window(30,0))",
        "causal | prefix(40)",
        "!causal",
        "chunk(64) & !window(2,2)",
        "causal & (sinks(2) | window(15,0) | power(16))",
        "power(7)",
        "radial(20,6)",
        "causal & radial(13,4)",
    ];
    for (n, e) in exprs.iter().enumerate() {
        for dt in [DType::F32, DType::BF16] {
            check(e, 2, 150, 150, dt, n as u64);
            check(e, 2, 65, 200, dt, n as u64 + 100); // Sq < Sk (bottom-right aligned)
            check(e, 2, 1, 130, dt, n as u64 + 200); // decode
        }
    }
}

#[test]
fn neighborhoods_through_the_kernel() {
    for (n, e) in [
        "neighborhood(9)",
        "neighborhood(5,3)",
        "neighborhood2d(12,15,5,3)",
        "neighborhood2d(12,15,3,5,2,3)",
        "neighborhood3d(4,5,9,3,3,5)",
    ]
    .iter()
    .enumerate()
    {
        for dt in [DType::F32, DType::BF16] {
            check(e, 1, 180, 180, dt, 300 + n as u64);
        }
    }
    check(
        "neighborhood2d(64,64,13,13)",
        1,
        4096,
        4096,
        DType::BF16,
        400,
    );
}

#[test]
fn expression_bound_to_other_shapes_is_an_error() {
    let q = random_tensor(DType::F32, &[1, 10, 1, 16], 1.0, 1);
    let qv = q.view("q").unwrap();
    let bound = MaskExpr::parse("causal")
        .unwrap()
        .bind(
            MaskShape {
                batch: 1,
                sq: 12,
                sk: 12,
            },
            None,
        )
        .unwrap();
    let e = forward(
        &qv,
        &qv,
        &qv,
        &AttnParams::default(),
        MaskSpec::Expr(&bound),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("sq 12") && e.contains("sq 10"), "{e}");
}
