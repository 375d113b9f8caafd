//! Scores against the f64 reference (LSE from the cache's own attention), ragged compressed heads,
//! GQA, every reduction and kind; the chunk fold equals token-by-token folds; rows sum to one.
use super::*;
use crate::attention::AttnParams;
use crate::kv::KvConfig;
use crate::testing::Rng;

fn randn(n: usize, rng: &mut Rng) -> Vec<f32> {
    (0..n).map(|_| rng.normal() as f32).collect()
}

/// One sequence of `len` random positions in a cache of one layer; the K/V appended are returned.
fn cache_of(
    len: usize,
    hk: usize,
    d: usize,
    seed: u64,
) -> (PagedKvCache, SeqId, Vec<f32>, Vec<f32>) {
    let cfg = KvConfig {
        layers: 1,
        kv_heads: hk,
        head_dim: d,
        v_dim: d,
        page_size: 16,
    };
    let mut c = PagedKvCache::new(cfg).unwrap();
    let a = c.add_sequence();
    let mut rng = Rng::new(seed);
    // Larger keys than unit variance: peaked attention, so the scores differ a lot.
    let k: Vec<f32> = randn(len * hk * d, &mut rng)
        .iter()
        .map(|x| 2.0 * x)
        .collect();
    let v = randn(len * hk * d, &mut rng);
    c.append(a, &[(&k, &v)]).unwrap();
    (c, a, k, v)
}

fn close(got: &[Vec<f32>], want: &[Vec<f64>], what: &str) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g.len(), w.len(), "{what}");
        let scale = w.iter().fold(1.0f64, |a, &x| a.max(x.abs()));
        for (j, (&x, &y)) in g.iter().zip(w).enumerate() {
            assert!(
                (x as f64 - y).abs() <= 1e-4 * scale,
                "{what}: entry {j}: {x} vs {y}"
            );
        }
    }
}

#[test]
fn column_scores_against_reference() {
    let d = 16;
    let masks = [
        Some("causal"),
        Some("causal & (sinks(3) | window(20,0))"),
        None,
    ];
    for &len in &[7usize, 65, 113, 1023] {
        for &(hq, hk) in &[(6, 2), (4, 4), (5, 1)] {
            let (mut c, a, _, _) = cache_of(len, hk, d, (len + hq * 10 + hk) as u64);
            let mut rng = Rng::new(len as u64);
            // Compress the second head (ragged heads); keep the last position in every head.
            if hk > 1 {
                let mut keep: Vec<usize> = (0..len - 1).filter(|_| rng.uniform() < 0.4).collect();
                keep.push(len - 1);
                c.compress(a, 0, 1, &keep).unwrap();
            }
            for &sq in &[1usize, 7, 65] {
                let sq = sq.min(len);
                let qd = randn(sq * hq * d, &mut rng);
                let q = TensorView::contiguous(&qd[..], [1, sq, hq, d]).unwrap();
                for mask in masks {
                    let expr = mask.map(|m| MaskExpr::parse(m).unwrap());
                    let att = c
                        .attend(a, 0, &q, expr.as_ref(), &AttnParams::default())
                        .unwrap();
                    let obs = Observation {
                        q: &q,
                        lse: &att.lse,
                        mask: expr.as_ref(),
                        select: None,
                    };
                    for kind in [
                        ScoreKind::H2o,
                        ScoreKind::A2sf(0.9),
                        ScoreKind::Tova,
                        ScoreKind::SnapKv(5),
                    ] {
                        for reduce in [Reduce::Mean, Reduce::Max, Reduce::Sum] {
                            let p = ScoreParams {
                                reduce,
                                ..Default::default()
                            };
                            let (_, w) = kind.weights(sq);
                            let got = column_scores(&c, a, 0, &obs, &w, &p).unwrap();
                            let want = column_scores_reference(&c, a, 0, &obs, &w, &p).unwrap();
                            close(&got, &want, &format!("len {len} hq {hq} hk {hk} sq {sq} {mask:?} {kind:?} {reduce:?}"));
                        }
                    }
                    // Each row's probabilities sum to 1: with w = 1 and a sum over the group, the
                    // columns of a head that holds every position add up to G x Sq.
                    let p = ScoreParams {
                        reduce: Reduce::Sum,
                        ..Default::default()
                    };
                    let got = column_scores(&c, a, 0, &obs, &vec![1.0; sq], &p).unwrap();
                    let total: f64 = got[0].iter().map(|&x| x as f64).sum();
                    let want = (hq / hk * sq) as f64;
                    assert!((total - want).abs() <= 1e-4 * want, "{total} vs {want}");
                }
            }
        }
    }
}

#[test]
fn a_chunk_folds_as_its_single_steps() {
    let (d, hq, hk, len, sq) = (8, 4, 2, 70, 9);
    let (full, a, k, v) = cache_of(len, hk, d, 3);
    let mut rng = Rng::new(8);
    let qd = randn(sq * hq * d, &mut rng);
    let causal = MaskExpr::parse("causal").unwrap();
    for kind in [ScoreKind::H2o, ScoreKind::A2sf(0.8), ScoreKind::Tova] {
        let params = ScoreParams::default();
        // One chunk of the last sq rows.
        let mut chunk = KvScores::new(&full, kind, params).unwrap();
        let q = TensorView::contiguous(&qd[..], [1, sq, hq, d]).unwrap();
        let att = full
            .attend(a, 0, &q, Some(&causal), &AttnParams::default())
            .unwrap();
        let obs = Observation {
            q: &q,
            lse: &att.lse,
            mask: Some(&causal),
            select: None,
        };
        chunk.observe(&full, a, 0, &obs).unwrap();
        // The same positions one by one, the cache growing with them.
        let row = hk * d;
        let cfg = full.config();
        let mut c = PagedKvCache::new(cfg).unwrap();
        let b = c.add_sequence();
        let first = len - sq;
        c.append(b, &[(&k[..first * row], &v[..first * row])])
            .unwrap();
        let mut steps = KvScores::new(&c, kind, params).unwrap();
        for i in 0..sq {
            let p = first + i;
            c.append(
                b,
                &[(&k[p * row..(p + 1) * row], &v[p * row..(p + 1) * row])],
            )
            .unwrap();
            let qi = &qd[i * hq * d..(i + 1) * hq * d];
            let q1 = TensorView::contiguous(qi, [1, 1, hq, d]).unwrap();
            let att = c.decode(&[b], 0, &q1, &Default::default()).unwrap();
            let obs = Observation {
                q: &q1,
                lse: &att.lse,
                mask: None,
                select: None,
            };
            steps.observe(&c, b, 0, &obs).unwrap();
        }
        for kh in 0..hk {
            let (x, y) = (chunk.head(0, kh), steps.head(0, kh));
            assert_eq!(x.len(), len);
            assert_eq!(y.len(), len);
            for j in 0..len {
                assert!(
                    (x[j] - y[j]).abs() <= 1e-5 * (1.0 + y[j].abs()),
                    "{kind:?} head {kh} entry {j}: chunk {} vs steps {}",
                    x[j],
                    y[j]
                );
            }
        }
    }
}

#[test]
fn bad_input_is_refused() {
    let (c, a, _, _) = cache_of(20, 2, 8, 1);
    for (kind, what) in [
        (ScoreKind::A2sf(1.5), "outside [0, 1]"),
        (ScoreKind::SnapKv(0), "window"),
    ] {
        let e = KvScores::new(&c, kind, ScoreParams::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains(what), "{e}");
    }
    assert!(Reduce::parse("median")
        .unwrap_err()
        .to_string()
        .contains("mean, max or sum"));
    let qd = [0.3f32; 2 * 3 * 8];
    let q = TensorView::contiguous(&qd[..], [1, 2, 3, 8]).unwrap();
    let lse = [0.0f32; 6];
    let obs = Observation {
        q: &q,
        lse: &lse,
        mask: None,
        select: None,
    };
    let e = column_scores(&c, a, 0, &obs, &[1.0, 1.0], &ScoreParams::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("multiple of the 2 KV heads"), "{e}");
    let q = TensorView::contiguous(&qd[..], [1, 3, 2, 8]).unwrap();
    let obs = Observation {
        q: &q,
        lse: &lse[..5],
        mask: None,
        select: None,
    };
    let e = column_scores(&c, a, 0, &obs, &[1.0; 3], &ScoreParams::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("lse"), "{e}");
}

/// `first_row` is where each kind's weights start: every row before it weighs 0, the row at it
/// does not (Sq 1, 7, 300; SnapKV windows shorter and longer than the chunk).
#[test]
fn first_row_is_the_first_weighted_row() {
    for sq in [1usize, 7, 300] {
        for kind in [
            ScoreKind::H2o,
            ScoreKind::A2sf(0.5),
            ScoreKind::Tova,
            ScoreKind::SnapKv(1),
            ScoreKind::SnapKv(5),
            ScoreKind::SnapKv(1000),
        ] {
            let (_, w) = kind.weights(sq);
            let f = kind.first_row(sq);
            assert!(w[..f].iter().all(|&x| x == 0.0), "{kind:?} sq {sq}");
            assert!(w[f] > 0.0, "{kind:?} sq {sq}: row {f} weighs 0");
        }
    }
}
