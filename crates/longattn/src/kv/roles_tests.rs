//! Head roles: the probe's scores from the kernel's LSE equal the f64 softmax reference; a head
//! planted to copy scores near 1 and a random one low; role selection by ratio and threshold;
//! bad tables and probes are refused with clear errors.
use super::*;
use crate::attention::AttnParams;
use crate::kv::KvConfig;
use crate::mask::MaskExpr;
use crate::testing::Rng;

const HQ: usize = 4;
const HK: usize = 2;
const D: usize = 16;

fn randn(n: usize, rng: &mut Rng) -> Vec<f32> {
    (0..n).map(|_| rng.normal() as f32).collect()
}

/// A cache of one layer holding `len` random positions and its sequence.
fn cache_of(len: usize, rng: &mut Rng) -> (PagedKvCache, SeqId, Vec<f32>) {
    let cfg = KvConfig {
        layers: 1,
        kv_heads: HK,
        head_dim: D,
        v_dim: D,
        page_size: 16,
    };
    let mut c = PagedKvCache::new(cfg).unwrap();
    let a = c.add_sequence();
    let k = randn(len * HK * D, rng);
    let v = randn(len * HK * D, rng);
    c.append(a, &[(&k, &v)]).unwrap();
    (c, a, k)
}

fn lse_of(c: &PagedKvCache, a: SeqId, q: &TensorView) -> Vec<f32> {
    let causal = MaskExpr::parse("causal").unwrap();
    c.attend(a, 0, q, Some(&causal), &AttnParams::default())
        .unwrap()
        .lse
}

#[test]
fn probe_scores_from_the_lse_equal_the_f64_softmax() {
    let mut rng = Rng::new(41);
    let scale = 1.0 / (D as f32).sqrt();
    for &(prefix, r) in &[(0usize, 2usize), (1, 7), (3, 31), (1, 57), (0, 113)] {
        let len = prefix + 2 * r;
        let (c, a, _) = cache_of(len, &mut rng);
        let qd: Vec<f32> = randn(len * HQ * D, &mut rng)
            .iter()
            .map(|x| 3.0 * x)
            .collect();
        let q = TensorView::contiguous(&qd[..], [1, len, HQ, D]).unwrap();
        let lse = lse_of(&c, a, &q);
        let got = retrieval_scores(&c, a, 0, &q, &lse, scale, prefix, r).unwrap();
        let want = retrieval_scores_reference(&c, a, 0, &q, scale, prefix, r).unwrap();
        assert_eq!(got.len(), HK);
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (g - w).abs() <= 1e-5 * w.max(1e-3),
                "prefix {prefix} R {r}: {g} vs {w}"
            );
            assert!(*w >= 0.0 && *w <= 1.0 + 1e-12);
        }
    }
}

#[test]
fn a_planted_copy_head_scores_high_and_a_random_head_low() {
    let mut rng = Rng::new(7);
    let (prefix, r) = (1usize, 65usize);
    let len = prefix + 2 * r;
    let (c, a, k) = cache_of(len, &mut rng);
    // Query head 1 (KV head 0's group) looks for the echo key of its row; the rest are random.
    let mut qd = randn(len * HQ * D, &mut rng);
    for i in 0..r {
        let row = prefix + r + i;
        let j = prefix + i;
        for x in 0..D {
            qd[(row * HQ + 1) * D + x] = 4.0 * k[(j * HK) * D + x];
        }
    }
    let q = TensorView::contiguous(&qd[..], [1, len, HQ, D]).unwrap();
    let lse = lse_of(&c, a, &q);
    let s = retrieval_scores(&c, a, 0, &q, &lse, 1.0 / (D as f32).sqrt(), prefix, r).unwrap();
    assert!(s[0] > 0.9, "planted head: {s:?}");
    assert!(s[1] < 0.3, "random head: {s:?}");
    let roles = HeadRoles::from_scores(vec![s], RoleSelect::Ratio(0.5), prefix, r).unwrap();
    assert_eq!(roles.retrieval, vec![vec![true, false]]);
}

#[test]
fn roles_are_chosen_by_ratio_or_threshold() {
    let mut rng = Rng::new(3);
    for &(layers, hk) in &[(1usize, 1usize), (3, 2), (7, 5), (30, 3)] {
        // Quantised scores: many ties.
        let scores: Vec<Vec<f64>> = (0..layers)
            .map(|_| {
                (0..hk)
                    .map(|_| (rng.uniform() * 5.0).floor() / 5.0)
                    .collect()
            })
            .collect();
        let flat: Vec<f64> = scores.iter().flatten().copied().collect();
        for f in [0.0, 0.1, 0.5, 0.99, 1.0] {
            let r = HeadRoles::from_scores(scores.clone(), RoleSelect::Ratio(f), 0, 8).unwrap();
            r.check(layers, hk).unwrap();
            let chosen: Vec<bool> = r.retrieval.iter().flatten().copied().collect();
            let n = (f * flat.len() as f64).ceil() as usize;
            assert_eq!(chosen.iter().filter(|&&c| c).count(), n, "ratio {f}");
            // Every chosen head scores at least every other; ties go to the lower index.
            for (i, &ci) in chosen.iter().enumerate() {
                for (j, &cj) in chosen.iter().enumerate() {
                    if ci && !cj {
                        assert!(
                            flat[i] > flat[j] || (flat[i] == flat[j] && i < j),
                            "ratio {f}: {i} chosen over {j}"
                        );
                    }
                }
            }
            assert!((r.retrieval_fraction() - n as f64 / flat.len() as f64).abs() < 1e-12);
        }
        for t in [0.0, 0.4, 0.8, 2.0] {
            let r = HeadRoles::from_scores(scores.clone(), RoleSelect::Threshold(t), 0, 8).unwrap();
            for (l, row) in scores.iter().enumerate() {
                for (kh, &x) in row.iter().enumerate() {
                    assert_eq!(r.is_retrieval(l, kh), x >= t);
                }
            }
            assert_eq!(r.select, format!("threshold={t}"));
            assert_eq!(r.reselect(RoleSelect::Threshold(t)).unwrap(), r);
        }
    }
}

#[test]
fn bad_tables_and_probes_are_refused() {
    let ok = vec![vec![0.5, 0.1], vec![0.2, 0.9]];
    for (scores, sel, what) in [
        (ok.clone(), RoleSelect::Ratio(1.5), "outside [0, 1]"),
        (ok.clone(), RoleSelect::Threshold(f64::NAN), "not finite"),
        (
            vec![vec![0.5, 0.1], vec![0.2]],
            RoleSelect::Ratio(0.5),
            "as many KV heads",
        ),
        (vec![], RoleSelect::Ratio(0.5), "non-empty"),
        (
            vec![vec![f64::INFINITY]],
            RoleSelect::Ratio(0.5),
            "not finite",
        ),
    ] {
        let e = HeadRoles::from_scores(scores, sel, 0, 4)
            .unwrap_err()
            .to_string();
        assert!(e.contains(what), "{e}");
    }
    let r = HeadRoles::from_scores(ok, RoleSelect::Ratio(0.5), 0, 4).unwrap();
    let e = r.check(3, 2).unwrap_err().to_string();
    assert!(
        e.contains("2 layers x 2 KV heads, the model has 3 x 2"),
        "{e}"
    );
    let mut bad = r.clone();
    bad.retrieval[1].pop();
    assert!(bad
        .check(2, 2)
        .unwrap_err()
        .to_string()
        .contains("not 2 x 2"));
    // The probe needs the whole sequence in one chunk, and copies of 2 tokens or more.
    let mut rng = Rng::new(1);
    let (c, a, _) = cache_of(20, &mut rng);
    let qd = randn(HQ * D, &mut rng);
    let q = TensorView::contiguous(&qd[..], [1, 1, HQ, D]).unwrap();
    let e = retrieval_scores(&c, a, 0, &q, &[0.0; HQ], 1.0, 0, 10)
        .unwrap_err()
        .to_string();
    assert!(e.contains("in one chunk"), "{e}");
    let e = retrieval_scores_reference(&c, a, 0, &q, 1.0, 18, 1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("must be >= 2"), "{e}");
}
