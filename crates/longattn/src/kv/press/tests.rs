//! Presses: the grammar and its errors; every policy's fast keep set equals its reference (ties
//! included); budget 1.0 is the full cache bit for bit under decode-time compression; streaming
//! under decode-time eviction is attention under `causal & (sinks(S) | window(W-1,0))`; a failed
//! compression changes nothing; freed pages are counted exactly.
use super::*;
use crate::attention::AttnParams;
use crate::kv::decode::DecodeParams;
use crate::kv::score::{Observation, ScoreParams};
use crate::kv::KvConfig;
use crate::mask::MaskExpr;
use crate::tensor::TensorView;
use crate::testing::{Rng, AWKWARD_SIZES};

fn randn(n: usize, rng: &mut Rng) -> Vec<f32> {
    (0..n).map(|_| rng.normal() as f32).collect()
}

#[test]
fn specs_parse_print_and_refuse_bad_input() {
    for (text, want) in [
        (
            "snapkv(budget=0.2,window=32)",
            Press::SnapKv {
                budget: 0.2,
                window: 32,
                kernel: 5,
                pool: Pool::Max,
            },
        ),
        (
            "streaming(sinks=4,window=1020)",
            Press::Streaming {
                sinks: 4,
                window: 1020,
            },
        ),
        (
            " h2o( budget = 0.2 ) ",
            Press::H2o {
                budget: 0.2,
                recent: 0.5,
                score: Accum::Sum,
            },
        ),
        (
            "h2o(budget=0.2,recent=0,score=mean)",
            Press::H2o {
                budget: 0.2,
                recent: 0.0,
                score: Accum::Mean,
            },
        ),
        (
            "snapkv(budget=0.5,window=64,pool=avg)",
            Press::SnapKv {
                budget: 0.5,
                window: 64,
                kernel: 5,
                pool: Pool::Avg,
            },
        ),
        (
            "pyramid(budget=0.5,beta=3,pool=avg)",
            Press::Pyramid {
                budget: 0.5,
                window: 32,
                kernel: 5,
                beta: 3.0,
                pool: Pool::Avg,
                counts: LayerCounts::Ceil,
            },
        ),
        (
            "pyramid(budget=0.2,window=64,beta=3,counts=kvpress)",
            Press::Pyramid {
                budget: 0.2,
                window: 64,
                kernel: 5,
                beta: 3.0,
                pool: Pool::Max,
                counts: LayerCounts::Kvpress,
            },
        ),
        (
            "tova(budget=0.2,heads=layer)",
            Press::Tova {
                budget: 0.2,
                heads: Heads::Layer,
            },
        ),
        (
            "a2sf(budget=0.2,f=0.95)",
            Press::A2sf {
                budget: 0.2,
                f: 0.95,
            },
        ),
        (
            "tova(budget=0.2)",
            Press::Tova {
                budget: 0.2,
                heads: Heads::Group,
            },
        ),
        ("knorm(budget=1)", Press::Knorm { budget: 1.0 }),
        (
            "streaming(window=8)",
            Press::Streaming {
                sinks: 4,
                window: 8,
            },
        ),
    ] {
        let p = Press::parse(text).unwrap();
        assert_eq!(p, want, "{text}");
        assert_eq!(
            Press::parse(&p.to_string()).unwrap(),
            p,
            "round trip of {p}"
        );
    }
    for (text, what) in [
        ("quest(budget=0.2)", "unknown press `quest`"),
        ("h2o(budget=0)", "budget 0 outside (0, 1]"),
        ("h2o(budget=1.5)", "outside (0, 1]"),
        ("tova(budget=-0.1)", "outside (0, 1]"),
        ("h2o", "`budget` is required"),
        ("streaming(sinks=4)", "`window` is required"),
        ("h2o(budget=0.2,window=3)", "unknown argument `window`"),
        ("h2o(budget=abc)", "not a finite number"),
        ("h2o(budget=0.2", "must end with `)`"),
        ("h2o(budget=0.2,budget=0.3)", "given twice"),
        ("h2o(budget=0.2,recent=1.5)", "recent = 1.5 outside [0, 1]"),
        (
            "h2o(budget=0.2,score=max)",
            "`score=max` is not one of sum, mean",
        ),
        (
            "snapkv(budget=0.2,pool=1)",
            "`pool=1` is not one of max, avg",
        ),
        ("tova(budget=0.2,heads=all)", "not one of group, layer"),
        ("snapkv(budget=0.2,kernel=4)", "kernel odd"),
        ("snapkv(budget=0.2,window=0)", "window must be >= 1"),
        ("a2sf(budget=0.2,f=1.2)", "outside [0, 1]"),
        ("streaming(sinks=0,window=0)", "must be >= 1"),
        ("streaming(sinks=2.5,window=8)", "non-negative integer"),
        ("(budget=0.2)", "no press name"),
    ] {
        let e = Press::parse(text).unwrap_err().to_string();
        assert!(e.contains(what), "{text}: {e}");
    }
}

#[test]
fn fast_keep_sets_equal_the_references() {
    let mut rng = Rng::new(17);
    let d = 8;
    let presses = [
        Press::Streaming {
            sinks: 4,
            window: 20,
        },
        Press::Streaming {
            sinks: 0,
            window: 3,
        },
        Press::H2o {
            budget: 0.3,
            recent: 0.5,
            score: Accum::Sum,
        },
        Press::H2o {
            budget: 0.3,
            recent: 0.0,
            score: Accum::Mean,
        },
        Press::A2sf {
            budget: 0.3,
            f: 0.9,
        },
        Press::SnapKv {
            budget: 0.3,
            window: 8,
            kernel: 5,
            pool: Pool::Max,
        },
        Press::SnapKv {
            budget: 0.3,
            window: 8,
            kernel: 7,
            pool: Pool::Avg,
        },
        Press::SnapKv {
            budget: 0.3,
            window: 100,
            kernel: 1,
            pool: Pool::Max,
        },
        Press::Tova {
            budget: 0.3,
            heads: Heads::Group,
        },
        Press::Tova {
            budget: 0.3,
            heads: Heads::Layer,
        },
        Press::Knorm { budget: 0.3 },
    ];
    for &len in &AWKWARD_SIZES[..6] {
        // Scores with many ties (quantised), some entries unscored (appended since the last fold).
        let scores: Vec<f32> = (0..len.saturating_sub(2))
            .map(|_| (rng.uniform() * 6.0).floor() as f32)
            .collect();
        let keys: Vec<f32> = (0..len * d)
            .map(|_| (rng.normal() * 2.0).round() as f32)
            .collect();
        for press in &presses {
            for n in [0, 1, len / 3, len.saturating_sub(1), len, len + 5] {
                let h = HeadInput {
                    len,
                    n,
                    scores: &scores,
                    keys: &keys,
                    head_dim: d,
                };
                let (got, want) = (keep(press, &h), keep_reference(press, &h));
                assert_eq!(got, want, "{press} len {len} n {n}");
                let expect = n.min(len);
                assert_eq!(got.len(), expect, "{press} len {len} n {n}");
                assert!(got.windows(2).all(|w| w[0] < w[1]));
            }
        }
    }
}

/// One attention result: output and LSE.
type Outputs = (Vec<f32>, Vec<f32>);

const HQ: usize = 4;
const HK: usize = 2;
const D: usize = 16;
const LAYERS: usize = 2;

/// A decode-time run: `prefill` random positions appended and attended as one causal chunk, then
/// `steps` single positions, each attended (per-layer `attend` and the batched decode), observed
/// for the press's scores and compressed with headroom 1. Returns every attention output and LSE
/// (the chunk's and each step's, `attend` then `decode`) and the final cache.
fn run(
    press: Option<&Press>,
    prefill: usize,
    steps: usize,
    seed: u64,
) -> (Vec<Outputs>, PagedKvCache) {
    let cfg = KvConfig {
        layers: LAYERS,
        kv_heads: HK,
        head_dim: D,
        v_dim: D,
        page_size: 16,
    };
    let mut c = PagedKvCache::new(cfg).unwrap();
    let a = c.add_sequence();
    let mut rng = Rng::new(seed);
    let causal = MaskExpr::parse("causal").unwrap();
    let mut scores = press
        .and_then(|p| p.score_kind())
        .map(|k| KvScores::new(&c, k, ScoreParams::default()).unwrap());
    let mut outs = Vec::new();
    let chunks = std::iter::once(prefill).chain(std::iter::repeat_n(1, steps));
    for n in chunks.filter(|&n| n > 0) {
        let kv: Vec<(Vec<f32>, Vec<f32>)> = (0..LAYERS)
            .map(|_| (randn(n * HK * D, &mut rng), randn(n * HK * D, &mut rng)))
            .collect();
        let refs: Vec<(&[f32], &[f32])> = kv.iter().map(|(k, v)| (&k[..], &v[..])).collect();
        c.append(a, &refs).unwrap();
        for l in 0..LAYERS {
            let qd = randn(n * HQ * D, &mut rng);
            let q = TensorView::contiguous(&qd[..], [1, n, HQ, D]).unwrap();
            let r = c
                .attend(a, l, &q, Some(&causal), &AttnParams::default())
                .unwrap();
            if let Some(s) = scores.as_mut() {
                let obs = Observation {
                    q: &q,
                    lse: &r.lse,
                    mask: Some(&causal),
                    select: None,
                };
                s.observe(&c, a, l, &obs).unwrap();
            }
            outs.push((r.out.data.to_f32_vec(), r.lse));
            if n == 1 {
                let r = c.decode(&[a], l, &q, &DecodeParams::default()).unwrap();
                outs.push((r.out.data.to_f32_vec(), r.lse));
            }
        }
        if let Some(p) = press {
            compress(&mut c, a, p, scores.as_mut(), 1).unwrap();
        }
    }
    (outs, c)
}

#[test]
fn budget_one_is_the_full_cache_bit_for_bit() {
    let (full, fc) = run(None, 37, 30, 5);
    for text in [
        "h2o(budget=1)",
        "a2sf(budget=1,f=0.9)",
        "snapkv(budget=1,window=8)",
        "tova(budget=1)",
        "knorm(budget=1)",
        "streaming(sinks=4,window=100)",
    ] {
        let press = Press::parse(text).unwrap();
        let (got, c) = run(Some(&press), 37, 30, 5);
        assert_eq!(got, full, "{text}");
        assert_eq!(c.memory(), fc.memory(), "{text}");
    }
}

#[test]
fn presses_cut_every_head_to_its_budget_and_free_pages() {
    for text in [
        "h2o(budget=0.2)",
        "a2sf(budget=0.25,f=0.95)",
        "snapkv(budget=0.3,window=8)",
        "tova(budget=0.2)",
        "knorm(budget=0.2)",
        "streaming(sinks=4,window=20)",
    ] {
        let press = Press::parse(text).unwrap();
        let (prefill, steps) = (113, 20);
        let (_, c) = run(Some(&press), prefill, steps, 9);
        let a = SeqId(0);
        let len = prefill + steps;
        let n = press.target(len, 1);
        let m = c.memory();
        let mut pages = 0;
        for l in 0..LAYERS {
            for kh in 0..HK {
                let h = c.head_len(a, l, kh).unwrap();
                assert_eq!(h, n, "{text} layer {l} head {kh}");
                pages += h.div_ceil(16);
                let pos = c.positions(a, l, kh).unwrap();
                // The newest position is always kept by the presses with a recent window.
                if matches!(
                    press,
                    Press::H2o { .. } | Press::SnapKv { .. } | Press::Streaming { .. }
                ) {
                    assert_eq!(*pos.last().unwrap() as usize, len - 1, "{text}");
                }
            }
        }
        assert_eq!(m.pages_in_use, pages, "{text}");
        assert_eq!(m.bytes_entries, LAYERS * HK * n * 2 * D * 4);
        assert_eq!(m.bytes_full, LAYERS * HK * len * 2 * D * 4);
        if let Press::Streaming { sinks, .. } = press {
            let pos = c.positions(a, 0, 0).unwrap();
            assert!(pos[..sinks]
                .iter()
                .enumerate()
                .all(|(i, &p)| p as usize == i));
        }
    }
}

#[test]
fn streaming_eviction_is_attention_under_the_sinks_and_window_mask() {
    for &(sinks, window) in &[(4usize, 20usize), (1, 7), (0, 33), (16, 1)] {
        let press = Press::Streaming { sinks, window };
        let cfg = KvConfig {
            layers: 1,
            kv_heads: HK,
            head_dim: D,
            v_dim: D,
            page_size: 16,
        };
        let mask = MaskExpr::parse(&format!(
            "causal & (sinks({sinks}) | window({},0))",
            window - 1
        ))
        .unwrap();
        let (mut evicted, mut full) = (
            PagedKvCache::new(cfg).unwrap(),
            PagedKvCache::new(cfg).unwrap(),
        );
        let (a, b) = (evicted.add_sequence(), full.add_sequence());
        let mut rng = Rng::new((sinks * 100 + window) as u64);
        for p in 0..130 {
            let (k, v) = (randn(HK * D, &mut rng), randn(HK * D, &mut rng));
            evicted.append(a, &[(&k, &v)]).unwrap();
            full.append(b, &[(&k, &v)]).unwrap();
            let qd = randn(HQ * D, &mut rng);
            let q = TensorView::contiguous(&qd[..], [1, 1, HQ, D]).unwrap();
            let want = full
                .attend(b, 0, &q, Some(&mask), &AttnParams::default())
                .unwrap();
            let got = [
                evicted
                    .attend(a, 0, &q, None, &AttnParams::default())
                    .unwrap(),
                evicted
                    .decode(&[a], 0, &q, &DecodeParams::default())
                    .unwrap(),
            ];
            for g in got {
                let (x, y) = (g.out.data.to_f32_vec(), want.out.data.to_f32_vec());
                let e = x
                    .iter()
                    .zip(&y)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max);
                let el = g
                    .lse
                    .iter()
                    .zip(&want.lse)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max);
                assert!(
                    e <= 2e-5 && el <= 1e-4,
                    "S {sinks} W {window} position {p}: out {e:.2e} lse {el:.2e}"
                );
            }
            compress(&mut evicted, a, &press, None, 1).unwrap();
            assert!(evicted.head_len(a, 0, 0).unwrap() < sinks + window);
        }
    }
}

#[test]
fn failed_compression_leaves_cache_and_scores_as_they_were() {
    let press = Press::parse("h2o(budget=0.2)").unwrap();
    let (_, mut c) = run(None, 65, 3, 2);
    let a = SeqId(0);
    let before: Vec<_> = (0..HK).map(|kh| c.gather_head(a, 1, kh).unwrap()).collect();
    let mem = c.memory();
    let e = compress(&mut c, a, &press, None, 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not collected"), "{e}");
    let mut tova = KvScores::new(&c, ScoreKind::Tova, ScoreParams::default()).unwrap();
    let e = compress(&mut c, a, &press, Some(&mut tova), 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("the scores given are Tova"), "{e}");
    // Scores out of step with the cache (more scores than entries in one head).
    let mut h2o = KvScores::new(&c, ScoreKind::H2o, ScoreParams::default()).unwrap();
    h2o.scores[3] = vec![1.0; 1000];
    let snapshot = h2o.clone();
    let e = compress(&mut c, a, &press, Some(&mut h2o), 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("out of step"), "{e}");
    assert_eq!(h2o, snapshot);
    let after: Vec<_> = (0..HK).map(|kh| c.gather_head(a, 1, kh).unwrap()).collect();
    assert_eq!(before, after);
    assert_eq!(c.memory(), mem);
    let bad = Press::H2o {
        budget: 2.0,
        recent: 0.5,
        score: Accum::Sum,
    };
    assert!(compress(&mut c, a, &bad, None, 0)
        .unwrap_err()
        .to_string()
        .contains("outside (0, 1]"));
}

/// PyramidKV: beta = 1 is SnapKV bit for bit; otherwise each layer holds its own budget,
/// decreasing with depth and averaging the press's budget; its spec prints back and a beta
/// below 1 is refused.
#[test]
fn pyramid_budgets_decrease_with_depth_around_the_mean() {
    let flat = Press::parse("pyramid(budget=0.3,window=8,beta=1)").unwrap();
    let snap = Press::parse("snapkv(budget=0.3,window=8)").unwrap();
    let (a, ca) = run(Some(&flat), 113, 20, 4);
    let (b, cb) = run(Some(&snap), 113, 20, 4);
    assert_eq!(a, b);
    assert_eq!(ca.memory(), cb.memory());
    let text = "pyramid(budget=0.3,window=8,kernel=5,beta=3)";
    let press = Press::parse(text).unwrap();
    assert_eq!(press.to_string(), text);
    let (prefill, steps) = (113, 20);
    let (_, c) = run(Some(&press), prefill, steps, 9);
    let len = prefill + steps;
    let mut per_layer = Vec::new();
    for l in 0..LAYERS {
        let n = press.layer_target(len, 1, l, LAYERS);
        for kh in 0..HK {
            assert_eq!(
                c.head_len(SeqId(0), l, kh).unwrap(),
                n,
                "layer {l} head {kh}"
            );
        }
        per_layer.push(n);
    }
    assert!(per_layer.windows(2).all(|w| w[0] > w[1]), "{per_layer:?}");
    let first = press.layer_budget(0, LAYERS).unwrap();
    let last = press.layer_budget(LAYERS - 1, LAYERS).unwrap();
    assert!((first / last - 3.0).abs() < 1e-12, "{first} / {last}");
    let mean: f64 = (0..LAYERS)
        .map(|l| press.layer_budget(l, LAYERS).unwrap())
        .sum::<f64>()
        / LAYERS as f64;
    assert!((mean - 0.3).abs() < 1e-12, "{mean}");
    // A first layer's budget past 1 is clamped.
    let wide = Press::parse("pyramid(budget=0.9,beta=10)").unwrap();
    assert_eq!(wide.layer_budget(0, 4), Some(1.0));
    for (bad, want) in [
        ("pyramid(budget=0.3,beta=0.5)", "must be >= 1"),
        ("pyramid(budget=0.3,kernel=2)", "kernel odd"),
        ("pyramid(window=8)", "`budget` is required"),
    ] {
        let e = Press::parse(bad).unwrap_err().to_string();
        assert!(e.contains(want), "{bad}: {e}");
    }
}

#[test]
fn duo_specs_parse_and_refuse_bad_input() {
    use crate::kv::roles::RoleSelect;
    use crate::kv::spec::KvSpec;
    for (text, want) in [
        (
            "duo(sinks=4,window=256,ratio=0.5)",
            Press::Duo {
                sinks: 4,
                window: 256,
                select: Some(RoleSelect::Ratio(0.5)),
            },
        ),
        (
            "duo(window=8,threshold=0.25)",
            Press::Duo {
                sinks: 4,
                window: 8,
                select: Some(RoleSelect::Threshold(0.25)),
            },
        ),
        (
            "duo(sinks=0,window=8)",
            Press::Duo {
                sinks: 0,
                window: 8,
                select: None,
            },
        ),
    ] {
        let p = Press::parse(text).unwrap();
        assert_eq!(p, want, "{text}");
        assert_eq!(Press::parse(&p.to_string()).unwrap(), p);
    }
    let s = KvSpec::parse("duo(sinks=2,window=16,roles=/tmp/r.json)+kivi(bits=4)").unwrap();
    assert_eq!(s.roles.as_deref(), Some("/tmp/r.json"));
    assert!(s.needs_roles());
    assert_eq!(KvSpec::parse(&s.to_string()).unwrap(), s, "{s}");
    for (text, what) in [
        ("duo(window=8,ratio=1.5)", "outside [0, 1]"),
        ("duo(window=8,ratio=0.5,threshold=0.1)", "not both"),
        ("duo(sinks=4)", "`window` is required"),
        ("duo(sinks=0,window=0)", "must be >= 1"),
        ("duo(window=8,roles=r.json)", "a --kv spec reads"),
        ("duo(window=8,roles=)", "names no file"),
        ("duo(window=8,roles=a,roles=b)", "given twice"),
        ("h2o(budget=0.2,roles=r.json)", "unknown argument `roles`"),
    ] {
        let e = Press::parse(text).unwrap_err().to_string();
        assert!(e.contains(what), "{text}: {e}");
    }
}

#[test]
fn duo_keeps_retrieval_heads_whole_and_cuts_streaming_heads_to_sinks_and_window() {
    use crate::kv::roles::{HeadRoles, RoleSelect};
    let (sinks, window) = (3usize, 17usize);
    let press = Press::Duo {
        sinks,
        window,
        select: None,
    };
    // Layer 0: KV head 0 retrieval; layer 1: KV head 1.
    let roles = HeadRoles::from_scores(
        vec![vec![0.9, 0.1], vec![0.2, 0.8]],
        RoleSelect::Threshold(0.5),
        0,
        8,
    )
    .unwrap();
    let (_, mut c) = run(None, 65, 0, 8);
    let a = SeqId(0);
    let mem = c.memory();
    // Without the table, or with one of another shape: a clear error, nothing changed.
    let e = compress(&mut c, a, &press, None, 1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("needs the head role table"), "{e}");
    let other = HeadRoles::from_scores(vec![vec![0.5; 3]], RoleSelect::Ratio(0.5), 0, 8).unwrap();
    let e = compress_with(&mut c, a, &press, None, 1, Some(&other), None, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("1 layers x 3 KV heads"), "{e}");
    assert_eq!(c.memory(), mem);
    let mut rng = Rng::new(12);
    for step in 0..=40usize {
        if step > 0 {
            let kv: Vec<(Vec<f32>, Vec<f32>)> = (0..LAYERS)
                .map(|_| (randn(HK * D, &mut rng), randn(HK * D, &mut rng)))
                .collect();
            let refs: Vec<(&[f32], &[f32])> = kv.iter().map(|(k, v)| (&k[..], &v[..])).collect();
            c.append(a, &refs).unwrap();
        }
        let len = c.len(a).unwrap();
        let rep = compress_with(&mut c, a, &press, None, 1, Some(&roles), None, None).unwrap();
        for l in 0..LAYERS {
            for kh in 0..HK {
                let pos = c.positions(a, l, kh).unwrap();
                let want: Vec<u32> = if roles.is_retrieval(l, kh) {
                    (0..len as u32).collect()
                } else {
                    streaming::keep_reference(len, sinks, window - 1)
                        .into_iter()
                        .map(|j| j as u32)
                        .collect()
                };
                assert_eq!(pos, want, "step {step} layer {l} head {kh}");
                assert_eq!(rep.kept[l * HK + kh], want.len());
            }
        }
    }
    // The streaming heads' pages are really freed: two heads of the full length, two of S + W - 1.
    let len = c.len(a).unwrap();
    let m = c.memory();
    assert_eq!(
        m.pages_in_use,
        2 * len.div_ceil(16) + 2 * (sinks + window - 1).div_ceil(16)
    );
    assert_eq!(
        m.bytes_entries,
        (2 * len + 2 * (sinks + window - 1)) * 2 * D * 4
    );
}

/// The kvpress conventions on one prefill (random q, k, v; one causal chunk of L positions,
/// observed, then planned): `h2o(recent=0,score=mean)` keeps the top n by the mean attention
/// `sum_i P[i, j] / (L - j)` (group mean), `tova(heads=layer)` one set per layer, the latest
/// entry and the top n - 1 by the mean over all query heads of the last row's attention,
/// `snapkv(pool=avg)` the window and the top by the group mean of the window's attention
/// averaged over 5 neighbours; all against probabilities computed here in f64.
#[test]
fn kvpress_conventions_match_probabilities_from_the_definition() {
    let cfg = KvConfig {
        layers: 1,
        kv_heads: HK,
        head_dim: D,
        v_dim: D,
        page_size: 16,
    };
    let len = 65;
    let mut rng = Rng::new(23);
    let (kd, vd) = (randn(len * HK * D, &mut rng), randn(len * HK * D, &mut rng));
    let qd = randn(len * HQ * D, &mut rng);
    let causal = MaskExpr::parse("causal").unwrap();
    // P[h][i][j] in f64 from the definition (scale 1/sqrt(D)).
    let p: Vec<Vec<Vec<f64>>> = (0..HQ)
        .map(|h| {
            let kh = h / (HQ / HK);
            (0..len)
                .map(|i| {
                    let s: Vec<f64> = (0..=i)
                        .map(|j| {
                            (0..D)
                                .map(|x| {
                                    qd[(i * HQ + h) * D + x] as f64
                                        * kd[(j * HK + kh) * D + x] as f64
                                })
                                .sum::<f64>()
                                / (D as f64).sqrt()
                        })
                        .collect();
                    let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                    let mut row: Vec<f64> = s.iter().map(|x| (x - m).exp() / z).collect();
                    row.resize(len, 0.0);
                    row
                })
                .collect()
        })
        .collect();
    let g = HQ / HK;
    let top = |score: &[f64], cands: std::ops::Range<usize>, n: usize| -> Vec<usize> {
        let mut c: Vec<usize> = cands.collect();
        c.sort_by(|&a, &b| score[b].total_cmp(&score[a]));
        c.truncate(n);
        c
    };
    let window = 8;
    // Per case: the spec and the expected keep set of (KV head, n).
    type Want<'a> = Box<dyn Fn(usize, usize) -> Vec<usize> + 'a>;
    let cases: [(&str, Want); 3] = [
        (
            "h2o(budget=0.3,recent=0,score=mean)",
            Box::new(|kh, n| {
                let s: Vec<f64> = (0..len)
                    .map(|j| {
                        (0..g)
                            .map(|gi| (0..len).map(|i| p[kh * g + gi][i][j]).sum::<f64>())
                            .sum::<f64>()
                            / g as f64
                            / (len - j) as f64
                    })
                    .collect();
                top(&s, 0..len, n)
            }),
        ),
        (
            "tova(budget=0.3,heads=layer)",
            Box::new(|_, n| {
                let s: Vec<f64> = (0..len)
                    .map(|j| (0..HQ).map(|h| p[h][len - 1][j]).sum::<f64>() / HQ as f64)
                    .collect();
                let mut k = top(&s, 0..len - 1, n - 1);
                k.push(len - 1);
                k
            }),
        ),
        (
            "snapkv(budget=0.3,window=8,kernel=5,pool=avg)",
            Box::new(|kh, n| {
                let older = len - window;
                let col: Vec<f64> = (0..older)
                    .map(|j| {
                        (0..g)
                            .map(|gi| (older..len).map(|i| p[kh * g + gi][i][j]).sum::<f64>())
                            .sum::<f64>()
                            / g as f64
                    })
                    .collect();
                let pooled: Vec<f64> = (0..older)
                    .map(|j| {
                        (j.saturating_sub(2)..(j + 3).min(older))
                            .map(|t| col[t])
                            .sum::<f64>()
                            / 5.0
                    })
                    .collect();
                let mut k = top(&pooled, 0..older, n - window);
                k.extend(older..len);
                k
            }),
        ),
    ];
    for (text, want) in cases {
        let press = Press::parse(text).unwrap();
        let mut c = PagedKvCache::new(cfg).unwrap();
        let a = c.add_sequence();
        c.append(a, &[(&kd[..], &vd[..])]).unwrap();
        let q = TensorView::contiguous(&qd[..], [1, len, HQ, D]).unwrap();
        let r = c
            .attend(a, 0, &q, Some(&causal), &AttnParams::default())
            .unwrap();
        let mut s = KvScores::new(&c, press.score_kind().unwrap(), ScoreParams::default()).unwrap();
        let obs = Observation {
            q: &q,
            lse: &r.lse,
            mask: Some(&causal),
            select: None,
        };
        s.observe(&c, a, 0, &obs).unwrap();
        let plan = plan(&c, a, &press, Some(&s), 0, None, true, None, None).unwrap();
        let n = press.target(len, 0);
        for kh in 0..HK {
            let mut w = want(kh, n);
            w.sort_unstable();
            assert_eq!(plan.keeps[kh], w, "{text} KV head {kh}");
            // The ranked values: the forced entries at +inf, the others finite.
            let forced = plan.ranks[kh].iter().filter(|x| x.is_infinite()).count();
            let expect = match press {
                Press::Tova { .. } => 1,
                Press::SnapKv { .. } => window,
                _ => 0,
            };
            assert_eq!(forced, expect, "{text}");
        }
        // What compress applies is the plan.
        compress(&mut c, a, &press, Some(&mut s), 0).unwrap();
        for kh in 0..HK {
            let pos: Vec<usize> = c
                .positions(a, 0, kh)
                .unwrap()
                .into_iter()
                .map(|x| x as usize)
                .collect();
            assert_eq!(pos, plan.keeps[kh], "{text}");
        }
    }
}

/// `pyramid(counts=kvpress)`: kvpress's per-layer counts, computed here from its description:
/// with C = B L and kvpress's beta b (our R = 2 b - 1), the line from C (2 - 1/b) to C / b,
/// rounded; SnapKV's C everywhere when the last layer would get less than the window; the mean
/// stays C.
#[test]
fn pyramid_kvpress_counts_follow_its_line_and_fallback() {
    let layers = 30;
    for (len, budget, b, window) in [
        (1024usize, 0.5, 2.0, 64usize),
        (1024, 0.2, 2.0, 64),
        (2048, 0.2, 2.0, 64),
        (1024, 0.1, 2.0, 64),
        (1023, 0.3, 20.0, 64),
        (113, 0.9, 2.0, 8),
    ] {
        let press = Press::Pyramid {
            budget,
            window,
            kernel: 5,
            beta: 2.0 * b - 1.0,
            pool: Pool::Avg,
            counts: LayerCounts::Kvpress,
        };
        press.check().unwrap();
        let l = len as f64;
        let c = l * budget;
        let (mut max, mut min) = (c * (2.0 - 1.0 / b), c / b);
        if max >= l - window as f64 {
            max = l - window as f64;
            min = 2.0 * c - max;
        }
        let fallback = !(l >= max && max >= min && min >= window as f64);
        for layer in 0..layers {
            let want = if fallback {
                c.round() as usize
            } else {
                (max - layer as f64 * (max - min) / (layers - 1) as f64).round() as usize
            };
            let got = press.layer_target(len, 0, layer, layers);
            assert_eq!(got, want, "len {len} B {budget} layer {layer}");
        }
        let total: usize = (0..layers)
            .map(|l| press.layer_target(len, 0, l, layers))
            .sum();
        assert!(
            (total as f64 / layers as f64 - c).abs() <= 1.0,
            "mean {total}"
        );
    }
}

#[test]
fn merge_specs_parse_and_refuse_bad_input() {
    use crate::kv::spec::KvSpec;
    let s = KvSpec::parse("h2o(budget=0.2)+merge").unwrap();
    assert!(s.merge);
    assert_eq!(s.to_string(), "h2o(budget=0.2)+merge");
    assert_eq!(
        KvSpec::parse("merge + snapkv(budget=0.2)")
            .unwrap()
            .to_string(),
        "snapkv(budget=0.2,window=32,kernel=5)+merge"
    );
    for (text, what) in [
        ("merge", "give one"),
        ("kivi(bits=4)+merge", "give one"),
        ("h2o(budget=0.2)+merge+kivi(bits=4)", "no quantization"),
        ("h2o(budget=0.2)+merge(x=1)", "takes no arguments"),
        ("h2o(budget=0.2)+merge+merge", "more than one merge"),
        ("quest(budget=0.2)+merge", "give one"),
    ] {
        let e = KvSpec::parse(text).unwrap_err().to_string();
        assert!(e.contains(what), "{text}: {e}");
    }
}

/// Streaming + merge: uniform weights, so each head's slot is exactly the mean of every entry
/// it ever evicted; the head holds as many entries as without merging.
#[test]
fn merged_streaming_slot_is_the_mean_of_every_evicted_entry() {
    use super::merge::MergeSlots;
    for &(sinks, window) in &[(4usize, 20usize), (1, 7), (0, 33), (2, 3)] {
        let press = Press::Streaming { sinks, window };
        let cfg = KvConfig {
            layers: LAYERS,
            kv_heads: HK,
            head_dim: D,
            v_dim: D,
            page_size: 16,
        };
        let mut c = PagedKvCache::new(cfg).unwrap();
        let a = c.add_sequence();
        let mut slots = MergeSlots::new(LAYERS, HK);
        let mut rng = Rng::new((sinks * 31 + window) as u64);
        // Every appended (K, V) per (layer, head): [position][D].
        let mut all: Vec<(Vec<f32>, Vec<f32>)> = vec![Default::default(); LAYERS * HK];
        for step in 0..130usize {
            let kv: Vec<(Vec<f32>, Vec<f32>)> = (0..LAYERS)
                .map(|_| (randn(HK * D, &mut rng), randn(HK * D, &mut rng)))
                .collect();
            for (l, (k, v)) in kv.iter().enumerate() {
                for kh in 0..HK {
                    all[l * HK + kh]
                        .0
                        .extend_from_slice(&k[kh * D..(kh + 1) * D]);
                    all[l * HK + kh]
                        .1
                        .extend_from_slice(&v[kh * D..(kh + 1) * D]);
                }
            }
            let refs: Vec<(&[f32], &[f32])> = kv.iter().map(|(k, v)| (&k[..], &v[..])).collect();
            c.append(a, &refs).unwrap();
            compress_with(&mut c, a, &press, None, 1, None, Some(&mut slots), None).unwrap();
            let len = step + 1;
            let n = press.target(len, 1);
            for (i, (all_k, all_v)) in all.iter().enumerate() {
                let (l, kh) = (i / HK, i % HK);
                let held = c.head_len(a, l, kh).unwrap();
                assert_eq!(held, n.min(len), "S {sinks} W {window} step {step}");
                let Some(slot) = slots.slots[i] else {
                    assert!(len <= n, "S {sinks} W {window} step {step}: no slot");
                    continue;
                };
                // Kept apart from the slot: the sinks and the newest n - 1 - S.
                let recent = n - 1 - sinks.min(n - 1);
                let evicted: Vec<usize> = (sinks..len - recent).collect();
                let (k, v, pos) = c.gather_head(a, l, kh).unwrap();
                assert_eq!(pos.len(), n);
                let others: Vec<u32> = pos
                    .iter()
                    .enumerate()
                    .filter(|&(e, _)| e != slot.entry)
                    .map(|(_, &p)| p)
                    .collect();
                let want: Vec<u32> = (0..sinks.min(n - 1))
                    .chain(len - recent..len)
                    .map(|p| p as u32)
                    .collect();
                assert_eq!(others, want, "S {sinks} W {window} step {step}");
                assert_eq!(slot.weight, evicted.len() as f64);
                for x in 0..D {
                    for (got, src) in [(&k, all_k), (&v, all_v)] {
                        let mean = evicted.iter().map(|&p| src[p * D + x] as f64).sum::<f64>()
                            / evicted.len() as f64;
                        let g = got[slot.entry * D + x] as f64;
                        assert!(
                            (g - mean).abs() < 1e-5,
                            "S {sinks} W {window} step {step}: slot {g} vs mean {mean}"
                        );
                    }
                }
            }
        }
    }
}

/// A score-based press + merge: the slot is the newest evicted entry, holding the score-weighted
/// mean of the evicted entries; the others are the reference keep set of n - 1 entries.
#[test]
fn merged_slot_weights_the_evicted_entries_by_their_scores() {
    use super::merge::MergeSlots;
    for (text, len) in [
        ("h2o(budget=0.3)", 65usize),
        ("snapkv(budget=0.2,window=8)", 113),
        ("tova(budget=0.1)", 63),
    ] {
        let press = Press::parse(text).unwrap();
        let (_, mut c) = run(None, len, 0, 23);
        let a = SeqId(0);
        let mut rng = Rng::new(len as u64);
        let mut scores =
            KvScores::new(&c, press.score_kind().unwrap(), ScoreParams::default()).unwrap();
        for s in scores.scores.iter_mut() {
            *s = (0..len - 3).map(|_| rng.uniform() as f32).collect();
        }
        let before: Vec<_> = (0..LAYERS * HK)
            .map(|i| c.gather_head(a, i / HK, i % HK).unwrap())
            .collect();
        let sc = scores.clone();
        let mut slots = MergeSlots::new(LAYERS, HK);
        compress_with(
            &mut c,
            a,
            &press,
            Some(&mut scores),
            0,
            None,
            Some(&mut slots),
            None,
        )
        .unwrap();
        let n = press.target(len, 0);
        for (i, (k0, v0, _)) in before.iter().enumerate() {
            let (l, kh) = (i / HK, i % HK);
            let h = HeadInput {
                len,
                n: n - 1,
                scores: &sc.scores[i],
                keys: &[],
                head_dim: D,
            };
            let mut want = keep_reference(&press, &h);
            let evicted: Vec<usize> = (0..len).filter(|j| !want.contains(j)).collect();
            let slot_pos = *evicted.last().unwrap();
            want.push(slot_pos);
            want.sort_unstable();
            let (k, v, pos) = c.gather_head(a, l, kh).unwrap();
            let want_pos: Vec<u32> = want.iter().map(|&j| j as u32).collect();
            assert_eq!(pos, want_pos, "{text} head {i}");
            let slot = slots.slots[i].unwrap();
            assert_eq!(pos[slot.entry] as usize, slot_pos);
            let w: Vec<f64> = evicted
                .iter()
                .map(|&e| sc.scores[i].get(e).copied().unwrap_or(0.0) as f64)
                .collect();
            let total: f64 = w.iter().sum();
            assert!((slot.weight - total).abs() < 1e-9);
            for x in 0..D {
                for (got, src) in [(&k, k0), (&v, v0)] {
                    let mean = evicted
                        .iter()
                        .zip(&w)
                        .map(|(&e, &we)| we * src[e * D + x] as f64)
                        .sum::<f64>()
                        / total;
                    let g = got[slot.entry * D + x] as f64;
                    assert!((g - mean).abs() < 1e-5, "{text}: {g} vs {mean}");
                }
            }
            // The kept entries are untouched.
            for (e, &j) in want.iter().enumerate() {
                if j != slot_pos {
                    assert_eq!(k[e * D..(e + 1) * D], k0[j * D..(j + 1) * D]);
                }
            }
        }
        // Slots of another shape: a clear error.
        let mut bad = MergeSlots::new(1, 1);
        let e = compress_with(
            &mut c,
            a,
            &press,
            Some(&mut scores),
            0,
            None,
            Some(&mut bad),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("merge slots of 1 heads"), "{e}");
    }
}

/// Random K / V of `n` positions for each of `layers` layers.
fn random_chunk(layers: usize, n: usize, rng: &mut Rng) -> Vec<(Vec<f32>, Vec<f32>)> {
    (0..layers)
        .map(|_| (randn(n * HK * D, rng), randn(n * HK * D, rng)))
        .collect()
}

fn as_refs(kv: &[(Vec<f32>, Vec<f32>)]) -> Vec<(&[f32], &[f32])> {
    kv.iter().map(|(k, v)| (&k[..], &v[..])).collect()
}

/// Dropping the entries a sliding-window layer can no longer see is exact: layer 0 (window W)
/// attends as before (the next chunk's rows under `causal & window(W-1,0)`, against a cache
/// that kept them), holds only its live entries (positions >= L - W + 1,
/// pages freed), its scores and merge slots follow the entries; layer 1 (no window) and a layer
/// past the window list are untouched. Ragged heads (one compressed before) and W = 1 included.
#[test]
fn dropping_dead_window_entries_is_exact() {
    for &w in &[1usize, 5, 17, 40, 70] {
        let cfg = KvConfig {
            layers: 3,
            kv_heads: HK,
            head_dim: D,
            v_dim: D,
            page_size: 16,
        };
        let mask = MaskExpr::parse(&format!("causal & window({},0)", w - 1)).unwrap();
        let (mut cut, mut full) = (
            PagedKvCache::new(cfg).unwrap(),
            PagedKvCache::new(cfg).unwrap(),
        );
        let (a, b) = (cut.add_sequence(), full.add_sequence());
        let mut rng = Rng::new(7 + w as u64);
        let params = ScoreParams::default();
        let mut scores = KvScores::new(&cut, ScoreKind::H2o, params).unwrap();
        let mut slots = merge::MergeSlots::new(cfg.layers, cfg.kv_heads);
        let windows = [Some(w), None];
        let (mut appended, mut total_freed) = (0usize, 0usize);
        for (step, chunk) in [1usize, 3, 7, 1, 13, 2, 1, 9, 40, 5]
            .into_iter()
            .enumerate()
        {
            let layer_kv = random_chunk(cfg.layers, chunk, &mut rng);
            let refs = as_refs(&layer_kv);
            cut.append(a, &refs).unwrap();
            full.append(b, &refs).unwrap();
            appended += chunk;
            // Scores grow with the entries (every entry scored 1 + its position).
            for l in 0..cfg.layers {
                for kh in 0..HK {
                    let pos = cut.positions(a, l, kh).unwrap();
                    let row = &mut scores.scores[l * HK + kh];
                    row.resize(pos.len(), 0.0);
                    for (x, &p) in row.iter_mut().zip(&pos) {
                        *x = 1.0 + p as f32;
                    }
                }
            }
            if step == 2 {
                // Head 1 of layer 0 drops every other entry first (a ragged head), and a merge
                // slot sits on its newest entry.
                // Entries chosen by position, so that both caches keep the same ones.
                let odd = |c: &PagedKvCache, id| -> Vec<usize> {
                    let pos = c.positions(id, 0, 1).unwrap();
                    (0..pos.len())
                        .filter(|&e| pos[e] % 2 == 1 || e + 1 == pos.len())
                        .collect()
                };
                let keep = odd(&cut, a);
                let keep_full = odd(&full, b);
                cut.compress(a, 0, 1, &keep).unwrap();
                full.compress(b, 0, 1, &keep_full).unwrap();
                scores.compact(0, 1, &keep);
                let row = cut.positions(a, 0, 1).unwrap();
                slots.slots[HK + 1] = Some(merge::Slot {
                    entry: row.len() - 1,
                    weight: 2.0,
                });
                slots.slots[1] = Some(merge::Slot {
                    entry: 0,
                    weight: 1.0,
                });
            }
            let before: Vec<Vec<u32>> = (0..cfg.layers * HK)
                .map(|i| cut.positions(a, i / HK, i % HK).unwrap())
                .collect();
            let pages = cut.pages_in_use();
            let freed =
                drop_dead(&mut cut, a, &windows, Some(&mut scores), Some(&mut slots)).unwrap();
            assert_eq!(pages - cut.pages_in_use(), freed, "W {w} step {step}");
            total_freed += freed;
            let first_live = (appended + 1).saturating_sub(w) as u32;
            for l in 0..cfg.layers {
                for kh in 0..HK {
                    let pos = cut.positions(a, l, kh).unwrap();
                    let want: Vec<u32> = if l == 0 {
                        before[kh]
                            .iter()
                            .copied()
                            .filter(|&p| p >= first_live)
                            .collect()
                    } else {
                        before[l * HK + kh].clone()
                    };
                    assert_eq!(pos, want, "W {w} step {step} layer {l} head {kh}");
                    let sc: Vec<f32> = pos.iter().map(|&p| 1.0 + p as f32).collect();
                    assert_eq!(scores.scores[l * HK + kh], sc, "scores follow the entries");
                }
            }
            // The slot on layer 0 head 1 survives while its position is live, at its new index.
            if let Some(s) = slots.slots[1] {
                let pos = cut.positions(a, 0, 1).unwrap();
                assert!(s.entry < pos.len());
            }
            assert_eq!(
                slots.slots[HK + 1].is_some(),
                step >= 2,
                "layer 1 is never cut"
            );
            // The next chunk's queries see the same through the cut cache.
            let sq = 3;
            let qd = randn(sq * HQ * D, &mut rng);
            let q = TensorView::contiguous(&qd[..], [1, sq, HQ, D]).unwrap();
            let layer_kv = random_chunk(cfg.layers, sq, &mut rng);
            let refs = as_refs(&layer_kv);
            cut.append(a, &refs).unwrap();
            full.append(b, &refs).unwrap();
            appended += sq;
            let p = AttnParams::default();
            let got = cut.attend(a, 0, &q, Some(&mask), &p).unwrap();
            let want = full.attend(b, 0, &q, Some(&mask), &p).unwrap();
            let e = got
                .out
                .data
                .to_f32_vec()
                .iter()
                .zip(&want.out.data.to_f32_vec())
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f32, f32::max);
            assert!(e <= 1e-5, "W {w} step {step}: output differs by {e}");
        }
        assert!(total_freed > 0, "W {w}: no page was freed");
        // A list longer than the layers: the extra entries are ignored.
        let long = vec![Some(w); cfg.layers + 2];
        drop_dead(&mut cut, a, &long, None, None).unwrap();
    }
}

/// `+share`: parsed, printed and refused where it cannot apply; the shared counts give the
/// window layers' unused entries to the other layers in equal shares, never more in total than
/// the press's own counts, and change nothing without a window or without an open layer.
#[test]
fn shared_targets_move_the_window_layers_spare_entries() {
    use crate::kv::spec::KvSpec;
    let s = KvSpec::parse("h2o(budget=0.2)+share").unwrap();
    assert!(s.share && !s.merge);
    assert_eq!(s.to_string(), "h2o(budget=0.2)+share");
    assert_eq!(
        KvSpec::parse("tova(budget=0.1)+merge+share")
            .unwrap()
            .to_string(),
        "tova(budget=0.1)+merge+share"
    );
    for (bad, want) in [
        ("kivi(bits=4)+share", "give one"),
        ("h2o(budget=0.2)+share(x=1)", "takes no arguments"),
        ("h2o(budget=0.2)+share+share", "more than one share"),
        ("duo(sinks=4,window=64,ratio=0.5)+share", "does not apply"),
    ] {
        let e = KvSpec::parse(bad).unwrap_err().to_string();
        assert!(e.contains(want), "{bad}: {e}");
    }
    let cfg = KvConfig {
        layers: 4,
        kv_heads: HK,
        head_dim: D,
        v_dim: D,
        page_size: 16,
    };
    let mut c = PagedKvCache::new(cfg).unwrap();
    let a = c.add_sequence();
    let mut rng = Rng::new(5);
    let len = 1000;
    let layer_kv = random_chunk(cfg.layers, len, &mut rng);
    let refs = as_refs(&layer_kv);
    c.append(a, &refs).unwrap();
    let press = Press::parse("h2o(budget=0.2)").unwrap();
    let own: Vec<usize> = (0..4).map(|l| press.layer_target(len, 1, l, 4)).collect();
    // Layers 0 and 2 attend over 64 keys: 63 of their entries are live, the rest of their
    // counts (own - 63 per head) goes to layers 1 and 3.
    let windows = [Some(64), None, Some(64)];
    let t = shared_targets(&c, a, &press, 1, &windows).unwrap();
    let spare = 2 * HK * (own[0] - 63);
    assert_eq!(t[0], own[0]);
    assert_eq!(t[2], own[2]);
    assert_eq!(t[1], own[1] + spare / (2 * HK));
    assert_eq!(t[3], own[3] + spare / (2 * HK));
    let used: usize = (0..4)
        .map(|l| if l % 2 == 0 { 63 } else { t[l] })
        .sum::<usize>()
        * HK;
    assert!(used <= own.iter().sum::<usize>() * HK);
    // No window, every layer windowed, a window wider than the sequence: the press's own.
    assert_eq!(shared_targets(&c, a, &press, 1, &[]).unwrap(), own);
    assert_eq!(
        shared_targets(&c, a, &press, 1, &[Some(8); 4]).unwrap(),
        own
    );
    assert_eq!(
        shared_targets(&c, a, &press, 1, &[Some(5000), None]).unwrap(),
        own
    );
    // Through compress_with: layers 1 and 3 keep their larger counts, the total held stays
    // within the press's own.
    let mut scores = KvScores::new(&c, ScoreKind::H2o, ScoreParams::default()).unwrap();
    for (i, row) in scores.scores.iter_mut().enumerate() {
        *row = (0..len).map(|e| ((e * 7 + i) % 13) as f32).collect();
    }
    drop_dead(&mut c, a, &windows, Some(&mut scores), None).unwrap();
    let rep = compress_with(
        &mut c,
        a,
        &press,
        Some(&mut scores),
        1,
        None,
        None,
        Some(&t),
    )
    .unwrap();
    for (l, &tl) in t.iter().enumerate() {
        for kh in 0..HK {
            let want = if l % 2 == 0 { 63 } else { tl.min(len) };
            assert_eq!(rep.kept[l * HK + kh], want, "layer {l} head {kh}");
        }
    }
    assert!(rep.kept.iter().sum::<usize>() <= own.iter().sum::<usize>() * HK);
    let e = plan(
        &c,
        a,
        &press,
        Some(&scores),
        1,
        None,
        false,
        None,
        Some(&t[..3]),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("3 layer targets for a cache of 4 layers"), "{e}");
}
