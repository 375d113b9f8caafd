//! Mask expressions: parser, element semantics, row bits and schedule exactness.
use longattn::mask::{render_ascii, BoundMask, DocIds, MaskExpr, MaskShape, RowMask, TileKind};
use longattn::Error;
use proptest::prelude::*;

fn p(s: &str) -> MaskExpr {
    MaskExpr::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn bind(s: &str, sq: usize, sk: usize) -> BoundMask {
    p(s).bind(MaskShape { batch: 1, sq, sk }, None)
        .unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn err_pos(s: &str) -> (usize, String) {
    match MaskExpr::parse(s) {
        Err(Error::MaskParse {
            pos, msg, caret, ..
        }) => {
            assert_eq!(
                caret.len(),
                s[..pos.min(s.len())].chars().count() + 1,
                "{s}"
            );
            (pos, msg)
        }
        other => panic!("{s}: expected a parse error, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Parser

#[test]
fn parses_every_atom() {
    use MaskExpr::*;
    assert_eq!(p("full"), Full);
    assert_eq!(p("causal"), Causal);
    assert_eq!(p("window(3, 0)"), Window { left: 3, right: 0 });
    assert_eq!(p("sinks(4)"), Sinks(4));
    assert_eq!(p("prefix(0)"), Prefix(0));
    assert_eq!(p("chunk(16)"), Chunk(16));
    assert_eq!(p("strided(3)"), Strided(3));
    assert_eq!(p("document"), Document);
    assert_eq!(p("power(64)"), Power(64));
    assert_eq!(
        p("radial(1560,780)"),
        Radial {
            frame: 1560,
            window: 780
        }
    );
    let n1 = |k, d| Neighborhood {
        grid: vec![],
        kernel: vec![k],
        dilation: vec![d],
    };
    assert_eq!(p("neighborhood(3)"), n1(3, 1));
    assert_eq!(p("neighborhood(3,2)"), n1(3, 2));
    assert_eq!(
        p("neighborhood2d(4,5,3,3)"),
        Neighborhood {
            grid: vec![4, 5],
            kernel: vec![3, 3],
            dilation: vec![1, 1]
        }
    );
    assert_eq!(
        p("neighborhood3d(2,4,5,1,3,3,1,2,1)"),
        Neighborhood {
            grid: vec![2, 4, 5],
            kernel: vec![1, 3, 3],
            dilation: vec![1, 2, 1]
        }
    );
}

#[test]
fn precedence_not_and_or() {
    use MaskExpr::*;
    let b = Box::new;
    assert_eq!(
        p("full | causal & !document"),
        Or(b(Full), b(And(b(Causal), b(Not(b(Document))))))
    );
    assert_eq!(p("!full & causal"), And(b(Not(b(Full))), b(Causal)));
    assert_eq!(
        p("full & causal & document"),
        And(b(And(b(Full), b(Causal))), b(Document))
    );
    assert_eq!(
        p("  causal&( sinks(4)|window(1024 ,0) ) "),
        And(
            b(Causal),
            b(Or(
                b(Sinks(4)),
                b(Window {
                    left: 1024,
                    right: 0
                })
            ))
        )
    );
}

#[test]
fn display_round_trips() {
    for s in [
        "causal & (sinks(4) | window(1024,0))",
        "causal | prefix(512)",
        "causal & document",
        "!(causal | full) & !!document",
        "full & (causal & document)",
        "full | (causal | document)",
        "!(chunk(3) & strided(2)) | neighborhood(3,2) & neighborhood2d(4,5,3,3,1,2)",
        "neighborhood3d(2,2,2,1,1,1)",
        "causal & (sinks(4) | window(63,0) | power(64))",
        "radial(16,8) & !power(2)",
    ] {
        let e = p(s);
        let text = e.to_string();
        assert_eq!(p(&text), e, "{s} -> {text}");
    }
    assert_eq!(
        p("(causal)&(sinks(4)|window(1024,0))").to_string(),
        "causal & (sinks(4) | window(1024,0))"
    );
}

#[test]
fn parse_errors_name_the_position() {
    let (pos, msg) = err_pos("causal & foo(3)");
    assert_eq!(pos, 9);
    assert!(
        msg.contains("unknown atom `foo`") && msg.contains("window(L,R)"),
        "{msg}"
    );
    assert_eq!(err_pos("window(3)").0, 0);
    assert!(err_pos("window(3)").1.contains("wrong number of arguments"));
    assert_eq!(err_pos("causal()").0, 0);
    assert_eq!(err_pos("window()").0, 0);
    assert_eq!(err_pos("neighborhood2d(4,5,3)").0, 0);
    assert_eq!(err_pos("sinks(x)").0, 6);
    assert_eq!(err_pos("sinks(-1)").0, 6);
    assert_eq!(err_pos("sinks(12a)").0, 6);
    assert!(err_pos("sinks(99999999999999999999999)")
        .1
        .contains("too large"));
    assert_eq!(err_pos("chunk(0)").0, 6);
    assert_eq!(err_pos("strided( 0)").0, 9);
    assert_eq!(err_pos("neighborhood(3,0)").0, 15);
    let (pos, msg) = err_pos("(causal & full");
    assert_eq!(pos, 14);
    assert!(msg.contains("unbalanced"), "{msg}");
    let (pos, msg) = err_pos("causal)");
    assert_eq!(pos, 6);
    assert!(msg.contains("unbalanced"), "{msg}");
    let (pos, msg) = err_pos("causal full");
    assert_eq!(pos, 7);
    assert!(msg.contains("trailing"), "{msg}");
    assert_eq!(err_pos("").0, 0);
    assert_eq!(err_pos("   ").0, 3);
    assert!(err_pos("  ").1.contains("empty"));
    assert_eq!(err_pos("causal &").0, 8);
    assert_eq!(err_pos("causal & ()").0, 10);
    assert_eq!(err_pos("causal # x").0, 7);
    // Positions are bytes; the caret counts characters.
    assert_eq!(err_pos("é & foo").0, 0);
    assert_eq!(err_pos("causal & ü").0, 9);
    // Deep nesting is an error, not a stack overflow.
    let deep = format!("{}causal{}", "(".repeat(5000), ")".repeat(5000));
    assert!(matches!(
        MaskExpr::parse(&deep),
        Err(Error::MaskParse { .. })
    ));
    let chain = vec!["causal"; 5000].join(" | ");
    assert!(matches!(
        MaskExpr::parse(&chain),
        Err(Error::MaskParse { .. })
    ));
    let nots = format!("{}causal", "!".repeat(5000));
    assert!(matches!(
        MaskExpr::parse(&nots),
        Err(Error::MaskParse { .. })
    ));
}

#[test]
fn bind_errors() {
    let s = |batch, sq, sk| MaskShape { batch, sq, sk };
    let is_bind = |r: longattn::Result<BoundMask>| matches!(r, Err(Error::MaskBind { .. }));
    assert!(is_bind(p("causal & document").bind(s(1, 4, 4), None)));
    let docs = DocIds {
        q: vec![0; 4],
        k: vec![0; 5],
    };
    assert!(is_bind(p("document").bind(s(1, 4, 4), Some(docs))));
    assert!(is_bind(p("neighborhood(3)").bind(s(1, 4, 5), None)));
    assert!(is_bind(
        p("neighborhood2d(4,5,3,3)").bind(s(1, 21, 21), None)
    ));
    assert!(p("neighborhood2d(4,5,9,9)")
        .bind(s(1, 20, 20), None)
        .is_ok());
    assert!(is_bind(MaskExpr::Chunk(0).bind(s(1, 4, 4), None)));
    assert!(is_bind(MaskExpr::Strided(0).bind(s(1, 4, 4), None)));
    assert!(is_bind(MaskExpr::Power(0).bind(s(1, 4, 4), None)));
    assert!(is_bind(
        MaskExpr::Radial {
            frame: 0,
            window: 3
        }
        .bind(s(1, 4, 4), None)
    ));
    assert!(MaskExpr::Radial {
        frame: 3,
        window: 0
    }
    .bind(s(1, 4, 4), None)
    .is_ok());
    assert!(is_bind(p("causal").bind(s(1, 0, 4), None)));
    let bad_nbr = MaskExpr::Neighborhood {
        grid: vec![2, 2],
        kernel: vec![1],
        dilation: vec![1, 1],
    };
    assert!(is_bind(bad_nbr.bind(s(1, 4, 4), None)));
    let zero_nbr = MaskExpr::Neighborhood {
        grid: vec![],
        kernel: vec![0],
        dilation: vec![1],
    };
    assert!(is_bind(zero_nbr.bind(s(1, 4, 4), None)));
}

// ---------------------------------------------------------------------------------------------
// Element semantics by hand

fn allowed_set(m: &BoundMask, i: usize) -> Vec<usize> {
    (0..m.shape().sk).filter(|&j| m.allowed(0, i, j)).collect()
}

#[test]
fn causal_aligns_bottom_right() {
    let m = bind("causal", 2, 5);
    assert_eq!(allowed_set(&m, 0), vec![0, 1, 2, 3]);
    assert_eq!(allowed_set(&m, 1), vec![0, 1, 2, 3, 4]);
    let decode = bind("causal", 1, 9);
    assert_eq!(allowed_set(&decode, 0).len(), 9);
    // Sq > Sk: the first queries see nothing.
    let m = bind("causal", 5, 2);
    assert_eq!(allowed_set(&m, 2), Vec::<usize>::new());
    assert_eq!(allowed_set(&m, 3), vec![0]);
    // chunk with negative p uses floor division.
    let m = bind("chunk(2)", 5, 2);
    assert_eq!(allowed_set(&m, 2), Vec::<usize>::new()); // p = -1 -> chunk -1
    assert_eq!(allowed_set(&m, 4), vec![0, 1]);
    let m = bind("strided(3)", 5, 2);
    assert_eq!(allowed_set(&m, 0), vec![0]); // p = -3
}

#[test]
fn power_blocks_by_hand() {
    // Blocks of 4 tokens, 40 keys: query block 9 (positions 36..39) sees blocks 9, 8, 7, 5, 1.
    let m = bind("power(4)", 40, 40);
    let blocks = |i: usize| -> Vec<usize> {
        let mut b: Vec<usize> = allowed_set(&m, i).iter().map(|j| j / 4).collect();
        b.dedup();
        b
    };
    assert_eq!(blocks(37), vec![1, 5, 7, 8, 9]);
    // Block 3 (positions 12..15): 3, 2, 4, 1, 5, 7 (-1 and 11 lie outside blocks 0..9).
    assert_eq!(blocks(12), vec![1, 2, 3, 4, 5, 7]);
    // Every key of a kept block is allowed (the block is the unit).
    assert_eq!(allowed_set(&m, 37).len(), 5 * 4);
    // Sq < Sk: positions are aligned bottom-right (query 0 at p = 30, block 7).
    let m = bind("causal & power(4)", 3, 33);
    let b: Vec<usize> = allowed_set(&m, 0).iter().map(|j| j / 4).collect();
    assert_eq!(b.first(), Some(&3));
    assert!(b.contains(&5) && b.contains(&6) && b.contains(&7) && !b.contains(&4));
}

#[test]
fn radial_windows_by_hand() {
    // Frames of 8 tokens, half-width 4. Query at frame 0, spatial 3 (position 3).
    let m = bind("radial(8,4)", 80, 80);
    let in_frame = |i: usize, t: usize| -> Vec<usize> {
        allowed_set(&m, i)
            .into_iter()
            .filter(|j| j / 8 == t)
            .map(|j| j % 8)
            .collect()
    };
    // Distance 0 and 1: |ds| <= 4; distance 2, 3: <= 2; 4..7: <= 1; 8, 9: 0.
    assert_eq!(in_frame(3, 0), vec![0, 1, 2, 3, 4, 5, 6, 7]);
    assert_eq!(in_frame(3, 1), vec![0, 1, 2, 3, 4, 5, 6, 7]);
    assert_eq!(in_frame(3, 2), vec![1, 2, 3, 4, 5]);
    assert_eq!(in_frame(3, 3), vec![1, 2, 3, 4, 5]);
    assert_eq!(in_frame(3, 4), vec![2, 3, 4]);
    assert_eq!(in_frame(3, 7), vec![2, 3, 4]);
    assert_eq!(in_frame(3, 8), vec![3]);
    assert_eq!(in_frame(3, 9), vec![3]);
    // Symmetric in time: frame 9's spatial 0 sees frame 1 (distance 8) at spatial 0 only.
    assert_eq!(in_frame(72, 1), vec![0]);
    assert_eq!(in_frame(72, 9), vec![0, 1, 2, 3, 4]);
}

#[test]
fn neighborhood_1d_borders() {
    let m = bind("neighborhood(3)", 6, 6);
    let want: [&[usize]; 6] = [
        &[0, 1, 2],
        &[0, 1, 2],
        &[1, 2, 3],
        &[2, 3, 4],
        &[3, 4, 5],
        &[3, 4, 5],
    ];
    for (i, w) in want.iter().enumerate() {
        assert_eq!(allowed_set(&m, i), w.to_vec(), "row {i}");
    }
    // Kernel larger than the sequence: everything.
    let m = bind("neighborhood(9)", 4, 4);
    assert_eq!(allowed_set(&m, 0), vec![0, 1, 2, 3]);
}

#[test]
fn neighborhood_1d_dilation_groups() {
    // 7 tokens, dilation 2: groups {0,2,4,6} and {1,3,5}; kernel 3.
    let m = bind("neighborhood(3,2)", 7, 7);
    let want: [&[usize]; 7] = [
        &[0, 2, 4],
        &[1, 3, 5],
        &[0, 2, 4],
        &[1, 3, 5],
        &[2, 4, 6],
        &[1, 3, 5],
        &[2, 4, 6],
    ];
    for (i, w) in want.iter().enumerate() {
        assert_eq!(allowed_set(&m, i), w.to_vec(), "row {i}");
    }
}

#[test]
fn neighborhood_2d_by_hand() {
    // 4 x 5 grid, kernel 3 x 3: rows clamp to [0,2],[0,2],[1,3],[1,3]; cols to
    // [0,2],[0,2],[1,3],[2,4],[2,4].
    let m = bind("neighborhood2d(4,5,3,3)", 20, 20);
    let span = |c: usize, n: usize| -> Vec<usize> {
        let s = (c as i64 - 1).clamp(0, n as i64 - 3) as usize;
        (s..s + 3).collect()
    };
    for y in 0..4 {
        for x in 0..5 {
            let mut want = vec![];
            for &ky in &span(y, 4) {
                for &kx in &span(x, 5) {
                    want.push(ky * 5 + kx);
                }
            }
            want.sort();
            assert_eq!(allowed_set(&m, y * 5 + x), want, "query ({y},{x})");
        }
    }
    // The corner (0, 0) by hand.
    assert_eq!(allowed_set(&m, 0), vec![0, 1, 2, 5, 6, 7, 10, 11, 12]);
    // (3, 4): rows 1..=3, cols 2..=4.
    assert_eq!(allowed_set(&m, 19), vec![7, 8, 9, 12, 13, 14, 17, 18, 19]);
}

#[test]
fn neighborhood_3d_with_dilation() {
    let m = bind("neighborhood3d(3,4,5,1,3,2,1,2,2)", 60, 60);
    for i in 0..60 {
        let (t, y, x) = (i / 20, (i / 5) % 4, i % 5);
        for j in 0..60 {
            let (kt, ky, kx) = (j / 20, (j / 5) % 4, j % 5);
            // t: kernel 1 -> same t. y: dilation 2, groups {0,2},{1,3}: kernel 3 > 2 -> whole
            // group. x: dilation 2, groups {0,2,4},{1,3}; kernel 2.
            let ok_y = ky % 2 == y % 2;
            let ok_x = kx % 2 == x % 2 && {
                let (g, nr) = (x / 2, if x % 2 == 0 { 3 } else { 2 });
                let s = (g as i64 - 1).clamp(0, nr - 2) as usize;
                (s..s + 2).contains(&(kx / 2))
            };
            assert_eq!(m.allowed(0, i, j), kt == t && ok_y && ok_x, "{i} {j}");
        }
    }
}

#[test]
fn documents_unsorted_ids() {
    let docs = DocIds {
        q: vec![5, 5, 7, 5, 9],
        k: vec![7, 5, 5, 7, 5, 1],
    };
    let m = p("document")
        .bind(
            MaskShape {
                batch: 1,
                sq: 5,
                sk: 6,
            },
            Some(docs),
        )
        .unwrap();
    assert_eq!(allowed_set(&m, 0), vec![1, 2, 4]);
    assert_eq!(allowed_set(&m, 2), vec![0, 3]);
    assert_eq!(allowed_set(&m, 4), Vec::<usize>::new());
}

#[test]
fn schedule_pictures() {
    let m = bind("causal", 32, 32);
    let s = m.schedule(8, 8).unwrap();
    assert_eq!(render_ascii(&s, 0, 100), "+...\n#+..\n##+.\n###+\n");
    // Downsampled 2:1, each cell shows the largest class.
    assert_eq!(render_ascii(&s, 0, 2), "+.\n#+\n");
    let m = bind("causal & (sinks(4) | window(16,0))", 64, 64);
    let s = m.schedule(8, 8).unwrap();
    assert_eq!(
        render_ascii(&s, 0, 100),
        "+.......\n#+......\n+#+.....\n++#+....\n+.+#+...\n+..+#+..\n+...+#+.\n+....+#+\n"
    );
    let g = longattn::mask::tile_grid(&s, 0);
    assert_eq!(g[3], vec![2, 2, 1, 2, 0, 0, 0, 0]);
    let text = longattn::mask::explain(&m, 8, 8).unwrap();
    assert!(text.contains("allowed pairs: "), "{text}");
}

// ---------------------------------------------------------------------------------------------
// Property tests: row bits, schedule and pair counts against the element reference.

/// Awkward lengths used everywhere.
const SIZES: [usize; 8] = [1, 2, 7, 63, 64, 65, 113, 130];
const TILES: [usize; 9] = [1, 3, 7, 16, 48, 64, 65, 100, 130];

#[derive(Clone, Debug)]
enum Grid {
    None,
    D1,
    D2(usize, usize),
    D3(usize, usize, usize),
}

fn len() -> impl Strategy<Value = usize> {
    prop_oneof![proptest::sample::select(SIZES.to_vec()), 1usize..140]
}

/// (batch, sq, sk, grid the neighborhood atoms may use).
fn case() -> impl Strategy<Value = (usize, usize, usize, Grid)> {
    prop_oneof![
        3 => (1usize..3, len(), len()).prop_map(|(b, q, k)| (b, q, k, Grid::None)),
        1 => (1usize..3, 1usize..4).prop_map(|(b, q)| (b, 1, [1usize, 7, 65, 130][q], Grid::None)),
        1 => (1usize..3, len()).prop_map(|(b, n)| (b, n, n, Grid::D1)),
        1 => (1usize..3, 1usize..12, 1usize..12).prop_map(|(b, h, w)| (b, h * w, h * w, Grid::D2(h, w))),
        1 => (1usize..3, 1usize..5, 1usize..5, 1usize..6)
            .prop_map(|(b, t, h, w)| (b, t * h * w, t * h * w, Grid::D3(t, h, w))),
    ]
}

fn small() -> impl Strategy<Value = usize> {
    prop_oneof![0usize..4, 0usize..70, 0usize..300]
}
fn pos() -> impl Strategy<Value = usize> {
    prop_oneof![1usize..4, 1usize..70, 1usize..300]
}

fn atom(grid: Grid) -> BoxedStrategy<MaskExpr> {
    use MaskExpr::*;
    let base = prop_oneof![
        Just(Full),
        Just(Causal),
        Just(Document),
        (small(), small()).prop_map(|(left, right)| Window { left, right }),
        small().prop_map(Sinks),
        small().prop_map(Prefix),
        pos().prop_map(Chunk),
        pos().prop_map(Strided),
        pos().prop_map(Power),
        (pos(), small()).prop_map(|(frame, window)| Radial { frame, window }),
    ];
    let nb = |g: Vec<usize>| {
        let n = g.len().max(1);
        (
            proptest::collection::vec(1usize..6, n),
            proptest::collection::vec(prop_oneof![Just(1usize), 1usize..4], n),
        )
            .prop_map(move |(kernel, dilation)| Neighborhood {
                grid: g.clone(),
                kernel,
                dilation,
            })
    };
    match grid {
        Grid::None => base.boxed(),
        Grid::D1 => prop_oneof![base, nb(vec![])].boxed(),
        Grid::D2(h, w) => prop_oneof![base, nb(vec![h, w])].boxed(),
        Grid::D3(t, h, w) => prop_oneof![base, nb(vec![t, h, w])].boxed(),
    }
}

fn expr(grid: Grid) -> impl Strategy<Value = MaskExpr> {
    atom(grid).prop_recursive(4, 24, 2, |inner| {
        use MaskExpr::*;
        prop_oneof![
            inner.clone().prop_map(|a| Not(Box::new(a))),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| And(Box::new(a), Box::new(b))),
            (inner.clone(), inner).prop_map(|(a, b)| Or(Box::new(a), Box::new(b))),
        ]
    })
}

/// Document ids of one row of `n` tokens: sorted runs or arbitrary small ids.
fn ids(n: usize) -> impl Strategy<Value = Vec<i32>> {
    prop_oneof![
        proptest::collection::vec(1usize..40, 1..6).prop_map(move |runs| {
            let mut v = Vec::with_capacity(n);
            for (id, r) in runs.iter().cycle().enumerate() {
                if v.len() >= n {
                    break;
                }
                v.extend(std::iter::repeat_n(id as i32, (*r).min(n - v.len())));
            }
            v
        }),
        proptest::collection::vec(-2i32..3, n),
    ]
}

fn bound() -> impl Strategy<Value = (BoundMask, usize, usize)> {
    case()
        .prop_flat_map(|(batch, sq, sk, grid)| {
            (
                Just((batch, sq, sk)),
                expr(grid),
                proptest::collection::vec((ids(sq), ids(sk), any::<bool>()), batch),
                proptest::sample::select(TILES.to_vec()),
                proptest::sample::select(TILES.to_vec()),
            )
        })
        .prop_map(|((batch, sq, sk), e, rows, tq, tk)| {
            let mut docs = DocIds::default();
            for (q, k, aligned) in rows {
                // Aligned: a query carries the id of the key at its position (packed varlen).
                let q: Vec<i32> = if aligned {
                    (0..sq)
                        .map(|i| {
                            let pp = i as i64 + sk as i64 - sq as i64;
                            if pp >= 0 {
                                k[pp as usize]
                            } else {
                                q[i]
                            }
                        })
                        .collect()
                } else {
                    q
                };
                docs.q.extend(q);
                docs.k.extend(k);
            }
            let m = e
                .bind(MaskShape { batch, sq, sk }, Some(docs))
                .unwrap_or_else(|err| panic!("{e}: {err}"));
            (m, tq, tk)
        })
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 1500,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn row_bits_match_allowed((m, _tq, _tk) in bound(), j0s in proptest::collection::vec((0usize..300, 1usize..7), 3)) {
        let MaskShape { batch, sq, sk } = m.shape();
        let mut out = [0u64; 8];
        for b in 0..batch {
            for i in 0..sq {
                for &(j0, nw) in &j0s {
                    let out = &mut out[..nw];
                    m.row_bits(b, 3, i, j0, out);
                    for (w, &word) in out.iter().enumerate() {
                        for t in 0..64 {
                            let j = j0 + 64 * w + t;
                            let want = j < sk && m.allowed(b, i, j);
                            prop_assert_eq!((word >> t) & 1 == 1, want,
                                "{} b {} i {} j {} (j0 {})", m.expr(), b, i, j, j0);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn schedule_is_exact((m, tq, tk) in bound()) {
        let MaskShape { batch, sq, sk } = m.shape();
        let s = m.schedule(tq, tk).unwrap();
        prop_assert_eq!(s.batch, if m.expr().uses_documents() { batch } else { 1 });
        for b in 0..batch {
            let mut brute = 0u64;
            for qt in 0..s.q_tiles {
                let (q0, q1) = s.q_range(qt);
                let row = s.row(b, 0, qt);
                let mut e = row.iter().peekable();
                for kt in 0..s.k_tiles {
                    let (k0, k1) = s.k_range(kt);
                    let n = (q0..q1)
                        .flat_map(|i| (k0..k1).map(move |j| (i, j)))
                        .filter(|&(i, j)| m.allowed(b, i, j))
                        .count();
                    brute += n as u64;
                    let listed = e.next_if(|x| x.k_tile as usize == kt);
                    let want = if n == 0 {
                        None
                    } else if n == (q1 - q0) * (k1 - k0) {
                        Some(TileKind::Full)
                    } else {
                        Some(TileKind::Partial)
                    };
                    prop_assert_eq!(listed.map(|x| x.kind), want,
                        "{} b {} tile ({}, {}) of {}x{} tiles, sq {} sk {}", m.expr(), b, qt, kt, tq, tk, sq, sk);
                }
            }
            prop_assert_eq!(m.allowed_pairs(b), brute, "{}", m.expr());
        }
        let _ = sk;
    }
}

#[test]
fn display_parse_round_trip_random() {
    let mut runner = proptest::test_runner::TestRunner::new(config());
    runner
        .run(&(case().prop_flat_map(|c| expr(c.3))), |e| {
            let text = e.to_string();
            prop_assert_eq!(MaskExpr::parse(&text).unwrap(), e);
            Ok(())
        })
        .unwrap();
}

/// Build times at n = 131072 with 64 x 64 tiles (run with
/// `cargo test --release -p longattn --test mask -- --ignored --nocapture`).
#[test]
#[ignore = "a timing report, not a check: run with --ignored --nocapture (numbers in docs/MASKS.md)"]
fn schedule_build_time_131072() {
    let n = 131072;
    let shape = MaskShape {
        batch: 1,
        sq: n,
        sk: n,
    };
    let docs = DocIds {
        q: (0..n as i32).map(|i| i / (n as i32 / 8)).collect(),
        k: (0..n as i32).map(|i| i / (n as i32 / 8)).collect(),
    };
    for text in [
        "causal",
        "causal & (sinks(4) | window(1024,0))",
        "causal & document",
        "!causal",
        "neighborhood(1023)",
        "chunk(4096) | strided(512)",
        "causal & (sinks(4) | window(1023,0) | power(1024))",
        "radial(4096,2048)",
    ] {
        let e = p(text);
        let t = std::time::Instant::now();
        let m = e.bind(shape, Some(docs.clone())).unwrap();
        let bind_t = t.elapsed();
        let mut best = f64::INFINITY;
        let mut s = None;
        for _ in 0..5 {
            let t = std::time::Instant::now();
            s = Some(m.schedule(64, 64).unwrap());
            best = best.min(t.elapsed().as_secs_f64());
        }
        let s = s.unwrap();
        let t = std::time::Instant::now();
        let pairs = m.allowed_pairs(0);
        let pairs_t = t.elapsed();
        let (f, pt) = s.counts();
        println!(
            "{text:40} bind {:7.3} ms  schedule {:7.3} ms  allowed_pairs {:7.3} ms  full {f} partial {pt} pairs {pairs}",
            bind_t.as_secs_f64() * 1e3,
            best * 1e3,
            pairs_t.as_secs_f64() * 1e3
        );
    }
}

/// The per-axis tile classification of undilated neighborhoods (no row scan) on grids larger than
/// the proptests draw, with tiles that cut grid lines at awkward places: every tile's kind equals
/// the brute-force count's.
#[test]
fn neighborhood_tiles_classified_exactly_on_larger_grids() {
    for (expr, n) in [
        ("neighborhood2d(32,48,7,5)", 32 * 48),
        ("neighborhood2d(40,40,13,13)", 1600),
        ("neighborhood3d(4,8,16,3,5,7)", 4 * 8 * 16),
        ("neighborhood(33)", 700),
        ("neighborhood2d(32,48,7,5) & causal", 32 * 48),
    ] {
        let m = MaskExpr::parse(expr)
            .unwrap()
            .bind(MaskShape::square(n), None)
            .unwrap();
        for (tq, tk) in [(64, 64), (128, 64), (48, 80), (7, 100)] {
            assert_tiles_exact(&m, tq, tk, expr);
        }
    }
}

/// The static long-range atoms on longer sequences than the random cases reach (many frames,
/// query tiles inside one frame and across two, blocks larger and smaller than the tiles,
/// Sq != Sk): every tile's kind equals the brute-force count's, and the densities fall as the
/// definitions say.
#[test]
fn power_and_radial_tiles_classified_exactly() {
    for (expr, sq, sk) in [
        ("radial(160,80)", 1600, 1600),
        ("radial(100,100) & !window(5,5)", 1500, 1500),
        ("radial(37,6)", 700, 1100),
        ("causal & power(64)", 2000, 2000),
        ("causal & (sinks(4) | window(63,0) | power(32))", 900, 1400),
        ("power(100) & !chunk(300)", 1200, 1200),
    ] {
        let m = MaskExpr::parse(expr)
            .unwrap()
            .bind(MaskShape { batch: 1, sq, sk }, None)
            .unwrap();
        for (tq, tk) in [(64, 64), (128, 64), (48, 80), (7, 100)] {
            assert_tiles_exact(&m, tq, tk, expr);
        }
    }
    // causal & power(64) at 8192 tokens (128 blocks): a query keeps at most 8 blocks (distances
    // 0, 1, 2, ..., 64) of 64 keys: at most 512 of the 8192 keys of a row.
    let d = MaskExpr::parse("causal & power(64)")
        .unwrap()
        .bind(MaskShape::square(8192), None)
        .unwrap()
        .density();
    assert!(d > 0.04 && d <= 512.0 / 8192.0, "{d}");
    // radial(256,128) over 32 frames: far frames keep a band that halves with distance.
    let d = MaskExpr::parse("radial(256,128)")
        .unwrap()
        .bind(MaskShape::square(256 * 32), None)
        .unwrap()
        .density();
    assert!(d > 0.02 && d < 0.25, "{d}");
}

/// Every tile of `m`'s schedule for `tq` x `tk` tiles, in every batch row it has, has the kind
/// (absent, Full, Partial) that counting its allowed pairs one by one gives.
fn assert_tiles_exact(m: &BoundMask, tq: usize, tk: usize, label: &str) {
    let s = m.schedule(tq, tk).unwrap();
    for b in 0..s.batch {
        for qt in 0..s.q_tiles {
            let (q0, q1) = s.q_range(qt);
            let row = s.row(b, 0, qt);
            for kt in 0..s.k_tiles {
                let (k0, k1) = s.k_range(kt);
                let on = (q0..q1)
                    .flat_map(|i| (k0..k1).map(move |j| (i, j)))
                    .filter(|&(i, j)| m.allowed(b, i, j))
                    .count();
                let want = match on {
                    0 => None,
                    x if x == (q1 - q0) * (k1 - k0) => Some(TileKind::Full),
                    _ => Some(TileKind::Partial),
                };
                let got = row.iter().find(|e| e.k_tile as usize == kt).map(|e| e.kind);
                assert_eq!(got, want, "{label} b {b} tiles {tq}x{tk} ({qt}, {kt})");
            }
        }
    }
}

/// Masks that allow one interval of keys per row (tiles the atoms leave undecided are
/// classified from the rows' intervals), with documents in row order and against it: every
/// tile's kind equals the brute-force count's, with Sq != Sk, empty rows (a window past a prefix
/// bound) and tiles that cut the bands at awkward places.
#[test]
fn interval_tiles_classified_exactly() {
    let (sq, sk) = (300, 420);
    let shape = MaskShape { batch: 2, sq, sk };
    // Documents in order, or (batch row 1 of the second set) the same runs in reverse order.
    let ids = |n: usize, b: usize| -> Vec<i32> {
        (0..n)
            .map(|i| {
                let d = (i * 5 / n) as i32;
                if b == 0 {
                    d
                } else {
                    4 - d
                }
            })
            .collect()
    };
    let sets = [
        DocIds {
            q: [ids(sq, 0), ids(sq, 0)].concat(),
            k: [ids(sk, 0), ids(sk, 0)].concat(),
        },
        DocIds {
            q: [ids(sq, 0), ids(sq, 1)].concat(),
            k: [ids(sk, 0), ids(sk, 1)].concat(),
        },
    ];
    for (docs, text) in sets.iter().flat_map(|d| {
        [
            "causal & window(100,0)",
            "causal & prefix(100) & window(30,0)",
            "window(10,40) & sinks(64)",
            "chunk(64) & causal",
            "chunk(50) & window(20,20)",
            "causal & sinks(30) & window(60,0)",
            "window(80,80) & prefix(200)",
            "causal & document",
            "document & window(40,10)",
        ]
        .map(move |t| (d, t))
    }) {
        let m = p(text).bind(shape, Some(docs.clone())).unwrap();
        for (tq, tk) in [(64, 64), (192, 128), (48, 80), (7, 100), (1, 33)] {
            assert_tiles_exact(&m, tq, tk, text);
        }
    }
}
