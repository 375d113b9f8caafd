//! Every scheme against single-rank `forward` / `backward` with the same mask: seeded random
//! inputs, odd lengths, GQA, P = 1 .. 5, several masks; and the inputs the schemes refuse.
use super::block::{copy_rows, same_heads, Cp, CpMask, GradIn, LocalQkv, Rows};
use super::plan::{plan, Plan};
use super::ring::Grads;
use super::{gather, passq, ring, ulysses, usp, ThreadTransport, Transport};
use crate::attention::{forward, AttnParams, MaskSpec};
use crate::backward::{backward, BackwardParams};
use crate::error::Result;
use crate::mask::{DocIds, MaskExpr, MaskShape};
use crate::tensor::TensorView;
use crate::testing::Rng;
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Scheme {
    Ring,
    Gather,
    Ulysses,
    PassQ,
    /// USP with its Ulysses degree U.
    Usp(usize),
}

impl Scheme {
    fn fwd(self, cp: &Cp, x: &LocalQkv, prm: &AttnParams) -> Result<(Vec<f32>, Vec<f32>)> {
        match self {
            Scheme::Ring => ring::ring_forward(cp, x, prm),
            Scheme::Gather => gather::gather_forward(cp, x, prm),
            Scheme::Ulysses => ulysses::ulysses_forward(cp, x, prm),
            Scheme::PassQ => passq::passq_forward(cp, x, prm),
            Scheme::Usp(u) => usp::usp_forward(cp, u, x, prm),
        }
    }
    fn bwd(self, cp: &Cp, x: &LocalQkv, g: &GradIn, prm: &AttnParams) -> Result<Grads> {
        match self {
            Scheme::Ring => ring::ring_backward(cp, x, g, prm),
            Scheme::Gather => gather::gather_backward(cp, x, g, prm),
            Scheme::Ulysses => ulysses::ulysses_backward(cp, x, g, prm),
            Scheme::PassQ => passq::passq_backward(cp, x, g, prm),
            Scheme::Usp(u) => usp::usp_backward(cp, u, x, g, prm),
        }
    }
    /// The placement the scheme runs over.
    fn plan(self, mask: &CpMask, p: usize, per_rank: usize) -> Plan {
        match self {
            Scheme::Usp(u) => usp::usp_plan(mask, p, u, per_rank).unwrap(),
            _ => plan(&mask.sched, p, per_rank).unwrap(),
        }
    }
}

/// One problem: P ranks, n tokens, batch, heads (Hq, Hk), dims (D, Dv), a mask, chunks per
/// rank and the schedule's tile.
struct Case {
    p: usize,
    n: usize,
    b: usize,
    hq: usize,
    hk: usize,
    d: usize,
    dv: usize,
    expr: &'static str,
    per_rank: usize,
    tile: usize,
}

fn seeded(seed: u64, n: usize) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.normal() as f32).collect()
}

/// Packed documents per batch row: lengths cycling through 5, 11, 3, 8, shifted per row.
fn docs(b: usize, n: usize) -> DocIds {
    let lens = [5, 11, 3, 8];
    let ids: Vec<i32> = (0..b)
        .flat_map(|bi| {
            let mut v = Vec::with_capacity(n);
            let mut d = bi;
            while v.len() < n {
                let l = lens[d % 4];
                v.extend(std::iter::repeat_n(d as i32, l.min(n - v.len())));
                d += 1;
            }
            v
        })
        .collect();
    DocIds {
        q: ids.clone(),
        k: ids,
    }
}

/// Largest |got - want| relative to max(1, max |want|); equal infinities (rows without keys)
/// count as 0.
fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want
        .iter()
        .filter(|x| x.is_finite())
        .fold(1f32, |m, x| m.max(x.abs()));
    got.iter()
        .zip(want)
        .map(|(g, w)| if g == w { 0.0 } else { (g - w).abs() / scale })
        .fold(
            0f32,
            |m, e| if e.is_nan() { f32::INFINITY } else { m.max(e) },
        )
}

/// Runs `scheme` on `c` over P threads (forward, and backward when `grads`) and compares every
/// rank's out, LSE (and dQ, dK, dV) with single-rank on the whole sequence.
fn check(c: &Case, scheme: Scheme, grads: bool) {
    let Case {
        p,
        n,
        b,
        hq,
        hk,
        d,
        dv,
        ..
    } = *c;
    let seed = (p * 1000 + n) as u64;
    let (q, k, v, dout) = (
        seeded(seed, b * n * hq * d),
        seeded(seed + 1, b * n * hk * d),
        seeded(seed + 2, b * n * hk * dv),
        seeded(seed + 3, b * n * hq * dv),
    );
    let expr = MaskExpr::parse(c.expr).unwrap();
    let dids = expr.uses_documents().then(|| docs(b, n));
    let bound = expr
        .bind(
            MaskShape {
                batch: b,
                sq: n,
                sk: n,
            },
            dids,
        )
        .unwrap();
    let prm = AttnParams::default();
    let bp = BackwardParams {
        deterministic: true,
        ..Default::default()
    };
    let (qv, kv, vv) = (
        TensorView::contiguous(&q[..], [b, n, hq, d]).unwrap(),
        TensorView::contiguous(&k[..], [b, n, hk, d]).unwrap(),
        TensorView::contiguous(&v[..], [b, n, hk, dv]).unwrap(),
    );
    let whole = forward(&qv, &kv, &vv, &prm, MaskSpec::Expr(&bound)).unwrap();
    let want_g = grads.then(|| {
        let ov = whole.out.view("out").unwrap();
        let dov = TensorView::contiguous(&dout[..], [b, n, hq, dv]).unwrap();
        let g = backward(
            &qv,
            &kv,
            &vv,
            &ov,
            &whole.lse,
            &dov,
            &prm,
            MaskSpec::Expr(&bound),
            &bp,
        )
        .unwrap();
        [
            g.dq.data.to_f32_vec(),
            g.dk.data.to_f32_vec(),
            g.dv.data.to_f32_vec(),
        ]
    });
    let want_o = whole.out.data.to_f32_vec();
    let mask = CpMask::new(bound, c.tile).unwrap();
    let pl = scheme.plan(&mask, p, c.per_rank);
    let group = ThreadTransport::group(p, Duration::from_secs(30)).unwrap();
    let results: Vec<(Vec<f32>, Vec<f32>, Option<Grads>)> = std::thread::scope(|s| {
        let hs: Vec<_> = group
            .into_iter()
            .map(|t| {
                let (q, k, v, dout, pl, mask, prm, bp) = (&q, &k, &v, &dout, &pl, &mask, &prm, &bp);
                s.spawn(move || {
                    let r = t.rank();
                    let (lq, lk, lv, ld) = (
                        pl.shard(q, b, (hq, d), r),
                        pl.shard(k, b, (hk, d), r),
                        pl.shard(v, b, (hk, dv), r),
                        pl.shard(dout, b, (hq, dv), r),
                    );
                    let x = LocalQkv {
                        q: &lq,
                        k: &lk,
                        v: &lv,
                        dims: (b, pl.rows_of(r), hq, hk, d, dv),
                    };
                    let cp = Cp {
                        t: &t,
                        plan: pl,
                        mask,
                    };
                    let (o, l) = scheme.fwd(&cp, &x, prm).unwrap();
                    let g = grads.then(|| {
                        let gi = GradIn {
                            out: &o,
                            lse: &l,
                            dout: &ld,
                            bwd: *bp,
                        };
                        scheme.bwd(&cp, &x, &gi, prm).unwrap()
                    });
                    (o, l, g)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let tol = 1e-5;
    for (r, (o, l, g)) in results.iter().enumerate() {
        let what = format!(
            "{scheme:?} `{}` p {p} n {n} heads {hq}/{hk} rank {r}",
            c.expr
        );
        let e = rel_err(o, &pl.shard(&want_o, b, (hq, dv), r));
        assert!(e <= tol, "{what}: out differs by {e}");
        let ll = Rows::lse(b, hq, pl.rows_of(r));
        let mut wl = vec![0f32; ll.values()];
        let runs = pl.runs_of(r);
        copy_rows(
            (&whole.lse, Rows::lse(b, hq, n)),
            (&mut wl, ll),
            &runs,
            &same_heads(hq),
            false,
        );
        let e = rel_err(l, &wl);
        assert!(e <= tol, "{what}: lse differs by {e}");
        if let (Some((dq, dk, dv_)), Some(w)) = (g, &want_g) {
            for (name, got, want, h, width) in [
                ("dq", dq, &w[0], hq, d),
                ("dk", dk, &w[1], hk, d),
                ("dv", dv_, &w[2], hk, dv),
            ] {
                let e = rel_err(got, &pl.shard(want, b, (h, width), r));
                assert!(e <= tol, "{what}: {name} differs by {e}");
            }
        }
    }
}

const MASKS: &[&str] = &[
    "causal",
    "causal & window(6,0)",
    "window(3,5) | sinks(2)",
    "prefix(9) | causal",
    "document",
    "causal & document",
    "chunk(10) & !strided(3)",
    "causal & (sinks(1) | window(3,0) | power(4))",
    "radial(6,2)",
    "full",
];

/// Odd lengths, GQA, P = 1 .. 5, every mask of `MASKS`, forward and backward.
fn sweep(scheme: Scheme) {
    for &(p, n, hq, hk, per_rank, tile) in &[
        (1, 23, 2, 1, 2, 4),
        (2, 37, 4, 2, 2, 4),
        (3, 41, 6, 2, 2, 5),
        (4, 43, 4, 2, 3, 4),
        (5, 52, 5, 5, 2, 3),
    ] {
        for expr in MASKS {
            let c = Case {
                p,
                n,
                b: 2,
                hq,
                hk,
                d: 16,
                dv: 8,
                expr,
                per_rank,
                tile,
            };
            check(&c, scheme, true);
        }
    }
}

#[test]
fn ring_matches_single_rank_for_every_mask() {
    sweep(Scheme::Ring);
}

#[test]
fn all_gather_matches_single_rank_for_every_mask() {
    sweep(Scheme::Gather);
}

#[test]
fn pass_q_matches_single_rank_for_every_mask() {
    sweep(Scheme::PassQ);
    // MQA and one query chunk per rank (every exchange a whole rank's rows).
    for &(p, hq, per_rank) in &[(3, 4, 1), (4, 2, 3)] {
        let c = Case {
            p,
            n: 31,
            b: 1,
            hq,
            hk: 1,
            d: 8,
            dv: 16,
            expr: "prefix(5) | causal & window(7,0)",
            per_rank,
            tile: 4,
        };
        check(&c, Scheme::PassQ, true);
    }
}

#[test]
fn ulysses_matches_single_rank_for_every_mask() {
    sweep(Scheme::Ulysses);
    // GQA with fewer key / value heads than ranks (one replicated head per rank), and query
    // groups that straddle ranks (one key / value head per query head).
    for &(p, hq, hk) in &[(4, 8, 2), (4, 4, 1), (2, 6, 2), (3, 3, 1)] {
        let c = Case {
            p,
            n: 29,
            b: 1,
            hq,
            hk,
            d: 8,
            dv: 8,
            expr: "causal & window(4,0)",
            per_rank: 2,
            tile: 4,
        };
        check(&c, Scheme::Ulysses, true);
    }
}

/// USP for every mask, P in {1, 2, 3, 4, 6, 8} with each factorisation U x R, odd lengths,
/// GQA (query groups inside a member, across members, and fewer key / value heads than U).
#[test]
fn usp_matches_single_rank_for_every_mask() {
    for &(p, n, hq, hk, per_rank, tile) in &[
        (1, 23, 2, 1, 2, 4),
        (2, 37, 4, 2, 2, 4),
        (3, 41, 6, 2, 2, 5),
        (4, 43, 4, 2, 3, 4),
        (6, 53, 6, 3, 2, 4),
        (8, 67, 8, 2, 2, 5),
    ] {
        for u in (1..=p).filter(|u| p % u == 0) {
            for expr in MASKS {
                let c = Case {
                    p,
                    n,
                    b: 2,
                    hq,
                    hk,
                    d: 16,
                    dv: 8,
                    expr,
                    per_rank,
                    tile,
                };
                check(&c, Scheme::Usp(u), true);
            }
        }
    }
    // MQA, and query groups that straddle the members of a Ulysses group.
    for &(p, u, hq, hk) in &[(4, 2, 2, 1), (6, 3, 3, 1), (4, 2, 6, 2)] {
        let c = Case {
            p,
            n: 31,
            b: 1,
            hq,
            hk,
            d: 8,
            dv: 8,
            expr: "prefix(3) | causal & window(6,0)",
            per_rank: 1,
            tile: 4,
        };
        check(&c, Scheme::Usp(u), true);
    }
}

/// USP's own refusals: heads that U does not divide (on every rank), a U that does not divide
/// the ranks, chunks shorter than U, and a plan that is not a USP placement for U.
#[test]
fn usp_bad_inputs_are_clear_errors() {
    let n = 24;
    let bound = MaskExpr::parse("causal")
        .unwrap()
        .bind(MaskShape::square(n), None)
        .unwrap();
    let mask = CpMask::new(bound, 4).unwrap();
    let prm = AttnParams::default();
    let buf = seeded(9, n * 6 * 4);
    let pl = usp::usp_plan(&mask, 4, 2, 2).unwrap();
    let errs = on_ranks(4, |t| {
        let x = local(&buf, pl.rows_of(t.rank()), 3, 0);
        usp::usp_forward(&ctx(t, &pl, &mask), 2, &x, &prm)
            .unwrap_err()
            .to_string()
    });
    for (r, e) in errs.iter().enumerate() {
        assert!(
            e.starts_with(&format!("rank {r} of 4"))
                && e.contains("usp: 3 query heads cannot be split over 2 ranks")
                && e.contains("usp ulysses group"),
            "{e}"
        );
    }
    let e = usp::usp_plan(&mask, 4, 3, 2).unwrap_err().to_string();
    assert!(e.contains("U = 3 must divide the 4 ranks"), "{e}");
    let e = usp::usp_plan(&mask, 8, 8, 4).unwrap_err().to_string();
    assert!(
        e.contains("chunk 0 of the ring plan holds 6 tokens, fewer than the U = 8 ranks"),
        "{e}"
    );
    // The ring's plan for 4 ranks is not USP's for U = 2 (nor is USP's for U = 2 one for U = 4).
    let ring_plan = plan(&mask.sched, 4, 2).unwrap();
    for (pl, u) in [(&ring_plan, 2), (&pl, 4)] {
        let errs = on_ranks(4, |t| {
            let x = local(&buf, pl.rows_of(t.rank()), 2, 0);
            usp::usp_forward(&ctx(t, pl, &mask), u, &x, &prm)
                .unwrap_err()
                .to_string()
        });
        assert!(
            errs[0].contains(&format!("not a USP placement for U = {u}")),
            "{}",
            errs[0]
        );
    }
}

/// Runs `f` on every rank of a P-thread group; the results in rank order.
fn on_ranks<T: Send>(p: usize, f: impl Fn(&dyn Transport) -> T + Sync) -> Vec<T> {
    let group = ThreadTransport::group(p, Duration::from_secs(5)).unwrap();
    std::thread::scope(|s| {
        let hs: Vec<_> = group
            .into_iter()
            .map(|t| {
                let f = &f;
                s.spawn(move || f(&t))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn ctx<'a>(t: &'a dyn Transport, plan: &'a Plan, mask: &'a CpMask) -> Cp<'a> {
    Cp { t, plan, mask }
}

/// A rank's inputs cut from `buf`: batch 1, `hq` query heads, one key / value head, D = Dv = 4,
/// q `short` values short.
fn local(buf: &[f32], rows: usize, hq: usize, short: usize) -> LocalQkv<'_> {
    LocalQkv {
        q: &buf[..rows * hq * 4 - short],
        k: &buf[..rows * 4],
        v: &buf[..rows * 4],
        dims: (1, rows, hq, 1, 4, 4),
    }
}

#[test]
fn bad_inputs_are_clear_errors() {
    let (n, b, d) = (24, 1, 4);
    let bound = MaskExpr::parse("causal")
        .unwrap()
        .bind(
            MaskShape {
                batch: b,
                sq: n,
                sk: n,
            },
            None,
        )
        .unwrap();
    let mask = CpMask::new(bound, 4).unwrap();
    let pl = plan(&mask.sched, 2, 2).unwrap();
    let prm = AttnParams::default();
    let buf = seeded(7, b * n * 6 * d);
    // Heads not divisible by the ranks (Ulysses only): every rank names the problem.
    let errs = on_ranks(2, |t| {
        let rows = pl.rows_of(t.rank());
        let x = local(&buf, rows, 3, 0);
        ulysses::ulysses_forward(&ctx(t, &pl, &mask), &x, &prm)
            .unwrap_err()
            .to_string()
    });
    for e in &errs {
        assert!(
            e.contains("3 query heads cannot be split over 2 ranks"),
            "{e}"
        );
    }
    // Mismatched shapes across ranks: rank 1 has other heads; both ranks say so (every scheme).
    for scheme in [Scheme::Ring, Scheme::Gather, Scheme::Ulysses, Scheme::PassQ] {
        let errs = on_ranks(2, |t| {
            let rows = pl.rows_of(t.rank());
            let hq = if t.rank() == 1 { 4 } else { 2 };
            let x = local(&buf, rows, hq, 0);
            scheme
                .fwd(&ctx(t, &pl, &mask), &x, &prm)
                .unwrap_err()
                .to_string()
        });
        assert!(
            errs[0].contains("rank 1 has query heads 4, this rank 2"),
            "{scheme:?}: {}",
            errs[0]
        );
        assert!(
            errs[1].contains("rank 0 has query heads 2, this rank 4"),
            "{scheme:?}: {}",
            errs[1]
        );
    }
    // A rank whose buffers do not match its chunks: it names the problem, the others name it.
    let errs = on_ranks(2, |t| {
        let rows = pl.rows_of(t.rank()) + t.rank();
        let x = local(&buf, rows, 2, 0);
        gather::gather_forward(&ctx(t, &pl, &mask), &x, &prm)
            .unwrap_err()
            .to_string()
    });
    assert!(
        errs[1].contains("this rank holds 13 rows, its chunks of the plan have 12"),
        "{}",
        errs[1]
    );
    assert!(errs[0].contains("rank 1 refused its inputs"), "{}", errs[0]);
    // Wrong buffer lengths for the dims, and a plan for another group size.
    let errs = on_ranks(2, |t| {
        let rows = pl.rows_of(t.rank());
        let short = local(&buf, rows, 2, 1);
        let e1 = ring::ring_forward(&ctx(t, &pl, &mask), &short, &prm)
            .unwrap_err()
            .to_string();
        let p3 = plan(&mask.sched, 3, 2).unwrap();
        let e2 = ring::ring_forward(
            &Cp {
                t,
                plan: &p3,
                mask: &mask,
            },
            &short,
            &prm,
        )
        .unwrap_err()
        .to_string();
        (e1, e2)
    });
    assert!(
        errs[0].0.contains(
            "q / k / v hold 95 / 48 / 48 values, expected [B 1, rows 12, H, D] = 96 / 48 / 48"
        ),
        "{}",
        errs[0].0
    );
    assert!(
        errs[0]
            .1
            .contains("the plan is for 3 ranks, the group has 2"),
        "{}",
        errs[0].1
    );
    // Backward with an LSE of the wrong length.
    let errs = on_ranks(2, |t| {
        let rows = pl.rows_of(t.rank());
        let x = local(&buf, rows, 2, 0);
        let (o, l) = ring::ring_forward(&ctx(t, &pl, &mask), &x, &prm).unwrap();
        let g = GradIn {
            out: &o,
            lse: &l[1..],
            dout: &o,
            bwd: BackwardParams::default(),
        };
        ring::ring_backward(&ctx(t, &pl, &mask), &x, &g, &prm)
            .unwrap_err()
            .to_string()
    });
    assert!(
        errs[0].contains("out / dout / lse hold 96 / 96 / 23 values, expected 96 / 96 / 24"),
        "{}",
        errs[0]
    );
    // Too few tokens for the chunks.
    let e = plan(&mask.sched, 5, 5).unwrap_err().to_string();
    assert!(
        e.contains("24 tokens cannot be cut into 5 chunks for each of 5 ranks"),
        "{e}"
    );
}

/// The ring fetches only the key chunks a rank's queries need: under a sliding window each rank
/// receives a halo of neighbouring chunks, a small part of what a causal mask (or a ring that
/// passes every chunk on) moves, and the outputs and gradients still equal single-rank's.
#[test]
fn ring_moves_only_the_halo_of_a_window() {
    use super::scheme::{run_threads, Scheme as S, Whole};
    let (p, per_rank, n, b, hq, hk, d, dv) = (8, 2, 383, 1, 4, 2, 16, 16);
    let (q, k, v, dout) = (
        seeded(71, b * n * hq * d),
        seeded(72, b * n * hk * d),
        seeded(73, b * n * hk * dv),
        seeded(74, b * n * hq * dv),
    );
    let kv_row = (4 * b * hk * (d + dv)) as u64;
    // The agreement check: one all-gather of 8 words from each peer.
    let agree = 64 * (p as u64 - 1);
    let mut most = Vec::new();
    for expr in ["causal", "causal & window(8,0)", "window(6,6)"] {
        let bound = MaskExpr::parse(expr)
            .unwrap()
            .bind(MaskShape::square(n), None)
            .unwrap();
        let (qv, kv, vv) = (
            TensorView::contiguous(&q[..], [b, n, hq, d]).unwrap(),
            TensorView::contiguous(&k[..], [b, n, hk, d]).unwrap(),
            TensorView::contiguous(&v[..], [b, n, hk, dv]).unwrap(),
        );
        let prm = AttnParams::default();
        let bp = BackwardParams {
            deterministic: true,
            ..Default::default()
        };
        let whole = forward(&qv, &kv, &vv, &prm, MaskSpec::Expr(&bound)).unwrap();
        let dov = TensorView::contiguous(&dout[..], [b, n, hq, dv]).unwrap();
        let ov = whole.out.view("out").unwrap();
        let spec = MaskSpec::Expr(&bound);
        let g = backward(&qv, &kv, &vv, &ov, &whole.lse, &dov, &prm, spec, &bp).unwrap();
        let mask = CpMask::new(bound, 8).unwrap();
        let pl = plan(&mask.sched, p, per_rank).unwrap();
        let t = Duration::from_secs(30);
        let x = Whole {
            q: &q,
            k: &k,
            v: &v,
            dout: Some(&dout),
            dims: (b, n, hq, hk, d, dv),
        };
        let res = run_threads(S::Ring, &pl, &mask, &x, &prm, &bp, t).unwrap();
        let (dq, dk, dv_) = res.grads.unwrap();
        for (name, got, want) in [
            ("out", &res.out, whole.out.data.to_f32_vec()),
            ("lse", &res.lse, whole.lse.clone()),
            ("dq", &dq, g.dq.data.to_f32_vec()),
            ("dk", &dk, g.dk.data.to_f32_vec()),
            ("dv", &dv_, g.dv.data.to_f32_vec()),
        ] {
            let e = rel_err(got, &want);
            assert!(e <= 1e-5, "{expr}: {name} differs by {e}");
        }
        // The forward alone: every rank receives exactly its halo (and the agreement words).
        let fwd_only = Whole { dout: None, ..x };
        let res = run_threads(S::Ring, &pl, &mask, &fwd_only, &prm, &bp, t).unwrap();
        let got = res.traffic.iter().map(|x| x.received).max().unwrap() - agree;
        assert_eq!(got, ring::ring_bytes(&pl, kv_row), "{expr}");
        // A ring passing every chunk on would bring each rank the other ranks' rows.
        let relay = (0..p)
            .map(|r| (n - pl.rows_of(r)) as u64 * kv_row)
            .max()
            .unwrap();
        assert!(got <= relay, "{expr}: {got} > {relay}");
        most.push((got, relay));
    }
    // Causal: the busiest rank needs 14 of the 16 chunks; a window at most its chunks'
    // neighbours (4, tiles straddling chunk bounds counted on both sides).
    let (causal, relay) = most[0];
    for (expr, (w, _)) in ["causal & window(8,0)", "window(6,6)"]
        .iter()
        .zip(&most[1..])
    {
        assert!(
            3 * w <= causal && 3 * w <= relay,
            "{expr}: {w} bytes to the busiest rank, causal {causal}, relay {relay}"
        );
    }
}

/// The outcome of one rank in a fault test: its error (if any) and how long it took.
type Outcome = (Option<String>, Duration);

/// P ranks of `scheme` on a causal problem; rank 1 misbehaves as `bad` says (it gets its
/// transport and its inputs), the others run the forward and backward under `timeout`.
fn with_a_bad_rank(
    scheme: super::scheme::Scheme,
    p: usize,
    timeout: Duration,
    bad: impl Fn(&dyn Transport, &LocalQkv, &Cp) -> Option<String> + Sync,
) -> Vec<Outcome> {
    let (n, b, hq, hk, d) = (45, 1, 6, 3, 8);
    let bound = MaskExpr::parse("causal")
        .unwrap()
        .bind(MaskShape::square(n), None)
        .unwrap();
    let mask = CpMask::new(bound, 4).unwrap();
    let pl = scheme.plan(&mask, p, 2).unwrap();
    let (q, k, v) = (
        seeded(81, b * n * hq * d),
        seeded(82, b * n * hk * d),
        seeded(83, b * n * hk * d),
    );
    let prm = AttnParams::default();
    let group = ThreadTransport::group(p, timeout).unwrap();
    std::thread::scope(|s| {
        let hs: Vec<_> = group
            .into_iter()
            .map(|t| {
                let (q, k, v, pl, mask, prm, bad) = (&q, &k, &v, &pl, &mask, &prm, &bad);
                s.spawn(move || {
                    let start = std::time::Instant::now();
                    let r = t.rank();
                    let (lq, lk, lv) = (
                        pl.shard(q, b, (hq, d), r),
                        pl.shard(k, b, (hk, d), r),
                        pl.shard(v, b, (hk, d), r),
                    );
                    let x = LocalQkv {
                        q: &lq,
                        k: &lk,
                        v: &lv,
                        dims: (b, pl.rows_of(r), hq, hk, d, d),
                    };
                    let cp = Cp {
                        t: &t,
                        plan: pl,
                        mask,
                    };
                    if r == 1 {
                        let e = bad(&t, &x, &cp);
                        drop(t);
                        return (e, start.elapsed());
                    }
                    let res = scheme.forward(&cp, &x, prm).and_then(|(o, l)| {
                        let g = GradIn {
                            out: &o,
                            lse: &l,
                            dout: &o,
                            bwd: BackwardParams::default(),
                        };
                        scheme.backward(&cp, &x, &g, prm)
                    });
                    (res.err().map(|e| e.to_string()), start.elapsed())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// A rank that leaves in the middle (after the agreement, its transport dropped): every other
/// rank fails with an error naming it, at once (no wait for the timeout), for every scheme.
#[test]
fn a_rank_that_leaves_is_named_on_every_other_rank() {
    use super::scheme::Scheme as S;
    // (USP: U = 1 and U = P at three ranks, and a 2 x 2 grid, where a rank's peers in its
    // groups and the others all name the rank that failed.)
    for (scheme, p) in [
        (S::Ring, 3),
        (S::AllGather, 3),
        (S::Ulysses, 3),
        (S::PassQ, 3),
        (S::Usp(1), 3),
        (S::Usp(3), 3),
        (S::Usp(2), 4),
    ] {
        let res = with_a_bad_rank(scheme, p, Duration::from_secs(20), |t, x, cp| {
            x.agree(t, scheme_name(scheme), cp.plan, cp.mask)
                .err()
                .map(|e| e.to_string())
        });
        assert_eq!(res[1].0, None, "{scheme:?}: rank 1 agreed before leaving");
        for r in (0..p).filter(|&r| r != 1) {
            let (e, took) = &res[r];
            let e = e
                .as_deref()
                .unwrap_or_else(|| panic!("{scheme:?}: rank {r} succeeded"));
            assert!(
                e.starts_with(&format!("rank {r} of {p}")) && e.contains("rank 1"),
                "{scheme:?} rank {r}: {e}"
            );
            assert!(
                *took < Duration::from_secs(5),
                "{scheme:?} rank {r}: {took:?}"
            );
        }
    }
}

/// The name the schemes give themselves in their agreement check.
fn scheme_name(s: super::scheme::Scheme) -> &'static str {
    use super::scheme::Scheme as S;
    match s {
        S::Ring | S::Zigzag => "ring",
        S::AllGather => "all-gather",
        S::Ulysses => "ulysses",
        S::PassQ => "pass-Q",
        S::Usp(_) => "usp",
    }
}

/// A rank that stalls (alive, silent, past the timeout): every other rank fails within the
/// timeout (plus the work before it) with an error naming it; when the stalled rank wakes and
/// runs, it fails at once too (its peers have gone). Nothing hangs.
#[test]
fn a_rank_that_stalls_is_named_within_the_timeout() {
    use super::scheme::Scheme as S;
    // (USP: U = 1 and U = P at three ranks, and a 2 x 2 grid, where a rank's peers in its
    // groups and the others all name the rank that failed.)
    for (scheme, p) in [
        (S::Ring, 3),
        (S::AllGather, 3),
        (S::Ulysses, 3),
        (S::PassQ, 3),
        (S::Usp(1), 3),
        (S::Usp(3), 3),
        (S::Usp(2), 4),
    ] {
        let timeout = Duration::from_millis(400);
        let res = with_a_bad_rank(scheme, p, timeout, |t, x, cp| {
            std::thread::sleep(Duration::from_millis(1500));
            let start = std::time::Instant::now();
            let e = scheme.forward(cp, x, &AttnParams::default()).err();
            let _ = t;
            assert!(
                start.elapsed() < Duration::from_millis(300),
                "the late rank waited"
            );
            e.map(|e| e.to_string())
        });
        let late = res[1].0.as_deref().expect("the late rank fails");
        assert!(
            late.starts_with(&format!("rank 1 of {p}")),
            "{scheme:?}: {late}"
        );
        for r in (0..p).filter(|&r| r != 1) {
            let (e, took) = &res[r];
            let e = e
                .as_deref()
                .unwrap_or_else(|| panic!("{scheme:?}: rank {r} succeeded"));
            assert!(
                e.starts_with(&format!("rank {r} of {p}")) && e.contains("from rank 1"),
                "{scheme:?} rank {r}: {e}"
            );
            assert!(
                *took < Duration::from_millis(1400),
                "{scheme:?} rank {r}: {took:?}"
            );
        }
    }
}

/// Tree decode against single-rank `forward` on the whole K / V and the f64 oracle: a batch of
/// queries (Sq < Sk, bottom-right aligned), GQA and MQA, P = 1 .. 5 with shards of uneven length
/// and empty ones, several masks; every rank ends with the same bits, and a rank receives only
/// the other ranks' partial (out, LSE).
#[test]
fn tree_decode_matches_single_rank_and_the_oracle() {
    use super::tree::tree_decode_threads;
    use crate::reference::attention_f64;
    let (b, d, dv) = (2, 16, 8);
    // (Sk, Sq, Hq, Hk, shard bounds)
    let cases: &[(usize, usize, usize, usize, &[usize])] = &[
        (13, 1, 2, 1, &[0, 13]),
        (63, 1, 4, 2, &[0, 40, 63]),
        (65, 3, 3, 1, &[0, 1, 1, 65]),
        (113, 7, 4, 4, &[0, 50, 51, 90, 113]),
        (1023, 5, 6, 2, &[0, 300, 301, 301, 900, 1023]),
        (37, 37, 2, 2, &[0, 0, 20, 37]),
    ];
    for &(sk, sq, hq, hk, bounds) in cases {
        let seed = (sk * 10 + sq) as u64;
        let (q, k, v) = (
            seeded(seed, b * sq * hq * d),
            seeded(seed + 1, b * sk * hk * d),
            seeded(seed + 2, b * sk * hk * dv),
        );
        for expr in [
            "full",
            "causal",
            "causal & window(9,0) | sinks(2)",
            "chunk(10) & !strided(3)",
        ] {
            let bound = MaskExpr::parse(expr)
                .unwrap()
                .bind(MaskShape { batch: b, sq, sk }, None)
                .unwrap();
            let prm = AttnParams::default();
            let (qv, kv, vv) = (
                TensorView::contiguous(&q[..], [b, sq, hq, d]).unwrap(),
                TensorView::contiguous(&k[..], [b, sk, hk, d]).unwrap(),
                TensorView::contiguous(&v[..], [b, sk, hk, dv]).unwrap(),
            );
            let single = forward(&qv, &kv, &vv, &prm, MaskSpec::Expr(&bound)).unwrap();
            let oracle =
                attention_f64(&qv, &kv, &vv, &prm, &|bi, _, i, j| bound.allowed(bi, i, j)).unwrap();
            let mask = CpMask::new(bound, 16).unwrap();
            let dims = (b, sq, sk, hq, hk, d, dv);
            let t = Duration::from_secs(30);
            let res = tree_decode_threads(&mask, (&q, &k, &v), dims, bounds, &prm, t).unwrap();
            let what = format!("`{expr}` Sk {sk} Sq {sq} heads {hq}/{hk} shards {bounds:?}");
            let want_o = single.out.data.to_f32_vec();
            let e = rel_err(&res.out, &want_o);
            assert!(e <= 1e-5, "{what}: out differs from single-rank by {e}");
            let e = rel_err(&res.lse, &single.lse);
            assert!(e <= 1e-5, "{what}: lse differs from single-rank by {e}");
            // Against the f64 oracle: no worse than 1.5 x single-rank's own error.
            let o64: Vec<f32> = oracle.out.iter().map(|&x| x as f32).collect();
            let l64: Vec<f32> = oracle.lse.iter().map(|&x| x as f32).collect();
            let (e_cp, e_one) = (rel_err(&res.out, &o64), rel_err(&want_o, &o64));
            assert!(
                e_cp <= 1.5 * e_one + 1e-6,
                "{what}: out vs oracle {e_cp}, single {e_one}"
            );
            let (e_cp, e_one) = (rel_err(&res.lse, &l64), rel_err(&single.lse, &l64));
            assert!(
                e_cp <= 1.5 * e_one + 1e-6,
                "{what}: lse vs oracle {e_cp}, single {e_one}"
            );
            // What a rank receives: the agreement's ten words and the partials of the others.
            let p = bounds.len() - 1;
            let per = (4 * b * sq * hq * (dv + 1) + 80) as u64 * (p as u64 - 1);
            for (r, x) in res.traffic.iter().enumerate() {
                assert_eq!(x.received, per, "{what}: rank {r}");
            }
        }
    }
}

/// Tree decode's refusals: shards that leave a gap or overlap, ranks with other queries, a
/// buffer that does not match its shard, bounds that do not cover the keys.
#[test]
fn tree_decode_bad_inputs_are_clear_errors() {
    use super::tree::{tree_decode, tree_decode_threads, DecodeShard};
    let (b, sq, sk, hq, hk, d) = (1, 2, 20, 2, 1, 4);
    let bound = MaskExpr::parse("causal")
        .unwrap()
        .bind(MaskShape { batch: b, sq, sk }, None)
        .unwrap();
    let mask = CpMask::new(bound, 4).unwrap();
    let prm = AttnParams::default();
    let (q, k) = (seeded(5, b * sq * hq * d), seeded(6, b * sk * hk * d));
    let run = |keys: &(dyn Fn(usize) -> (usize, usize) + Sync),
               heads: &(dyn Fn(usize) -> usize + Sync)| {
        on_ranks(2, |t| {
            let (k0, k1) = keys(t.rank());
            let hq = heads(t.rank());
            let x = DecodeShard {
                q: &q[..b * sq * hq * d],
                k: &k[k0 * hk * d..k1 * hk * d],
                v: &k[k0 * hk * d..k1 * hk * d],
                keys: (k0, k1),
                dims: (b, sq, hq, hk, d, d),
            };
            tree_decode(t, &mask, &x, &prm).unwrap_err().to_string()
        })
    };
    let gap = run(&|r| if r == 0 { (0, 8) } else { (9, 20) }, &|_| hq);
    for e in &gap {
        assert!(
            e.contains("rank 1 holds keys 9..20") && e.contains("it should start at 8"),
            "{e}"
        );
    }
    let short = run(&|r| if r == 0 { (0, 8) } else { (8, 19) }, &|_| hq);
    assert!(
        short[0].contains("the shards cover keys 0..19 of the 20"),
        "{}",
        short[0]
    );
    let heads = run(&|r| if r == 0 { (0, 8) } else { (8, 20) }, &|r| 1 + r);
    assert!(
        heads[0].contains("rank 1 has query heads 2, this rank 1"),
        "{}",
        heads[0]
    );
    // A buffer too short for its shard: that rank names it, the other names that rank.
    let errs = on_ranks(2, |t| {
        let (k0, k1) = if t.rank() == 0 { (0, 8) } else { (8, 20) };
        let x = DecodeShard {
            q: &q,
            k: &k[k0 * hk * d..k1 * hk * d - t.rank()],
            v: &k[k0 * hk * d..k1 * hk * d],
            keys: (k0, k1),
            dims: (b, sq, hq, hk, d, d),
        };
        tree_decode(t, &mask, &x, &prm).unwrap_err().to_string()
    });
    assert!(
        errs[1].contains("q / k / v hold 16 / 47 / 48 values"),
        "{}",
        errs[1]
    );
    assert!(errs[0].contains("rank 1 refused its inputs"), "{}", errs[0]);
    let dims = (b, sq, sk, hq, hk, d, d);
    let t = Duration::from_secs(5);
    for bounds in [&[0, 12, 10, 20][..], &[0, 19], &[5, 20], &[0]] {
        let e = tree_decode_threads(&mask, (&q, &k, &k), dims, bounds, &prm, t)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("must rise from 0 to the 20 keys"),
            "{bounds:?}: {e}"
        );
    }
}

/// Linear attention's state passing against single-rank `forward_chunked` on the whole sequence
/// and the f64 recurrence: P = 1 .. 5, odd lengths cut unevenly (parts of one token too), no
/// decay, per-head, per-token and per-key gate decays, GQA, with and without an initial state
/// and a final state's gradient; forward and backward; every rank ends with the same final
/// state and initial state's gradient.
#[test]
fn lasp_matches_single_rank_linear_attention() {
    use super::lasp::{lasp_backward, lasp_forward};
    use crate::linear::cpu::{backward_chunked, forward_chunked};
    use crate::linear::reference::{backward_f64, forward_f64};
    use crate::linear::{Core, Decay};
    fn as_decay((k, g): &(u8, Vec<f32>)) -> Decay<'_> {
        match k {
            0 => Decay::None,
            1 => Decay::PerHead(g),
            2 => Decay::Token(g),
            _ => Decay::Gate(g),
        }
    }
    let (b, h, hk, kd, vd) = (2, 4, 2, 8, 6);
    // (T, part lengths)
    let cases: &[(usize, &[usize])] = &[
        (37, &[37]),
        (37, &[20, 17]),
        (65, &[1, 40, 24]),
        (113, &[30, 30, 1, 52]),
        (101, &[7, 33, 20, 40, 1]),
    ];
    for &(t, parts) in cases {
        let p = parts.len();
        let seed = (t * 10 + p) as u64;
        let (q, k, v) = (
            seeded(seed, b * t * h * kd),
            seeded(seed + 1, b * t * hk * kd),
            seeded(seed + 2, b * t * hk * vd),
        );
        let s0 = seeded(seed + 3, b * h * kd * vd);
        // Log decays <= 0, of several strengths.
        let neg = |seed: u64, n: usize, s: f32| -> Vec<f32> {
            seeded(seed, n)
                .iter()
                .map(|x| -s * (0.05 + x.abs()))
                .collect()
        };
        let per_head = neg(seed + 4, h, 0.1);
        let token = neg(seed + 5, b * t * h, 0.3);
        let gate = neg(seed + 6, b * t * h * kd, 0.2);
        for kind in 0..4 {
            for with_s0 in [false, true] {
                // The decay of tokens t0 .. t1 (the whole sequence for 0 .. t).
                let decay = |t0: usize, t1: usize| -> (u8, Vec<f32>) {
                    let rows = |g: &[f32], w: usize| -> Vec<f32> {
                        (0..b)
                            .flat_map(|bi| g[(bi * t + t0) * w..(bi * t + t1) * w].to_vec())
                            .collect()
                    };
                    match kind {
                        0 => (0, vec![]),
                        1 => (1, per_head.clone()),
                        2 => (2, rows(&token, h)),
                        _ => (3, rows(&gate, h * kd)),
                    }
                };
                let whole_g = decay(0, t);
                let whole = Core {
                    q: TensorView::contiguous(&q[..], [b, t, h, kd]).unwrap(),
                    k: TensorView::contiguous(&k[..], [b, t, hk, kd]).unwrap(),
                    v: TensorView::contiguous(&v[..], [b, t, hk, vd]).unwrap(),
                    decay: as_decay(&whole_g),
                    scale: 0.5,
                    initial_state: with_s0.then_some(&s0[..]),
                    cu_seqlens: None,
                };
                let single = forward_chunked(&whole, 16).unwrap();
                let oracle = forward_f64(&whole).unwrap();
                let dout = seeded(seed + 7, b * t * h * vd);
                let d_final = seeded(seed + 8, b * h * kd * vd);
                // A final state's gradient with the initial state, none without.
                let df = with_s0.then_some(&d_final[..]);
                let sg = backward_chunked(&whole, &dout, df, 16).unwrap();
                let d64: Vec<f64> = dout.iter().map(|&x| x as f64).collect();
                let df64: Option<Vec<f64>> = df.map(|x| x.iter().map(|&y| y as f64).collect());
                let og = backward_f64(&whole, &d64, df64.as_deref()).unwrap();
                let bounds: Vec<usize> = std::iter::once(0)
                    .chain(parts.iter().scan(0, |a, &l| {
                        *a += l;
                        Some(*a)
                    }))
                    .collect();
                let res = on_ranks(p, |tr| {
                    let r = tr.rank();
                    let (t0, t1) = (bounds[r], bounds[r + 1]);
                    let rows = |x: &[f32], w: usize| -> Vec<f32> {
                        (0..b)
                            .flat_map(|bi| x[(bi * t + t0) * w..(bi * t + t1) * w].to_vec())
                            .collect()
                    };
                    let (lq, lk, lv) = (rows(&q, h * kd), rows(&k, hk * kd), rows(&v, hk * vd));
                    let g = decay(t0, t1);
                    let n = t1 - t0;
                    let core = Core {
                        q: TensorView::contiguous(&lq[..], [b, n, h, kd]).unwrap(),
                        k: TensorView::contiguous(&lk[..], [b, n, hk, kd]).unwrap(),
                        v: TensorView::contiguous(&lv[..], [b, n, hk, vd]).unwrap(),
                        decay: as_decay(&g),
                        initial_state: (with_s0 && r == 0).then_some(&s0[..]),
                        ..whole
                    };
                    let o = lasp_forward(tr, &core, 16).unwrap();
                    let g = lasp_backward(tr, &core, &rows(&dout, h * vd), df, 16).unwrap();
                    // This rank's rows of single-rank's and the f64 oracle's gradients.
                    let f32s = |x: &[f64]| -> Vec<f32> { x.iter().map(|&y| y as f32).collect() };
                    let mut want = vec![
                        (
                            "dq",
                            rows(&sg.dq, h * kd),
                            rows(&f32s(&og.dq), h * kd),
                            g.dq.clone(),
                        ),
                        (
                            "dk",
                            rows(&sg.dk, hk * kd),
                            rows(&f32s(&og.dk), hk * kd),
                            g.dk.clone(),
                        ),
                        (
                            "dv",
                            rows(&sg.dv, hk * vd),
                            rows(&f32s(&og.dv), hk * vd),
                            g.dv.clone(),
                        ),
                    ];
                    if let (Some(sdg), Some(odg), Some(dg)) = (&sg.dg, &og.dg, &g.dg) {
                        let w = sdg.len() / (b * t);
                        want.push(("dg", rows(sdg, w), rows(&f32s(odg), w), dg.clone()));
                    }
                    assert_eq!(g.dg.is_some(), sg.dg.is_some());
                    (
                        rows(&single.out, h * vd),
                        o.out,
                        o.state,
                        want,
                        g.d_initial_state,
                    )
                });
                let what = format!("T {t} parts {parts:?} decay {kind} s0 {with_s0}");
                let d0_64: Vec<f32> = og.d_initial_state.iter().map(|&x| x as f32).collect();
                for (r, (_, _, _, grads, d0)) in res.iter().enumerate() {
                    for (name, want, oracle, got) in grads {
                        let e = rel_err(got, want);
                        assert!(e <= 1e-4, "{what} rank {r}: {name} differs by {e}");
                        let (e, one) = (rel_err(got, oracle), rel_err(want, oracle));
                        assert!(
                            e <= 1.5 * one + 1e-5,
                            "{what} rank {r}: {name} vs f64 {e}, single {one}"
                        );
                    }
                    let e = rel_err(d0, &sg.d_initial_state);
                    assert!(e <= 1e-4, "{what} rank {r}: d initial state differs by {e}");
                    let (e, one) = (rel_err(d0, &d0_64), rel_err(&sg.d_initial_state, &d0_64));
                    assert!(
                        e <= 1.5 * one + 1e-5,
                        "{what}: d initial vs f64 {e}, single {one}"
                    );
                    assert_eq!(d0, &res[0].4, "{what}: rank {r}'s initial state gradient");
                }
                for (r, (want, got, state, ..)) in res.iter().enumerate() {
                    let e = rel_err(got, want);
                    assert!(e <= 1e-4, "{what} rank {r}: out differs by {e}");
                    let e = rel_err(state, &single.state);
                    assert!(e <= 1e-4, "{what} rank {r}: state differs by {e}");
                    assert_eq!(state, &res[0].2, "{what}: rank {r}'s final state");
                }
                // Against the f64 recurrence: no worse than 1.5 x single-rank's error.
                let got: Vec<f32> = res.iter().flat_map(|x| x.1.clone()).collect();
                let o64: Vec<f32> = oracle.out.iter().map(|&x| x as f32).collect();
                let one = rel_err(&single.out, &o64);
                // (the parts' rows are in rank order per batch row: compare per batch row)
                let mut cp_rows = vec![0f32; got.len()];
                let mut at = 0;
                for (r, x) in res.iter().enumerate() {
                    let n = bounds[r + 1] - bounds[r];
                    for bi in 0..b {
                        let dst = (bi * t + bounds[r]) * h * vd;
                        cp_rows[dst..dst + n * h * vd]
                            .copy_from_slice(&x.1[bi * n * h * vd..(bi + 1) * n * h * vd]);
                    }
                    at += x.1.len();
                }
                assert_eq!(at, got.len());
                let e = rel_err(&cp_rows, &o64);
                assert!(e <= 1.5 * one + 1e-5, "{what}: vs f64 {e}, single {one}");
                let s64: Vec<f32> = oracle.state.iter().map(|&x| x as f32).collect();
                let (e, one) = (rel_err(&res[0].2, &s64), rel_err(&single.state, &s64));
                assert!(
                    e <= 1.5 * one + 1e-5,
                    "{what}: state vs f64 {e}, single {one}"
                );
            }
        }
    }
}

/// State passing's refusals: an initial state on a rank other than 0, ranks with other decays
/// or heads, packed sequences.
#[test]
fn lasp_bad_inputs_are_clear_errors() {
    use super::lasp::lasp_forward;
    use crate::linear::{Core, Decay};
    let (b, t, kd) = (1, 5, 4);
    let x = seeded(3, b * t * 4 * kd);
    let s0 = seeded(4, 4 * kd * kd);
    let g = [-0.1f32; 4];
    fn core<'a>(x: &'a [f32], h: usize, decay: Decay<'a>) -> Core<'a> {
        let (b, t, kd) = (1, 5, 4);
        let view =
            |hh: usize| TensorView::contiguous(&x[..b * t * hh * kd], [b, t, hh, kd]).unwrap();
        Core {
            q: view(h),
            k: view(1),
            v: view(1),
            decay,
            scale: 1.0,
            initial_state: None,
            cu_seqlens: None,
        }
    }
    let errs = on_ranks(2, |tr| {
        let mut c = core(&x, 2, Decay::None);
        if tr.rank() == 1 {
            c.initial_state = Some(&s0[..2 * kd * kd]);
        }
        lasp_forward(tr, &c, 16).unwrap_err().to_string()
    });
    assert!(
        errs[1].contains("rank 1 holds an initial state"),
        "{}",
        errs[1]
    );
    assert!(errs[0].contains("rank 1 refused its inputs"), "{}", errs[0]);
    let errs = on_ranks(2, |tr| {
        let c = match tr.rank() {
            0 => core(&x, 2, Decay::None),
            _ => core(&x, 2, Decay::PerHead(&g[..2])),
        };
        lasp_forward(tr, &c, 16).unwrap_err().to_string()
    });
    assert!(
        errs[0].contains(
            "rank 1 has decay kind (0 none, 1 per head, 2 per token, 3 gate) 1, this rank 0"
        ),
        "{}",
        errs[0]
    );
    let errs = on_ranks(2, |tr| {
        let c = core(&x, 1 + tr.rank(), Decay::None);
        lasp_forward(tr, &c, 16).unwrap_err().to_string()
    });
    assert!(
        errs[1].contains("rank 0 has heads 1, this rank 2"),
        "{}",
        errs[1]
    );
    let cu = [0i32, 2, 5];
    let errs = on_ranks(2, |tr| {
        let c = Core {
            cu_seqlens: Some(&cu),
            ..core(&x, 2, Decay::None)
        };
        lasp_forward(tr, &c, 16).unwrap_err().to_string()
    });
    assert!(
        errs[0].contains("cu_seqlens: state passing splits one sequence"),
        "{}",
        errs[0]
    );
}

/// State passing against the public `linear_attention` on the CPU (identity features, `plain`
/// and `simple_gla`): the parts' rows put back in order equal its output, and every rank's final
/// state its final state.
#[test]
fn lasp_matches_the_public_linear_attention() {
    use super::lasp::lasp_forward;
    use crate::linear::{linear_attention, Backend, Core, Decay, LinearInputs, LinearSpec};
    let (b, t, h, hk, kd, vd) = (2, 83, 4, 2, 16, 8);
    let parts = [30usize, 1, 52];
    let bounds = [0usize, 30, 31, 83];
    let (q, k, v) = (
        seeded(61, b * t * h * kd),
        seeded(62, b * t * hk * kd),
        seeded(63, b * t * hk * vd),
    );
    let g: Vec<f32> = seeded(64, b * t * h)
        .iter()
        .map(|x| -0.02 - 0.2 * x.abs())
        .collect();
    let s0 = seeded(65, b * h * kd * vd);
    for spec in ["plain", "simple_gla"] {
        let gated = spec == "simple_gla";
        let sp = LinearSpec::parse(spec).unwrap();
        let mut inp = LinearInputs::new(
            TensorView::contiguous(&q[..], [b, t, h, kd]).unwrap(),
            TensorView::contiguous(&k[..], [b, t, hk, kd]).unwrap(),
            TensorView::contiguous(&v[..], [b, t, hk, vd]).unwrap(),
        );
        inp.g = gated.then_some(&g[..]);
        inp.initial_state = Some(&s0);
        let want = linear_attention(&inp, &sp, Backend::Cpu).unwrap();
        let want_out = want.out.data.to_f32_vec();
        let res = on_ranks(parts.len(), |tr| {
            let (t0, t1) = (bounds[tr.rank()], bounds[tr.rank() + 1]);
            let rows = |x: &[f32], w: usize| -> Vec<f32> {
                (0..b)
                    .flat_map(|bi| x[(bi * t + t0) * w..(bi * t + t1) * w].to_vec())
                    .collect()
            };
            let (lq, lk, lv, lg) = (
                rows(&q, h * kd),
                rows(&k, hk * kd),
                rows(&v, hk * vd),
                rows(&g, h),
            );
            let n = t1 - t0;
            let core = Core {
                q: TensorView::contiguous(&lq[..], [b, n, h, kd]).unwrap(),
                k: TensorView::contiguous(&lk[..], [b, n, hk, kd]).unwrap(),
                v: TensorView::contiguous(&lv[..], [b, n, hk, vd]).unwrap(),
                decay: if gated {
                    Decay::Token(&lg)
                } else {
                    Decay::None
                },
                scale: 1.0 / (kd as f32).sqrt(),
                initial_state: (tr.rank() == 0).then_some(&s0[..]),
                cu_seqlens: None,
            };
            let o = lasp_forward(tr, &core, 64).unwrap();
            (rows(&want_out, h * vd), o.out, o.state)
        });
        for (r, (want_rows, got, state)) in res.iter().enumerate() {
            let e = rel_err(got, want_rows);
            assert!(e <= 1e-4, "{spec} rank {r}: out differs by {e}");
            let e = rel_err(state, &want.final_state);
            assert!(e <= 1e-4, "{spec} rank {r}: final state differs by {e}");
        }
    }
}

/// Tree decode and state passing under a rank that leaves at once or stalls past the timeout:
/// every other rank fails with an error naming it (directly or through a peer's abort notice),
/// in time (nothing hangs).
#[test]
fn tree_decode_and_lasp_name_a_rank_that_leaves_or_stalls() {
    use super::lasp::lasp_forward;
    use super::tree::{tree_decode, DecodeShard};
    use crate::linear::{Core, Decay};
    let (p, b, sq, sk, hq, hk, d) = (3, 1, 2, 30, 2, 1, 4);
    let bound = MaskExpr::parse("causal")
        .unwrap()
        .bind(MaskShape { batch: b, sq, sk }, None)
        .unwrap();
    let mask = CpMask::new(bound, 4).unwrap();
    let (q, k) = (seeded(91, b * sq * hq * d), seeded(92, b * sk * hk * d));
    let prm = AttnParams::default();
    for stall in [false, true] {
        for which in ["tree", "lasp"] {
            // (a timeout long enough that a busy machine still starts every rank within it)
            let timeout = Duration::from_millis(if stall { 800 } else { 20_000 });
            let group = ThreadTransport::group(p, timeout).unwrap();
            let res: Vec<(Option<String>, Duration)> = std::thread::scope(|s| {
                let hs: Vec<_> = group
                    .into_iter()
                    .map(|t| {
                        let (q, k, mask, prm) = (&q, &k, &mask, &prm);
                        s.spawn(move || {
                            let start = std::time::Instant::now();
                            let r = t.rank();
                            if r == 1 {
                                if stall {
                                    std::thread::sleep(Duration::from_millis(3000));
                                }
                                return (None, start.elapsed());
                            }
                            let (k0, k1) = (r * 10, r * 10 + 10);
                            let (lk, lv) =
                                (&k[k0 * hk * d..k1 * hk * d], &k[k0 * hk * d..k1 * hk * d]);
                            let e = match which {
                                "tree" => {
                                    let x = DecodeShard {
                                        q,
                                        k: lk,
                                        v: lv,
                                        keys: (k0, k1),
                                        dims: (b, sq, hq, hk, d, d),
                                    };
                                    tree_decode(&t, mask, &x, prm).err()
                                }
                                _ => {
                                    let core = Core {
                                        q: TensorView::contiguous(
                                            &k[..10 * hq * d],
                                            [b, 10, hq, d],
                                        )
                                        .unwrap(),
                                        k: TensorView::contiguous(lk, [b, 10, hk, d]).unwrap(),
                                        v: TensorView::contiguous(lv, [b, 10, hk, d]).unwrap(),
                                        decay: Decay::None,
                                        scale: 1.0,
                                        initial_state: None,
                                        cu_seqlens: None,
                                    };
                                    lasp_forward(&t, &core, 16).err()
                                }
                            };
                            // (as the drivers do: a failing rank tells the others why)
                            let e = e.map(|e| e.to_string());
                            if let Some(why) = &e {
                                t.abort(why);
                            }
                            (e, start.elapsed())
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for r in [0, 2] {
                let (e, took) = &res[r];
                let e = e
                    .as_deref()
                    .unwrap_or_else(|| panic!("{which} stall {stall}: rank {r} succeeded"));
                let named = match stall {
                    true => e.contains("from rank 1") && e.contains("nothing within"),
                    false => e.contains("rank 1") && e.contains("left the group"),
                };
                assert!(
                    e.starts_with(&format!("rank {r} of 3")) && named,
                    "{which} stall {stall} rank {r}: {e}"
                );
                let limit = Duration::from_millis(if stall { 2500 } else { 5000 });
                assert!(*took < limit, "{which} stall {stall} rank {r}: {took:?}");
            }
        }
    }
}
