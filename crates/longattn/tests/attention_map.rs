//! The block-pooled attention map of the forward (`forward_with_map`) against the f64 oracle
//! (`reference::attention_map_f64`): awkward sizes, Sq != Sk, decode, GQA, soft-cap, masks with
//! empty rows, a caller schedule whose tiles split the kernel's 64-key chunks, every
//! instruction-set path; the output and LSE stay the plain forward's bit for bit.
use longattn::cpu::Isa;
use longattn::mask::{BlockSchedule, MaskExpr, MaskShape};
use longattn::reference::attention_map_f64;
use longattn::testing::random_tensor;
use longattn::{forward, forward_with_map, AttnParams, DType, MaskSpec};

/// Largest |got - want| over the map.
fn worst(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w).abs())
        .fold(0.0, f64::max)
}

#[test]
fn pooled_map_matches_the_oracle() {
    let cases: &[(usize, usize, usize, usize, &str, usize)] = &[
        // (sq, sk, hq, hk, mask, block)
        (113, 113, 4, 2, "causal", 64),
        (65, 200, 2, 1, "causal & (sinks(3) | window(40,0))", 64),
        (1, 130, 4, 1, "causal", 64),
        (200, 63, 2, 2, "causal", 64), // Sq > Sk: empty rows
        (300, 300, 2, 1, "causal & power(32)", 128),
        (129, 129, 2, 2, "full", 128),
        (1023, 1023, 1, 1, "causal & window(200,0)", 192),
    ];
    for (n, &(sq, sk, hq, hk, text, block)) in cases.iter().enumerate() {
        let bound = MaskExpr::parse(text)
            .unwrap()
            .bind(MaskShape { batch: 2, sq, sk }, None)
            .unwrap();
        for dt in [DType::F32, DType::BF16] {
            let seed = 500 + 10 * n as u64;
            let q = random_tensor(dt, &[2, sq, hq, 32], 1.0, seed);
            let k = random_tensor(dt, &[2, sk, hk, 32], 1.0, seed + 1);
            let v = random_tensor(dt, &[2, sk, hk, 32], 1.0, seed + 2);
            let (qv, kv, vv) = (
                q.view("q").unwrap(),
                k.view("k").unwrap(),
                v.view("v").unwrap(),
            );
            let params = AttnParams {
                softcap: (n % 2 == 1).then_some(5.0),
                ..Default::default()
            };
            let (out, map) =
                forward_with_map(&qv, &kv, &vv, &params, MaskSpec::Expr(&bound), block).unwrap();
            let plain = forward(&qv, &kv, &vv, &params, MaskSpec::Expr(&bound)).unwrap();
            assert_eq!(
                out.out.data, plain.out.data,
                "`{text}`: the map changed the output"
            );
            assert_eq!(out.lse, plain.lse, "`{text}`: the map changed the LSE");
            let (mass, max) = attention_map_f64(
                &qv,
                &kv,
                &vv,
                &params,
                &|b, _, i, j| bound.allowed(b, i, j),
                block,
            )
            .unwrap();
            assert_eq!(
                (map.block, map.batch, map.heads, map.q_blocks, map.k_blocks),
                (block, 2, hq, sq.div_ceil(block), sk.div_ceil(block))
            );
            // The kernel's logits come from bf16-rounded inputs as the oracle's do; the map is
            // accumulated in f32.
            let tol = if dt == DType::F32 { 2e-5 } else { 1e-3 };
            let (em, ex) = (worst(&map.mass, &mass), worst(&map.max, &max));
            assert!(
                em <= tol && ex <= tol,
                "`{text}` {dt:?} block {block}: mass {em:e}, max {ex:e}"
            );
            // Each query block's mass sums to the share of its rows that have a key.
            for (r, row) in map.mass.chunks(map.k_blocks).enumerate() {
                let total: f32 = row.iter().sum();
                assert!(total as f64 <= 1.0 + tol * 2.0, "row {r}: {total}");
            }
        }
    }
}

/// Every instruction-set path this CPU has gives the oracle's map; a caller schedule of 50 x 50
/// tiles (two entries share a 64-key chunk, merged as online-softmax states) too.
#[test]
fn pooled_map_on_every_path_and_on_split_chunks() {
    let (sq, sk, hq) = (150, 170, 2);
    let q = random_tensor(DType::BF16, &[1, sq, hq, 64], 1.0, 31);
    let k = random_tensor(DType::BF16, &[1, sk, 1, 64], 1.0, 32);
    let v = random_tensor(DType::BF16, &[1, sk, 1, 64], 1.0, 33);
    let (qv, kv, vv) = (
        q.view("q").unwrap(),
        k.view("k").unwrap(),
        v.view("v").unwrap(),
    );
    let (nq, nk) = (sq.div_ceil(50), sk.div_ceil(50));
    let table: Vec<u8> = (0..hq * nq * nk).map(|i| ((i * 5) % 7 < 4) as u8).collect();
    let sched = BlockSchedule::from_block_mask(&table, [1, hq, nq, nk], 50, 50, sq, sk).unwrap();
    let allowed =
        |_: usize, h: usize, i: usize, j: usize| table[(h * nq + i / 50) * nk + j / 50] != 0;
    let (mass, max) =
        attention_map_f64(&qv, &kv, &vv, &AttnParams::default(), &allowed, 64).unwrap();
    for isa in Isa::ALL.into_iter().filter(|i| i.available()) {
        let params = AttnParams {
            isa: Some(isa),
            ..Default::default()
        };
        let mask = MaskSpec::Schedule {
            schedule: &sched,
            rows: None,
        };
        let (_, map) = forward_with_map(&qv, &kv, &vv, &params, mask, 64).unwrap();
        let (em, ex) = (worst(&map.mass, &mass), worst(&map.max, &max));
        assert!(em <= 1e-3 && ex <= 1e-3, "{isa:?}: mass {em:e}, max {ex:e}");
    }
}

/// A block that is not a multiple of the kernel's 64-key chunk is refused, naming it.
#[test]
fn pooled_map_block_is_checked() {
    let q = random_tensor(DType::F32, &[1, 10, 1, 16], 1.0, 1);
    let (qv, kv) = (q.view("q").unwrap(), q.view("k").unwrap());
    for block in [0, 32, 100] {
        let e = forward_with_map(&qv, &kv, &kv, &AttnParams::default(), MaskSpec::Full, block)
            .unwrap_err();
        assert!(e.to_string().contains("multiple of 64"), "{e}");
    }
}
